"""Lung-DDPM's sampling: the trained model with anatomically aware sampling (paper Alg. 2, eqs. 3-6), ``load``,
``sample``, batched ``generate`` and NIfTI output."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from lungsynth.methods.lung_ddpm.model import (KIND, build_scheduler, build_unet, check_layout, check_reference,
                                               generation_mask, layout_channels, model_config, precision,
                                               to_model_scale, to_unit_scale, voxel_mm)
from lungsynth.methods.lung_ddpm.train import default_run_dir, ensure_trained, is_trained

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lungsynth.config import Config


SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")


@dataclasses.dataclass
class LungDDPM:
    """A trained Lung-DDPM: the (EMA) U-Net, its scheduler and how it reads layouts."""

    unet: "nn.Module"
    scheduler: Any
    cfg: "Config"
    variant: str = "layout"
    run_dir: Path | None = None

    @property
    def lung_layout(self) -> bool:
        return self.variant == "layout"

    def denoise_fn(self, x: "torch.Tensor", t: "torch.Tensor") -> "torch.Tensor":
        """The U-Net's output for ``[x_t, layout]`` [B, 1 + K, *S] -> [B, 1, *S]: on the whole volume, or, with
        ``lung_ddpm.sample_tile`` > 0 and a larger volume, on cubes of that side (``lungsynth.diffusion.tiling``:
        a grid shifted every step), the context the course model was trained on (see the config)."""
        from lungsynth.diffusion.tiling import tiled

        # the layout's last channel is the nodule in either encoding (one-hot 1, scaled +1): no tile border cuts one
        nodules = (x[:, -1] > 0.5).any(dim=0)
        return tiled(self.unet, x, t, int(self.cfg.lung_ddpm.sample_tile), avoid=nodules)

    def scheduler_for(self, sampler: str) -> Any:
        """The scheduler whose update rule ``sampler`` names, on the training schedule."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown Lung-DDPM sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
        return self.scheduler if sampler == "ddpm" else build_scheduler(self.cfg, sampler)

    def sample(self, layout: "torch.Tensor", reference: "torch.Tensor | None" = None, *, aas: bool = True,
               generator: "torch.Generator | None" = None, num_inference_steps: int | None = None,
               sampler: str | None = None, blend_from: int | None = None, device: Any = None,
               progress: bool = False, intermediates_every: int | None = None, stats: dict | None = None) -> Any:
        """Generate CT volumes for a layout (paper Alg. 2 with AAS, or plain DDPM sampling without).

        Args:
            layout: [B, 1, S, S, S] in {0, 1, 2} (:func:`make_layout`); always the full layout: the
                "w/o lung layout" model drops the lung itself, and its AAS generates the nodule only
                (``m_l`` = :func:`generation_mask`; everything else comes from the reference).
            reference: [B or 1, 1, S, S, S] CT in [0, 1]; required with ``aas=True``.
            aas: anatomically aware sampling (outside the lungs: the reference diffused to t-1).
            generator: seeds the start noise and the step noise; the reference's noise uses a
                generator seeded from it, so a seed gives one sample.
            num_inference_steps: reverse steps (default ``cfg.lung_ddpm.sample_steps``; T = all).
            sampler: ``"ddpm"`` (the paper's) or ``"ddim"`` (deterministic DDIM, the fast sampler); default
                ``cfg.lung_ddpm.sampler``. Both share the schedule the model was trained with.
            blend_from: AAS from this timestep down (default ``cfg.lung_ddpm.blend_from``).
            intermediates_every: also return ``x_t`` every k steps (see ``samplers.sample``).
        Returns:
            [B, 1, S, S, S] float32 in [0, 1] on the CPU; with AAS, bit-identical to ``reference``
            outside ``m_l``. With ``intermediates_every``: ``(x, intermediates)`` (model scale).
        """
        import torch

        from lungsynth.diffusion.samplers import anatomically_aware
        from lungsynth.diffusion.samplers import sample as reverse_diffusion
        from lungsynth.runtime import device as default_device

        lay = check_layout(layout)
        ref = check_reference(reference, lay) if reference is not None else None
        if aas and ref is None:
            raise ValueError("anatomically aware sampling needs the reference CT [B or 1, 1, S, S, S] in [0, 1]; "
                             "pass reference=... or aas=False")
        dev = torch.device(device) if device is not None else default_device()
        self.unet.to(dev).eval()
        B = lay.shape[0]
        cond = layout_channels(lay, self.lung_layout, self.cfg.lung_ddpm.layout_encoding).to(dev)
        steps = int(num_inference_steps or self.cfg.lung_ddpm.sample_steps)
        scheduler = self.scheduler_for(sampler or self.cfg.lung_ddpm.sampler)
        callbacks = []
        gen = generator if generator is not None else torch.Generator().manual_seed(self.cfg.seed)
        if aas:
            assert ref is not None
            ref_gen = torch.Generator(device=gen.device).manual_seed(
                int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device)))
            m_l = generation_mask(lay, self.lung_layout).to(dev)
            callbacks.append(anatomically_aware(to_model_scale(ref).to(dev), m_l, scheduler,
                                                self.cfg.lung_ddpm.blend_from if blend_from is None else blend_from,
                                                generator=ref_gen))
        out = reverse_diffusion(self.denoise_fn, scheduler, (B, 1, *lay.shape[2:]), steps, generator=gen,
                                device=dev, condition={"concat": cond}, step_callback=callbacks,
                                intermediates_every=intermediates_every, amp=precision(self.cfg, dev),
                                progress=progress,
                                desc="lung-ddpm", stats=stats)
        x, inter = out if intermediates_every else (out, None)
        x = to_unit_scale(x.float()).cpu()
        if aas:
            assert ref is not None
            # The last AAS step pasted the reference in [-1, 1]; mapping back to [0, 1] rounds, so the
            # same paste is repeated in the output scale to give the reference bit for bit.
            x = torch.where(generation_mask(lay, self.lung_layout), x, ref.expand_as(x))
        return (x, inter) if intermediates_every else x


def load(cfg: "Config", variant: str = "layout", run_dir: Path | str | None = None, *, use_ema: bool | None = None,
         train_if_missing: bool = True, progress: bool | None = None) -> LungDDPM:
    """A trained model ready to :meth:`LungDDPM.sample`: its EMA weights or its raw ones (``use_ema``; default
    ``cfg.lung_ddpm.sample_ema``).

    Trains first (:func:`ensure_trained`) when the run has no ``final.pt`` and ``train_if_missing``.
    """
    from lungsynth.engine import LAST_NAME, load_weights

    run = Path(run_dir) if run_dir is not None else default_run_dir(cfg, variant)
    if train_if_missing:
        ensure_trained(cfg, variant, run, progress=progress)
    elif not (is_trained(run) or (run / LAST_NAME).is_file()):
        raise FileNotFoundError(f"no Lung-DDPM checkpoint in {run}; run `lungsynth lung-ddpm train --profile "
                                f"{cfg.profile}{' --no-lung-layout' if variant == 'no_lung_layout' else ''}`")
    unet = build_unet(cfg, variant == "layout")
    ema = bool(cfg.lung_ddpm.sample_ema) if use_ema is None else use_ema
    load_weights(run, kind=KIND, config=model_config(cfg, variant), modules={"unet": unet}, use_ema=ema)
    return LungDDPM(unet.eval(), build_scheduler(cfg), cfg, variant, run)


def sample(model: LungDDPM, layout: "torch.Tensor", reference: "torch.Tensor | None" = None, **kwargs: Any):
    """Function form of :meth:`LungDDPM.sample` (same arguments)."""
    return model.sample(layout, reference, **kwargs)


def generate(model: LungDDPM, layouts: "torch.Tensor", references: "torch.Tensor", *, aas: bool = True,
             seed: int = 0, batch_size: int = 1, progress: bool = False, **kwargs: Any) -> "torch.Tensor":
    """Sample one volume per (layout, reference) pair in batches; seed ``seed + i`` for batch i.

    Args: layouts, references [N, 1, S, S, S]. Returns: [N, 1, S, S, S] in [0, 1].
    """
    import torch

    outs = []
    for i, start in enumerate(range(0, layouts.shape[0], batch_size)):
        sl = slice(start, start + batch_size)
        outs.append(model.sample(layouts[sl], references[sl], aas=aas, progress=progress,
                                 generator=torch.Generator().manual_seed(int(seed) + i), **kwargs))
    return torch.cat(outs)


def save_volumes(out_dir: Path | str, cfg: "Config", samples: "torch.Tensor", names: Sequence[str],
                 layouts: "torch.Tensor | None" = None) -> list[Path]:
    """Write samples [N, 1, S, S, S] in [0, 1] as HU NIfTI (``<name>_ct.nii.gz``, and ``_layout``)."""
    import nibabel as nib
    import numpy as np

    from lungsynth.data.preprocess import unit_to_hu

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spacing = voxel_mm(cfg)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    written = []
    for i, name in enumerate(names):
        pairs = [("ct", np.asarray(unit_to_hu(samples[i, 0].numpy(), cfg.data.hu_min, cfg.data.hu_max),
                                   dtype=np.float32))]
        if layouts is not None:
            pairs.append(("layout", layouts[i, 0].numpy().astype(np.uint8)))
        for key, arr in pairs:
            path = out / f"{name}_{key}.nii.gz"
            tmp = out / f".{name}_{key}.tmp.nii.gz"
            nib.save(nib.Nifti1Image(arr, affine), str(tmp))
            tmp.replace(path)
            written.append(path)
    return written
