"""Chapter 07's metrics per guidance scale (the paper's Table 1 in shape; Urata et al. report FID, KID,
LPIPS, CLIPScore and BioCLIPScore at GS = 5 .. 60, §2.4 and §3), and its quality gates.

- FID and KID of generated ROIs against real ROIs, with the course's 2D slice network (trained on real
  training ROIs; its name is recorded with every number). The generator trains on ROIs rotated by
  0/90/180/270 degrees and flipped (§2.2), so it draws nodules in every orientation; the real references get
  the same augmentation (:func:`~.train.oriented`), or orientation alone would move FID with a network that was
  trained to recognise rotations.
- diversity: mean MS-SSIM between pairs of generated ROIs (lower is more diverse);
- prompt adherence as **attribute recovery**: classifiers trained on real training ROIs (class-balanced
  cross-entropy, the same augmentation) predict each prompted attribute from the generated image, scored by
  *balanced* accuracy (the mean recall over the levels prompted) with a bootstrap interval, beside the same
  classifiers on real test ROIs and the chance level (1 / number of levels: what a constant guess scores).
- LPIPS (each generated ROI against the real ROI its prompt was written from), CLIPScore and BioCLIPScore
  (w = 2.5) through :mod:`lungsynth.eval.pretrained_metrics` where their weights are in local folders; the
  row says "not available offline" (and why) otherwise.

The sweep runs on the validation split, so the best guidance scale is chosen without the test set; the
gates (:func:`quality_gates`) read the test split at that scale.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lungsynth.config import Config
from lungsynth.data import fingerprint
from lungsynth.data.datasets import data_source, prepared_root
from lungsynth.data.prompts import PHRASES, PROMPT_ATTRIBUTES, parse_prompt, score_to_level
from lungsynth.engine import SimpleTask, Trainer

N_LEVELS = {a: max(PHRASES[a]) for a in PROMPT_ATTRIBUTES}
CHAPTER = "07"
GATES_VERSION = 2  # 2: the geometry misses' info row
GATES_FILE = "07_text2img_gates.json"
GATED_ATTRIBUTES = ("texture", "calcification")  # the two the adherence gate reads (visible in HU)


class AttributeClassifier(nn.Module):
    """A small 2D conv net with one head per prompted attribute: image [B,1,R,R] -> {attr: logits [B, levels]}."""

    def __init__(self, width: int = 16, feature_dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        from lungsynth.eval.features import build_slice_net

        self.backbone = build_slice_net(width=width, feature_dim=feature_dim, seed=seed)
        self.heads = nn.ModuleDict({a: nn.Linear(feature_dim, n) for a, n in N_LEVELS.items()})

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone.features(image)
        return {a: head(features) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict_levels(self, images: torch.Tensor, batch_size: int = 64) -> dict[str, np.ndarray]:
        """Predicted integer prompt levels (1-based) per attribute."""
        self.eval()
        device = next(self.parameters()).device
        out: dict[str, list[np.ndarray]] = {a: [] for a in PROMPT_ATTRIBUTES}
        for start in range(0, len(images), batch_size):
            logits = self(images[start:start + batch_size].to(device))
            for a, v in logits.items():
                out[a].append((v.argmax(1) + 1).cpu().numpy())
        return {a: np.concatenate(v) if v else np.zeros(0, int) for a, v in out.items()}


def score_labels(scores: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Collated LIDC scores (floats, medians) -> 0-based prompt-level indices per attribute."""
    return {a: torch.tensor([score_to_level(a, float(v)) - 1 for v in scores[a]]) for a in PROMPT_ATTRIBUTES}


def class_weights(levels: Sequence[int], n_levels: int) -> torch.Tensor:
    """Inverse-frequency weights [n_levels] over 1-based ``levels`` (mean 1 over the levels present; 0 for absent
    ones), so every level counts as much as the majority in the cross-entropy."""
    counts = np.bincount(np.asarray(levels, dtype=int) - 1, minlength=n_levels).astype(float)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)
    return torch.tensor(weights * (counts > 0).sum() / weights.sum(), dtype=torch.float32)


def _classifier_loss(model: AttributeClassifier, batch: dict[str, Any],
                     weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from lungsynth.methods.text2img.train import augment

    logits = model(augment(batch["image"]))  # orientation-free, like the generator's training ROIs
    labels = score_labels(batch["scores"])
    losses = {a: F.cross_entropy(logits[a], labels[a].to(logits[a].device), weight=weights[a].to(logits[a].device))
              for a in PROMPT_ATTRIBUTES}
    return {"loss": sum(losses.values()), **{f"ce_{a}": v.detach() for a, v in losses.items()}}


def train_attribute_classifier(cfg: Config, data, run_dir=None, steps: int | None = None) -> AttributeClassifier:
    """Train on real ROIs (``data`` yields "image" and "scores") through the course's engine, with
    class-balanced cross-entropy (the levels are very unequal: most nodules are solid and not calcified)."""
    levels = {a: [score_to_level(a, float(data[i]["scores"][a])) for i in range(len(data))] for a in PROMPT_ATTRIBUTES}
    weights = {a: class_weights(v, N_LEVELS[a]) for a, v in levels.items()}
    model = AttributeClassifier(seed=cfg.seed)
    trainer = Trainer.from_config(cfg.engine, run_dir, max_steps=steps or cfg.text2img.classifier_steps, lr=1e-3,
                                  batch_size=cfg.text2img.batch_size, seed=cfg.seed, progress=False)
    loss = lambda m, batch: _classifier_loss(m, batch, weights)  # noqa: E731
    trainer.fit(SimpleTask(model, loss, kind="text2img_attribute_classifier"), data)
    return model.eval()


def balanced_accuracy(wanted: Sequence[int], predicted: Sequence[int]) -> float:
    """Mean recall over the levels present in ``wanted`` (sklearn's balanced accuracy): a constant guess scores
    1 / (number of levels present), whatever the imbalance."""
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": fine, they count as misses
        return float(balanced_accuracy_score(np.asarray(wanted), np.asarray(predicted)))


def adherence(wanted: Sequence[int], predicted: Sequence[int], *, bootstrap: int = 200, level: float = 0.95,
              seed: int = 0) -> dict[str, Any]:
    """Balanced accuracy with a percentile-bootstrap interval (items resampled) and the chance level.

    Returns ``{"balanced_accuracy", "ci": (low, high), "chance", "levels", "n"}``."""
    wanted, predicted = np.asarray(wanted), np.asarray(predicted)
    value = balanced_accuracy(wanted, predicted)
    rng = np.random.default_rng(seed)
    reps = [balanced_accuracy(wanted[i], predicted[i]) for i in (rng.integers(0, len(wanted), len(wanted))
                                                                  for _ in range(int(bootstrap)))]
    alpha = (1.0 - level) / 2.0
    ci = (float(np.quantile(reps, alpha)), float(np.quantile(reps, 1.0 - alpha))) if reps else (None, None)
    k = len(np.unique(wanted))
    return {"balanced_accuracy": value, "ci": ci, "chance": 1.0 / k if k else float("nan"), "levels": k,
            "n": int(len(wanted))}


def attribute_recovery(classifier: AttributeClassifier, images: torch.Tensor, prompts: Sequence[str], *,
                       bootstrap: int = 200, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per attribute, :func:`adherence` of the classifier's predicted level to the level the prompt asked for."""
    predicted = classifier.predict_levels(images)
    wanted = [parse_prompt(p) for p in prompts]
    return {a: adherence([w[a] for w in wanted], predicted[a], bootstrap=bootstrap, seed=seed)
            for a in PROMPT_ATTRIBUTES}


def _recovery_columns(recovery: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    out = {f"bacc_{a}": r["balanced_accuracy"] for a, r in recovery.items()}
    out["bacc_mean"] = float(np.mean(list(out.values())))
    return out


def stack_images(data) -> torch.Tensor:
    """Every item's "image" of a dataset as one tensor [N, 1, R, R]."""
    return torch.stack([data[i]["image"] for i in range(len(data))])


def _check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    bad = [s for s in scales if not float(s) > 0]
    if bad:
        raise ValueError(f"guidance scales must be > 0 (1 is the conditional prediction, the paper sweeps 5..60); got {bad}")
    return tuple(float(s) for s in scales)


def evaluation_tools(cfg: Config, model) -> dict[str, Any]:
    """What the sweep and the gates share, trained on the real training ROIs: ``{"net": the slice network of
    FID/KID, "classifier": the attribute classifiers}``. Pass it to both so a chapter trains them once."""
    from lungsynth.methods.text2img.train import roi_dataset, roi_feature_net

    if getattr(model, "run_dir", None) is not None:  # a model loaded from a run: never scored on its patients
        fingerprint.refuse_overlap(model.run_dir, prepared_root(cfg), ("val", "test"), what="text2img run")
    train_data = roi_dataset(cfg, "train")
    return {"net": roi_feature_net(cfg, stack_images(train_data)),
            "classifier": train_attribute_classifier(cfg, train_data)}


def guidance_sweep(cfg: Config, model, scales: Sequence[float] | None = None, n: int | None = None,
                   progress: bool = True, split: str = "val", tools: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The paper's Table 1 in shape: one row per guidance scale, on the ``split`` ROIs (validation by default).

    Generated: ``n`` ROIs per scale for the split's prompts (cycled), the same seed at every scale so only the
    guidance changes. Returns rows with ``guidance``, ``fid``/``kid`` (+ CI), ``ms_ssim``, ``bacc_<attr>`` and
    ``bacc_mean`` (balanced accuracy of attribute recovery), ``seconds_per_sample``, ``feature_network``;
    a first row ``guidance="real"`` gives the real ROIs' own diversity and recovery (the ceiling), and
    ``chance_<attr>`` the chance levels.
    """
    from tqdm.auto import tqdm

    from lungsynth.eval.distribution import fid, kid
    from lungsynth.eval.features import slice_features
    from lungsynth.eval.fidelity import ms_ssim_diversity
    from lungsynth.eval.pretrained_metrics import pretrained_metrics
    from lungsynth.methods.text2img.sample import generate
    from lungsynth.methods.text2img.train import oriented, roi_dataset

    c = cfg.text2img
    scales = _check_scales(scales or c.guidance_scales)
    n = int(n or c.n_eval_samples)
    tools = tools or evaluation_tools(cfg, model)
    data = roi_dataset(cfg, split)
    if not len(data):
        raise ValueError(f"the {split} split has no ROIs; prepare more scans")
    real = oriented(stack_images(data), cfg.seed)
    real_prompts = [data[i]["prompt"] for i in range(len(data))]
    prompts = [real_prompts[i % len(real_prompts)] for i in range(n)]
    real_features, net_name = slice_features(real, tools["net"])
    real_recovery = attribute_recovery(tools["classifier"], real, real_prompts, bootstrap=0)
    real_pretrained = pretrained_metrics(cfg, real, real_prompts, real)
    real_pretrained.pop("lpips")  # a real ROI against itself
    run = str(getattr(model, "run_dir", None))  # which model the rows describe (the gates reuse only their own)
    rows = [{"guidance": "real", "split": split, "run": run, "source": data_source(cfg), "ms_ssim": ms_ssim_diversity(real)["mean"],
             **_recovery_columns(real_recovery), **{f"chance_{a}": r["chance"] for a, r in real_recovery.items()},
             **real_pretrained, "feature_network": net_name}]
    references = real[[i % len(real) for i in range(n)]]  # the real ROI each prompt was written from (LPIPS pairs)
    for scale in tqdm(scales, desc="guidance sweep", disable=not progress):
        t0 = time.perf_counter()
        images = generate(model, prompts, scale, c.sample_steps, c.sampler, seed=cfg.seed)
        seconds = (time.perf_counter() - t0) / n
        fake_features, _ = slice_features(images, tools["net"])
        # small N is the table's "n" column, not a warning per scale
        f = fid(real_features, fake_features, bootstrap=cfg.evaluation.bootstrap, network=net_name, min_samples_warn=0)
        k = kid(real_features, fake_features, subset_size=min(len(real), n), network=net_name, min_samples_warn=0)
        recovery = attribute_recovery(tools["classifier"], images, prompts, bootstrap=0)
        rows.append({"guidance": scale, "split": split, "run": run, "n": n, "n_real": len(real), "source": data_source(cfg), "fid": f.value,
                     "fid_ci": f.interval(), "kid": k.value, "ms_ssim": ms_ssim_diversity(images)["mean"],
                     **_recovery_columns(recovery), **pretrained_metrics(cfg, images, prompts, references),
                     "seconds_per_sample": seconds, "feature_network": net_name,
                     "images": images[:4], "prompts": prompts[:4]})
    return rows


def best_scale(rows: Sequence[Mapping[str, Any]]) -> float:
    """The swept guidance scale with the lowest KID (the paper's best model is the one with the lowest FID/KID)."""
    swept = [r for r in rows if r["guidance"] != "real"]
    return float(min(swept, key=lambda r: r["kid"])["guidance"])


def sweep_table(rows: Sequence[dict[str, Any]]):
    """The sweep's rows as a DataFrame indexed by guidance, metrics first (images dropped)."""
    import pandas as pd

    first = ["fid", "kid", "lpips", "clip_score", "bioclip_score", "ms_ssim", "bacc_mean"]
    table = pd.DataFrame([{k: v for k, v in r.items() if k not in ("images", "fid_ci", "prompts", "run")} for r in rows])
    rest = [c for c in table.columns if c not in first and c != "guidance"]
    return table.set_index("guidance")[[c for c in first if c in table.columns] + rest]


# ----------------------------------------------------------------------------------------------- geometry


def nodule_diameter_ratio(roi: np.ndarray) -> float:
    """The segmented nodule's maximum (Feret) diameter as a fraction of the ROI side; NaN without one.

    The nodule is the region connected to the ROI's centre that is brighter than halfway between the centre
    (mean of the central 3 x 3 pixels) and the background (median of the border pixels), so solid and
    ground-glass nodules are cut at their own edge. A centre no brighter than the background has no nodule.
    ``roi`` [R, R] in any linear intensity unit.
    """
    from scipy import ndimage
    from skimage.measure import regionprops

    roi = np.asarray(roi, dtype=float)
    r = roi.shape[0]
    mid = r // 2
    centre = float(roi[mid - 1:mid + 2, mid - 1:mid + 2].mean())
    border = float(np.median(np.concatenate([roi[0], roi[-1], roi[:, 0], roi[:, -1]])))
    if centre <= border + 1e-6:
        return float("nan")
    labels, _ = ndimage.label(ndimage.median_filter(roi, 3) > (centre + border) / 2)
    central = labels[mid - 1:mid + 2, mid - 1:mid + 2]
    if not central.any():
        return float("nan")
    label = labels[mid, mid] or int(np.bincount(central.ravel())[1:].argmax()) + 1
    return float(regionprops((labels == label).astype(np.uint8))[0].feret_diameter_max / r)


def geometry_share(images: torch.Tensor | np.ndarray, target: float = 0.5, tolerance: float = 0.15) -> tuple[float, np.ndarray]:
    """(share of ROIs whose nodule diameter is ``target`` +- ``tolerance`` of the side, every ratio)."""
    ratios = np.array([nodule_diameter_ratio(np.asarray(img).squeeze()) for img in images])
    ok = np.abs(ratios - target) <= tolerance  # NaN (no nodule) is never ok
    return float(ok.mean()) if len(ratios) else float("nan"), ratios


def geometry_misses(ratios: np.ndarray, target: float = 0.5, tolerance: float = 0.15) -> dict[str, float]:
    """How the ROIs outside ``target`` +- ``tolerance`` miss, each as a share of all ROIs: ``none`` (no nodule
    at the centre), ``small`` and ``large``; with ``median``, the median ratio of those that have a nodule."""
    r = np.asarray(ratios, dtype=float)
    found = r[~np.isnan(r)]
    return {"none": float(np.isnan(r).mean()), "small": float((r < target - tolerance).mean()),
            "large": float((r > target + tolerance).mean()),
            "median": float(np.median(found)) if len(found) else float("nan")}


# ----------------------------------------------------------------------------------------------- gates


def measure_gates(cfg: Config, model, progress: bool = True, sweep: Sequence[Mapping[str, Any]] | None = None,
                  tools: Mapping[str, Any] | None = None) -> list[Any]:
    """Chapter 07's gates (see :func:`quality_gates`), measured on ``model``; ``sweep`` (the validation sweep of
    this model, :func:`guidance_sweep`) and ``tools`` (:func:`evaluation_tools`) are computed when not given."""
    from lungsynth.eval.baselines import halves, unit_baselines
    from lungsynth.eval.features import slice_features
    from lungsynth.gates import info, judge
    from lungsynth.methods.text2img.sample import generate
    from lungsynth.methods.text2img.train import oriented, roi_dataset

    c = cfg.text2img
    tools = tools or evaluation_tools(cfg, model)
    sweep = sweep or guidance_sweep(cfg, model, progress=progress, tools=tools)
    if any(r.get("split", "val") != "val" for r in sweep):
        raise ValueError("the gates choose the guidance scale on a sweep of the validation split")
    scale = best_scale(sweep)
    test = roi_dataset(cfg, "test")
    if not len(test):
        raise ValueError("the test split has no ROIs; prepare more scans")
    real = oriented(stack_images(test), cfg.seed + 1)
    prompts = [test[i]["prompt"] for i in range(len(test))]
    images = generate(model, prompts, scale, c.sample_steps, c.sampler, seed=cfg.seed)
    rows = [info(CHAPTER, "best guidance scale (lowest KID on the validation split)", scale, n=len(sweep) - 1)]

    # 1. prompt adherence: generated ROIs against the same classifiers on real test ROIs, and chance
    boot = int(cfg.evaluation.bootstrap)
    gen = attribute_recovery(tools["classifier"], images, prompts, bootstrap=boot, seed=cfg.seed)
    ref = attribute_recovery(tools["classifier"], real, prompts, bootstrap=boot, seed=cfg.seed)
    for a in PROMPT_ATTRIBUTES:
        g, r = gen[a], ref[a]
        if a not in GATED_ATTRIBUTES:
            rows.append(info(CHAPTER, f"prompt adherence, {a}: balanced accuracy (generated)", g["balanced_accuracy"],
                             n=g["n"], baseline=r["balanced_accuracy"], baseline_name="real test ROIs",
                             detail=f"chance {g['chance']:.3f}"))
            continue
        # one prompted level makes balanced accuracy trivially chance: nothing to judge
        judged = g["levels"] >= 2
        rows.append(judge(CHAPTER, f"prompt adherence, {a}: balanced accuracy vs 0.8 x real test ROIs",
                          g["balanced_accuracy"] if judged else None, n=g["n"], n_needed=2 * g["levels"],
                          at_least=0.8 * r["balanced_accuracy"],
                          baseline=r["balanced_accuracy"], baseline_name="real test ROIs, same classifiers",
                          detail="a generator that follows the prompt is read by the classifiers nearly as well as real "
                                 "nodules (0.8 leaves room for their own error on another distribution)"))
        rows.append(judge(CHAPTER, f"prompt adherence, {a}: interval low end above chance",
                          g["ci"][0] if judged else None, n=g["n"],
                          n_needed=2 * g["levels"], at_least=g["chance"], baseline=g["chance"],
                          baseline_name=f"chance (1 / {g['levels']} levels)",
                          detail=f"{int(cfg.evaluation.bootstrap)}-resample 95% interval of the balanced accuracy"))

    # 2. distribution: KID against the reference half, with the baselines of the same run and N
    def features(x: Any) -> np.ndarray:
        return slice_features(torch.as_tensor(np.asarray(x)), tools["net"])[0]

    np_real = real.numpy()
    half_a, half_r = halves(len(np_real), cfg.seed)
    if len(half_r) >= 2:  # a KID needs two items a side
        base = unit_baselines("roi", np_real, np.ones_like(np_real, dtype=bool), features, len(half_a),
                              network=slice_features(real[:1], tools["net"])[1], seed=cfg.seed)
        kid_value, floor, noise = base.score(features(images.numpy()[half_a])).value, base.floor.value, base.noise.value
    else:
        kid_value = floor = noise = None
    rows.append(info(CHAPTER, "KID of real test ROIs against the reference half (floor)", floor, n=len(half_a)))
    rows.append(judge(CHAPTER, "distribution: KID vs 0.1 x the noise baseline", kid_value, n=len(half_a), n_needed=20,
                      factor=0.1, baseline=noise, baseline_name="real ROIs with their pixels shuffled",
                      detail="prompts of the comparison half, against the reference half; the noise baseline keeps the "
                             "intensities and loses the structure"))

    # 3. geometry: the ROI is twice the diameter, so the nodule spans half of it
    share, ratios = geometry_share(images)
    real_share, real_ratios = geometry_share(real)
    rows.append(judge(CHAPTER, "geometry: nodule diameter 0.5 +- 0.15 of the ROI side (share)", share, n=len(images),
                      n_needed=20, at_least=0.8, baseline=real_share, baseline_name="real test ROIs, same segmentation",
                      detail="the ROI is cut at twice the maximum diameter (§2.2)"))
    miss, real_miss = geometry_misses(ratios), geometry_misses(real_ratios)
    rows.append(info(CHAPTER, "geometry: median nodule diameter / ROI side", miss["median"], n=len(images),
                     baseline=real_miss["median"], baseline_name="real test ROIs",
                     detail="misses, no nodule / too small / too large: " + " / ".join(f"{miss[k]:.0%}" for k in
                            ("none", "small", "large")) + " (real: " + " / ".join(f"{real_miss[k]:.0%}" for k in
                            ("none", "small", "large")) + ")"))
    return rows


def quality_gates(cfg: Config, sweep: Sequence[Mapping[str, Any]] | None = None,
                  tools: Mapping[str, Any] | None = None) -> list[Any]:
    """Chapter 07's gates on the profile's trained course model (untrained: the row names the command); measured
    once per checkpoint, sampler and data, then read from ``runs/<profile>/07_text2img_gates.json``.

    1. prompt adherence, texture and calcification: balanced accuracy on generated test-prompt ROIs >= 0.8 x
       that of real test ROIs, and its interval's low end above chance;
    2. distribution: KID <= 0.1 x the pixel-shuffle noise baseline (same reference half, same N);
    3. geometry: the segmented nodule's diameter 0.5 +- 0.15 of the ROI side in >= 80% of the samples.

    A notebook that has swept the model already passes its ``sweep`` and ``tools`` (they are what the gates
    would compute again: the same seed, data and settings).
    """
    from lungsynth import paths
    from lungsynth.data.datasets import training_stamp
    from lungsynth.engine import FINAL_NAME
    from lungsynth.gates import cached, file_digest, not_trained
    from lungsynth.methods.text2img.model import default_run_dir, selected_checkpoint
    from lungsynth.methods.text2img.sample import load
    from lungsynth.methods.text2img.train import rebuild_command

    run = default_run_dir(cfg)
    command = rebuild_command(cfg, None).replace(" --fresh", "")
    try:
        if not (run / FINAL_NAME).is_file() or not fingerprint.check_run(run, training_stamp(cfg), rebuild_command(cfg, None)):
            return [not_trained(CHAPTER, "text2img", command)]
    except ValueError as exc:  # made from other data: the message names the command that rebuilds it
        return [not_trained(CHAPTER, "text2img", f"{rebuild_command(cfg, None)}  ({str(exc).splitlines()[0][:120]})")]
    c = cfg.text2img
    key = {"gates": GATES_VERSION, "weights": file_digest(selected_checkpoint(run)), "data": fingerprint.load(prepared_root(cfg))["id"],
           "sampler": c.sampler, "steps": int(c.sample_steps), "scales": list(c.guidance_scales), "n": int(c.n_eval_samples),
           "seed": int(cfg.seed), "bootstrap": int(cfg.evaluation.bootstrap), "slice_net": int(cfg.evaluation.slice_net_steps),
           "classifier": int(c.classifier_steps)}
    if sweep is not None and any(r.get("run") != str(run) for r in sweep):
        sweep, tools = None, None  # the rows of another model (a fine-tuned SD folder): the gates sweep their own
    return cached(paths.runs_dir(cfg.profile) / GATES_FILE, key,
                  lambda: measure_gates(cfg, load(cfg, run), sweep=sweep, tools=tools))
