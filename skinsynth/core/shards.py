"""Readers of a run's image shards (prepared ``data/`` and ``synthetic/``) and batch decoding, shared by every stage.

The shards hold PNG bytes; readers push id filters into the Parquet read, Ray Datasets stream them to training
workers, and decoding to tensors happens where the pixels are used, so the object store only ever carries compressed
images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from skinsynth.core.rundir import layout
from skinsynth.errors import SkinsynthError

TRAIN_COLUMNS = ["image_id", "image", "label", "group_id"]
# floor of the training loops' local shuffle buffer: a few thousand PNG rows (tens of MB) mix many shards
SHUFFLE_BUFFER_ROWS = 2048


def load_split_table(run_dir: str | Path) -> pd.DataFrame:
    """``RUN_DIR/data/splits.parquet`` with a clear error when the data stage has not run."""
    path = layout(run_dir).splits
    if not path.is_file():
        raise SkinsynthError(f"no prepared data at {path.parent}: run 'skinsynth data prepare --out {run_dir}' first")
    return pd.read_parquet(path)


def split_ids(splits: pd.DataFrame, split: str, labelled_only: bool = False) -> list[str]:
    """Image ids of one split (train: optionally only the labelled ones)."""
    rows = splits[splits["split"] == split]
    if labelled_only:
        rows = rows[rows["labelled"]]
    return sorted(rows["image_id"])


def read_rows(run_dir: str | Path, image_ids: list[str], columns: list[str] | None = None) -> pd.DataFrame:
    """Shard rows of the given ids, read on the caller (small sets: validation, test, evaluation).

    The id filter is pushed into the Parquet read, so only the requested rows' images are decoded into memory.
    """
    if columns is not None and "image_id" not in columns:
        columns = ["image_id", *columns]  # the rows come back sorted by it
    table = _read_shard_rows(run_dir, "data", image_ids, columns)
    return table.to_pandas().sort_values("image_id").reset_index(drop=True)


def _read_shard_rows(run_dir: str | Path, stage: str, image_ids: list[str], columns: list[str] | None) -> pa.Table:
    """The rows of ``image_ids`` in ``RUN_DIR/<stage>/images``, the id filter pushed into the Parquet read (from the
    run's URI for a mirrored remote run, see ``skinsynth.core.storage``)."""
    from skinsynth.core.storage import remote_shards

    run = layout(run_dir)
    path, filesystem = remote_shards(run_dir, *run.parts(run.shards(stage)))
    ids = pa.array(list(image_ids), pa.string())
    return pq.read_table(path, columns=columns, filters=pc.field("image_id").isin(ids), filesystem=filesystem)


def cached_dataset(
    run_dir: str | Path,
    image_ids: list[str] | dict[str, list[str]],
    columns: list[str] = TRAIN_COLUMNS,
    shuffle_seed: int | None = None,
    repeats: dict[str, int] | None = None,
    block_rows: int = 1024,
):
    """A Ray Dataset of the rows of ``image_ids`` (a list: prepared images; a mapping: stage -> ids, e.g.
    ``{"data": real, "synthetic": synthetic}``), read once by the driver and held in Ray's object store
    (``cache_rows``).

    One id-filtered Parquet read here replaces a Ray Data read-and-filter pipeline that would then be materialised:
    that pipeline's first run in a process starts read tasks in fresh worker processes (each importing this
    module's torch and OpenCV), a fixed cost whatever the data's size that is a large share of a demo-sized training
    run (docs/results.md), paid again by every sweep trial. ``repeats`` (image id -> times) adds class-balanced
    sampling's copies, and ``shuffle_seed`` shuffles the rows once (copies of one image spread over the epoch); the
    training loop's local shuffle buffer still varies the order every epoch.
    """
    import ray.data

    stages = image_ids if isinstance(image_ids, dict) else {"data": image_ids}
    tables = [_read_shard_rows(run_dir, stage, ids, columns) for stage, ids in stages.items() if ids]
    if not tables:
        raise SkinsynthError(f"no images to read from {run_dir}: the id list is empty")
    # the synthetic shards may hold large_string columns where the prepared ones hold string
    table = pa.concat_tables(tables, promote_options="permissive")
    order = np.arange(table.num_rows)
    if repeats:
        counts = np.array([repeats.get(i, 1) for i in table.column("image_id").to_pylist()], np.int64)
        order = np.repeat(order, counts)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(order)
    table = table.take(pa.array(order))
    # blocks of a thousand rows: Ray Train splits a dataset between workers by blocks
    return ray.data.from_arrow([table.slice(i, block_rows) for i in range(0, max(table.num_rows, 1), block_rows)])


def _keep_ids(batch: pd.DataFrame, ids: frozenset[str]) -> pd.DataFrame:
    return batch[batch["image_id"].isin(ids)]


def repeat_rows(batch: pd.DataFrame, repeats: dict[str, int]) -> pd.DataFrame:
    """Each row ``repeats[image_id]`` times (1 when absent): class-balanced sampling's copies."""
    return batch.loc[batch.index.repeat(batch["image_id"].map(repeats).fillna(1).astype(int))].reset_index(drop=True)


def shard_dataset(
    run_dir: str | Path,
    image_ids: list[str],
    columns: list[str] = TRAIN_COLUMNS,
    shuffle_seed: int | None = None,
    stage: str = "data",
):
    """A Ray Dataset over a stage's shards (``RUN_DIR/<stage>/images``: ``data`` or ``synthetic``), restricted to
    ``image_ids``.

    With ``shuffle_seed`` the shard files are read in a seeded order that changes with every pass (epoch); the
    training loop's local shuffle buffer then mixes rows across shards.

    Synthetic rows are refused here for anything but the train split by construction: callers pass validation
    and test ids from ``splits.parquet``, which only ever holds real images.
    """
    import ray.data

    from skinsynth.core.storage import remote_shards

    shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    # a mirrored remote run is read from its URI: the read tasks may run on nodes without the local copy
    run = layout(run_dir)
    path, filesystem = remote_shards(run_dir, *run.parts(run.shards(stage)))
    ds = ray.data.read_parquet(path, columns=columns, shuffle=shuffle, filesystem=filesystem)
    return ds.map_batches(_keep_ids, batch_format="pandas", fn_kwargs={"ids": frozenset(image_ids)})


def decode_png_arrays(images: Any) -> list[np.ndarray]:
    """PNG bytes (sequence) -> uint8 RGB arrays (H, W, 3)."""
    return [
        cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        for data in images
    ]


def decode_pngs(images: Any) -> torch.Tensor:
    """PNG bytes (sequence) -> uint8 tensor (N, 3, H, W)."""
    return torch.from_numpy(np.stack(decode_png_arrays(images))).permute(0, 3, 1, 2).contiguous()


def to_model_input(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised float, the one preprocessing used by training, evaluation and serving."""
    return normalise(images.float().div_(255.0), mean, std)


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Float images in [0, 1] -> the input distribution the model's pretrained weights expect."""
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def collated_batches(shard, collate: Callable[[dict[str, np.ndarray]], Any], device, **iter_kwargs):
    """The batches of a Ray Data shard, each passed through ``collate`` (PNG decoding, augmentation, tensors).

    On a GPU Ray Data collates one batch ahead in its own iteration thread (overlapping the step) and moves it to
    ``device`` from pinned memory. On a CPU that thread competes with the model's threads mid-step - it does even
    with ``prefetch_batches=0``: a py-spy profile of a HAM10000 epoch found the decoding and augmentation there - so
    numpy batches come from Ray and are collated here, in the training thread, between steps, as a plain PyTorch
    loop does; the caller moves them.
    """
    if device.type == "cuda":
        yield from shard.iter_torch_batches(
            collate_fn=_ray_numpy_collate(collate), prefetch_batches=1, device=device, pin_memory=True, **iter_kwargs
        )
        return
    for batch in shard.iter_batches(batch_format="numpy", prefetch_batches=0, **iter_kwargs):
        yield collate(batch)


def _ray_numpy_collate(collate: Callable[[dict[str, np.ndarray]], Any]):
    """``collate`` as Ray Data's class-based collate function for numpy batches (Ray 2.47 deprecated plain
    functions). Built on call so that importing this module does not import Ray (the server uses it too)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class NumpyCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> Any:
            return collate(batch)

    return NumpyCollate()


POOL_LABELS_METADATA = b"skinsynth.pool_labels"  # the Parquet schema metadata key of a pool-labels file's record


def read_pool_labels(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A classifier's pool labels (``models/<name>/pool_labels.parquet``, written by
    ``skinsynth.classify.pool_labels``): the table (``image_id``, ``label``, ``confidence``) and its record
    (``model``, ``model_identity``, ``labelled_ids``, ...)."""
    table = pq.read_table(path)
    record = json.loads((table.schema.metadata or {}).get(POOL_LABELS_METADATA, b"{}"))
    return table.to_pandas(), record
