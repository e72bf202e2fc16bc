"""Fidelity of a synthetic set against real images, on feature tensors from any extractor.

- FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium") and
  KID (Binkowski et al. 2018, "Demystifying MMD GANs") through torchmetrics, fed with precomputed features.
- Precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric for assessing generative
  models"), density and coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative
  models"), all from k-nearest-neighbour balls in feature space.

FID is biased upwards by finite samples, and the bias grows as n shrinks (Chong & Forsyth 2020, "Effectively
unbiased FID and Inception Score and where to find them"): two FIDs at different n are not comparable, and a FID of
30 synthetic images against 3000 real ones is mostly bias. So :func:`fidelity_report` compares at matched n: the
larger side is subsampled (seeded) to the smaller one's size, and the real-vs-real floor is the FID of two disjoint
real sets (training and held-out) of that same n. Every figure carries its n; KID (unbiased, but noisy at small n)
carries its standard deviation over subsets.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torchmetrics.image.kid import KernelInceptionDistance

from skinsynth.core.fid import PrecomputedFeatures, check_feature_pair, frechet_distance
from skinsynth.data.schema import CLASSES

# Per-class FID needs this many images on each side. FID fits a D x D covariance (2048 x 2048 for Inception) to each
# side; below about 50 images per side its sample-size bias dominates the figure (Chong & Forsyth 2020), so a small
# class gets KID alone (unbiased, with its standard deviation) and is flagged small.
MIN_PER_CLASS_FID = 50


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subset_size: int, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over 100 random subsets) between two sets of features; unbiased, so it can dip below 0."""
    check_feature_pair(real, fake)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # it warns that it keeps every feature in memory: that is what it is given
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subset_size=size, subsets=100)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # KID draws its subsets with torch's global generator
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radius(features: torch.Tensor, k: int) -> torch.Tensor:
    distances = torch.cdist(features, features)
    # column 0 of the sorted row is the point itself (distance 0), so the k-th neighbour is column k
    return distances.sort(dim=1).values[:, k]


def precision_recall_density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Manifold precision/recall and density/coverage of ``fake`` against ``real`` (features, (N, D)).

    Precision: share of synthetic points inside some real point's k-NN ball. Recall: share of real points inside some
    synthetic point's k-NN ball. Density: mean number of real balls holding a synthetic point, over k. Coverage: share
    of real balls that hold at least one synthetic point. All are 1 (density about 1) for a set against itself.
    """
    check_feature_pair(real, fake, minimum=k + 1)
    real, fake = real.double(), fake.double()
    real_radius = _kth_neighbour_radius(real, k)
    fake_radius = _kth_neighbour_radius(fake, k)
    cross = torch.cdist(real, fake)  # (R, F)
    inside_real_ball = cross <= real_radius[:, None]
    inside_fake_ball = cross <= fake_radius[None, :]
    return {
        "precision": float(inside_real_ball.any(dim=0).double().mean()),
        "recall": float(inside_fake_ball.any(dim=1).double().mean()),
        "density": float(inside_real_ball.double().sum(dim=0).mean() / k),
        "coverage": float((cross.min(dim=1).values <= real_radius).double().mean()),
    }


def _subsample(features: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` rows of ``features`` drawn without replacement (in their original order); all of them if it has ``n``."""
    if len(features) <= n:
        return features
    keep = np.sort(rng.choice(len(features), size=n, replace=False))
    return features[torch.from_numpy(keep)]


def _kid_subset_size(requested: int, n: int) -> int:
    """KID's subset size at matched n: at most half of n, so that its subsets differ and its std means something (a
    subset of all n images is the same set every time, and its std over subsets is 0); at least 2, its minimum."""
    return max(2, min(requested, n // 2))


def _class_entry(
    real: torch.Tensor, fake: torch.Tensor, rng: np.random.Generator, *, k: int, kid_subset_size: int, seed: int
) -> dict[str, Any]:
    """One class's figures at matched n: FID and k-NN figures from MIN_PER_CLASS_FID per side, else KID alone."""
    n = min(len(real), len(fake))
    entry: dict[str, Any] = {"n": n, "n_real_available": int(len(real)), "n_synthetic_available": int(len(fake))}
    r, f = _subsample(real, n, rng), _subsample(fake, n, rng)
    if n >= MIN_PER_CLASS_FID:
        entry["fid"] = frechet_distance(r, f)
    else:
        entry["small"] = True
        entry["note"] = (
            f"FID and k-NN figures withheld below {MIN_PER_CLASS_FID} images per side (FID's small-n bias dominates)"
            + ("; KID alone" if n >= 2 else "; KID needs at least 2 per side")
        )
    if n >= 2:
        entry["kid_subset_size"] = _kid_subset_size(kid_subset_size, n)
        entry["kid_mean"], entry["kid_std"] = kernel_distance(r, f, entry["kid_subset_size"], seed)
    if n >= MIN_PER_CLASS_FID and n > k:
        entry.update(precision_recall_density_coverage(r, f, k))
    return entry


def fidelity_report(
    real: torch.Tensor,
    fake: torch.Tensor,
    real_labels: np.ndarray,
    fake_labels: np.ndarray,
    *,
    held_out: torch.Tensor,
    k: int = 5,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All fidelity figures of one extractor's features, overall and per class, each at matched n.

    Args:
        real: features (N, D) of the real training images.
        fake: features (M, D) of the synthetic images.
        real_labels, fake_labels: class indices of ``real`` and ``fake``.
        held_out: features (H, D) of held-out real images (never seen by the generator), disjoint from ``real``:
            the second real set of the real-vs-real floor.
        k: k of the k-NN radii behind precision/recall/density/coverage.
        kid_subset_size: KID subset size (capped at half the compared n, see :func:`_kid_subset_size`).
        seed: seeds the subsampling to matched n and KID's subsets.

    Returns:
        ``n`` (the matched n = min(N, M) that every overall figure was computed at), ``n_real_available`` and
        ``n_synthetic_available`` (what it was drawn from), ``fid``, ``kid_mean``, ``kid_std``, precision, recall,
        density, coverage; the floor: ``fid_floor`` (also as ``fid_real_train_vs_held_out``), ``kid_floor_mean``,
        ``kid_floor_std`` at ``floor_n`` (= ``n`` unless the held-out set is smaller; then ``floor_note`` says so);
        and ``per_class``: per class with synthetic images, its matched ``n`` and available counts, KID, and FID and
        the k-NN figures from :data:`MIN_PER_CLASS_FID` images per side (below that ``small: true`` and a note).
    """
    rng = np.random.default_rng(seed)
    n = min(len(real), len(fake))
    report: dict[str, Any] = {"n": n, "n_real_available": int(len(real)), "n_synthetic_available": int(len(fake))}
    real_n, fake_n = _subsample(real, n, rng), _subsample(fake, n, rng)
    report["fid"] = frechet_distance(real_n, fake_n)
    report["kid_subset_size"] = _kid_subset_size(kid_subset_size, n)
    report["kid_mean"], report["kid_std"] = kernel_distance(real_n, fake_n, report["kid_subset_size"], seed)
    report.update(precision_recall_density_coverage(real_n, fake_n, k))

    # the floor: training vs held-out real images, disjoint by construction, at the same n where the held-out set
    # allows it (the training side is the very subset the synthetic images were compared with)
    floor_n = min(n, len(held_out))
    floor_real, floor_held = _subsample(real_n, floor_n, rng), _subsample(held_out, floor_n, rng)
    report["fid_floor"] = frechet_distance(floor_real, floor_held)
    report["kid_floor_mean"], report["kid_floor_std"] = kernel_distance(
        floor_real, floor_held, _kid_subset_size(kid_subset_size, floor_n), seed
    )
    report["floor_n"] = floor_n
    report["n_held_out_available"] = int(len(held_out))
    if floor_n < n:
        report["floor_note"] = (
            f"only {len(held_out)} held-out real images: the floor is at n={floor_n}, below the n={n} of the "
            "synthetic comparison, and FID's small-n bias makes it read high"
        )
    report["fid_real_train_vs_held_out"] = report["fid_floor"]  # the key older reports and readers use

    per_class: dict[str, Any] = {}
    for label, dx in enumerate(CLASSES):
        r, f = real[real_labels == label], fake[fake_labels == label]
        if len(f) == 0:
            continue
        class_rng = np.random.default_rng([seed, label])
        per_class[dx] = _class_entry(r, f, class_rng, k=k, kid_subset_size=kid_subset_size, seed=seed)
    report["per_class"] = per_class
    return report
