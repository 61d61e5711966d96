"""Chapter 04 — 2D latent diffusion with a nodule box mask and LIDC attributes (Mari et al.).

A whole axial CT slice is generated *around* a nodule chosen in advance: where it is (a square box
``(y0, x0, side)``) and what it looks like (five LIDC-IDRI reader scores ``s`` in 1..5: sphericity,
margin, lobulation, spiculation, texture). The diffusion runs in the latent space of the frozen 2D
VQ-VAE of chapter 02 (x4):

    z_0 = E(x)                                                   x [1, H, W] in [0, 1] over [-1000, 2500] HU
    z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps,  eps ~ N(0, I)    linear betas, T = 1000 (Ho et al. 2020, eq. 4)
    m   = maxpool_4(box mask)                                    [1, H/4, W/4], a 2-pixel nodule survives
    L   = E_{z_0, eps, t} || eps - eps_theta([z_t, m], t, c) ||^2   (Mari et al. §2.2; Ho et al., eq. 14)

(smoke and course regress v = sqrt(ab_t) eps - sqrt(1 - ab_t) z_0 instead: ``bbox_ldm.prediction``, measured in
the config and chapter 04).

The three configurations of the paper's Table 2 differ only in the cross-attention context ``c``:

- config 1: ``c`` empty, the mask only as an extra input channel;
- config 2: ``c = [vec(m)]``, the mask flattened into one token of width (H/4)(W/4) (Mari §2.2; the course's
  ``grid^2`` pooled tokens of width D' = 10, ``mask_context="pooled"``, are a named option);
- config 3: ``c = [vec(m); a]`` with the attribute vector
  ``a = FC_{128->10}(ReLU(FC_{128->128}(ReLU(FC_{50->128}([E_1(s_1); ...; E_5(s_5)])))))``,
  one learnable table ``E_k`` in R^{5 x 10} per attribute (pooled: ``a`` is one more token).

Sampling runs the reverse process from ``z_T ~ N(0, I)`` (DDPM with ``T`` steps, else DDIM) and decodes
``x = D(z_0)``. At inference the paper draws the box centre from a per-pixel map of training nodule
centres, the side from the training box sizes and each score uniformly in 1..5 (``paper`` sampler);
the course's ``anatomical`` sampler places a real nodule (size and scores together) inside a real lung, and
its lung-conditioned variant of configuration 3 (``lung=True``) is given that lung as one more input channel.
The chapter's table: FID on whole slices and on 32 x 32 crops around the boxes, per configuration, and
the share of each sampler's boxes that lie in the lung. Its quality gates (:func:`quality_gates`, cached in
``runs/<profile>/04_bbox_ldm_gates.json``) read generated slices: the nodule's contrast in its box, the box on
the generated slice's own lung, texture order, KID against a shuffled-pixel baseline.

What later chapters call::

    from lungsynth.methods import bbox_ldm
    run = bbox_ldm.ensure_trained(cfg, 3)                    # runs/<profile>/04_bbox_ldm_config3
    model = bbox_ldm.load(cfg, 3)                            # U-Net + condition encoder + frozen VQ-VAE
    draw = bbox_ldm.draw_conditions(cfg, "anatomical", 16)   # boxes [16, 3] (y0, x0, side), attributes [16, 5]
    slices = model.sample(draw.boxes, draw.attributes, seed=0)   # [16, 1, H, W] in [0, 1] over hu_clip
    hu = bbox_ldm.to_hu(slices, cfg.bbox_ldm.hu_clip)
    table = bbox_ldm.evaluate(cfg)["table"]                  # FID on slices and 32x32 crops per config

Command line: ``lungsynth bbox-ldm train|sample|evaluate --config 1|2|3 --sampler paper|anatomical
[--mask-context flat|pooled]``.

Rooms: :mod:`.model` (condition encoding and validation, attribute embedder, U-Net, the frozen VQ-VAE),
:mod:`.train` (the training slices, the engine task, ``train`` / ``ensure_trained``), :mod:`.sample`
(``load``, ``BboxLdm.sample``, the paper's and the anatomical box samplers), :mod:`.evaluate` (Table 2,
where the boxes fall, the quality gates), :mod:`.method` (the face for chapters 08-11), :mod:`.plots`, :mod:`.cli`
(``lungsynth bbox-ldm``), :mod:`.bench` (``lungsynth bench bbox-ldm``).
"""

from __future__ import annotations

from lungsynth.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "model": ("ATTRIBUTES", "CONFIG_NAMES", "CONFIGS", "LUNG_CONFIG", "AttributeEmbedder", "ConditionEncoder",
              "MASK_CONTEXTS", "PretrainedVQ", "check_mask_context", "autoencoder", "autoencoder_name",
              "box_masks", "boxes_from_masks", "check_config", "lung_to_latent", "mask_to_latent", "validate_attributes",
              "validate_boxes"),
    "train": ("BboxLdmTask", "check_lung", "default_run_dir", "ensure_trained", "load_split", "run_name",
              "slice_dataset", "train", "train_command"),
    "sample": ("SAMPLERS", "AnatomicalMaskSampler", "BboxLdm", "MaskDraw", "PaperMaskSampler", "anatomical_sampler",
               "box_centres", "draw_conditions", "load", "paper_sampler", "table_sides_and_attributes", "to_hu"),
    "evaluate": ("CROP", "TISSUES", "body_mask", "box_placement", "classify_box", "classify_boxes", "compare_samplers",
                 "crops", "evaluate", "feature_net", "fid_2d", "inside_lung_rate", "tissue_counts", "box_contrast",
                 "box_tissues", "in_lung_rate", "measure_gates", "quality_gates", "reference_contrast", "ring",
                 "texture_sweep", "variant_label", "variant_config", "box_share", "box_share_ceiling", "VARIANTS"),
})
