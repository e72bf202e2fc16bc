"""The generator: a class-conditional ``diffusers.UNet2DModel`` trained from scratch as a DDPM.

DDPM (Ho et al. 2020, "Denoising diffusion probabilistic models"): the UNet predicts the noise added to an image at
one of ``num_train_timesteps`` levels. Conditioning: ``UNet2DModel`` takes one integer label per image and adds its
learned embedding to the timestep embedding (``num_class_embeds``). The class - and, with tone conditioning, the
estimated ITA skin-tone group - map to one joint index; each factor has an extra "null" entry, the unconditional
token of classifier-free guidance (Ho & Salimans 2022, "Classifier-free diffusion guidance").

A saved generator is a folder: ``unet/`` (``save_pretrained``: config + safetensors, the EMA weights) and
``conditioning.json`` (classes, tones, image size); nothing is ever downloaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel

from skinsynth.config import GeneratorConfig
from skinsynth.core.raytrain import unwrap_model
from skinsynth.data.schema import CLASSES, TONES
from skinsynth.errors import SkinsynthError

# UNet sizes. tiny: tests and CPU smoke runs (a few seconds per hundred steps); small: CPU runs worth looking at;
# base/large: GPU-sized, attention at the two lowest resolutions as in the DDPM paper's 32-64 px models.
SIZE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "add_attention": False,
    },
    "small": {
        "block_out_channels": (32, 64, 128),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
        "attention_head_dim": 32,
    },
    "base": {
        "block_out_channels": (64, 128, 256, 256),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
        "attention_head_dim": 32,
    },
    "large": {
        "block_out_channels": (128, 256, 384, 512),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
        "attention_head_dim": 64,
    },
}
UNET_DIR = "unet"
CONDITIONING_FILE = "conditioning.json"


class GeneratorError(SkinsynthError, ValueError):
    """A generator that cannot be built, loaded or conditioned as asked."""


@dataclass(frozen=True)
class Conditioning:
    """How (class, tone) pairs map to the UNet's single label index, null entries included."""

    classes: tuple[str, ...] = CLASSES
    tones: tuple[str, ...] = ()  # empty: class conditioning only
    image_size: int = 64  # the side the UNet works at
    output_size: int = 0  # the side samples are delivered at (the data's); 0 = image_size

    @property
    def sample_size(self) -> int:
        """The side of the images the generator delivers (its training data's side)."""
        return self.output_size or self.image_size

    @property
    def num_embeddings(self) -> int:
        return (len(self.classes) + 1) * (len(self.tones) + 1)

    @property
    def null_index(self) -> int:
        """The unconditional token (null class and, with tones, null tone)."""
        return self.index(len(self.classes), len(self.tones) if self.tones else None)

    def index(self, label: int | torch.Tensor, tone: int | torch.Tensor | None = None) -> Any:
        """Joint label of class ``label`` and tone group ``tone`` (``len(tones)`` = tone unknown/null)."""
        if not self.tones:
            if tone is not None:
                raise GeneratorError("a tone was given to a generator trained without tone conditioning")
            return label
        if tone is None:
            tone = len(self.tones)
        return label * (len(self.tones) + 1) + tone

    def tone_index(self, tone: str | None) -> int:
        """Position of a tone group name; unknown or missing tones map to the null tone."""
        return self.tones.index(tone) if tone in self.tones else len(self.tones)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "classes": list(self.classes), "tones": list(self.tones)}


def check_image_size(size: int, preset: str) -> None:
    """Each down block halves the image; the side must survive that exactly."""
    factor = 2 ** (len(SIZE_PRESETS[preset]["block_out_channels"]) - 1)
    if size < 8 or size % factor:
        raise GeneratorError(
            f"generator size '{preset}' needs an image side of at least 8 px divisible by {factor}; got {size} px "
            "(prepare the data at such a size, or set generator.image_size, e.g. 32 or 64)"
        )


def generator_side(cfg: GeneratorConfig, data_size: int) -> int:
    """The side the UNet works at for data prepared at ``data_size`` px (``generator.image_size``, 0 = the data's).

    Raises:
        GeneratorError: a side above the data's (it would invent pixels) or one the preset cannot downsample.
    """
    side = cfg.image_size or data_size
    if side > data_size:
        raise GeneratorError(
            f"generator.image_size {side} is above the prepared data's side of {data_size} px: the generator can "
            f"learn at the data's side or below it (e.g. {data_size // 2})"
        )
    if cfg.size in SIZE_PRESETS:
        check_image_size(side, cfg.size)
    return side


def create_generator(
    cfg: GeneratorConfig, image_size: int, output_size: int = 0, channels: int = 3
) -> tuple[UNet2DModel, Conditioning]:
    """A freshly initialised conditional UNet for ``image_size`` px RGB images (or latents of ``channels``), and its
    conditioning map (``output_size``: the side samples are delivered at, when larger).

    Raises:
        GeneratorError: an unknown preset or an image size the preset cannot downsample.
    """
    if cfg.size not in SIZE_PRESETS:
        raise GeneratorError(f"unknown generator size '{cfg.size}' (known: {', '.join(SIZE_PRESETS)})")
    check_image_size(image_size, cfg.size)
    conditioning = Conditioning(
        tones=TONES if cfg.tone_conditioning else (),
        image_size=image_size,
        output_size=output_size if output_size and output_size != image_size else 0,
    )
    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        num_class_embeds=conditioning.num_embeddings,
        **SIZE_PRESETS[cfg.size],
    )
    return unet, conditioning


def predict_noise(
    unet: UNet2DModel, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """The UNet's noise prediction; class labels for a model without class embeddings are an error, not ignored.

    (``UNet2DModel`` itself would silently drop them, and an "unconditional" model would pass for a conditional one.)
    """
    # DDP-wrapped in training: inspect the inner model, but call the wrapper (it synchronises gradients)
    if labels is not None and getattr(unwrap_model(unet), "class_embedding", None) is None:
        raise GeneratorError(
            "class labels were passed to a UNet without class embeddings (num_class_embeds is not set); "
            "build it with skinsynth.generate.model.create_generator"
        )
    return unet(noisy, timesteps, class_labels=labels).sample


def save_generator(unet: UNet2DModel, conditioning: Conditioning, directory: str | Path) -> Path:
    """Write ``unet/`` and ``conditioning.json`` into ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(directory / UNET_DIR, safe_serialization=True)
    (directory / CONDITIONING_FILE).write_text(json.dumps(conditioning.to_json(), indent=2))
    return directory


def load_generator(directory: str | Path) -> tuple[UNet2DModel, Conditioning]:
    """A saved generator in eval mode (local files only).

    Raises:
        GeneratorError: the folder holds no generator.
    """
    directory = Path(directory)
    if not (directory / UNET_DIR / "config.json").is_file() or not (directory / CONDITIONING_FILE).is_file():
        raise GeneratorError(f"no trained generator at {directory}: run 'skinsynth generate train' first")
    # low_cpu_mem_usage=False: the default path wants the optional `accelerate` package and warns without it
    unet = UNet2DModel.from_pretrained(directory / UNET_DIR, local_files_only=True, low_cpu_mem_usage=False)
    return unet.eval(), read_conditioning(directory)


def read_conditioning(directory: str | Path) -> Conditioning:
    """A saved generator's conditioning map (``conditioning.json``), without loading its weights."""
    info = json.loads((Path(directory) / CONDITIONING_FILE).read_text())
    return Conditioning(
        classes=tuple(info["classes"]),
        tones=tuple(info["tones"]),
        image_size=int(info["image_size"]),
        output_size=int(info.get("output_size", 0)),  # generators saved before generator.image_size existed: 0
    )
