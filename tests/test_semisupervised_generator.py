"""The semi-supervised generator (You et al. 2023): a classifier's pool labels, the generator that learns from them,
its card, and the provenance check of a synthetic mix that follows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from skinsynth.classify.mixing import check_generator_provenance
from skinsynth.core.rundir import layout
from skinsynth.core.shards import load_split_table, read_pool_labels, read_rows, split_ids
from skinsynth.errors import SkinsynthError
from tests.conftest import GENERATOR_SMALL, PHANTOM_SMALL, TINY_CLASSIFIER, copy_run

TEACHER = "teacher"


@pytest.fixture(scope="module")
def teacher_run(ray_local, tmp_path_factory):
    """The phantom set prepared with 40% of its training labels (the rest the unlabelled pool), and a tiny classifier
    trained on it."""
    from skinsynth.classify.train import train_classifier
    from skinsynth.config import load_config
    from skinsynth.data.prepare import prepare_images

    out = tmp_path_factory.mktemp("semi") / "run"
    settings = [f"run.out={out}", *PHANTOM_SMALL, "data.split.label_fraction=0.4"]
    prepare_images(load_config(None, settings).data, out, progress=lambda _m: None)
    cfg = load_config(None, [*settings, *TINY_CLASSIFIER, f"train.name={TEACHER}"])
    train_classifier(cfg, progress=print)
    return cfg, out


def test_pool_labels_cover_the_pool_and_nothing_else(teacher_run):
    """Pseudo-labels never come from validation or test rows, nor from the classifier's own labelled images."""
    cfg, out = teacher_run
    table, record = read_pool_labels(layout(out).model_pool_labels(TEACHER))
    splits = load_split_table(out)
    split_of = splits.set_index("image_id")["split"]
    training = json.loads((layout(out).model(TEACHER) / "training.json").read_text())
    assert len(table) == training["unlabelled_images"] > 0
    assert set(split_of[table["image_id"]]) == {"train"}
    assert not set(table["image_id"]) & set(split_ids(splits, "val") + split_ids(splits, "test"))
    assert len(record["labelled_ids"]) == training["labelled_images"]
    assert not set(table["image_id"]) & set(record["labelled_ids"])
    # every training image is either labelled or in the pool
    assert set(table["image_id"]) | set(record["labelled_ids"]) == set(split_ids(splits, "train"))
    assert (
        record["model_identity"] == json.loads((layout(out).model(TEACHER) / "manifest.json").read_text())["identity"]
    )
    probs_ok = table["confidence"].between(1 / 7, 1.0).all() and table["label"].between(0, 6).all()
    assert probs_ok, table.describe()


def test_pool_labels_refuse_a_validation_image(teacher_run, tmp_path):
    from skinsynth.classify.pool_labels import write_pool_labels

    _cfg, out = teacher_run
    splits = load_split_table(out)
    val = split_ids(splits, "val")[:1]
    pool = split_ids(splits, "train")[:3]
    with pytest.raises(SkinsynthError, match="1 of 4 pool images are not training images"):
        write_pool_labels(layout(out).model(TEACHER), TEACHER, "x", pool + val, [], splits, out, progress=print)


@pytest.mark.slow
def test_the_generator_learns_the_pool_with_pseudo_labels_and_its_card_counts_them(teacher_run, tmp_path):
    """The generator's inputs: its labelled images with their labels, confident pool images with the classifier's
    labels (never the true ones), the rest with the null token; the card and pool_ids.json count each kind."""
    from skinsynth.config import load_config
    from skinsynth.generate.train import generator_dataset, pool_inputs, train_generator

    _cfg, src = teacher_run
    out = copy_run(src, tmp_path / "run")
    table, _record = read_pool_labels(layout(out).model_pool_labels(TEACHER))
    threshold = float(np.median(table["confidence"]))  # a tiny model is never 95% sure: half the pool passes
    cfg = load_config(
        None,
        [
            f"run.out={out}",
            *PHANTOM_SMALL,
            "data.split.label_fraction=0.4",
            *GENERATOR_SMALL,
            "generator.train_steps=2",
            "generator.grid_every=0",
            f"generator.pseudo_labels_from={TEACHER}",
            f"generator.pseudo_label_threshold={threshold}",
        ],
    )
    labelled = split_ids(load_split_table(out), "train", labelled_only=True)
    pool = pool_inputs(cfg.generator, out, labelled)
    confident = table[table["confidence"] >= threshold]
    assert pool.pseudo_labels == dict(zip(confident["image_id"], confident["label"].astype(int)))
    assert set(pool.unconditional) == set(table["image_id"]) - set(confident["image_id"])
    assert 0 < len(pool.pseudo_labels) < len(table)

    rows = generator_dataset(out, labelled, pool, seed=0).to_pandas().set_index("image_id")
    assert len(rows) == len(labelled) + len(table)
    truth = read_rows(out, list(rows.index), columns=["image_id", "label"]).set_index("image_id")["label"]
    assert (rows.loc[labelled, "label"] == truth[labelled]).all()
    assert (rows.loc[list(pool.pseudo_labels), "label"] == pd.Series(pool.pseudo_labels)).all()
    assert (rows.loc[pool.unconditional, "label"] == -1).all()

    train_generator(cfg, progress=print)
    card = json.loads(layout(out).generator_card.read_text())
    counts = card["training_data"]["pseudo_labels"]
    assert counts["pseudo_labelled_images"] == len(pool.pseudo_labels)
    assert counts["unconditional_images"] == len(pool.unconditional)
    assert counts["classifier"] == TEACHER and counts["threshold"] == threshold
    assert sum(counts["pseudo_labelled_class_counts"].values()) == len(pool.pseudo_labels)
    assert card["training_data"]["images"] == len(labelled)
    record = json.loads(layout(out).generator_pool_ids.read_text())
    assert sorted(record["pseudo_labelled"]) == sorted(pool.pseudo_labels)
    manifest = json.loads((layout(out).generator / "manifest.json").read_text())
    assert manifest["inputs"][f"model:{TEACHER}"] == record["model_identity"]


def test_provenance_accepts_the_runs_own_pool_and_nothing_else():
    splits = pd.DataFrame(
        {
            "image_id": [f"t{i}" for i in range(6)] + ["v0", "s0"],
            "split": ["train"] * 6 + ["val", "test"],
        }
    )
    labelled = ["t0", "t1"]
    pool = {"model": TEACHER, "classifier_labelled_ids": ["t0", "t1"], "pseudo_labelled": ["t2", "t3"]}
    record = check_generator_provenance(["t0"], labelled, splits, "g", {**pool, "unconditional": ["t4"]})
    assert record["pseudo_labelled_images"] == 2 and record["unconditional_images"] == 1
    with pytest.raises(SkinsynthError, match="1 of its pool images are not training images"):
        check_generator_provenance(["t0"], labelled, splits, "g", {**pool, "unconditional": ["v0"]})
    with pytest.raises(SkinsynthError, match="learnt the labels of 1 images this run does not label"):
        check_generator_provenance(["t0"], ["t0"], splits, "g", pool)
    # without a pool record, a generator that learnt a pool image with its label is refused as before
    with pytest.raises(SkinsynthError, match="1 in the unlabelled pool"):
        check_generator_provenance(["t0", "t2"], labelled, splits, "g")
