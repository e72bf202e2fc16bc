"""Lesion-grouped, class-stratified splits.

Images of one lesion (``group_id``) are near-duplicates; letting them straddle train and test inflates every
metric, so the lesion - never the image - is the unit of each split (Tschandl et al. 2018 ship ``lesion_id`` for
this reason). Within each class, lesions are shuffled (seeded) and dealt one at a time to the bucket furthest below
its target share of images, so every split, labelled subset and fold gets its share of every class to within one
lesion. scikit-learn's ``StratifiedGroupKFold`` does the same job, but only to 1/k granularity (15% needs k = 20)
and with a per-group, per-fold Python loop that is slow on HAM10000's lesions (docs/results.md); this deal is
fast and hits any fraction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from skinsynth.config import SplitConfig
from skinsynth.data.schema import SPLITS
from skinsynth.errors import SkinsynthError


class SplitError(SkinsynthError, ValueError):
    """A split that would leak a lesion between splits, or impossible split settings."""


class GroupJoiner:
    """Union-find over lesion group ids (path halving): joined groups take the smallest id among them, so the result
    does not depend on the order of the joins. Shared by the byte-identical merge and the similarity merge
    (:mod:`skinsynth.data.grouping`)."""

    def __init__(self, group_ids) -> None:
        self._parent: dict[str, str] = {g: g for g in group_ids}

    def find(self, group: str) -> str:
        """The id of the joined set ``group`` belongs to."""
        parent = self._parent
        while parent[group] != group:
            parent[group] = parent[parent[group]]
            group = parent[group]
        return group

    def join(self, a: str, b: str) -> None:
        """Join the sets of ``a`` and ``b`` under the smaller of their ids."""
        root_a, root_b = sorted((self.find(a), self.find(b)))
        if root_a != root_b:
            self._parent[root_b] = root_a


def merge_duplicate_groups(frame: pd.DataFrame) -> tuple[pd.Series, list[list[str]]]:
    """Give byte-identical images (same ``sha256``) one group, so copies never sit on both sides of a split.

    Args:
        frame: columns ``image_id``, ``group_id``, ``sha256``.

    Returns:
        The new ``group_id`` per row (the smallest id among the merged groups) and the duplicate sets found
        (lists of image ids, each set sorted).
    """
    groups = GroupJoiner(frame["group_id"])
    duplicates: list[list[str]] = []
    # Only hashes seen more than once matter; grouping the (mostly unique) rest costs seconds on HAM10000.
    repeated = frame[frame["sha256"].duplicated(keep=False)]
    for _, same in repeated.groupby("sha256", sort=True):
        duplicates.append(sorted(same["image_id"]))
        first, *others = same["group_id"]
        for other in others:
            groups.join(first, other)
    return frame["group_id"].map(groups.find), duplicates


def stratified_group_assign(frame: pd.DataFrame, shares: list[float], seed: int) -> np.ndarray:
    """Deal lesion groups into buckets with the given shares of images, stratified by class.

    Args:
        frame: columns ``group_id`` and ``dx`` (a group's class is that of its first image).
        shares: target share of images per bucket (normalised to sum to 1).
        seed: shuffles the groups within each class.

    Returns:
        The bucket index (0..len(shares)-1) of every row of ``frame``; all rows of one group share a bucket.
    """
    rng = np.random.default_rng(seed)
    target = np.asarray(shares, dtype=float)
    target = target / target.sum()
    groups = frame.groupby("group_id", sort=True)["dx"].agg(["first", "size"])
    bucket_of_group: dict[str, int] = {}
    for _, members in groups.groupby("first", sort=True):
        filled = np.zeros(len(target))
        sizes = members["size"].to_numpy()
        for i in rng.permutation(len(members)):
            # the bucket that would be furthest below its share once this group's images are counted
            bucket = int(np.argmax(target * (filled.sum() + sizes[i]) - filled))
            filled[bucket] += sizes[i]
            bucket_of_group[members.index[i]] = bucket
    return frame["group_id"].map(bucket_of_group).to_numpy(dtype=np.int64)


def lesion_grouped_split(frame: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """Assign train/val/test by lesion, the ``labelled`` flag on train, and k-fold indices on request.

    Args:
        frame: columns ``image_id``, ``group_id``, ``dx`` and optionally ``source_split`` (used when
            ``cfg.use_source_split``).
        cfg: fractions, label fraction, k-fold count and seed.

    Returns:
        A table ``image_id, group_id, split, labelled, fold`` in the row order of ``frame``.

    Raises:
        SplitError: bad fractions, too few groups, or a lesion that would end up in two splits.
    """
    for name in ("val_fraction", "test_fraction", "label_fraction"):
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise SplitError(f"split.{name} must be within [0, 1], got {value}")
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise SplitError("split.val_fraction + split.test_fraction must leave a train split (sum below 1)")
    if cfg.label_fraction <= 0.0:
        raise SplitError("split.label_fraction must be above 0 (at least some labelled images are needed)")
    split = np.full(len(frame), "train", dtype=object)
    if cfg.use_source_split:
        if "source_split" not in frame or frame["source_split"].isna().any():
            raise SplitError("split.use_source_split is set but the source has no split for every image")
        split = frame["source_split"].to_numpy(dtype=object)
        unknown = set(split) - set(SPLITS)
        if unknown:
            raise SplitError(f"source split values {sorted(unknown)} are not train/val/test")
    elif cfg.val_fraction + cfg.test_fraction > 0:
        train_share = 1.0 - cfg.val_fraction - cfg.test_fraction
        bucket = stratified_group_assign(frame, [train_share, cfg.val_fraction, cfg.test_fraction], cfg.seed)
        split = np.asarray(SPLITS, dtype=object)[bucket]

    train = split == "train"
    labelled = np.zeros(len(frame), dtype=bool)
    if cfg.label_fraction >= 1.0:
        labelled[train] = True
    elif train.any():
        shares = [cfg.label_fraction, 1.0 - cfg.label_fraction]
        labelled[train] = stratified_group_assign(frame.loc[train], shares, cfg.seed + 1) == 0

    fold = np.full(len(frame), -1, dtype=np.int64)
    if cfg.kfold > 1:
        development = split != "test"
        if frame.loc[development, "group_id"].nunique() < cfg.kfold:
            raise SplitError(f"split.kfold={cfg.kfold} needs at least {cfg.kfold} lesion groups outside test")
        fold[development] = stratified_group_assign(frame.loc[development], [1.0] * cfg.kfold, cfg.seed + 2)

    result = pd.DataFrame(
        {
            "image_id": frame["image_id"].to_numpy(),
            "group_id": frame["group_id"].to_numpy(),
            "split": split.astype(str),
            "labelled": labelled,
            "fold": pd.array(np.where(fold >= 0, fold, pd.NA), dtype="Int8"),
        }
    )
    check_no_group_leak(result)
    return result


def check_no_group_leak(splits: pd.DataFrame) -> None:
    """Raise :class:`SplitError` naming the lesions that occur in more than one split."""
    per_group = splits.groupby("group_id")["split"].nunique()
    leaked = per_group[per_group > 1]
    if len(leaked):
        shown = ", ".join(map(str, leaked.index[:5]))
        raise SplitError(f"{len(leaked)} lesion group(s) fall in more than one split (e.g. {shown})")
