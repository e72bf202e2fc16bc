"""The near-copy detector: planted near-copies of five kinds at 64 px are caught, unseen real images are not, and the
threshold is calibrated on the data's own pairs (same-lesion views) or, without them, on planted copies."""

from __future__ import annotations

import numpy as np
import pytest

from skinsynth.audit import copies
from skinsynth.data.phantom import phantom_records, render_phantom


def _phantom(n: int, seed: int, views_per_lesion: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    frame = phantom_records(n, seed=seed, image_size=64, views_per_lesion=views_per_lesion)
    return np.stack([render_phantom(r) for r in frame.to_dict("records")]), frame["group_id"].to_numpy()


@pytest.fixture(scope="module")
def detector_and_sets():
    # training images with several views per lesion (as HAM10000 has); held-out images of other lesions
    train, groups = _phantom(240, seed=1, views_per_lesion=1.5)
    held_out, _ = _phantom(200, seed=2)
    return copies.CopyDetector(train), groups, held_out


@pytest.mark.slow
def test_planted_near_copies_of_every_kind_are_caught_and_unseen_images_are_not(detector_and_sets):
    detector, groups, held_out = detector_and_sets
    held_scores, _ = detector.score(held_out)
    calibration = copies.calibrate(
        detector, groups, held_scores[:100], fpr=0.005, max_pairs=40, plants_per_kind=30, seed=7
    )
    threshold = calibration["threshold"]
    assert threshold == pytest.approx(np.max(held_scores[:100]))  # 99.5% of 100 negatives: their highest
    assert calibration["positives"]["source"] == "same_lesion_pairs" and calibration["positives"]["n"] == 40
    for kind in copies.NEAR_COPY_KINDS:
        planted = calibration["planted"][kind]
        assert planted["n"] == 30
        assert planted["rate"] >= 0.9, (kind, planted)
    # the other 100 held-out images were never used to set the threshold
    assert (held_scores[100:] >= threshold).mean() <= 0.02
    # a pixel-exact copy scores 1 and points at its source
    exact, nearest = detector.score(detector.train[[5, 17]])
    assert np.allclose(exact, 1.0, atol=1e-4) and nearest.tolist() == [5, 17]


def test_each_planted_kind_is_the_edit_it_names():
    image, _ = _phantom(1, seed=4)
    image = image[:1]
    shifted = copies.plant_near_copies(image, "shift", seed=0)[0]
    assert not np.array_equal(shifted, image[0]) and shifted.shape == image[0].shape
    turned = copies.plant_near_copies(image, "flip_turn", seed=0)[0]
    assert any(np.array_equal(turned, view) for view in copies.dihedral_views(image[0])[1:])
    recoloured = copies.plant_near_copies(image, "colour", seed=0)[0].astype(float)
    # per channel an affine map of the original (up to clipping and rounding)
    for c in range(3):
        assert np.corrcoef(recoloured[..., c].ravel(), image[0][..., c].ravel())[0, 1] > 0.99
    with pytest.raises(ValueError, match="unknown near-copy kind"):
        copies.plant_near_copies(image, "warp", seed=0)


def test_without_lesion_pairs_the_rate_comes_from_planted_copies_and_says_so(detector_and_sets):
    detector, groups, held_out = detector_and_sets
    held_scores, _ = detector.score(held_out[:40])
    one_image_per_lesion = np.arange(len(groups))
    calibration = copies.calibrate(
        detector, one_image_per_lesion, held_scores, fpr=0.05, max_pairs=40, plants_per_kind=4, seed=0
    )
    positives = calibration["positives"]
    assert positives["source"] == "planted_near_copies" and positives["n"] == 20
    assert "no same-lesion pairs" in positives["what"]
    assert calibration["negatives"]["n"] == 40 and calibration["negatives"]["rate"] <= 0.05


def test_a_long_search_reports_its_progress(detector_and_sets):
    detector, _, held_out = detector_and_sets
    lines: list[str] = []
    watched = copies.CopyDetector(detector.train, progress=lines.append, progress_every_s=0.0)
    watched.score(held_out[:3])
    assert len(lines) == 3 and lines[-1].startswith("near-copy search: 3 images searched in 240 training images (")
