"""Who a training run learns from: the labelled/unlabelled partition of the train split and the synthetic mix.

A label budget is simulated on a fully labelled source: a class-stratified, lesion-grouped share of the train split
keeps its labels and the rest becomes the unlabelled pool of semi-supervised learning. The pool's labels are read
on the driver only to stratify the draw (as the prepare stage does); they never reach a training worker, whose
unlabelled dataset carries no label column at all.

Budgets are nested: with one seed, the groups labelled at 5% are among those labelled at 10%, 20%, ... because
each class's lesions are taken in one seeded order until the budget is spent. A label-budget curve then compares
runs that differ only in how many labels they were given, not in which images. The order starts with the prepared
labelled set (``data.split.label_fraction``), the images the generator learns from, so that every budget at least
that large contains them.

The generator is the other way labels can reach a run: a class-conditional model trained on an image's label passes
that label on through its samples. A run that mixes in synthetic images must therefore label every image the
generator learnt from; :func:`check_generator_provenance` refuses it otherwise, from the ids the generator actually
trained on. A semi-supervised generator's pseudo-labelled pool images are accepted when they are this run's own
training images and the classifier behind the pseudo-labels learnt only labels this run has.

Synthetic images are added to the labelled set only: ``ratio`` synthetic images per labelled real image, spread
evenly over all classes (``uniform``) or over the minority classes only (``minority``: classes with fewer labelled
images than the mean per class). Each synthetic image keeps the class it was generated for. Validation and test
never see a synthetic row: they are read from the split table, which holds real images only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from skinsynth.config import MixConfig
from skinsynth.data.schema import CLASSES
from skinsynth.errors import SkinsynthError


@dataclass
class LabelPartition:
    """The train split divided into the images whose labels training may use and the unlabelled pool."""

    labelled: list[str]
    unlabelled: list[str]


def labelled_partition(train_rows: pd.DataFrame, label_fraction: float | None, seed: int) -> LabelPartition:
    """Split the train rows into a labelled subset and the unlabelled pool.

    The prepared ``labelled`` flag (``data.split.label_fraction``, the set the generator learns from) comes first:
    a budget larger than it keeps all of it and adds lesions; a smaller budget is drawn from within it. Within each
    class, lesions are taken in one seeded order until the budget is spent, so budgets are nested for one seed.

    Args:
        train_rows: the train split's rows, columns ``image_id``, ``group_id``, ``dx`` and ``labelled``.
        label_fraction: share of train images to label; None keeps the prepared ``labelled`` flag.
        seed: orders each class's lesions.

    Returns:
        A :class:`LabelPartition` (ids sorted); every lesion lies wholly on one side.

    Raises:
        SkinsynthError: a fraction outside (0, 1].
    """
    if label_fraction is None:
        labelled = train_rows["labelled"].to_numpy(bool)
    else:
        if not 0.0 < label_fraction <= 1.0:
            raise SkinsynthError(f"train.label_fraction must be in (0, 1], got {label_fraction}")
        rng = np.random.default_rng(seed)
        # a budget at least the prepared share keeps every prepared-labelled lesion, whatever the rounding per class
        # (within half a percent: the prepared draw itself rounds to whole lesions, so 5% may have come out as 5.2%)
        keep_prepared = label_fraction + 0.005 >= train_rows["labelled"].mean()
        chosen: set[str] = set()
        groups = train_rows.groupby("group_id", sort=True).agg(
            dx=("dx", "first"), size=("dx", "size"), prepared=("labelled", "all")
        )
        for _, members in groups.groupby("dx", sort=True):
            budget = label_fraction * members["size"].sum()
            order = rng.permutation(len(members))
            prepared = members["prepared"].to_numpy()[order]
            order = np.concatenate([order[prepared], order[~prepared]])  # the prepared labelled lesions first
            taken = 0
            for i in order:
                # at least one lesion per class; after that, stop before the budget is overshot by more than half a
                # lesion (so that small budgets round to the nearest lesion rather than always up)
                size = int(members["size"].iloc[i])
                if taken and taken + size / 2 > budget and not (keep_prepared and members["prepared"].iloc[i]):
                    break
                chosen.add(members.index[i])
                taken += size
        labelled = train_rows["group_id"].isin(chosen).to_numpy()
    ids = train_rows["image_id"].to_numpy()
    return LabelPartition(sorted(ids[labelled].tolist()), sorted(ids[~labelled].tolist()))


def synthetic_counts(labelled_counts: dict[str, int], mix: MixConfig) -> dict[str, int]:
    """Synthetic images to add per class: ``round(ratio x labelled images)`` spread evenly over the target classes.

    Args:
        labelled_counts: labelled real images per class code.
        mix: ratio and class choice.

    Returns:
        Class code -> count, for every class in :data:`CLASSES` (0 for classes not targeted).
    """
    if mix.ratio < 0 or not math.isfinite(mix.ratio):
        raise SkinsynthError(f"train.mix.ratio must be a number >= 0, got {mix.ratio}")
    counts = dict.fromkeys(CLASSES, 0)
    total = int(math.floor(mix.ratio * sum(labelled_counts.values()) + 0.5))
    present = [dx for dx in CLASSES if labelled_counts.get(dx, 0) > 0]
    if mix.classes == "minority":
        mean = sum(labelled_counts.get(dx, 0) for dx in present) / max(len(present), 1)
        targets = [dx for dx in present if labelled_counts[dx] < mean]
    else:
        targets = present
    if not targets or total == 0:
        return counts
    share, extra = divmod(total, len(targets))  # the remainder goes to the smallest classes first
    for dx in targets:
        counts[dx] = share
    for dx in sorted(targets, key=lambda d: (labelled_counts[d], CLASSES.index(d)))[:extra]:
        counts[dx] += 1
    return counts


def select_synthetic(synthetic_rows: pd.DataFrame, counts: dict[str, int], seed: int) -> list[str]:
    """Draw ``counts[dx]`` synthetic images of each class without replacement (seeded).

    Args:
        synthetic_rows: columns ``image_id`` and ``dx`` (the generator's conditioning class) of RUN_DIR/synthetic.
        counts: images wanted per class.
        seed: which images are drawn.

    Returns:
        The chosen image ids, sorted.

    Raises:
        SkinsynthError: a class with fewer synthetic images than asked for (naming how many are missing).
    """
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    short = []
    for dx in CLASSES:
        wanted = counts.get(dx, 0)
        if wanted == 0:
            continue
        pool = np.sort(synthetic_rows.loc[synthetic_rows["dx"] == dx, "image_id"].to_numpy())
        if len(pool) < wanted:
            short.append(f"{dx} {len(pool)}/{wanted}")
            continue
        chosen += rng.choice(pool, size=wanted, replace=False).tolist()
    if short:
        raise SkinsynthError(
            f"train.mix asks for more synthetic images than RUN_DIR/synthetic holds (have/need: {', '.join(short)}); "
            "sample more (e.g. --set sample.plan=fill --set sample.fill_to=N, then 'skinsynth generate sample') "
            "or lower train.mix.ratio"
        )
    return sorted(chosen)


def check_generator_provenance(
    generator_images: list[str],
    labelled: list[str],
    splits: pd.DataFrame,
    generator: str,
    pool: dict[str, Any] | None = None,
) -> dict[str, object]:
    """Refuse a synthetic mix whose generator learnt from an image this run may not learn the label of.

    ``generator_images`` are the ids the generator actually trained on (``generator/training_ids.json``), not the
    current split table's ``labelled`` flags: a generator trained before a re-prepare at a lower label fraction
    still carries the labels it saw. Each must be one of this run's labelled training images; one in validation or
    test, in the unlabelled pool (its label would reach the run through the samples), or not in this data set at all
    is refused.

    A semi-supervised generator (``pool``, its ``pool_ids.json``) also learnt from pool images, with a classifier's
    pseudo-labels or unconditionally. Those are accepted where they are training images of this split (the run's
    own unlabelled pool, or its labelled images), and only when every labelled image behind the pseudo-labels - the
    classifier's - is labelled in this run too: otherwise that classifier's labels would reach the run through the
    samples. A pool image in validation or test, or not in this data set, is refused.

    Args:
        generator_images: the generator's training image ids (learnt with their true labels).
        labelled: this run's labelled training ids.
        splits: the run's split table (``image_id``, ``split``).
        generator: the generator's id, for the message and the record.
        pool: the generator's pool record (None: it learnt from labelled images only).

    Returns:
        What was checked, for the model's training record: the generator, how many ids, their hash.

    Raises:
        SkinsynthError: naming how many of the generator's images fall in each refused place.
    """
    from skinsynth.core.rundir import ids_hash, pool_image_ids

    outside = set(generator_images) - set(labelled)
    if outside:
        split_of = splits.set_index("image_id")["split"].to_dict()
        held_out = sum(split_of.get(i) in ("val", "test") for i in outside)
        pool = sum(split_of.get(i) == "train" for i in outside)
        unknown = len(outside) - held_out - pool
        raise SkinsynthError(
            f"train.mix would add synthetic images from generator {generator}, trained on {len(generator_images)} "
            f"images, but this run labels {len(labelled)}: {len(outside)} of the generator's images are not among "
            f"them ({pool} in the unlabelled pool, {held_out} in validation or test, {unknown} not in this data "
            "set), and their labels would reach the run through the samples. Retrain the generator on this split "
            "('skinsynth generate train', then 'skinsynth generate sample'), or set train.mix.ratio=0"
        )
    record: dict[str, object] = {
        "generator_id": generator,
        "training_images": len(generator_images),
        "ids_sha256": ids_hash(generator_images),
    }
    if pool:
        pool_ids = pool_image_ids(pool)
        split_of = splits.set_index("image_id")["split"].to_dict()
        not_train = [i for i in pool_ids if split_of.get(i) != "train"]
        behind = set(pool.get("classifier_labelled_ids", [])) - set(labelled)
        if not_train or behind:
            problems = []
            if not_train:
                problems.append(f"{len(not_train)} of its pool images are not training images of this split")
            if behind:
                problems.append(
                    f"its pseudo-labels come from classifier '{pool.get('model')}', which learnt the labels of "
                    f"{len(behind)} images this run does not label"
                )
            raise SkinsynthError(
                f"train.mix would add synthetic images from semi-supervised generator {generator}, but "
                f"{' and '.join(problems)}. Retrain the classifier and the generator on this run's labels, or set "
                "train.mix.ratio=0"
            )
        record["pseudo_labelled_images"] = len(pool.get("pseudo_labelled", []))
        record["unconditional_images"] = len(pool.get("unconditional", []))
        record["pseudo_labels_from"] = pool.get("model")
    return record
