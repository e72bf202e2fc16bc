"""Privacy of a synthetic set: does the generator copy its training images, and does it reveal who was in them?

- Memorisation: every synthetic image's nearest training image by pixel correlation (dihedral-invariant, since the
  generator trains on flips and quarter turns) and by feature cosine. Held-out real images get the same search as the
  baseline: a generator that does not copy puts its samples no closer to the training set than unseen real images
  sit. An image counts as a copy when it is at least as close as lightly augmented training images are to their own
  source (the copy threshold is a low quantile of those similarities), in the spirit of Carlini et al. 2023,
  "Extracting training data from diffusion models", and Somepalli et al. 2023, "Diffusion art or digital forgery?".
- Membership inference from the denoising error: members (training images) tend to be denoised better than unseen
  images at the same noise level (the loss attack of Matsumoto et al. 2023, "Membership inference attacks against
  diffusion models"; Carlini et al. 2023). Reported as ROC AUC and TPR at 1% FPR (Carlini et al. 2022, "Membership
  inference attacks from first principles").

Both verdicts carry 95% intervals, and the sharing gate compares their upper bounds with its limits: the memorised
share an exact binomial (Clopper-Pearson) interval, the attack's AUC and TPR a stratified bootstrap over members and
non-members. A point estimate just under a limit on a few hundred images says little.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from skinsynth.audit.features import AuditError
from skinsynth.data.schema import CLASSES


def pixel_vectors(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3*size*size) zero-mean unit-norm vectors: their dot product is Pearson correlation."""
    resized = np.stack([cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) for img in images])
    x = torch.from_numpy(resized.reshape(len(images), -1)).float()
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def dihedral_pixel_vectors(images: np.ndarray, size: int) -> list[torch.Tensor]:
    """Pixel vectors of the eight flips/quarter turns of every image."""
    views = []
    for turns in range(4):
        rotated = np.rot90(images, turns, axes=(1, 2))
        views += [pixel_vectors(rotated, size), pixel_vectors(rotated[:, :, ::-1], size)]
    return views


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (cosine similarity becomes a dot product)."""
    return features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_neighbours(
    queries: torch.Tensor | list[torch.Tensor], references: torch.Tensor, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Highest dot-product similarity of each query to ``references`` (rows unit-norm), and the reference index.

    ``queries`` may be a list of views of the same images (e.g. the dihedral ones); the best view counts.
    """
    views = queries if isinstance(queries, list) else [queries]
    n = len(views[0])
    best = torch.full((n,), -float("inf"))
    index = torch.zeros(n, dtype=torch.long)
    if len(references) == 0:
        raise AuditError("no reference images to compare with")
    for view in views:
        for start in range(0, n, chunk):
            sims = view[start : start + chunk] @ references.T
            value, where = sims.max(dim=1)
            better = value > best[start : start + chunk]
            best[start : start + chunk] = torch.where(better, value, best[start : start + chunk])
            index[start : start + chunk] = torch.where(better, where, index[start : start + chunk])
    return best.numpy(), index.numpy()


def augment_lightly(images: np.ndarray, seed: int) -> np.ndarray:
    """Light edits a copy might carry: a flip or quarter turn, brightness and contrast within 10%, a slight blur
    (sigma up to 0.6 px) and pixel noise (sigma 2 grey levels).

    No spatial shift: at audit resolution a one-pixel shift lowers pixel correlation below that of unrelated images,
    so the search below is not shift-tolerant and the calibration must not pretend it is.
    """
    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        img = np.rot90(img, int(rng.integers(4)))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        x = np.ascontiguousarray(img).astype(np.float32)
        sigma = rng.uniform(0.0, 0.6)
        if sigma > 0.1:
            x = cv2.GaussianBlur(x, (0, 0), sigma)
        x = (x - x.mean()) * rng.uniform(0.9, 1.1) + x.mean() * rng.uniform(0.9, 1.1)
        x += rng.normal(0.0, 2.0, x.shape)
        out.append(np.clip(x, 0, 255).astype(np.uint8))
    return np.stack(out)


def copy_threshold(
    train_images: np.ndarray,
    train_vectors: torch.Tensor,
    size: int,
    quantile: float,
    n: int,
    seed: int,
    held_out_sims: np.ndarray | None = None,
    held_out_quantile: float = 0.99,
) -> tuple[float, np.ndarray, dict[str, float]]:
    """The pixel-correlation level that counts as a copy.

    ``n`` training images are lightly augmented and searched against the training set; the ``quantile`` of their
    best similarities is where copies start, so about ``1 - quantile`` of such copies are caught. Where unseen real
    images (``held_out_sims``, their own best similarities to the training set) reach that level too, the threshold
    rises to their ``held_out_quantile``: a test that calls many unseen images copies could never let a generator
    pass a 1% gate, however original its samples.

    Returns:
        (threshold, the calibration similarities, the two candidate levels).
    """
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(train_images), size=min(n, len(train_images)), replace=False)
    copies = augment_lightly(train_images[chosen], seed)
    sims, _ = nearest_neighbours(dihedral_pixel_vectors(copies, size), train_vectors)
    parts = {"from_augmented_copies": float(np.quantile(sims, quantile))}
    if held_out_sims is not None and len(held_out_sims):
        parts["from_held_out"] = float(np.quantile(held_out_sims, held_out_quantile))
    return max(parts.values()), sims, parts


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in (5, 50, 95)} if len(values) else {}


def memorisation_report(
    synthetic_sims: np.ndarray,
    held_out_sims: np.ndarray,
    synthetic_labels: np.ndarray,
    train_labels: np.ndarray,
    threshold: float,
) -> dict[str, Any]:
    """Share of synthetic images at or above the copy threshold, overall and per class (smallest classes first),
    with held-out real images through the same test as the false-positive baseline."""
    copied = synthetic_sims >= threshold
    share_ci = binomial_interval(int(copied.sum()), len(copied))
    counts = {dx: int((train_labels == i).sum()) for i, dx in enumerate(CLASSES)}
    per_class = {}
    for dx in sorted(CLASSES, key=lambda c: counts[c]):
        mask = synthetic_labels == CLASSES.index(dx)
        if mask.any():
            per_class[dx] = {
                "n_synthetic": int(mask.sum()),
                "n_train": counts[dx],
                "memorised_share": float(copied[mask].mean()),
            }
    return {
        "threshold": threshold,
        "n_synthetic": int(len(synthetic_sims)),
        "memorised_share": float(copied.mean()) if len(copied) else 0.0,
        "memorised_share_ci": share_ci,
        "memorised_images": int(copied.sum()),
        "held_out_n": int(len(held_out_sims)),
        "held_out_above_threshold": float((held_out_sims >= threshold).mean()) if len(held_out_sims) else None,
        "synthetic_similarity": _quantiles(synthetic_sims),
        "held_out_similarity": _quantiles(held_out_sims),
        "per_class": per_class,
    }


def closeness_report(synthetic_sims: np.ndarray, held_out_sims: np.ndarray) -> dict[str, Any]:
    """Do synthetic images sit closer to the training set than unseen real images do?

    ``synthetic_above_held_out_p95`` is about 0.05 when they do not; much more means the generator's samples hug
    its training images.
    """
    p95 = float(np.percentile(held_out_sims, 95)) if len(held_out_sims) else float("nan")
    return {
        "synthetic": _quantiles(synthetic_sims),
        "held_out": _quantiles(held_out_sims),
        "synthetic_above_held_out_p95": float((synthetic_sims > p95).mean()) if len(synthetic_sims) else None,
    }


def denoising_errors(
    unet: torch.nn.Module,
    conditioning,
    scheduler,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    timesteps: int,
    seed: int,
    batch_size: int = 32,
) -> np.ndarray:
    """Mean squared noise-prediction error of each image, over ``timesteps`` noise levels in the first half of the
    schedule, conditioned on its true class; the noise is seeded per image, so members and non-members get the same
    draws."""
    from skinsynth.generate.diffusion import from_uint8_images
    from skinsynth.generate.model import predict_noise

    total = scheduler.config.num_train_timesteps
    levels = np.unique(np.linspace(total * 0.02, total * 0.5, timesteps).astype(np.int64))
    errors = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = np.ascontiguousarray(images[start : start + batch_size])
            x0 = from_uint8_images(torch.from_numpy(batch).permute(0, 3, 1, 2))
            joint = torch.as_tensor([conditioning.index(int(lab)) for lab in labels[start : start + batch_size]])
            err = torch.zeros(len(x0))
            for level in levels:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + int(level))
                noise = torch.randn(x0.shape, generator=gen)
                t = torch.full((len(x0),), int(level), dtype=torch.long)
                pred = predict_noise(unet, scheduler.add_noise(x0, noise, t), t, joint)
                err += (pred - noise).pow(2).flatten(1).mean(dim=1)
            errors.append(err / len(levels))
    return torch.cat(errors).numpy()


def binomial_interval(successes: int, trials: int, confidence: float = 0.95) -> list[float]:
    """Exact (Clopper-Pearson) interval of a proportion: ``[0, 1]`` when there are no trials."""
    if trials == 0:
        return [0.0, 1.0]
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="exact")
    return [float(ci.low), float(ci.high)]


def _tpr_at_fpr(member_scores: np.ndarray, other_scores: np.ndarray, fpr_limit: float = 0.01) -> float:
    """TPR of "score at or above t = member" at the lowest threshold t whose FPR stays within ``fpr_limit``: t lies
    just above the (k+1)-th highest non-member score, k = floor(fpr_limit x non-members) (``roc_curve``'s answer)."""
    allowed = int(np.floor(fpr_limit * len(other_scores) + 1e-9))
    if allowed >= len(other_scores):
        return 1.0
    boundary = -np.partition(-other_scores, allowed)[allowed]  # the (allowed+1)-th highest non-member score
    return float((member_scores > boundary).mean())


def membership_attack(
    member_errors: np.ndarray, non_member_errors: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """ROC AUC and TPR at 1% FPR of "lower denoising error = member" (0.5 AUC is chance), each with a 95% percentile
    interval from ``n_boot`` stratified bootstrap resamples (members and non-members resampled separately, so every
    resample keeps both counts)."""
    if len(member_errors) == 0 or len(non_member_errors) == 0:
        raise AuditError("the membership attack needs both training and held-out images")
    member_scores, other_scores = -np.asarray(member_errors, float), -np.asarray(non_member_errors, float)
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
        "n_boot": n_boot,
        "n_members": int(m),
        "n_non_members": int(n),
        "member_error_median": float(np.median(member_errors)),
        "non_member_error_median": float(np.median(non_member_errors)),
    }


def gallery_figure(
    synthetic: np.ndarray,
    train: np.ndarray,
    sims: np.ndarray,
    nearest: np.ndarray,
    pairs: int,
    threshold: float,
    path: Path,
) -> str:
    """PNG of the ``pairs`` synthetic images closest to a training image, each beside that training image."""
    from skinsynth.classify.figures import plt, save_figure

    order = np.argsort(-sims)[:pairs]
    fig, axes = plt.subplots(2, max(1, len(order)), figsize=(1.6 * max(1, len(order)), 3.6), squeeze=False)
    for col, i in enumerate(order):
        axes[0, col].imshow(synthetic[i])
        axes[0, col].set_title(f"r={sims[i]:.3f}" + (" COPY" if sims[i] >= threshold else ""), fontsize=7)
        axes[1, col].imshow(train[nearest[i]])
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].text(-0.1, 0.5, "synthetic", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.1, 0.5, "nearest train", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle(f"closest synthetic/training pairs (pixel correlation; copy threshold {threshold:.3f})", fontsize=8)
    return save_figure(fig, path)
