"""The real data sets in ../shared/data, prepared at 64 px end to end (marked realdata; skipped when absent)."""

from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq
import pytest

from skinsynth.config import DataConfig, PreprocessConfig
from skinsynth.data.prepare import prepare_images

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _check_prepared(result, metadata: pd.DataFrame) -> pd.DataFrame:
    images = pq.read_table(result.data_dir / "images", columns=["image_id", "dx", "group_id", "width"]).to_pandas()
    quarantine = pd.read_csv(result.data_dir / "quarantine.csv")
    # every metadata row is either in the shards or quarantined with a reason
    assert len(images) + len(quarantine) == len(metadata)
    assert quarantine["reason"].notna().all()
    assert images["image_id"].is_unique
    assert (images["width"] == 64).all()
    splits = pd.read_parquet(result.data_dir / "splits.parquet")
    assert set(splits["image_id"]) == set(images["image_id"])
    assert splits.groupby("group_id")["split"].nunique().max() == 1  # zero lesions shared between splits
    merged = images.merge(splits, on="image_id", suffixes=("", "_split"))
    assert (merged["group_id"] == merged["group_id_split"]).all()
    return images


def test_ham10000_prepares_every_image_with_metadata_class_counts(ray_local, ham10000_dir, tmp_path):
    metadata = pd.read_csv(ham10000_dir / "metadata.csv")
    cfg = DataConfig(source="ham10000", path=str(ham10000_dir), preprocess=PreprocessConfig(size=64))
    result = prepare_images(cfg, tmp_path / "ham", progress=print)
    images = _check_prepared(result, metadata)
    assert len(images) == 10015
    assert images["dx"].value_counts().to_dict() == metadata["dx"].value_counts().to_dict()
    # lesion ids come from the metadata; the two byte-identical pairs already share a lesion
    assert images["group_id"].nunique() == metadata["lesion_id"].nunique() == 7470
    assert sorted(map(sorted, result.card["exact_duplicate_sets"])) == [
        ["ISIC_0024366", "ISIC_0029861"],
        ["ISIC_0024777", "ISIC_0029938"],
    ]
    assert result.card["splits"]["test"] == pytest.approx(0.15 * 10015, rel=0.05)


def test_isic2017_prepares_with_duplicates_grouped(ray_local, isic2017_dir, tmp_path):
    metadata = pd.read_csv(isic2017_dir / "metadata.csv")
    cfg = DataConfig(source="isic", path=str(isic2017_dir), preprocess=PreprocessConfig(size=64))
    result = prepare_images(cfg, tmp_path / "isic", progress=print)
    images = _check_prepared(result, metadata)
    assert len(images) == 2750
    assert images["dx"].value_counts().to_dict() == metadata["dx"].value_counts().to_dict()
    # the six marked byte-identical pairs each form one group
    pairs = metadata.dropna(subset=["exact_duplicate_of"])
    assert len(pairs) == 6
    groups = images.set_index("image_id")["group_id"]
    for dup, original in zip(pairs["image_id"], pairs["exact_duplicate_of"]):
        assert groups[dup] == groups[original]
    assert len(result.card["exact_duplicate_sets"]) == 6
