"""Utility of a synthetic set: the Classification Accuracy Score, next to the real-only baseline.

Ravuri & Vinyals 2019, "Classification Accuracy Score for Conditional Generative Models" (NeurIPS): train a
classifier on synthetic images only, score it on real held-out images, and compare with the same classifier trained
on real images. Here the held-out images are the validation split, never test: generators are compared by this
score, and a choice made on test would spend the test split's one look. A generator whose samples carry the class
(not just the look of skin) scores close to the baseline;
one that ignores its conditioning scores at chance however good its FID.

The classifier here is a linear probe (multinomial logistic regression, balanced class weights) on frozen ImageNet
EfficientNet-Lite0 features, not a fine-tuned network, for two reasons:

- cost: it takes seconds on a CPU, so every audit can afford it (a fine-tuned run is a Ray Train job; the same
  question at full strength is a ``tune`` grid over ``train.mix``);
- fairness between the arms: the ImageNet features saw none of this run's images. The run's own classifier learnt
  from the real labels, so a probe on its features would favour the real arm.

The real arm is trained on real training images drawn to match the synthetic set's per-class counts (where the
class has that many), so the two scores differ by where the images came from, not by how many there were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from skinsynth.classify.metrics import LesionBootstrap, balanced_accuracy, bootstrap_ci, macro_auroc
from skinsynth.data.schema import CLASSES

PROBE_C = 1.0  # inverse L2 strength on standardised features: scikit-learn's default, not tuned on test
PROBE_MAX_ITER = 2000


def matched_indices(source_labels: np.ndarray, target_labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices into ``source_labels`` with, per class, as many images as ``target_labels`` has (or all there are).

    Seeded, sorted, without replacement.
    """
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for label, wanted in zip(*np.unique(target_labels, return_counts=True), strict=True):
        pool = np.flatnonzero(source_labels == label)
        chosen.append(rng.choice(pool, size=min(int(wanted), len(pool)), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def probe_scores(
    train_features: torch.Tensor,
    train_labels: np.ndarray,
    scored_features: torch.Tensor,
    scored_labels: np.ndarray,
    num_classes: int,
    seed: int = 0,
    resamples: LesionBootstrap | None = None,
) -> dict[str, Any]:
    """Fit the linear probe on one set and score it on the real held-out images.

    Returns:
        ``balanced_accuracy`` and ``macro_auroc`` on the held-out images (classes the probe never saw get
        probability 0, so their images count as misses), with ``balanced_accuracy_ci``, the 95% lesion-bootstrap
        interval over ``resamples`` when given; or ``None`` for all with a ``reason`` when the training set has
        fewer than two classes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    seen = np.unique(train_labels)
    if len(seen) < 2:
        return {
            "balanced_accuracy": None,
            "balanced_accuracy_ci": None,
            "macro_auroc": None,
            "reason": f"{len(seen)} class(es) to train on: a probe needs at least 2",
        }
    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, class_weight="balanced", random_state=seed),
    )
    probe.fit(train_features.numpy(), train_labels)
    probs = np.zeros((len(scored_labels), num_classes))
    probs[:, probe.classes_] = probe.predict_proba(scored_features.numpy())
    ci = None
    if resamples is not None:
        ci = list(bootstrap_ci(balanced_accuracy, probs, scored_labels, None, resamples=resamples))
    return {
        "balanced_accuracy": balanced_accuracy(probs, scored_labels),
        "balanced_accuracy_ci": ci,
        "macro_auroc": macro_auroc(probs, scored_labels),
    }


def _counts(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    return {class_names[int(c)]: int(n) for c, n in zip(*np.unique(labels, return_counts=True), strict=True)}


def utility_report(
    extractor,
    real_images: np.ndarray,
    real_labels: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_labels: np.ndarray,
    scored_images: np.ndarray,
    scored_labels: np.ndarray,
    seed: int = 0,
    class_names: Sequence[str] = CLASSES,
    scored_groups: np.ndarray | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Classification Accuracy Score of the synthetic set and of a count-matched real set, on real held-out images
    (the audit passes the validation split: never test).

    Args:
        extractor: a frozen feature extractor (``images -> [N, D]``) that saw none of this run's labels.
        real_images, real_labels: the real labelled training images (uint8 ``N x H x W x 3``) and labels.
        synthetic_images, synthetic_labels: the synthetic set and the classes it was sampled for.
        scored_images, scored_labels: the real held-out images the probes are scored on.
        seed: draws the count-matched real subset, seeds the probe and the resamples.
        class_names: label index -> class name.
        scored_groups: the scored images' lesion ids: each arm's balanced accuracy then gets a 95% interval from
            ``n_boot`` lesion-bootstrap resamples (the same resamples for both arms).
        n_boot: resamples for those intervals.

    Returns:
        Both arms' balanced accuracy and macro AUROC with their training counts, the scored counts, and
        ``balanced_accuracy_ratio`` (synthetic / real; ``None`` when either is undefined or real is 0).
    """
    matched = matched_indices(real_labels, synthetic_labels, seed)
    real_images, real_labels = real_images[matched], real_labels[matched]
    scored_features = extractor(scored_images)
    resamples = LesionBootstrap(scored_groups, n_boot, seed) if scored_groups is not None else None
    arms: dict[str, Any] = {}
    for arm, images, labels in (
        ("synthetic_only", synthetic_images, synthetic_labels),
        ("real_only", real_images, real_labels),
    ):
        scores = probe_scores(
            extractor(images), labels, scored_features, scored_labels, len(class_names), seed, resamples
        )
        arms[arm] = {"n_train": len(labels), "train_per_class": _counts(labels, class_names), **scores}
    syn, real = arms["synthetic_only"]["balanced_accuracy"], arms["real_only"]["balanced_accuracy"]
    return {
        "method": (
            "Classification Accuracy Score (Ravuri & Vinyals 2019): a linear probe (logistic regression, balanced "
            "class weights) on frozen features, trained on synthetic images only and, as the baseline, on real "
            "training images matched to the synthetic per-class counts; both scored on real held-out images, the "
            "validation split (never test)"
        ),
        "features": extractor.description,
        "scored_on": "validation",
        "n_scored": len(scored_labels),
        "scored_per_class": _counts(scored_labels, class_names),
        "chance_balanced_accuracy": 1.0 / max(1, len(np.unique(scored_labels))),
        **arms,
        "balanced_accuracy_ratio": syn / real if syn is not None and real else None,
    }
