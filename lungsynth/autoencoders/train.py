"""Training and the latent scale factor of the chapter 02 autoencoders.

Training goes through the
course's one loop (:class:`lungsynth.engine.Trainer`): this module only describes the
autoencoder as a :class:`lungsynth.engine.TrainTask` (two optimisers, generator and patch
discriminator) and prepares its data.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from lungsynth import run_settings
from lungsynth.data import fingerprint
from lungsynth.data.patches import cube_slices, nodule_centre
from lungsynth.data.datasets import prepared_folder, training_stamp
from lungsynth.engine import TrainTask
from lungsynth.autoencoders.model import (LUNG_COND, TRAINING_VIEWS, build_autoencoder, check_kind,
                                          codebook_stats, default_run_dir, load_autoencoder)
from lungsynth.nn.losses import PatchAdversarial, build_perceptual_loss, kl_divergence

NODULE_COND_MIN = (LUNG_COND + 0.2) / 2  # condition values above this are nodule (texture 1..5 -> 0.2..1)


# ---------------------------------------------------------------------- data views


def source_key(kind: str) -> str:
    """The item key of the image an autoencoder of ``kind`` reconstructs ("ct", "cond" or "image")."""

    check_kind(kind)
    return TRAINING_VIEWS[kind][1]


def source_dataset(kind: str, cfg: Any, split: str = "train", keys: Sequence[str] = (),
                   root: Path | str | None = None) -> Dataset:
    """The prepared-data view ``kind`` trains on (whole items, see notes/DATA_API.md).

    vae3d: VolumeDataset "ct"; maskvae: VolumeDataset "cond"; vqvae2d: SliceDataset "image";
    vae2d: RoiDataset "image". ``keys`` adds VolumeDataset keys (3D kinds only). ``root``: a
    prepared folder (default: ``ensure_prepared(cfg)``, built on first use).
    """
    from lungsynth.data.datasets import RoiDataset, SliceDataset, VolumeDataset

    check_kind(kind)
    view, key = TRAINING_VIEWS[kind]
    if view == "volume":
        wanted = tuple(dict.fromkeys((key, *keys)))
        return VolumeDataset(cfg, split, keys=wanted, root=root)
    if view == "slice":
        return SliceDataset(cfg, split, root=root)
    return RoiDataset(cfg, split, root=root)


def item_id(item: dict, index: int) -> str:
    """A stable name of a dataset item: its scan or nodule id, else its index."""
    for k in ("scan_id", "nodule_id", "roi_id", "id"):
        if k in item:
            v = item[k]
            return str(v.item() if isinstance(v, torch.Tensor) else v)
    return str(index)


class ImageView(Dataset):
    """Training view of a prepared dataset: ``{"image": [1,*S]}`` and nothing else.

    For 3D data with ``patch`` smaller than the volume, returns a random cube of side ``patch``
    (the autoencoders are fully convolutional, so they train on cubes and run on whole volumes,
    as MAISI does); with probability ``fg_prob`` the cube is centred on a random voxel of a random
    nodule of the label map ``item[fg_key]`` (:func:`nodule_centre`), so small nodules are not a
    vanishing share of the loss.
    Randomness comes from torch's global RNG, which the engine checkpoints (exact resume with
    ``num_workers=0``).

    Args:
        base: a dataset whose items are dicts holding ``key``.
        key: the image key ("ct", "cond", "image").
        patch: cube side (3D), or None for whole items.
        fg_prob / fg_key: foreground-centred share and the mask key to centre on.
        with_nodules: also return ``"nodule"`` [1,*S], 1 where ``item[fg_key] > 0`` (the same cube), for a
            nodule-weighted loss.
    """

    def __init__(self, base: Dataset, key: str, patch: int | None = None, fg_prob: float = 0.0,
                 fg_key: str = "label", with_nodules: bool = False) -> None:
        self.base, self.key, self.patch = base, key, patch
        self.fg_prob, self.fg_key = float(fg_prob), fg_key
        self.with_nodules = bool(with_nodules)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.base[i]
        x = torch.as_tensor(item[self.key]).float()
        fg = item.get(self.fg_key)
        if self.with_nodules and fg is None:
            raise KeyError(f"item {i} has no {self.fg_key!r} mask for the nodule-weighted loss; load the dataset "
                           f"with keys=({self.fg_key!r},)")
        out = {"image": x}
        if self.with_nodules:
            out["nodule"] = (torch.as_tensor(fg) > 0).float()
        if self.patch is None or all(s <= self.patch for s in x.shape[1:]):
            return out
        centre = None
        if fg is not None and self.fg_prob > 0 and float(torch.rand(())) < self.fg_prob:
            centre = nodule_centre(torch.as_tensor(fg)[0])
        sl = (slice(None), *cube_slices(x.shape[1:], self.patch, centre))
        return {k: v[sl].contiguous() for k, v in out.items()}


class MixedDataset(Dataset):
    """Items of ``a`` and ``b`` interleaved so that a share ``share_b`` of the indices come from ``b``.

    Index i is ``b``'s when floor((i+1) s) > floor(i s) (an even, deterministic spread); each source
    is walked in order, so one pass over ``len(self)`` indices visits every item of both.
    """

    def __init__(self, a: Dataset, b: Dataset, share_b: float) -> None:
        if not 0.0 <= share_b <= 1.0:
            raise ValueError(f"share_b must lie in [0, 1], got {share_b}")
        self.a, self.b = a, b
        self.n_a, self.n_b = len(a), len(b)  # type: ignore[arg-type]
        self.share_b = 0.0 if self.n_b == 0 else (1.0 if self.n_a == 0 else float(share_b))

    def __len__(self) -> int:
        s = self.share_b
        if s in (0.0, 1.0):
            return self.n_b if s == 1.0 else self.n_a
        return int(math.ceil(max(self.n_a / (1.0 - s), self.n_b / s)))

    def source(self, i: int) -> str:
        s = self.share_b
        return "b" if math.floor((i + 1) * s) > math.floor(i * s) else "a"

    def __getitem__(self, i: int) -> Any:
        before_b = math.floor(i * self.share_b)  # b items among indices < i
        if self.source(i) == "b":
            return self.b[before_b % self.n_b]
        return self.a[(i - before_b) % self.n_a]


def _with_nodule_crops(volumes: Dataset, cfg: Any, root: Path | str | None) -> Dataset:
    """vae3d training items: cubes of the volumes mixed with 1 mm nodule crops.

    HR-LDM (chapter 05) encodes 1 mm nodule crops with this autoencoder; when the volumes are
    coarser (smoke 4 mm, course 2 mm) crops alone are out of its training distribution.
    Cubes of side min(patch_3d, crop_size) from both, so a batch stacks.
    """
    from lungsynth.data.datasets import CropDataset

    a = cfg.autoencoders
    side = min(int(a.patch_3d), int(cfg.data.crop_size))
    crops = CropDataset(cfg, "train", root=root)
    fg, weighted = float(a.foreground_crop_prob), nodule_weighted("vae3d", cfg)
    return MixedDataset(ImageView(volumes, "ct", side, fg, with_nodules=weighted),
                        ImageView(crops, "ct", side, fg, fg_key="mask", with_nodules=weighted),
                        float(a.vae3d_crop_share))


def nodule_weighted(kind: str, cfg: Any) -> bool:
    """Whether ``kind`` trains with a nodule-weighted L1 read from the label map (the vae3d with
    ``autoencoders.vae3d_nodule_weight`` != 1; the mask VAE reads its nodules from its own input)."""
    return kind == "vae3d" and float(cfg.autoencoders.vae3d_nodule_weight) != 1.0


# ---------------------------------------------------------------------- the task


def train_budget(kind: str, cfg: Any) -> tuple[int, int]:
    """(optimiser steps, batch size) of ``kind`` under ``cfg``: the 2D kinds are cheaper per step."""
    a = cfg.autoencoders
    if kind == "vqvae2d":
        return int(a.train_steps_2d), int(a.vq_batch_size)
    if kind == "vae2d":
        return int(a.train_steps_2d), int(a.batch_size_2d)
    if kind == "maskvae":
        return int(a.train_steps_mask), int(a.batch_size)
    return int(a.train_steps), int(a.batch_size)


class AutoencoderTask(TrainTask):
    """An autoencoder of the course as an engine task.

    Generator loss (optimiser ``generator``; eq. numbers of lungsynth.nn.losses' docstring):

        L_G = |x - x_hat|_1 + w_p L_perc + w_adv 1[step >= warmup] L_adv + w_kl KL / N  (KL kinds)
        L_G = |x - x_hat|_1 + w_p L_perc + w_adv 1[step >= warmup] L_adv + L_commit   (VQ-VAE)

    |.|_1 is a mean over the N voxels of an item, so the KL (a sum over latent elements) is divided by N:
    the two terms then stand in the ratio latent diffusion gives them (Rombach et al. 2022 sum both over
    an item, with w_kl = 1e-6). Measured without the division (course vae3d, 750 steps): the KL term
    outweighed the mean L1, the posterior std grew to 0.5-0.9 against a spread of the means of 0.4-0.9,
    so the latent carried about as much noise as signal and the decoder learned a blur (body MAE 61 HU,
    as x4 resampling); with it the posterior std stays ~0.05 and the same run reaches 57 HU.

    Discriminator loss (optimiser ``discriminator``, from the warm-up on):
    least squares on real vs detached reconstructions. The mask VAE has neither a perceptual nor
    an adversarial term (its input is a piecewise-constant label image): one optimiser, L1 + KL.

    Args:
        kind: one of lungsynth.autoencoders.KINDS.
        cfg: the course config (``cfg.autoencoders``).
        perceptual_loader: optional callable returning the frozen perceptual encoder (tests).
        val_roi: sliding-window size for validation reconstructions (None: whole items).
        image_size: side of the training images (caps the discriminator depth on small images).
    """

    def __init__(self, kind: str, cfg: Any, perceptual_loader: Any = None, val_roi: int | None = None,
                 image_size: int | None = None) -> None:

        self.kind = kind
        self.cfg = cfg
        a = cfg.autoencoders
        self.nodule_weight = float(a.maskvae_nodule_weight if kind == "maskvae" else a.vae3d_nodule_weight)
        self.dice_weight = float(a.maskvae_dice_weight)
        self.ae = build_autoencoder(kind, cfg)
        self.kl_weight = float(a.kl_weight)
        self.perceptual_weight = float(a.perceptual_weight)
        self.adv_weight = float(a.adv_weight)
        self.perceptual_network = "off" if kind == "maskvae" or self.perceptual_weight == 0 else a.perceptual_network
        self.use_adv = kind != "maskvae" and self.adv_weight > 0
        layers = int(a.disc_layers)
        if image_size is not None:
            # each layer halves the side after a stride-2 stem; keep at least 2x2 patches for the norm
            layers = max(1, min(layers, int(image_size).bit_length() - 4))
        self.adv = (PatchAdversarial(self.ae.spatial_dims, 1, int(a.disc_channels), layers,
                                     int(a.adv_warmup_steps)) if self.use_adv else None)
        self.perceptual_loader = perceptual_loader
        self.perceptual: nn.Module | None = None
        self.val_roi = val_roi

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"autoencoder": self.ae}
        if self.adv is not None:
            mods["discriminator"] = self.adv.discriminator
        return mods

    def setup(self, device: torch.device) -> None:
        self.perceptual = build_perceptual_loss(self.perceptual_network, self.ae.spatial_dims,
                                                loader=self.perceptual_loader, device=device)
        if self.perceptual is not None:
            self.perceptual.to(device).eval()
        if self.adv is not None:
            self.adv.criterion.to(device)

    def configure_optimizers(self, lr: float, weight_decay: float) -> dict[str, torch.optim.Optimizer]:
        gen = torch.optim.AdamW(self.ae.parameters(), lr=lr, weight_decay=weight_decay)
        if self.adv is None:
            return {"model": gen}
        disc = torch.optim.AdamW(self.adv.discriminator.parameters(), lr=lr, weight_decay=weight_decay)
        return {"generator": gen, "discriminator": disc}

    def training_step(self, batch: Any, step: int) -> dict[str, Any]:
        x = batch["image"]
        out = self.ae(x)
        recon = out["recon"]
        l1 = self._l1(recon.float(), x.float(), batch.get("nodule"))
        loss = l1
        logs: dict[str, Any] = {"l1": l1.detach()}
        if self.kind == "maskvae" and self.dice_weight > 0:
            dice = self._nodule_dice_loss(recon.float(), x.float())
            loss = loss + self.dice_weight * dice
            logs["dice_loss"] = dice.detach()
        if self.ae.quantized:
            loss = loss + out["vq_loss"]
            logs["vq_loss"] = out["vq_loss"].detach()
            logs["perplexity"] = float(self.ae.net.quantizer.perplexity)
        else:
            kl = kl_divergence(out["mean"].float(), out["std"].float())
            loss = loss + self.kl_weight * kl / x[0].numel()
            logs["kl"] = kl.detach()
        if self.perceptual is not None:
            perc = self.perceptual(recon.float(), x.float())
            loss = loss + self.perceptual_weight * perc
            logs["perceptual"] = perc.detach()
        if self.adv is None:
            return {"loss": loss, **logs}
        d_loss = None
        if self.adv.active(step):
            g = self.adv.generator_loss(recon)
            loss = loss + self.adv_weight * g
            logs["adv_g"] = g.detach()
            d_loss = self.adv.discriminator_loss(x, recon)
        return {"loss_generator": loss, "loss_discriminator": d_loss, **logs}

    def _l1(self, recon: torch.Tensor, x: torch.Tensor, nodule: torch.Tensor | None = None) -> torch.Tensor:
        """Mean L1, nodule voxels weighted by ``nodule_weight`` (normalised by the weights' sum).

        The mask VAE reads its nodules from its input (condition >= 0.2); the vae3d from ``nodule``
        [B,1,*S] (the label cube :class:`ImageView` returns with ``with_nodules``). A 6 mm nodule is about
        0.02% of a 2 mm volume, so a plain mean lets the decoder blur it away.
        """
        err = (recon - x).abs()
        if self.kind == "maskvae":
            nodule = (x > NODULE_COND_MIN).float()
        elif nodule is None or self.nodule_weight == 1.0:
            return err.mean()
        w = 1.0 + (self.nodule_weight - 1.0) * nodule.to(err)
        return (err * w).sum() / w.sum()

    def _nodule_dice_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Soft Dice loss of the nodule region (MONAI ``DiceLoss`` over the batch).

        The gate (and LAND) reads a voxel as nodule when its value is above NODULE_COND_MIN, halfway between
        the lung (0.1) and the lowest nodule value (0.2); a linear ramp over the middle half of that gap
        (0.125 to 0.175) makes the same reading differentiable and reads a lung voxel near 0.1 as no
        nodule at all. Measured: a sigmoid around the threshold counted every lung voxel as a little
        nodule and training erased the lung; a ramp starting at 0.1 pushed the lung below 0.1. Dice weighs
        a missed small nodule and a nodule smeared over its surroundings alike, whatever the nodule's
        size, which an L1 (a mean over every voxel) cannot.
        """
        from monai.losses import DiceLoss

        half = (NODULE_COND_MIN - LUNG_COND) / 2  # the ramp spans the middle half of the lung-to-nodule gap
        soft = ((recon - NODULE_COND_MIN + half) / (2 * half)).clamp(0.0, 1.0)
        target_ = (x > NODULE_COND_MIN).float()
        return DiceLoss(batch=True, smooth_nr=1.0, smooth_dr=1.0)(soft, target_)

    def validation_step(self, batch: Any, step: int) -> dict[str, float] | None:
        if batch is None:
            return None
        x = batch["image"]
        recon = self.ae.reconstruct(x, self.val_roi)
        out = {"l1": float((recon.float() - x.float()).abs().mean())}
        if self.ae.quantized:

            stats = codebook_stats(self.ae.codebook_indices(x), self.ae.spec["num_embeddings"])
            out.update(codebook_usage=stats["usage"], perplexity=stats["perplexity"])
        return out

    def config(self) -> dict[str, Any]:
        if self.kind != "vae3d":
            return dict(self.ae.spec)
        return {**self.ae.spec, "nodule_weight": self.nodule_weight}


# ---------------------------------------------------------------------- scale factor


@torch.no_grad()
def compute_scale_factor(ae: Any, dataset: Dataset, key: str, n_items: int = 16, roi_size: int | None = None,
                         overlap: float = 0.25, seed: int = 0) -> float:
    """1 / std of latents z = mean + std * eps over up to ``n_items`` training items.

    Latent diffusion (Rombach et al. 2022, section 4.3.2 / appendix G) rescales latents to unit
    variance so the noise schedule designed for unit-variance data applies: z' = z / std(z).
    """
    g = torch.Generator().manual_seed(seed)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot compute a latent scale factor from an empty dataset")
    order = torch.randperm(n, generator=g)[: max(1, n_items)].tolist()
    device = next(ae.parameters()).device
    total, total_sq, count = 0.0, 0.0, 0
    for i in order:
        x = torch.as_tensor(dataset[i][key]).float()[None].to(device)
        mean, std = ae.encode(x, roi_size, overlap)
        z = mean + std * torch.randn(std.shape, generator=g).to(device)
        z = z.double()
        total += float(z.sum())
        total_sq += float((z * z).sum())
        count += z.numel()
    var = total_sq / count - (total / count) ** 2
    if not var > 0:
        raise ValueError("latents have zero variance; the autoencoder did not train (check the loss curve)")
    return float(1.0 / var ** 0.5)


# ---------------------------------------------------------------------- train / ensure


def _final_with_scale(run_dir: Path) -> dict[str, Any] | None:
    from lungsynth.engine import load_checkpoint

    final = run_dir / "final.pt"
    if not final.is_file():
        return None
    return load_checkpoint(final)


# settings a finished autoencoder follows without being refused: a larger budget resumes it, another 3D nodule
# weight trains it again from scratch (ensure_autoencoder)
RESUMABLE_SETTINGS = ("autoencoders.train_steps", "autoencoders.train_steps_mask", "autoencoders.train_steps_2d",
                      "autoencoders.vae3d_nodule_weight")


def rebuild_command(kind: str, cfg: Any) -> str:
    return f"lungsynth autoencoder train --kind {kind} --profile {cfg.profile} --fresh"


def train_autoencoder(kind: str, cfg: Any, run_dir: Path | str | None = None, *, progress: bool | None = None,
                      fresh: bool = False, perceptual_loader: Any = None, time_budget_s: float | None = None,
                      root: Path | str | None = None) -> Path:
    """Train ``kind`` (resuming ``run_dir/last.pt`` unless ``fresh``), then store the scale factor.

    Writes ``final.pt`` (weights + config with ``scale_factor``), ``last.pt``, ``metrics.csv``,
    ``engine.json`` and ``run.json`` (config, versions, timings, results) into ``run_dir``
    (default ``runs/<profile>/02_<kind>``). ``root``: another prepared folder than the
    profile's. Returns the run directory.
    """
    from lungsynth import runtime
    from lungsynth.engine import Trainer, save_checkpoint

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(kind, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    fresh = fingerprint.claim_run(run_dir, training_stamp(cfg, root), rebuild_command(kind, cfg), fresh=fresh)
    a = cfg.autoencoders
    steps, batch = train_budget(kind, cfg)
    key = source_key(kind)
    with runtime.RunRecord(run_dir, config=cfg.to_dict(), seed=cfg.seed,
                           command=f"lungsynth autoencoder train --kind {kind} --profile {cfg.profile}") as rec:
        with rec.timer("data"):
            train_base = source_dataset(kind, cfg, "train", keys=("label",) if key != "image" else (), root=root)
            val_base = source_dataset(kind, cfg, "val", root=root)
        if len(train_base) == 0:  # type: ignore[arg-type]
            raise ValueError(f"the {cfg.profile} prepared dataset has no training items for {kind}; "
                             f"prepare more scans (cfg.data.n_scans)")
        patch = int(a.patch_3d) if kind in ("vae3d", "maskvae") else None
        if kind == "vae3d" and float(a.vae3d_crop_share) > 0:
            train_ds = _with_nodule_crops(train_base, cfg, root)
        else:
            train_ds = ImageView(train_base, key, patch, float(a.foreground_crop_prob),
                                 with_nodules=nodule_weighted(kind, cfg))
        val_ds = ImageView(val_base, key) if len(val_base) else None  # type: ignore[arg-type]
        roi = int(a.sliding_roi)
        runtime.seed_everything(int(cfg.seed))  # the initial weights (the engine seeds the rest)
        side = int(min(train_ds[0]["image"].shape[1:]))
        task = AutoencoderTask(kind, cfg, perceptual_loader=perceptual_loader, val_roi=roi, image_size=side)
        trainer = Trainer.from_config(
            cfg.engine, run_dir, max_steps=steps, batch_size=batch, lr=float(a.lr), schedule=str(a.lr_schedule),
            seed=int(cfg.seed),
            val_every=int(a.val_every) if val_ds is not None else None, progress=progress, fresh=fresh,
            time_budget_s=time_budget_s)
        with rec.timer("train"):
            result = trainer.fit(task, train_ds, val_ds)
        rec["steps"] = result.steps
        rec["stopped_by"] = result.stopped_by
        rec["last_logged"] = result.last_losses
        rec["train_seconds_this_call"] = round(result.seconds, 3)
        with rec.timer("scale_factor"):
            ckpt = _final_with_scale(run_dir)
            if ckpt is None:
                raise FileNotFoundError(f"training wrote no final.pt into {run_dir}")
            ae = task.ae.eval()
            sf = compute_scale_factor(ae, train_base, key, int(a.scale_factor_items), roi,
                                      float(a.sliding_overlap), seed=int(cfg.seed))
            ckpt["config"] = {**dict(ckpt["config"]), "scale_factor": sf}
            save_checkpoint(ckpt, run_dir / "final.pt")
        rec["scale_factor"] = sf
        rec["data_root"] = str(root) if root is not None else str(prepared_folder(cfg))
    run_settings.record(run_dir, run_settings.training_settings(cfg, autoencoders=(kind,)))
    return run_dir


def same_loss(kind: str, stored: dict[str, Any], cfg: Any) -> bool:
    """Whether a checkpoint's config was trained with the loss ``cfg`` asks for (the vae3d's nodule weight;
    a run from before the weight existed trained with 1)."""
    if kind != "vae3d":
        return True
    return float(stored.get("nodule_weight", 1.0)) == float(cfg.autoencoders.vae3d_nodule_weight)


def _finished(kind: str, ckpt: dict[str, Any], cfg: Any) -> bool:
    """A final checkpoint ``cfg`` can use as it is: its scale factor written, the step count ``cfg`` asks for
    reached, and the same loss."""
    stored = ckpt.get("config") or {}
    steps, _ = train_budget(kind, cfg)
    return "scale_factor" in stored and int(ckpt.get("step", 0)) >= steps and same_loss(kind, stored, cfg)


def trained_autoencoder(kind: str, cfg: Any, run_dir: Path | str | None = None, *,
                        device: torch.device | str | None = None, root: Path | str | None = None) -> Any | None:
    """The finished autoencoder of ``kind`` for ``cfg`` when one is in place and current (made from the same data,
    trained to the step count and with the loss ``cfg`` asks for), else None. Never trains: for readers that only
    report what an autoencoder does (the leaderboard's ceiling rows), where :func:`ensure_autoencoder` would train."""
    from lungsynth import runtime

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(kind, cfg, create=False)
    ckpt = _final_with_scale(run_dir)
    if ckpt is None or not _finished(kind, ckpt, cfg):
        return None
    try:
        if not fingerprint.check_run(run_dir, training_stamp(cfg, root), rebuild_command(kind, cfg)):
            return None
    except fingerprint.DataMismatch:
        return None
    ae = load_autoencoder(kind, run_dir / "final.pt", cfg)
    return ae.to(device if device is not None else runtime.device())


def ensure_autoencoder(kind: str, cfg: Any, run_dir: Path | str | None = None, *, progress: bool | None = None,
                       device: torch.device | str | None = None, root: Path | str | None = None) -> Any:
    """The trained autoencoder of ``kind`` for ``cfg``: loaded from ``run_dir`` (default
    ``runs/<profile>/02_<kind>``), trained first when missing, unfinished, or trained for fewer
    steps than ``cfg`` asks (a killed run resumes from its last checkpoint).

    Returns an :class:`lungsynth.autoencoders.Autoencoder` in eval mode on ``device`` (default
    :func:`lungsynth.runtime.device`). A run directory holding another architecture is refused
    (ValueError): pass another ``run_dir``.
    """
    from filelock import FileLock

    from lungsynth import runtime

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(kind, cfg)
    device = device if device is not None else runtime.device()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # a second process (another chapter, a notebook beside the course) waits for the first one's training,
    # then reuses it: final.pt is written before its scale factor, so a reader in between would train again
    with FileLock(str(run_dir) + ".lock"):
        ckpt = _final_with_scale(run_dir)
        fresh = False
        if ckpt is not None and fingerprint.check_run(run_dir, training_stamp(cfg, root), rebuild_command(kind, cfg)):
            ae = load_autoencoder(kind, run_dir / "final.pt", cfg)  # refuses another architecture
            # a longer budget resumes and another nodule weight retrains (below); any other change is refused
            run_settings.check_recorded(run_dir, run_settings.training_settings(cfg, autoencoders=(kind,)),
                                        rebuild_command(kind, cfg), ignore=RESUMABLE_SETTINGS)
            stored = ckpt.get("config") or {}
            fresh = not same_loss(kind, stored, cfg)  # resuming would continue another objective's weights
            if _finished(kind, ckpt, cfg):
                return ae.to(device)
            if fresh:
                warnings.warn(f"{run_dir} was trained with another loss than {cfg.profile!r} asks for "
                              f"(vae3d_nodule_weight {stored.get('nodule_weight', 1.0)}, now "
                              f"{cfg.autoencoders.vae3d_nodule_weight}); training it again from scratch",
                              stacklevel=2)
        train_autoencoder(kind, cfg, run_dir, progress=progress, root=root, fresh=fresh)
        return load_autoencoder(kind, run_dir, cfg, device=device)
