"""Metrics that need pretrained weights a user keeps in a local folder (none can be downloaded here).

Urata et al. (§2.4) report LPIPS, CLIPScore and BioCLIPScore beside FID and KID. Each runs here when its
weights sit in the folder a config key names, and is reported as "not available offline" otherwise, never
silently dropped (:func:`available_metrics` says which and why):

- **CLIPScore** (Hessel et al.): ``w * max(cos(E_image(x), E_text(y)), 0)`` with w = 2.5, averaged over
  pairs, through a transformers ``CLIPModel`` + ``CLIPProcessor`` folder (``evaluation.clip_dir``).
- **LPIPS** (Zhang et al., v0.1, AlexNet): unit-normalised activations of five AlexNet stages, squared
  differences weighted per channel by the learned linear layers, averaged over space and summed over stages;
  from ``evaluation.lpips_dir`` holding ``alexnet.pth`` (torchvision's AlexNet state dict) and ``alex.pth``
  (the lpips package's linear layers). Written by hand because the ``lpips`` package imports torchvision,
  which has no build for the CPU torch this course pins (measured: importing it fails); the computation is
  the package's, line for line.
- **BioCLIPScore** (BiomedCLIP through ``open_clip``): ``open_clip`` also needs torchvision, so it is reported
  as not available with that reason while torchvision cannot be installed beside the pinned torch.

Shapes: images [N, 1, H, W] in [0, 1] (grey, repeated to three channels); prompts N strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

NOT_OFFLINE = "not available offline"
CLIP_WEIGHT = 2.5  # Hessel et al.'s w, as the paper uses (§2.4)
LPIPS_FILES = ("alexnet.pth", "alex.pth")


def _folder(path: str | Path | None, what: str, needs: Sequence[str]) -> Path | None:
    """None when no folder is configured; the folder when it holds ``needs``; an error naming what is missing."""
    if not path:
        return None
    folder = Path(path)
    missing = [n for n in needs if not (folder / n).exists()]
    if not folder.is_dir() or missing:
        raise FileNotFoundError(f"{what} folder {folder}: missing {', '.join(missing) or 'the folder'} "
                                f"(expected {', '.join(needs)})")
    return folder


# ------------------------------------------------------------------------------------------------ CLIPScore


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], folder: str | Path, w: float = CLIP_WEIGHT,
               batch_size: int = 32) -> float:
    """Mean CLIPScore of (image, prompt) pairs with the CLIP model saved in ``folder`` (transformers layout)."""
    from transformers import CLIPModel, CLIPProcessor

    folder = _folder(folder, "CLIP", ("config.json",))
    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    scores = []
    for start in range(0, len(images), batch_size):
        rgb = images[start:start + batch_size].float().clamp(0, 1).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
        inputs = processor(text=list(prompts[start:start + batch_size]), images=list(rgb), return_tensors="pt",
                           padding=True, truncation=True, do_rescale=False)
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
        scores.append((w * cos.clamp(min=0)).numpy())
    return float(np.concatenate(scores).mean())


# ------------------------------------------------------------------------------------------------ LPIPS


class AlexLpips(nn.Module):
    """LPIPS v0.1 with AlexNet (Zhang et al.): ``forward(a, b)`` [N,3,H,W] in [-1,1] -> distances [N]."""

    SHIFT = (-0.030, -0.088, -0.188)  # lpips.ScalingLayer
    SCALE = (0.458, 0.448, 0.450)
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        # torchvision's AlexNet.features, indices kept so its state dict loads as is
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
        self.stage_ends = (2, 5, 8, 10, 12)  # relu1 .. relu5
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "AlexLpips":
        folder = _folder(folder, "LPIPS", LPIPS_FILES)
        net = cls()
        backbone = torch.load(folder / "alexnet.pth", map_location="cpu", weights_only=True)
        net.features.load_state_dict({k[len("features."):]: v for k, v in backbone.items() if k.startswith("features.")})
        linear = torch.load(folder / "alex.pth", map_location="cpu", weights_only=True)
        for i, lin in enumerate(net.lins):
            lin.weight.data.copy_(linear[f"lin{i}.model.1.weight"])
        return net.eval().requires_grad_(False)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        h = (x - self.shift) / self.scale
        for end in self.stage_ends:
            h = self.features[start:end](h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # lpips.normalize_tensor
            start = end
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sum(lin((fa - fb) ** 2).mean((2, 3)) for lin, fa, fb in zip(self.lins, self._stages(a), self._stages(b)))[:, 0]


@torch.no_grad()
def lpips_distance(images: torch.Tensor, references: torch.Tensor, folder: str | Path, batch_size: int = 32) -> float:
    """Mean LPIPS between each image and its reference (pairs in order), both [N,1,H,W] in [0,1]; lower is closer."""
    if len(images) != len(references):
        raise ValueError(f"LPIPS compares pairs: {len(images)} images against {len(references)} references")
    net = AlexLpips.from_folder(folder)
    values = [net(images[i:i + batch_size].float().repeat(1, 3, 1, 1) * 2 - 1,
                  references[i:i + batch_size].float().repeat(1, 3, 1, 1) * 2 - 1)
              for i in range(0, len(images), batch_size)]
    return float(torch.cat(values).mean())


# ------------------------------------------------------------------------------------------------ availability


def _open_clip_reason() -> str:
    try:
        import open_clip  # noqa: F401
    except Exception as exc:  # ImportError, or torchvision failing to load its operators
        return f"not available: open_clip does not import here ({type(exc).__name__}); it needs torchvision"
    return "not available: the BiomedCLIP loader is not written yet"


def available_metrics(cfg: Any) -> dict[str, str]:
    """``{metric: "ok" or the reason it is not measured}`` for LPIPS, CLIPScore and BioCLIPScore."""
    ev = cfg.evaluation
    out = {"lpips": "ok" if ev.lpips_dir else NOT_OFFLINE + " (set evaluation.lpips_dir)",
           "clip_score": "ok" if ev.clip_dir else NOT_OFFLINE + " (set evaluation.clip_dir)"}
    out["bioclip_score"] = _open_clip_reason() if ev.biomedclip_dir else NOT_OFFLINE + " (set evaluation.biomedclip_dir)"
    return out


def pretrained_metrics(cfg: Any, images: torch.Tensor, prompts: Sequence[str], references: torch.Tensor) -> dict[str, Any]:
    """The paper's LPIPS (image vs the real ROI of the same prompt), CLIPScore and BioCLIPScore (w = 2.5) where
    their weights are local; otherwise the reason, as a string, in place of the number."""
    status = available_metrics(cfg)
    out: dict[str, Any] = {name: reason for name, reason in status.items() if reason != "ok"}
    if status["lpips"] == "ok":
        out["lpips"] = lpips_distance(images, references, cfg.evaluation.lpips_dir)
    if status["clip_score"] == "ok":
        out["clip_score"] = clip_score(images, prompts, cfg.evaluation.clip_dir)
    return out
