"""A classifier's pseudo-labels for the unlabelled pool of its own training run: what a semi-supervised generator
learns from (You et al. 2023, "Diffusion models and semi-supervised learners benefit mutually with few labels").

Under a label budget the generator would otherwise learn from the labelled images alone. After training, a
classifier whose run had an unlabelled pool predicts every pool image and writes ``models/<name>/pool_labels.parquet``:
the image id, the top class and its probability. The generator (``generator.pseudo_labels_from``) takes those whose
confidence reaches its threshold as labelled images and the rest unconditionally.

Only the pool is labelled, and the pool is the train split minus the run's labelled images: :func:`write_pool_labels`
refuses any id that is not a training image, so validation and test images can never become pseudo-labelled
generator inputs. The file's metadata names the classifier (its stage identity) and the labelled ids it learnt
from, so a classifier run that later mixes in the generator's samples can check that every label behind them is one
it may use (:func:`skinsynth.classify.mixing.check_generator_provenance`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from skinsynth.core.rundir import MODEL_POOL_LABELS, ids_hash
from skinsynth.core.shards import POOL_LABELS_METADATA
from skinsynth.data.schema import CLASSES
from skinsynth.errors import SkinsynthError

Progress = Callable[[str], None]
CHUNK = 512  # pool images per prediction batch between progress lines


def write_pool_labels(
    model_dir: Path,
    name: str,
    model_identity: str,
    pool_ids: list[str],
    labelled_ids: list[str],
    splits: pd.DataFrame,
    run_dir: Path,
    *,
    progress: Progress = print,
) -> Path:
    """Predict ``pool_ids`` with the classifier in ``model_dir`` and write ``model_dir/pool_labels.parquet``.

    Args:
        model_dir: the classifier's folder (weights and ``training.json`` written; the export's temp folder).
        name: the classifier's name under ``models/``.
        model_identity: its stage identity (what the generator's manifest records as its input).
        pool_ids: the run's unlabelled pool.
        labelled_ids: the run's labelled training ids (recorded, for the provenance check downstream).
        splits: the run's split table (``image_id``, ``split``), to refuse any id outside the train split.
        run_dir: the run directory the images are read from.

    Returns:
        The path of ``pool_labels.parquet``.

    Raises:
        SkinsynthError: a pool id that is not a training image, or one that is also labelled.
    """
    from skinsynth.classify.evaluate import load_trained_model, predict_probs
    from skinsynth.core.shards import read_rows

    split_of = splits.set_index("image_id")["split"]
    outside = [i for i in pool_ids if split_of.get(i) != "train"]
    if outside:
        raise SkinsynthError(
            f"pool labels: {len(outside)} of {len(pool_ids)} pool images are not training images (e.g. "
            f"{', '.join(outside[:3])}); only the train split's unlabelled pool may be pseudo-labelled"
        )
    both = sorted(set(pool_ids) & set(labelled_ids))
    if both:
        raise SkinsynthError(f"pool labels: {len(both)} images are both labelled and in the pool (e.g. {both[0]})")
    model, _info = load_trained_model(model_dir)
    probs = []
    for start in range(0, len(pool_ids), CHUNK):
        rows = read_rows(run_dir, pool_ids[start : start + CHUNK], columns=["image_id", "image"])  # no label column
        probs.append(predict_probs(model, rows.set_index("image_id").loc[pool_ids[start : start + CHUNK], "image"]))
        if len(pool_ids) > CHUNK:  # a small pool gets its one closing line only
            progress(f"pool labels: {min(start + CHUNK, len(pool_ids))}/{len(pool_ids)} pool images predicted")
    p = np.concatenate(probs) if probs else np.zeros((0, len(CLASSES)), np.float32)
    table = pd.DataFrame(
        {"image_id": pool_ids, "label": p.argmax(1).astype(np.int64), "confidence": p.max(1).astype(np.float64)}
    )
    record = {
        "model": name,
        "model_identity": model_identity,
        "labelled_ids": sorted(labelled_ids),
        "labelled_ids_sha256": ids_hash(labelled_ids),
        "pool_images": len(pool_ids),
    }
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), POOL_LABELS_METADATA: json.dumps(record)})
    path = Path(model_dir) / MODEL_POOL_LABELS  # the export's temp folder: it is swapped into place whole
    pq.write_table(arrow, path)
    confident = {t: int((table["confidence"] >= t).sum()) for t in (0.5, 0.8, 0.95)}
    progress(
        f"pool labels: {len(table)} pool images labelled by {name} -> models/{name}/{MODEL_POOL_LABELS} (confidence "
        ">= 0.5 / 0.8 / 0.95: " + " / ".join(str(n) for n in confident.values()) + ")"
    )
    return path
