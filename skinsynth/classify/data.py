"""Classifier inputs: prepared shards joined with their split, as Ray Datasets and as decoded, augmented tensors.

The shards hold PNG bytes; decoding and augmentation happen in the training workers (``collate``), so the object
store only ever carries compressed images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchvision.transforms import v2

from skinsynth.errors import SkinsynthError

TRAIN_COLUMNS = ["image_id", "image", "label", "group_id"]


def load_split_table(run_dir: str | Path) -> pd.DataFrame:
    """``RUN_DIR/data/splits.parquet`` with a clear error when the data stage has not run."""
    path = Path(run_dir) / "data" / "splits.parquet"
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
    table = pq.read_table(
        Path(run_dir) / "data" / "images",
        columns=columns,
        filters=pc.field("image_id").isin(pa.array(list(image_ids), pa.string())),
    )
    return table.to_pandas().sort_values("image_id").reset_index(drop=True)


def _keep_ids(batch: pd.DataFrame, ids: frozenset[str]) -> pd.DataFrame:
    return batch[batch["image_id"].isin(ids)]


def shard_dataset(
    run_dir: str | Path, image_ids: list[str], columns: list[str] = TRAIN_COLUMNS, shuffle_seed: int | None = None
):
    """A Ray Dataset over the prepared shards, restricted to ``image_ids``.

    With ``shuffle_seed`` the shard files are read in a seeded order that changes with every pass (epoch); the
    training loop's local shuffle buffer then mixes rows across shards.

    Synthetic rows are refused here for anything but the train split by construction: callers pass validation
    and test ids from ``splits.parquet``, which only ever holds real images.
    """
    import ray.data

    shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = ray.data.read_parquet(str(Path(run_dir) / "data" / "images"), columns=columns, shuffle=shuffle)
    return ds.map_batches(_keep_ids, batch_format="pandas", fn_kwargs={"ids": frozenset(image_ids)})


def decode_pngs(images: Any) -> torch.Tensor:
    """PNG bytes (sequence) -> uint8 tensor (N, 3, H, W)."""
    arrays = []
    for data in images:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        arrays.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def train_augmentation(size: int) -> v2.Compose:
    """Dermoscopy augmentation: lesions have no up or left, so all flips and rotations are label-preserving;
    mild colour jitter covers device differences that colour constancy leaves (Perez et al. 2018, "Data
    augmentation for skin lesion analysis")."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomApply([v2.RandomRotation(180)], p=0.5),
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02),
        ]
    )


def to_model_input(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised float, the one preprocessing used by training, evaluation and serving."""
    x = images.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class Collate:
    """Ray Data numpy batch -> (normalised images, labels); augmentation is drawn per image."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], augment: v2.Compose | None = None):
        self.mean, self.std, self.augment = mean, std, augment

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        images = decode_pngs(batch["image"])
        if self.augment is not None:
            images = torch.stack([self.augment(img) for img in images])
        labels = torch.as_tensor(np.asarray(batch["label"], dtype=np.int64))
        return to_model_input(images, self.mean, self.std), labels
