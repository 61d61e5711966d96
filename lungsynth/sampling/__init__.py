"""Chapter 08: sampling at scale into synthetic datasets.

- :mod:`lungsynth.sampling.registry`   ``METHODS = {name: adapter}``: one adapter per method chapter turns
  (cfg, run dir, conditions, seed) into samples through that method's public API;
- :mod:`lungsynth.data.conditions` where conditions come from: held-out real scans/nodules or a
  method's own sampler;
- :mod:`lungsynth.sampling.writer`     a synthetic dataset in the prepared format (scans.csv / nodules.csv /
  volumes/*.nii.gz, or views/{slices,rois,crops}/*.npz for 2D and crop methods) with per-sample provenance;
- :mod:`lungsynth.sampling.synth`      the batched, resumable loop and ``lungsynth synth``.

Submodules import numpy (and torch inside functions); import them directly.
"""
