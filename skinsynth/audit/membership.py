"""Membership inference against the generator: holding its weights, can an attacker tell the images it was trained
on (members) from unseen images of the same kind (non-members)?

Two white-box attacks score every image, lower meaning "member":

- **loss**: the noise-prediction error at fixed noise levels, averaged over several seeded noise draws per level
  (Matsumoto et al. 2023, "Membership inference attacks against diffusion models"; Carlini et al. 2023,
  "Extracting training data from diffusion models"). A generator fits its training images better than unseen ones.
- **PIA**: the proximal initialisation attack (Kong et al. 2024, "An efficient membership inference attack for the
  diffusion model by proximal initialization", ICLR 2024). The model's own output at t = 0, eps0 = eps_theta(x0, 0),
  stands in for the noise: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps0, and the score is the l_p distance (p = 4,
  the paper's choice for images) between eps_theta(x_t, t) and eps0. A member's x_t lies near the trajectory the
  model learnt for it, so its prediction comes back to eps0; no noise is drawn, so the score is deterministic.

Both are conditioned on the image's true class, as the generator was trained. Each attack is reported as ROC AUC and
TPR at 1% FPR (Carlini et al. 2022, "Membership inference attacks from first principles": an attack that identifies
a few members with confidence matters even at average-case chance), with 95% intervals from a stratified bootstrap
over members and non-members, overall and per class: a rare class has few training images per class embedding, and
a generator may memorise exactly those.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from skinsynth.audit.features import AuditError
from skinsynth.data.schema import CLASSES

# fewer members or non-members of a class than this and its AUC is not reported: with 5 against 5 the bootstrap
# interval spans most of [0, 1], and one member ranked differently moves the AUC by up to 0.2
MIN_PER_CLASS = 10
PIA_NORM = 4  # Kong et al. 2024 found l_4 separates best on images (the deviation concentrates in a few pixels)
# the noise levels, as fractions of the schedule: the loss attack looks over the first half (near t = T the input is
# almost pure noise and members and non-members look alike); PIA stays at small t, where its x_t is proximal to x0
# (public PIA attack scripts score t = 20-200 of 1,000): further out x_t = sqrt(abar) x0 + sqrt(1 - abar) eps0 is
# unlike any training input once eps0 is small, as it is for a memorised image, and the gap closes or turns over
LOSS_LEVELS = (0.02, 0.5)
PIA_LEVELS = (0.02, 0.2)

ATTACK_NAMES = {"loss": "loss (Matsumoto et al. 2023)", "pia": "PIA (Kong et al. 2024)"}  # for reasons and lines
METHODS = {
    "loss": "loss attack: mean squared noise-prediction error over seeded noise draws at fixed noise levels, "
    "conditioned on the true class (Matsumoto et al. 2023, 'Membership inference attacks against diffusion models'; "
    "Carlini et al. 2023)",
    "pia": f"PIA: l_{PIA_NORM} distance between eps_theta(x_t, t) and the model's own eps0 = eps_theta(x0, 0), with "
    "x_t built from eps0 and no random noise, conditioned on the true class (Kong et al. 2024, 'An efficient "
    "membership inference attack for the diffusion model by proximal initialization', ICLR 2024)",
}


def attack_levels(scheduler, timesteps: int, span: tuple[float, float] = LOSS_LEVELS) -> np.ndarray:
    """``timesteps`` noise levels evenly spaced over ``span`` (fractions of the schedule; duplicates dropped)."""
    total = scheduler.config.num_train_timesteps
    return np.unique(np.linspace(total * span[0], total * span[1], timesteps).astype(np.int64))


def _batches(conditioning, images: np.ndarray, labels: np.ndarray, batch_size: int):
    from skinsynth.generate.diffusion import from_uint8_images, to_generator_side

    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start : start + batch_size])
        # as the generator saw its training images: at its own side
        x0 = to_generator_side(from_uint8_images(torch.from_numpy(batch).permute(0, 3, 1, 2)), conditioning.image_size)
        joint = torch.as_tensor([conditioning.index(int(lab)) for lab in labels[start : start + batch_size]])
        yield x0, joint


def _device_of(unet: torch.nn.Module) -> torch.device:
    return next(unet.parameters()).device


def denoising_errors(
    unet: torch.nn.Module,
    conditioning,
    scheduler,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    timesteps: int,
    draws: int = 1,
    seed: int = 0,
    batch_size: int = 32,
) -> np.ndarray:
    """The loss attack's score: each image's mean squared noise-prediction error, averaged over ``draws`` noise draws
    at each of ``timesteps`` noise levels over 2-50% of the schedule, conditioned on its true class. Lower = member.

    Every (draw, level) has one seeded noise image shared by all images: members and non-members then differ only by
    the image (common random numbers), the scores do not depend on the batch size, and a run with more draws extends
    one with fewer (draw d is the same in both).

    Args:
        images: uint8 (N, H, W, 3) at the data's side (the attack brings them to the generator's).
        labels: class indices (``CLASSES``), one per image.
        draws: noise draws per level: the attack estimates the expected loss over the noise, and one draw leaves
            the score as noisy as that one noise image.

    Returns:
        float (N,) errors.
    """
    from skinsynth.generate.diffusion import predicted_noise

    if draws < 1:
        raise AuditError(f"the loss attack needs at least one noise draw per level, not {draws}")
    levels = attack_levels(scheduler, timesteps)
    device = _device_of(unet)
    side = conditioning.image_size  # the attack works at the generator's side (images are brought down to it)
    shape = (1, 3, side, side)
    # drawn once, on the CPU generator (the same numbers on any device)
    noises = {
        (d, int(level)): torch.randn(shape, generator=torch.Generator().manual_seed(_draw_seed(seed, d, int(level))))
        for d in range(draws)
        for level in levels
    }
    errors = []
    with torch.no_grad():
        for x0, joint in _batches(conditioning, images, labels, batch_size):
            x0, joint = x0.to(device), joint.to(device)
            err = torch.zeros(len(x0), device=device)
            for (_, level), noise in noises.items():
                noise = noise.to(device).expand_as(x0)
                t = torch.full((len(x0),), level, dtype=torch.long, device=device)
                pred = predicted_noise(unet, scheduler, scheduler.add_noise(x0, noise, t), t, joint)
                err += (pred - noise).pow(2).flatten(1).mean(dim=1)
            errors.append((err / len(noises)).cpu())
    return torch.cat(errors).numpy()


def _draw_seed(seed: int, draw: int, level: int) -> int:
    return (seed * 1_000_003 + draw) * 10_007 + level


def proximal_initialisation_errors(
    unet: torch.nn.Module,
    conditioning,
    scheduler,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    timesteps: int,
    batch_size: int = 32,
    p: int = PIA_NORM,
) -> np.ndarray:
    """PIA's score (Kong et al. 2024): mean over pixels of |eps_theta(x_t, t) - eps0|^p, averaged over ``timesteps``
    noise levels over 2-20% of the schedule, where eps0 = eps_theta(x0, 0) and
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps0. Lower = member.

    The paper reports one t at a time; the average over its range spares choosing t per generator (the best one
    moves with the schedule and the training length) and costs 1 + ``timesteps`` model calls per image.
    Deterministic: no noise is drawn.

    Args:
        images: uint8 (N, H, W, 3) at the data's side (the attack brings them to the generator's).
        labels: class indices (``CLASSES``), one per image.
        p: the norm (the paper's 4). The mean p-th power per pixel orders images as the l_p distance does at one
            t.

    Returns:
        float (N,) scores.
    """
    from skinsynth.generate.diffusion import predicted_noise

    levels = attack_levels(scheduler, timesteps, PIA_LEVELS)
    device = _device_of(unet)
    scores = []
    with torch.no_grad():
        for x0, joint in _batches(conditioning, images, labels, batch_size):
            x0, joint = x0.to(device), joint.to(device)
            eps0 = predicted_noise(unet, scheduler, x0, torch.zeros(len(x0), dtype=torch.long, device=device), joint)
            score = torch.zeros(len(x0), device=device)
            for level in levels:
                t = torch.full((len(x0),), int(level), dtype=torch.long, device=device)
                pred = predicted_noise(unet, scheduler, scheduler.add_noise(x0, eps0, t), t, joint)
                score += (pred - eps0).abs().pow(p).flatten(1).mean(dim=1)
            scores.append((score / len(levels)).cpu())
    return torch.cat(scores).numpy()


def _tpr_at_fpr(member_scores: np.ndarray, other_scores: np.ndarray, fpr_limit: float = 0.01) -> float:
    """TPR of "score at or above t = member" at the lowest threshold t whose FPR stays within ``fpr_limit``: t lies
    just above the (k+1)-th highest non-member score, k = floor(fpr_limit x non-members) (``roc_curve``'s answer)."""
    allowed = int(np.floor(fpr_limit * len(other_scores) + 1e-9))
    if allowed >= len(other_scores):
        return 1.0
    boundary = -np.partition(-other_scores, allowed)[allowed]  # the (allowed+1)-th highest non-member score
    return float((member_scores > boundary).mean())


def _auc_and_tpr(member_scores: np.ndarray, other_scores: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """AUC and TPR at 1% FPR of "higher score = member", with 95% percentile intervals from ``n_boot`` stratified
    bootstrap resamples (members and non-members resampled separately, so every resample keeps both counts)."""
    # the pairwise comparisons once; a resample's AUC is then its draw counts' weighted mean of them
    pairwise = (member_scores[:, None] > other_scores[None, :]) + 0.5 * (
        member_scores[:, None] == other_scores[None, :]
    )
    rng = np.random.default_rng(seed)
    m, n = len(member_scores), len(other_scores)
    member_draws = rng.integers(0, m, size=(n_boot, m))
    other_draws = rng.integers(0, n, size=(n_boot, n))
    member_counts = np.stack([np.bincount(d, minlength=m) for d in member_draws]).astype(float)
    other_counts = np.stack([np.bincount(d, minlength=n) for d in other_draws]).astype(float)
    aucs = ((member_counts @ pairwise) * other_counts).sum(axis=1) / (m * n)
    tprs = np.array([_tpr_at_fpr(member_scores[a], other_scores[b]) for a, b in zip(member_draws, other_draws)])
    return {
        "auc": float(pairwise.mean()),  # the Mann-Whitney probability that a member outscores a non-member
        "auc_ci": [float(v) for v in np.quantile(aucs, [0.025, 0.975])],
        "tpr_at_1pct_fpr": _tpr_at_fpr(member_scores, other_scores),
        "tpr_at_1pct_fpr_ci": [float(v) for v in np.quantile(tprs, [0.025, 0.975])],
    }


def membership_attack(
    member_scores: np.ndarray,
    non_member_scores: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    member_labels: np.ndarray | None = None,
    non_member_labels: np.ndarray | None = None,
    min_per_class: int = MIN_PER_CLASS,
) -> dict[str, Any]:
    """ROC AUC and TPR at 1% FPR of "lower score = member" (0.5 AUC is chance), each with a 95% interval from
    ``n_boot`` stratified bootstrap resamples; per class too when the labels are given.

    Args:
        member_scores, non_member_scores: an attack's scores (errors: lower = member).
        member_labels, non_member_labels: class indices (``CLASSES``); with them ``per_class`` is filled.
        min_per_class: a class with fewer members or non-members is listed with its counts and a reason, no AUC.

    Returns:
        ``auc``, ``auc_ci``, ``tpr_at_1pct_fpr``, ``tpr_at_1pct_fpr_ci``, ``n_boot``, ``n_members``,
        ``n_non_members``, the two score medians, and ``per_class`` (class -> the same figures and counts, rarest
        class first by member count; empty without labels); ``note`` when the AUC's interval lies below 0.5.

    Raises:
        AuditError: no members or no non-members.
    """
    if len(member_scores) == 0 or len(non_member_scores) == 0:
        raise AuditError("the membership attack needs both training and held-out images")
    member = -np.asarray(member_scores, float)
    other = -np.asarray(non_member_scores, float)
    result = {
        **_auc_and_tpr(member, other, n_boot, seed),
        "n_boot": n_boot,
        "n_members": int(len(member)),
        "n_non_members": int(len(other)),
        "member_error_median": float(np.median(member_scores)),
        "non_member_error_median": float(np.median(non_member_scores)),
        "per_class": {},
    }
    if result["auc_ci"][1] < 0.5:
        # not "private": the score separates members the other way round, and an attacker who knows a few members
        # would flip the decision (PIA does, on a tiny UNet overfitted to a few dozen images from some initial
        # weights: tests/test_membership.py)
        result["note"] = (
            "below chance: members score worse than non-members beyond sampling error, so membership leaks with the "
            "decision reversed; the gate fails it once its lower bound reaches 1 - audit.max_attack_auc"
        )
    if member_labels is None or non_member_labels is None:
        return result
    member_labels, non_member_labels = np.asarray(member_labels), np.asarray(non_member_labels)
    counts = {i: (int((member_labels == i).sum()), int((non_member_labels == i).sum())) for i in range(len(CLASSES))}
    # rarest first: the classes the generator saw least are where it most likely memorised
    for i in sorted((i for i in counts if any(counts[i])), key=lambda i: (counts[i][0], i)):
        m, n = counts[i]
        entry: dict[str, Any] = {"n_members": m, "n_non_members": n}
        if min(m, n) < min_per_class:
            entry["reason"] = f"{m} members and {n} non-members; at least {min_per_class} of each are needed"
        else:
            # a seed per class: resamples independent of the overall ones and of the other classes
            entry.update(_auc_and_tpr(member[member_labels == i], other[non_member_labels == i], n_boot, seed + 1 + i))
        result["per_class"][CLASSES[i]] = entry
    return result


def attack_generator(
    unet: torch.nn.Module,
    conditioning,
    scheduler,
    members: tuple[np.ndarray, np.ndarray],
    non_members: tuple[np.ndarray, np.ndarray],
    *,
    timesteps: int,
    draws: int,
    n_boot: int,
    seed: int,
    batch_size: int = 32,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 30.0,
) -> dict[str, dict[str, Any]]:
    """Both attacks on one generator: ``{"loss": ..., "pia": ...}``, each ``membership_attack``'s figures (overall
    and per class) plus its ``method``, settings and ``seconds`` (scoring members and non-members).

    Args:
        members, non_members: (uint8 images (N, H, W, 3), class indices (N,)); members from the training split,
            non-members from images the generator never saw.
        timesteps: noise levels per image, both attacks (2-50% of the schedule for the loss attack, 2-20% for
            PIA).
        draws: noise draws per level, loss attack.
        n_boot: bootstrap resamples behind every interval.
        progress: receives a line every ``progress_every_s`` seconds of scoring (images scored so far).
    """
    (member_images, member_labels), (other_images, other_labels) = members, non_members
    total = len(member_images) + len(other_images)
    scorers = {
        "loss": (
            lambda images, labels: denoising_errors(
                unet,
                conditioning,
                scheduler,
                images,
                labels,
                timesteps=timesteps,
                draws=draws,
                seed=seed,
                batch_size=batch_size,
            ),
            {"draws": draws, "noise_levels": attack_levels(scheduler, timesteps, LOSS_LEVELS)},
        ),
        "pia": (
            lambda images, labels: proximal_initialisation_errors(
                unet, conditioning, scheduler, images, labels, timesteps=timesteps, batch_size=batch_size
            ),
            {"p": PIA_NORM, "noise_levels": attack_levels(scheduler, timesteps, PIA_LEVELS)},
        ),
    }
    results = {}
    for name, (score, settings) in scorers.items():
        started = reported = time.perf_counter()
        done, chunk, scored = 0, 4 * batch_size, []
        for images, labels in ((member_images, member_labels), (other_images, other_labels)):
            # every image's score is its own (shared noise per draw and level), so chunking changes nothing but
            # how often a long attack says where it is
            parts = []
            for start in range(0, len(images), chunk):
                parts.append(score(images[start : start + chunk], labels[start : start + chunk]))
                done += len(parts[-1])
                now = time.perf_counter()
                if progress is not None and now - reported >= progress_every_s:
                    reported = now
                    progress(f"membership attack {name}: {done}/{total} images scored ({now - started:.0f} s)")
            scored.append(np.concatenate(parts) if parts else np.zeros(0))
        member_scores, other_scores = scored
        seconds = time.perf_counter() - started
        attack = membership_attack(
            member_scores,
            other_scores,
            n_boot=n_boot,
            seed=seed,
            member_labels=member_labels,
            non_member_labels=other_labels,
        )
        results[name] = {
            "method": METHODS[name],
            **attack,
            **settings,
            "noise_levels": [int(v) for v in settings["noise_levels"]],
            "seconds": round(seconds, 2),
        }
    return results
