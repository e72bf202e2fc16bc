"""Robustness to acquisition shift: the test split under a fixed, seeded suite of image corruptions.

The generic corruptions follow Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations" (ICLR): Gaussian blur, JPEG compression, brightness/contrast, a colour cast (white
balance shift), Gaussian noise and a rotation/zoom, each at three severities. The dermoscopy artefacts follow Maron et
al. 2021, "A benchmark for neural network robustness in skin cancer classification" (Eur. J. Cancer 155:191-199):
hair drawn over the image (dark curved lines), the dark corners of a dermoscope's round field of view (vignette) and
ruler/ink marks. They are written here with OpenCV and numpy: ``medmnistc`` (MedMNIST-C) would pull ImageMagick's
``Wand``, scikit-image and a second OpenCV build for the handful of functions needed.

Each corruption is a pure function ``(rgb uint8 HxWx3, severity 1..3, rng) -> rgb uint8``. The random generator of
one image is seeded from the run seed, the image's index in the (``image_id``-sorted) test split and the corruption's
id (its position in :data:`CORRUPTIONS`; new ones are appended), not from the severity: the three severities of an
image draw the same hairs, the same noise field and the same rotation direction, only stronger, and the same seed
gives identical images.

Which pixels are corrupted, and what is re-applied. The test shards hold the *prepared* images (decoded, hair
removed, colour constancy, resized), not the originals. Each stored test image is corrupted at its stored size and
then sent through the preprocessing an uploaded image gets at the endpoint (``skinsynth.serve.model.prepare_upload``:
:func:`skinsynth.data.preprocess.prepare_pixels` with the run's ``data.preprocess`` settings from its data card and
the tone estimate off; that function is called here directly because ``classify`` may not import ``serve``): hair
removal, Shades of Gray colour constancy and the resize/crop run again, as they would on a new dermoscope's image. So
the scores measure the deployed pipeline, not the bare network: the hair removal may wipe some drawn hairs and colour
constancy may undo most of a colour cast. Because these steps also change an uncorrupted image slightly when run a
second time, the baseline ("clean") is the uncorrupted test images through the same re-preprocessing, and each drop is
clean minus corrupted on the same images, with the 95% interval of that paired difference over the same lesion
resamples; the test report's own score (stored pixels, no re-preprocessing) is given beside it as ``clean_stored``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from skinsynth.classify import metrics as M
from skinsynth.config import PreprocessConfig

SEVERITIES = (1, 2, 3)
METRICS = ("balanced_accuracy", "malignant_sensitivity")
SHIFT_CSV = "shift.csv"
SHIFT_FIGURE = "shift.png"

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _clip(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _scale(rgb: np.ndarray) -> float:
    """Pixel sizes are given for a 64 px image and grow with larger ones (never shrink below it)."""
    return max(1.0, min(rgb.shape[:2]) / 64.0)


def gaussian_blur(rgb: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Defocus: Gaussian blur, sigma 0.6 / 1.2 / 2.4 px at 64 px."""
    sigma = (0.6, 1.2, 2.4)[severity - 1] * _scale(rgb)
    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def jpeg_compression(rgb: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A JPEG round trip at quality 40 / 20 / 8."""
    quality = (40, 20, 8)[severity - 1]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV only fails here on invalid arrays
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def brightness_contrast(rgb: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Exposure: contrast scaled to 0.8 / 0.6 / 0.4 about the mean, brightness shifted by 15 / 30 / 50 (up or down,
    times 0.8-1, drawn per image)."""
    direction = rng.choice((-1.0, 1.0)) * rng.uniform(0.8, 1.0)
    contrast, shift = (0.8, 0.6, 0.4)[severity - 1], (15.0, 30.0, 50.0)[severity - 1]
    img = rgb.astype(np.float32)
    mean = img.mean(axis=(0, 1), keepdims=True)
    return _clip((img - mean) * contrast + mean + direction * shift)


def colour_cast(rgb: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """White balance shift: per-channel gains exp(g), g of norm 0.12 / 0.25 / 0.45 in a random chroma direction
    (orthogonal to grey, so the mean brightness is kept)."""
    direction = rng.normal(size=3)
    direction -= direction.mean()
    direction /= np.linalg.norm(direction) or 1.0
    gains = np.exp((0.12, 0.25, 0.45)[severity - 1] * direction).astype(np.float32)
    return _clip(rgb.astype(np.float32) * gains)


def gaussian_noise(rgb: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise: i.i.d. Gaussian, sigma 8 / 16 / 28 grey levels."""
    noise = rng.standard_normal(rgb.shape, dtype=np.float32)
    return _clip(rgb.astype(np.float32) + (8.0, 16.0, 28.0)[severity - 1] * noise)


def rotation_zoom(rgb: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Framing: rotation by 10 / 25 / 45 degrees (direction, and a factor 0.8-1, drawn per image) and zoom
    1.1 / 1.25 / 1.5, reflected borders."""
    direction = rng.choice((-1.0, 1.0)) * rng.uniform(0.8, 1.0)
    height, width = rgb.shape[:2]
    angle, zoom = direction * (10.0, 25.0, 45.0)[severity - 1], (1.1, 1.25, 1.5)[severity - 1]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, zoom)
    return cv2.warpAffine(rgb, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _curve(rng: np.random.Generator, side: int, points: int = 24) -> np.ndarray:
    """A quadratic Bezier curve across part of a ``side`` px image: (points, 1, 2) int32 for cv2.polylines."""
    start = rng.uniform(0, side, 2)
    angle = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.4, 1.0) * side
    end = start + length * np.array([np.cos(angle), np.sin(angle)])
    bend = rng.uniform(-0.35, 0.35) * length * np.array([-np.sin(angle), np.cos(angle)])
    control = (start + end) / 2 + bend
    t = np.linspace(0, 1, points)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    return np.rint(curve).astype(np.int32).reshape(-1, 1, 2)


def hair(rgb: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Hair: 4 / 10 / 20 dark curved lines (the first hairs of one per-image draw, so severity adds hairs)."""
    side = min(rgb.shape[:2])
    thickness = max(1, round(_scale(rgb)))
    out = rgb.copy()
    hairs = [(_curve(rng, side), rng.uniform(10, 60), rng.uniform(0.7, 0.9)) for _ in range(20)]
    for curve, darkness, green in hairs[: (4, 10, 20)[severity - 1]]:
        colour = (darkness, darkness * green, darkness * green * 0.8)
        cv2.polylines(out, [curve], isClosed=False, color=colour, thickness=thickness, lineType=cv2.LINE_AA)
    return out


def vignette(rgb: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Dark corners of a round dermoscope field: darkening from 0.75 / 0.6 / 0.45 of the half diagonal outwards, to
    50 / 75 / 95% black at the corners."""
    height, width = rgb.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    radius = np.hypot(yy - (height - 1) / 2, xx - (width - 1) / 2) / (np.hypot(height - 1, width - 1) / 2)
    start, strength = (0.75, 0.6, 0.45)[severity - 1], (0.5, 0.75, 0.95)[severity - 1]
    dark = strength * np.clip((radius - start) / (1 - start), 0, 1) ** 1.5
    return _clip(rgb.astype(np.float32) * (1 - dark)[..., None])


def ruler_ink(rgb: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A ruler along one edge (its tick marks longer and bolder with severity) and 0 / 1 / 3 purple ink marks."""
    side = min(rgb.shape[:2])
    out = rgb.copy()
    thickness = max(1, round(_scale(rgb)))
    edge = int(rng.integers(4))
    inks = [(_curve(rng, side, points=12), rng.uniform(0.6, 1.0)) for _ in range(3)]
    tick = max(2, round(side * (0.06, 0.1, 0.16)[severity - 1]))
    step = max(3, side // 10)
    ruler = np.zeros(rgb.shape[:2], np.uint8)
    cv2.line(ruler, (0, tick), (side - 1, tick), 255, thickness)
    for x in range(step // 2, side, step):
        cv2.line(ruler, (x, 0), (x, tick), 255, thickness + (severity == 3))
    ruler = np.rot90(ruler, edge)[: rgb.shape[0], : rgb.shape[1]]
    ruler_mask = np.zeros(rgb.shape[:2], np.float32)
    ruler_mask[: ruler.shape[0], : ruler.shape[1]] = ruler / 255.0
    out = out.astype(np.float32) * (1 - 0.85 * ruler_mask[..., None]) + 15.0 * 0.85 * ruler_mask[..., None]
    out = _clip(out)
    for curve, strength in inks[: (0, 1, 3)[severity - 1]]:
        colour = (110 * strength, 40 * strength, 150 * strength)
        cv2.polylines(out, [curve], isClosed=False, color=colour, thickness=thickness + 1, lineType=cv2.LINE_AA)
    return out


# the id of a corruption is its position here: it seeds the per-image generator, so new ones go at the end
CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_blur": gaussian_blur,
    "jpeg_compression": jpeg_compression,
    "brightness_contrast": brightness_contrast,
    "colour_cast": colour_cast,
    "gaussian_noise": gaussian_noise,
    "rotation_zoom": rotation_zoom,
    "hair": hair,
    "vignette": vignette,
    "ruler_ink": ruler_ink,
}
DERMOSCOPY_ARTEFACTS = ("hair", "vignette", "ruler_ink")


def image_rng(seed: int, index: int, corruption: str) -> np.random.Generator:
    """The generator of one image under one corruption (the same for its three severities)."""
    corruption_id = list(CORRUPTIONS).index(corruption)
    return np.random.default_rng([seed & 0xFFFFFFFF, index, corruption_id])


def corrupt(rgb: np.ndarray, corruption: str, severity: int, *, seed: int, index: int) -> np.ndarray:
    """``rgb`` under ``corruption`` at ``severity`` (1..3), seeded by run seed, image index and corruption id."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, not {severity}")
    out = CORRUPTIONS[corruption](np.ascontiguousarray(rgb), severity, image_rng(seed, index, corruption))
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    return out


def upload_preprocess(rgb: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """What the endpoint does to an uploaded image (``serve.model.prepare_upload``), from pixels instead of bytes: the
    image is PNG-encoded (lossless) and run through ``prepare_pixels`` with the tone estimate off."""
    from skinsynth.data.preprocess import encode_png, prepare_pixels

    out, _ = prepare_pixels(encode_png(rgb), replace(preprocess, estimate_tone=False))
    return out


def preprocess_of_run(run_dir: Path, default: PreprocessConfig) -> PreprocessConfig:
    """The ``data.preprocess`` settings the run's shards were prepared with (its data card), as serving reads them."""
    import json

    from skinsynth.config import section_from_dict
    from skinsynth.core.rundir import layout

    path = layout(run_dir).data_card
    if path.is_file():
        card = json.loads(path.read_text())
        if "preprocess" in card:
            return section_from_dict(PreprocessConfig, card["preprocess"])
    return default


def _resample_weights(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, N]`` multiplicity of each row in each lesion-bootstrap resample (shared by every condition, so the
    drops are paired)."""
    n = len(groups)
    return np.stack([np.bincount(idx, minlength=n) for idx in M.group_bootstrap_indices(groups, n_boot, seed)]).astype(
        np.float64
    )


def weighted_metrics(
    probs: np.ndarray, labels: np.ndarray, threshold: float, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Balanced accuracy (mean recall over the classes present) and malignant sensitivity at ``threshold`` for each
    row of ``weights`` (row multiplicities; a row of ones is the plain metric). NaN where undefined."""
    n_classes = probs.shape[1]
    onehot = np.eye(n_classes)[labels]
    correct = (probs.argmax(1) == labels).astype(np.float64)
    counts = weights @ onehot
    hits = weights @ (onehot * correct[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        present = counts > 0
        recall = np.where(present, hits / np.where(present, counts, 1), 0.0)
        balanced = np.where(present.any(1), recall.sum(1) / np.maximum(present.sum(1), 1), np.nan)
        malignant = M.is_malignant_label(labels).numpy().astype(bool)
        flagged = (M.malignant_scores(probs).numpy() >= threshold).astype(np.float64)
        n_mal = weights[:, malignant].sum(1)
        sensitivity = np.where(n_mal > 0, (weights[:, malignant] @ flagged[malignant]) / np.maximum(n_mal, 1), np.nan)
    return {"balanced_accuracy": balanced, "malignant_sensitivity": sensitivity}


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return None, None
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _num(value: float) -> float | None:
    return None if value is None or np.isnan(value) else float(value)


def evaluate_shift(
    test: pd.DataFrame,
    predict: Callable[[pd.Series], np.ndarray],
    preprocess: PreprocessConfig,
    threshold: float,
    out_dir: Path,
    *,
    n_boot: int,
    seed: int,
    clean_stored: dict[str, float | None] | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score the test rows under every corruption x severity; writes ``shift.csv`` and ``shift.png`` to ``out_dir``.

    Args:
        test: test shard rows (``image``, ``label``, ``group_id``), sorted by ``image_id``.
        predict: PNG bytes -> class probabilities (the evaluation's own prediction, TTA included).
        preprocess: the run's ``data.preprocess`` (re-applied to every image, see the module docstring).
        threshold: the operating point chosen on validation.
        out_dir: ``RUN_DIR/eval/<name>``.
        n_boot: lesion-bootstrap resamples (the same resamples for clean and every condition: paired drops).
        seed: the run seed (corruptions and resamples).
        clean_stored: the test report's metrics on the stored pixels, for reference.

    Returns:
        The report's ``shift`` block.
    """
    import time

    from skinsynth.core.shards import decode_png_arrays
    from skinsynth.data.preprocess import encode_png

    t0 = time.perf_counter()
    labels = test["label"].to_numpy(np.int64)
    weights = _resample_weights(test["group_id"].to_numpy(), n_boot, seed)
    ones = np.ones((1, len(test)))
    stored = decode_png_arrays(test["image"])

    def scores(images: list[np.ndarray]) -> tuple[dict, dict]:
        pngs = pd.Series([encode_png(upload_preprocess(rgb, preprocess)) for rgb in images])
        probs = predict(pngs)
        point = {k: float(v[0]) for k, v in weighted_metrics(probs, labels, threshold, ones).items()}
        return point, weighted_metrics(probs, labels, threshold, weights)

    clean_point, clean_boot = scores(stored)
    rows = []
    for metric in METRICS:
        low, high = _interval(clean_boot[metric])
        rows.append(
            {"corruption": "clean", "kind": "none", "severity": 0, "metric": metric,
             "value": _num(clean_point[metric]), "ci_low": low, "ci_high": high,
             "clean": _num(clean_point[metric]), "drop": 0.0, "drop_ci_low": 0.0, "drop_ci_high": 0.0}
        )  # fmt: skip
    for done, name in enumerate(CORRUPTIONS, start=1):
        kind = "dermoscopy" if name in DERMOSCOPY_ARTEFACTS else "generic"
        for severity in SEVERITIES:
            images = [corrupt(rgb, name, severity, seed=seed, index=i) for i, rgb in enumerate(stored)]
            point, boot = scores(images)
            for metric in METRICS:
                low, high = _interval(boot[metric])
                drop_low, drop_high = _interval(clean_boot[metric] - boot[metric])
                rows.append(
                    {"corruption": name, "kind": kind, "severity": severity, "metric": metric,
                     "value": _num(point[metric]), "ci_low": low, "ci_high": high,
                     "clean": _num(clean_point[metric]), "drop": _num(clean_point[metric] - point[metric]),
                     "drop_ci_low": drop_low, "drop_ci_high": drop_high}
                )  # fmt: skip
        # a test set under the suite is minutes of inference on a CPU: a line per corruption
        accuracies = ", ".join(_fmt(row["value"]) for row in rows[-len(METRICS) * len(SEVERITIES) :: len(METRICS)])
        progress(
            f"evaluate: shift: {done}/{len(CORRUPTIONS)} {name}: balanced accuracy {accuracies} at severities "
            f"{', '.join(map(str, SEVERITIES))} ({time.perf_counter() - t0:.0f} s)"
        )
    table = pd.DataFrame(rows).assign(n=len(test))
    table.to_csv(out_dir / SHIFT_CSV, index=False)
    figure = shift_figure(table, out_dir / SHIFT_FIGURE)

    ba = table[(table["metric"] == "balanced_accuracy") & (table["severity"] > 0)].dropna(subset=["drop"])
    worst = ba.loc[ba["drop"].idxmax()] if len(ba) else None
    block: dict[str, Any] = {
        "n": int(len(test)),
        "corruptions": {name: ("dermoscopy" if name in DERMOSCOPY_ARTEFACTS else "generic") for name in CORRUPTIONS},
        "severities": list(SEVERITIES),
        "seed": seed,
        "reprocessed": "every image, clean included, through the upload preprocessing (data.preprocess)",
        "clean": {m: _num(clean_point[m]) for m in METRICS},
        "clean_stored": clean_stored or {},
        "table": SHIFT_CSV,
        "figure": figure,
        "worst": None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if worst is not None:
        block["worst"] = {
            "corruption": worst["corruption"],
            "severity": int(worst["severity"]),
            "balanced_accuracy": _num(worst["value"]),
            "drop": _num(worst["drop"]),
            "drop_ci_95": [worst["drop_ci_low"], worst["drop_ci_high"]],
        }
        progress(
            f"evaluate: shift: worst corruption {worst['corruption']} (severity {int(worst['severity'])}): balanced "
            f"accuracy {worst['value']:.3f} against {worst['clean']:.3f} clean, a drop of {worst['drop']:.3f} "
            f"(95% CI {_fmt(worst['drop_ci_low'])} to {_fmt(worst['drop_ci_high'])}); {len(CORRUPTIONS)} "
            f"corruptions x {len(SEVERITIES)} severities on {len(test)} test images in {block['seconds']:.0f} s, "
            f"table {out_dir / SHIFT_CSV}"
        )
    return block


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:.3f}"


def shift_figure(table: pd.DataFrame, path: Path) -> str:
    """Each metric against severity (0 = clean), one line per corruption, 95% lesion-bootstrap error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skinsynth.classify.figures import save_figure

    fig, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS), 4.5), sharey=True)
    clean = table[table["corruption"] == "clean"].set_index("metric")
    names = list(CORRUPTIONS)
    for ax, metric in zip(np.atleast_1d(axes), METRICS, strict=True):
        for i, name in enumerate(names):
            rows = table[(table["corruption"] == name) & (table["metric"] == metric)].sort_values("severity")
            rows = pd.concat([clean.loc[[metric]].reset_index(), rows], ignore_index=True)
            value = rows["value"].astype(float).to_numpy()
            low = rows["ci_low"].astype(float).to_numpy()
            high = rows["ci_high"].astype(float).to_numpy()
            yerr = np.nan_to_num(np.vstack([value - low, high - value]).clip(min=0))
            x = rows["severity"].to_numpy() + (i - (len(names) - 1) / 2) * 0.03  # keep the bars apart
            style = "--" if name in DERMOSCOPY_ARTEFACTS else "-"
            ax.errorbar(x, value, yerr=yerr, linestyle=style, marker="o", markersize=3, capsize=2, label=name)
        ax.set_xticks([0, *SEVERITIES], ["clean", *map(str, SEVERITIES)])
        ax.set_xlabel("severity")
        ax.set_title(metric.replace("_", " ") + " (test, 95% lesion-bootstrap CI)")
        ax.set_ylim(-0.02, 1.02)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)
