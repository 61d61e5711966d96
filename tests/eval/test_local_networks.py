"""MedicalNet and RadImageNet feature networks from local weights, tested with tiny random networks saved here."""

import numpy as np
import pytest
import torch

from lungsynth.eval.features import extract_features, local_features
from lungsynth.eval.local_networks import load_network, medicalnet_normalise, parse_network, radimagenet_input


def _tiny(spatial_dims: int, in_channels: int):
    from monai.networks.nets import ResNet

    torch.manual_seed(0)
    return ResNet("bottleneck", [1, 2, 1, 1], [4, 4, 8, 8], spatial_dims=spatial_dims, n_input_channels=in_channels,
                  conv1_t_stride=2, shortcut_type="B", bias_downsample=False, feed_forward=False).eval()


@pytest.fixture
def medicalnet(tmp_path):
    """A tiny 3D ResNet saved as MedicalNet saves its weights: under 'state_dict', with a 'module.' prefix."""
    net = _tiny(3, 1)
    path = tmp_path / "medicalnet_tiny.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net, path


@pytest.fixture
def radimagenet(tmp_path):
    """A tiny 2D ResNet saved as a plain state dict with a classifier head the features do not use."""
    net = _tiny(2, 3)
    path = tmp_path / "radimagenet_tiny.pt"
    torch.save({**net.state_dict(), "fc.weight": torch.zeros(5, 32), "fc.bias": torch.zeros(5)}, path)
    return net, path


def _volumes(n=3, size=24, seed=0):
    rng = np.random.default_rng(seed)
    v = np.full((n, size, size, size), -800.0, np.float32) + rng.normal(0, 40, (n, size, size, size))
    v[:, 6:18, 6:18, 6:18] = 40.0 + rng.normal(0, 20, (n, 12, 12, 12))
    return v.astype(np.float32)


def test_medicalnet_features_are_the_saved_network_on_the_authors_normalisation(medicalnet, monkeypatch):
    monkeypatch.setenv("LUNGSYNTH_FEATURE_CACHE", "off")
    net, path = medicalnet
    vols = _volumes()
    feats, name = local_features(vols, f"medicalnet:{path}")
    with torch.no_grad():
        want = net(torch.from_numpy(np.stack([medicalnet_normalise(v) for v in vols])[:, None])).double().numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-6)
    assert feats.shape == (3, 32) and name.startswith("medicalnet-resnet/3d|") and len(name.split("|")[1]) == 12
    # through the board's entry point, from the [0, 1] course scale
    unit = (np.clip(vols, -1000, 400) + 1000) / 1400
    same, _ = extract_features(unit, f"medicalnet:{path}", "unit", unit_range=(-1000.0, 400.0))
    np.testing.assert_allclose(same, feats, rtol=1e-5, atol=1e-6)


def test_medicalnet_normalisation_by_hand():
    v = np.array([[[0.0, 100.0], [-800.0, 300.0]]], np.float32)
    out = medicalnet_normalise(v, seed=3)
    pos = np.array([100.0, 300.0])
    assert out[0, 0, 1] == pytest.approx((100 - pos.mean()) / pos.std())
    assert out[0, 1, 0] == pytest.approx((-800 - pos.mean()) / pos.std())
    assert out[0, 0, 0] == pytest.approx(np.random.default_rng(3).standard_normal(v.shape)[0, 0, 0])  # zero: noise
    with pytest.raises(ValueError, match="voxels > 0"):
        medicalnet_normalise(np.full((4, 4, 4), -1000.0))


def test_radimagenet_is_2_5d_on_imagenet_normalised_rgb_slices(radimagenet, monkeypatch):
    monkeypatch.setenv("LUNGSYNTH_FEATURE_CACHE", "off")
    net, path = radimagenet
    vols = _volumes(2)
    feats, name = local_features(vols, f"radimagenet:{path}")
    assert feats.shape == (2, 3 * 32) and name.startswith("radimagenet-resnet/2.5d|")
    axial = (np.clip(vols[:, 12], -1000, 400) + 1000) / 1400
    x = radimagenet_input(axial)
    assert x.shape == (2, 3, 224, 224)
    np.testing.assert_allclose(x[:, 0, 0, 0], (axial[:, 0, 0] - 0.485) / 0.229, rtol=1e-5)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(feats[:, :32], want, rtol=1e-5, atol=1e-6)


def test_other_weights_are_another_network_name(medicalnet, tmp_path):
    _, path = medicalnet
    other = _tiny(3, 1)
    with torch.no_grad():
        other.conv1.weight.mul_(2.0)
    path2 = tmp_path / "other.pth"
    torch.save(other.state_dict(), path2)
    assert load_network(f"medicalnet:{path}")[1] != load_network(f"medicalnet:{path2}")[1]


def test_bad_weights_and_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="expected 'medicalnet:/path"):
        parse_network("medicalnet")
    with pytest.raises(FileNotFoundError, match="not shipped by any package"):
        parse_network(f"radimagenet:{tmp_path / 'missing.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a state dict"):
        load_network(f"medicalnet:{tmp_path / 'junk.pt'}")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: no ResNet weights"):
        load_network(f"medicalnet:{tmp_path / 'other.pt'}")
    net = _tiny(2, 3)  # 2D weights asked for as the 3D MedicalNet
    torch.save(net.state_dict(), tmp_path / "flat.pt")
    with pytest.raises(ValueError, match="flat.pt: the weights do not fit a 3D bottleneck ResNet"):
        load_network(f"medicalnet:{tmp_path / 'flat.pt'}")


def test_a_resnet_saved_as_a_sequential_of_its_children_loads_by_name(tmp_path, monkeypatch):
    """RadImageNet's PyTorch weights circulate as nn.Sequential(*resnet.children()[:-1]): keys '0.weight',
    '4.0.conv1.weight'; they load as conv1 / layer1 and give the network's own features."""
    monkeypatch.setenv("LUNGSYNTH_FEATURE_CACHE", "off")
    net = _tiny(2, 3)
    seq = torch.nn.Sequential(*list(net.children())[:8])  # conv1, bn1, act, maxpool, layer1..layer4
    assert "4.0.conv1.weight" in seq.state_dict()
    torch.save(seq.state_dict(), tmp_path / "sequential.pt")
    feats, _ = local_features(_volumes(2), f"radimagenet:{tmp_path / 'sequential.pt'}")
    axial = (np.clip(_volumes(2)[:, 12], -1000, 400) + 1000) / 1400
    with torch.no_grad():
        want = net(torch.from_numpy(radimagenet_input(axial))).double().numpy()
    np.testing.assert_allclose(feats[:, :32], want, rtol=1e-5, atol=1e-6)
