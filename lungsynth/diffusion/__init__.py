"""Shared diffusion machinery for every method chapter.

- :mod:`lungsynth.diffusion.schedules`  noise schedules and MONAI schedulers (``make_scheduler``, SNR);
- :mod:`lungsynth.diffusion.objectives` training targets (epsilon / v / x0), Min-SNR-gamma weights,
  masked losses (``diffusion_loss``);
- :mod:`lungsynth.diffusion.samplers`   one reverse-diffusion loop (``sample``) for DDPM and DDIM,
  classifier-free guidance, background re-anchoring (HR-LDM) and anatomically aware sampling
  (Lung-DDPM) as step callbacks.

Submodules import torch; import them directly (``from lungsynth.diffusion.samplers import sample``).
"""
