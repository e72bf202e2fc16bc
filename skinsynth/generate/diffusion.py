"""Diffusion primitives shared by generator training, sampling and the audit: the noise schedule the generator is
trained with, the sampling schedulers over it, seeded starting noise, the guided denoising loop, and the pixel range
conversions.

The stock diffusers pipelines take no class labels, so the reverse loop is written out here (``denoise``): DDIM
(Song et al. 2021, "Denoising diffusion implicit models", eta = 0) or DPM-Solver++ (Lu et al. 2022, "DPM-Solver++:
fast solver for guided sampling") from the diffusers schedulers, with classifier-free guidance
(Ho & Salimans 2022): ``out = out_uncond + w * (out_cond - out_uncond)``, on whatever the network predicts.

The training objective has two settings (``generator.prediction``, ``generator.loss_weighting``): the network
predicts the noise eps (Ho et al. 2020) or the velocity v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022,
"Progressive distillation for fast sampling of diffusion models"), and the per-image squared error is weighted
uniformly or by min-SNR-gamma (Hang et al. 2023, "Efficient diffusion training via min-SNR weighting strategy"),
which stops the nearly noise-free levels, easy and numerous, from dominating the gradient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import compute_snr

from skinsynth.errors import SkinsynthError
from skinsynth.generate.model import predict_noise

SCHEDULER_DIR = "scheduler"  # the noise schedule's folder inside a saved generator
PREDICTIONS = ("epsilon", "v_prediction")


def training_noise_scheduler(num_train_timesteps: int, prediction: str = "epsilon") -> DDPMScheduler:
    """The DDPM forward process the generator is trained with: cosine schedule (Nichol & Dhariwal 2021,
    "Improved denoising diffusion probabilistic models"), better than linear at 32-128 px. ``prediction`` (epsilon
    or v_prediction) is saved with it, so the samplers read the network's output as it was trained."""
    if prediction not in PREDICTIONS:
        raise SkinsynthError(f"unknown generator prediction '{prediction}' (known: {', '.join(PREDICTIONS)})")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2", prediction_type=prediction
    )


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network learns to output for ``x0`` noised with ``noise`` to levels ``t``: eps, or v."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def loss_weights(scheduler: DDPMScheduler, t: torch.Tensor, weighting: str, snr_gamma: float) -> torch.Tensor:
    """Per-image weights of the squared error at levels ``t``.

    min-SNR-gamma (Hang et al. 2023) weights the x0 error by min(SNR, gamma); expressed on the network's own target
    that is min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v, where SNR = abar / (1 - abar).
    """
    if weighting == "uniform":
        return torch.ones(t.shape, device=t.device)
    if weighting != "min_snr":
        raise SkinsynthError(f"unknown generator loss_weighting '{weighting}' (known: uniform, min_snr)")
    snr = compute_snr(scheduler, t)
    capped = snr.clamp(max=snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return capped / (snr + 1.0)
    return capped / snr


def predicted_noise(
    unet: torch.nn.Module, scheduler: Any, noisy: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor:
    """The network's estimate of the noise in ``noisy`` at levels ``t``, whatever it predicts (the membership
    attacks score noise estimates). From v: eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
    out = predict_noise(unet, noisy, t, labels).float()
    if scheduler.config.prediction_type != "v_prediction":
        return out
    abar = scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
    return abar.sqrt() * out + (1.0 - abar).sqrt() * noisy.float()


def sampling_scheduler(train_scheduler_config: Any, sampler: str):
    """A fresh DDIM or DPM-Solver++ scheduler over the training noise schedule (schedulers hold per-run state).

    DPM-Solver++ is set up as DDIM is: its steps start one stride below the last noise level ("leading" spacing,
    not diffusers' default "linspace", which starts at level 999) and its data estimate is clipped to the pixel range
    (static thresholding at 1, Lu et al. 2022's advice for pixel-space models). The cosine schedule leaves
    alpha_bar below 1e-4 at its last levels (2e-9 at 999), and the data estimate there divides the network's error by
    its square root: unclipped and started at 999, most samples of a trained phantom generator came out as saturated
    colour noise.
    """
    if sampler == "ddim":
        return DDIMScheduler.from_config(train_scheduler_config)  # clip_sample (to [-1, 1]) from the DDPM config
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(
            train_scheduler_config,
            algorithm_type="dpmsolver++",
            timestep_spacing="leading",
            thresholding=True,
            sample_max_value=1.0,  # with a maximum of 1, dynamic thresholding is clipping to [-1, 1]
        )
    raise SkinsynthError(f"unknown sampler '{sampler}' (known: ddim, dpm)")


def initial_noise(seeds: list[int], image_size: int) -> torch.Tensor:
    """One N(0, I) image per seed, each drawn from its own generator (so an image never depends on its batch)."""
    return torch.stack(
        [torch.randn(3, image_size, image_size, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


@torch.no_grad()
def denoise(
    unet: torch.nn.Module,
    scheduler: Any,
    noise: torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` for ``steps`` steps with classifier-free guidance.

    Args:
        unet: the conditional UNet (eval mode).
        scheduler: a fresh sampling scheduler (:func:`sampling_scheduler`).
        noise: (N, 3, H, W) starting noise on the UNet's device.
        labels: (N,) joint conditioning indices (:class:`Conditioning`).
        null_label: the unconditional index.
        steps: denoising steps.
        guidance: guidance scale ``w``; 1 is the conditional model alone (half the work).

    Returns:
        Images in [-1, 1], (N, 3, H, W).
    """
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    guided = guidance != 1.0
    uncond = torch.full_like(labels, null_label)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        timestep = torch.full((model_in.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = predict_noise(unet, model_in, timestep, torch.cat([labels, uncond]) if guided else labels)
        if guided:  # linear in the output, so the same for eps and v
            out_cond, out_uncond = out.float().chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        x = scheduler.step(out.float(), t, x).prev_sample
    return x.clamp(-1.0, 1.0)


def from_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float [-1, 1], the pixel range the generator is trained and scored in."""
    return images.float().div(127.5).sub(1.0)


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    return ((x.float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def training_scheduler_config(generator_dir: Path) -> Any:
    """The DDPM noise schedule a saved generator was trained with (what its samplers must use)."""
    return DDPMScheduler.from_pretrained(generator_dir / SCHEDULER_DIR, local_files_only=True).config
