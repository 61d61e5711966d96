"""Latent caches of the chapter 02 autoencoders: what the latent-diffusion chapters train on.

:func:`encode_dataset` stores the posterior (mean, std) of every item of a split once;
:class:`LatentDataset` reads it back and draws ``z = s * (mean + std * eps)`` at every load.
A cache made by another checkpoint is re-encoded (:func:`ensure_latents`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from filelock import FileLock
from torch.utils.data import Dataset

from lungsynth.autoencoders.model import default_run_dir, load_autoencoder
from lungsynth.data import fingerprint
from lungsynth.data.datasets import training_stamp
from lungsynth.autoencoders.train import ensure_autoencoder, item_id, source_dataset, source_key

LATENTS_DIR = "latents"


def _cache_dir(run_dir: Path, split: str) -> Path:
    return run_dir / LATENTS_DIR / split


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _identity(ae: Any) -> dict[str, Any]:
    return {"checkpoint_step": int(getattr(ae, "step", 0)), "scale_factor": float(ae.scale_factor),
            "spec": ae.spec}


@torch.no_grad()
def encode_dataset(kind: str, cfg: Any, split: str = "train", run_dir: Path | str | None = None,
                   ae: Any = None, progress: bool = False, root: Path | str | None = None) -> Path:
    """Cache the posterior (mean, std) of every item of ``split`` under ``run_dir/latents/<split>``.

    One ``<index>.pt`` per item (``{"mean": [c,*s], "std": [c,*s]}``, float32, read with
    weights_only) and ``index.json`` (ids, scale factor, the checkpoint step they came from).
    Large volumes are encoded by sliding window (``cfg.autoencoders.sliding_roi``).
    Returns the cache directory.
    """
    from lungsynth import runtime

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(kind, cfg)
    ae = ae if ae is not None else load_autoencoder(kind, run_dir, cfg, device=runtime.device())
    device = next(ae.parameters()).device
    base = source_dataset(kind, cfg, split, root=root)
    key = source_key(kind)
    out = _cache_dir(run_dir, split)
    out.mkdir(parents=True, exist_ok=True)
    for done in (out / "index.json", out / fingerprint.STAMP):  # a cache half-rewritten is never trusted
        done.unlink(missing_ok=True)
    ids: list[str] = []
    t0 = time.perf_counter()
    a = cfg.autoencoders
    for i in range(len(base)):  # type: ignore[arg-type]
        item = base[i]
        x = torch.as_tensor(item[key]).float()[None].to(device)
        mean, std = ae.encode(x, int(a.sliding_roi), float(a.sliding_overlap))
        _save_atomic({"mean": mean[0].float().cpu().contiguous(), "std": std[0].float().cpu().contiguous()},
                     out / f"{i:06d}.pt")
        ids.append(item_id(item, i))
        if progress:
            print(f"\r{kind} {split}: encoded {i + 1}/{len(base)}", end="", flush=True)  # type: ignore[arg-type]
    if progress:
        print()
    shape = list(mean.shape[1:]) if ids else []
    runtime.write_json_atomic(out / "index.json", {
        "kind": kind, "split": split, "n": len(ids), "ids": ids, "latent_shape": shape,
        "seconds": round(time.perf_counter() - t0, 3), **_identity(ae)})
    fingerprint.write_stamp(out, training_stamp(cfg, root))  # last: a cache killed before this is redone
    return out


def ensure_latents(kind: str, cfg: Any, split: str = "train", run_dir: Path | str | None = None,
                   ae: Any = None, root: Path | str | None = None) -> Path:
    """The latent cache of ``split``; (re-)encodes when missing, half-written, made by another checkpoint
    or from other prepared data (re-cut splits: the data stamp differs)."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(kind, cfg)
    ae = ae if ae is not None else ensure_autoencoder(kind, cfg, run_dir, root=root)
    out = _cache_dir(run_dir, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # a second process waits for the first one's cache, then reuses it
        index = out / "index.json"
        if index.is_file() and fingerprint.cache_current(out, training_stamp(cfg, root), "latent cache"):
            meta = json.loads(index.read_text())
            ident = _identity(ae)
            if all(meta.get(k) == v for k, v in ident.items()) and all((out / f"{i:06d}.pt").is_file()
                                                                      for i in range(int(meta.get("n", 0)))):
                return out
        return encode_dataset(kind, cfg, split, run_dir, ae=ae, root=root)


class LatentDataset(Dataset):
    """Cached posteriors of an autoencoder, sampled afresh at every load.

    Item: ``{"z": [c,*s]`` = scale_factor * (mean + std * eps), ``"mean"``, ``"std"`` (unscaled),
    ``"id"``, plus the requested ``keys`` of the underlying prepared item (e.g. ``"cond"`` for
    LAND, at full resolution)}.

    Why a sample per load and not one cached sample: the KL-VAE encodes each volume as a
    distribution, and its decoder was trained on draws from it. Caching one draw freezes a
    single realisation of the posterior noise std * eps into every epoch: the denoiser is then
    trained to reproduce that particular noise, which carries no anatomy and cannot be predicted
    from anything but the cached copy, so its loss on the noise part levels off at a floor set
    by std (and samples learn to copy the noise pattern). Drawing eps anew each time trains on the
    aggregated posterior, the distribution the decoder expects, and acts as free augmentation;
    storing mean and std costs twice one sample. For the VQ-VAE std is zero (deterministic codes).

    Args:
        cfg: course config.
        kind: autoencoder kind.
        split: "train" | "val" | "test".
        keys: keys of the prepared item to return alongside (3D kinds: VolumeDataset keys).
        run_dir: the autoencoder's run directory (default ``runs/<profile>/02_<kind>``).
        sample: draw eps (True) or return the scaled mean (False).
        root: a prepared folder other than the profile's.
    """

    def __init__(self, cfg: Any, kind: str, split: str = "train", keys: Sequence[str] = (),
                 run_dir: Path | str | None = None, sample: bool = True, root: Path | str | None = None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(kind, cfg)
        self.dir = ensure_latents(kind, cfg, split, self.run_dir, root=root)
        self.meta = json.loads((self.dir / "index.json").read_text())
        self.scale_factor = float(self.meta["scale_factor"])
        self.ids: list[str] = list(self.meta["ids"])
        self.kind, self.split, self.sample, self.keys = kind, split, bool(sample), tuple(keys)
        self.base = None
        if self.keys:
            if kind in ("vae3d", "maskvae"):
                from lungsynth.data.datasets import VolumeDataset

                self.base = VolumeDataset(cfg, split, keys=self.keys, root=root)
            else:
                self.base = source_dataset(kind, cfg, split, root=root)
            if len(self.base) != len(self.ids):  # type: ignore[arg-type]
                raise ValueError(f"latent cache {self.dir} has {len(self.ids)} items but the {split} split has "
                                 f"{len(self.base)}; re-encode with `lungsynth autoencoder encode --kind {kind}`")  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.ids)

    def posterior(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored (mean, std) of item ``i``, each [c,*s], unscaled."""
        d = torch.load(self.dir / f"{i:06d}.pt", map_location="cpu", weights_only=True)
        return d["mean"], d["std"]

    def __getitem__(self, i: int) -> dict[str, Any]:
        mean, std = self.posterior(i)
        z = mean + std * torch.randn_like(std) if self.sample else mean
        item: dict[str, Any] = {"z": z * self.scale_factor, "mean": mean, "std": std, "id": self.ids[i]}
        if self.base is not None:
            extra = self.base[i]
            got = item_id(extra, i)
            if got != self.ids[i]:
                raise ValueError(f"latent cache {self.dir} item {i} is {self.ids[i]!r} but the dataset gives "
                                 f"{got!r}; the prepared data changed: re-encode with `lungsynth autoencoder "
                                 f"encode --kind {self.kind}`")
            for k in self.keys:
                item[k] = extra[k]
        return item
