"""Evaluation metrics of the classifier stage: pure functions on probability tensors, labels and metadata.

Every function takes ``probs`` (``[N, C]`` class probabilities, rows summing to 1 - softmax output, not logits)
and ``labels`` (``[N]`` integer labels in the fixed class order of ``skinsynth.data.schema.CLASSES``), as torch
tensors or numpy arrays, checks their shapes and values and raises ``ValueError`` with the reason when they are
wrong. Results are plain Python floats, ints, lists and dicts (JSON-ready); an undefined figure is ``None``, never
NaN. The arithmetic is torchmetrics' (functional API, which skips the state bookkeeping of the module API but runs
the same code); this module adds the parts torchmetrics leaves to the caller:

- classes absent from ``labels`` (a small test split, an external set): torchmetrics scores their recall and AUROC
  as 0, which would drag every macro figure down. Here their per-class figures are ``None`` and macro figures are
  means over the classes present in ``labels`` (as scikit-learn's ``balanced_accuracy_score`` does).
- malignant-vs-benign at an operating point chosen on validation and applied unchanged to test.
- percentile bootstrap confidence intervals that resample lesions, not images.
- per-group (skin tone, sex, age band, body site) tables where small groups are flagged, not hidden.
- external sets with only some of the classes: probabilities renormalised over the classes present.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_specificity_at_sensitivity,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_recall,
    multiclass_specificity,
)

from skinsynth.data.schema import CLASSES, MALIGNANT, TONES

ECE_BINS = 15
FAIRNESS_ATTRIBUTES: tuple[str, ...] = ("tone", "sex", "age_band", "localization")
UNKNOWN_GROUP = "unknown"
FAIRNESS_CI_METRICS: tuple[str, ...] = (
    "balanced_accuracy",
    "macro_auroc",
    "malignant_sensitivity",
    "malignant_specificity",
)
FAIRNESS_COLUMNS: tuple[str, ...] = (
    "attribute",
    "group",
    "n",
    "n_malignant",
    "n_malignant_lesions",
    "n_benign_lesions",
    "balanced_accuracy",
    "balanced_accuracy_lo",
    "balanced_accuracy_hi",
    "macro_auroc",
    "macro_auroc_lo",
    "macro_auroc_hi",
    "malignant_auroc",
    "malignant_sensitivity",
    "malignant_sensitivity_lo",
    "malignant_sensitivity_hi",
    "malignant_specificity",
    "malignant_specificity_lo",
    "malignant_specificity_hi",
    "flagged",  # not judged (see fairness_report); the reason is in "reason"
    "reason",
    "too_small",  # = flagged (the column's older name, still read by the viewer)
)
FAIRNESS_GAP_COLUMNS: tuple[str, ...] = (
    "attribute",
    "metric",
    "comparison",
    "group",
    "versus",
    "gap",
    "gap_lo",
    "gap_hi",
    "excludes_zero",
)
_SUM_TOLERANCE = 1e-3  # float32 softmax rows sum to 1 within ~1e-6; rows further off than this are not probabilities
# torchmetrics warns when a class has no positives or no negatives; those figures are replaced by None here
_EXPECTED_WARNINGS = r".*(No positive samples|No negative samples|was `nan`|samples in target).*"


# ----------------------------------------------------------------------------------------------------------- inputs


def _tensor(x: Any, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a tensor or numeric array: {err}") from err


def _as_probs(probs: Any, num_classes: int | None = None, name: str = "probs") -> torch.Tensor:
    """``probs`` as a float64 ``[N, C]`` tensor of probabilities whose rows sum to 1, or a ValueError."""
    t = _tensor(probs, name)
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape [N, C], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating-point probabilities, got dtype {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if num_classes is not None and t.shape[1] != num_classes:
        raise ValueError(f"{name} has {t.shape[1]} columns but there are {num_classes} classes")
    t = t.detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if (t < 0).any() or (t > 1).any():
        raise ValueError(f"{name} must lie in [0, 1] (softmax output, not logits)")
    worst = (t.sum(dim=1) - 1).abs().max().item()
    if worst > _SUM_TOLERANCE:
        raise ValueError(f"rows of {name} must sum to 1 (softmax output); the worst row is off by {worst:.3g}")
    return t


def _as_labels(labels: Any, n: int, num_classes: int, name: str = "labels") -> torch.Tensor:
    """``labels`` as an int64 ``[N]`` tensor with values in ``[0, num_classes)``, or a ValueError."""
    t = _tensor(labels, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape [N], got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class labels, got dtype {t.dtype}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} rows but probs has {n}")
    t = t.detach().to("cpu", torch.int64)
    if (t < 0).any() or (t >= num_classes).any():
        raise ValueError(f"{name} must lie in [0, {num_classes}), got values {sorted(set(t.tolist()))}")
    return t


def _as_scores(scores: Any, name: str = "scores") -> torch.Tensor:
    """Binary scores as a float64 ``[N]`` tensor in ``[0, 1]``, or a ValueError."""
    t = _tensor(scores, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape [N], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating-point scores, got dtype {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    t = t.detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if (t < 0).any() or (t > 1).any():
        # torchmetrics would silently apply a sigmoid to scores outside [0, 1]
        raise ValueError(f"{name} must lie in [0, 1] (probabilities, not logits)")
    return t


def _as_binary_targets(targets: Any, n: int, name: str = "is_malignant") -> torch.Tensor:
    """Binary targets (bool or 0/1) as an int64 ``[N]`` tensor, or a ValueError."""
    t = _tensor(targets, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must have shape [N], got {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} rows but scores has {n}")
    if t.is_floating_point():
        raise ValueError(f"{name} must be bool or 0/1 integers, got dtype {t.dtype}")
    t = t.detach().to("cpu", torch.int64)
    if ((t != 0) & (t != 1)).any():
        raise ValueError(f"{name} must be bool or 0/1, got values {sorted(set(t.tolist()))}")
    return t


def _class_names(class_names: Sequence[str]) -> list[str]:
    names = list(class_names)
    if len(names) < 2:
        raise ValueError(f"need at least 2 classes, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {names}")
    return names


def _num(x: torch.Tensor | float | None) -> float | None:
    """A plain float, or None for an undefined (None or NaN) value."""
    if x is None:
        return None
    value = float(x)
    return None if math.isnan(value) else value


# ------------------------------------------------------------------------------------------------ multiclass metrics


def per_class_auroc(probs: Any, labels: Any) -> list[float | None]:
    """One-vs-rest AUROC per class; ``None`` for a class with no positives or no negatives in ``labels``.

    AUROC is the probability that a random positive scores above a random negative (Hanley & McNeil 1982,
    "The meaning and use of the area under a receiver operating characteristic (ROC) curve"); one-vs-rest
    multiclass averaging follows Provost & Domingos 2000 / Fawcett 2006 ("An introduction to ROC analysis").

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels.

    Returns:
        ``C`` values, each a float or ``None``.
    """
    p = _as_probs(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    return _per_class_auroc(p, y)


def _per_class_auroc(p: torch.Tensor, y: torch.Tensor) -> list[float | None]:
    num_classes = p.shape[1]
    support = torch.bincount(y, minlength=num_classes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EXPECTED_WARNINGS)
        auroc = multiclass_auroc(p, y, num_classes, average="none", validate_args=False)
    defined = (support > 0) & (support < y.shape[0])  # OvR AUROC needs both positives and negatives
    return [_num(a) if ok else None for a, ok in zip(auroc, defined.tolist())]


def macro_auroc(probs: Any, labels: Any) -> float | None:
    """Macro one-vs-rest AUROC over the classes that have positives and negatives in ``labels``.

    With every class present this equals torchmetrics' ``MulticlassAUROC(average="macro")`` and scikit-learn's
    ``roc_auc_score(multi_class="ovr", average="macro")``. References as in :func:`per_class_auroc`.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels.

    Returns:
        The mean of the defined per-class AUROCs, or ``None`` when none is defined.
    """
    defined = [a for a in per_class_auroc(probs, labels) if a is not None]
    return float(np.mean(defined)) if defined else None


def balanced_accuracy(probs: Any, labels: Any) -> float | None:
    """Balanced accuracy: the mean recall (sensitivity) of the top-1 prediction over the classes in ``labels``.

    Brodersen et al. 2010, "The balanced accuracy and its posterior distribution" (ICPR); the headline metric of
    ISIC 2018 task 3 (Codella et al. 2019) because HAM10000 is dominated by ``nv``. With every class present this
    is torchmetrics' ``MulticlassRecall(average="macro")``; a class absent from ``labels`` has no recall and is
    left out of the mean (as in scikit-learn's ``balanced_accuracy_score``), where torchmetrics would count a 0
    for it whenever the model predicts it.

    Args:
        probs: ``[N, C]`` class probabilities (predictions are the argmax).
        labels: ``[N]`` integer labels.

    Returns:
        The balanced accuracy (never ``None`` for a non-empty input; the type allows it for use with
        :func:`bootstrap_ci`).
    """
    p = _as_probs(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    return _balanced_accuracy(p, y)


def _balanced_accuracy(p: torch.Tensor, y: torch.Tensor) -> float | None:
    num_classes = p.shape[1]
    present = torch.bincount(y, minlength=num_classes) > 0
    recall = multiclass_recall(p, y, num_classes, average="none", validate_args=False)
    return _num(recall[present].mean()) if present.any() else None


# ------------------------------------------------------------------------------------------- logit adjustment

# the scales tried: 0 (no change) and both directions, since a model trained with class-balanced sampling and a
# weighted loss may under- or over-correct for the training prior (+ 0.0 turns the grid's -0.0 into 0.0)
LOGIT_ADJUSTMENT_TAUS: tuple[float, ...] = tuple(round(t, 2) + 0.0 for t in np.arange(-1.0, 2.0001, 0.1))


def smoothed_class_prior(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Training class frequencies with add-one (Laplace) smoothing, so a class with no image has a finite log."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or (c < 0).any():
        raise ValueError(f"class counts must be a 1-D array of non-negative counts, got {counts!r}")
    return (c + 1.0) / (c.sum() + len(c))


def logit_adjustment_offsets(prior: np.ndarray, tau: float) -> np.ndarray:
    """What post-hoc logit adjustment adds to each class's logit: ``-tau * log(prior)``."""
    return -float(tau) * np.log(np.asarray(prior, dtype=np.float64))


def adjust_probs(probs: Any, prior: np.ndarray, tau: float) -> np.ndarray:
    """Probabilities after post-hoc logit adjustment: ``softmax(logits - tau * log(prior))``.

    Equal to ``p_y * prior_y ** -tau``, renormalised, so it is computed from the probabilities themselves.
    """
    p = _as_probs(probs).double().numpy()
    scaled = p * np.exp(logit_adjustment_offsets(prior, tau))
    return (scaled / scaled.sum(axis=1, keepdims=True)).astype(np.float32)


def choose_logit_adjustment(
    probs: Any, labels: Any, prior: np.ndarray, taus: Sequence[float] = LOGIT_ADJUSTMENT_TAUS
) -> tuple[float, float, float]:
    """The logit-adjustment scale that maximises balanced accuracy on VALIDATION probabilities.

    Post-hoc logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment", ICLR) subtracts
    ``tau * log(prior)`` from the logits: with ``tau = 1`` the argmax becomes the balanced-error Bayes rule for a
    model of the training distribution. A model trained with class-balanced sampling and a weighted loss has
    already moved part of the way, by an amount nobody knows, so ``tau`` is chosen on validation (ties: the value
    nearest 0, the smallest change) and then applied unchanged to test, like the malignancy operating point.

    Args:
        probs: ``[N, C]`` validation probabilities.
        labels: ``[N]`` validation labels.
        prior: ``[C]`` training class prior (:func:`smoothed_class_prior`), all entries > 0.
        taus: the scales to try; must include 0.

    Returns:
        ``(tau, balanced accuracy at tau = 0, balanced accuracy at tau)``.
    """
    p = _as_probs(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (p.shape[1],) or (prior <= 0).any():
        raise ValueError(f"prior must hold {p.shape[1]} positive class frequencies, got {prior.tolist()}")
    if 0.0 not in taus:
        raise ValueError("the logit-adjustment scales must include 0 (no adjustment)")
    scores = {float(t): _balanced_accuracy(torch.from_numpy(adjust_probs(p, prior, t)), y) or 0.0 for t in taus}
    best = max(scores, key=lambda t: (round(scores[t], 12), -abs(t)))
    return best, scores[0.0], scores[best]


def malignant_indices(class_names: Sequence[str] = CLASSES) -> list[int]:
    """Column indices of the malignant classes (``akiec``, ``bcc``, ``mel``) within ``class_names``."""
    return [i for i, name in enumerate(class_names) if name in MALIGNANT]


def malignant_scores(probs: Any, class_names: Sequence[str] = CLASSES) -> torch.Tensor:
    """The malignancy score of each image: the summed probability of the malignant classes (akiec, bcc, mel).

    Args:
        probs: ``[N, C]`` class probabilities, columns in ``class_names`` order.
        class_names: the class of each column.

    Returns:
        A float64 ``[N]`` tensor in ``[0, 1]``.
    """
    names = _class_names(class_names)
    p = _as_probs(probs, len(names))
    idx = malignant_indices(names)
    if not idx:
        raise ValueError(f"none of {names} is malignant ({sorted(MALIGNANT)}); there is no malignancy score")
    # rounding can push a sum of probabilities a hair past 1; torchmetrics would take that for a logit
    return p[:, idx].sum(dim=1).clamp(0.0, 1.0)


def is_malignant_label(labels: Any, class_names: Sequence[str] = CLASSES) -> torch.Tensor:
    """``[N]`` bool tensor: whether each integer label (in ``class_names`` order) is a malignant class."""
    names = _class_names(class_names)
    y = _tensor(labels, "labels")
    y = _as_labels(y, y.shape[0] if y.ndim == 1 else 0, len(names))
    lookup = torch.zeros(len(names), dtype=torch.bool)
    lookup[malignant_indices(names)] = True
    return lookup[y]


def worst_group_sensitivity(
    probs: Any, labels: Any, groups: Sequence[str | None], min_malignant: int = 10, threshold: float = 0.5
) -> tuple[float | None, str | None]:
    """The lowest malignant sensitivity over the groups (e.g. estimated skin tones) with enough malignant images.

    A malignant image counts as found when its malignancy score (:func:`malignant_scores`) reaches ``threshold``:
    a fixed rule, so that training can report it every epoch, before any operating point is chosen. Images of an
    unknown group (None, NaN or ``"unknown"``) form no group. The worst-group view follows group distributionally
    robust optimisation (Sagawa et al. 2020, "Distributionally Robust Neural Networks for Group Shifts", ICLR).

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels.
        groups: the group of each image.
        min_malignant: groups with fewer malignant images than this are not judged.
        threshold: the malignancy score from which an image counts as called malignant.

    Returns:
        ``(sensitivity, group)`` of the worst judged group, or ``(None, None)`` when no group has enough images.
    """
    if min_malignant < 1:
        raise ValueError(f"min_malignant must be >= 1, got {min_malignant}")
    scores = malignant_scores(probs)
    positive = is_malignant_label(labels).numpy()
    if len(groups) != len(positive):
        raise ValueError(f"groups has {len(groups)} entries for {len(positive)} images")
    names = np.array([UNKNOWN_GROUP if pd.isna(g) else str(g) for g in groups], dtype=object)
    found = (scores >= threshold).numpy()
    worst: tuple[float | None, str | None] = (None, None)
    for group in sorted(set(names) - {UNKNOWN_GROUP}):
        members = (names == group) & positive
        if members.sum() < min_malignant:
            continue
        sensitivity = float(found[members].mean())
        if worst[0] is None or sensitivity < worst[0]:
            worst = (sensitivity, group)
    return worst


def malignant_auroc(probs: Any, labels: Any, class_names: Sequence[str] = CLASSES) -> float | None:
    """AUROC of the malignancy score (:func:`malignant_scores`) for malignant vs benign labels.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels.
        class_names: the class of each column.

    Returns:
        The AUROC, or ``None`` when ``labels`` lack malignant or benign images or no class is malignant.
    """
    names = _class_names(class_names)
    p = _as_probs(probs, len(names))
    y = _as_labels(labels, p.shape[0], len(names))
    if not malignant_indices(names):
        return None
    return _binary_auroc(malignant_scores(p, names), is_malignant_label(y, names).long())


def _binary_auroc(scores: torch.Tensor, targets: torch.Tensor) -> float | None:
    n_pos = int(targets.sum())
    if n_pos == 0 or n_pos == targets.shape[0]:
        return None
    return _num(binary_auroc(scores, targets, validate_args=False))


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = ECE_BINS) -> float:
    """Top-label expected calibration error, L1, with equal-width confidence bins.

    ``ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|`` over bins of the top-1 confidence (Naeini et al.
    2015, "Obtaining well calibrated probabilities using Bayesian binning", AAAI; 15 bins as in Guo et al. 2017,
    "On calibration of modern neural networks", ICML). Computed by torchmetrics' ``MulticlassCalibrationError``
    (``norm="l1"``), whose bins are ``[k/n_bins, (k+1)/n_bins)`` with a confidence of exactly 1 in the last bin, in
    float32.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels.
        n_bins: number of equal-width bins on ``[0, 1]``.

    Returns:
        The ECE in ``[0, 1]``.
    """
    p = _as_probs(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    return float(multiclass_calibration_error(p, y, p.shape[1], n_bins=n_bins, norm="l1", validate_args=False))


def classification_metrics(probs: Any, labels: Any, class_names: Sequence[str] = CLASSES) -> dict[str, Any]:
    """The classifier's multiclass report: balanced accuracy, macro AUROC, per-class figures, confusion, calibration.

    Predictions are the argmax of ``probs``. Classes absent from ``labels`` do not crash anything: their
    sensitivity, F1 and AUROC are ``None`` and the macro figures (balanced accuracy, macro AUROC, macro F1) are
    means over the classes present in ``labels`` only - so a macro figure on a split missing a class is not
    comparable one-to-one with one on a split that has every class; ``absent_classes`` says which were left out.
    Specificity needs only negatives and is reported for absent classes too.

    References: balanced accuracy, Brodersen et al. 2010; one-vs-rest AUROC, Hanley & McNeil 1982 and Fawcett 2006;
    expected calibration error, Naeini et al. 2015 with 15 bins as in Guo et al. 2017 (see the functions above).

    Args:
        probs: ``[N, C]`` class probabilities (softmax output), columns in ``class_names`` order.
        labels: ``[N]`` integer labels in ``[0, C)``.
        class_names: the class of each column (default: the 7 HAM10000 classes).

    Returns:
        ``n``, ``classes``, ``absent_classes``, ``accuracy``, ``balanced_accuracy``, ``macro_auroc``, ``macro_f1``,
        ``ece``, ``malignant_auroc`` (malignancy score vs malignant labels; ``None`` when undefined),
        ``per_class`` (class name -> ``support``, ``sensitivity``, ``specificity``, ``f1``, ``auroc``) and
        ``confusion_matrix`` (``C x C`` list of lists, rows = true class, columns = predicted class).
    """
    names = _class_names(class_names)
    num_classes = len(names)
    p = _as_probs(probs, num_classes)
    y = _as_labels(labels, p.shape[0], num_classes)
    n = y.shape[0]

    support = torch.bincount(y, minlength=num_classes)
    present = support > 0
    recall = multiclass_recall(p, y, num_classes, average="none", validate_args=False)
    specificity = multiclass_specificity(p, y, num_classes, average="none", validate_args=False)
    f1 = multiclass_f1_score(p, y, num_classes, average="none", validate_args=False)
    auroc = _per_class_auroc(p, y)
    confusion = multiclass_confusion_matrix(p, y, num_classes, validate_args=False)

    per_class = {}
    for i, name in enumerate(names):
        has_pos, has_neg = bool(present[i]), int(support[i]) < n
        per_class[name] = {
            "support": int(support[i]),
            "sensitivity": _num(recall[i]) if has_pos else None,
            "specificity": _num(specificity[i]) if has_neg else None,
            "f1": _num(f1[i]) if has_pos else None,
            "auroc": auroc[i],
        }
    defined_auroc = [a for a in auroc if a is not None]
    return {
        "n": int(n),
        "classes": names,
        "absent_classes": [name for name, ok in zip(names, present.tolist()) if not ok],
        "accuracy": float(multiclass_accuracy(p, y, num_classes, average="micro", validate_args=False)),
        "balanced_accuracy": _num(recall[present].mean()),
        "macro_auroc": float(np.mean(defined_auroc)) if defined_auroc else None,
        "macro_f1": _num(f1[present].mean()),
        "ece": float(multiclass_calibration_error(p, y, num_classes, n_bins=ECE_BINS, norm="l1", validate_args=False)),
        "malignant_auroc": (
            _binary_auroc(malignant_scores(p, names), is_malignant_label(y, names).long())
            if malignant_indices(names)
            else None
        ),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


# ----------------------------------------------------------------------------------------- malignant vs benign


def choose_operating_point(scores: Any, is_malignant: Any, min_sensitivity: float = 0.90) -> float:
    """The malignancy threshold to use on test, chosen on VALIDATION: the highest one reaching the target sensitivity.

    An image is called malignant when ``score >= threshold``. Among the thresholds whose sensitivity is at least
    ``min_sensitivity``, the highest has the best specificity (fewest benign lesions sent to biopsy), so that is the
    one returned (torchmetrics' ``BinarySpecificityAtSensitivity``, exact ROC thresholds). Choosing it on the test
    set itself would overstate test sensitivity; apply the returned value unchanged with :func:`binary_metrics_at`.

    Args:
        scores: ``[N]`` malignancy scores in ``[0, 1]`` (:func:`malignant_scores`) on the validation split.
        is_malignant: ``[N]`` bool or 0/1 targets; needs malignant and benign images.
        min_sensitivity: the sensitivity to reach, in ``(0, 1]``.

    Returns:
        The threshold (one of the scores of the malignant images).
    """
    s = _as_scores(scores)
    t = _as_binary_targets(is_malignant, s.shape[0])
    if not 0.0 < min_sensitivity <= 1.0:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}")
    n_pos = int(t.sum())
    if n_pos == 0 or n_pos == t.shape[0]:
        raise ValueError(f"an operating point needs malignant and benign images; {n_pos} of {len(t)} are malignant")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EXPECTED_WARNINGS)
        _, threshold = binary_specificity_at_sensitivity(s, t, min_sensitivity, validate_args=False)
    return float(threshold)


def binary_metrics_at(scores: Any, is_malignant: Any, threshold: float) -> dict[str, Any]:
    """Malignant-vs-benign performance at a fixed threshold (``score >= threshold`` means malignant).

    Args:
        scores: ``[N]`` malignancy scores in ``[0, 1]``.
        is_malignant: ``[N]`` bool or 0/1 targets.
        threshold: the operating point from :func:`choose_operating_point` on validation.

    Returns:
        ``auroc``, ``sensitivity`` (``None`` without malignant images), ``specificity`` (``None`` without benign
        images), ``threshold``, ``n_pos``, ``n_neg``.
    """
    s = _as_scores(scores)
    t = _as_binary_targets(is_malignant, s.shape[0]).bool()
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    called = s >= threshold
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    return {
        "auroc": _binary_auroc(s, t.long()),
        "sensitivity": int((called & t).sum()) / n_pos if n_pos else None,
        "specificity": int((~called & ~t).sum()) / n_neg if n_neg else None,
        "threshold": float(threshold),
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


# ------------------------------------------------------------------------------------------------------- bootstrap


class LesionBootstrap:
    """One set of lesion-bootstrap resamples (a cluster bootstrap over lesions), drawn once and reused.

    Each resample draws as many lesions as there are, uniformly with replacement, and takes every image of each drawn
    lesion (a lesion drawn twice contributes its images twice), so resamples vary in size when lesions do. The draws
    for all resamples come from one ``numpy.random.default_rng(seed)`` call. An evaluation draws them once and uses
    them for every interval it reports - the overall metrics (:func:`bootstrap_ci`), each group's metrics and the
    gaps between groups (:func:`fairness_report`) - so all of them describe the same resampled lesion sets.

    Args:
        groups: ``[N]`` group id per row (e.g. ``group_id``, the lesion).
        n_boot: number of resamples.
        seed: seed of the random generator.
    """

    def __init__(self, groups: Any, n_boot: int, seed: int = 0) -> None:
        g = np.asarray(groups, dtype=object)
        if g.ndim != 1:
            raise ValueError(f"groups must have shape [N], got {g.shape}")
        codes, uniques = pd.factorize(g, use_na_sentinel=False)
        if len(codes) == 0:
            raise ValueError("groups is empty")
        if n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {n_boot}")
        self.codes = codes.astype(np.int64)
        self.n_lesions = len(uniques)
        self.n_boot = int(n_boot)
        self.seed = seed
        self.draws = np.random.default_rng(seed).integers(0, self.n_lesions, size=(n_boot, self.n_lesions))

    @property
    def n_rows(self) -> int:
        """The number of rows (images) the resamples are drawn from."""
        return len(self.codes)

    def indices(self) -> Iterator[np.ndarray]:
        """Row indices of each resample (one int64 array per resample), gathered without a Python loop over lesions."""
        order = np.argsort(self.codes, kind="stable")  # rows of lesion g are order[starts[g] : starts[g] + counts[g]]
        counts = np.bincount(self.codes, minlength=self.n_lesions)
        starts = np.cumsum(counts) - counts
        for drawn in self.draws:
            sizes = counts[drawn]
            offsets = np.cumsum(sizes) - sizes  # where each drawn lesion begins in the resample
            within = np.arange(sizes.sum()) - np.repeat(offsets, sizes)
            yield order[np.repeat(starts[drawn], sizes) + within]

    def weights(self) -> np.ndarray:
        """``[n_boot, N]`` float64: how many times each row appears in each resample (its lesion's draw count)."""
        flat = (self.draws + self.n_lesions * np.arange(self.n_boot)[:, None]).ravel()
        drawn = np.bincount(flat, minlength=self.n_boot * self.n_lesions).reshape(self.n_boot, self.n_lesions)
        return drawn[:, self.codes].astype(np.float64)


def group_bootstrap_indices(groups: Any, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` cluster-bootstrap resamples: groups drawn with replacement, each with all its rows.

    The resamples of ``LesionBootstrap(groups, n_boot, seed).indices()`` (see :class:`LesionBootstrap`).

    Args:
        groups: ``[N]`` group id per row (e.g. ``group_id``, the lesion).
        n_boot: number of resamples.
        seed: seed of the random generator.

    Yields:
        One int64 array of row indices per resample.
    """
    yield from LesionBootstrap(groups, n_boot, seed).indices()


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch single-threaded for a while, then restore the thread count.

    A resample is a few thousand numbers: intra-op threads only add synchronisation, and on a busy machine (2 cores
    shared with a training run) their spin-waits made the resamples many times slower (docs/results.md).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bootstrap_ci(
    metric_fn: Callable[[torch.Tensor, torch.Tensor], float | None],
    probs: Any,
    labels: Any,
    groups: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    resamples: LesionBootstrap | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of a metric, resampling lesions rather than images.

    The ``1 - alpha`` percentile interval (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13) over
    a cluster bootstrap (Field & Welsh 2007, "Bootstrapping clustered data", JRSS B): images of one lesion are
    near-duplicates, so resampling images would treat them as independent evidence and give intervals that are too
    narrow. Resamples where the metric is undefined (``metric_fn`` returns ``None`` or NaN, e.g. an AUROC on a
    resample without malignant lesions) are skipped. Ready-made ``metric_fn``: :func:`balanced_accuracy`,
    :func:`macro_auroc`, :func:`malignant_auroc`; 1,000 resamples of a test set take seconds on one CPU core
    (docs/results.md). torch runs single-threaded meanwhile (restored after).

    Args:
        metric_fn: ``metric_fn(probs, labels) -> float | None`` on one resample (float64 ``[n, C]`` and int64 ``[n]``
            tensors).
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels.
        groups: ``[N]`` group id (lesion) per row (not used when ``resamples`` is given).
        n_boot: number of resamples.
        alpha: 1 - coverage (0.05 gives a 95% interval).
        seed: seed of the resampling; the same seed gives the same interval.
        resamples: lesion resamples drawn once for several figures (:class:`LesionBootstrap` over ``groups``);
            when given, ``n_boot`` and ``seed`` are not used.

    Returns:
        ``(low, high)``, the ``alpha/2`` and ``1 - alpha/2`` quantiles of the metric over the valid resamples.
    """
    p = _as_probs(probs)
    y = _as_labels(labels, p.shape[0], p.shape[1])
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if resamples is None:
        g = np.asarray(groups, dtype=object)
        if g.ndim != 1 or g.shape[0] != p.shape[0]:
            raise ValueError(f"groups must have shape [{p.shape[0]}], got {g.shape}")
        resamples = LesionBootstrap(g, n_boot, seed)
    elif resamples.n_rows != p.shape[0]:
        raise ValueError(f"resamples are drawn over {resamples.n_rows} rows but probs has {p.shape[0]}")
    values = []
    with _one_torch_thread():
        for rows in resamples.indices():
            idx = torch.from_numpy(rows)
            value = metric_fn(p[idx], y[idx])
            if value is not None and not math.isnan(value):
                values.append(float(value))
    if not values:
        raise ValueError(f"the metric was undefined on all {resamples.n_boot} resamples")
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# -------------------------------------------------------------------------------------------------------- fairness


def _group_values(column: pd.Series) -> pd.Series:
    """The column as strings, missing values as ``unknown``."""
    return column.astype(object).where(column.notna(), UNKNOWN_GROUP).astype(str)


def _group_order(attribute: str, values: Sequence[str]) -> list[str]:
    """Tone groups in ITA order (lightest first), other attributes sorted, ``unknown`` last."""
    known = [v for v in set(values) if v != UNKNOWN_GROUP]
    if attribute == "tone":
        rank = {tone: i for i, tone in enumerate(TONES)}
        known.sort(key=lambda v: (rank.get(v, len(rank)), v))
    else:
        known.sort()
    return known + ([UNKNOWN_GROUP] if UNKNOWN_GROUP in values else [])


def _weight_below(
    wt: np.ndarray,
    order: np.ndarray,
    new_block: np.ndarray,
    new_segment: np.ndarray,
    source: np.ndarray,
    at: np.ndarray,
) -> np.ndarray:
    """Weighted counts behind an AUROC: for each row ``at``, the weight of the ``source`` rows of its segment with a
    lower score, plus half of those with the same score (a tie counts one half).

    Args:
        wt: ``[N, B]`` row weights (one column per resample).
        order: ``[N]`` rows sorted by segment, then score.
        new_block / new_segment: ``[N]`` bool in sorted order, True where a tie block / a segment begins (a segment
            begins a block; position 0 begins both).
        source / at: ``[N]`` bool in sorted order, disjoint (e.g. negatives / positives of a class).

    Returns:
        ``[at.sum(), B]``, rows in sorted order.
    """
    source_pos, at_pos = np.flatnonzero(source), np.flatnonzero(at)
    cumulative = np.zeros((len(source_pos) + 1, wt.shape[1]))
    np.cumsum(wt[order[source_pos]], axis=0, out=cumulative[1:])  # row m: weight of the first m source rows

    def upto(positions: np.ndarray) -> np.ndarray:  # weight of the source rows before each sorted position
        return cumulative[np.searchsorted(source_pos, positions)]

    starts = np.flatnonzero(new_block)
    block = np.cumsum(new_block)[at_pos] - 1
    below = upto(starts[block])
    if len(starts) < len(order):  # ties: half of the source rows in the same block
        ends = np.append(starts[1:], len(order))
        below += 0.5 * (upto(ends[block]) - below)
    segment_starts = np.flatnonzero(new_segment)
    if len(segment_starts) > 1:
        below -= upto(segment_starts[np.cumsum(new_segment)[at_pos] - 1])
    return below


def _subset_metrics(
    weights: np.ndarray,
    partitions: Sequence[np.ndarray],
    n_subsets: int,
    probs: np.ndarray,
    labels: np.ndarray,
    malignant: np.ndarray,
    called: np.ndarray,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Balanced accuracy, macro AUROC and malignant sensitivity/specificity of every subset and of its complement,
    under every row weighting at once (no loop over resamples).

    Args:
        weights: ``[B, N]`` row multiplicities (one row per resample; a row of ones is the plain set).
        partitions: ``[N]`` int arrays, each giving every row's subset (column in ``[0, n_subsets)``); the subsets of
            one partition (the groups of one attribute) are disjoint and cover the rows.
        n_subsets: the number of subsets over all partitions.
        probs: ``[N, C]`` probabilities; labels ``[N]``; malignant and called ``[N]`` bool (truth, and score at or
            above the threshold).

    Returns:
        Metric -> ``(inside, outside)``, two ``[B, n_subsets]`` float64 arrays, NaN where undefined. The weighted
        figures equal the unweighted ones on the resampled rows (a row of weight ``k`` counted ``k`` times): balanced
        accuracy over the classes present, AUROC as the Mann-Whitney statistic with ties counted one half (what the
        ROC trapezoid gives), macro AUROC over the classes with positives and negatives.
    """
    w = weights
    n, num_classes = probs.shape
    onehots = []
    for part in partitions:
        onehots.append(np.zeros((n, n_subsets)))
        onehots[-1][np.arange(n), part] = 1.0
    member = np.sum(onehots, axis=0)  # [N, n_subsets]: 1 where a row belongs to a subset
    correct = probs.argmax(1) == labels
    onehot = np.eye(num_classes)[labels]
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    # balanced accuracy: recall per (subset, class), mean over the classes present
    cls = (member[:, :, None] * onehot[:, None, :]).reshape(n, -1)
    den_in = (w @ cls).reshape(len(w), n_subsets, num_classes)
    num_in = (w @ (cls * correct[:, None])).reshape(den_in.shape)
    den_out = (w @ onehot)[:, None, :] - den_in
    num_out = (w @ (onehot * correct[:, None]))[:, None, :] - num_in

    def mean_present(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        present = den > 0
        total = np.where(present, ratio(num, den), 0.0).sum(-1)
        return ratio(total, present.sum(-1).astype(float))

    out["balanced_accuracy"] = (mean_present(num_in, den_in), mean_present(num_out, den_out))

    # malignant sensitivity / specificity at the fixed threshold
    for name, hit, base in (
        ("malignant_sensitivity", malignant & called, malignant),
        ("malignant_specificity", ~malignant & ~called, ~malignant),
    ):
        num, den = w @ (member * hit[:, None]), w @ (member * base[:, None])
        num_all, den_all = w @ hit.astype(float), w @ base.astype(float)
        out[name] = (ratio(num, den), ratio(num_all[:, None] - num, den_all[:, None] - den))

    # macro one-vs-rest AUROC: U(A, B) = sum over positives i in A and negatives j in B of w_i w_j H(s_i - s_j);
    # inside = U(S, S), outside U(R, R) = U(all, all) - U(S, all) - U(all, S) + U(S, S) with R the rest
    sums = [np.zeros((len(w), n_subsets)) for _ in range(4)]  # AUROC sums and counts, inside and outside
    wt = np.ascontiguousarray(w.T)  # [N, B]: rows gathered in score order are contiguous
    whole = np.zeros(n, dtype=bool)
    whole[0] = True
    for c in range(num_classes):
        s, pos = probs[:, c], labels == c
        neg = ~pos
        p_in, n_in = w @ (member * pos[:, None]), w @ (member * neg[:, None])
        p_all, n_all = w @ pos.astype(float), w @ neg.astype(float)
        if not pos.any() or not neg.any():
            continue  # undefined on every subset
        order = np.argsort(s, kind="stable")
        so = s[order]
        new_block = whole | np.r_[True, so[1:] != so[:-1]]
        pos_rows, neg_rows = order[pos[order]], order[neg[order]]
        contrib = wt[pos_rows] * _weight_below(wt, order, new_block, whole, neg[order], pos[order])
        u_all = contrib.sum(0)
        u_s_all = (member[pos_rows].T @ contrib).T
        # U(all, S) = P(all) N(S) - sum over negatives j in S of w_j (positive weight under s_j, ties halved)
        pos_below = wt[neg_rows] * _weight_below(wt, order, new_block, whole, pos[order], neg[order])
        u_all_s = p_all[:, None] * n_in - (member[neg_rows].T @ pos_below).T
        u_ss = np.zeros((len(w), n_subsets))
        for part, onehot_part in zip(partitions, onehots):
            order_p = np.lexsort((s, part))
            part_o, s_o = part[order_p], s[order_p]
            new_segment = np.r_[True, part_o[1:] != part_o[:-1]]
            new_block_p = new_segment | np.r_[True, s_o[1:] != s_o[:-1]]
            rows_p = order_p[pos[order_p]]
            inside = wt[rows_p] * _weight_below(wt, order_p, new_block_p, new_segment, neg[order_p], pos[order_p])
            u_ss += (onehot_part[rows_p].T @ inside).T
        p_out, n_out = p_all[:, None] - p_in, n_all[:, None] - n_in
        u_rr = u_all[:, None] - u_s_all - u_all_s + u_ss
        for k, (u, pairs) in enumerate(((u_ss, p_in * n_in), (u_rr, p_out * n_out))):
            auc = ratio(u, pairs)
            sums[2 * k] += np.nan_to_num(auc)
            sums[2 * k + 1] += ~np.isnan(auc)
    out["macro_auroc"] = (ratio(sums[0], sums[1]), ratio(sums[2], sums[3]))
    return out


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``alpha/2`` and ``1 - alpha/2`` quantiles of each column over its defined (non-NaN) resamples; NaN where
    no resample is defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        low, high = np.nanquantile(values, [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


def _judge(
    y: np.ndarray,
    malignant: np.ndarray,
    lesions: np.ndarray,
    names: Sequence[str],
    min_class_images: int,
    min_positives: int,
) -> tuple[int, int, str]:
    """Malignant and benign lesion counts of a group, and why it cannot be judged (``""`` when it can)."""
    counts = np.bincount(y, minlength=len(names))
    enough = [names[c] for c in range(len(names)) if counts[c] >= min_class_images]
    n_mal = len(np.unique(lesions[malignant]))
    n_ben = len(np.unique(lesions[~malignant]))
    reasons = []
    if len(enough) < 2:
        have = f" ({', '.join(enough)})" if enough else ""
        reasons.append(f"2 classes with >= {min_class_images} images needed, has {len(enough)}{have}")
    if n_mal < min_positives:
        reasons.append(f"{min_positives} malignant lesions needed, has {n_mal}")
    if n_ben < min_positives:
        reasons.append(f"{min_positives} benign lesions needed, has {n_ben}")
    return n_mal, n_ben, "; ".join(reasons)


def fairness_report(
    probs: Any,
    labels: Any,
    groups_df: pd.DataFrame,
    threshold: float,
    lesions: Any = None,
    min_class_images: int = 10,
    min_positives: int = 5,
    class_names: Sequence[str] = CLASSES,
    *,
    resamples: LesionBootstrap | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-group performance with lesion-bootstrap intervals, and the gaps between groups with theirs.

    Subgroup reporting across skin tone follows Kinyanjui et al. 2020 ("Fairness of classifiers across skin tones in
    dermatology", MICCAI; ITA-estimated tone) and Daneshjou et al. 2022 ("Disparities in dermatology AI performance on
    a diverse, curated clinical image set", Science Advances). The malignant operating point is the one fixed on
    validation, so sensitivity differences between groups are what a deployed threshold would do to each.

    Balanced accuracy inside a group is the mean recall over the classes present in that group (as everywhere in
    this module), so a group with one class scores that class's recall alone and is not comparable with the others:
    hence the judging rule. A group is judged (may be the worst or best group, enters the gaps) only when it has at
    least ``min_class_images`` images of each of at least two classes, and at least ``min_positives`` malignant and
    ``min_positives`` benign lesions (distinct ``lesions``); other groups are flagged with the reason, not hidden.

    The 95% (``1 - alpha``) percentile intervals resample lesions, on the same resamples as the overall figures when
    ``resamples`` is the evaluation's :class:`LesionBootstrap`; a gap's interval is the percentile interval of the
    difference on each resample (resamples where either side is undefined are skipped). The worst and best groups are
    picked on the point estimates, so a worst-vs-best gap is biased away from 0 (the largest of several differences);
    a group-vs-rest gap is not.

    Args:
        probs: ``[N, C]`` class probabilities.
        labels: ``[N]`` integer labels.
        groups_df: ``N`` rows (in the order of ``probs``) with any of the columns ``tone``, ``sex``, ``age_band``
            (see ``skinsynth.data.schema.age_band``), ``localization``; other columns are ignored. Missing values
            form their own group ``unknown``.
        threshold: malignancy threshold from :func:`choose_operating_point` on validation.
        lesions: ``[N]`` lesion (``group_id``) per row; default: that of ``resamples``, else one lesion per image.
        min_class_images: images a class needs in a group to count towards the two classes a judged group needs.
        min_positives: malignant lesions, and benign lesions, a judged group needs.
        class_names: the class of each column.
        resamples: the lesion resamples to use; default: ``LesionBootstrap(lesions, n_boot, seed)``.
        n_boot: number of resamples when ``resamples`` is not given.
        seed: seed of the resampling when ``resamples`` is not given.
        alpha: 1 - coverage.

    Returns:
        ``(table, gaps)``. ``table``: one row per (attribute, group) with the columns of ``FAIRNESS_COLUMNS``:
        counts (``n_malignant_lesions``, ``n_benign_lesions`` distinct lesions), the figures (NaN when undefined),
        ``<metric>_lo`` / ``<metric>_hi`` for the metrics of ``FAIRNESS_CI_METRICS``, ``flagged`` and ``reason`` (why
        a group is not judged, ``""`` when it is) and ``too_small`` (= ``flagged``, the older name). Attributes in the
        order of ``FAIRNESS_ATTRIBUTES``; tone groups lightest first, others sorted, ``unknown`` last. ``gaps``: the
        columns of ``FAIRNESS_GAP_COLUMNS``, one row per metric of ``FAIRNESS_CI_METRICS`` and attribute with two
        judged groups or more (``comparison`` ``worst_vs_best``: ``group`` the best, ``versus`` the worst) and per
        metric and judged group (``comparison`` ``vs_rest``: ``versus`` ``rest``, all other images); ``gap`` is the
        figure of ``group`` minus that of ``versus``.
    """
    names = _class_names(class_names)
    p = _as_probs(probs, len(names))
    y = _as_labels(labels, p.shape[0], len(names))
    if not isinstance(groups_df, pd.DataFrame):
        raise ValueError(f"groups_df must be a pandas DataFrame, got {type(groups_df).__name__}")
    if len(groups_df) != p.shape[0]:
        raise ValueError(f"groups_df has {len(groups_df)} rows but probs has {p.shape[0]}")
    attributes = [a for a in FAIRNESS_ATTRIBUTES if a in groups_df.columns]
    if not attributes:
        raise ValueError(f"groups_df has none of the columns {list(FAIRNESS_ATTRIBUTES)}: {list(groups_df.columns)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if min_class_images < 1 or min_positives < 1:
        raise ValueError(f"min_class_images and min_positives must be >= 1, got {min_class_images}, {min_positives}")
    if resamples is None:
        resamples = LesionBootstrap(np.arange(p.shape[0]) if lesions is None else lesions, n_boot, seed)
    elif resamples.n_rows != p.shape[0]:
        raise ValueError(f"resamples are drawn over {resamples.n_rows} rows but probs has {p.shape[0]}")
    lesion_codes = resamples.codes if lesions is None else pd.factorize(np.asarray(lesions, dtype=object))[0]
    if len(lesion_codes) != p.shape[0]:
        raise ValueError(f"lesions has {len(lesion_codes)} rows but probs has {p.shape[0]}")
    scores = malignant_scores(p, names)
    malignant = is_malignant_label(y, names)
    y_np, mal_np = y.numpy(), malignant.numpy()

    rows, partitions = [], []
    for attribute in attributes:
        values = _group_values(groups_df[attribute].reset_index(drop=True)).to_numpy()
        part = np.zeros(len(values), dtype=np.int64)
        for value in _group_order(attribute, list(set(values.tolist()))):
            where = values == value
            part[where] = len(rows)
            idx = torch.from_numpy(np.flatnonzero(where))
            binary = binary_metrics_at(scores[idx], malignant[idx], threshold)
            per_class = _per_class_auroc(p[idx], y[idx])
            defined = [a for a in per_class if a is not None]
            n_mal, n_ben, reason = _judge(
                y_np[where], mal_np[where], lesion_codes[where], names, min_class_images, min_positives
            )
            rows.append(
                {
                    "attribute": attribute,
                    "group": value,
                    "n": int(idx.shape[0]),
                    "n_malignant": binary["n_pos"],
                    "n_malignant_lesions": n_mal,
                    "n_benign_lesions": n_ben,
                    "balanced_accuracy": _balanced_accuracy(p[idx], y[idx]),
                    "macro_auroc": float(np.mean(defined)) if defined else None,
                    "malignant_auroc": binary["auroc"],
                    "malignant_sensitivity": binary["sensitivity"],
                    "malignant_specificity": binary["specificity"],
                    "flagged": bool(reason),
                    "reason": reason,
                    "too_small": bool(reason),
                }
            )
        partitions.append(part)
    table = pd.DataFrame(rows)

    probs_np = p.numpy()
    called = scores.numpy() >= threshold
    with _one_torch_thread():
        point = _subset_metrics(np.ones((1, len(y_np))), partitions, len(rows), probs_np, y_np, mal_np, called)
        boot = _subset_metrics(resamples.weights(), partitions, len(rows), probs_np, y_np, mal_np, called)
    gaps = []
    for metric in FAIRNESS_CI_METRICS:
        table[f"{metric}_lo"], table[f"{metric}_hi"] = _percentile_interval(boot[metric][0], alpha)
        inside, outside = boot[metric]
        for attribute, judged in table[~table["flagged"]].groupby("attribute", sort=False):
            judged = judged.dropna(subset=[metric])
            pairs = [(k, "rest", float(judged.loc[k, metric]) - point[metric][1][0, k]) for k in judged.index]
            if len(judged) >= 2:
                # the last of equal lowest values: with every group equal, the gap is still between two groups
                best, worst = judged[metric].idxmax(), judged[metric][::-1].idxmin()
                gap = float(judged.loc[best, metric] - judged.loc[worst, metric])
                pairs.insert(0, (best, worst, gap))
            for k, versus, gap in pairs:
                diff = inside[:, k] - (outside[:, k] if versus == "rest" else inside[:, versus])
                low, high = (float(v[0]) for v in _percentile_interval(diff[:, None], alpha))
                gaps.append(
                    {
                        "attribute": attribute,
                        "metric": metric,
                        "comparison": "vs_rest" if versus == "rest" else "worst_vs_best",
                        "group": table.loc[k, "group"],
                        "versus": "rest" if versus == "rest" else table.loc[versus, "group"],
                        "gap": gap,
                        "gap_lo": low,
                        "gap_hi": high,
                        "excludes_zero": bool(low > 0 or high < 0),  # False when undefined (NaN)
                    }
                )
    table = table.reindex(columns=list(FAIRNESS_COLUMNS))
    floats = [c for c in FAIRNESS_COLUMNS[6:] if c not in ("flagged", "reason", "too_small")]
    gaps_df = pd.DataFrame(gaps, columns=list(FAIRNESS_GAP_COLUMNS))
    return table.astype({column: "float64" for column in floats}), gaps_df


def fairness_table(
    probs: Any,
    labels: Any,
    groups_df: pd.DataFrame,
    threshold: float,
    lesions: Any = None,
    min_class_images: int = 10,
    min_positives: int = 5,
    class_names: Sequence[str] = CLASSES,
    *,
    resamples: LesionBootstrap | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-group performance with lesion-bootstrap intervals, small groups flagged rather than hidden: the table of
    :func:`fairness_report` (see there for the arguments, the judging rule and the columns)."""
    table, _ = fairness_report(
        probs,
        labels,
        groups_df,
        threshold,
        lesions,
        min_class_images,
        min_positives,
        class_names,
        resamples=resamples,
        n_boot=n_boot,
        seed=seed,
    )
    return table


def _gap_entry(row: pd.Series) -> dict[str, Any]:
    low, high = row["gap_lo"], row["gap_hi"]
    defined = bool(np.isfinite(low) and np.isfinite(high))
    return {
        "gap": float(row["gap"]),
        "ci_95": [float(low), float(high)] if defined else None,
        "excludes_zero": bool(row["excludes_zero"]) and defined,
    }


def fairness_summary(table: pd.DataFrame, gaps: pd.DataFrame | None = None) -> dict[str, dict[str, Any]]:
    """Per attribute: the worst group, the largest gaps between groups, and the groups too small to judge.

    Only groups not flagged are judged (see :func:`fairness_report`); a gap is the max - min over judged groups with a
    defined value.

    Args:
        table: the table of :func:`fairness_report` (or :func:`fairness_table`).
        gaps: the gaps of :func:`fairness_report`; with them each attribute also gets ``gaps``.

    Returns:
        Attribute -> ``worst_group`` and ``worst_balanced_accuracy`` (lowest balanced accuracy), ``best_group`` and
        ``best_balanced_accuracy``, ``balanced_accuracy_gap``, ``malignant_sensitivity_gap`` (``None`` with fewer than
        two judged groups), ``judged_groups`` and ``flagged_groups`` (lists of group values), ``flag_reasons``
        (flagged group -> reason) and, with ``gaps``, ``gaps``: metric -> ``worst_vs_best`` (``best_group``,
        ``worst_group``, ``gap`` = best - worst, ``ci_95``, ``excludes_zero``; ``None`` with fewer than two judged
        groups) and ``vs_rest`` (judged group -> ``gap`` = group - rest of the images, ``ci_95``, ``excludes_zero``).
        ``ci_95`` is ``None`` and ``excludes_zero`` False where no resample defines the gap.
    """
    missing = {"attribute", "group", "balanced_accuracy", "malignant_sensitivity", "too_small"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks the columns {sorted(missing)}; pass the output of fairness_table")

    def gap(values: pd.Series) -> float | None:
        values = values.dropna()
        return float(values.max() - values.min()) if len(values) >= 2 else None

    summary: dict[str, dict[str, Any]] = {}
    for attribute, rows in table.groupby("attribute", sort=False):
        flagged = rows["too_small"].astype(bool)
        judged = rows[~flagged]
        accuracy = judged.dropna(subset=["balanced_accuracy"])
        worst = accuracy.loc[accuracy["balanced_accuracy"].idxmin()] if len(accuracy) else None
        best = accuracy.loc[accuracy["balanced_accuracy"].idxmax()] if len(accuracy) else None
        reasons = rows["reason"] if "reason" in rows.columns else pd.Series("too small", index=rows.index)
        block: dict[str, Any] = {
            "worst_group": None if worst is None else str(worst["group"]),
            "worst_balanced_accuracy": None if worst is None else float(worst["balanced_accuracy"]),
            "best_group": None if best is None else str(best["group"]),
            "best_balanced_accuracy": None if best is None else float(best["balanced_accuracy"]),
            "balanced_accuracy_gap": gap(judged["balanced_accuracy"]),
            "malignant_sensitivity_gap": gap(judged["malignant_sensitivity"]),
            "judged_groups": [str(g) for g in judged["group"]],
            "flagged_groups": [str(g) for g in rows.loc[flagged, "group"]],
            "flag_reasons": {str(g): str(r) for g, r in zip(rows.loc[flagged, "group"], reasons[flagged])},
        }
        if gaps is not None:
            mine = gaps[gaps["attribute"] == attribute]
            block["gaps"] = {}
            for metric in FAIRNESS_CI_METRICS:
                these = mine[mine["metric"] == metric]
                extreme = these[these["comparison"] == "worst_vs_best"]
                worst_vs_best = None
                if len(extreme):
                    row = extreme.iloc[0]
                    worst_vs_best = {"best_group": str(row["group"]), "worst_group": str(row["versus"])}
                    worst_vs_best.update(_gap_entry(row))
                block["gaps"][metric] = {
                    "worst_vs_best": worst_vs_best,
                    "vs_rest": {
                        str(row["group"]): _gap_entry(row)
                        for _, row in these[these["comparison"] == "vs_rest"].iterrows()
                    },
                }
        summary[str(attribute)] = block
    return summary


# ---------------------------------------------------------------------------------------------------- external sets


def restrict_to_classes(
    probs: Any, labels: Any, present_classes: Sequence[str], class_names: Sequence[str] = CLASSES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities renormalised over a subset of classes, and labels re-indexed into that subset.

    For an external set that only has some classes (ISIC 2017: ``mel``, ``bkl``, ``nv``), the model's probability
    mass on classes that cannot occur is removed: ``p'_k = p_k / sum_{j in subset} p_j``. The argmax among the subset
    is unchanged, so this only rescales confidences (and hence calibration).

    Args:
        probs: ``[N, C]`` class probabilities over all ``class_names``.
        labels: ``[N]`` integer labels in the full ``class_names`` order; each must be one of ``present_classes``.
        present_classes: the classes of the external set (at least 2); reported in ``class_names`` order.
        class_names: the class of each column of ``probs``.

    Returns:
        ``(probs_k, labels_k)``: float64 ``[N, K]`` rows summing to 1 and int64 ``[N]`` labels in ``[0, K)``.
    """
    names = _class_names(class_names)
    p = _as_probs(probs, len(names))
    y = _as_labels(labels, p.shape[0], len(names))
    unknown = [c for c in present_classes if c not in names]
    if unknown:
        raise ValueError(f"present_classes {unknown} are not among the classes {names}")
    if len(set(present_classes)) != len(present_classes) or len(present_classes) < 2:
        raise ValueError(f"present_classes must be at least 2 distinct classes, got {list(present_classes)}")
    keep = [i for i, name in enumerate(names) if name in set(present_classes)]
    remap = torch.full((len(names),), -1, dtype=torch.int64)
    remap[keep] = torch.arange(len(keep))
    y_k = remap[y]
    if (y_k < 0).any():
        outside = sorted({names[i] for i in y[y_k < 0].tolist()})
        raise ValueError(f"labels include classes {outside} outside present_classes {list(present_classes)}")
    mass = p[:, keep].sum(dim=1, keepdim=True)
    if (mass <= 0).any():
        raise ValueError("some rows put zero probability on every class in present_classes; cannot renormalise")
    return p[:, keep] / mass, y_k


def external_metrics(
    probs: Any, labels: Any, present_classes: Sequence[str], class_names: Sequence[str] = CLASSES
) -> dict[str, Any]:
    """:func:`classification_metrics` on an external set restricted to the classes it has.

    Args:
        probs: ``[N, C]`` class probabilities over all ``class_names``.
        labels: ``[N]`` integer labels in the full ``class_names`` order, all within ``present_classes``.
        present_classes: the external set's classes (e.g. ``["mel", "bkl", "nv"]`` for ISIC 2017, Codella et al.
            2018).
        class_names: the class of each column of ``probs``.

    Returns:
        The :func:`classification_metrics` dict over the restricted classes (in ``class_names`` order; the malignant
        AUROC then scores only the malignant classes among them), plus ``renormalised_over`` (those classes).
    """
    names = _class_names(class_names)
    p_k, y_k = restrict_to_classes(probs, labels, present_classes, names)
    kept = [name for name in names if name in set(present_classes)]
    return {**classification_metrics(p_k, y_k, kept), "renormalised_over": kept}


def metric_drop(internal: dict[str, Any], external: dict[str, Any]) -> dict[str, float | None]:
    """How much worse the external set is: ``internal - external`` for the headline figures (positive = a drop).

    Macro figures over 7 internal classes and over an external subset are not like for like; for a strict
    comparison pass as ``internal`` the :func:`external_metrics` of the internal test rows of the same classes.

    Args:
        internal: :func:`classification_metrics` (or :func:`external_metrics`) on the internal test split.
        external: :func:`external_metrics` on the external set.

    Returns:
        ``balanced_accuracy``, ``macro_auroc``, ``malignant_auroc`` differences; ``None`` where either is ``None``.
    """
    keys = ("balanced_accuracy", "macro_auroc", "malignant_auroc")
    for name, report in (("internal", internal), ("external", external)):
        missing = [k for k in keys if k not in report]
        if missing:
            raise ValueError(f"{name} lacks {missing}; pass classification_metrics / external_metrics output")
    return {
        k: None if internal[k] is None or external[k] is None else float(internal[k]) - float(external[k])
        for k in keys
    }
