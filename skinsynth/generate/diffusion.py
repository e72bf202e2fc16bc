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

``prediction: edm`` is the preconditioning of Karras et al. 2022 ("Elucidating the design space of diffusion-based
generative models", Table 1): images are noised as x = x0 + sigma n with ln sigma ~ N(-1.2, 1.2^2), the network F sees
c_in x at c_noise = ln(sigma) / 4, the denoiser is D = c_skip x + c_out F, and F learns (x0 - c_skip x) / c_out,
which is the paper's lambda(sigma)-weighted loss on D with unit weight on F. Its samplers are diffusers'
``EDMEulerScheduler`` (Euler on the probability-flow ODE, what DDIM is in EDM's coordinates) and
``EDMDPMSolverMultistepScheduler`` over the paper's rho = 7 noise levels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
)
from diffusers.training_utils import compute_snr

from skinsynth.errors import SkinsynthError
from skinsynth.generate.model import predict_noise

SCHEDULER_DIR = "scheduler"  # the noise schedule's folder inside a saved generator
PREDICTIONS = ("epsilon", "v_prediction", "edm")
# EDM's training distribution of noise levels and the data's standard deviation (Karras et al. 2022, Table 1)
EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_DATA = -1.2, 1.2, 0.5


def is_edm(scheduler_config: Any) -> bool:
    """Whether a saved noise schedule is EDM's (sigma levels) rather than a DDPM one (alpha_bar levels)."""
    return scheduler_config.get("_class_name") == EDMEulerScheduler.__name__ or "sigma_data" in scheduler_config


def training_noise_scheduler(num_train_timesteps: int, prediction: str = "epsilon") -> Any:
    """The forward process the generator is trained with, saved with it so the samplers read its output as it was
    trained. DDPM: cosine schedule (Nichol & Dhariwal 2021, "Improved denoising diffusion probabilistic models"),
    better than linear at 32-128 px, with eps or v prediction. ``edm``: EDM's sigma levels and preconditioning."""
    if prediction not in PREDICTIONS:
        raise SkinsynthError(f"unknown generator prediction '{prediction}' (known: {', '.join(PREDICTIONS)})")
    if prediction == "edm":
        return EDMEulerScheduler(
            sigma_min=0.002, sigma_max=80.0, sigma_data=EDM_SIGMA_DATA, num_train_timesteps=num_train_timesteps
        )
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2", prediction_type=prediction
    )


def check_objective(prediction: str, weighting: str) -> None:
    """Refuse a loss weighting that does not apply to ``prediction`` (before any worker starts).

    Raises:
        SkinsynthError: min-SNR weighting with EDM, which weights its noise levels itself.
    """
    if prediction == "edm" and weighting != "uniform":
        raise SkinsynthError(
            f"generator.loss_weighting '{weighting}' does not apply to prediction 'edm', which weights its noise "
            "levels itself (Karras et al. 2022): set generator.loss_weighting=uniform, or generator.prediction to "
            "epsilon or v_prediction"
        )


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a DDPM network learns to output for ``x0`` noised with ``noise`` to levels ``t``: eps, or v."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def edm_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's preconditioning at noise levels ``sigma`` (N,): c_in, c_skip, c_out (each (N, 1, 1, 1)) and c_noise."""
    s = sigma.view(-1, 1, 1, 1)
    total = s**2 + EDM_SIGMA_DATA**2
    return total.rsqrt(), EDM_SIGMA_DATA**2 / total, s * EDM_SIGMA_DATA * total.rsqrt(), sigma.log() / 4


def diffusion_loss(
    model: torch.nn.Module,
    scheduler: Any,
    x0: torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    gc: Any,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The generator's loss on one batch: label dropout (a ``gc.label_dropout`` share of ``labels`` become the null
    token, which trains the unconditional model of classifier-free guidance; Ho & Salimans 2022), then the
    objective's noised input, target and weights (:func:`training_batch`) and their weighted squared error."""
    drop = torch.rand(labels.shape, device=labels.device) < gc.label_dropout
    labels = torch.where(drop, torch.full_like(labels, null_label), labels)
    noisy, t, target, weights = training_batch(scheduler, x0, torch.randn_like(x0), gc.loss_weighting, gc.snr_gamma)
    with torch.autocast(x0.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = predict_noise(model, noisy, t, labels).float()
    return (weights * (out - target).pow(2).flatten(1).mean(dim=1)).mean()


def training_batch(
    scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, weighting: str, snr_gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of the objective: ``(network input, its timesteps, the network's target, per-image weights)``.

    DDPM: ``x0`` noised to uniform levels t, target eps or v, weights from ``weighting``. EDM: ``x0`` noised to
    log-normal sigma, the input scaled by c_in at c_noise, target (x0 - c_skip x) / c_out, unit weights (EDM's own
    weighting; min_snr does not apply and is refused).
    """
    n, device = x0.shape[0], x0.device
    if isinstance(scheduler, EDMEulerScheduler):
        check_objective("edm", weighting)
        sigma = (torch.randn(n, device=device) * EDM_P_STD + EDM_P_MEAN).exp()
        c_in, c_skip, c_out, c_noise = edm_coefficients(sigma)
        noisy = x0 + sigma.view(-1, 1, 1, 1) * noise
        return noisy * c_in, c_noise, (x0 - c_skip * noisy) / c_out, torch.ones(n, device=device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), device=device)
    target = training_target(scheduler, x0, noise, t)
    return scheduler.add_noise(x0, noise, t), t, target, loss_weights(scheduler, t, weighting, snr_gamma)


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
    """The network's estimate of the noise in ``noisy`` at DDPM levels ``t`` of ``scheduler``, whatever it predicts
    (the membership attacks score noise estimates). From v: eps = sqrt(abar) v + sqrt(1 - abar) x_t. An EDM network
    (``scheduler`` from :func:`attack_scheduler`) sees x_t as the equivalent x = x_t / sqrt(abar) at
    sigma = sqrt((1 - abar) / abar) (Karras et al. 2022, Table 1), and eps = (x - D(x)) / sigma."""
    abar = scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "edm":
        sigma = ((1.0 - abar) / abar).sqrt().flatten()
        x = noisy.float() / abar.sqrt()
        c_in, c_skip, c_out, c_noise = edm_coefficients(sigma)
        denoised = c_skip * x + c_out * predict_noise(unet, x * c_in, c_noise, labels).float()
        return (x - denoised) / sigma.view(-1, 1, 1, 1)
    out = predict_noise(unet, noisy, t, labels).float()
    if scheduler.config.prediction_type != "v_prediction":
        return out
    return abar.sqrt() * out + (1.0 - abar).sqrt() * noisy.float()


def attack_scheduler(scheduler_config: Any) -> DDPMScheduler:
    """The DDPM schedule the membership attacks noise images with: the generator's own, or for an EDM generator the
    cosine schedule read through EDM's coordinates (marked ``prediction_type='edm'`` for :func:`predicted_noise`)."""
    if is_edm(scheduler_config):
        return DDPMScheduler(
            num_train_timesteps=int(scheduler_config["num_train_timesteps"]),
            beta_schedule="squaredcos_cap_v2",
            prediction_type="edm",
        )
    return DDPMScheduler.from_config(scheduler_config)


def sampling_scheduler(train_scheduler_config: Any, sampler: str):
    """A fresh DDIM or DPM-Solver++ scheduler over the training noise schedule (schedulers hold per-run state); for
    an EDM generator, Euler (EDM's DDIM) or DPM-Solver++(2M) over EDM's sigma levels.

    DPM-Solver++ is set up as DDIM is: its steps start one stride below the last noise level ("leading" spacing,
    not diffusers' default "linspace", which starts at level 999) and its data estimate is clipped to the pixel range
    (static thresholding at 1, Lu et al. 2022's advice for pixel-space models). The cosine schedule leaves
    alpha_bar below 1e-4 at its last levels (2e-9 at 999), and the data estimate there divides the network's error by
    its square root: unclipped and started at 999, most samples of a trained phantom generator came out as saturated
    colour noise.
    """
    if is_edm(train_scheduler_config):
        if sampler == "ddim":
            return EDMEulerScheduler.from_config(train_scheduler_config)
        if sampler == "dpm":
            return EDMDPMSolverMultistepScheduler.from_config(train_scheduler_config, algorithm_type="dpmsolver++")
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


def initial_noise(seeds: list[int], image_size: int, channels: int = 3) -> torch.Tensor:
    """One N(0, I) image (or latent) per seed, each drawn from its own generator (so an image never depends on its
    batch)."""
    return torch.stack(
        [torch.randn(channels, image_size, image_size, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
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
    clip: bool = True,
) -> torch.Tensor:
    """Run the reverse process from ``noise`` for ``steps`` steps with classifier-free guidance.

    Args:
        unet: the conditional UNet (eval mode).
        scheduler: a fresh sampling scheduler (:func:`sampling_scheduler`).
        noise: (N, C, H, W) starting noise on the UNet's device (C = 3, or a latent generator's channels).
        labels: (N,) joint conditioning indices (:class:`Conditioning`).
        null_label: the unconditional index.
        steps: denoising steps.
        guidance: guidance scale ``w``; 1 is the conditional model alone (half the work).
        clip: clamp the result to the pixel range (off for latents, which have none).

    Returns:
        Images in [-1, 1], (N, 3, H, W) (latents, unclamped, without ``clip``).
    """
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    guided = guidance != 1.0
    uncond = torch.full_like(labels, null_label)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        timestep = t.to(x.device).expand(model_in.shape[0])  # an integer level, or EDM's c_noise
        out = predict_noise(unet, model_in, timestep, torch.cat([labels, uncond]) if guided else labels)
        if guided:  # linear in the output, so the same for eps and v
            out_cond, out_uncond = out.float().chunk(2)
            out = out_uncond + guidance * (out_cond - out_uncond)
        x = scheduler.step(out.float(), t, x).prev_sample
    return x.clamp(-1.0, 1.0) if clip else x


def from_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float [-1, 1], the pixel range the generator is trained and scored in."""
    return images.float().div(127.5).sub(1.0)


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    return ((x.float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_generator_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (N, 3, H, W) area-averaged down to the generator's side ``size`` (unchanged when already there).

    Area averaging (antialiased bilinear) keeps a lesion's colours and soft edges at the lower side instead of
    aliasing its fine network into moire."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def to_output_side(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) samples resized up to ``size`` (bicubic; unchanged when already there), the data's side."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    return np.stack([cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC) for img in images])


def generate_images(
    unet: torch.nn.Module,
    scheduler_config: Any,
    sampler: str,
    labels: list[int],
    seeds: list[int],
    *,
    image_size: int,
    output_size: int,
    null_label: int,
    steps: int,
    guidance: float,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """uint8 (N, H, W, 3) samples at ``output_size``: noise from ``seeds`` at the generator's ``image_size``, the
    reverse process of ``sampler`` (:func:`sampling_scheduler`) under the joint conditioning ``labels``, resized up
    to the data's side (:func:`to_output_side`). One image depends on its seed and label alone, never on its batch.
    A latent generator's ``decoder`` turns its latents into images in [-1, 1]."""
    device = next(unet.parameters()).device
    noise = initial_noise(seeds, image_size, unet.config.in_channels).to(device)
    cond = torch.as_tensor(labels, dtype=torch.long, device=device)
    scheduler = sampling_scheduler(scheduler_config, sampler)
    images = denoise(unet, scheduler, noise, cond, null_label, steps, guidance, clip=decoder is None)
    return to_output_side(to_uint8_images(images if decoder is None else decoder(images)), output_size)


def training_scheduler_config(generator_dir: Path) -> Any:
    """The noise schedule a saved generator was trained with (what its samplers must use): DDPM's or EDM's."""
    config = DDPMScheduler.load_config(generator_dir / SCHEDULER_DIR, local_files_only=True)
    scheduler = EDMEulerScheduler if is_edm(config) else DDPMScheduler
    return scheduler.from_config(config).config
