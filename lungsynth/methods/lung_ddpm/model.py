"""Lung-DDPM's model: the semantic layout (condition encoding and input checks), the denoiser and its schedule.

Equation numbers are the paper's (Lung-DDPM, Sec. II-B to II-D). The condition ``m`` of eqs. (3)-(4) is the
layout's channels (:func:`layout_channels`), concatenated to ``x_t``; ``m_l`` of eq. (6) is
:func:`generation_mask`. The loss, eq. (7) (L1 on epsilon; smoke and course: L2 on v, ``lung_ddpm.prediction`` and
``lung_ddpm.loss``), is the shared ``lungsynth.diffusion.objectives.diffusion_loss``, taken in the engine task's
training step (:class:`lungsynth.methods.lung_ddpm.train.LungDdpmTask`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lungsynth.config import Config

KIND = "lung_ddpm"
VARIANTS: tuple[str, ...] = ("layout", "no_lung_layout")


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown Lung-DDPM variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return variant


# --------------------------------------------------------------------------- semantic layout (the condition)


LAYOUT_LABELS: dict[int, str] = {0: "background", 1: "lung", 2: "nodule"}
ENCODINGS: tuple[str, ...] = ("onehot", "scaled")


def make_layout(lung: "torch.Tensor", label: "torch.Tensor") -> "torch.Tensor":
    """Semantic layout from the prepared lung mask and nodule label map.

    Args:
        lung: [B, 1, *S] lung mask (> 0.5 inside the lungs).
        label: [B, 1, *S] nodule label map (0 background, k > 0 nodule k; resampled maps may be soft).
    Returns:
        float32 [B, 1, *S] with 0 background, 1 lung, 2 nodule (a nodule overrides the lung, so
        juxta-pleural nodules that leave the lung mask are still generated).
    """
    import torch

    if lung.shape != label.shape:
        raise ValueError(f"lung mask {tuple(lung.shape)} and label map {tuple(label.shape)} differ in shape")
    layout = (lung > 0.5).float()
    return torch.where(label > 0.5, torch.full_like(layout, 2.0), layout)


def check_layout(layout: "torch.Tensor") -> "torch.Tensor":
    """Validate a layout [B, 1, *S] (3 spatial dims) holding only 0, 1 and 2; returns it as float32."""
    import torch

    if not torch.is_tensor(layout):
        raise ValueError(f"layout must be a torch tensor [B, 1, D, H, W], got {type(layout).__name__}")
    if layout.ndim != 5 or layout.shape[1] != 1:
        raise ValueError(f"layout of shape {tuple(layout.shape)}: expected [B, 1, D, H, W] with values "
                         f"0 (background), 1 (lung), 2 (nodule)")
    lay = layout.float()
    bad = ~((lay == 0) | (lay == 1) | (lay == 2))
    if bool(bad.any()):
        found = torch.unique(lay[bad])[:6].tolist()
        raise ValueError(f"layout holds values {found} besides the three labels 0 (background), 1 (lung), "
                         f"2 (nodule); build it with make_layout(lung, label)")
    return lay


def check_reference(reference: "torch.Tensor", layout: "torch.Tensor") -> "torch.Tensor":
    """Validate a reference CT [B or 1, 1, *S] in [0, 1] against the layout's shape; returns float32."""
    import torch

    if not torch.is_tensor(reference):
        raise ValueError(f"reference must be a torch tensor [B, 1, D, H, W], got {type(reference).__name__}")
    if reference.ndim != 5 or reference.shape[1] != 1 or reference.shape[2:] != layout.shape[2:] \
            or reference.shape[0] not in (1, layout.shape[0]):
        raise ValueError(f"reference of shape {tuple(reference.shape)} does not match the layout "
                         f"{tuple(layout.shape)}: expected [{layout.shape[0]} or 1, 1, "
                         f"{', '.join(map(str, layout.shape[2:]))}] (resample it to the layout's grid)")
    ref = reference.float()
    if not bool(torch.isfinite(ref).all()) or float(ref.min()) < -1e-3 or float(ref.max()) > 1 + 1e-3:
        raise ValueError(f"reference values span [{float(ref.min()):.3g}, {float(ref.max()):.3g}]; expected the "
                         f"course's [0, 1] scale (lungsynth.data.preprocess.hu_to_unit)")
    return ref


# ``m`` in eqs. (3)-(4) and Alg. 1 line 5: x_t (+) m, the layout's channels concatenated to x_t.
def layout_channels(layout: "torch.Tensor", lung_layout: bool = True, encoding: str = "onehot") -> "torch.Tensor":
    """The condition concatenated to x_t.

    Args:
        layout: [B, 1, *S] in {0, 1, 2}.
        lung_layout: False for the "w/o lung layout" ablation: lung voxels count as background.
        encoding: ``onehot`` -> [B, 3, *S] (background, lung, nodule; [B, 2, *S] without the lung) or
            ``scaled`` -> [B, 1, *S] with labels mapped to -1, 0, 1 (-1, 1 without the lung).
    """
    import torch

    lay = layout.float()
    if not lung_layout:
        lay = torch.where(lay == 1, torch.zeros_like(lay), lay)
    if encoding == "scaled":
        return lay - 1.0
    if encoding != "onehot":
        raise ValueError(f"unknown layout encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    labels = (0, 1, 2) if lung_layout else (0, 2)
    return torch.cat([(lay == v).float() for v in labels], dim=1)


def n_layout_channels(lung_layout: bool, encoding: str) -> int:
    if encoding == "scaled":
        return 1
    if encoding != "onehot":
        raise ValueError(f"unknown layout encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    return 3 if lung_layout else 2


def to_model_scale(x: "torch.Tensor") -> "torch.Tensor":
    """[0, 1] -> [-1, 1] (the DDPM's data range; sampling clips the predicted x0 there)."""
    return x * 2.0 - 1.0


def to_unit_scale(x: "torch.Tensor") -> "torch.Tensor":
    """[-1, 1] -> [0, 1], clamped."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def nodule_weights(layout: "torch.Tensor", nodule_weight: float) -> "torch.Tensor | None":
    """Per-voxel loss weights [B, 1, *S] in (0, 1], ``(1 + w [layout == 2]) / (1 + w)``, or None for ``w = 0``
    (eq. 7's uniform mean). :func:`lungsynth.diffusion.objectives.per_sample_loss` divides by their sum, so the
    loss stays a weighted mean: a nodule voxel counts ``1 + w`` times a lung voxel."""
    if nodule_weight < 0:
        raise ValueError(f"lung_ddpm.nodule_weight must be >= 0, got {nodule_weight}")
    if nodule_weight == 0:
        return None
    return (1.0 + float(nodule_weight) * (layout == 2).float()) / (1.0 + float(nodule_weight))


# ``m_l`` of eq. (6) (``m_e = 1 - m_l``): lung and nodule are generated, the rest comes from the reference.
def generation_mask(layout: "torch.Tensor", lung_layout: bool = True) -> "torch.Tensor":
    """``m_l``: where the model generates under AAS, bool [B, 1, *S]: lung or nodule; for the "w/o lung
    layout" model (``lung_layout=False``) the nodule only, as the reference code samples it (that model
    was never told where the lung is, so everything but the nodule comes from the reference)."""
    return layout >= 1 if lung_layout else layout == 2


# --------------------------------------------------------------------------- networks


# eps_theta(x_t (+) m, t) of eqs. (3)-(4): the 3D U-Net with residual and attention blocks (Sec. II-C).
def build_unet(cfg: "Config", lung_layout: bool = True) -> "nn.Module":
    """The denoiser: ``net(cat[x_t, layout channels] [B, 1+K, *S], t [B]) -> eps [B, 1, *S]``."""
    from lungsynth.nn.unets import diffusion_unet

    c = cfg.lung_ddpm
    levels = len(c.unet_channels)
    bad = [a for a in c.attention_at if not 0 <= int(a) < levels]
    if bad:
        raise ValueError(f"lung_ddpm.attention_at {tuple(c.attention_at)} names levels outside 0..{levels - 1}")
    return diffusion_unet(3, 1 + n_layout_channels(lung_layout, c.layout_encoding), 1, channels=c.unet_channels,
                          num_res_blocks=c.num_res_blocks,
                          attention_levels=tuple(i in set(int(a) for a in c.attention_at) for i in range(levels)))


# beta_t of eq. (1) and alpha_bar_t of eq. (2): the cosine schedule, T = 250.
def build_scheduler(cfg: "Config", kind: str = "ddpm"):
    """MONAI DDPM scheduler: cosine schedule (Nichol & Dhariwal 2021), T = 250, the prediction type of
    ``cfg.lung_ddpm.prediction`` (the paper's: epsilon), x0 clipped to [-1, 1]."""
    from lungsynth.diffusion.schedules import make_scheduler

    return make_scheduler(kind, cfg.lung_ddpm.num_train_timesteps, cfg.lung_ddpm.schedule, cfg.lung_ddpm.prediction,
                          clip_sample=True)


# Lung-DDPM's "auto" runs bf16 on CPUs with AVX512-BF16 too, not only AMX (runtime.FAST_BF16_CPU_FLAGS).
# Measured on a 2-core AMD EPYC without AMX: its U-Net (widths 16-64, 32^3 cubes) trained 3000 steps in bf16 at
# 0.096 s a step against ~0.6 s in fp32, without one non-finite step; the NaN weight gradients that keep the
# engine's auto at fp32 there were LAND's.
BF16_CPU_FLAGS: tuple[str, ...] = ("amx_bf16", "avx512_bf16")


def precision(cfg: "Config", device: Any = None) -> str:
    """The autocast precision Lung-DDPM trains and samples in (``"bf16"`` or ``"fp32"``): ``lung_ddpm.precision``,
    or when that is ``auto`` the engine's setting (``engine.precision``, ``$LUNGSYNTH_PRECISION``) with
    :data:`BF16_CPU_FLAGS` as the CPUs where auto picks bf16."""
    import torch

    from lungsynth.runtime import choose_precision
    from lungsynth.runtime import device as default_device

    own = cfg.lung_ddpm.precision
    requested = own if own != "auto" else str(cfg.engine.precision)
    dev = torch.device(device) if device is not None else default_device()
    return choose_precision(dev, requested, bf16_flags=BF16_CPU_FLAGS).name


def voxel_mm(cfg: "Config") -> float:
    """The isotropic voxel side of the ``size_ddpm`` volumes: the prepared 3D field of view resampled."""
    return float(cfg.data.spacing_3d_mm) * int(cfg.data.size_3d) / int(cfg.data.size_ddpm)


def model_config(cfg: "Config", variant: str) -> dict[str, Any]:
    """What builds the weights and what they were trained to predict (stored in checkpoints; a mismatch on load
    is an error, and :func:`lungsynth.methods.lung_ddpm.train.ensure_trained` trains such a run again)."""
    from lungsynth.diffusion.schedules import canonical_prediction_type

    c = cfg.lung_ddpm
    return {"unet_channels": list(c.unet_channels), "attention_at": list(c.attention_at),
            "num_res_blocks": int(c.num_res_blocks), "layout_encoding": c.layout_encoding,
            "lung_layout": check_variant(variant) == "layout", "num_train_timesteps": int(c.num_train_timesteps),
            "schedule": c.schedule, "prediction": canonical_prediction_type(c.prediction), "loss": c.loss,
            "nodule_weight": float(c.nodule_weight), "size": int(cfg.data.size_ddpm)}
