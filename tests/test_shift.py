"""Robustness to acquisition shift (``skinsynth evaluate --shift``): the corruptions and the shift evaluation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinsynth.classify.shift import CORRUPTIONS, SEVERITIES, corrupt
from tests.conftest import copy_config, copy_run

DETERMINISTIC = {"gaussian_blur", "jpeg_compression", "vignette"}  # no random draw: the seed cannot change them


@pytest.fixture(scope="module")
def phantom_images(phantom_prepared) -> list[np.ndarray]:
    """Four prepared phantom images (32 px)."""
    from skinsynth.core.shards import decode_png_arrays, load_split_table, read_rows, split_ids

    ids = split_ids(load_split_table(phantom_prepared), "test")[:4]
    return decode_png_arrays(read_rows(phantom_prepared, ids, ["image"])["image"])


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_each_corruption_changes_pixels_and_more_at_higher_severity(phantom_images):
    for name in CORRUPTIONS:
        diffs = {
            s: np.mean([_mad(corrupt(img, name, s, seed=0, index=i), img) for i, img in enumerate(phantom_images)])
            for s in SEVERITIES
        }
        assert diffs[3] > 3.0, (name, diffs)  # grey levels, mean over pixels and channels
        assert diffs[1] < diffs[3], (name, diffs)


def test_corruptions_are_seeded_per_image(phantom_images):
    img = phantom_images[0]
    for name in CORRUPTIONS:
        first = corrupt(img, name, 3, seed=7, index=0)
        assert np.array_equal(first, corrupt(img.copy(), name, 3, seed=7, index=0)), name
        if name not in DETERMINISTIC:
            assert not np.array_equal(first, corrupt(img, name, 3, seed=8, index=0)), name
            assert not np.array_equal(first, corrupt(img, name, 3, seed=7, index=1)), name


def test_weighted_metrics_with_unit_weights_are_the_plain_metrics():
    from skinsynth.classify import metrics as M
    from skinsynth.classify.shift import weighted_metrics

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7), size=60).astype(np.float32)
    labels = rng.integers(0, 7, 60)
    got = weighted_metrics(probs, labels, 0.4, np.ones((1, 60)))
    assert got["balanced_accuracy"][0] == pytest.approx(M.balanced_accuracy(probs, labels))
    scores, is_mal = M.malignant_scores(probs).numpy(), M.is_malignant_label(labels).numpy()
    assert got["malignant_sensitivity"][0] == pytest.approx(M.binary_metrics_at(scores, is_mal, 0.4)["sensitivity"])
    # a resample that holds the first image twice weighs it twice
    twice = np.ones((1, 60))
    twice[0, 0] = 2
    doubled = np.concatenate([probs[:1], probs]), np.concatenate([labels[:1], labels])
    assert weighted_metrics(probs, labels, 0.4, twice)["balanced_accuracy"][0] == pytest.approx(
        M.balanced_accuracy(*doubled)
    )


def test_corrupted_images_get_the_upload_preprocessing(phantom_images):
    from skinsynth.classify.shift import upload_preprocess
    from skinsynth.config import PreprocessConfig
    from skinsynth.data.preprocess import encode_png
    from skinsynth.serve.model import prepare_upload

    cfg = PreprocessConfig(size=32)
    hairy = corrupt(phantom_images[1], "hair", 3, seed=0, index=1)
    assert np.array_equal(upload_preprocess(hairy, cfg), prepare_upload(encode_png(hairy), cfg))


def test_evaluate_shift_writes_table_figure_report_and_ledger(tiny_classifier, tmp_path):
    from skinsynth.classify.evaluate import evaluate_model
    from skinsynth.core.ledger import read_ledger

    base_cfg, _ = tiny_classifier
    out = copy_run(Path(base_cfg.run.out), tmp_path / "run")
    cfg = copy_config(base_cfg, out)
    messages: list[str] = []
    report = evaluate_model(cfg, n_boot=20, shift=True, progress=messages.append)

    eval_dir = out / "eval" / cfg.train.name
    table = pd.read_csv(eval_dir / "shift.csv")
    corrupted = table[table["severity"] > 0]
    assert set(zip(corrupted["corruption"], corrupted["severity"], strict=True)) == {
        (name, s) for name in CORRUPTIONS for s in SEVERITIES
    }
    assert set(corrupted["metric"]) == {"balanced_accuracy", "malignant_sensitivity"}
    assert len(corrupted) == len(CORRUPTIONS) * len(SEVERITIES) * 2
    from skinsynth.core.shards import load_split_table, split_ids

    n_test = len(split_ids(load_split_table(out), "test"))
    assert (table["n"] == n_test).all()
    rows = table.dropna(subset=["value"])
    assert len(rows) >= len(CORRUPTIONS) * len(SEVERITIES)  # balanced accuracy is always defined
    assert (rows["ci_low"] <= rows["value"] + 1e-9).all() and (rows["value"] <= rows["ci_high"] + 1e-9).all()
    assert (rows["drop_ci_low"] <= rows["drop_ci_high"]).all()
    assert np.allclose(rows["drop"], rows["clean"] - rows["value"])
    assert (eval_dir / "shift.png").stat().st_size > 0

    saved = json.loads((eval_dir / "report.json").read_text())
    assert saved["shift"]["worst"]["corruption"] in CORRUPTIONS
    assert saved["shift"]["table"] == "shift.csv"
    assert any(m.startswith("evaluate: shift: worst corruption") for m in messages)
    # progress over the minutes a real test set takes: a line per corruption, with its three severities
    per_corruption = [m for m in messages if re.match(r"evaluate: shift: \d/9 \w+: balanced accuracy ", m)]
    assert len(per_corruption) == 9 and all(m.count(", ") >= 2 for m in per_corruption)
    shift_looks = [e for e in read_ledger(out) if "shift.balanced_accuracy" in e["metrics"]]
    assert len(shift_looks) == 1 and shift_looks[0]["n_images"] == n_test
    assert report["test_looks"]["looks"] == 2  # the test report's look and the shift evaluation's
