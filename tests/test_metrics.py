"""Classifier metrics against scikit-learn, hand computations and hand-made fairness / bootstrap cases."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score
from torchmetrics.classification import MulticlassAUROC, MulticlassRecall

from skinsynth.classify.metrics import (
    LesionBootstrap,
    adjust_probs,
    balanced_accuracy,
    binary_metrics_at,
    bootstrap_ci,
    choose_logit_adjustment,
    choose_operating_point,
    classification_metrics,
    expected_calibration_error,
    external_metrics,
    fairness_report,
    fairness_summary,
    fairness_table,
    group_bootstrap_indices,
    is_malignant_label,
    macro_auroc,
    malignant_auroc,
    malignant_scores,
    metric_drop,
    restrict_to_classes,
    smoothed_class_prior,
    worst_group_sensitivity,
)
from skinsynth.data.schema import CLASS_TO_LABEL, CLASSES
from tests.conftest import logit_adjustment_case

TOL = 1e-6


def random_probs(n: int, num_classes: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that lean towards the true label (so metrics are away from chance) and the labels."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    logits = rng.normal(size=(n, num_classes))
    logits[np.arange(n), labels] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


def confident(label: int, predicted: int, num_classes: int = 7) -> np.ndarray:
    """A probability row with 0.9 on ``predicted`` and the rest spread evenly."""
    row = np.full(num_classes, 0.1 / (num_classes - 1))
    row[predicted] = 0.9
    return row


# --------------------------------------------------------------------------------------------- multiclass metrics


def test_classification_metrics_agree_with_sklearn():
    probs, labels = random_probs(400)
    predicted = probs.argmax(axis=1)
    report = classification_metrics(torch.from_numpy(probs), torch.from_numpy(labels))

    assert report["n"] == 400 and report["classes"] == list(CLASSES) and report["absent_classes"] == []
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=TOL)
    assert report["macro_auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"), abs=TOL)
    assert report["accuracy"] == pytest.approx((predicted == labels).mean(), abs=TOL)
    assert report["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"), abs=TOL)
    assert report["confusion_matrix"] == confusion_matrix(labels, predicted).tolist()

    recall = recall_score(labels, predicted, average=None)
    f1 = f1_score(labels, predicted, average=None)
    cm = confusion_matrix(labels, predicted)
    for k, name in enumerate(CLASSES):
        row = report["per_class"][name]
        tn = cm.sum() - cm[k, :].sum() - cm[:, k].sum() + cm[k, k]
        assert row["support"] == int((labels == k).sum())
        assert row["sensitivity"] == pytest.approx(recall[k], abs=TOL)
        assert row["f1"] == pytest.approx(f1[k], abs=TOL)
        assert row["specificity"] == pytest.approx(tn / (labels != k).sum(), abs=TOL)
        assert row["auroc"] == pytest.approx(roc_auc_score(labels == k, probs[:, k]), abs=TOL)

    malignant = np.isin(labels, [CLASS_TO_LABEL[c] for c in ("akiec", "bcc", "mel")])
    score = probs[:, [CLASS_TO_LABEL[c] for c in ("akiec", "bcc", "mel")]].sum(axis=1)
    assert report["malignant_auroc"] == pytest.approx(roc_auc_score(malignant, score), abs=TOL)
    json.dumps(report, allow_nan=False)  # plain Python types only


def test_macro_figures_equal_torchmetrics_macro_when_every_class_is_present():
    probs, labels = random_probs(300, seed=1)
    p, y = torch.from_numpy(probs), torch.from_numpy(labels)
    assert balanced_accuracy(p, y) == pytest.approx(MulticlassRecall(7, average="macro")(p, y).item(), abs=TOL)
    assert macro_auroc(p, y) == pytest.approx(MulticlassAUROC(7, average="macro")(p, y).item(), abs=TOL)


def test_absent_classes_give_none_and_macro_figures_over_present_classes():
    probs, labels = random_probs(300, seed=2)
    labels = labels.copy()
    labels[labels == CLASS_TO_LABEL["df"]] = CLASS_TO_LABEL["nv"]
    labels[labels == CLASS_TO_LABEL["vasc"]] = CLASS_TO_LABEL["bkl"]
    predicted = probs.argmax(axis=1)
    assert set(predicted) >= {CLASS_TO_LABEL["df"], CLASS_TO_LABEL["vasc"]}  # absent classes are still predicted

    report = classification_metrics(probs, labels)

    assert report["absent_classes"] == ["df", "vasc"]
    for name in ("df", "vasc"):
        row = report["per_class"][name]
        assert row["support"] == 0 and row["sensitivity"] is None and row["auroc"] is None and row["f1"] is None
        assert row["specificity"] is not None  # needs only negatives
    text = json.dumps(report, allow_nan=False)
    assert "NaN" not in text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn: "y_pred contains classes not in y_true"
        expected_ba = balanced_accuracy_score(labels, predicted)
    assert report["balanced_accuracy"] == pytest.approx(expected_ba, abs=TOL)
    present = sorted(set(labels))
    expected_auroc = np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present])
    assert report["macro_auroc"] == pytest.approx(expected_auroc, abs=TOL)


def test_a_single_class_split_has_no_auroc():
    probs, _ = random_probs(20, seed=3)
    report = classification_metrics(probs, np.full(20, CLASS_TO_LABEL["nv"]))
    assert report["macro_auroc"] is None and report["malignant_auroc"] is None
    assert report["per_class"]["nv"]["specificity"] is None  # no negatives
    json.dumps(report, allow_nan=False)


def test_ece_equals_hand_computation():
    probs = np.array(
        [
            [0.90, 0.05, 0.05],
            [0.62, 0.30, 0.08],
            [0.20, 0.71, 0.09],
            [0.10, 0.15, 0.75],
            [0.45, 0.44, 0.11],
            [0.33, 0.34, 0.33],
            [0.05, 0.93, 0.02],
            [0.55, 0.25, 0.20],
            [0.21, 0.21, 0.58],
            [0.97, 0.02, 0.01],
        ]
    )
    labels = np.array([0, 1, 1, 2, 1, 0, 1, 0, 1, 0])

    # Naeini et al. 2015 / Guo et al. 2017: 15 equal-width bins of the top-1 confidence, L1
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = (predicted == labels).astype(float)
    bins = np.minimum((confidence * 15).astype(int), 14)
    expected = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        expected += in_bin.sum() / len(labels) * abs(correct[in_bin].mean() - confidence[in_bin].mean())

    assert expected == pytest.approx(0.228, abs=1e-9)  # the same by hand on paper
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=TOL)
    assert classification_metrics(probs, labels, ["akiec", "bcc", "bkl"])["ece"] == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize(
    "probs, labels, message",
    [
        (np.full(7, 1 / 7), np.array([0]), r"shape \[N, C\]"),
        (np.full((3, 7), 1 / 7), np.array([0, 1]), "has 2 rows but probs has 3"),
        (np.full((2, 7), 1 / 7), np.array([[0], [1]]), r"shape \[N\]"),
        (np.full((2, 7), 1 / 7), np.array([0, 7]), r"\[0, 7\)"),
        (np.full((2, 7), 1 / 7), np.array([0.0, 1.0]), "integer class labels"),
        (np.full((2, 5), 1 / 5), np.array([0, 1]), "5 columns but there are 7 classes"),
        (np.full((2, 7), 0.5), np.array([0, 1]), "sum to 1"),
        (np.array([[2.0, -1.0, 0, 0, 0, 0, 0]]), np.array([0]), "not logits"),
        (np.full((2, 7), np.nan), np.array([0, 1]), "NaN"),
        (np.zeros((0, 7)), np.zeros(0, dtype=int), "empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(probs, labels, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(probs, labels)


# ----------------------------------------------------------------------------------------- malignant vs benign


def test_malignant_scores_sum_the_malignant_columns():
    probs, labels = random_probs(50, seed=4)
    expected = probs[:, [0, 1, 4]].sum(axis=1)  # akiec, bcc, mel
    assert torch.allclose(malignant_scores(probs), torch.from_numpy(expected), atol=1e-12)
    assert is_malignant_label(labels).tolist() == np.isin(labels, [0, 1, 4]).tolist()
    with pytest.raises(ValueError, match="malignant"):
        malignant_scores(np.full((2, 2), 0.5), ["bkl", "nv"])


def sensitivity_at(scores: np.ndarray, positive: np.ndarray, threshold: float) -> float:
    return float((scores[positive] >= threshold).mean())


def test_operating_point_is_the_highest_threshold_reaching_the_sensitivity():
    positives = [0.95, 0.90, 0.85, 0.80, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20]
    negatives = [0.10, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75]
    scores = np.array(positives + negatives)
    positive = np.array([True] * 10 + [False] * 7)

    threshold = choose_operating_point(scores, positive, min_sensitivity=0.90)

    # 9 of 10 positives must be called: the 9th highest positive score; specificity 2/7 (0.10 and 0.25 below it)
    assert threshold == pytest.approx(0.30)
    assert sensitivity_at(scores, positive, threshold) >= 0.9
    higher = scores[scores > threshold]
    assert all(sensitivity_at(scores, positive, t) < 0.9 for t in higher)
    at = binary_metrics_at(scores, positive, threshold)
    assert at["sensitivity"] == pytest.approx(0.9) and at["specificity"] == pytest.approx(2 / 7)
    assert (at["n_pos"], at["n_neg"], at["threshold"]) == (10, 7, pytest.approx(0.30))
    assert at["auroc"] == pytest.approx(roc_auc_score(positive, scores), abs=TOL)
    assert choose_operating_point(scores, positive, min_sensitivity=1.0) == pytest.approx(0.20)


def test_operating_point_matches_brute_force_with_ties():
    rng = np.random.default_rng(5)
    scores = np.round(rng.uniform(size=300), 2)  # many tied scores
    positive = rng.uniform(size=300) < scores  # higher scores more often malignant
    for target in (0.8, 0.9, 0.95):
        threshold = choose_operating_point(scores, positive, target)
        valid = [t for t in np.unique(scores) if sensitivity_at(scores, positive, t) >= target]
        assert threshold == pytest.approx(max(valid), abs=1e-12)
        assert binary_metrics_at(scores, positive, threshold)["sensitivity"] >= target


def test_binary_metrics_without_positives_are_none():
    at = binary_metrics_at(np.array([0.1, 0.7]), np.array([0, 0]), 0.5)
    assert at == {"auroc": None, "sensitivity": None, "specificity": 0.5, "threshold": 0.5, "n_pos": 0, "n_neg": 2}
    with pytest.raises(ValueError, match="malignant and benign"):
        choose_operating_point(np.array([0.1, 0.7]), np.array([0, 0]))
    with pytest.raises(ValueError, match="not logits"):
        choose_operating_point(np.array([-2.0, 3.0]), np.array([0, 1]))


# ------------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_draws_whole_lesions():
    rng = np.random.default_rng(6)
    groups = np.repeat([f"lesion_{i}" for i in range(40)], rng.integers(1, 5, 40))
    rng.shuffle(groups)  # members of one lesion are not adjacent
    sizes = pd.Series(groups).value_counts()
    for rows in group_bootstrap_indices(groups, n_boot=50, seed=0):
        drawn = pd.Series(groups[rows]).value_counts()
        times = drawn / sizes[drawn.index]  # how often each drawn lesion was drawn
        assert (times == times.round()).all()  # every member of a drawn lesion, the same number of times
        for lesion in drawn.index:
            members = np.flatnonzero(groups == lesion)
            counts = np.bincount(rows, minlength=len(groups))[members]
            assert (counts == counts[0]).all()
        assert times.sum() == 40  # as many lesion draws as lesions


def test_bootstrap_ci_contains_the_estimate_and_is_deterministic():
    probs, labels = random_probs(300, seed=7)
    groups = np.arange(300) // 2
    low, high = bootstrap_ci(balanced_accuracy, probs, labels, groups, n_boot=200, seed=1)
    assert low < balanced_accuracy(probs, labels) < high
    assert bootstrap_ci(balanced_accuracy, probs, labels, groups, n_boot=200, seed=1) == (low, high)
    assert bootstrap_ci(balanced_accuracy, probs, labels, groups, n_boot=200, seed=2) != (low, high)


def test_duplicated_lesion_images_do_not_narrow_the_interval():
    probs, labels = random_probs(120, seed=8)
    lesions = np.arange(120)
    once = bootstrap_ci(macro_auroc, probs, labels, lesions, n_boot=100, seed=3)

    # every lesion photographed three times (identical images): resampling lesions sees the same evidence
    triple = np.repeat(np.arange(120), 3)
    thrice = bootstrap_ci(macro_auroc, probs[triple], labels[triple], lesions[triple], n_boot=100, seed=3)
    assert thrice == pytest.approx(once, abs=1e-9)

    # treating the copies as independent images is what makes an interval too narrow
    per_image = bootstrap_ci(macro_auroc, probs[triple], labels[triple], np.arange(360), n_boot=100, seed=3)
    assert per_image[1] - per_image[0] < 0.75 * (once[1] - once[0])


def test_bootstrap_skips_resamples_where_the_metric_is_undefined():
    probs, labels = random_probs(30, seed=9)
    labels = np.where(np.isin(labels, [0, 1, 4]), CLASS_TO_LABEL["nv"], labels)
    labels[0] = CLASS_TO_LABEL["mel"]  # one malignant lesion: missing from about 1/e of the resamples
    seen: list[float | None] = []

    def metric(p, y):
        seen.append(malignant_auroc(p, y))
        return seen[-1]

    low, high = bootstrap_ci(metric, probs, labels, np.arange(30), n_boot=100)
    assert 0 < seen.count(None) < 100 and 0.0 <= low <= high <= 1.0
    with pytest.raises(ValueError, match="undefined on all"):
        bootstrap_ci(lambda p, y: None, probs, labels, np.arange(30), n_boot=10)
    with pytest.raises(ValueError, match="groups must have shape"):
        bootstrap_ci(balanced_accuracy, probs, labels, np.arange(29), n_boot=10)


# ------------------------------------------------------------------------------------------------------- fairness


def fairness_example() -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """light: 40 correct; brown: 40 with every melanoma called a nevus; intermediate: 35 with 3 melanomas; dark: 10."""
    mel, nv = CLASS_TO_LABEL["mel"], CLASS_TO_LABEL["nv"]
    rows, tones = [], []
    for tone, n_mel, n_nv, mel_called in (
        ("light", 20, 20, mel),
        ("brown", 20, 20, nv),
        ("intermediate", 3, 32, mel),
        ("dark", 5, 5, mel),
    ):
        rows += [(mel, mel_called)] * n_mel + [(nv, nv)] * n_nv
        tones += [tone] * (n_mel + n_nv)
    labels = np.array([label for label, _ in rows])
    probs = np.stack([confident(label, called) for label, called in rows])
    sex = np.array(["female", "male", None, "male"] * (len(rows) // 4) + ["female"] * (len(rows) % 4), dtype=object)
    return probs, labels, pd.DataFrame({"tone": tones, "sex": sex, "image_id": np.arange(len(rows))})


def test_fairness_table_counts_flags_and_figures():
    probs, labels, meta = fairness_example()
    table = fairness_table(probs, labels, meta, threshold=0.5)

    tone = table[table["attribute"] == "tone"].set_index("group")
    assert list(tone.index) == ["light", "intermediate", "brown", "dark"]  # ITA order, lightest first
    assert tone["n"].to_dict() == {"light": 40, "intermediate": 35, "brown": 40, "dark": 10}
    assert tone["n_malignant"].to_dict() == {"light": 20, "intermediate": 3, "brown": 20, "dark": 5}
    assert tone["too_small"].to_dict() == {"light": False, "intermediate": True, "brown": False, "dark": True}
    assert tone.loc["light", "balanced_accuracy"] == pytest.approx(1.0)
    assert tone.loc["brown", "balanced_accuracy"] == pytest.approx(0.5)  # mean of recall 0 (mel) and 1 (nv)
    assert tone.loc["brown", "malignant_sensitivity"] == 0.0 and tone.loc["light", "malignant_sensitivity"] == 1.0
    assert tone.loc["brown", "malignant_specificity"] == 1.0
    assert tone.loc["light", "macro_auroc"] == pytest.approx(1.0)

    sex = table[table["attribute"] == "sex"].set_index("group")
    assert list(sex.index) == ["female", "male", "unknown"]  # missing values are a group of their own
    expected = pd.Series(meta["sex"].fillna("unknown")).value_counts()
    assert sex["n"].to_dict() == expected.to_dict()
    assert set(table["attribute"]) == {"tone", "sex"}  # image_id is not an attribute
    assert table["n"].groupby(table["attribute"]).sum().tolist() == [125, 125]


def test_fairness_summary_finds_the_worst_group_and_the_gaps():
    probs, labels, meta = fairness_example()
    summary = fairness_summary(fairness_table(probs, labels, meta, threshold=0.5))

    tone = summary["tone"]
    assert tone["worst_group"] == "brown" and tone["worst_balanced_accuracy"] == pytest.approx(0.5)
    assert tone["best_group"] == "light"
    assert tone["balanced_accuracy_gap"] == pytest.approx(0.5)
    assert tone["malignant_sensitivity_gap"] == pytest.approx(1.0)
    assert tone["judged_groups"] == ["light", "brown"]
    assert tone["flagged_groups"] == ["intermediate", "dark"]  # flagged, not hidden
    json.dumps(summary, allow_nan=False)


def test_fairness_table_rejects_bad_metadata():
    probs, labels, meta = fairness_example()
    with pytest.raises(ValueError, match="rows but probs"):
        fairness_table(probs, labels, meta.iloc[:-1], threshold=0.5)
    with pytest.raises(ValueError, match="none of the columns"):
        fairness_table(probs, labels, meta[["image_id"]], threshold=0.5)


def two_group_case(accuracy_b: float, accuracy_a: float = 1.0, n_lesions: int = 80, seed: int = 0, exact=False):
    """Tone groups 'light' and 'brown', each ``n_lesions`` one-image lesions, half mel and half nv; each image's
    prediction is right with probability ``accuracy_a`` (light) / ``accuracy_b`` (brown), else the other class
    (``exact``: exactly that share of each class is right)."""
    mel, nv = CLASS_TO_LABEL["mel"], CLASS_TO_LABEL["nv"]
    rng = np.random.default_rng(seed)
    labels, probs, tones = [], [], []
    for tone, accuracy in (("light", accuracy_a), ("brown", accuracy_b)):
        for i in range(n_lesions):
            label = mel if i % 2 else nv
            right = (i // 2) % 10 < 10 * accuracy if exact else rng.random() < accuracy
            labels.append(label)
            probs.append(confident(label, label if right else (nv if label == mel else mel)))
            tones.append(tone)
    return np.stack(probs), np.array(labels), pd.DataFrame({"tone": tones})


def _gap(gaps: pd.DataFrame, metric: str, comparison: str, group: str) -> pd.Series:
    rows = gaps[(gaps["metric"] == metric) & (gaps["comparison"] == comparison) & (gaps["group"] == group)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_fairness_gap_interval_finds_a_known_gap_and_contains_zero_without_one():
    # light is always right (balanced accuracy 1), brown right half the time by chance (0.5): the true gap is 0.5
    probs, labels, meta = two_group_case(accuracy_b=0.5)
    table, gaps = fairness_report(probs, labels, meta, threshold=0.5, n_boot=400, seed=0)
    tone = table.set_index("group")
    assert not tone["flagged"].any()
    assert tone.loc["light", "balanced_accuracy_lo"] == pytest.approx(1.0)
    assert tone.loc["brown", "balanced_accuracy_lo"] < tone.loc["brown", "balanced_accuracy"]
    assert tone.loc["brown", "balanced_accuracy"] < tone.loc["brown", "balanced_accuracy_hi"]
    extreme = _gap(gaps, "balanced_accuracy", "worst_vs_best", "light")
    assert extreme["versus"] == "brown"
    assert extreme["gap_lo"] <= 0.5 <= extreme["gap_hi"] and extreme["gap_lo"] > 0 and extreme["excludes_zero"]
    vs_rest = _gap(gaps, "balanced_accuracy", "vs_rest", "brown")  # brown minus the rest (= light)
    assert vs_rest["gap"] == pytest.approx(-extreme["gap"])
    assert vs_rest["gap_lo"] <= -0.5 <= vs_rest["gap_hi"] < 0 and vs_rest["excludes_zero"]
    summary = fairness_summary(table, gaps)["tone"]["gaps"]["balanced_accuracy"]
    assert summary["worst_vs_best"]["worst_group"] == "brown" and summary["worst_vs_best"]["excludes_zero"] is True
    assert summary["worst_vs_best"]["ci_95"] == pytest.approx([extreme["gap_lo"], extreme["gap_hi"]])
    assert summary["vs_rest"]["brown"]["excludes_zero"] is True
    json.dumps(fairness_summary(table, gaps), allow_nan=False)

    # both groups right on 80% of each class: no gap, and the intervals say it may be 0
    probs, labels, meta = two_group_case(accuracy_b=0.8, accuracy_a=0.8, exact=True)
    table, gaps = fairness_report(probs, labels, meta, threshold=0.5, n_boot=400, seed=0)
    for metric in ("balanced_accuracy", "malignant_sensitivity", "malignant_specificity"):
        for comparison, group in (("vs_rest", "light"), ("vs_rest", "brown")):
            row = _gap(gaps, metric, comparison, group)
            assert row["gap_lo"] < 0 < row["gap_hi"] and not row["excludes_zero"], (metric, group)
    extreme = gaps[(gaps["metric"] == "balanced_accuracy") & (gaps["comparison"] == "worst_vs_best")].iloc[0]
    assert extreme["gap_lo"] < 0 < extreme["gap_hi"] and not extreme["excludes_zero"]
    assert (
        fairness_summary(table, gaps)["tone"]["gaps"]["balanced_accuracy"]["worst_vs_best"]["excludes_zero"] is False
    )


def test_fairness_flags_a_one_class_group_with_its_reason():
    probs, labels, meta = two_group_case(accuracy_b=0.5, n_lesions=40)
    mel = CLASS_TO_LABEL["mel"]
    # 'dark': 12 melanoma images of 3 lesions, all called melanoma (a perfect-looking group that proves nothing)
    probs = np.concatenate([probs, np.stack([confident(mel, mel)] * 12)])
    labels = np.concatenate([labels, np.full(12, mel)])
    meta = pd.concat([meta, pd.DataFrame({"tone": ["dark"] * 12})], ignore_index=True)
    lesions = np.concatenate([np.arange(80), 1000 + np.arange(12) // 4])
    table, gaps = fairness_report(probs, labels, meta, 0.5, lesions, n_boot=50)
    dark = table.set_index("group").loc["dark"]
    assert dark["flagged"] and dark["too_small"] and dark["n_malignant_lesions"] == 3
    assert dark["reason"] == (
        "2 classes with >= 10 images needed, has 1 (mel); 5 malignant lesions needed, has 3; "
        "5 benign lesions needed, has 0"
    )
    assert table.loc[~table["flagged"], "reason"].eq("").all() and table["flagged"].sum() == 1
    assert "dark" not in set(gaps["group"]) | set(gaps["versus"])  # not judged: in no gap
    summary = fairness_summary(table, gaps)["tone"]
    assert summary["flagged_groups"] == ["dark"] and summary["flag_reasons"]["dark"] == dark["reason"]
    assert summary["best_group"] == "light"  # dark's balanced accuracy of 1 is not a 'best group'
    # the thresholds are settings: with 1 image per class and 1 lesion the group only lacks a second class
    relaxed = fairness_table(probs, labels, meta, 0.5, lesions, min_class_images=1, min_positives=1, n_boot=20)
    assert relaxed.set_index("group").loc["dark", "reason"] == (
        "2 classes with >= 1 images needed, has 1 (mel); 1 benign lesions needed, has 0"
    )


def test_fairness_intervals_resample_lesions_not_images():
    probs, labels, meta = two_group_case(accuracy_b=0.7, accuracy_a=0.9, seed=2)
    once, once_gaps = fairness_report(probs, labels, meta, 0.5, np.arange(len(labels)), n_boot=300, seed=4)
    # every lesion photographed twice (identical images): resampling lesions sees the same evidence
    twice = np.repeat(np.arange(len(labels)), 2)
    lesion, lesion_gaps = fairness_report(
        probs[twice], labels[twice], meta.iloc[twice], 0.5, twice, n_boot=300, seed=4
    )
    columns = [
        f"{m}_{end}" for m in ("balanced_accuracy", "macro_auroc", "malignant_specificity") for end in ("lo", "hi")
    ]
    assert np.allclose(lesion[columns], once[columns])
    assert np.allclose(lesion_gaps[["gap_lo", "gap_hi"]], once_gaps[["gap_lo", "gap_hi"]])
    # resampling the copies as independent images narrows every interval (by about 1/sqrt(2))
    image, image_gaps = fairness_report(
        probs[twice], labels[twice], meta.iloc[twice], 0.5, np.arange(len(twice)), n_boot=300, seed=4
    )
    width = lambda t, m: (t[f"{m}_hi"] - t[f"{m}_lo"]).to_numpy()  # noqa: E731
    assert (width(image, "balanced_accuracy") < 0.85 * width(lesion, "balanced_accuracy")).all()
    gap_width = lambda g: (g["gap_hi"] - g["gap_lo"]).to_numpy()  # noqa: E731
    assert (gap_width(image_gaps) < 0.85 * gap_width(lesion_gaps)).all()


def _figures(p: np.ndarray, y: np.ndarray, mask: np.ndarray) -> dict:
    at = binary_metrics_at(malignant_scores(p[mask]), is_malignant_label(y[mask]), 0.3)
    return {
        "balanced_accuracy": balanced_accuracy(p[mask], y[mask]),
        "macro_auroc": macro_auroc(p[mask], y[mask]),
        "malignant_sensitivity": at["sensitivity"],
        "malignant_specificity": at["specificity"],
    }


def test_fairness_resamples_are_the_overall_resamples_and_agree_with_the_metric_functions():
    probs, labels = random_probs(240, seed=11)
    probs = np.round(probs, 2)  # ties in the scores, as saturated softmax outputs give
    probs = probs / probs.sum(1, keepdims=True)
    rng = np.random.default_rng(12)
    lesions = rng.integers(0, 150, 240)
    meta = pd.DataFrame(
        {"tone": rng.choice(["light", "brown", None], 240), "sex": rng.choice(["female", "male"], 240)}
    )
    for seed in range(3):
        resamples = LesionBootstrap(lesions, 1, seed)  # one resample: its interval is that resample's figure
        (rows,) = list(resamples.indices())
        assert np.array_equal(rows, next(group_bootstrap_indices(lesions, 1, seed)))
        assert bootstrap_ci(balanced_accuracy, probs, labels, None, resamples=resamples) == bootstrap_ci(
            balanced_accuracy, probs, labels, lesions, n_boot=1, seed=seed
        )
        table, gaps = fairness_report(
            probs, labels, meta, 0.3, resamples=resamples, min_class_images=1, min_positives=1
        )
        p, y, m = probs[rows], labels[rows], meta.iloc[rows].fillna("unknown").reset_index(drop=True)

        for row in table.itertuples():
            inside = (m[row.attribute] == row.group).to_numpy()
            group, rest = _figures(p, y, inside), _figures(p, y, ~inside)
            for metric, value in group.items():
                assert getattr(row, f"{metric}_lo") == pytest.approx(value, abs=1e-6)
                gap = _gap(gaps[gaps["attribute"] == row.attribute], metric, "vs_rest", row.group)
                assert gap["gap_lo"] == pytest.approx(value - rest[metric], abs=1e-6)


# -------------------------------------------------------------------------------------------------- external sets


def test_external_metrics_renormalise_and_agree_with_sklearn():
    probs, _ = random_probs(200, seed=10)
    rng = np.random.default_rng(10)
    present = ["mel", "bkl", "nv"]
    keep = [CLASS_TO_LABEL[c] for c in ("bkl", "mel", "nv")]  # class order, not the order given
    labels = rng.choice(keep, size=200)

    p3, y3 = restrict_to_classes(probs, labels, present)
    assert p3.shape == (200, 3)
    assert torch.allclose(p3.sum(dim=1), torch.ones(200, dtype=torch.float64), atol=1e-12)
    expected_p3 = probs[:, keep] / probs[:, keep].sum(axis=1, keepdims=True)
    assert np.allclose(p3.numpy(), expected_p3, atol=1e-12)
    assert y3.tolist() == [keep.index(label) for label in labels]

    report = external_metrics(probs, labels, present)
    y, p = y3.numpy(), expected_p3
    assert report["classes"] == report["renormalised_over"] == ["bkl", "mel", "nv"]
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p.argmax(1)), abs=TOL)
    assert report["macro_auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"), abs=TOL)
    assert report["confusion_matrix"] == confusion_matrix(y, p.argmax(1)).tolist()
    f1 = f1_score(y, p.argmax(1), average=None)
    assert [report["per_class"][c]["f1"] for c in ("bkl", "mel", "nv")] == pytest.approx(f1, abs=TOL)
    assert report["malignant_auroc"] == pytest.approx(roc_auc_score(y == 1, p[:, 1]), abs=TOL)  # mel alone
    json.dumps(report, allow_nan=False)

    with pytest.raises(ValueError, match="outside present_classes"):
        external_metrics(probs, np.full(200, CLASS_TO_LABEL["bcc"]), present)
    with pytest.raises(ValueError, match="not among the classes"):
        external_metrics(probs, labels, ["mel", "melanoma"])


def test_metric_drop_is_internal_minus_external():
    internal = {"balanced_accuracy": 0.80, "macro_auroc": 0.95, "malignant_auroc": 0.90}
    external = {"balanced_accuracy": 0.65, "macro_auroc": 0.85, "malignant_auroc": None}
    drop = metric_drop(internal, external)
    assert drop["balanced_accuracy"] == pytest.approx(0.15) and drop["macro_auroc"] == pytest.approx(0.10)
    assert drop["malignant_auroc"] is None
    with pytest.raises(ValueError, match="lacks"):
        metric_drop({}, external)


def test_logit_adjustment_is_softmax_of_shifted_logits_and_its_scale_is_chosen_by_balanced_accuracy():
    probs, labels, counts = logit_adjustment_case()
    prior = smoothed_class_prior(counts)
    assert prior == pytest.approx(np.array([101] + [11] * 6) / 167)
    for tau in (-0.5, 0.0, 0.7):
        by_hand = torch.softmax(torch.log(torch.tensor(probs)) - tau * torch.log(torch.tensor(prior)), dim=1)
        assert adjust_probs(probs, prior, tau) == pytest.approx(by_hand.numpy(), abs=1e-6)
    # a rare class overtakes class 0 once (101/11)^tau > 0.5/0.4, i.e. tau > 0.1004; class 0's own images stay
    # right until (101/11)^tau > 0.9/(0.1/6), i.e. tau > 1.8: every tau from 0.2 to 1.7 is perfect, and the
    # smallest of them is chosen
    tau, before, after = choose_logit_adjustment(probs, labels, prior)
    assert tau == pytest.approx(0.2)
    assert before == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1))) == pytest.approx(1 / 7)
    assert after == pytest.approx(1.0)
    # nothing to gain: tau stays 0
    assert choose_logit_adjustment(np.eye(7)[labels] * 0.9 + 0.1 / 7, labels, prior) == (0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="include 0"):
        choose_logit_adjustment(probs, labels, prior, taus=(0.5, 1.0))
    with pytest.raises(ValueError, match="positive class frequencies"):
        choose_logit_adjustment(probs, labels, np.zeros(7))


def test_worst_group_sensitivity_by_hand():
    # columns: akiec bcc bkl df mel nv vasc; malignancy score = akiec + bcc + mel
    found = [0.3, 0.0, 0.0, 0.0, 0.3, 0.4, 0.0]  # score 0.6: called malignant
    missed = [0.1, 0.1, 0.0, 0.0, 0.1, 0.7, 0.0]  # score 0.3
    probs = np.array([found, found, missed, found, missed, missed, found, missed, missed])
    labels = np.array([4, 0, 1, 4, 4, 5, 1, 4, 5])  # mel akiec bcc mel mel nv bcc mel nv
    groups = ["light", "light", "light", "dark", "dark", "dark", None, "tan", "unknown"]
    # light: 2 of 3 malignant found; dark: 1 of 2 (its nv does not count); tan: one malignant image (too few);
    # the image without a group and the unknown one form no group
    assert worst_group_sensitivity(probs, labels, groups, min_malignant=2) == (0.5, "dark")
    assert worst_group_sensitivity(probs, labels, groups, min_malignant=3) == (pytest.approx(2 / 3), "light")
    assert worst_group_sensitivity(probs, labels, groups, min_malignant=4) == (None, None)
    assert worst_group_sensitivity(probs, labels, groups, min_malignant=1)[0] == 0.0  # tan: its one missed
    with pytest.raises(ValueError, match="groups has 2 entries for 9 images"):
        worst_group_sensitivity(probs, labels, ["light", "dark"])
