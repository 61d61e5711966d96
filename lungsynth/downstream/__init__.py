"""Chapters 10-11: does synthetic data help nodule segmentation and classification?

- :mod:`lungsynth.downstream.metrics`: Dice / sensitivity / specificity, AUROC / AUPRC, Mann-Whitney, aggregation;
- :mod:`lungsynth.downstream.data`: item tables of real and synthetic data, validation, datasets;
- :mod:`lungsynth.downstream.mixing`: synthetic ratios, scarcity subsets, class balancing, the test-patient guard;
- :mod:`lungsynth.downstream.segmentation` (chapter 10) and :mod:`lungsynth.downstream.classification` (chapter 11);
- :mod:`lungsynth.downstream.cli`: ``lungsynth downstream seg|cls``.
"""
