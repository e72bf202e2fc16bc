from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from skinsynth.config import PreprocessConfig
from skinsynth.data.preprocess import (
    BadImage,
    decode_image,
    decode_png,
    prepare_pixels,
    preprocess_image,
    remove_hair,
    resize_square,
    shades_of_gray,
)
from tests.conftest import encode, header_only_png, skin_with_lesion


def test_decode_rejects_bad_files_with_reasons():
    good = encode(skin_with_lesion(), "JPEG")
    cases = {
        b"": "empty file (0 bytes)",
        b"this is a text file, not a jpeg\n": "not an image: the file format is not recognised",
        good[: len(good) // 2]: "truncated or corrupt image",
        encode(skin_with_lesion(), "PNG", mode="L"): "grayscale image (mode L)",
        encode(np.zeros((1, 1, 3), np.uint8), "PNG"): "too small: 1x1 px, short side below 32 px",
    }
    for data, reason in cases.items():
        with pytest.raises(BadImage) as err:
            decode_image(data)
        assert reason in str(err.value)


def test_images_over_the_pixel_cap_are_refused_from_their_header_before_decoding():
    # the file holds no pixels: were it decoded, the reason would be "truncated"
    with pytest.raises(BadImage, match=r"too large: 12000x12000 px \(144\.0 MP\) is over the 40 MP limit"):
        decode_image(header_only_png(12000, 12000), max_pixels=40_000_000)
    with pytest.raises(BadImage, match="truncated or corrupt image"):
        decode_image(header_only_png(6000, 6000), max_pixels=40_000_000)  # 36 MP: under the cap, so decoded
    # through the preprocessing prepare and the endpoint share, with the default cap
    with pytest.raises(BadImage, match="too large: 12000x12000 px"):
        prepare_pixels(header_only_png(12000, 12000), PreprocessConfig())
    good = encode(skin_with_lesion(), "PNG")
    assert decode_image(good, max_pixels=0).shape == decode_image(good, max_pixels=96 * 96).shape  # at the cap: kept
    with pytest.raises(BadImage, match=r"over the 0\.001 MP limit"):
        decode_image(good, max_pixels=1000)


def test_decode_converts_rgba_and_palette_and_allows_grayscale_when_asked():
    rgb = skin_with_lesion()
    rgba = decode_image(encode(rgb, "PNG", mode="RGBA"))
    np.testing.assert_array_equal(rgba, rgb)
    pal = decode_image(encode(rgb, "PNG", mode="P"))
    assert pal.shape == rgb.shape and pal.dtype == np.uint8
    gray = decode_image(encode(rgb, "PNG", mode="L"), allow_grayscale=True)
    assert gray.shape == rgb.shape
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


def test_shades_of_gray_removes_a_colour_cast():
    rgb = skin_with_lesion().astype(np.float32)
    cast = np.clip(rgb * np.array([1.0, 0.8, 0.6]), 0, 255).astype(np.uint8)
    corrected = shades_of_gray(cast, p=6)
    norm = lambda img: np.power(np.mean(np.power(img.astype(np.float64), 6), axis=(0, 1)), 1 / 6)  # noqa: E731
    before, after = norm(cast), norm(corrected)
    assert before.max() / before.min() > 1.5
    # after correction the per-channel illuminant estimates agree (up to clipping at 255)
    assert after.max() / after.min() < 1.03


def test_hair_removal_erases_a_thin_dark_line_but_keeps_the_lesion():
    clean = skin_with_lesion(128)
    hairy = clean.copy()
    cv2.line(hairy, (0, 10), (127, 30), (20, 15, 10), 1)
    cv2.line(hairy, (100, 0), (110, 127), (20, 15, 10), 1)
    out = remove_hair(hairy, kernel_fraction=0.08, threshold=12)
    hair = np.any(hairy != clean, axis=2)
    err_before = np.abs(hairy.astype(int) - clean)[hair].mean()
    err_after = np.abs(out.astype(int) - clean)[hair].mean()
    assert err_before > 80
    assert err_after < 15
    # lesion centre untouched (it is wider than the black-hat kernel)
    np.testing.assert_array_equal(out[60:68, 60:68], hairy[60:68, 60:68])


def test_resize_square_crops_the_centre():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 50:150] = 255  # the centre square is white, the sides black
    out = resize_square(img, 50, center_crop=True)
    assert out.shape == (50, 50, 3)
    assert out.min() == 255
    squashed = resize_square(img, 50, center_crop=False)
    assert squashed.shape == (50, 50, 3)
    assert squashed[:, :5].max() < 10  # squashing keeps the black sides


def test_preprocess_image_end_to_end():
    data = encode(skin_with_lesion(171), "JPEG")
    cfg = PreprocessConfig(size=48)
    out = preprocess_image(data, cfg)
    assert (out.width, out.height) == (48, 48)
    arr = decode_png(out.png)
    assert arr.shape == (48, 48, 3)
    assert out.ita == pytest.approx(51.3, abs=3.0)
    import hashlib

    assert out.sha256 == hashlib.sha256(data).hexdigest()
    # every step can be switched off; the result is then a plain resize
    plain = PreprocessConfig(size=48, hair_removal=False, color_constancy=False, estimate_tone=False)
    out2 = preprocess_image(data, plain)
    assert out2.ita is None
    expected = resize_square(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), 48)
    np.testing.assert_array_equal(decode_png(out2.png), expected)


def test_served_pixels_equal_the_pixels_training_decodes_from_the_shard():
    from skinsynth.serve.model import prepare_upload

    cfg = PreprocessConfig(size=48)
    for seed in range(3):
        data = encode(skin_with_lesion(171, seed=seed), "JPEG")
        stored = decode_png(preprocess_image(data, cfg).png)  # what the shard holds and training reads
        np.testing.assert_array_equal(prepare_upload(data, cfg), stored)
