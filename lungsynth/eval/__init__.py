"""One evaluation for every method (chapter 09).

- :mod:`lungsynth.eval.features`     feature networks (packaged I3ResNet-152 chest-CT encoder, 2.5D
  slices, a small 2D net), each returning ``(features [N, D] float64, network name)``;
- :mod:`lungsynth.eval.distribution` FID, KID and MMD with bootstrap confidence intervals;
- :mod:`lungsynth.eval.two_sample`   the classifier two-sample test (held-out accuracy of telling synthetic
  from real; 0.5 = indistinguishable);
- :mod:`lungsynth.eval.fidelity`     MS-SSIM diversity, masked MSE / PSNR / SSIM / MAE, HU-histogram JSD,
  nodule Dice;
- :mod:`lungsynth.eval.nodule_crops` crops around the generated (and the real) nodules of volumes, at one
  spacing, for the leaderboard's nodule-level rows;
- :mod:`lungsynth.eval.local_networks` MedicalNet (3D) and RadImageNet (2.5D) ResNet features from weights the
  user holds locally;
- :mod:`lungsynth.eval.pretrained_metrics` LPIPS, CLIPScore and BioCLIPScore where a user has their weights
  locally ("not available offline" otherwise).

Submodules import numpy/torch; import them directly.
"""
