from __future__ import annotations

import math

import numpy as np
import pytest

from skinsynth.data.schema import tone_from_ita
from skinsynth.data.tone import estimate_ita, estimate_tone, ita_degrees, rgb_to_lab
from tests.conftest import lab_to_rgb, skin_with_lesion


@pytest.mark.parametrize(
    ("lightness", "b_star"),
    [(80, 12), (70, 15), (62, 18), (55, 20), (45, 22), (30, 20)],
)
def test_ita_of_a_uniform_colour_matches_the_formula(lightness, b_star):
    rgb = lab_to_rgb(lightness, 10, b_star)
    lab = rgb_to_lab(rgb)  # 8-bit quantisation moves L*/b* a little; compare with what the pixels really hold
    expected = math.degrees(math.atan((lab[..., 0].mean() - 50) / lab[..., 2].mean()))
    assert estimate_ita(rgb) == pytest.approx(expected, abs=0.3)
    # and close to the nominal colour's angle
    assert estimate_ita(rgb) == pytest.approx(math.degrees(math.atan((lightness - 50) / b_star)), abs=1.5)


def test_ita_ignores_the_dark_lesion():
    rgb = skin_with_lesion()
    nominal = math.degrees(math.atan((70 - 50) / 16))  # 51.3 deg, the skin, not the lesion
    assert estimate_ita(rgb) == pytest.approx(nominal, abs=2.0)
    # the whole image averaged would be far darker
    lab = rgb_to_lab(rgb)
    whole = math.degrees(math.atan((lab[..., 0].mean() - 50) / lab[..., 2].mean()))
    assert whole < nominal - 5


def test_ita_degrees_vectorised():
    out = ita_degrees(np.array([50.0, 60.0, 40.0]), np.array([10.0, 10.0, 10.0]))
    np.testing.assert_allclose(out, [0.0, 45.0, -45.0])


def test_grey_image_has_no_ita():
    assert estimate_ita(np.full((32, 32, 3), 128, np.uint8)) is None
    assert estimate_tone(np.full((32, 32, 3), 128, np.uint8)) == (None, None)


@pytest.mark.parametrize(
    ("ita", "tone"),
    [
        (70, "very_light"),
        (55.01, "very_light"),
        (55, "light"),
        (41.5, "light"),
        (41, "intermediate"),
        (30, "intermediate"),
        (28, "tan"),
        (10.5, "tan"),
        (10, "brown"),
        (-29.9, "brown"),
        (-30, "dark"),
        (-80, "dark"),
        (None, None),
        (float("nan"), None),
    ],
)
def test_tone_bins(ita, tone):
    assert tone_from_ita(ita) == tone


@pytest.mark.parametrize(
    ("lab", "tone"),
    [
        ((80, 8, 12), "very_light"),
        ((66, 10, 16), "light"),
        ((58, 10, 18), "tan"),
        ((42, 12, 20), "brown"),
        ((25, 10, 15), "dark"),
    ],
)
def test_estimated_tone_of_known_colours(lab, tone):
    # 68.2, 45.0, 24.0, -21.8 and -59.0 degrees
    assert estimate_tone(lab_to_rgb(*lab))[1] == tone
