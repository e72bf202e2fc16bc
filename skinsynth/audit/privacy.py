"""Privacy of a synthetic set: does the generator copy its training images, and does it reveal who was in them?

- Memorisation: every synthetic image's nearest training image under the near-copy detector of
  ``skinsynth.audit.copies`` (shifts, crops, flips/turns, recolouring and light blur seen through), and by feature
  cosine. Held-out real images get the same search as the baseline: a generator that does not copy puts its samples
  no closer to the training set than unseen real images sit. The copy threshold is calibrated on the data's own pairs
  (held-out images of other lesions, same-lesion training pairs), in the spirit of Carlini et al. 2023, "Extracting
  training data from diffusion models", and Somepalli et al. 2023, "Diffusion art or digital forgery?".
- Membership inference: two attacks on the generator itself (the loss attack and PIA), in
  ``skinsynth.audit.membership``.

Both verdicts carry 95% intervals, and the sharing gate compares their upper bounds with its limits: the memorised
share an exact binomial (Clopper-Pearson) interval, each attack's AUC and TPR a stratified bootstrap over members and
non-members. A point estimate just under a limit on a few hundred images says little.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from skinsynth.audit.features import AuditError
from skinsynth.data.schema import CLASSES


def unit_rows(features: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (cosine similarity becomes a dot product)."""
    return features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest_neighbours(
    queries: torch.Tensor, references: torch.Tensor, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Highest dot-product similarity of each query to ``references`` (rows unit-norm), and the reference index."""
    if len(references) == 0:
        raise AuditError("no reference images to compare with")
    best, index = [], []
    for start in range(0, len(queries), chunk):
        value, where = (queries[start : start + chunk] @ references.T).max(dim=1)
        best.append(value)
        index.append(where)
    if not best:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(best).numpy(), torch.cat(index).numpy()


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


def binomial_interval(successes: int, trials: int, confidence: float = 0.95) -> list[float]:
    """Exact (Clopper-Pearson) interval of a proportion: ``[0, 1]`` when there are no trials."""
    if trials == 0:
        return [0.0, 1.0]
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="exact")
    return [float(ci.low), float(ci.high)]


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
