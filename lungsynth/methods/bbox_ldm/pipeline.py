"""Train, load, sample and evaluate the three bbox-LDM configurations (chapter 04).

Training (Mari et al.): slices through nodule centres are encoded once by the frozen 2D VQ-VAE
(x4) into ``z_0`` [4, H/4, W/4]; at every step ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``,
``z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps`` and the U-Net predicts ``eps`` from
``[z_t, m]`` (m the box mask max-pooled to the latent grid) and, in configs 2-3, the context
tokens; the loss is ``|| eps - eps_theta ||^2`` (Ho et al. 2020, eq. 14). The attributes of each
training item are one reader's scores drawn at random (by the data's SliceDataset at every load).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from lungsynth import paths
from lungsynth.engine import FINAL_NAME, TrainTask, Trainer, load_weights
from lungsynth.methods.bbox_ldm.masks import (AnatomicalMaskSampler, MaskDraw, PaperMaskSampler, classify_boxes,
                                              inside_lung_rate, nodule_table_path, table_sides_and_attributes,
                                              tissue_counts)
from lungsynth.methods.bbox_ldm.model import (CONFIG_NAMES, CONFIGS, ConditionEncoder, box_masks, boxes_from_masks,
                                              build_unet, check_config, mask_to_latent, validate_attributes,
                                              validate_boxes)

KIND = "bbox_ldm"
SAMPLERS: tuple[str, ...] = ("paper", "anatomical")
CROP = 32  # the paper's nodule-crop side for the local FID


def run_name(config: int) -> str:
    return f"04_bbox_ldm_config{check_config(config)}"


def default_run_dir(cfg, config: int, create: bool = True) -> Path:
    """``runs/<profile>/04_bbox_ldm_config<k>``."""
    return paths.run_dir(cfg.profile, run_name(config), create=create)


# --------------------------------------------------------------------------- data


def slice_dataset(cfg, split: str):
    """The data chapter's SliceDataset with this chapter's HU window (``cfg.bbox_ldm.hu_clip``)."""
    from lungsynth.data.datasets import SliceDataset, ensure_prepared

    ensure_prepared(cfg)
    return SliceDataset(cfg, split, hu_clip=tuple(cfg.bbox_ldm.hu_clip))


_SPLITS: dict[tuple, dict[str, Any]] = {}


def load_split(cfg, split: str) -> dict[str, Any]:
    """Every nodule slice of ``split`` at once (cached in the process, per profile, sizes and window).

    Returns ``{"images" [N,1,H,W] in [0,1] over hu_clip, "boxes" [N,3] (y0,x0,side), "lungs" [N,H,W]
    bool, "attributes" [N,5] (one reader drawn per slice), "nodule_ids", "hu_clip"}``.
    """
    clip = tuple(float(v) for v in cfg.bbox_ldm.hu_clip)
    key = (str(paths.prepared_dir(cfg.profile)), split, clip, cfg.data.size_2d, cfg.data.spacing_2d_mm,
           cfg.data.n_scans)
    if key not in _SPLITS:
        ds = slice_dataset(cfg, split)
        if len(ds) == 0:
            raise ValueError(f"the {split!r} split of profile {cfg.profile!r} holds no nodule slices; prepare "
                             f"more scans (cfg.data.n_scans) or use another split")
        items = [ds[i] for i in range(len(ds))]
        masks = torch.stack([it["box"].float() for it in items])
        _SPLITS[key] = {
            "images": torch.stack([it["image"].float() for it in items]),
            "boxes": boxes_from_masks(masks).numpy(),
            "lungs": torch.stack([it["lung"] for it in items])[:, 0].numpy() > 0.5,
            "attributes": torch.stack([torch.as_tensor(it["attributes"]) for it in items]).numpy(),
            "nodule_ids": [str(it["nodule_id"]) for it in items],
            "hu_clip": clip,
        }
    return _SPLITS[key]


def to_hu(images: torch.Tensor | np.ndarray, hu_clip: Sequence[float]) -> np.ndarray:
    """[0, 1] images over ``hu_clip`` -> HU (float32 NumPy)."""
    x = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    lo, hi = float(hu_clip[0]), float(hu_clip[1])
    return (lo + x.astype(np.float32) * (hi - lo)).astype(np.float32)


class LatentSlices(torch.utils.data.Dataset):
    """Training items from cached latents; attributes re-drawn (one reader) through SliceDataset.

    Item: ``{"latent" [C,h,w], "mask" [1,h,w] (box mask on the latent grid), "attributes" [5]}``.
    """

    def __init__(self, latents: torch.Tensor, masks: torch.Tensor, attribute_source: Any | None,
                 attributes: np.ndarray) -> None:
        self.latents, self.masks = latents, masks
        self.source = attribute_source
        self.attributes = torch.as_tensor(attributes, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        attrs = self.source[i]["attributes"] if self.source is not None else self.attributes[i]
        return {"latent": self.latents[i], "mask": self.masks[i], "attributes": torch.as_tensor(attrs).long()}


def autoencoder(cfg, device: torch.device | str | None = None):
    """The frozen 2D VQ-VAE of chapter 02 (trained when missing), on ``device`` (default: the runtime's)."""
    from lungsynth.autoencoders import ensure_autoencoder

    ae = ensure_autoencoder("vqvae2d", cfg, device=device)
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def encode(ae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Images [N, 1, H, W] in [0, 1] -> diffusion latents [N, C, H/4, W/4] (scaled)."""
    dev = next(ae.parameters()).device
    out = [ae.encode_latent(images[i:i + batch_size].to(dev), sample=False).float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def decode(ae, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Latents [N, C, h, w] -> images [N, 1, 4h, 4w] clipped to [0, 1]."""
    dev = next(ae.parameters()).device
    out = [ae.decode_latent(latents[i:i + batch_size].to(dev)).float().cpu()
           for i in range(0, latents.shape[0], batch_size)]
    return torch.cat(out).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- the task


class BboxLdmTask(TrainTask):
    """Noise prediction with the box mask concatenated (and context tokens for configs 2, 3)."""

    kind = KIND

    def __init__(self, cfg, config: int, latent_channels: int, factor: int = 4) -> None:
        from lungsynth.diffusion.schedules import make_scheduler

        c = cfg.bbox_ldm
        self.config_id = check_config(config)
        self.latent_channels, self.factor = int(latent_channels), int(factor)
        self.unet = build_unet(cfg, self.config_id, self.latent_channels)
        self.cond = (ConditionEncoder(self.config_id, c.attr_dim, c.attr_hidden, c.attr_out_dim, c.mask_grid)
                     if self.config_id > 1 else None)
        self.scheduler = make_scheduler("ddpm", c.num_train_timesteps, "linear", "epsilon")
        self._arch = {"config": self.config_id, "latent_channels": self.latent_channels, "factor": self.factor,
                      "unet_channels": list(c.unet_channels), "attr_dim": c.attr_dim, "attr_hidden": c.attr_hidden,
                      "attr_out_dim": c.attr_out_dim, "mask_grid": c.mask_grid,
                      "num_train_timesteps": c.num_train_timesteps, "hu_clip": list(c.hu_clip)}

    def modules(self) -> dict[str, torch.nn.Module]:
        mods: dict[str, torch.nn.Module] = {"unet": self.unet}
        if self.cond is not None:
            mods["cond"] = self.cond
        return mods

    def config(self) -> dict[str, Any]:
        return dict(self._arch)

    def context(self, mask_latent: torch.Tensor, attributes: torch.Tensor | None) -> torch.Tensor | None:
        """Cross-attention tokens [B, N, D'] (None for config 1)."""
        return None if self.cond is None else self.cond(mask_latent, attributes)

    def training_step(self, batch: Mapping[str, torch.Tensor], step: int) -> dict[str, Any]:
        from lungsynth.diffusion.objectives import diffusion_loss
        from lungsynth.diffusion.schedules import add_noise, sample_timesteps

        z0, m = batch["latent"], batch["mask"]
        noise = torch.randn_like(z0)
        t = sample_timesteps(z0.shape[0], self.scheduler.num_train_timesteps, device=z0.device)
        z_t = add_noise(self.scheduler, z0, noise, t)
        ctx = self.context(m, batch["attributes"])
        pred = self.unet(torch.cat([z_t, m.to(z_t.dtype)], dim=1), t, context=ctx)
        return {"loss": diffusion_loss(pred, noise, check_finite=False)}


# --------------------------------------------------------------------------- train / load


def train(cfg, config: int, run_dir: Path | str | None = None, *, max_steps: int | None = None,
          fresh: bool = False, progress: bool | None = None, data: Mapping[str, Any] | None = None,
          ae: Any = None) -> Path:
    """Train configuration ``config`` (1, 2 or 3); resumes a killed run. Returns the run directory.

    ``data`` (a :func:`load_split`-shaped dict) and ``ae`` (an autoencoder) replace the prepared
    training split and the chapter-02 VQ-VAE (tests use small synthetic ones); with ``data`` given the
    attributes stay those of the dict instead of being re-drawn per load.
    """
    from lungsynth.runtime import RunRecord, seed_everything

    config = check_config(config)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, config)
    c = cfg.bbox_ldm
    with RunRecord(run_dir, config=cfg, seed=cfg.seed, command=f"bbox-ldm train --config {config}") as rec:
        seed_everything(cfg.seed)
        with rec.timer("data_and_latents"):
            source = None if data is not None else slice_dataset(cfg, "train")
            data = data if data is not None else load_split(cfg, "train")
            ae = ae if ae is not None else autoencoder(cfg)
            latents = encode(ae, data["images"])
            masks = mask_to_latent(box_masks(data["boxes"], data["images"].shape[-1]), ae.downsample)
            dataset = LatentSlices(latents, masks, source, data["attributes"])
        task = BboxLdmTask(cfg, config, latents.shape[1], ae.downsample)
        trainer = Trainer.from_config(cfg.engine, run_dir, max_steps=int(max_steps or c.train_steps),
                                      batch_size=c.batch_size, lr=c.lr, seed=cfg.seed, fresh=fresh,
                                      progress=progress, num_workers=0)
        with rec.timer("train"):
            result = trainer.fit(task, dataset)
        rec["steps"] = result.steps
        rec["last_losses"] = result.last_losses
        rec["n_train_slices"] = len(dataset)
    return run_dir


def ensure_trained(cfg, config: int, run_dir: Path | str | None = None, progress: bool | None = None) -> Path:
    """The run directory of ``config``, trained when it has no ``final.pt``, resumed (from ``last.pt``) when it
    holds fewer than ``cfg.bbox_ldm.train_steps`` steps; a finished run is reused as it is."""
    from lungsynth.engine import load_checkpoint

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, config)
    final = run_dir / FINAL_NAME
    if not final.is_file() or int(load_checkpoint(final).get("step", 0)) < int(cfg.bbox_ldm.train_steps):
        train(cfg, config, run_dir, progress=progress)
    return run_dir


class BboxLdm:
    """A trained configuration ready to sample: U-Net, condition encoder, scheduler, frozen VQ-VAE."""

    def __init__(self, task: BboxLdmTask, ae, cfg, run_dir: Path) -> None:
        self.task, self.ae, self.cfg, self.run_dir = task, ae, cfg, run_dir
        self.config_id = task.config_id
        self.image_size = int(cfg.data.size_2d)

    @property
    def device(self) -> torch.device:
        return next(self.task.unet.parameters()).device

    @torch.no_grad()
    def sample(self, boxes: Any, attributes: Any, *, seed: int = 0, steps: int | None = None,
               batch_size: int = 16, progress: bool = False) -> torch.Tensor:
        """Slices [B, 1, H, W] in [0, 1] (over ``cfg.bbox_ldm.hu_clip``) for boxes [B, 3] and attributes [B, 5].

        Boxes outside the image or attributes outside 1..5 are a ValueError. With ``steps`` equal to
        the T training steps the sampler is ancestral DDPM, otherwise deterministic DDIM.
        """
        from lungsynth.diffusion.samplers import sample as reverse
        from lungsynth.diffusion.schedules import make_scheduler

        b = validate_boxes(boxes, self.image_size)
        a = validate_attributes(attributes)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{b.shape[0]} boxes but {a.shape[0]} attribute rows; give one row of 5 scores per box")
        c = self.cfg.bbox_ldm
        n_steps = int(steps or c.ddim_steps)
        kind = "ddpm" if n_steps >= c.num_train_timesteps else "ddim"
        sched = make_scheduler(kind, c.num_train_timesteps, "linear", "epsilon")
        dev = self.device
        gen = torch.Generator().manual_seed(int(seed))
        unet = self.task.unet.eval()
        h = self.image_size // self.task.factor
        out = []
        for i in range(0, b.shape[0], batch_size):
            m = mask_to_latent(box_masks(b[i:i + batch_size], self.image_size), self.task.factor).to(dev)
            cond: dict[str, Any] = {"concat": m}
            ctx = self.task.context(m, a[i:i + batch_size].to(dev))
            if ctx is not None:
                cond["context"] = ctx
            z = reverse(lambda x, t, **kw: unet(x, t, **kw), sched, (m.shape[0], self.task.latent_channels, h, h),
                        n_steps, generator=gen, device=dev, condition=cond, progress=progress,
                        desc=f"bbox-LDM config {self.config_id}")
            out.append(decode(self.ae, z))
        return torch.cat(out)


def load(cfg, config: int, run_dir: Path | str | None = None, device: torch.device | str | None = None,
         ae: Any = None) -> BboxLdm:
    """A trained configuration (refuses a checkpoint of another architecture); ``ae`` as in :func:`train`."""
    from lungsynth.runtime import device as default_device

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, config, create=False)
    dev = torch.device(device) if device is not None else default_device()
    ae = (ae if ae is not None else autoencoder(cfg)).to(dev).eval().requires_grad_(False)
    task = BboxLdmTask(cfg, config, ae.latent_channels, ae.downsample)
    load_weights(run_dir, kind=KIND, config=task.config(), modules=task.modules())
    for mod in task.modules().values():
        mod.to(dev).eval().requires_grad_(False)
    return BboxLdm(task, ae, cfg, run_dir)


# --------------------------------------------------------------------------- mask samplers


def paper_sampler(cfg, smooth_px: float = 0.0) -> PaperMaskSampler:
    """Mari et al.'s sampler fitted on the training boxes."""
    data = load_split(cfg, "train")
    return PaperMaskSampler(data["boxes"], int(cfg.data.size_2d), smooth_px)


def anatomical_sampler(cfg) -> AnatomicalMaskSampler:
    """Real nodules (size with attributes) from the nodule table, placed inside real training lungs."""
    import pandas as pd

    from lungsynth.data.datasets import ensure_prepared

    prepared = ensure_prepared(cfg)
    table = pd.read_csv(nodule_table_path(prepared))
    sides, attrs = table_sides_and_attributes(table, float(cfg.data.spacing_2d_mm), int(cfg.data.size_2d))
    return AnatomicalMaskSampler(load_split(cfg, "train")["lungs"], sides, attrs)


def draw_conditions(cfg, sampler: str, n: int, seed: int = 0) -> MaskDraw:
    """``n`` (box, attributes) conditions from the ``paper`` or ``anatomical`` sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown mask sampler {sampler!r}; use 'paper' or 'anatomical'")
    s = paper_sampler(cfg) if sampler == "paper" else anatomical_sampler(cfg)
    return s.sample(int(n), seed)


def box_placement(cfg, draw: MaskDraw, seed: int = 0) -> dict[str, Any]:
    """Where the boxes of ``draw`` fall in real training slices.

    An anatomical box is judged in the slice it was placed in; a paper box (no slice of its own) in a
    training slice drawn at random. Returns ``{"labels", "slice_index", "inside_lung_rate", "counts"}``.
    """
    data = load_split(cfg, "train")
    rng = np.random.default_rng(seed)
    idx = np.where(draw.slice_index >= 0, draw.slice_index, rng.integers(len(data["lungs"]), size=len(draw)))
    hu = to_hu(data["images"][idx, 0], data["hu_clip"])
    labels = classify_boxes(draw.boxes, hu, data["lungs"][idx])
    return {"labels": labels, "slice_index": idx, "inside_lung_rate": inside_lung_rate(labels),
            "counts": tissue_counts(labels)}


def compare_samplers(cfg, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """Both samplers side by side: ``{"draws": {name: MaskDraw}, "placement": {name: box_placement(...)},
    "centre_map": the paper's [H, W] centre probability, "rates": {name: inside-lung rate}}``."""
    paper = paper_sampler(cfg)
    draws = {"paper": paper.sample(int(n), seed), "anatomical": anatomical_sampler(cfg).sample(int(n), seed)}
    placement = {name: box_placement(cfg, d, seed) for name, d in draws.items()}
    return {"draws": draws, "placement": placement, "centre_map": paper.centre_map,
            "rates": {name: p["inside_lung_rate"] for name, p in placement.items()}}


# --------------------------------------------------------------------------- evaluation


def crops(images: torch.Tensor, boxes: np.ndarray, size: int = CROP) -> torch.Tensor:
    """size x size crops centred on each box (shifted to stay inside the image): [N, 1, size, size]."""
    h, w = images.shape[-2:]
    size = min(size, h, w)
    out = []
    for img, (y0, x0, s) in zip(images, np.asarray(boxes)):
        cy, cx = y0 + s // 2, x0 + s // 2
        top = int(np.clip(cy - size // 2, 0, h - size))
        left = int(np.clip(cx - size // 2, 0, w - size))
        out.append(img[:, top:top + size, left:left + size])
    return torch.stack(out)


def feature_net(cfg, seed: int = 0):
    """The evaluation chapter's 2D slice network, trained (rotation prediction, ``cfg.evaluation.slice_net_steps``)
    on the real training slices of this chapter's HU window."""
    from lungsynth.eval.features import train_slice_net

    return train_slice_net(load_split(cfg, "train")["images"], steps=int(cfg.evaluation.slice_net_steps), seed=seed,
                           progress=False)


def fid_2d(real: torch.Tensor, fake: torch.Tensor, net, hu_clip: Sequence[float], bootstrap: int = 0,
           seed: int = 0) -> dict[str, Any]:
    """FID between two sets of [N, 1, H, W] slices (or crops) in the evaluation chapter's 2D features.

    Returns ``{"fid", "ci_low", "ci_high", "network"}`` (the interval only with ``bootstrap`` > 0).
    """
    import warnings

    from lungsynth.eval.distribution import fid
    from lungsynth.eval.features import slice_features

    kw = dict(net=net, intensity="hu", unit_range=tuple(hu_clip))
    fr, name = slice_features(to_hu(real, hu_clip), **kw)
    ff, _ = slice_features(to_hu(fake, hu_clip), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # small-N warning: the table reports N beside each FID
        res = fid(fr, ff, bootstrap=int(bootstrap), seed=seed, network=name)
    return {"fid": float(res.value), "ci_low": res.ci_low, "ci_high": res.ci_high, "network": name}


def evaluate(cfg, configs: Sequence[int] = CONFIGS, *, split: str = "val", repeats: int = 1, seed: int = 0,
             steps: int | None = None, models: Mapping[int, BboxLdm] | None = None, net=None) -> dict[str, Any]:
    """The chapter's Table 2 in shape, plus where the two samplers put their boxes.

    Each configuration generates ``repeats`` slices per real ``split`` slice, conditioned on that slice's
    box and attributes; FID is computed on whole slices and on 32 x 32 crops around the boxes.

    Returns ``{"table": [{"config", "conditioning", "fid_slice", "fid_crop", "n_real", "n_fake",
    "network", "seconds"}], "samples": {config: [N, 1, H, W]}, "real": {...}, "placement": {...}}``.
    """
    real = load_split(cfg, split)
    net = net if net is not None else feature_net(cfg, seed)
    boxes = np.repeat(real["boxes"], repeats, axis=0)
    attrs = np.repeat(real["attributes"], repeats, axis=0)
    rows, samples = [], {}
    for k in configs:
        model = models[k] if models is not None and k in models else load(cfg, k, ensure_trained(cfg, k))
        t0 = time.perf_counter()
        fake = model.sample(boxes, attrs, seed=seed, steps=steps)
        seconds = time.perf_counter() - t0
        nb = int(cfg.evaluation.bootstrap)
        whole = fid_2d(real["images"], fake, net, real["hu_clip"], nb, seed)
        local = fid_2d(crops(real["images"], real["boxes"]), crops(fake, boxes), net, real["hu_clip"], nb, seed)
        samples[k] = fake
        rows.append({"config": k, "conditioning": CONFIG_NAMES[k], "fid_slice": whole["fid"],
                     "fid_slice_ci": (whole["ci_low"], whole["ci_high"]), "fid_crop": local["fid"],
                     "fid_crop_ci": (local["ci_low"], local["ci_high"]), "n_real": len(real["images"]),
                     "n_fake": len(fake),
                     "network": whole["network"], "seconds": round(seconds, 2)})
    placement = compare_samplers(cfg, 200, seed)["placement"]
    return {"table": rows, "samples": samples, "real": real, "boxes": boxes, "attributes": attrs,
            "placement": {s: {"inside_lung_rate": p["inside_lung_rate"], "counts": p["counts"]}
                          for s, p in placement.items()}}
