"""``phantom``: a seeded generator of dermoscopy-like images with known ground truth.

This is **simulated data**. Every row it produces is labelled ``phantom`` and must never be presented as clinical
data: the images are procedural drawings that only loosely imitate dermoscopic features so that the whole pipeline
(prepare, split, train, generate, evaluate, serve) runs offline on a fresh machine, and so that quantities that are
unknowable for real data -- the true skin tone, lesion size, border irregularity, number of colours -- are known
exactly and can be checked against the estimates the pipeline makes (e.g. fairness metrics by tone).

Two steps, so that a dataset of any size can be described cheaply and rendered lazily (e.g. inside Ray Data):

* :func:`phantom_records` draws one row per image (class, lesion id, metadata, skin tone, geometry ground truth and a
  per-image seed) without rendering anything.
* :func:`render_phantom` renders one row into an ``H x W x 3`` uint8 RGB image, deterministically from the row alone.

The class-specific appearance follows the dermoscopy literature in a deliberately simplified way: the two-step
algorithm and pattern analysis of the consensus net meeting (Argenziano et al., J Am Acad Dermatol 2003;48:679-693),
the ABCD rule (Stolz et al., 1994: asymmetry, border, colours, differential structures) and the BCC criteria of
Menzies et al. (Arch Dermatol 2000;136:1012-1016):

* ``nv``  round, regular border, one or two browns, regular pigment network fading at the periphery, or globules;
* ``mel`` asymmetric, irregular border, three to five colours (black, dark brown, blue-grey, red, white regression),
  atypical (broken, thick) network, irregular peripheral dots and streaks; a quarter are "early" melanomas with a
  milder border and two or three browns, and 12 % of naevi are atypical, so that no single feature separates them;
* ``bkl`` light brown, moderately irregular sharp border, milia-like cysts and comedo-like openings;
* ``bcc`` translucent pink, arborising vessels, blue-grey ovoid nests, shiny white areas;
* ``akiec`` pink-red, ill-defined border, white scale, dotted vessels;
* ``df``  small, fine peripheral light-brown network around a central white scar-like patch;
* ``vasc`` red-purple, well-defined round border, red/purple lacunae separated by pale septa.

The skin background is drawn in CIELAB from the row's Individual Typology Angle
``ITA = atan((L* - 50) / b*) * 180 / pi`` (Chardon et al., Int J Cosmet Sci 1991;13:191-208; bins of Del Bino &
Bernerd 2013, see :data:`skinsynth.data.schema.TONE_BINS`). The mottling added to the skin is mean-corrected over the
healthy-skin pixels, so that the mean L* and b* of the healthy skin equal the row's ``skin_L`` and ``skin_b`` and the
ITA measured there matches ``ita_true`` up to 8-bit quantisation, blur and noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd

from skinsynth.data.schema import CLASS_TO_LABEL, CLASSES, tone_from_ita

SOURCE = "phantom"

# HAM10000 class prevalences (Tschandl et al., Sci Data 2018;5:180161), images per class.
HAM10000_COUNTS: dict[str, int] = {
    "nv": 6705,
    "mel": 1113,
    "bkl": 1099,
    "bcc": 514,
    "akiec": 327,
    "vasc": 142,
    "df": 115,
}

# ITA ranges (degrees) per tone bin. A bin is drawn uniformly and then the ITA uniformly inside it, so that the six
# bins are equally represented although they span very different angles.
ITA_RANGES: dict[str, tuple[float, float]] = {
    "very_light": (55.5, 75.0),
    "light": (41.5, 54.5),
    "intermediate": (28.5, 40.5),
    "tan": (10.5, 27.5),
    "brown": (-29.5, 9.5),
    "dark": (-60.0, -30.5),
}

DARK_TONES = frozenset({"brown", "dark"})  # ITA below 10 degrees: the rare group of a tone-skewed phantom set

# Melanomas drawn with a border irregularity below this are "early" ones: regular-ish, and brown only.
MEL_SUBTLE_BELOW = 0.55

# Per-class ranges. radius: equivalent-disc radius as a fraction of the image side; edge: width of the soft border
# ramp in lesion radii; age: (mean, sd) years, loosely after HAM10000; sites weighted like HAM10000 `localization`.
CLASS_PROFILES: dict[str, dict[str, Any]] = {
    "akiec": dict(
        radius=(0.13, 0.26),
        irregularity=(0.35, 0.7),
        aspect=(1.0, 1.4),
        edge=(0.25, 0.5),
        network=0.0,
        age=(67.0, 11.0),
        male=0.65,
        sites={"face": 5, "upper extremity": 2, "scalp": 2, "hand": 1, "neck": 1, "trunk": 1},
    ),
    "bcc": dict(
        radius=(0.12, 0.26),
        irregularity=(0.2, 0.55),
        aspect=(1.0, 1.4),
        edge=(0.06, 0.14),
        network=0.0,
        age=(67.0, 12.0),
        male=0.62,
        sites={"face": 4, "back": 3, "trunk": 2, "neck": 1, "upper extremity": 1, "scalp": 1, "chest": 1},
    ),
    "bkl": dict(
        radius=(0.13, 0.27),
        irregularity=(0.3, 0.6),
        aspect=(1.0, 1.45),
        edge=(0.08, 0.16),
        network=0.25,
        age=(64.0, 13.0),
        male=0.55,
        sites={"face": 4, "back": 3, "upper extremity": 2, "trunk": 2, "chest": 1, "lower extremity": 1},
    ),
    "df": dict(
        radius=(0.08, 0.15),
        irregularity=(0.05, 0.3),
        aspect=(1.0, 1.3),
        edge=(0.12, 0.25),
        network=0.9,
        age=(53.0, 14.0),
        male=0.45,
        sites={"lower extremity": 7, "upper extremity": 2, "trunk": 1},
    ),
    "mel": dict(
        radius=(0.15, 0.28),
        irregularity=(MEL_SUBTLE_BELOW, 1.0),
        aspect=(1.1, 1.45),
        edge=(0.08, 0.2),
        network=0.6,
        age=(61.0, 15.0),
        male=0.58,
        sites={"back": 4, "upper extremity": 2, "lower extremity": 2, "face": 2, "trunk": 1, "chest": 1, "scalp": 1},
    ),
    "nv": dict(
        radius=(0.12, 0.24),
        irregularity=(0.0, 0.25),
        aspect=(1.0, 1.2),
        edge=(0.1, 0.22),
        network=0.75,
        age=(47.0, 15.0),
        male=0.52,
        sites={"back": 4, "lower extremity": 3, "trunk": 3, "abdomen": 2, "upper extremity": 1, "chest": 1},
    ),
    "vasc": dict(
        radius=(0.08, 0.18),
        irregularity=(0.0, 0.15),
        aspect=(1.0, 1.2),
        edge=(0.03, 0.07),
        network=0.0,
        age=(52.0, 20.0),
        male=0.45,
        sites={"lower extremity": 3, "trunk": 2, "face": 2, "abdomen": 1, "upper extremity": 1},
    ),
}

# Dermoscopic colours in CIELAB (L*, a*, b*) as they look on light skin (L* ~ 65). Pigment colours are darkened with
# the skin (see _lesion_colour) because the same melanin density looks darker over darker skin.
COLOURS: dict[str, tuple[float, float, float]] = {
    "tan": (58.0, 13.0, 25.0),
    "light_brown": (50.0, 15.0, 26.0),
    "brown": (39.0, 15.0, 22.0),
    "dark_brown": (27.0, 12.0, 15.0),
    "black": (14.0, 3.0, 2.0),
    "blue_grey": (47.0, -2.0, -9.0),
    "red": (47.0, 40.0, 22.0),
    "pink": (68.0, 24.0, 11.0),
    "white": (88.0, 3.0, 6.0),
    "red_purple": (33.0, 34.0, -6.0),
    "maroon": (24.0, 26.0, 4.0),
}
PIGMENT_COLOURS = frozenset({"tan", "light_brown", "brown", "dark_brown", "black"})

VIGNETTES: tuple[str, ...] = ("none", "soft", "field")


class PhantomLayers(NamedTuple):
    """A rendered phantom image with its ground-truth layers (all ``H x W``)."""

    image: np.ndarray  # uint8 RGB, H x W x 3
    lesion: np.ndarray  # bool: the lesion's extent (hair lying over it does not cut holes)
    hair: np.ndarray  # bool: hair pixels, anywhere in the image
    skin: np.ndarray  # bool: healthy skin untouched by lesion halo, hair or vignetting (where ITA is defined)


# --------------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------------


def _seed_int(seed: int, *key: int) -> int:
    # SeedSequence spawn keys give independent, reproducible streams per (purpose, index) that do not shift when
    # another stream draws more numbers.
    return int(np.random.SeedSequence(seed, spawn_key=key).generate_state(1, dtype=np.uint32)[0])


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _allocate(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` over the classes in proportion to ``weights`` (largest remainder, ties in CLASSES order)."""
    total = float(sum(weights.values()))
    exact = {dx: n * weights[dx] / total for dx in CLASSES}
    counts = {dx: int(math.floor(x)) for dx, x in exact.items()}
    left = n - sum(counts.values())
    for dx in sorted(CLASSES, key=lambda d: (-(exact[d] - counts[d]), CLASSES.index(d)))[:left]:
        counts[dx] += 1
    return counts


def _skin_lab(ita: float, rng: np.random.Generator) -> tuple[float, float, float]:
    """Pick a plausible in-gamut (L*, a*, b*) whose ITA is exactly ``ita``."""
    # b* of real skin is highest for intermediate-to-brown skin and lowest for very light skin; a small b* is needed
    # for high ITA anyway to keep L* = 50 + b* tan(ITA) below the sRGB white point.
    b = float(np.interp(ita, [-60, -30, 0, 30, 50, 75], [14.0, 17.0, 19.0, 17.0, 13.5, 8.5])) + rng.uniform(-2.0, 2.0)
    a = float(np.interp(ita, [-60, 0, 40, 75], [11.0, 12.5, 11.5, 8.0])) + rng.uniform(-2.0, 2.0)
    L = 50.0 + b * math.tan(math.radians(ita))
    return L, a, b


def phantom_records(
    n_images: int,
    seed: int = 0,
    image_size: int = 128,
    class_balance: str = "uniform",
    views_per_lesion: float = 1.3,
    dark_share: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Describe a phantom dataset: one row per image, with its ground truth and per-image seed; nothing is rendered.

    Images are grouped into lesions: a lesion has ``1 + Poisson(views_per_lesion - 1)`` views (rotated, flipped,
    slightly shifted and zoomed photographs of the same lesion, with the same class, patient and skin tone), so
    splits must be grouped by ``group_id``. The skin tone is independent of the class, and the six ITA tone bins are
    drawn with equal probability.

    Args:
        n_images: number of rows (images).
        seed: dataset seed; the same arguments always give an identical DataFrame.
        image_size: side in pixels of the square images :func:`render_phantom` will render.
        class_balance: ``"uniform"`` (equal images per class, remainders to the first classes in CLASSES order) or
            ``"ham10000"`` (HAM10000 prevalences, :data:`HAM10000_COUNTS`, largest-remainder rounding).
        views_per_lesion: mean number of images per lesion, >= 1 (HAM10000 has 10015 images of 7470 lesions, 1.34).
        dark_share: lesion ``group_id`` -> probability that the lesion gets a dark true tone (the ``brown`` or
            ``dark`` ITA bins, :data:`DARK_TONES`); the lesions it names draw a dark or a lighter bin first, then a
            bin uniformly within it. Lesions it does not name keep the uniform draw over the six bins (a third dark).
            A known tone skew, for fairness experiments (``data.phantom.train_dark_malignant_share``).

    Returns:
        DataFrame with columns ``image_id``, ``group_id``, ``dx``, ``label``, ``source`` (``"phantom"``), ``view``,
        ``age``, ``sex``, ``localization``, ``ita_true``, ``tone_true``, ``skin_L``, ``skin_a``, ``skin_b``,
        ``lesion_radius`` (equivalent-disc radius / image side), ``border_irregularity`` (0..1), ``n_colours``,
        ``has_network``, ``has_hair``, ``center_x``, ``center_y`` (lesion centre / image side), ``rotation_deg``,
        ``flip``, ``vignette`` (``none``/``soft``/``field``), ``image_size``, ``lesion_seed``, ``phantom_seed``.
    """
    if int(n_images) != n_images or n_images < 0:
        raise ValueError(f"n_images must be a non-negative integer, got {n_images!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(image_size) != image_size or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    if class_balance == "uniform":
        weights: Mapping[str, float] = {dx: 1.0 for dx in CLASSES}
    elif class_balance == "ham10000":
        weights = HAM10000_COUNTS
    else:
        raise ValueError(f"class_balance must be 'uniform' or 'ham10000', got {class_balance!r}")
    if not views_per_lesion >= 1.0:
        raise ValueError(f"views_per_lesion must be >= 1, got {views_per_lesion!r}")
    n_images, seed, image_size = int(n_images), int(seed), int(image_size)

    counts = _allocate(n_images, weights)
    rng = _rng(seed, 0)
    lesions: list[tuple[str, int]] = []
    for dx in CLASSES:
        left = counts[dx]
        while left > 0:
            views = min(1 + int(rng.poisson(views_per_lesion - 1.0)), left)
            lesions.append((dx, views))
            left -= views
    # Shuffle so that classes interleave in id order while the views of one lesion stay adjacent.
    lesions = [lesions[i] for i in rng.permutation(len(lesions))]

    tones = tuple(ITA_RANGES)
    rows: list[dict[str, Any]] = []
    for j, (dx, n_views) in enumerate(lesions):
        prof = CLASS_PROFILES[dx]
        lr = _rng(seed, 1, j)
        group_id = f"phantom_lesion_{j:06d}"
        if dark_share is not None and group_id in dark_share:
            dark = lr.random() < dark_share[group_id]
            bins = [t for t in tones if (t in DARK_TONES) == dark]
            lo, hi = ITA_RANGES[bins[int(lr.integers(len(bins)))]]
        else:
            lo, hi = ITA_RANGES[tones[int(lr.integers(len(tones)))]]
        ita = float(lr.uniform(lo, hi))
        skin_L, skin_a, skin_b = _skin_lab(ita, lr)
        irregularity, n_colours = _irregularity_and_colours(dx, lr)
        sites = list(prof["sites"])
        p_site = np.array(list(prof["sites"].values()), dtype=float)
        lesion = {
            "group_id": group_id,
            "dx": dx,
            "label": CLASS_TO_LABEL[dx],
            "source": SOURCE,
            # HAM10000 ages are multiples of 5.
            "age": float(np.clip(5.0 * round(lr.normal(*prof["age"]) / 5.0), 5.0, 85.0)),
            "sex": "male" if lr.random() < prof["male"] else "female",
            "localization": sites[int(lr.choice(len(sites), p=p_site / p_site.sum()))],
            "ita_true": ita,
            "tone_true": tone_from_ita(ita),
            "skin_L": skin_L,
            "skin_a": skin_a,
            "skin_b": skin_b,
            "radius": float(lr.uniform(*prof["radius"])),
            "border_irregularity": irregularity,
            "n_colours": n_colours,
            "has_network": bool(lr.random() < prof["network"]),
            "lesion_seed": _seed_int(seed, 2, j),
        }
        for view in range(n_views):
            i = len(rows)
            vr = _rng(seed, 3, i)
            radius = lesion["radius"] * (1.0 if view == 0 else float(vr.uniform(0.92, 1.08)))
            # Keep the whole lesion (at most ~1.7 radii from its centre) inside the frame.
            slack = max(0.0, 0.5 - 1.7 * radius - 0.01)
            row = {"image_id": f"phantom_{i:06d}", **{k: v for k, v in lesion.items() if k != "radius"}}
            row.update(
                view=view,
                lesion_radius=radius,
                has_hair=bool(vr.random() < 0.4),
                center_x=0.5 + float(vr.uniform(-slack, slack)),
                center_y=0.5 + float(vr.uniform(-slack, slack)),
                rotation_deg=float(vr.uniform(0.0, 360.0)),
                flip=bool(vr.random() < 0.5),
                vignette=VIGNETTES[int(vr.choice(3, p=[0.5, 0.3, 0.2]))],
                image_size=image_size,
                phantom_seed=_seed_int(seed, 4, i),
            )
            rows.append(row)

    columns = [
        "image_id", "group_id", "dx", "label", "source", "view", "age", "sex", "localization", "ita_true",
        "tone_true", "skin_L", "skin_a", "skin_b", "lesion_radius", "border_irregularity", "n_colours",
        "has_network", "has_hair", "center_x", "center_y", "rotation_deg", "flip", "vignette", "image_size",
        "lesion_seed", "phantom_seed",
    ]  # fmt: skip
    df = pd.DataFrame(rows, columns=columns)
    return df.astype(
        {
            "label": "int64",
            "view": "int64",
            "age": "float64",
            "ita_true": "float64",
            "n_colours": "int64",
            "has_network": "bool",
            "has_hair": "bool",
            "flip": "bool",
            "image_size": "int64",
            "lesion_seed": "int64",
            "phantom_seed": "int64",
        }
    )


def _irregularity_and_colours(dx: str, rng: np.random.Generator) -> tuple[float, int]:
    """Draw the border irregularity (0..1) and the number of dermoscopic colours (the "B" and "C" of ABCD)."""
    irregularity = float(rng.uniform(*CLASS_PROFILES[dx]["irregularity"]))
    lo, hi = {
        "akiec": (2, 4),
        "bcc": (2, 4),
        "bkl": (1, 3),
        "df": (2, 3),
        "mel": (3, 5),
        "nv": (1, 2),
        "vasc": (2, 3),
    }[dx]
    n = int(rng.integers(lo, hi + 1))
    # Hard cases, so that neither border nor colour count separates melanoma from naevus perfectly: early
    # (in situ) melanomas that are fairly regular and only brown, and atypical (dysplastic) naevi.
    if dx == "mel" and rng.random() < 0.25:
        irregularity, n = float(rng.uniform(0.3, MEL_SUBTLE_BELOW)), int(rng.integers(2, 4))
    elif dx == "nv" and rng.random() < 0.12:
        irregularity, n = float(rng.uniform(0.25, 0.5)), 3
    return irregularity, n


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------


def _palette(dx: str, n: int, irregularity: float, rng: np.random.Generator) -> list[str]:
    """Choose ``n`` distinct colour names for a lesion of class ``dx``; the first is the dominant one."""

    def pick(required: list[str], optional: list[str]) -> list[str]:
        extra = [c for c in optional if c not in required]
        k = max(0, n - len(required))
        chosen = list(rng.choice(extra, size=min(k, len(extra)), replace=False)) if k else []
        return (required + [str(c) for c in chosen])[:n]

    if dx == "nv":
        return pick([str(rng.choice(["light_brown", "brown", "tan"]))], ["dark_brown", "brown", "tan", "light_brown"])
    if dx == "mel" and irregularity < MEL_SUBTLE_BELOW:
        return pick(["dark_brown", "brown"][: min(2, n)], ["light_brown", "tan", "blue_grey"])
    if dx == "mel":
        return pick(["dark_brown", "black", "brown"][: max(2, n - 2)], ["blue_grey", "red", "white", "light_brown"])
    if dx == "bkl":
        return pick([str(rng.choice(["light_brown", "tan"]))], ["brown", "white", "dark_brown"])
    if dx == "bcc":
        return pick(["pink", "red"], ["blue_grey", "white", "brown"])
    if dx == "akiec":
        return pick(["pink", "white"], ["red", "light_brown"])
    if dx == "df":
        return pick(["light_brown", "white"], ["brown", "pink"])
    if dx == "vasc":
        return pick(["red", "red_purple"], ["maroon", "blue_grey"])
    raise ValueError(f"unknown class {dx!r}")


def _lesion_colour(name: str, skin_L: float, rng: np.random.Generator) -> np.ndarray:
    L, a, b = COLOURS[name]
    # Melanin darkens proportionally to the skin it sits in; non-pigment colours (vessels, scale) only partly.
    factor = min(1.0, skin_L / 65.0)
    L = L * factor**1.2 if name in PIGMENT_COLOURS else L * (0.55 + 0.45 * factor)
    jitter = rng.uniform(-1.0, 1.0, size=3) * np.array([3.0, 2.5, 2.5])
    return np.array([L, a, b], dtype=np.float32) + jitter.astype(np.float32)


def _smooth_noise(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    """Zero-mean, unit-ish variance band-limited noise: a ``grid x grid`` white field upsampled bicubically."""
    return cv2.resize(
        rng.standard_normal((grid, grid)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _blend(col: np.ndarray, weight: np.ndarray, colour: np.ndarray) -> None:
    """In place: ``col = col + weight * (colour - col)`` for an H x W x 3 Lab canvas."""
    col += weight[..., None] * (colour - col)


def _pt(cx: float, cy: float, R: float, u: float, v: float) -> tuple[int, int]:
    # cv2 drawing with shift=4 takes fixed-point coordinates: sub-pixel positions, so small lesions stay smooth.
    return int(round((cx + u * R) * 16)), int(round((cy + v * R) * 16))


def _draw_dots(
    canvas: np.ndarray, rng: np.random.Generator, n: int, cx: float, cy: float, R: float, radii: tuple[float, float]
) -> list[tuple[float, float]]:
    """Draw ``n`` anti-aliased discs at random points inside the unit lesion disc; radii in pixels."""
    pts = []
    for _ in range(n):
        rad, ang = math.sqrt(rng.uniform(0.0, 0.75)), rng.uniform(0.0, 2 * math.pi)
        u, v = rad * math.cos(ang), rad * math.sin(ang)
        pts.append((u, v))
        r_px = int(round(rng.uniform(*radii) * 16))
        cv2.circle(canvas, _pt(cx, cy, R, u, v), max(r_px, 4), 255, -1, cv2.LINE_AA, 4)
    return pts


def _network(u: np.ndarray, v: np.ndarray, period: float, angle: float, warp: tuple[np.ndarray, np.ndarray]):
    """Honeycomb-like mesh in [0, 1] (1 on the lines): three plane waves 120 degrees apart, on warped coordinates."""
    k = 2.0 * math.pi / period
    uu, vv = u + warp[0], v + warp[1]
    h = np.zeros_like(u)
    for t in (angle, angle + 2.0 * math.pi / 3.0, angle + 4.0 * math.pi / 3.0):
        h += np.cos(k * (uu * math.cos(t) + vv * math.sin(t)))
    # h peaks (3) at the holes of a triangular lattice; the connected low region between them forms the mesh lines.
    return _smoothstep(-0.2, -1.0, h)


def _vessel_tree(
    canvas: np.ndarray, rng: np.random.Generator, cx: float, cy: float, R: float, thick: int, depth: int = 3
) -> None:
    """Arborising vessels: a thick trunk that branches into thinner, tortuous twigs (Menzies et al. 2000)."""
    stack = []
    rad, ang = math.sqrt(rng.uniform(0.0, 0.5)), rng.uniform(0.0, 2 * math.pi)
    stack.append((rad * math.cos(ang), rad * math.sin(ang), rng.uniform(0, 2 * math.pi), thick, depth))
    while stack:
        u, v, heading, t, d = stack.pop()
        pts = [_pt(cx, cy, R, u, v)]
        for _ in range(int(rng.integers(3, 6))):
            heading += rng.normal(0.0, 0.5)
            step = rng.uniform(0.08, 0.16)
            u, v = u + step * math.cos(heading), v + step * math.sin(heading)
            if u * u + v * v > 0.8:
                break
            pts.append(_pt(cx, cy, R, u, v))
            if d > 0 and rng.random() < 0.35:
                stack.append((u, v, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2), max(1, t - 1), d - 1))
        if len(pts) > 1:
            cv2.polylines(canvas, [np.array(pts, dtype=np.int32)], False, 255, t, cv2.LINE_AA, 4)


def _render_lesion(record: Mapping[str, Any], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the lesion in its own frame and place it in the image.

    The lesion is drawn from ``lesion_seed`` in coordinates normalised by its radius, so that every view of a lesion
    shows the same lesion; the view (rotation, flip, zoom, position) is then applied with one affine warp.

    Returns:
        ``(premultiplied Lab colour H x W x 3, opacity H x W, coverage H x W)``; coverage >= 0.5 is the lesion mask.
    """
    dx = str(record["dx"])
    prof = CLASS_PROFILES[dx]
    rng = np.random.default_rng(int(record["lesion_seed"]))
    R = float(record["lesion_radius"]) * size  # pixels
    half = int(math.ceil(1.9 * R)) + 2
    B = 2 * half + 1
    c = float(half)
    ys, xs = np.mgrid[0:B, 0:B].astype(np.float32)
    u, v = (xs - c) / R, (ys - c) / R

    # Shape: an ellipse (unit area in radius units) whose radius is modulated by random Fourier harmonics; an
    # irregular border is one of the strongest melanoma criteria (the "B" of ABCD), so the amplitude scales with it.
    irr = float(record["border_irregularity"])
    aspect = float(rng.uniform(*prof["aspect"]))
    ks = np.arange(1, 9)
    amps = rng.normal(0.0, 1.0, size=8) * 0.22 / ks**0.8 * irr
    amps[0] *= 0.6  # k = 1 only shifts the shape (asymmetry), keep it modest
    phases = rng.uniform(0.0, 2 * math.pi, size=8)
    table_t = np.linspace(-math.pi, math.pi, 513, dtype=np.float64)
    r_t = 1.0 + (amps[:, None] * np.cos(ks[:, None] * table_t[None, :] + phases[:, None])).sum(0)
    r_t = np.clip(r_t, 0.55, 1.45)
    r_t /= math.sqrt(float(np.mean(r_t[:-1] ** 2)))  # equal area to the unit disc: lesion_radius is area-equivalent
    sa = math.sqrt(aspect)
    xe, ye = u / sa, v * sa
    rho = np.sqrt(xe * xe + ye * ye)
    theta_idx = ((np.arctan2(ye, xe) + math.pi) * (512 / (2 * math.pi))).astype(np.int32)
    r_theta = r_t.astype(np.float32)[theta_idx]
    d = rho - r_theta  # ~ signed distance to the border in lesion radii
    edge = float(rng.uniform(*prof["edge"]))
    if dx == "akiec":
        # Ill-defined border: a noisy, wide transition rather than a clean edge.
        d = d + 0.12 * _smooth_noise(rng, 10, B)
    coverage = np.clip(0.5 - d / edge, 0.0, 1.0)
    coverage = coverage * coverage * (3.0 - 2.0 * coverage)
    inner = np.clip(rho / np.maximum(r_theta, 1e-3), 0.0, 2.0)  # 0 at centre, 1 at border

    # Colours: soft partition of the lesion between the palette colours by competing smooth noise fields.
    skin_L = float(record["skin_L"])
    names = _palette(dx, int(record["n_colours"]), irr, rng)
    colours = {n: _lesion_colour(n, skin_L, rng) for n in names}
    if dx == "mel" and "white" in colours:
        # Regression structures are white-grey scar-like areas, not pure white.
        grey = colours.get("blue_grey", _lesion_colour("blue_grey", skin_L, rng))
        colours["white"] = 0.4 * colours["white"] + 0.6 * grey
    if dx == "mel" and "red" in colours:
        # Red in melanoma is mostly diffuse erythema / polymorphous vessels: pinker than a bleeding vascular lesion.
        colours["red"] = 0.6 * colours["red"] + 0.4 * _lesion_colour("pink", skin_L, rng)
    # Structure-only colours are drawn as structures below, not as regions.
    structural = {
        "bcc": {"red"},
        "akiec": {"white"},
        "bkl": {"white"},
        "df": {"white"},
        "mel": set(),
        "nv": set(),
        "vasc": set(),
    }[dx]
    regions = [n for n in names if n not in structural] or names[:1]
    fields = []
    for i, n in enumerate(regions):
        f = _smooth_noise(rng, 5, B)
        if i == 0:
            f = f + 0.8  # the dominant colour wins most of the area
        if dx == "nv" and n in ("dark_brown", "brown") and i > 0:
            f = f + 1.5 * (0.6 - inner)  # naevi: darker centre, symmetric
        if dx == "mel":
            # Asymmetric colour distribution: each colour prefers a random side of the lesion.
            t = rng.uniform(0, 2 * math.pi)
            f = f + 1.2 * (u * math.cos(t) + v * math.sin(t))
        fields.append(f * (3.0 if dx == "mel" else 2.0))
    w = np.exp(np.stack(fields) - np.max(fields, axis=0))
    w /= w.sum(0)
    col = np.tensordot(np.stack([colours[n] for n in regions]), w, axes=(0, 0)).transpose(1, 2, 0).copy()
    if dx in ("nv", "bkl", "df", "mel"):
        # Pigmented lesions thin out towards the border, so their periphery is lighter than their body.
        col[..., 0] *= 1.0 + float(rng.uniform(0.05, 0.14)) * np.clip(inner, 0.0, 1.0) ** 2
    # Fine texture inside the lesion (keratin, pigment clumps).
    col[..., 0] += 2.5 * _smooth_noise(rng, max(4, B // 3), B)

    opacity = np.ones((B, B), dtype=np.float32)
    mask8 = np.zeros((B, B), dtype=np.uint8)
    px = size / 128.0  # pixel scale relative to the reference 128 px image: structures have a fixed physical size

    if record["has_network"]:
        # Warp in units of the mesh period: a typical network is a slightly irregular honeycomb, an atypical one is
        # distorted much more.
        period = 0.036 * size / R * float(rng.uniform(0.85, 1.15))
        warp_amp = {"mel": 0.6, "bkl": 0.4}.get(dx, 0.3) * period
        grid = max(6, int(B / (3.0 * period * R)))
        warp = (warp_amp * _smooth_noise(rng, grid, B), warp_amp * _smooth_noise(rng, grid, B))
        net = _network(u, v, period, float(rng.uniform(0, math.pi)), warp)
        if dx == "nv":
            strength = 0.45 * (1.0 - _smoothstep(0.6, 1.0, inner))  # regular network fading at the periphery
        elif dx == "mel":
            # Atypical network: broken, thickened, uneven darkness, ending abruptly.
            broken = _smoothstep(-0.4, 0.2, _smooth_noise(rng, 7, B))
            strength = 0.75 * broken * (0.5 + 0.5 * np.abs(_smooth_noise(rng, 8, B)))
        elif dx == "df":
            strength = 0.55 * _smoothstep(0.35, 0.6, inner) * (1.0 - _smoothstep(0.85, 1.05, inner))
        else:  # bkl: faint network of solar lentigo
            strength = 0.3 * np.ones_like(u)
        # The mesh lines are melanin in the rete ridges: a darker brown than the holes, whatever the local colour.
        line = _lesion_colour("dark_brown" if dx == "mel" else "brown", skin_L, rng)
        dark = np.minimum(col, line[None, None, :])
        dark[..., 0] = np.minimum(col[..., 0] * 0.7, line[0])
        col += (net * strength)[..., None] * (dark - col)

    if dx == "nv" and not record["has_network"]:
        # Globular pattern: regular, evenly spread brown globules.
        _draw_dots(mask8, rng, int(rng.integers(12, 30)), c, c, R, (0.8 * px, 1.6 * px))
        _blend(col, mask8 / 255.0 * 0.7, colours[names[-1]] * np.float32([0.7, 1.0, 1.0]))
    elif dx == "mel":
        # Irregular dots and globules, crowded to one side, in black / dark brown.
        t = rng.uniform(0, 2 * math.pi)
        pts = np.zeros_like(mask8)
        for _ in range(int(rng.integers(6, 25))):
            rad, ang = rng.uniform(0.4, 0.95), t + rng.normal(0.0, 0.9)
            cv2.circle(
                pts,
                _pt(c, c, R, rad * math.cos(ang), rad * math.sin(ang)),
                int(rng.uniform(0.6, 2.2) * px * 16),
                255,
                -1,
                cv2.LINE_AA,
                4,
            )
        if rng.random() < 0.5:
            # Streaks / pseudopods at part of the periphery.
            for _ in range(int(rng.integers(3, 9))):
                ang = t + rng.normal(0.0, 0.6)
                r0 = rng.uniform(0.7, 0.85)
                cv2.line(
                    pts,
                    _pt(c, c, R, r0 * math.cos(ang), r0 * math.sin(ang)),
                    _pt(c, c, R, 1.02 * math.cos(ang), 1.02 * math.sin(ang)),
                    255,
                    max(1, int(px)),
                    cv2.LINE_AA,
                    4,
                )
        _blend(col, pts / 255.0 * 0.9, colours["black"] if "black" in colours else colours[names[0]] * 0.5)
        if "blue_grey" in colours:
            # Blue-white veil: a confluent blue-grey area with a whitish haze over it.
            veil = _smoothstep(0.4, 1.2, _smooth_noise(rng, 4, B) + 0.8 * (u * math.cos(t) + v * math.sin(t)))
            _blend(col, veil * 0.7, colours["blue_grey"] + np.float32([8.0, 0.0, 0.0]))
    elif dx == "bkl":
        # Milia-like cysts (white) and comedo-like openings (dark brown); moth-eaten border comes from the harmonics.
        if "white" in colours:
            _draw_dots(mask8, rng, int(rng.integers(3, 12)), c, c, R, (0.5 * px, 1.2 * px))
            _blend(col, mask8 / 255.0 * 0.9, colours["white"])
            mask8[:] = 0
        _draw_dots(mask8, rng, int(rng.integers(2, 8)), c, c, R, (0.6 * px, 1.3 * px))
        _blend(col, mask8 / 255.0 * 0.8, colours[names[0]] * np.float32([0.45, 0.8, 0.7]))
    elif dx == "bcc":
        opacity *= float(rng.uniform(0.55, 0.8))  # translucent: the skin shows through
        if "blue_grey" in colours:
            # Large blue-grey ovoid nests.
            for _ in range(int(rng.integers(1, 6))):
                rad, ang = math.sqrt(rng.uniform(0, 0.45)), rng.uniform(0, 2 * math.pi)
                axes = (int(rng.uniform(0.1, 0.25) * R * 16), int(rng.uniform(0.07, 0.16) * R * 16))
                cx_, cy_ = _pt(c, c, R, rad * math.cos(ang), rad * math.sin(ang))
                cv2.ellipse(mask8, (cx_, cy_), axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, 4)
            nests = cv2.GaussianBlur(mask8, (0, 0), 0.8 * px) / 255.0
            _blend(col, nests * 0.9, colours["blue_grey"])
            opacity = np.maximum(opacity, nests.astype(np.float32))
            mask8[:] = 0
        for _ in range(int(rng.integers(2, 5))):
            _vessel_tree(mask8, rng, c, c, R, max(1, int(round(1.5 * px))))
        vessels = mask8 / 255.0
        _blend(col, vessels * 0.95, colours["red"])
        opacity = np.maximum(opacity, vessels.astype(np.float32))
    elif dx == "akiec":
        opacity *= float(rng.uniform(0.65, 0.9))
        # Dotted / glomerular vessels ("strawberry pattern") under white scale.
        _draw_dots(mask8, rng, int(rng.integers(15, 45)), c, c, R, (0.4 * px, 0.9 * px))
        dots = colours["red"] if "red" in colours else colours["pink"] * np.float32([0.8, 1.4, 1.3])
        _blend(col, mask8 / 255.0 * 0.8, dots)
        # White-yellow scale: patchy and granular rather than one clean area.
        scale = _smoothstep(0.2, 1.2, _smooth_noise(rng, 6, B) + 0.5 * _smooth_noise(rng, max(8, B // 4), B))
        _blend(col, scale * 0.75, colours["white"] * np.float32([0.95, 1.0, 2.0]))
        opacity = np.maximum(opacity, scale.astype(np.float32) * 0.95)
    elif dx == "df":
        # Central white scar-like patch surrounded by the peripheral network.
        patch = np.zeros_like(mask8)
        axes = (int(rng.uniform(0.3, 0.5) * R * 16), int(rng.uniform(0.25, 0.4) * R * 16))
        off = _pt(c, c, R, rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1))
        cv2.ellipse(patch, off, axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA, 4)
        patch = cv2.GaussianBlur(patch, (0, 0), 0.12 * R) / 255.0
        _blend(col, patch * 0.75, colours["white"])
    elif dx == "vasc":
        # Lacunae: round red / purple / dark blood-filled spaces separated by pale septa.
        base = colours["red"] * np.float32([1.45, 0.55, 0.6])  # pale pink-red septa
        col[:] = base + 0.3 * (col - base)
        names_l = [n for n in names if n != "white"]
        for i in range(int(rng.integers(8, 26))):
            mask8[:] = 0
            rad, ang = math.sqrt(rng.uniform(0, 0.7)), rng.uniform(0, 2 * math.pi)
            r_px = int(rng.uniform(0.12, 0.3) * R * 16)
            cv2.circle(mask8, _pt(c, c, R, rad * math.cos(ang), rad * math.sin(ang)), r_px, 255, -1, cv2.LINE_AA, 4)
            _blend(col, mask8 / 255.0 * 0.9, colours[names_l[i % len(names_l)]])

    # Drawn structures have hard anti-aliased edges; real ones are seen through the epidermis.
    col = cv2.GaussianBlur(col, (0, 0), 0.6 * px)

    # Place the lesion: rotate (and mirror) about its centre, then move the centre to (center_x, center_y).
    ang = math.radians(float(record["rotation_deg"]))
    ca, sn = math.cos(ang), math.sin(ang)
    fx = -1.0 if record["flip"] else 1.0
    tx, ty = float(record["center_x"]) * size - 0.5, float(record["center_y"]) * size - 0.5
    lin = np.array([[ca * fx, -sn], [sn * fx, ca]], dtype=np.float64)
    M = np.hstack([lin, (np.array([tx, ty]) - lin @ np.array([c, c]))[:, None]])
    alpha = (coverage * opacity).astype(np.float32)
    stack = np.dstack([col * alpha[..., None], alpha]).astype(np.float32)
    warped = cv2.warpAffine(stack, M, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0, 0))
    cov = cv2.warpAffine(coverage.astype(np.float32), M, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    return warped[..., :3], warped[..., 3], cov


def _hair(rng: np.random.Generator, size: int) -> np.ndarray:
    """Anti-aliased dark hairs: thin quadratic Bezier curves crossing the field; returns coverage in [0, 1]."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    t = np.linspace(0.0, 1.0, 16)[:, None]
    for _ in range(int(rng.integers(2, 14))):
        p0 = rng.uniform(0.05, 0.95, size=2)  # start inside the frame so that every hair is visible
        ang = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(0.3, 1.0)
        p2 = p0 + length * np.array([math.cos(ang), math.sin(ang)])
        p1 = (p0 + p2) / 2 + rng.normal(0.0, 0.15, size=2)  # control point off the chord: curved hair
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        pts = np.round(curve * size * 16).astype(np.int32)
        thick = max(1, int(round(rng.uniform(0.8, 1.6) * size / 128.0)))
        cv2.polylines(canvas, [pts], False, 255, thick, cv2.LINE_AA, 4)
    return canvas.astype(np.float32) / 255.0


def render_phantom_layers(record: Mapping[str, Any]) -> PhantomLayers:
    """Render one phantom row together with its ground-truth layers.

    Args:
        record: one row of :func:`phantom_records` (a mapping with at least its rendering columns).

    Returns:
        :class:`PhantomLayers` ``(image, lesion, hair, skin)``: the uint8 RGB image and three bool masks. ``skin``
        marks the healthy-skin pixels over which the mean L* and b* equal the row's ``skin_L`` and ``skin_b`` before
        8-bit quantisation, blur and sensor noise, i.e. where the measured ITA should match ``ita_true``.
    """
    size = int(record["image_size"])
    rng = np.random.default_rng(int(record["phantom_seed"]))
    premul, alpha, cov = _render_lesion(record, size)

    hair = _hair(rng, size) if record["has_hair"] else np.zeros((size, size), dtype=np.float32)
    hair_alpha = hair * float(rng.uniform(0.75, 0.95))

    # Vignetting: soft corner darkening or the circular field of a contact dermoscope.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.uniform(-0.03, 0.03) * size, size / 2 + rng.uniform(-0.03, 0.03) * size
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / size
    kind = str(record["vignette"])
    if kind == "soft":
        r0 = float(rng.uniform(0.42, 0.52))
        vig = 1.0 - float(rng.uniform(0.3, 0.6)) * _smoothstep(r0, r0 + 0.3, dist)
    elif kind == "field":
        r0 = float(rng.uniform(0.5, 0.62))
        vig = 1.0 - _smoothstep(r0 - 0.04, r0, dist)
    else:
        vig = np.ones((size, size), dtype=np.float32)

    # Healthy skin: away from the lesion's halo (also after blur), from hair and from vignetting.
    halo = cv2.GaussianBlur(alpha, (0, 0), 2.0)
    hair_wide = cv2.dilate((hair > 0.02).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    skin = (halo < 0.01) & ~hair_wide & (vig > 0.995)

    # Skin: base colour plus low-frequency mottling (vascular / pigment unevenness) and fine texture. The fields are
    # mean-corrected over healthy skin so the ground-truth ITA stays exact whatever the noise draws.
    L0, a0, b0 = float(record["skin_L"]), float(record["skin_a"]), float(record["skin_b"])
    mottle = _smooth_noise(rng, 5, size)
    lab = np.empty((size, size, 3), dtype=np.float32)
    lab[..., 0] = 1.8 * mottle + 0.9 * rng.standard_normal((size, size), dtype=np.float32)
    lab[..., 1] = -1.2 * mottle + 1.5 * _smooth_noise(rng, 4, size)  # redder where slightly darker (erythema)
    lab[..., 2] = 0.8 * _smooth_noise(rng, 6, size)
    if skin.any():
        lab -= lab[skin].mean(axis=0)
    lab += np.float32([L0, a0, b0])

    lab = lab * (1.0 - alpha[..., None]) + premul
    hair_lab = np.float32([min(18.0, 0.45 * L0), 3.0, 5.0])
    lab += hair_alpha[..., None] * (hair_lab - lab)

    rgb = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)
    sigma = float(rng.choice([0.0, 0.5, 0.8], p=[0.4, 0.35, 0.25])) * size / 128.0
    if sigma > 0:
        rgb = cv2.GaussianBlur(rgb, (0, 0), sigma)
    rgb *= vig[..., None]
    rgb += rng.normal(0.0, 0.006, size=rgb.shape).astype(np.float32)  # sensor noise
    image = np.clip(rgb * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return PhantomLayers(image=image, lesion=cov >= 0.5, hair=hair_alpha > 0.15, skin=skin)


def render_phantom(record: Mapping[str, Any], return_mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Render one phantom row into a dermoscopy-like RGB image, deterministically from the row alone.

    The same row gives a byte-identical image in any process: all randomness comes from ``phantom_seed`` (this view:
    skin texture, hair, vignetting, blur, noise) and ``lesion_seed`` (the lesion itself, shared by its views).

    Args:
        record: one row of :func:`phantom_records` (dict, pandas Series or any mapping).
        return_mask: also return the lesion mask.

    Returns:
        ``image`` (``image_size x image_size x 3`` uint8 RGB), or ``(image, mask)`` with ``mask`` a bool
        ``image_size x image_size`` array that is True on the lesion's extent. Hairs are not part of the mask:
        hair outside the lesion is never marked and hair lying over it does not cut holes into it (like ISIC
        segmentation masks); use :func:`render_phantom_layers` for the hair and healthy-skin masks.
    """
    layers = render_phantom_layers(record)
    if return_mask:
        return layers.image, layers.lesion
    return layers.image
