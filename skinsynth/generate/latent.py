"""Latent diffusion (Rombach et al., CVPR 2022, "High-resolution image synthesis with latent diffusion models"):
a small diffusers ``AutoencoderKL`` learnt on the real train split, then the class-conditional UNet on its latents.

The autoencoder maps a 3 x S x S image to a 4 x S/4 x S/4 latent (three encoder blocks, two of which halve the
side), so a UNet step on the latent costs a sixteenth of the pixels of one on the image. Its loss is the L1
reconstruction error plus a small KL term towards N(0, I) (the paper's "KL-reg" with weight 1e-6); the perceptual
(LPIPS) and adversarial terms of the paper need pretrained weights that are not available offline, so
reconstructions are softer than the paper's. Latents are scaled by one factor measured on training images, so that
their standard deviation is EDM's sigma_data (0.5), the scale the diffusion objective is tuned for (the paper rescales
to unit variance for its DDPM).

It is a candidate recipe of ``skinsynth bench generator`` (``latent``), measured against the pixel-space ones at the
same CPU time before anything adopts it (docs/results.md#generator-recipes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL

from skinsynth.config import GeneratorConfig
from skinsynth.core.raytrain import grad_scaler, optimizer_step
from skinsynth.errors import SkinsynthError
from skinsynth.generate.diffusion import diffusion_loss, training_noise_scheduler
from skinsynth.generate.model import Conditioning, create_generator

# the autoencoder: three encoder blocks (two downsamplings: 64 px -> 16 px latents), one ResNet layer each
AUTOENCODER_PRESET: dict[str, Any] = {
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
}
LATENT_FACTOR = 2 ** (len(AUTOENCODER_PRESET["block_out_channels"]) - 1)  # image side / latent side
KL_WEIGHT = 1e-6  # Rombach et al. 2022, the KL-regularised autoencoders
LATENT_STD = 0.5  # EDM's sigma_data (Karras et al. 2022): the scaled latents' standard deviation


def _check_batch(images: int, batch_size: int) -> None:
    if images < batch_size:
        raise SkinsynthError(f"{images} training images cannot fill one batch of {batch_size}; lower the batch size")


def create_autoencoder(image_size: int) -> AutoencoderKL:
    """A freshly initialised autoencoder for ``image_size`` px RGB images in [-1, 1].

    Raises:
        SkinsynthError: a side its downsamplings cannot divide.
    """
    if image_size % LATENT_FACTOR or image_size < 4 * LATENT_FACTOR:
        raise SkinsynthError(
            f"the latent autoencoder needs an image side divisible by {LATENT_FACTOR} and at least "
            f"{4 * LATENT_FACTOR} px, got {image_size}"
        )
    return AutoencoderKL(in_channels=3, out_channels=3, sample_size=image_size, **AUTOENCODER_PRESET)


def autoencoder_loss(autoencoder: AutoencoderKL, x: torch.Tensor, kl_weight: float = KL_WEIGHT) -> torch.Tensor:
    """L1 reconstruction error of a posterior sample plus ``kl_weight`` x its KL divergence from N(0, I)."""
    posterior = autoencoder.encode(x).latent_dist
    reconstruction = autoencoder.decode(posterior.sample()).sample
    return (reconstruction - x).abs().mean() + kl_weight * posterior.kl().mean() / x[0].numel()


def train_autoencoder(
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[str], None] = print,
    log_every: int = 100,
) -> tuple[AutoencoderKL, list[dict[str, float]]]:
    """Train an autoencoder on ``images`` (float, [-1, 1], (N, 3, S, S)) for ``steps`` AdamW steps of seeded random
    batches (``augment``: a per-batch transform such as the generator's dihedral turns). Returns it in eval mode, and
    the loss history."""
    _check_batch(len(images), batch_size)
    torch.manual_seed(seed)
    autoencoder = create_autoencoder(images.shape[-1])
    optimiser = torch.optim.AdamW(autoencoder.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    history: list[dict[str, float]] = []
    window, start = 0.0, time.perf_counter()
    autoencoder.train()
    for step in range(1, steps + 1):
        batch = images[torch.from_numpy(rng.choice(len(images), size=batch_size, replace=False))]
        if augment is not None:
            batch = augment(batch)
        loss = autoencoder_loss(autoencoder, batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        window += float(loss.detach())
        if step % log_every == 0 or step == steps:
            count = log_every if step % log_every == 0 else step % log_every
            elapsed = time.perf_counter() - start
            history.append({"step": step, "loss": window / count, "images_per_s": count * batch_size / elapsed})
            progress(f"autoencoder: step {step}/{steps}  loss {history[-1]['loss']:.4f}")
            window, start = 0.0, time.perf_counter()
    return autoencoder.eval(), history


@torch.no_grad()
def latent_scale(autoencoder: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> float:
    """The factor that gives the posterior means of ``images`` a standard deviation of :data:`LATENT_STD`."""
    means = torch.cat([autoencoder.encode(b).latent_dist.mode() for b in images.split(batch_size)])
    return LATENT_STD / float(means.std())


@torch.no_grad()
def encode(autoencoder: AutoencoderKL, images: torch.Tensor, scale: float, batch_size: int = 64) -> torch.Tensor:
    """Scaled posterior means of ``images`` (float, [-1, 1]): the latents the UNet learns."""
    return torch.cat([autoencoder.encode(b).latent_dist.mode() * scale for b in images.split(batch_size)])


@torch.no_grad()
def decode(autoencoder: AutoencoderKL, latents: torch.Tensor, scale: float, batch_size: int = 64) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents."""
    return torch.cat([autoencoder.decode(z / scale).sample for z in latents.split(batch_size)]).clamp(-1.0, 1.0)


def train_latent_generator(
    latents: torch.Tensor,
    labels: torch.Tensor,
    gc: GeneratorConfig,
    *,
    steps: int,
    progress: Callable[[str], None] = print,
    log_every: int = 100,
) -> tuple[torch.nn.Module, Conditioning, list[dict[str, float]]]:
    """The class-conditional UNet of ``gc`` (preset, objective, learning rate, warm-up, EMA, label dropout) trained on
    scaled ``latents`` (N, C, s, s) with class ``labels`` (N,) for ``steps`` steps of seeded random batches, in one
    process. Returns the EMA weights in eval mode, the conditioning map (at the latent side) and the loss history."""
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    _check_batch(len(latents), gc.batch_size)
    torch.manual_seed(gc.seed)
    unet, conditioning = create_generator(gc, latents.shape[-1], channels=latents.shape[1])
    joint = torch.as_tensor([conditioning.index(int(label)) for label in labels])  # class only: no tones here
    ema = EMAModel(unet.parameters(), decay=gc.ema_decay, use_ema_warmup=True, power=3 / 4)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=gc.lr, weight_decay=0.0)
    schedule = get_constant_schedule_with_warmup(optimiser, num_warmup_steps=gc.warmup_steps)
    scaler = grad_scaler(None)
    scheduler = training_noise_scheduler(gc.num_train_timesteps, gc.prediction)
    rng = np.random.default_rng(gc.seed)
    history: list[dict[str, float]] = []
    window, start = 0.0, time.perf_counter()
    unet.train()
    for step in range(1, steps + 1):
        batch = torch.from_numpy(rng.choice(len(latents), size=gc.batch_size, replace=False))
        loss = diffusion_loss(unet, scheduler, latents[batch], joint[batch], conditioning.null_index, gc)
        scaler.scale(loss).backward()
        optimizer_step(unet, optimiser, scaler, schedule)
        ema.step(unet.parameters())
        window += float(loss.detach())
        if step % log_every == 0 or step == steps:
            count = log_every if step % log_every == 0 else step % log_every
            elapsed = time.perf_counter() - start
            history.append({"step": step, "loss": window / count, "images_per_s": count * gc.batch_size / elapsed})
            progress(f"latent generator: step {step}/{steps}  loss {history[-1]['loss']:.4f}")
            window, start = 0.0, time.perf_counter()
    ema.copy_to(unet.parameters())
    return unet.eval(), conditioning, history
