"""Fidelity of a synthetic set against real images, on feature tensors from any extractor.

- FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium") and
  KID (Binkowski et al. 2018, "Demystifying MMD GANs") through torchmetrics, fed with precomputed features.
- Precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric for assessing generative
  models"), density and coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative
  models"), all from k-nearest-neighbour balls in feature space.

FID is biased upwards at small n, so every figure is reported with the sample counts it came from.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from skinsynth.audit.features import AuditError
from skinsynth.data.schema import CLASSES


class _Precomputed(torch.nn.Module):
    """Lets torchmetrics' FID/KID take feature tensors: the "network" returns its input unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check_pair(real: torch.Tensor, fake: torch.Tensor, minimum: int = 2) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise AuditError(f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < minimum or len(fake) < minimum:
        raise AuditError(f"need at least {minimum} real and {minimum} synthetic images, got {len(real)}/{len(fake)}")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two sets of features (N, D); 0 for identical distributions."""
    _check_pair(real, fake)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), reset_real_features=True)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(0.0, float(metric.compute()))  # tiny negative values are round-off of an exact 0


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subset_size: int, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over 100 random subsets) between two sets of features; unbiased, so it can dip below 0."""
    _check_pair(real, fake)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # it warns that it keeps every feature in memory: that is what it is given
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subset_size=size, subsets=100)
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
    _check_pair(real, fake, minimum=k + 1)
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


def fidelity_report(
    real: torch.Tensor,
    fake: torch.Tensor,
    real_labels: np.ndarray,
    fake_labels: np.ndarray,
    *,
    k: int = 5,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All fidelity figures of one extractor's features: overall and per class, each with its sample counts.

    Classes with too few images on either side for a figure get ``null`` and the reason, not a number.
    """
    report: dict[str, Any] = {"n_real": int(len(real)), "n_synthetic": int(len(fake))}
    report["fid"] = frechet_distance(real, fake)
    report["kid_mean"], report["kid_std"] = kernel_distance(real, fake, kid_subset_size, seed)
    report.update(precision_recall_density_coverage(real, fake, k))
    per_class: dict[str, Any] = {}
    for label, dx in enumerate(CLASSES):
        r, f = real[real_labels == label], fake[fake_labels == label]
        entry: dict[str, Any] = {"n_real": int(len(r)), "n_synthetic": int(len(f))}
        if len(f) == 0:
            continue
        if min(len(r), len(f)) <= k:
            entry["note"] = f"too few images for FID or k-NN figures (need more than {k} on each side)"
        else:
            entry["fid"] = frechet_distance(r, f)
            entry.update(precision_recall_density_coverage(r, f, k))
        per_class[dx] = entry
    report["per_class"] = per_class
    return report
