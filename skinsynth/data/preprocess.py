"""Per-image preprocessing: decode and validate, hair removal, tone estimate, colour constancy, resize, encode.

Every function here is pure (array in, array out) so that the Ray Data pipeline, the single-process baseline of
``skinsynth bench prepare`` and, later, the serving path all run the very same code.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from skinsynth.config import PreprocessConfig
from skinsynth.data.tone import estimate_ita

_GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


class BadImage(ValueError):
    """An input image that cannot be used; the message is the quarantine reason."""


@dataclass
class PreparedImage:
    """The result of :func:`preprocess_image` for one good image."""

    png: bytes  # prepared image, PNG-encoded
    width: int
    height: int
    ita: float | None
    sha256: str  # of the original file bytes


def decode_image(data: bytes, *, min_side: int = 32, allow_grayscale: bool = False, max_pixels: int = 0) -> np.ndarray:
    """Decode image bytes to RGB uint8, refusing what a dermoscopy pipeline cannot use.

    Args:
        data: the encoded file (JPEG, PNG, ...).
        min_side: smallest accepted short side in pixels.
        allow_grayscale: accept single-channel images (replicated to RGB); off by default because ITA and
            colour cues need colour.
        max_pixels: largest accepted width x height, checked on the header before any pixel is decoded (0: no cap
            but Pillow's decompression-bomb limit).

    Returns:
        (H, W, 3) uint8 RGB array. RGBA and palette images are converted (alpha dropped).

    Raises:
        BadImage: empty, not an image, truncated/corrupt, grayscale (unless allowed), too small or too large.
    """
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Image.open reads the header only: the size is known before a pixel is decoded
            if max_pixels and img.size[0] * img.size[1] > max_pixels:
                width, height = img.size
                raise BadImage(
                    f"too large: {width}x{height} px ({width * height / 1e6:.1f} MP) is over the "
                    f"{max_pixels / 1e6:g} MP limit; refused before decoding"
                )
            img.load()  # Image.open is lazy; load() is what notices a truncated file
            mode, (width, height) = img.mode, img.size
            if mode in _GRAYSCALE_MODES and not allow_grayscale:
                raise BadImage(f"grayscale image (mode {mode}): colour is needed for tone estimation and diagnosis")
            if min(width, height) < min_side:
                raise BadImage(f"too small: {width}x{height} px, short side below {min_side} px")
            if mode in _GRAYSCALE_MODES and mode not in {"L", "1"}:
                # I;16/I/F: scale the full range into 8 bits instead of letting Pillow clip it
                arr = np.asarray(img, dtype=np.float32)
                span = float(arr.max() - arr.min()) or 1.0
                img = Image.fromarray(((arr - arr.min()) * (255.0 / span)).astype(np.uint8))
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image: the file format is not recognised") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"truncated or corrupt image: {err}") from None
    return np.ascontiguousarray(rgb)


def limit_side(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale (area interpolation) so that the long side is at most ``max_side``; smaller images pass."""
    height, width = rgb.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return rgb
    return cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)


def remove_hair(rgb: np.ndarray, kernel_fraction: float = 0.08, threshold: int = 12) -> np.ndarray:
    """Remove dark hairs: morphological black-hat to find thin dark structures, then inpaint them.

    The DullRazor idea (Lee et al. 1997, "DullRazor: a software approach to hair removal from images",
    Comput. Biol. Med. 27:533-543) in its common OpenCV form: a black-hat (closing minus image) with a kernel
    wider than a hair responds to hairs but not to broad lesion areas; the thresholded response is inpainted
    (Telea 2004).

    Args:
        rgb: uint8 RGB image.
        kernel_fraction: black-hat kernel side as a fraction of the short side (wider than hairs).
        threshold: black-hat response (0-255) above which a pixel counts as hair.

    Returns:
        The image with hair pixels inpainted (the input when no hair is found).
    """
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    side = max(3, int(round(min(gray.shape) * kernel_fraction)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (side, side))
    blackhat = cv2.morphologyEx(gray, cv2.MORPH_BLACKHAT, kernel)
    _, mask = cv2.threshold(blackhat, threshold, 255, cv2.THRESH_BINARY)
    if not mask.any():
        return rgb
    mask = cv2.dilate(mask, np.ones((3, 3), np.uint8))
    return cv2.inpaint(rgb, mask, 3, cv2.INPAINT_TELEA)


def shades_of_gray(rgb: np.ndarray, p: int = 6) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004, "Shades of gray and colour constancy").

    The illuminant is estimated per channel as the Minkowski p-norm mean of the image and divided out, so images
    taken under different dermoscopes share a neutral white balance. p = 6 follows Barata, Celebi & Marques 2015
    ("Improving dermoscopy image classification using color constancy", IEEE JBHI 19:1146-1152).
    """
    img = rgb.astype(np.float32)
    illuminant = np.power(np.mean(np.power(img, p), axis=(0, 1)), 1.0 / p)
    illuminant = np.maximum(illuminant, 1e-6)
    gain = illuminant.mean() / illuminant
    return np.clip(img * gain, 0, 255).astype(np.uint8)


def resize_square(rgb: np.ndarray, size: int, center_crop: bool = True) -> np.ndarray:
    """Resize to ``size`` x ``size``: short side to ``size`` then centre crop (or squash when not cropping)."""
    height, width = rgb.shape[:2]
    if not center_crop:
        interp = cv2.INTER_AREA if max(height, width) > size else cv2.INTER_CUBIC
        return cv2.resize(rgb, (size, size), interpolation=interp)
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=interp)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def encode_png(rgb: np.ndarray) -> bytes:
    """Lossless PNG bytes of an RGB image."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:  # pragma: no cover - OpenCV only fails here on invalid arrays
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """RGB uint8 array from the PNG bytes stored in an image shard."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise BadImage("stored image is not a decodable PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def prepare_pixels(data: bytes, cfg: PreprocessConfig) -> tuple[np.ndarray, float | None]:
    """Every enabled pixel step on one encoded image: the prepared RGB image and its ITA.

    Order: decode/validate -> cap the working size -> hair removal -> ITA -> colour constancy -> resize/crop.
    ITA is measured before colour constancy on purpose: Shades of Gray pulls the mean colour towards grey,
    which would shrink b* and push every angle towards +-90 degrees.

    Args:
        data: original file bytes.
        cfg: the preprocessing section of the config.

    Returns:
        ``(rgb, ita)``: the (size, size, 3) uint8 image and the Individual Typology Angle (None when
        ``cfg.estimate_tone`` is off).

    Raises:
        BadImage: with the quarantine reason.
    """
    rgb = decode_image(data, min_side=cfg.min_side, allow_grayscale=cfg.allow_grayscale, max_pixels=cfg.max_pixels)
    # Hair removal and ITA cost grows with pixel count; a working size a few times the output keeps them fast
    # without losing the hairs (which downscaling to the final size would blur into the skin).
    rgb = limit_side(rgb, max(cfg.max_working_side, cfg.size))
    if cfg.hair_removal:
        rgb = remove_hair(rgb, cfg.hair_kernel_fraction, cfg.hair_threshold)
    ita = estimate_ita(rgb) if cfg.estimate_tone else None
    if cfg.color_constancy:
        rgb = shades_of_gray(rgb, cfg.shades_of_gray_p)
    return resize_square(rgb, cfg.size, cfg.center_crop), ita


def preprocess_image(data: bytes, cfg: PreprocessConfig) -> PreparedImage:
    """:func:`prepare_pixels` plus what a shard row stores: the PNG-encoded image and the original's SHA-256.

    Raises:
        BadImage: with the quarantine reason.
    """
    rgb, ita = prepare_pixels(data, cfg)
    return PreparedImage(
        png=encode_png(rgb),
        width=rgb.shape[1],
        height=rgb.shape[0],
        ita=ita,
        sha256=hashlib.sha256(data).hexdigest(),
    )
