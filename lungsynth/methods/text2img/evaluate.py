"""Chapter 07's metrics per guidance scale (the paper's Table 1 in shape; Urata et al. report FID, KID,
LPIPS, CLIPScore and BioCLIPScore at GS = 5 .. 60, §2.4 and §3).

- FID and KID of generated ROIs against held-out real ROIs, with the course's 2D slice network
  (trained on real ROIs; the name of the network is recorded with every number);
- diversity: mean MS-SSIM between pairs of generated ROIs (lower is more diverse);
- text consistency as **attribute recovery**: a classifier trained on real ROIs predicts each
  prompted attribute (sphericity, texture, margin, spiculation, calcification) from the generated
  image; the score is the fraction of images whose predicted level matches the prompt's. CLIPScore
  and BiomedCLIP would need weights that cannot be had offline.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

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
    def predict_levels(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Predicted integer levels (1-based, LIDC scale) per attribute."""
        self.eval()
        logits = self(images.to(next(self.parameters()).device))
        return {a: (v.argmax(1) + 1).cpu().numpy() for a, v in logits.items()}


def score_labels(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collated LIDC scores (floats, medians) -> 0-based class indices per attribute."""
    return {a: torch.tensor([score_to_level(a, float(v)) - 1 for v in scores[a]]) for a in PROMPT_ATTRIBUTES}


def _classifier_loss(model: AttributeClassifier, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    logits = model(batch["image"])
    labels = score_labels(batch["scores"])
    losses = {a: F.cross_entropy(logits[a], labels[a].to(logits[a].device)) for a in PROMPT_ATTRIBUTES}
    return {"loss": sum(losses.values()), **{f"ce_{a}": v.detach() for a, v in losses.items()}}


def train_attribute_classifier(cfg: Config, data, run_dir=None, steps: int | None = None) -> AttributeClassifier:
    """Train on real ROIs (``data`` yields "image" and "scores") through the course's engine."""
    model = AttributeClassifier(seed=cfg.seed)
    trainer = Trainer.from_config(cfg.engine, run_dir, max_steps=steps or cfg.text2img.classifier_steps, lr=1e-3,
                                  batch_size=cfg.text2img.batch_size, seed=cfg.seed, progress=False)
    trainer.fit(SimpleTask(model, _classifier_loss, kind="text2img_attribute_classifier"), data)
    return model.eval()


def attribute_recovery(classifier: AttributeClassifier, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Fraction of images whose predicted level equals the level their prompt asked for, per attribute."""
    predicted = classifier.predict_levels(images)
    wanted = [parse_prompt(p) for p in prompts]
    out = {a: float(np.mean([w[a] == p for w, p in zip(wanted, predicted[a])])) for a in PROMPT_ATTRIBUTES}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def stack_images(data) -> torch.Tensor:
    """Every item's "image" of a dataset as one tensor [N, 1, R, R]."""
    return torch.stack([data[i]["image"] for i in range(len(data))])


def guidance_sweep(cfg: Config, model, scales: Sequence[float] | None = None, n: int | None = None,
                   progress: bool = True) -> list[dict[str, Any]]:
    """The paper's Table 1 in shape: one row per guidance scale.

    Real references: held-out ROIs (val + test); generated: ``n`` ROIs per scale for prompts of
    held-out nodules (cycled), the same seed at every scale so only the guidance changes.
    Returns rows with ``guidance``, ``fid``/``kid`` (+ CI), ``ms_ssim``, ``recovery_<attr>``,
    ``recovery_mean``, ``seconds_per_sample``, ``feature_network``; a first row ``guidance="real"``
    gives the real held-out ROIs' own diversity and attribute recovery (the ceiling).
    """
    from tqdm.auto import tqdm

    from lungsynth.eval.distribution import fid, kid
    from lungsynth.eval.features import slice_features, train_slice_net
    from lungsynth.eval.fidelity import ms_ssim_diversity
    from lungsynth.methods.text2img.sample import generate
    from lungsynth.methods.text2img.train import roi_dataset

    c = cfg.text2img
    scales = tuple(scales or c.guidance_scales)
    n = int(n or c.n_eval_samples)
    if getattr(model, "run_dir", None) is not None:  # a model loaded from a run: never scored on its patients
        fingerprint.refuse_overlap(model.run_dir, prepared_root(cfg), ("val", "test"), what="text2img run")
    train_data = roi_dataset(cfg, "train")
    heldout = [roi_dataset(cfg, s) for s in ("val", "test")]
    real = torch.cat([stack_images(d) for d in heldout if len(d)])
    prompts = [d[i]["prompt"] for d in heldout for i in range(len(d))]
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    net = train_slice_net(stack_images(train_data), steps=cfg.evaluation.slice_net_steps, seed=cfg.seed, progress=False)
    real_features, net_name = slice_features(real, net)
    classifier = train_attribute_classifier(cfg, train_data)
    real_recovery = attribute_recovery(classifier, real, [d[i]["prompt"] for d in heldout for i in range(len(d))])
    rows = [{"guidance": "real", "source": data_source(cfg), "ms_ssim": ms_ssim_diversity(real)["mean"],
             **{f"recovery_{k}": v for k, v in real_recovery.items()}, "feature_network": net_name}]
    for scale in tqdm(scales, desc="guidance sweep", disable=not progress):
        t0 = time.perf_counter()
        images = generate(model, prompts, scale, c.sample_steps, c.sampler, seed=cfg.seed)
        seconds = (time.perf_counter() - t0) / n
        fake_features, _ = slice_features(images, net)
        f = fid(real_features, fake_features, bootstrap=cfg.evaluation.bootstrap, network=net_name)
        k = kid(real_features, fake_features, subset_size=min(len(real), n), network=net_name)
        recovery = attribute_recovery(classifier, images, prompts)
        rows.append({"guidance": scale, "source": data_source(cfg), "fid": f.value, "fid_ci": (f.ci_low, f.ci_high), "kid": k.value,
                     "ms_ssim": ms_ssim_diversity(images)["mean"], **{f"recovery_{a}": v for a, v in recovery.items()},
                     "seconds_per_sample": seconds, "feature_network": net_name, "images": images[:4]})
    return rows


def sweep_table(rows: Sequence[dict[str, Any]]):
    """The sweep's rows as a DataFrame indexed by guidance, metrics first (images dropped)."""
    import pandas as pd

    first = ["fid", "kid", "ms_ssim", "recovery_mean"]
    table = pd.DataFrame([{k: v for k, v in r.items() if k not in ("images", "fid_ci")} for r in rows])
    rest = [c for c in table.columns if c not in first and c != "guidance"]
    return table.set_index("guidance")[[c for c in first if c in table.columns] + rest]
