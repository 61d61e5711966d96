"""LAND (chapter 03): the training view of the data, the engine task, ``train`` / ``ensure_trained``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from lungsynth import run_settings
from lungsynth.data import fingerprint
from lungsynth.data.datasets import training_stamp
from lungsynth.engine import TrainTask
from lungsynth.methods.land.model import (CONDITIONS, KIND, LandDenoiser, check_variant, condition_grid, denoiser_spec,
                                          land_loss, loss_gamma, make_scheduler,
                                          uses_mask_vae)


def autoencoders_of(variant: str) -> tuple[str, ...]:
    """The chapter 02 kinds a ``variant`` trains through (their settings shape its run too)."""
    return ("vae3d", "maskvae") if uses_mask_vae(variant) else ("vae3d",)


def default_run_dir(cfg: Any, variant: str, create: bool = True) -> Path:
    """``runs/<profile>/03_land_<variant>``, with ``@<overrides>`` when ``cfg`` overrides a training setting
    (:func:`lungsynth.run_settings.run_name`)."""
    from lungsynth import paths

    name = run_settings.run_name(cfg, f"03_land_{check_variant(variant)}", "land", autoencoders_of(variant))
    return paths.run_dir(cfg.profile, name, create=create)


# --------------------------------------------------------------------------- data


def heldout_conditions(cfg: Any, split: str = "test", n: int | None = None) -> torch.Tensor:
    """Prepared condition volumes of ``split`` (default the held-out test split): [N, 1, S, S, S]."""
    from lungsynth.data.datasets import VolumeDataset

    ds = VolumeDataset(cfg, split, keys=("cond",))
    if len(ds) == 0:
        raise ValueError(f"the {split} split of profile {cfg.profile} is empty; prepare more scans (cfg.data.n_scans)")
    idx = range(len(ds) if n is None else min(int(n), len(ds)))
    return torch.stack([torch.as_tensor(ds[i]["cond"]).float() for i in idx])


def iter_conditions(cfg: Any, split: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(scan_id, cond [1, S, S, S])`` of each scan of the prepared ``split``, read one at a time (a split's
    condition volumes are never all in memory: 64 MB each at 256^3)."""
    from lungsynth.data.datasets import VolumeDataset

    ds = VolumeDataset(cfg, split, keys=("cond",))
    for i in range(len(ds)):
        item = ds[i]
        yield str(item["scan_id"]), torch.as_tensor(item["cond"]).float()


class HeldoutVolumes:
    """The held-out prepared volumes of ``splits``, read from disk one at a time (never all in memory).

    ``len()`` items; ``chunk(indices, key)`` stacks ``key`` ("ct" in [0, 1] or "cond") of those items,
    indices taken modulo the count (a longer run cycles the conditions): [n, 1, S, S, S].
    """

    def __init__(self, cfg: Any, splits: Sequence[str] = ("test", "val")) -> None:
        from lungsynth.data.datasets import VolumeDataset

        # one dataset per key, so reading the CT does not also read the condition (and the other way)
        self.sets = {key: [VolumeDataset(cfg, split, keys=(key,)) for split in splits] for key in ("ct", "cond")}
        self.index = [(k, i) for k, ds in enumerate(self.sets["ct"]) for i in range(len(ds))]
        if not self.index:
            raise ValueError(f"the {', '.join(splits)} splits of profile {cfg.profile} are empty; prepare more "
                             "scans (cfg.data.n_scans)")

    def __len__(self) -> int:
        return len(self.index)

    def chunk(self, indices: Sequence[int], key: str) -> torch.Tensor:
        items = [self.index[int(i) % len(self.index)] for i in indices]
        return torch.stack([torch.as_tensor(self.sets[key][k][i][key]).float() for k, i in items])


def largest_nodule_indices(held: HeldoutVolumes, k: int) -> list[int]:
    """The ``k`` items of ``held`` with the most nodule voxels, largest first (conditions read one at a time)."""
    import numpy as np

    from lungsynth.nn.conditioning import nodule_mask

    sizes = [float(nodule_mask(held.chunk([i], "cond")).sum()) for i in range(len(held))]
    return [int(i) for i in np.argsort(sizes, kind="stable")[::-1][:k]]


class LandDataset(torch.utils.data.Dataset):
    """Latents (a fresh posterior sample per load, from the vae3d cache) with precomputed grid conditions.

    Item: ``{"z": [4, s,s,s]}`` plus ``"grid": [K, s,s,s]`` for conditional variants.
    """

    def __init__(self, latents: Any, grids: Sequence[torch.Tensor] | None) -> None:
        self.latents, self.grids = latents, list(grids) if grids is not None else None
        if self.grids is not None and len(self.grids) != len(latents):
            raise ValueError(f"{len(self.grids)} condition grids for {len(latents)} latents")

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"z": self.latents[i]["z"].float()}
        if self.grids is not None:
            item["grid"] = self.grids[i]
        return item


def build_dataset(cfg: Any, variant: str, split: str = "train", mask_vae: Any = None) -> LandDataset:
    """The training set of ``variant``: vae3d latent cache of ``split`` + grids from the prepared ``cond``."""
    from lungsynth.autoencoders import LatentDataset, ensure_autoencoder

    check_variant(variant)
    latents = LatentDataset(cfg, "vae3d", split)
    grids = None
    if variant != "none":
        if uses_mask_vae(variant) and mask_vae is None:
            mask_vae = ensure_autoencoder("maskvae", cfg)
        # each condition becomes its (small) latent grid as it is read
        by_scan = {sid: condition_grid(c[None], variant, mask_vae)[0].cpu() for sid, c in iter_conditions(cfg, split)}
        missing = [i for i in latents.ids if i not in by_scan]
        if missing or len(by_scan) != len(latents):
            raise ValueError(f"{split}: the vae3d latent cache {latents.dir} holds {len(latents)} scans, the prepared "
                             f"split {len(by_scan)}; not in the split: {missing[:3]} (were the splits re-cut?). "
                             f"Re-encode with `lungsynth autoencoder encode --kind vae3d --split {split}`")
        # paired by scan id, never by position (a cache and a split can hold the same count of other scans)
        grids = [by_scan[i] for i in latents.ids]
    return LandDataset(latents, grids)


# --------------------------------------------------------------------------- the engine task, train


class LandTask(TrainTask):
    """The engine's view of LAND training: one denoiser, the loss of :func:`land_loss`."""

    kind = KIND

    def __init__(self, spec: dict[str, Any], gamma: float | None = 5.0) -> None:
        self.spec = dict(spec)
        self.denoiser = LandDenoiser(spec)
        self.scheduler = make_scheduler(spec)
        self.gamma = float(gamma) if gamma is not None else None  # None: the unweighted v MSE

    def modules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}

    def setup(self, device: torch.device) -> None:
        self.scheduler.to(device)

    def training_step(self, batch: Any, step: int) -> dict[str, Any]:
        return land_loss(self.denoiser, self.scheduler, batch["z"].float(), batch.get("grid"), self.gamma)

    def config(self) -> dict[str, Any]:
        return dict(self.spec)


def rebuild_command(cfg: Any, variant: str) -> str:
    return f"lungsynth land train --variant {variant} --profile {cfg.profile} --fresh"


def train(cfg: Any, variant: str, run_dir: Path | str | None = None, *, skip: str | None = None,
          progress: bool | None = None, fresh: bool = False) -> Path:
    """Train LAND ``variant`` into ``run_dir`` (default ``runs/<profile>/03_land_<variant>``).

    Resumes from ``last.pt`` unless ``fresh``. Writes final.pt, metrics.csv and run.json; returns the run dir.
    """
    from lungsynth.engine import Trainer
    from lungsynth.autoencoders import ensure_autoencoder
    from lungsynth.runtime import RunRecord, seed_everything

    check_variant(variant)
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant)
    run_dir.mkdir(parents=True, exist_ok=True)
    fresh = fingerprint.claim_run(run_dir, training_stamp(cfg), rebuild_command(cfg, variant), fresh=fresh)
    seed_everything(cfg.seed)
    with RunRecord(run_dir, config=cfg, seed=cfg.seed, command=f"land train --variant {variant}") as rec:
        with rec.timer("data"):
            vae = ensure_autoencoder("vae3d", cfg, progress=progress)
            mask_vae = ensure_autoencoder("maskvae", cfg, progress=progress) if uses_mask_vae(variant) else None
            ds = build_dataset(cfg, variant, "train", mask_vae)
        spec = denoiser_spec(cfg, variant, vae.latent_channels,
                             mask_vae.latent_channels if mask_vae is not None else None, skip)
        task = LandTask(spec, loss_gamma(cfg))
        trainer = Trainer.from_config(cfg.engine, run_dir, max_steps=cfg.land.train_steps, lr=cfg.land.lr,
                                      batch_size=cfg.land.batch_size, seed=cfg.seed, progress=progress, fresh=fresh)
        with rec.timer("train"):
            result = trainer.fit(task, ds)
        rec["variant"] = variant
        rec["loss_weighting"] = str(cfg.land.loss_weighting)
        rec["condition"] = CONDITIONS[variant]
        rec["parameters"] = sum(p.numel() for p in task.denoiser.parameters())
        rec["steps"] = result.steps
        rec["last_losses"] = result.last_losses
        rec["vae_scale_factor"] = float(vae.scale_factor)
        rec["autoencoder_weights"] = autoencoder_digests(cfg, variant)
    run_settings.record(run_dir, run_settings.training_settings(cfg, "land", autoencoders_of(variant)))
    return run_dir


def autoencoder_digests(cfg: Any, variant: str) -> dict[str, str]:
    """sha256 of the trained autoencoders ``variant`` stands on ({"vae3d": ..., "maskvae": ...}): its latents and
    mask latents are theirs, so a denoiser trained on other weights decodes into nonsense."""
    from lungsynth.autoencoders.model import default_run_dir as autoencoder_dir
    from lungsynth.gates import file_digest

    kinds = ("vae3d", "maskvae") if uses_mask_vae(variant) else ("vae3d",)
    finals = {k: autoencoder_dir(k, cfg.profile, create=False) / "final.pt" for k in kinds}
    return {k: file_digest(f) for k, f in finals.items() if f.is_file()}


def check_autoencoders(run_dir: Path, cfg: Any, variant: str) -> None:
    """A run trained on other autoencoder weights than chapter 02's current ones is refused (ValueError naming the
    command), not reused. Runs that record none predate the record and are not checked."""
    import json

    record = run_dir / "run.json"
    had = json.loads(record.read_text()).get("results", {}).get("autoencoder_weights") if record.is_file() else None
    if not had:
        return
    now = autoencoder_digests(cfg, variant)
    changed = sorted(k for k, digest in had.items() if now.get(k) != digest)
    if changed:
        raise ValueError(f"{run_dir} was trained on latents of other {' and '.join(changed)} weights than chapter "
                         f"02's runs in runs/{cfg.profile} hold now (retrained since?); retrain LAND on them: "
                         f"{rebuild_command(cfg, variant)}")


def check_loss_weighting(run_dir: Path, cfg: Any, variant: str) -> None:
    """A run trained with another ``land.loss_weighting`` is refused (ValueError naming the command), not reused:
    the weighting decides whether the high-noise steps are learned. Runs that record none used Min-SNR."""
    import json

    record = run_dir / "run.json"
    results = json.loads(record.read_text()).get("results", {}) if record.is_file() else None
    had = results.get("loss_weighting", "min-snr") if results is not None else None
    if had is not None and had != str(cfg.land.loss_weighting):
        raise ValueError(f"{run_dir} was trained with land.loss_weighting={had!r}, not "
                         f"{cfg.land.loss_weighting!r}; retrain it: {rebuild_command(cfg, variant)}")


def _is_done(run_dir: Path, cfg: Any, variant: str) -> bool:
    from lungsynth.engine import check_compatible, load_checkpoint

    final = run_dir / "final.pt"
    if not final.is_file() or not fingerprint.check_run(run_dir, training_stamp(cfg), rebuild_command(cfg, variant)):
        return False
    ckpt = load_checkpoint(final)
    # a run of another architecture (say land.skip=concat over an additive run) is refused, not reused
    check_compatible(ckpt, final, KIND, denoiser_spec(cfg, variant, int(cfg.autoencoders.latent_channels)))
    check_loss_weighting(run_dir, cfg, variant)
    check_autoencoders(run_dir, cfg, variant)
    return int(ckpt.get("step", 0)) >= int(cfg.land.train_steps)


def ensure_trained(cfg: Any, variant: str, run_dir: Path | str | None = None, *, progress: bool | None = None) -> Path:
    """The run dir of a trained ``variant``: trains (or resumes a killed run) when final.pt is missing
    or has fewer steps than ``cfg.land.train_steps``."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant)
    if _is_done(run_dir, cfg, variant):
        # a longer budget resumes (_is_done is False then); any other change is refused
        run_settings.check_recorded(run_dir, run_settings.training_settings(cfg, "land", autoencoders_of(variant)),
                                    rebuild_command(cfg, variant), ignore=("land.train_steps",))
        return run_dir
    return train(cfg, variant, run_dir, progress=progress)
