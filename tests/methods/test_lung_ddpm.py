"""Chapter 06, Lung-DDPM: layout, AAS exactness, cosine schedule, EMA through the engine, train + sample."""

from __future__ import annotations

import math

import pytest
import torch

from lungsynth.config import get_config
from lungsynth.methods import lung_ddpm as ld

S = 16


def _tiny_cfg(**extra):
    overrides = {"data.size_ddpm": S, "lung_ddpm.unet_channels": "8,16", "lung_ddpm.attention_at": "1",
                 "lung_ddpm.train_steps": 3, "lung_ddpm.ema_start": 2, "lung_ddpm.ema_every": 1,
                 "lung_ddpm.sample_steps": 3, "engine.checkpoint_every": 2, "engine.log_every": 1,
                 "evaluation.feature_network": "slicenet2d-2.5d"}
    overrides.update(extra)
    return get_config("smoke", overrides)


def _volume(seed: int) -> dict:
    """A 16^3 toy chest: body disc, two lungs, one nodule; ct in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*(torch.arange(S, dtype=torch.float32),) * 3, indexing="ij")
    body = ((y - 7.5) ** 2 / 49 + (x - 7.5) ** 2 / 49) <= 1
    lung = ((((y - 7.5) ** 2 + (x - 4.5) ** 2) <= 7) | (((y - 7.5) ** 2 + (x - 10.5) ** 2) <= 7)) & (z > 2) & (z < 13)
    label = (((z - 8) ** 2 + (y - 7.5) ** 2 + (x - 4.5 - seed % 2) ** 2) <= 2).to(torch.uint8)
    ct = torch.where(body, torch.tensor(0.7), torch.tensor(0.0))
    ct = torch.where(lung, torch.tensor(0.15), ct)
    ct = torch.where(label > 0, torch.tensor(0.75), ct)
    ct = (ct + 0.02 * torch.randn(ct.shape, generator=g)).clamp(0, 1)
    return {"ct": ct[None], "lung": lung.float()[None], "label": label.float()[None], "scan_id": f"toy{seed}"}


@pytest.fixture(scope="module")
def toy_data():
    return [_volume(i) for i in range(3)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_data):
    """Both variants trained for 4 steps on the toy volumes (shared by the tests below)."""
    torch.set_num_threads(2)
    cfg = _tiny_cfg()
    runs = {}
    for variant in ld.VARIANTS:
        runs[variant] = ld.train(cfg, variant, tmp_path_factory.mktemp(variant), dataset=toy_data, progress=False)
    return cfg, runs


def _batch(toy_data, n=2):
    ct = torch.stack([d["ct"] for d in toy_data[:n]])
    layout = torch.stack([ld.make_layout(d["lung"][None], d["label"][None])[0] for d in toy_data[:n]])
    return ct, layout


# --------------------------------------------------------------------------- layout and validation


def test_layout_labels_and_channels(toy_data):
    d = toy_data[0]
    layout = ld.make_layout(d["lung"][None], d["label"][None])
    assert set(torch.unique(layout).tolist()) == {0.0, 1.0, 2.0}
    assert bool((layout[d["label"][None] > 0] == 2).all())  # the nodule overrides the lung
    onehot = ld.layout_channels(layout, True)
    assert onehot.shape == (1, 3, S, S, S) and torch.equal(onehot.sum(1), torch.ones(1, S, S, S))
    no_lung = ld.layout_channels(layout, False)
    assert no_lung.shape == (1, 2, S, S, S)
    lung_only = layout == 1
    assert bool((no_lung[:, :1][lung_only] == 1).all())  # lung voxels are background without the lung layout
    scaled = ld.layout_channels(layout, True, "scaled")
    assert set(torch.unique(scaled).tolist()) == {-1.0, 0.0, 1.0}


def test_bad_layout_and_reference_are_value_errors(toy_data):
    ct, layout = _batch(toy_data)
    bad = layout.clone()
    bad[0, 0, 0, 0, 0] = 3
    with pytest.raises(ValueError, match="besides the three labels"):
        ld.check_layout(bad)
    with pytest.raises(ValueError, match="besides the three labels"):
        ld.check_layout(layout * 0.5)
    with pytest.raises(ValueError, match=r"expected \[B, 1, D, H, W\]"):
        ld.check_layout(layout[:, 0])
    with pytest.raises(ValueError, match="does not match the layout"):
        ld.check_reference(ct[..., :8], layout)
    with pytest.raises(ValueError, match=r"\[0, 1\] scale"):
        ld.check_reference(ct * 1000 - 1000, layout)


def test_sample_rejects_bad_inputs(trained, toy_data):
    cfg, runs = trained
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    ct, layout = _batch(toy_data)
    with pytest.raises(ValueError, match="does not match the layout"):
        model.sample(layout, ct[:, :, :8])
    bad = layout.clone()
    bad[0, 0, 1, 1, 1] = 7
    with pytest.raises(ValueError, match="besides the three labels"):
        model.sample(bad, ct)
    with pytest.raises(ValueError, match="needs the reference"):
        model.sample(layout, None, aas=True)


# --------------------------------------------------------------------------- schedule and EMA


def test_cosine_schedule_matches_hand_computation():
    cfg = get_config("full")
    sched = ld.build_scheduler(cfg)
    T, s = cfg.lung_ddpm.num_train_timesteps, 0.008
    assert T == 250 and cfg.lung_ddpm.schedule == "cosine"

    def f(t):  # Nichol & Dhariwal 2021, eq. 17
        return math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2

    ab = sched.alphas_cumprod.double()
    # MONAI's timestep index t carries alpha_bar(t + 1) (index 0 is one step from the data)
    for t in (0, 1, 10, 62, 125, 200, 240, T - 2):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=2e-5, abs=1e-7)
    # the same numbers written out (cos^2 evaluated by hand for T = 250, s = 0.008)
    assert ab[0].item() == pytest.approx(0.99980573, rel=1e-6)  # f(1)/f(0)
    assert ab[124].item() == pytest.approx(0.49384359, rel=1e-5)  # f(125)/f(0): half the steps
    assert ab[248].item() == pytest.approx(3.885980e-05, rel=1e-3)  # f(249)/f(0)
    assert sched.betas[-1].item() == pytest.approx(0.999)  # beta clipped at the last step (f(T) = 0)
    assert sched.prediction_type == "epsilon" and sched.clip_sample


def test_ema_update_through_the_engine_matches_hand_computation(toy_data):
    """EMA after step s (s % every == 0): copy while s < start, else ema <- d ema + (1 - d) w_s."""
    cfg = _tiny_cfg(**{"lung_ddpm.train_steps": 4, "lung_ddpm.ema_start": 3, "lung_ddpm.ema_every": 2,
                       "lung_ddpm.unet_channels": "8,8", "lung_ddpm.attention_at": "1"})
    seen: dict[int, list[torch.Tensor]] = {}
    base = ld.LungDdpmTask

    class Recording(base):
        def training_step(self, batch, step):
            seen[step] = [p.detach().clone().double() for p in self.unet.parameters()]
            return super().training_step(batch, step)

    task = Recording(cfg, "layout")
    trainer = ld.make_trainer(cfg, None, progress=False)
    assert (trainer.ema_decay, trainer.ema_start, trainer.ema_every) == (0.995, 3, 2)
    assert trainer.lr == cfg.lung_ddpm.lr and trainer.max_steps == 4
    trainer.fit(task, toy_data)
    weights = [seen[i] for i in range(4)] + [[p.detach().clone().double() for p in task.unet.parameters()]]
    d = cfg.lung_ddpm.ema_decay
    ema = [w.clone() for w in weights[0]]
    for s in range(1, 5):  # step 2: a copy (2 < start), step 4: an average, odd steps: skipped
        if s % 2:
            continue
        ema = [w.clone() for w in weights[s]] if s < 3 else [d * e + (1 - d) * w for e, w in zip(ema, weights[s])]
    got = [p.double() for p in trainer.ema.module("unet").parameters()]
    assert any(not torch.equal(e, w) for e, w in zip(ema, weights[4]))  # EMA differs from the raw weights
    for e, g in zip(ema, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_full_profile_settings():
    c = get_config("full").lung_ddpm
    assert c.unet_channels[0] == 64 and c.num_train_timesteps == 250 and c.lr == 1e-5
    assert c.batch_size == 1 and c.train_steps == 100_000 and c.ema_decay == 0.995
    assert get_config("full").data.size_ddpm == 128


# --------------------------------------------------------------------------- train and sample


def test_train_writes_run_and_load_uses_ema(trained):
    from lungsynth.engine import load_checkpoint

    cfg, runs = trained
    for variant, run in runs.items():
        assert (run / "final.pt").is_file() and (run / "metrics.csv").is_file() and (run / "run.json").is_file()
        assert ld.ensure_trained(cfg, variant, run) == run  # already trained: no retraining
    ckpt = load_checkpoint(runs["layout"] / "final.pt")
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    for name, p in model.unet.state_dict().items():
        assert torch.equal(p, ckpt["ema"]["unet"][name])
    with pytest.raises(ValueError, match="another"):
        ld.load(cfg, "no_lung_layout", runs["layout"], train_if_missing=False)


def test_aas_keeps_the_reference_outside_the_lung(trained, toy_data):
    cfg, runs = trained
    ct, layout = _batch(toy_data)
    outside = ~ld.generation_mask(layout)
    for variant in ld.VARIANTS:
        model = ld.load(cfg, variant, runs[variant], train_if_missing=False)
        x = model.sample(layout, ct, aas=True, generator=torch.Generator().manual_seed(0))
        assert x.shape == ct.shape and bool(torch.isfinite(x).all())
        assert torch.equal(x[outside], ct[outside])  # exactly the reference outside the lungs
        assert not torch.equal(x[~outside], ct[~outside])  # generated inside
    # AAS from a late step on still ends on the reference
    late = model.sample(layout[:1], ct[:1], aas=True, blend_from=50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(late[outside[:1]], ct[:1][outside[:1]])


def test_aas_in_model_scale_through_the_shared_sampler(trained, toy_data):
    """The shared hook itself: the final x_0 in [-1, 1] equals the reference outside m_l."""
    cfg, runs = trained
    ct, layout = _batch(toy_data, 1)
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    x, inter = model.sample(layout, ct, aas=True, generator=torch.Generator().manual_seed(0),
                            intermediates_every=1)
    final = inter[-1]["sample"]
    outside = ~ld.generation_mask(layout)
    assert torch.equal(final[outside], ld.to_model_scale(ct)[outside])
    assert inter[-1]["timestep"] == -1 and len(inter) == cfg.lung_ddpm.sample_steps


def test_sampling_without_aas_generates_everywhere(trained, toy_data):
    cfg, runs = trained
    ct, layout = _batch(toy_data)
    model = ld.load(cfg, "layout", runs["layout"], train_if_missing=False)
    ct, layout = ct[:1], layout[:1]
    x = model.sample(layout, ct, aas=False, generator=torch.Generator().manual_seed(0))
    outside = ~ld.generation_mask(layout)
    assert x.shape == ct.shape and float(x.min()) >= 0 and float(x.max()) <= 1
    assert not torch.equal(x[outside], ct[outside])
    y = model.sample(layout, None, aas=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, y)  # a seed gives one sample; without AAS the reference is not used


# --------------------------------------------------------------------------- metrics


def test_seam_ratio(toy_data):
    ct, layout = _batch(toy_data)
    lung = ld.generation_mask(layout)
    assert torch.allclose(ld.seam_ratio(ct, ct, lung), torch.ones(2, dtype=torch.float64))
    shell = ld.boundary_shell(lung)
    inner, outer = shell & lung, shell & ~lung
    assert bool(inner.any()) and bool(outer.any())  # the shell straddles the boundary
    assert not bool((shell & ~ld.boundary_shell(lung, 2)).any())  # and grows with the width
    smooth = torch.linspace(0.3, 0.5, S).expand(2, 1, S, S, S).contiguous()  # no edge at the lung boundary
    seamed = torch.where(lung, smooth + 0.2, smooth)  # a pasted region with an intensity step: a seam
    assert bool((ld.seam_ratio(seamed, smooth, lung) > 5).all())
    with pytest.raises(ValueError, match="no boundary"):
        ld.seam_ratio(ct, ct, torch.zeros_like(lung))


def test_metrics_row(toy_data):
    cfg = _tiny_cfg()
    ct, layout = _batch(toy_data, 3)
    noisy = (ct + 0.05 * torch.randn(ct.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    row = ld.metrics(cfg, noisy, ct, layout)
    assert set(row) >= {"fid", "mmd", "masked_mse", "seam_ratio", "n", "features"}
    assert row["n"] == 3 and row["masked_mse"] > 0 and row["seam_ratio"] > 1
    same = ld.metrics(cfg, ct, ct, layout)
    assert same["masked_mse"] == 0 and same["seam_ratio"] == pytest.approx(1.0) and same["fid"] == pytest.approx(0, abs=1e-6)


def test_cli_parses_the_chapter_flags():
    from lungsynth.cli import build_parser

    args = build_parser().parse_args(["lung-ddpm", "sample", "--profile", "smoke", "--no-aas", "--no-lung-layout"])
    assert args.no_aas and args.no_lung_layout and args.verb == "sample"
    args = build_parser().parse_args(["lung-ddpm", "train", "--profile", "smoke"])
    assert not args.no_lung_layout and args.func is ld._cli


def test_figures_show_reference_layout_samples_and_consecutive_slices(toy_data):
    import matplotlib.pyplot as plt

    ct, layout = _batch(toy_data, 1)
    k = ld.evaluation._centre_index(layout[0])
    per_slice = (layout[0, 0] == 2).sum(dim=(1, 2))
    assert per_slice[k] == per_slice.max() > 0  # the slice with the most nodule voxels
    fig = ld.figure_side_by_side(ct[0], layout[0], {"AAS": ct[0], "w/o AAS": ct[0]})
    assert len([a for a in fig.axes if a.get_title()]) == 4
    fig2 = ld.figure_consecutive_slices({"reference": ct[0], "sample": ct[0]}, layout[0], n=3)
    assert [a.get_title() for a in fig2.axes[:3]] == [f"reference z={z}" for z in (k - 1, k, k + 1)]
    assert len(fig2.axes) == 6
    plt.close("all")
