from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skinsynth.config import SplitConfig
from skinsynth.data.splits import SplitError, check_no_group_leak, lesion_grouped_split, merge_duplicate_groups


def _frame(n_groups: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    classes = np.array(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
    probs = np.array([3, 5, 11, 1, 11, 67, 2], float)
    rows = []
    for g in range(n_groups):
        dx = rng.choice(classes, p=probs / probs.sum())
        for v in range(rng.integers(1, 4)):
            rows.append({"image_id": f"img{g}_{v}", "group_id": f"les{g}", "dx": dx})
    return pd.DataFrame(rows)


def test_no_lesion_in_two_splits_and_fractions_hold():
    frame = _frame()
    splits = lesion_grouped_split(frame, SplitConfig(val_fraction=0.15, test_fraction=0.15, seed=1))
    assert splits.groupby("group_id")["split"].nunique().max() == 1
    share = splits["split"].value_counts(normalize=True)
    assert share["test"] == pytest.approx(0.15, abs=0.04)
    assert share["val"] == pytest.approx(0.15, abs=0.04)
    # stratified: the majority class share is similar in every split
    nv_share = frame.assign(split=splits["split"]).groupby("split")["dx"].apply(lambda d: (d == "nv").mean())
    assert nv_share.max() - nv_share.min() < 0.08
    assert splits["labelled"].sum() == (splits["split"] == "train").sum()
    assert splits["fold"].isna().all()


def test_split_is_deterministic_per_seed():
    frame = _frame()
    a = lesion_grouped_split(frame, SplitConfig(seed=3))
    b = lesion_grouped_split(frame, SplitConfig(seed=3))
    c = lesion_grouped_split(frame, SplitConfig(seed=4))
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.2, 0.5])
def test_label_fraction_only_marks_train_and_keeps_lesions_whole(fraction):
    frame = _frame(600)
    splits = lesion_grouped_split(frame, SplitConfig(label_fraction=fraction, seed=0))
    train = splits[splits["split"] == "train"]
    assert not splits.loc[splits["split"] != "train", "labelled"].any()
    assert train["labelled"].mean() == pytest.approx(fraction, abs=0.03)
    # a lesion is labelled or unlabelled as a whole
    assert train.groupby("group_id")["labelled"].nunique().max() == 1


def test_kfold_covers_train_and_val_only():
    frame = _frame()
    splits = lesion_grouped_split(frame, SplitConfig(kfold=5))
    dev = splits[splits["split"] != "test"]
    assert set(dev["fold"].astype(int)) == {0, 1, 2, 3, 4}
    assert splits.loc[splits["split"] == "test", "fold"].isna().all()
    assert dev.groupby("group_id")["fold"].nunique().max() == 1


def test_leak_check_names_the_group():
    splits = pd.DataFrame(
        {"image_id": ["a", "b", "c"], "group_id": ["g1", "g1", "g2"], "split": ["train", "test", "val"]}
    )
    with pytest.raises(SplitError, match=r"1 lesion group\(s\) fall in more than one split \(e.g. g1\)"):
        check_no_group_leak(splits)


def test_source_split_that_leaks_is_refused():
    frame = pd.DataFrame(
        {"image_id": ["a", "b"], "group_id": ["g", "g"], "dx": ["nv", "nv"], "source_split": ["train", "test"]}
    )
    with pytest.raises(SplitError, match="more than one split"):
        lesion_grouped_split(frame, SplitConfig(use_source_split=True))


def test_bad_fractions():
    frame = _frame(50)
    with pytest.raises(SplitError, match="must leave a train split"):
        lesion_grouped_split(frame, SplitConfig(val_fraction=0.5, test_fraction=0.5))
    with pytest.raises(SplitError, match=r"within \[0, 1\]"):
        lesion_grouped_split(frame, SplitConfig(test_fraction=-0.1))
    with pytest.raises(SplitError, match="label_fraction must be above 0"):
        lesion_grouped_split(frame, SplitConfig(label_fraction=0.0))


def test_byte_identical_images_join_one_group():
    frame = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e"],
            "group_id": ["g1", "g2", "g3", "g3", "g4"],
            "sha256": ["h1", "h1", "h2", "h3", "h3"],
        }
    )
    groups, duplicates = merge_duplicate_groups(frame)
    assert list(groups) == ["g1", "g1", "g3", "g3", "g3"]
    assert duplicates == [["a", "b"], ["d", "e"]]
