"""Lesion grouping for class folders: the metadata CSV, and groups estimated by image similarity without it."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinsynth.config import DataConfig, PreprocessConfig
from skinsynth.data.card import format_data_card
from skinsynth.data.grouping import hamming_pairs, merge_similar_groups, perceptual_hash
from skinsynth.data.prepare import prepare_images
from skinsynth.data.sources import SourceError, list_class_folders
from tests.conftest import SHARED_DATA, encode


def _photo(seed: int, size: int = 128) -> np.ndarray:
    """A random 'dermoscopy photograph': uneven skin with three blurred dark ellipses placed by the seed."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (200, 150, 130), np.float32)
    img += cv2.resize(rng.random((4, 4, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC) * 40
    for _ in range(3):
        centre = tuple(int(v) for v in rng.integers(size // 5, 4 * size // 5, 2))
        axes = tuple(int(v) for v in rng.integers(size // 10, size // 3, 2))
        colour = tuple(float(v) for v in rng.uniform(40, 120, 3))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return np.clip(cv2.GaussianBlur(img, (0, 0), 2), 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _class_folders(root: Path, images: dict[str, tuple[str, bytes]]) -> Path:
    for image_id, (dx, data) in images.items():
        (root / dx).mkdir(parents=True, exist_ok=True)
        (root / dx / f"{image_id}.jpg").write_bytes(data)
    return root


def test_metadata_csv_gives_lesion_groups_and_quarantines_mismatches(tmp_path):
    root = _class_folders(
        tmp_path / "imgs", {f"img{i}": ("mel" if i < 3 else "nv", encode(_photo(i))) for i in range(5)}
    )
    (root / "metadata.csv").write_text(
        "image_id,lesion_id,age,sex,localization,fitzpatrick\n"
        "img0,L1,45,female,back,II\n"
        "img1,L1,45,female,back,2\n"
        "img2,L2,,unknown,,\n"
        "img3,L3,70,male,face,9\n"
        "ghost,L9,30,male,back,1\n"  # no file
        "img0,L5,1,male,back,1\n"  # repeated id
    )  # img4 has no row
    listing = list_class_folders(str(root))
    assert listing.grouping == "lesion_id"
    rec = listing.records.set_index("image_id")
    assert sorted(rec.index) == ["img0", "img1", "img2", "img3"]
    assert rec.at["img0", "group_id"] == rec.at["img1", "group_id"] == "L1"
    assert rec.at["img3", "group_id"] == "L3" and rec.at["img3", "dx"] == "nv"
    assert rec.at["img0", "age"] == 45.0 and np.isnan(rec.at["img2", "age"])
    assert rec.at["img0", "sex"] == "female" and rec.at["img2", "sex"] is None
    assert rec.at["img0", "fitzpatrick"] == 2 and rec.at["img1", "fitzpatrick"] == 2
    assert rec.at["img3", "fitzpatrick"] is None  # 9 is no skin type
    reasons = {q["image_id"]: q["reason"] for q in listing.quarantine}
    assert reasons == {
        "ghost": "image file not found for this image_id",
        "img0": "duplicate image_id (first row kept)",
        "img4": "image file has no metadata row in the metadata table",
    }
    assert [q["dx"] for q in listing.quarantine if q["image_id"] == "img4"] == ["nv"]


def test_metadata_setting_and_csv_without_lesion_ids(tmp_path):
    root = _class_folders(tmp_path / "imgs", {"a": ("bcc", encode(_photo(1))), "b": ("bcc", encode(_photo(2)))})
    meta = tmp_path / "elsewhere.csv"
    meta.write_text("image_id,age\na,50\nb,60\n")
    listing = list_class_folders(str(root), str(meta))
    assert listing.grouping == "image" and not listing.quarantine
    assert list(listing.records["group_id"]) == ["a", "b"]
    assert list(listing.records["age"]) == [50.0, 60.0]
    assert list_class_folders(str(root)).grouping == "image"  # no CSV at all
    with pytest.raises(SourceError, match="data.metadata is not a file"):
        list_class_folders(str(root), str(tmp_path / "missing.csv"))
    meta.write_text("file,age\na,50\n")
    with pytest.raises(SourceError, match="lacks column image_id"):
        list_class_folders(str(root), str(meta))


def _variants(rgb: np.ndarray) -> dict[str, bytes]:
    # pHash tolerates about a 1 px shift of a 128 px image (HAM10000 images: 0-6 bits); 2 px or more often exceed
    # the threshold, so views that are moved further are not found
    shifted = cv2.warpAffine(
        rgb, np.float32([[1, 0, 1], [0, 1, 1]]), rgb.shape[1::-1], borderMode=cv2.BORDER_REPLICATE
    )
    brighter = np.clip(rgb.astype(np.int16) + 20, 0, 255).astype(np.uint8)
    return {
        "shifted": _jpeg(shifted, 90),
        "recompressed": _jpeg(rgb, 60),
        "brighter": _jpeg(brighter, 90),
        "smaller": _jpeg(cv2.resize(rgb, (96, 96), interpolation=cv2.INTER_AREA), 90),
    }


def test_near_identical_images_join_and_different_ones_do_not():
    base = _photo(0)
    hashes = {"original": perceptual_hash(_jpeg(base, 95))}
    hashes |= {name: perceptual_hash(data) for name, data in _variants(base).items()}
    hashes |= {f"other{i}": perceptual_hash(_jpeg(_photo(100 + i), 95)) for i in range(20)}
    assert perceptual_hash(b"not an image") is None
    frame = pd.DataFrame({"image_id": list(hashes), "group_id": list(hashes), "phash": list(hashes.values())})
    groups, sets = merge_similar_groups(frame, DataConfig().group_similar)
    by_id = dict(zip(frame["image_id"], groups))
    near = ["original", "shifted", "recompressed", "brighter", "smaller"]
    assert {by_id[name] for name in near} == {by_id["original"]}
    assert len({by_id[f"other{i}"] for i in range(20)} | {by_id["original"]}) == 21
    assert sets == [sorted(near)]
    # the pairwise search agrees with a direct count
    values = np.array(list(hashes.values()), dtype=np.uint64)
    assert set(hamming_pairs(values, 64)) == {(i, j) for i in range(len(values)) for j in range(i + 1, len(values))}


def test_prepare_folder_without_lesion_ids_warns_once_and_records_estimated(tmp_path):
    base = _photo(0)
    images = {"orig": ("mel", _jpeg(base, 95))}
    images |= {name: ("mel", data) for name, data in _variants(base).items()}
    images |= {f"nv{i}": ("nv", _jpeg(_photo(50 + i), 95)) for i in range(6)}
    images["copy"] = ("nv", images["orig"][1])  # byte-identical, even filed under another class
    root = _class_folders(tmp_path / "imgs", images)
    lines: list[str] = []
    cfg = DataConfig(source="folder", path=str(root), preprocess=PreprocessConfig(size=32, min_side=16))
    result = prepare_images(cfg, tmp_path / "run", engine="local", progress=lines.append)
    warnings = [line for line in lines if "WARNING" in line]
    assert len(warnings) == 1 and "estimated from image similarity" in warnings[0]
    card = result.card
    assert card["grouping"] == "estimated"
    assert card["lesion_groups"] == 7  # the six variants and the copy form one group; six different nv images
    assert card["exact_duplicate_sets"] == [["copy", "orig"]]
    assert card["similar_image_sets"] == [sorted(["orig", "copy", *_variants(base)])]
    assert "ESTIMATED from image similarity" in format_data_card(card)
    assert json.loads((result.data_dir / "data_card.json").read_text())["grouping"] == "estimated"
    splits = pd.read_parquet(result.data_dir / "splits.parquet")
    assert splits.groupby("group_id")["split"].nunique().max() == 1

    # with lesion ids in metadata.csv: no warning, grouping from the source
    (root / "metadata.csv").write_text("image_id,lesion_id\n" + "".join(f"{i},L_{i}\n" for i in images))
    lines.clear()
    result = prepare_images(cfg, tmp_path / "run2", engine="local", progress=lines.append)
    assert not [line for line in lines if "WARNING" in line]
    assert result.card["grouping"] == "lesion_id" and result.card["similar_image_sets"] == []
    assert result.card["lesion_groups"] == 11  # only the byte-identical pair shares a group

    # similarity grouping switched off: grouping by image, and a warning that says so
    lines.clear()
    (root / "metadata.csv").unlink()
    off = DataConfig(source="folder", path=str(root), group_similar=None, preprocess=cfg.preprocess)
    result = prepare_images(off, tmp_path / "run3", engine="local", progress=lines.append)
    assert result.card["grouping"] == "image"
    assert len([line for line in lines if "WARNING" in line and "by image" in line]) == 1


# --- real data: HAM10000 images in class folders, as a user would bring them


def _ham_class_folders(tmp_path: Path, per_class: int = 60, seed: int = 0) -> tuple[Path, pd.DataFrame]:
    meta = pd.read_csv(SHARED_DATA / "ham10000" / "metadata.csv")
    rng = np.random.default_rng(seed)
    chosen = pd.concat(
        [g.iloc[rng.permutation(len(g))[:per_class]] for _, g in meta.groupby("dx", sort=True)], ignore_index=True
    )
    # both byte-identical pairs of HAM10000, so the set holds copies that must share a group
    pairs = meta[meta["image_id"].isin(["ISIC_0029938", "ISIC_0024777", "ISIC_0029861", "ISIC_0024366"])]
    chosen = pd.concat([chosen, pairs]).drop_duplicates("image_id").reset_index(drop=True)
    root = tmp_path / "folders"
    for row in chosen.itertuples(index=False):
        (root / row.dx).mkdir(parents=True, exist_ok=True)
        (root / row.dx / f"{row.image_id}.jpg").symlink_to(SHARED_DATA / "ham10000" / "images" / f"{row.image_id}.jpg")
    return root, chosen


@pytest.mark.realdata
def test_ham10000_class_folders_grouping(tmp_path):
    if not (SHARED_DATA / "ham10000" / "metadata.csv").is_file():
        pytest.skip(f"real data not available: {SHARED_DATA / 'ham10000'} is missing (needs ../shared/data)")
    started = time.perf_counter()
    root, chosen = _ham_class_folders(tmp_path)
    lesion_of = chosen.set_index("image_id")["lesion_id"]
    pre = PreprocessConfig(size=64, hair_removal=False)

    # without metadata: one warning line, and the estimated groups hold every byte-identical and near-identical pair
    lines: list[str] = []
    cfg = DataConfig(source="folder", path=str(root), preprocess=pre)
    result = prepare_images(cfg, tmp_path / "est", engine="local", progress=lines.append)
    assert len([line for line in lines if "WARNING" in line and "estimated" in line]) == 1
    assert result.card["grouping"] == "estimated"
    splits = pd.read_parquet(result.data_dir / "splits.parquet").set_index("image_id")
    group = splits["group_id"]
    assert group["ISIC_0029938"] == group["ISIC_0024777"] and group["ISIC_0029861"] == group["ISIC_0024366"]
    hashes = {
        i: perceptual_hash((SHARED_DATA / "ham10000" / "images" / f"{i}.jpg").read_bytes()) for i in chosen["image_id"]
    }
    ids = list(hashes)
    near = [(ids[a], ids[b]) for a, b in hamming_pairs(np.array(list(hashes.values()), np.uint64), 2)]
    assert near and all(group[a] == group[b] for a, b in near)
    assert result.card["lesion_groups"] < len(chosen)
    lesions_in_two = (splits.assign(lesion=lesion_of).groupby("lesion")["split"].nunique() > 1).sum()
    print(f"estimated grouping: {lesions_in_two} lesions in two splits; {len(chosen)} images")

    # with lesion ids in metadata.csv: no lesion sits in two splits
    chosen[["image_id", "lesion_id", "age", "sex", "localization"]].to_csv(root / "metadata.csv", index=False)
    lines.clear()
    result = prepare_images(cfg, tmp_path / "ids", engine="local", progress=lines.append)
    assert not [line for line in lines if "WARNING" in line]
    assert result.card["grouping"] == "lesion_id"
    assert result.card["lesion_groups"] == chosen["lesion_id"].nunique()
    splits = pd.read_parquet(result.data_dir / "splits.parquet")
    assert splits.groupby("group_id")["split"].nunique().max() == 1
    assert (splits.set_index("image_id")["group_id"] == lesion_of.reindex(splits["image_id"]).to_numpy()).all()
    print(f"realdata class-folder grouping test: {time.perf_counter() - started:.1f} s")
