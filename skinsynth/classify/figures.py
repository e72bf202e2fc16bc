"""PNG figures of an evaluation: ROC curves, confusion matrix, reliability diagram, per-group bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from skinsynth.classify import metrics as M  # noqa: E402
from skinsynth.data.schema import CLASSES  # noqa: E402

FOOTER = "skinsynth research output - not a diagnosis"


def save_figure(fig: plt.Figure, path: Path) -> str:
    fig.text(0.99, 0.005, FOOTER, ha="right", va="bottom", fontsize=7, color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def roc_figure(labels: np.ndarray, probs: np.ndarray, path: Path) -> str:
    """One-vs-rest ROC per class present, plus malignant vs benign."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, dx in enumerate(CLASSES):
        positive = labels == i
        if positive.any() and (~positive).any():
            fpr, tpr, _ = roc_curve(positive, probs[:, i])
            ax.plot(fpr, tpr, lw=1, label=dx)
    malignant = M.is_malignant_label(labels).numpy()
    if malignant.any() and (~malignant).any():
        fpr, tpr, _ = roc_curve(malignant, M.malignant_scores(probs).numpy())
        ax.plot(fpr, tpr, lw=2.5, color="black", label="malignant vs benign")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (test)")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def confusion_figure(matrix: list[list[int]], path: Path) -> str:
    """Row-normalised confusion matrix with counts."""
    counts = np.asarray(matrix, dtype=float)
    norm = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for r in range(len(CLASSES)):
        for c in range(len(CLASSES)):
            ax.text(
                c,
                r,
                int(counts[r, c]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[r, c] > 0.5 else "black",
            )
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test, row-normalised)")
    return save_figure(fig, path)


def reliability_figure(labels: np.ndarray, probs: np.ndarray, ece: float, path: Path, n_bins: int = 15) -> str:
    """Top-label reliability diagram (Guo et al. 2017)."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    centres, accuracy = [], []
    for b in range(n_bins):
        members = which == b
        if members.any():
            centres.append(confidence[members].mean())
            accuracy.append(correct[members].mean())
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.plot(centres, accuracy, marker="o")
    ax.set(
        xlabel="confidence", ylabel="accuracy", title=f"Reliability (test), ECE {ece:.3f}", xlim=(0, 1), ylim=(0, 1)
    )
    return save_figure(fig, path)


def group_bars_figure(fairness: pd.DataFrame, path: Path) -> str:
    """Balanced accuracy per group for each attribute, with its 95% lesion-bootstrap interval as an error bar (when
    the table has ``balanced_accuracy_lo`` / ``_hi``); groups not judged (too small) are hatched."""
    attributes = list(dict.fromkeys(fairness["attribute"]))
    fig, axes = plt.subplots(len(attributes), 1, figsize=(7, 2.2 * len(attributes)), squeeze=False)
    for ax, attribute in zip(axes[:, 0], attributes):
        rows = fairness[fairness["attribute"] == attribute]
        values = rows["balanced_accuracy"].fillna(0).to_numpy()
        yerr = None
        if {"balanced_accuracy_lo", "balanced_accuracy_hi"} <= set(rows.columns):
            below = (values - rows["balanced_accuracy_lo"].to_numpy()).clip(0)
            above = (rows["balanced_accuracy_hi"].to_numpy() - values).clip(0)
            yerr = np.nan_to_num(np.stack([below, above]))  # no interval (undefined): no bar
        bars = ax.bar(range(len(rows)), values, color="tab:blue", yerr=yerr, capsize=3, ecolor="black")
        for bar, small in zip(bars, rows["too_small"]):
            if small:
                bar.set_hatch("//")
                bar.set_alpha(0.4)
        ax.set_xticks(range(len(rows)), [f"{g}\n(n={n})" for g, n in zip(rows["group"], rows["n"])], fontsize=7)
        ax.set(ylim=(0, 1), ylabel="bal. acc.", title=f"{attribute} (95% lesion-bootstrap CI; hatched: not judged)")
    return save_figure(fig, path)


def write_figures(
    out_dir: Path, test: pd.DataFrame, probs: np.ndarray, report: dict[str, Any], fairness: pd.DataFrame
) -> list[str]:
    """Write every figure of an evaluation into ``out_dir``; returns the file names."""
    labels = test["label"].to_numpy(np.int64)
    return [
        roc_figure(labels, probs, out_dir / "roc_test.png"),
        confusion_figure(report["test"]["confusion_matrix"], out_dir / "confusion_test.png"),
        reliability_figure(labels, probs, report["test"]["ece"], out_dir / "reliability_test.png"),
        group_bars_figure(fairness, out_dir / "fairness_test.png"),
    ]
