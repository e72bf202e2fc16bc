"""The phantom generator: determinism, class balance, lesion grouping, tone coverage, and that the rendered images
carry the ground truth they claim (background ITA, lesion area, class-dependent colour)."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

from skinsynth.data.phantom import (
    HAM10000_COUNTS,
    phantom_records,
    render_phantom,
    render_phantom_layers,
)
from skinsynth.data.schema import CLASS_TO_LABEL, CLASSES, TONES, tone_from_ita


@pytest.fixture(scope="module")
def records() -> pd.DataFrame:
    return phantom_records(700, seed=3)


@pytest.fixture(scope="module")
def ham() -> pd.DataFrame:
    return phantom_records(10015, seed=0, class_balance="ham10000")


def _lab(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def _ita(L: np.ndarray, b: np.ndarray) -> float:
    """ITA of the mean L*, b* (Chardon et al. 1991)."""
    return math.degrees(math.atan2(float(L.mean()) - 50.0, float(b.mean())))


def _sample(df: pd.DataFrame, per: int, by: str) -> list[dict]:
    return [r for _, g in df.groupby(by) for r in g.head(per).to_dict("records")]


def test_records_are_deterministic_and_depend_on_seed():
    a = phantom_records(150, seed=7)
    pd.testing.assert_frame_equal(a, phantom_records(150, seed=7))
    b = phantom_records(150, seed=8)
    assert not a["ita_true"].equals(b["ita_true"])
    assert (a["phantom_seed"] != b["phantom_seed"]).all()
    assert a["phantom_seed"].is_unique


def test_record_columns(records):
    n = len(records)
    assert n == 700
    assert list(records["image_id"][:3]) == ["phantom_000000", "phantom_000001", "phantom_000002"]
    assert records["image_id"].is_unique
    assert records["group_id"].str.fullmatch(r"phantom_lesion_\d{6}").all()
    assert set(records["dx"]) == set(CLASSES)
    assert (records["label"] == records["dx"].map(CLASS_TO_LABEL)).all()
    assert (records["source"] == "phantom").all()
    assert (records["tone_true"] == records["ita_true"].map(tone_from_ita)).all()
    assert records["sex"].isin(["male", "female"]).all()
    assert records["age"].between(5, 85).all()
    assert (records["image_size"] == 128).all()
    assert records["lesion_radius"].between(0.07, 0.31).all()
    assert records["border_irregularity"].between(0.0, 1.0).all()
    assert records["n_colours"].between(1, 5).all()
    assert records["vignette"].isin(["none", "soft", "field"]).all()
    # ITA of the generating L*, b* is exactly the stored angle.
    ita = np.degrees(np.arctan2(records["skin_L"] - 50.0, records["skin_b"]))
    np.testing.assert_allclose(ita, records["ita_true"], atol=1e-9)
    # Roughly 40 % hairy images.
    assert 0.3 < records["has_hair"].mean() < 0.5
    # Class-dependent metadata: keratinocyte cancers are older than naevi.
    ages = records.groupby("dx")["age"].mean()
    assert ages["bcc"] > ages["nv"] + 10 and ages["akiec"] > ages["nv"] + 10


def test_uniform_class_counts():
    assert phantom_records(700, seed=1)["dx"].value_counts().to_dict() == {dx: 100 for dx in CLASSES}
    counts = phantom_records(703, seed=1)["dx"].value_counts()
    assert [counts[dx] for dx in CLASSES] == [101, 101, 101, 100, 100, 100, 100]


def test_ham10000_class_counts(ham):
    assert ham["dx"].value_counts().to_dict() == HAM10000_COUNTS
    small = phantom_records(100, seed=0, class_balance="ham10000")["dx"].value_counts()
    # Largest remainder: 66.95 -> 67 nv, 11.11 -> 11 mel, 10.97 -> 11 bkl, 5.13 bcc, 3.27 akiec, 1.42 vasc, 1.15 df.
    assert small.to_dict() == {"nv": 67, "mel": 11, "bkl": 11, "bcc": 5, "akiec": 3, "vasc": 2, "df": 1}


def test_views_of_a_lesion_share_identity(ham):
    sizes = ham.groupby("group_id").size()
    assert sizes.mean() == pytest.approx(1.3, abs=0.03)
    assert (sizes > 1).sum() > 1000
    shared = ["dx", "ita_true", "tone_true", "age", "sex", "localization", "lesion_seed", "n_colours", "has_network"]
    assert (ham.groupby("group_id")[shared].nunique() == 1).all().all()
    # Each view is its own photograph: own seed, own placement; views are numbered 0..k-1.
    multi = ham[ham["group_id"].isin(sizes[sizes > 1].index)]
    assert (multi.groupby("group_id")["phantom_seed"].nunique() == multi.groupby("group_id").size()).all()
    assert (multi.groupby("group_id")["view"].agg(lambda v: sorted(v) == list(range(len(v))))).all()
    assert (multi.groupby("group_id")["rotation_deg"].nunique() > 1).all()


def test_two_views_show_the_same_lesion():
    df = phantom_records(200, seed=4)
    group = df.groupby("group_id").filter(lambda g: len(g) > 1)["group_id"].iloc[0]
    (a, ma), (b, mb) = (render_phantom(r, return_mask=True) for r in df[df["group_id"] == group].to_dict("records"))
    assert not np.array_equal(a, b)
    assert ma.sum() == pytest.approx(mb.sum(), rel=0.25)  # views zoom by at most 8 % in radius
    # Same lesion colour (pixels deep inside the mask, away from the border).
    ia, ib = (cv2.erode(m.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) for m in (ma, mb))
    np.testing.assert_allclose(_lab(a)[ia].mean(0), _lab(b)[ib].mean(0), atol=6.0)


def test_all_tone_bins_are_well_represented():
    counts = phantom_records(600, seed=2)["tone_true"].value_counts()
    assert set(counts.index) == set(TONES)
    assert counts.min() >= 60  # ~100 expected per bin
    ita = phantom_records(600, seed=2)["ita_true"]
    assert ita.min() < -50 and ita.max() > 65


def test_render_shape_dtype_and_determinism(records):
    rec = records.iloc[0]
    img = render_phantom(rec)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert render_phantom(rec.to_dict()).tobytes() == img.tobytes()  # Series or dict: same bytes
    img2, mask = render_phantom(rec, return_mask=True)
    assert img2.tobytes() == img.tobytes()
    assert mask.shape == (128, 128) and mask.dtype == bool
    other = dict(rec, phantom_seed=int(rec["phantom_seed"]) + 1)
    assert not np.array_equal(render_phantom(other), img)
    for size in (64, 224):
        small = phantom_records(3, seed=3, image_size=size)
        im = render_phantom(small.iloc[0])
        assert im.shape == (size, size, 3) and im.dtype == np.uint8


def test_render_is_identical_in_a_fresh_process(records):
    rec = records.iloc[5].to_dict()
    code = (
        "import hashlib, sys; from skinsynth.data.phantom import render_phantom; "
        f"r = {rec!r}; sys.stdout.write(hashlib.sha256(render_phantom(r).tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == hashlib.sha256(render_phantom(rec).tobytes()).hexdigest()


def test_background_ita_matches_ground_truth(records):
    sample = _sample(records, 8, "tone_true")  # 48 images over the whole ITA range
    for rec in sample:
        layers = render_phantom_layers(rec)
        lab = _lab(layers.image)
        assert layers.skin.mean() > 0.2
        assert not (layers.skin & (layers.lesion | layers.hair)).any()
        # Healthy-skin layer: exact by construction up to quantisation, blur and noise.
        skin = lab[layers.skin]
        assert _ita(skin[:, 0], skin[:, 2]) == pytest.approx(rec["ita_true"], abs=1.5)
        if rec["vignette"] == "none":
            # What a tone estimator can do without the layers: outside the lesion, skipping dark hair pixels.
            outside = ~cv2.dilate(layers.lesion.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            hair = lab[..., 0] < 0.6 * rec["skin_L"]
            px = lab[outside & ~hair]
            assert np.median(np.degrees(np.arctan2(px[:, 0] - 50.0, px[:, 2]))) == pytest.approx(
                rec["ita_true"], abs=4.0
            )


def test_mask_matches_lesion_geometry(records):
    for rec in _sample(records, 6, "dx"):
        layers = render_phantom_layers(rec)
        size = rec["image_size"]
        area = layers.lesion.sum() / (math.pi * (rec["lesion_radius"] * size) ** 2)
        # lesion_radius is the equivalent-disc radius; akiec borders are noisy, hence the looser bound.
        assert area == pytest.approx(1.0, abs=0.2 if rec["dx"] == "akiec" else 0.05)
        ys, xs = np.nonzero(layers.lesion)
        off = math.hypot(xs.mean() + 0.5 - rec["center_x"] * size, ys.mean() + 0.5 - rec["center_y"] * size)
        assert off < 0.3 * rec["lesion_radius"] * size
        # The lesion stands out from the skin on every tone: median CIE76 colour difference to the mean skin colour.
        lab = _lab(layers.image)
        inner = cv2.erode(layers.lesion.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~layers.hair
        delta_e = np.linalg.norm(lab[inner] - lab[layers.skin].mean(0), axis=1)
        assert np.median(delta_e) > 5.0


def test_hair_layer(records):
    for rec in records.head(30).to_dict("records"):
        layers = render_phantom_layers(rec)
        if not rec["has_hair"]:
            assert not layers.hair.any()
            continue
        assert layers.hair.sum() > 20
        lab = _lab(layers.image)
        visible = layers.hair & ~layers.lesion & (lab[..., 0] > 1.0)  # not inside a black dermoscope border
        if visible.sum() > 20:
            assert lab[visible][:, 0].mean() < rec["skin_L"] - 5.0


def test_class_features_are_learnable():
    df = phantom_records(210, seed=9)
    stats: dict[str, list[tuple[float, float]]] = {"mel": [], "nv": [], "vasc": []}
    for rec in df[df["dx"].isin(list(stats))].to_dict("records"):
        image, mask = render_phantom(rec, return_mask=True)
        lesion = _lab(image)[mask]
        stats[rec["dx"]].append((float(lesion.std(0).sum()), float(lesion[:, 1].mean())))
    colour_spread = {dx: np.mean([s for s, _ in v]) for dx, v in stats.items()}
    redness = {dx: np.mean([a for _, a in v]) for dx, v in stats.items()}
    # Melanomas show more colours than naevi (ABCD "C"); vascular lesions are much redder (higher a*).
    assert colour_spread["mel"] > 1.5 * colour_spread["nv"]
    assert redness["vasc"] > redness["nv"] + 8.0
    # ... but not trivially: some melanomas are as uniform as a typical naevus.
    mel_spread = np.array([s for s, _ in stats["mel"]])
    assert (mel_spread < np.percentile([s for s, _ in stats["nv"]], 90)).any()


@pytest.mark.parametrize(
    "kwargs",
    [dict(class_balance="isic"), dict(views_per_lesion=0.5), dict(n_images=-1), dict(image_size=8), dict(seed=-1)],
)
def test_bad_arguments_raise(kwargs):
    args = dict(n_images=10) | kwargs
    with pytest.raises(ValueError):
        phantom_records(**args)


def test_zero_images():
    df = phantom_records(0)
    assert len(df) == 0 and "phantom_seed" in df.columns


def test_a_train_tone_skew_changes_only_the_train_splits_malignant_lesions():
    """data.phantom.train_dark_malignant_share: the train split's malignant lesions get dark skin at the given rate;
    every other lesion, and the split itself, is the one the unskewed set has."""
    from skinsynth.config import load_config
    from skinsynth.data.schema import MALIGNANT
    from skinsynth.data.sources import list_phantom
    from skinsynth.data.splits import lesion_grouped_split

    def listing(share):
        skew = [] if share is None else [f"data.phantom.train_dark_malignant_share={share}"]
        settings = ["data.phantom.n_images=600", *skew]
        cfg = load_config(None, settings)
        frame = pd.DataFrame(list_phantom(cfg.data).records)
        return frame.assign(split=lesion_grouped_split(frame, cfg.data.split)["split"].to_numpy())

    plain, skewed = listing(None), listing(0.0)
    assert (plain["split"] == skewed["split"]).all()
    dark = skewed["tone_true"].isin(["brown", "dark"])
    train_malignant = (skewed["split"] == "train") & skewed["dx"].isin(MALIGNANT)
    assert train_malignant.sum() > 100 and not dark[train_malignant].any()
    assert plain.loc[train_malignant, "tone_true"].isin(["brown", "dark"]).mean() > 0.2
    others = ~train_malignant
    assert (plain.loc[others, "tone_true"] == skewed.loc[others, "tone_true"]).all()
    assert dark[others].mean() == pytest.approx(1 / 3, abs=0.06)
    everyone_dark = listing(1.0)
    assert everyone_dark.loc[train_malignant, "tone_true"].isin(["brown", "dark"]).all()
