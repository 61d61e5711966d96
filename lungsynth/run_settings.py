"""Which settings shape a trained run, the folder that holds the run trained with them, and its record.

A trained run (an autoencoder, a method's model) is reused by every chapter that needs it, so an override that
changes how it is trained must not reuse the profile's run: ``OVERRIDES = {"hr_ldm.train_steps": 400}`` in a
"Try this" has to train a model with 400 steps, and ``{"hr_ldm.ddim_steps": 50}`` must not (it only samples).

- :func:`training_settings` are the settings a run of a kind is trained with: the seed, the training loop's
  :data:`ENGINE_KEYS`, its method's config section (or, for an autoencoder, the keys of its kind and the shared
  ones) minus :data:`NOT_TRAINING`, the keys read only when sampling or evaluating, plus the autoencoder a latent
  method decodes through and :data:`ALSO_SHAPED_BY`.
- :func:`run_name` is the profile's folder name when none of them differs from the profile's value, else the
  name with the differences appended (``05_hr_ldm_hist@train_steps=400``): an overridden run trains beside the
  profile's, never over it, and is reused by the next call with the same overrides.
- :func:`record` writes them to ``settings.json`` when a run finishes; :func:`check_recorded` refuses (with the
  commands to run) a finished run whose record differs from what the config asks, for example after a profile's
  value changed in the code.

Data are not here: which scans a run was trained on is its data stamp (:mod:`lungsynth.data.fingerprint`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lungsynth import paths
from lungsynth.config import get_config

SETTINGS_FILE = "settings.json"

# keys read only at sampling or evaluation time: changing them never needs another trained run
NOT_TRAINING: dict[str, frozenset[str]] = {
    "autoencoders": frozenset({"sliding_roi", "sliding_overlap"}),
    "land": frozenset({"sampler", "ddim_steps", "ddpm_steps", "n_eval_samples", "n_gate_samples", "eval_batch"}),
    "bbox_ldm": frozenset({"ddim_steps", "n_gate_samples", "table2_samples"}),
    "hr_ldm": frozenset({"ddim_steps", "sampler", "anchor_noise_background", "clip_latent", "lung_erosion_mm",
                         "subpleural_share", "eval_per_subtype", "n_placement_trials"}),
    "lung_ddpm": frozenset({"sample_ema", "blend_from", "sampler", "sample_steps", "sample_tile", "eval_split",
                            "n_eval"}),
    "text2img": frozenset({"guidance_scales", "sample_steps", "sampler", "n_eval_samples", "val_samples",
                           "val_guidance", "classifier_steps"}),
}
# the autoencoder section's keys that belong to one kind; every other key of the section is shared by all kinds
AUTOENCODER_KEYS: dict[str, frozenset[str]] = {
    "vae3d": frozenset({"vae3d_channels", "vae3d_nodule_weight", "vae3d_crop_share"}),
    "vae2d": frozenset({"vae2d_channels", "train_steps_2d", "batch_size_2d"}),
    "vqvae2d": frozenset({"vq_num_embeddings", "vq_embedding_dim", "vq_commitment_cost", "vq_decay",
                          "vqvae2d_channels", "vq_batch_size"}),
    "maskvae": frozenset({"maskvae_channels", "mask_latent_channels", "maskvae_nodule_weight", "maskvae_dice_weight",
                          "train_steps_mask"}),
}
# settings of another section that shape a kind's training: the VQ-VAE learns slices in chapter 04's HU window
ALSO_SHAPED_BY: dict[str, tuple[str, ...]] = {"vqvae2d": ("bbox_ldm.hu_clip",)}


# the training loop's settings that shape every trained run (checkpoint and log intervals, workers do not)
ENGINE_KEYS: tuple[str, ...] = ("mixed_precision", "precision", "grad_clip", "grad_accum")


def _engine_defaults() -> dict[str, Any]:
    """``{"engine.<key>": default}``: what a run recorded before engine settings were recorded was trained with
    (the engine's defaults are the same in every profile)."""
    from lungsynth.config import EngineConfig

    engine = EngineConfig()
    return {f"engine.{k}": _plain(getattr(engine, k)) for k in ENGINE_KEYS}


class SettingsChanged(ValueError):
    """A finished run was trained with other settings than the config asks for."""


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _lookup(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def autoencoder_settings(cfg: Any, kind: str) -> dict[str, Any]:
    """``{"autoencoders.<key>": value}`` of the keys that train an autoencoder of ``kind``, and
    :data:`ALSO_SHAPED_BY`."""
    if kind not in AUTOENCODER_KEYS:
        raise ValueError(f"unknown autoencoder kind {kind!r}; kinds: {', '.join(AUTOENCODER_KEYS)}")
    others = set().union(*(keys for k, keys in AUTOENCODER_KEYS.items() if k != kind))
    section = cfg.autoencoders
    out = {f"autoencoders.{name}": _plain(getattr(section, name)) for name in vars(section)
           if name not in others and name not in NOT_TRAINING["autoencoders"]}
    out.update({key: _plain(_lookup(cfg, key)) for key in ALSO_SHAPED_BY.get(kind, ())})
    return out


def training_settings(cfg: Any, section: str | None = None, autoencoders: Sequence[str] = ()) -> dict[str, Any]:
    """The settings a run is trained with, as ``{"section.key": value}``: the seed, the training loop's
    :data:`ENGINE_KEYS`, the method ``section``'s keys except :data:`NOT_TRAINING`, and those of the chapter 02
    ``autoencoders`` (kinds) it trains on or decodes through."""
    out: dict[str, Any] = {"seed": int(cfg.seed)}
    out.update({f"engine.{k}": _plain(getattr(cfg.engine, k)) for k in ENGINE_KEYS})
    if section is not None:
        values = getattr(cfg, section)
        skip = NOT_TRAINING.get(section, frozenset())
        out.update({f"{section}.{k}": _plain(v) for k, v in vars(values).items() if k not in skip})
    for kind in autoencoders:
        out.update(autoencoder_settings(cfg, kind))
    return out


def changed_settings(cfg: Any, section: str | None = None, autoencoders: Sequence[str] = ()) -> dict[str, Any]:
    """The training settings of ``cfg`` that differ from its profile's own values (its overrides that matter)."""
    base = training_settings(get_config(cfg.profile), section, autoencoders)
    return {k: v for k, v in training_settings(cfg, section, autoencoders).items() if base.get(k) != v}


def run_name(cfg: Any, base: str, section: str | None = None, autoencoders: Sequence[str] = (),
             encoded: Iterable[str] = ()) -> str:
    """``base`` when the training settings are the profile's; else ``base@key=value+...`` (a hash when long).
    ``encoded``: settings ``base`` already names (a variant's suffix), left out of the appendix."""
    skip = set(encoded)
    diff = {k: v for k, v in changed_settings(cfg, section, autoencoders).items() if k not in skip}
    return paths.variant_name(base, diff)


def record(run_dir: Path | str, settings: Mapping[str, Any]) -> Path:
    """Write a finished run's training settings to ``run_dir/settings.json``."""
    path = Path(run_dir) / SETTINGS_FILE
    path.write_text(json.dumps(dict(settings), indent=1, sort_keys=True) + "\n")
    return path


def recorded(run_dir: Path | str) -> dict[str, Any] | None:
    """The settings a run recorded, or None (a run made before runs recorded their settings)."""
    path = Path(run_dir) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key: stored -> wanted`` for every key whose values differ (a key missing on one side counts)."""
    keys = sorted(set(stored) | set(wanted))
    return [f"{k}: {stored.get(k, '(unset)')} -> {wanted.get(k, '(unset)')}" for k in keys
            if stored.get(k) != wanted.get(k)]


def check_recorded(run_dir: Path | str, wanted: Mapping[str, Any], command: str,
                   ignore: Iterable[str] = ()) -> None:
    """Before reusing a finished run: :class:`SettingsChanged` when its recorded settings differ from ``wanted``
    (keys in ``ignore`` aside), naming the differences and the commands that train it again; a run with no
    record (made before runs recorded settings) is reused as the profile's, and a record without the engine's
    settings (made before they were recorded) counts as trained with the engine's defaults."""
    stored = recorded(run_dir)
    if stored is None:
        return
    stored = {**_engine_defaults(), **stored}
    skip = set(ignore)
    diff = differences({k: v for k, v in stored.items() if k not in skip},
                       {k: v for k, v in wanted.items() if k not in skip})
    if diff:
        raise SettingsChanged(f"{run_dir} was trained with other settings than asked for ({'; '.join(diff[:6])}"
                              f"{'; ...' if len(diff) > 6 else ''}). Train it again with: {command}")
