"""Fidelity at matched sample sizes: FID's small-n bias, the real-vs-real floor at the same n, and per-class FID
withheld below 50 images per side. Random Gaussian features, so the true FID between any two of these sets is 0 and
every FID measured here is bias (Chong & Forsyth 2020)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skinsynth.audit import fidelity

D = 32  # features: big enough that FID's bias at 30 images is plain, small enough to run in a second


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: one thread is fastest, and more contend with the other test processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gaussian(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64) + shift


def _one_class(n: int) -> np.ndarray:
    return np.zeros(n, int)


def test_disjoint_halves_at_matched_n_sit_at_the_floor_and_unequal_n_shows_the_bias_matching_removes():
    pool = _gaussian(900, 0)  # one distribution: real and synthetic are two disjoint halves, held-out a third part
    real, fake, held = pool[:300], pool[300:600], pool[600:]

    matched = fidelity.fidelity_report(real, fake, _one_class(300), _one_class(300), held_out=held, seed=0)
    assert matched["n"] == matched["floor_n"] == 300 and "floor_note" not in matched
    assert matched["n_real_available"] == matched["n_synthetic_available"] == 300
    assert matched["fid_real_train_vs_held_out"] == matched["fid_floor"]
    # about 2.2 and 2.3: same distribution, same n, so the synthetic set is at the floor
    assert 1.0 < matched["fid"] < 4.0 and abs(matched["fid"] - matched["fid_floor"]) < 0.5

    # the same distribution at unequal n (300 real vs 30 synthetic, unmatched): about 13.7, all of it bias
    unmatched = fidelity.frechet_distance(real, fake[:30])
    bias = unmatched - matched["fid"]
    assert bias > 8.0
    assert abs(matched["fid"] - matched["fid_floor"]) < 0.05 * bias
    # read against a floor at 300 per side, as before, it would look like a real gap of some 11
    assert unmatched - matched["fid_floor"] > 8.0

    # matched design at 300 vs 30: everything at n=30, floor included, and FID sits at that floor again
    small = fidelity.fidelity_report(real, fake[:30], _one_class(300), _one_class(30), held_out=held, seed=0)
    assert small["n"] == small["floor_n"] == 30
    assert small["n_real_available"] == 300 and small["n_synthetic_available"] == 30
    assert small["fid_floor"] > 5 * matched["fid_floor"]  # the floor at 30 carries the same bias (about 18.5)
    assert abs(small["fid"] - small["fid_floor"]) < 0.15 * small["fid"]  # about 19.6 vs 18.5

    # KID at matched n carries a standard deviation over subsets of half of n (a subset of all n would give 0)
    assert matched["kid_subset_size"] == 150 and matched["kid_std"] > 0.001 and matched["kid_floor_std"] > 0.001
    assert abs(matched["kid_mean"]) < 0.05 and abs(matched["kid_floor_mean"]) < 0.05

    again = fidelity.fidelity_report(real, fake, _one_class(300), _one_class(300), held_out=held, seed=0)
    assert again == matched  # seeded subsets


def test_floor_at_the_largest_n_the_held_out_set_allows_and_says_so():
    pool = _gaussian(700, 1)
    real, fake, held = pool[:300], pool[300:600], pool[600:]  # only 100 held-out images
    report = fidelity.fidelity_report(real, fake, _one_class(300), _one_class(300), held_out=held, seed=0)
    assert report["n"] == 300 and report["floor_n"] == 100 and report["n_held_out_available"] == 100
    assert "n=100" in report["floor_note"] and "n=300" in report["floor_note"]
    # the floor at 100 reads high (about 5.5 against a FID of about 2.1 at 300): why it is flagged
    assert report["fid_floor"] > 2 * report["fid"]


def test_per_class_fid_is_withheld_below_50_images_per_side():
    real = torch.cat([_gaussian(80, 10), _gaussian(45, 11), _gaussian(30, 12)])
    real_labels = np.r_[np.zeros(80, int), np.full(45, 3), np.full(30, 4)]  # akiec, df, mel
    # akiec: 60 synthetic (matched n 60); df: 40 synthetic, shifted away from the real ones (matched n 40);
    # nv: one synthetic image and no real ones; mel: no synthetic images, so no entry
    fake = torch.cat([_gaussian(60, 13), _gaussian(40, 14, shift=1.0), _gaussian(1, 15)])
    fake_labels = np.r_[np.zeros(60, int), np.full(40, 3), np.full(1, 5)]
    report = fidelity.fidelity_report(real, fake, real_labels, fake_labels, held_out=_gaussian(100, 16), seed=0)
    per_class = report["per_class"]
    assert set(per_class) == {"akiec", "df", "nv"}

    akiec = per_class["akiec"]
    assert akiec["n"] == 60 and akiec["n_real_available"] == 80 and akiec["n_synthetic_available"] == 60
    assert "small" not in akiec and akiec["fid"] > 0 and 0.0 <= akiec["precision"] <= 1.0
    assert akiec["kid_subset_size"] == 30 and abs(akiec["kid_mean"]) < 0.5 and akiec["kid_std"] > 0

    df = per_class["df"]
    assert df["n"] == 40 and df["n_real_available"] == 45 and df["small"] is True
    assert "fid" not in df and "precision" not in df and "coverage" not in df
    assert "50" in df["note"] and "FID" in df["note"]
    # KID alone, with its std, still sees the shift: about 8.3 with a std of about 1
    assert df["kid_subset_size"] == 20 and df["kid_mean"] > 4.0 and 0 < df["kid_std"] < df["kid_mean"] / 4

    nv = per_class["nv"]
    assert nv["n"] == 0 and nv["small"] is True and "kid_mean" not in nv and "fid" not in nv

    # the same class unshifted: KID near 0, so the shifted figure above is signal, not small-n noise
    fake[60:100] = _gaussian(40, 14)
    same = fidelity.fidelity_report(real, fake, real_labels, fake_labels, held_out=_gaussian(100, 16), seed=0)
    assert abs(same["per_class"]["df"]["kid_mean"]) < 0.5
    assert fidelity.MIN_PER_CLASS_FID == 50
