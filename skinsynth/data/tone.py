"""Skin-tone estimation by the Individual Typology Angle (ITA).

ITA = atan((L* - 50) / b*) * 180 / pi on CIELAB pixels of healthy skin (Chardon, Cretois & Hourseau 1991,
"Skin colour typology and suntanning pathways", Int. J. Cosmet. Sci. 13:191-208), binned into six groups
(Del Bino & Bernerd 2013). Kinyanjui et al. 2020 ("Fairness of classifiers across skin tones in dermatology",
MICCAI) used the same estimate for dermoscopy sets that carry no Fitzpatrick labels, which is our situation:
the estimate is a proxy for skin type, and reports must say so.
"""

from __future__ import annotations

import cv2
import numpy as np

from skinsynth.data.schema import tone_from_ita

# Below this spread of L* an image is treated as having no lesion/background contrast (e.g. a flat colour patch),
# and every pixel counts as skin.
_MIN_L_CONTRAST = 6.0


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Convert uint8 RGB (H, W, 3) to float CIELAB (D65): L* in [0, 100], a*/b* in their natural units."""
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def ita_degrees(lightness: np.ndarray | float, b_star: np.ndarray | float) -> np.ndarray | float:
    """Individual Typology Angle in degrees for CIELAB lightness L* and yellow-blue b*.

    Uses ``atan2`` so that b* near zero gives +-90 degrees instead of a division by zero; for the b* > 0 of real
    skin it equals the textbook ``atan((L* - 50) / b*)``.
    """
    return np.degrees(np.arctan2(np.asarray(lightness) - 50.0, np.asarray(b_star)))


def healthy_skin_mask(lab: np.ndarray) -> np.ndarray:
    """Pixels that are neither lesion nor dark vignetting/hair, by Otsu's threshold on L*.

    Lesions, residual hair and the dark corners of a dermoscope field are all darker than the surrounding skin,
    so the brighter Otsu class is taken as skin. Images without contrast count as all skin.
    """
    lightness = lab[..., 0]
    if float(lightness.max() - lightness.min()) < _MIN_L_CONTRAST:
        return np.ones(lightness.shape, dtype=bool)
    l8 = np.clip(lightness * 2.55, 0, 255).astype(np.uint8)
    l8 = cv2.GaussianBlur(l8, (5, 5), 0)
    threshold, _ = cv2.threshold(l8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = l8 > threshold
    # Mid-image pixels are lesion more often than not; only fall back to them when the border has no skin at all.
    return mask if mask.any() else np.ones(lightness.shape, dtype=bool)


def estimate_ita(rgb: np.ndarray, skin_mask: np.ndarray | None = None) -> float | None:
    """Estimate the ITA of the healthy skin in a dermoscopy image.

    Args:
        rgb: uint8 RGB image (H, W, 3), ideally after hair removal and before colour constancy (which would
            pull b* towards grey and bias the angle).
        skin_mask: optional boolean mask of healthy skin; estimated with :func:`healthy_skin_mask` when None.

    Returns:
        The median per-pixel ITA in degrees, or None when no skin pixel has a yellow component (b* > 0), where
        the angle is meaningless.
    """
    lab = rgb_to_lab(rgb)
    mask = healthy_skin_mask(lab) if skin_mask is None else skin_mask
    lightness, b_star = lab[..., 0][mask], lab[..., 2][mask]
    keep = b_star > 0.5
    if not keep.any():
        return None
    return float(np.median(ita_degrees(lightness[keep], b_star[keep])))


def estimate_tone(rgb: np.ndarray) -> tuple[float | None, str | None]:
    """ITA in degrees and its tone group (very_light ... dark) for an RGB image."""
    ita = estimate_ita(rgb)
    return ita, tone_from_ita(ita)
