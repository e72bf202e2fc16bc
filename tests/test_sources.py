from __future__ import annotations

import pytest

from skinsynth.config import DataConfig, PhantomConfig
from skinsynth.data.sources import (
    SourceError,
    list_class_folders,
    list_ham10000,
    list_isic,
    list_source,
    normalise_label,
)
from tests.conftest import BAD_EXPECTED, GOOD_IDS, encode, skin_with_lesion


def test_ham10000_layout_finds_images_in_both_parts(messy_ham_dir):
    listing = list_ham10000(str(messy_ham_dir))
    ids = set(listing.records["image_id"])
    assert set(GOOD_IDS) <= ids and "ISIC_rgba" in ids
    parts = {r.split("/")[-2] for r in listing.records["uri"]}
    assert parts == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    by_id = listing.records.set_index("image_id")
    assert by_id.at[GOOD_IDS[0], "group_id"] == by_id.at[GOOD_IDS[7], "group_id"] == "HAM_shared"
    assert by_id.at[GOOD_IDS[0], "dx"] == "akiec" and by_id.at[GOOD_IDS[0], "age"] == 50.0
    reasons = {q["image_id"]: q["reason"] for q in listing.quarantine}
    # listing-time refusals: label, missing file, orphan file, duplicate id
    assert reasons["ISIC_unknowndx"].startswith(BAD_EXPECTED["ISIC_unknowndx"])
    assert reasons["ISIC_missing"] == BAD_EXPECTED["ISIC_missing"]
    assert reasons["ISIC_orphan"].startswith(BAD_EXPECTED["ISIC_orphan"])
    dup = [q for q in listing.quarantine if q["reason"] == "duplicate image_id (first row kept)"]
    assert [q["image_id"] for q in dup] == [GOOD_IDS[0]]
    # the first row of the duplicated id is the one kept
    assert by_id.at[GOOD_IDS[0], "dx"] == "akiec"


def test_missing_path_and_metadata_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="source path does not exist"):
        list_ham10000(str(tmp_path / "nowhere"))
    with pytest.raises(SourceError, match="no metadata.csv or HAM10000_metadata.csv"):
        list_ham10000(str(tmp_path))
    with pytest.raises(SourceError, match="needs a folder"):
        list_source(DataConfig(source="isic", path=None))


def _isic_folder(tmp_path, header: str, rows: list[str]):
    root = tmp_path / "isic"
    (root / "images").mkdir(parents=True)
    for row in rows:
        image_id = row.split(",")[0]
        (root / "images" / f"{image_id}.jpg").write_bytes(encode(skin_with_lesion(64)))
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root


def test_isic_one_hot_2017_style(tmp_path):
    root = _isic_folder(
        tmp_path,
        "image_id,melanoma,seborrheic_keratosis",
        ["ISIC_1,1.0,0.0", "ISIC_2,0.0,1.0", "ISIC_3,0,0", "ISIC_4,1,1"],
    )
    listing = list_isic(str(root))
    assert dict(zip(listing.records["image_id"], listing.records["dx"])) == {
        "ISIC_1": "mel",
        "ISIC_2": "bkl",
        "ISIC_3": "nv",
    }
    assert listing.quarantine[0]["image_id"] == "ISIC_4"
    assert "unknown label 'melanoma+seborrheic_keratosis'" in listing.quarantine[0]["reason"]


def test_isic_one_hot_2018_style(tmp_path):
    root = _isic_folder(
        tmp_path,
        "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC",
        ["ISIC_a,0,0,1,0,0,0,0", "ISIC_b,0,0,0,0,0,0,1", "ISIC_c,0,0,0,0,0,0,0"],
    )
    listing = list_isic(str(root))
    assert dict(zip(listing.records["image_id"], listing.records["dx"])) == {"ISIC_a": "bcc", "ISIC_b": "vasc"}
    assert listing.quarantine[0]["reason"].startswith("unknown label 'no class column set'")


def test_isic_dx_column_split_and_duplicates(tmp_path):
    root = _isic_folder(
        tmp_path,
        "image_id,dx,split,sex,age,exact_duplicate_of",
        ["ISIC_1,mel,train,female,55,", "ISIC_2,nv,validation,male,,", "ISIC_3,nv,test,,,ISIC_2"],
    )
    listing = list_isic(str(root))
    rec = listing.records.set_index("image_id")
    assert list(rec["source_split"]) == ["train", "val", "test"]
    assert rec.at["ISIC_3", "group_id"] == "ISIC_2"  # a marked duplicate joins its original's group
    assert rec.at["ISIC_1", "age"] == 55.0 and rec.at["ISIC_2", "sex"] == "male"


def test_class_folders(tmp_path):
    for name in ("mel", "nevus", "unknownclass"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}_1.jpg").write_bytes(encode(skin_with_lesion(64)))
    (tmp_path / "mel" / "notes.txt").write_text("hello")
    listing = list_class_folders(str(tmp_path))
    assert dict(zip(listing.records["image_id"], listing.records["dx"])) == {"mel_1": "mel", "nevus_1": "nv"}
    reasons = {q["image_id"]: q["reason"] for q in listing.quarantine}
    assert reasons["notes"] == "unsupported file type '.txt'"
    assert reasons["unknownclass_1"].startswith("unknown label 'unknownclass' (folder name")


def test_phantom_listing_carries_ground_truth():
    listing = list_source(DataConfig(source="phantom", phantom=PhantomConfig(n_images=70, seed=1)))
    assert len(listing.records) == 70
    assert set(listing.records["dx"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert listing.records["tone_true"].notna().all()
    assert (listing.records["source"] == "phantom").all()


def test_label_aliases():
    assert normalise_label("MEL") == "mel"
    assert normalise_label(" Seborrheic_Keratosis ") == "bkl"
    assert normalise_label("melanocytic nevi") == "nv"
    assert normalise_label("xyz") is None
    assert normalise_label(float("nan")) is None
