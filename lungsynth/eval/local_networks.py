"""Feature networks from weights the user holds locally: MedicalNet's 3D ResNet-50 and RadImageNet's ResNet-50.

Neither ships inside a package, so neither is reachable offline by default (the course's 3D default is the packaged
Astra encoder, :mod:`lungsynth.eval.features`). A user who has the weights names the file in
``cfg.evaluation.feature_network``:

- ``medicalnet:/path/resnet_50_23dataset.pth`` -- MedicalNet (Chen et al. 2019, Med3D): a 3D ResNet with bottleneck
  blocks and type-B shortcuts, one input channel, trained on 23 segmentation datasets; checkpoints as the authors
  save them (``{"state_dict": {"module.conv1.weight": ...}}``). Built with MONAI's ``ResNet`` with the options MONAI
  documents for these weights (``shortcut_type="B"``, ``bias_downsample=False``, ``conv1_t_stride=2``, no classifier);
  like MONAI's own loader of them, layers 3-4 stride by 2 where the authors' segmentation network dilates instead
  (same weights, coarser last maps).
  Input: the authors' ``itensity_normalize_one_volume`` on the raw HU volume: a z-score with the mean and standard
  deviation of the voxels > 0, the voxels exactly 0 replaced by N(0, 1) noise (seeded here, so the features are
  reproducible). Features: the last block, global average pooled (2048-d for ResNet-50).
- ``radimagenet:/path/ResNet50.pt`` -- RadImageNet (Mei et al. 2022): a 2D ResNet-50 (torchvision layout) trained on
  1.35 M CT, MRI and ultrasound slices. Input: the slice in the course's HU window mapped to [0, 1], repeated to three
  channels, resized to 224 x 224 and normalised with the ImageNet mean and standard deviation (as the published
  PyTorch weights expect). 2.5D as HR-LDM evaluates: the axial, coronal and sagittal centre slices of each volume,
  their features concatenated ([N, 3 x 2048]).

The architecture is read from the state dict (block counts and widths), so a smaller network of the same family
loads too (the tests save tiny random ones); a ResNet saved as a Sequential of its children (keys ``0.weight``,
``4.0.conv1.weight``: how RadImageNet's PyTorch weights circulate) is renamed to its modules, and classifier or
segmentation heads (``fc.``, ``conv_seg.``) are skipped. Weights load with ``torch.load(weights_only=True)``; the network name
carries the first 12 hex digits of the file's SHA-256, so other weights make another reference on the board.
Shapes: volumes [N, D, H, W] in HU; features float64 [N, F]. The features of a volume batch, with the feature cache
and the 2.5D planes, come from :func:`lungsynth.eval.features.local_features` (this room only builds, loads and
feeds the networks).
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

KINDS: dict[str, int] = {"medicalnet": 3, "radimagenet": 2}  # prefix -> spatial dims
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RADIMAGENET_SIZE = 224


def parse_network(network: str) -> tuple[str, Path]:
    """``"medicalnet:/p"`` / ``"radimagenet:/p"`` -> (kind, path); ValueError naming the expected forms."""
    kind, _, path = network.partition(":")
    if kind not in KINDS or not path:
        raise ValueError(f"feature network {network!r}: expected 'medicalnet:/path/to/weights.pth' or "
                         f"'radimagenet:/path/to/weights.pt'")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: the {kind} weights are not shipped by any package; download them "
                                f"and point evaluation.feature_network at the file ('{kind}:/path/to/file')")
    return kind, p


@functools.cache
def weights_digest(path: Path) -> str:
    """First 12 hex digits of the file's SHA-256 (read once per process)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickled model object, a corrupt file: never unpickled here
        raise ValueError(f"{path}: not a state dict loadable without unpickling objects ({exc}); save the weights "
                         f"with torch.save(model.state_dict(), path)") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict):
        state = _named_children(state)
    if not isinstance(state, dict) or "conv1.weight" not in {_strip(k) for k in state}:
        raise ValueError(f"{path}: no ResNet weights found (expected keys like 'conv1.weight', 'layer1.0.conv1.weight',"
                         f" optionally under 'state_dict' and with a 'module.' prefix)")
    return {_strip(k): v for k, v in state.items()}


# a ResNet saved as nn.Sequential(*children[:-1]) (how RadImageNet's PyTorch weights circulate): index -> name
SEQUENTIAL_NAMES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _named_children(state: dict[str, Any]) -> dict[str, Any]:
    """Keys of a ResNet saved as a Sequential of its children ("0.weight", "4.0.conv1.weight") renamed to the
    module names ("conv1.weight", "layer1.0.conv1.weight"); other state dicts unchanged."""
    keys = [_strip(k) for k in state]
    if "0.weight" not in keys or not any(k.startswith("4.0.") for k in keys):
        return state
    out = {}
    for k, v in state.items():
        head, _, rest = _strip(k).partition(".")
        out[f"{SEQUENTIAL_NAMES.get(head, head)}.{rest}"] = v
    return out


def _strip(key: str) -> str:
    return re.sub(r"^(module\.|backbone\.|model\.)+", "", key)


def build_from_state(state: dict[str, Any], spatial_dims: int, path: Path | str = "") -> Any:
    """A MONAI bottleneck ``ResNet`` shaped after ``state`` (block counts and widths read from its keys), its
    weights loaded (every key but a classifier head must match), in eval mode, frozen."""
    from monai.networks.nets import ResNet

    layers = [len({int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}) for i in range(1, 5)]
    if min(layers) == 0:
        raise ValueError(f"{path}: a ResNet needs blocks in layer1..layer4, found {layers} blocks")
    widths = [int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5)]
    stem = state["conv1.weight"]
    net = ResNet("bottleneck", layers, widths, spatial_dims=spatial_dims, n_input_channels=int(stem.shape[1]),
                 conv1_t_size=int(stem.shape[-1]), conv1_t_stride=2, shortcut_type="B", bias_downsample=False,
                 feed_forward=False)
    own = net.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(("fc.", "conv_seg."))}  # heads the features skip
    missing, unexpected = sorted(set(own) - set(body)), sorted(set(body) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit a bottleneck ResNet with blocks {layers} and widths "
                         f"{widths} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        net.load_state_dict(body)
    except RuntimeError as exc:  # the right names with other shapes: 2D weights read as 3D, say
        raise ValueError(f"{path}: the weights do not fit a {spatial_dims}D bottleneck ResNet ({exc})") from exc
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


@functools.cache
def load_network(network: str) -> tuple[Any, str]:
    """(frozen model, name) of a ``medicalnet:`` / ``radimagenet:`` network, cached per process."""
    kind, path = parse_network(network)
    model = build_from_state(_state_dict(path), KINDS[kind], path)
    dims = "3d" if KINDS[kind] == 3 else "2.5d"
    return model, f"{kind}-resnet/{dims}|{weights_digest(path)}"


def medicalnet_normalise(volume_hu: np.ndarray, seed: int = 0) -> np.ndarray:
    """MedicalNet's ``itensity_normalize_one_volume``: z-score by the voxels > 0, exact zeros replaced by N(0, 1)."""
    v = np.asarray(volume_hu, dtype=np.float32)
    pixels = v[v > 0]
    if pixels.size < 2:
        raise ValueError("MedicalNet's normalisation needs voxels > 0 (raw HU: soft tissue and bone); this volume "
                         "has none")
    out = (v - pixels.mean()) / pixels.std()
    noise = np.random.default_rng(seed).standard_normal(v.shape).astype(np.float32)
    return np.where(v == 0, noise, out).astype(np.float32)


def radimagenet_input(slices_unit: np.ndarray) -> np.ndarray:
    """[M, H, W] in [0, 1] -> [M, 3, 224, 224]: grey repeated to RGB, resized, ImageNet-normalised."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.asarray(slices_unit, np.float32))[:, None]
    x = F.interpolate(x, size=(RADIMAGENET_SIZE,) * 2, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).numpy()


def pooled_features(model: Any, inputs: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """Global-average-pooled last-block features [N, F] (float64) of ``inputs`` [N, C, *S]."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            f = model(torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size])))
            out.append(f.reshape(f.shape[0], -1).double().numpy())  # feed_forward=False: already pooled
    feats = np.concatenate(out) if out else np.zeros((0, 0))
    if not np.isfinite(feats).all():
        raise ValueError("the local feature network produced NaN/inf features")
    return feats
