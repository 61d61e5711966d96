"""Train the three bbox-LDM configurations (chapter 04): the training view of the data, the engine task, the runs.

Training (Mari et al. §2.2): slices through nodule centres are encoded once by the frozen 2D VQ-VAE
(x4) into ``z_0`` [4, H/4, W/4]; at every step ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``,
``z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps`` (Ho et al. 2020, eq. 4) and the U-Net predicts ``eps`` from
``[z_t, m]`` (m the box mask max-pooled to the latent grid) and, in configs 2-3, the context
tokens; the loss is ``|| eps - eps_theta ||^2`` (Ho et al. 2020, eq. 14). The attributes of each
training item are one reader's scores drawn at random (by the data's SliceDataset at every load).

Runs live in ``runs/<profile>/04_bbox_ldm_config<k>`` (:func:`default_run_dir`); :func:`ensure_trained`
reuses a finished run, resumes a killed one and trains a missing one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from lungsynth import paths, run_settings
from lungsynth.data import fingerprint
from lungsynth.data.datasets import prepared_folder, training_stamp
from lungsynth.engine import FINAL_NAME, TrainTask, Trainer
from lungsynth.methods.bbox_ldm.model import (LUNG_CONFIG, ConditionEncoder, autoencoder, autoencoder_name, box_masks,
                                              boxes_from_masks, build_unet, check_config, check_mask_context, encode,
                                              lung_to_latent, mask_to_latent)

KIND = "bbox_ldm"


def check_lung(config: int, lung: bool) -> None:
    """The lung channel exists for :data:`LUNG_CONFIG` only (the course's anatomical variant)."""
    if lung and check_config(config) != LUNG_CONFIG:
        raise ValueError(f"the lung-conditioned variant is configuration {LUNG_CONFIG} + lung; configuration "
                         f"{config} has no lung channel")


def run_name(config: int, lung: bool = False, mask_context: str = "flat") -> str:
    """``04_bbox_ldm_config<k>``, ``_lung`` for the lung-conditioned variant, ``_pooled`` for the mask-token
    context (configs 2, 3; the paper's flattened mask has no suffix)."""
    check_lung(config, lung)
    pooled = check_mask_context(mask_context) == "pooled" and check_config(config) > 1
    return f"04_bbox_ldm_config{check_config(config)}" + ("_lung" if lung else "") + ("_pooled" if pooled else "")


def autoencoders_of(cfg: Any) -> tuple[str, ...]:
    """Chapter 02's VQ-VAE, whose settings shape a run too, unless a local diffusers VQModel replaces it."""
    return () if cfg.bbox_ldm.pretrained_vq else ("vqvae2d",)


def default_run_dir(cfg, config: int, create: bool = True, lung: bool = False) -> Path:
    """``runs/<profile>/`` + :func:`run_name` (with ``cfg.bbox_ldm.mask_context``), with ``@<overrides>`` when
    ``cfg`` overrides a training setting (:func:`lungsynth.run_settings.run_name`)."""
    name = run_settings.run_name(cfg, run_name(config, lung, cfg.bbox_ldm.mask_context), "bbox_ldm",
                                 autoencoders_of(cfg), encoded=("bbox_ldm.mask_context",))
    return paths.run_dir(cfg.profile, name, create=create)


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
    bool, "attributes" [N,5] (one reader drawn per slice), "attributes_median" [N,5] (the readers' medians),
    "spacings" [N] (mm per pixel), "nodule_ids", "hu_clip"}``.
    """
    clip = tuple(float(v) for v in cfg.bbox_ldm.hu_clip)
    key = (str(prepared_folder(cfg)), split, clip, cfg.data.size_2d, cfg.data.n_scans)
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
            "attributes_median": torch.stack([it["attributes_median"] for it in items]).numpy(),
            "nodule_ids": [str(it["nodule_id"]) for it in items],
            "spacings": np.asarray([float(it["spacing_mm"]) for it in items]),
            "hu_clip": clip,
        }
    return _SPLITS[key]


class LatentSlices(torch.utils.data.Dataset):
    """Training items from cached latents; attributes re-drawn (one reader) through SliceDataset.

    Item: ``{"latent" [C,h,w], "mask" [1,h,w] (box mask on the latent grid), "lung" [1,h,w] (the slice's lung
    fraction per latent pixel), "attributes" [5]}``.
    """

    def __init__(self, latents: torch.Tensor, masks: torch.Tensor, attribute_source: Any | None,
                 attributes: np.ndarray, lungs: torch.Tensor) -> None:
        self.latents, self.masks, self.lungs = latents, masks, lungs
        self.source = attribute_source
        self.attributes = torch.as_tensor(attributes, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        attrs = self.source[i]["attributes"] if self.source is not None else self.attributes[i]
        return {"latent": self.latents[i], "mask": self.masks[i], "lung": self.lungs[i],
                "attributes": torch.as_tensor(attrs).long()}


# --------------------------------------------------------------------------- the task


class BboxLdmTask(TrainTask):
    """Denoising with the box mask concatenated (and context tokens for configs 2, 3; the lung channel for the
    lung-conditioned variant)."""

    kind = KIND

    def __init__(self, cfg, config: int, latent_channels: int, factor: int = 4, lung: bool = False,
                 autoencoder: str | None = None) -> None:
        from lungsynth.diffusion.schedules import canonical_prediction_type, make_scheduler

        c = cfg.bbox_ldm
        self.config_id = check_config(config)
        check_lung(self.config_id, lung)
        self.lung = bool(lung)
        self.latent_channels, self.factor = int(latent_channels), int(factor)
        self.latent_size = int(cfg.data.size_2d) // self.factor
        self.cond = (ConditionEncoder(self.config_id, c.attr_dim, c.attr_hidden, c.attr_out_dim, c.mask_grid,
                                      c.mask_context, self.latent_size) if self.config_id > 1 else None)
        self.unet = build_unet(cfg, self.config_id, self.latent_channels, self.lung,
                               None if self.cond is None else self.cond.context_dim)
        self.prediction = canonical_prediction_type(c.prediction)
        self.scheduler = make_scheduler("ddpm", c.num_train_timesteps, "linear", self.prediction)
        self._arch = {"config": self.config_id, "latent_channels": self.latent_channels, "factor": self.factor,
                      "unet_channels": list(c.unet_channels), "attr_dim": c.attr_dim, "attr_hidden": c.attr_hidden,
                      "attr_out_dim": c.attr_out_dim, "mask_grid": c.mask_grid, "mask_context": c.mask_context,
                      "latent_size": self.latent_size,
                      "num_train_timesteps": c.num_train_timesteps, "hu_clip": list(c.hu_clip),
                      "prediction": self.prediction, "lung": self.lung}
        if autoencoder is not None:  # a pretrained VQ-VAE: a run is refused with another one
            self._arch["autoencoder"] = autoencoder

    def modules(self) -> dict[str, torch.nn.Module]:
        mods: dict[str, torch.nn.Module] = {"unet": self.unet}
        if self.cond is not None:
            mods["cond"] = self.cond
        return mods

    def config(self) -> dict[str, Any]:
        return dict(self._arch)

    def context(self, mask_latent: torch.Tensor, attributes: torch.Tensor | None) -> torch.Tensor | None:
        """The cross-attention context [B, N, context_dim] (:class:`ConditionEncoder`; None for config 1)."""
        return None if self.cond is None else self.cond(mask_latent, attributes)

    def concat(self, mask_latent: torch.Tensor, lung_latent: torch.Tensor | None) -> torch.Tensor:
        """The channels concatenated to z_t: the box mask [B,1,h,w], and the lung [B,1,h,w] when conditioned on it."""
        if not self.lung:
            return mask_latent
        if lung_latent is None:
            raise ValueError("this model is conditioned on the lung: pass the lung mask of the slice the box lies in")
        return torch.cat([mask_latent, lung_latent.to(mask_latent)], dim=1)

    def training_step(self, batch: Mapping[str, torch.Tensor], step: int) -> dict[str, Any]:
        from lungsynth.diffusion.objectives import diffusion_loss, target_for
        from lungsynth.diffusion.schedules import add_noise, sample_timesteps

        z0, m = batch["latent"], batch["mask"]
        noise = torch.randn_like(z0)
        t = sample_timesteps(z0.shape[0], self.scheduler.num_train_timesteps, device=z0.device)
        z_t = add_noise(self.scheduler, z0, noise, t)
        ctx = self.context(m, batch["attributes"])
        pred = self.unet(torch.cat([z_t, self.concat(m, batch.get("lung")).to(z_t.dtype)], dim=1), t, context=ctx)
        return {"loss": diffusion_loss(pred, target_for(self.scheduler, z0, noise, t), check_finite=False)}


# --------------------------------------------------------------------------- train


def train_command(cfg: Any, config: int, lung: bool = False) -> str:
    """The command line that trains this run (``--mask-context pooled`` for the mask-token form)."""
    pooled = " --mask-context pooled" if cfg.bbox_ldm.mask_context == "pooled" and config > 1 else ""
    return f"lungsynth bbox-ldm train --config {config}{' --lung' if lung else ''}{pooled} --profile {cfg.profile}"


def rebuild_command(cfg: Any, config: int, lung: bool = False) -> str:
    return train_command(cfg, config, lung) + " --fresh"


def train(cfg, config: int, run_dir: Path | str | None = None, *, max_steps: int | None = None,
          fresh: bool = False, progress: bool | None = None, data: Mapping[str, Any] | None = None,
          ae: Any = None, lung: bool = False) -> Path:
    """Train configuration ``config`` (1, 2 or 3; ``lung``: the lung-conditioned variant of :data:`LUNG_CONFIG`);
    resumes a killed run. Returns the run directory.

    ``data`` (a :func:`load_split`-shaped dict) and ``ae`` (an autoencoder) replace the prepared
    training split and the chapter-02 VQ-VAE (tests use small synthetic ones); with ``data`` given the
    attributes stay those of the dict instead of being re-drawn per load.
    """
    from lungsynth.runtime import RunRecord, seed_everything

    config = check_config(config)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, config, lung=lung)
    c = cfg.bbox_ldm
    stamp = training_stamp(cfg) if data is None else None
    fresh = fingerprint.claim_run(run_dir, stamp, rebuild_command(cfg, config, lung), fresh=fresh)
    with RunRecord(run_dir, config=cfg, seed=cfg.seed,
                   command=f"bbox-ldm train --config {config}{' --lung' if lung else ''}") as rec:
        seed_everything(cfg.seed)
        with rec.timer("data_and_latents"):
            source = None if data is not None else slice_dataset(cfg, "train")
            data = data if data is not None else load_split(cfg, "train")
            ae = ae if ae is not None else autoencoder(cfg)
            latents = encode(ae, data["images"])
            masks = mask_to_latent(box_masks(data["boxes"], data["images"].shape[-1]), ae.downsample)
            lungs = lung_to_latent(torch.as_tensor(np.asarray(data["lungs"]))[:, None], ae.downsample)
            dataset = LatentSlices(latents, masks, source, data["attributes"], lungs)
        seed_everything(cfg.seed)  # the initial weights depend on the seed only
        task = BboxLdmTask(cfg, config, latents.shape[1], ae.downsample, lung, autoencoder_name(ae))
        trainer = Trainer.from_config(cfg.engine, run_dir, max_steps=int(max_steps or c.train_steps),
                                      batch_size=c.batch_size, lr=c.lr, schedule=c.lr_schedule, seed=cfg.seed,
                                      fresh=fresh,
                                      progress=progress, num_workers=0)
        with rec.timer("train"):
            result = trainer.fit(task, dataset)
        rec["steps"] = result.steps
        rec["last_losses"] = result.last_losses
        rec["n_train_slices"] = len(dataset)
        rec["autoencoder"] = autoencoder_name(ae) or "chapter 02 vqvae2d"
    run_settings.record(run_dir, run_settings.training_settings(cfg, "bbox_ldm", autoencoders_of(cfg)))
    return run_dir


def ensure_trained(cfg, config: int, run_dir: Path | str | None = None, progress: bool | None = None,
                   lung: bool = False) -> Path:
    """The run directory of ``config``, trained when it has no ``final.pt``, resumed (from ``last.pt``) when it
    holds fewer than ``cfg.bbox_ldm.train_steps`` steps; a finished run is reused as it is."""
    from lungsynth.engine import load_checkpoint

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, config, lung=lung)
    final = run_dir / FINAL_NAME
    if (not final.is_file() or int(load_checkpoint(final).get("step", 0)) < int(cfg.bbox_ldm.train_steps)
            or not fingerprint.check_run(run_dir, training_stamp(cfg), rebuild_command(cfg, config, lung))):
        train(cfg, config, run_dir, progress=progress, lung=lung)
    else:  # a longer budget resumes above; any other change is refused
        run_settings.check_recorded(run_dir, run_settings.training_settings(cfg, "bbox_ldm", autoencoders_of(cfg)),
                                    rebuild_command(cfg, config, lung), ignore=("bbox_ldm.train_steps",))
    return run_dir
