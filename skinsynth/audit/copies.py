"""Near-copy detection: is a synthetic image one of the generator's training images, shifted, cropped and resized,
flipped or turned, recoloured or lightly blurred?

A plain pixel correlation sees only exact copies: a shift of a few pixels drops it below that of unrelated images.
The detector here is the retrieve-then-verify design of copy detection (Douze et al. 2021, "The 2021 image
similarity dataset and challenge"), on pixels as in Carlini et al. 2023 ("Extracting training data from diffusion
models") rather than learnt descriptors (Somepalli et al. 2023, "Diffusion art or digital forgery?"), which no
offline package ships for dermoscopy:

1. **Retrieval.** Every query's eight flips/quarter turns against every training image zoomed by 1, 1.12 and 1.25
   about its centre (an 80% crop resized back is a 1.25 zoom), by circular cross-correlation at 24 px through the
   FFT, over shifts up to a fifth of the side. The ``candidates`` best training images go on.
2. **Verification.** Normalised cross-correlation (``cv2.matchTemplate``, ``TM_CCOEFF_NORMED``) of the centre of the
   query (3/4 of its side) against each candidate at five zooms (0.8-1.25), at every placement, at the audit's
   resolution. The score of a query is its best verified correlation; its nearest training image is where it came.

Both stages compare band-passed (difference of Gaussians), per-channel standardised images. The band-pass removes the
layout every dermoscopy image shares - a dark blob on lighter skin made unrelated images correlate at 0.95 - and the
finest pixels, which light blur and resampling change; per-channel standardisation removes a colour jitter (gain and
offset per channel). What the detector calls a copy is set by :func:`calibrate`, on the data's own pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from skinsynth.audit.features import AuditError

NEAR_COPY_KINDS = ("shift", "crop", "flip_turn", "colour", "blur")
RETRIEVAL_SIDE = 24
RETRIEVAL_ZOOMS = (1.0, 1.12, 1.25)
VERIFY_ZOOMS = (0.8, 0.9, 1.0, 1.12, 1.25)


def dihedral_views(image: np.ndarray) -> list[np.ndarray]:
    """The eight flips/quarter turns of an (H, W, C) image (the generator trains on them, so a copy may be turned)."""
    views = []
    for turns in range(4):
        turned = np.rot90(image, turns)
        views += [np.ascontiguousarray(turned), np.ascontiguousarray(turned[:, ::-1])]
    return views


def zoom_about_centre(image: np.ndarray, zoom: float) -> np.ndarray:
    """The image magnified by ``zoom`` (>= 1) about its centre, cropped back to its side."""
    side = image.shape[0]
    n = int(round(side * zoom))
    if n == side:
        return image
    zoomed = cv2.resize(image, (n, n), interpolation=cv2.INTER_LINEAR)
    start = (n - side) // 2
    return zoomed[start : start + side, start : start + side]


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(axis=(0, 1))) / (x.std(axis=(0, 1)) + 1e-3)


def band_pass(image: np.ndarray, fine: float, coarse: float) -> np.ndarray:
    """float32 difference of Gaussians (sigmas in pixels), each channel standardised: what the detector compares."""
    x = image.astype(np.float32)
    x = cv2.GaussianBlur(x, (0, 0), fine)
    return _standardise(x - cv2.GaussianBlur(x, (0, 0), coarse))


def _resized(image: np.ndarray, side: int) -> np.ndarray:
    if image.shape[0] == side:
        return image
    interpolation = cv2.INTER_AREA if side < image.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(image, (side, side), interpolation=interpolation)


def _retrieval_image(image: np.ndarray) -> np.ndarray:
    # sigmas scaled from the verification's (1 and 4 px at 64 px)
    return band_pass(_resized(image, RETRIEVAL_SIDE), 0.5, 1.5)


def _spectra(images: Sequence[np.ndarray]) -> torch.Tensor:
    """rfft2 of unit-norm (N, C, S, S) band-passed images: their circular cross-correlation is then a Pearson
    correlation at every shift."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    x = x / x.flatten(1).norm(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    return torch.fft.rfft2(x)


class CopyDetector:
    """Scores how closely each query reproduces a training image, up to the five near-copy edits above.

    Args:
        train_images: uint8 (N, H, W, 3), square; the generator's training images.
        side: verification resolution; larger images are resized down to it (shifts are searched in its pixels).
        candidates: training images verified per query after retrieval.
        chunk: training images per FFT block (bounds memory to about ``chunk`` x 8 x 3 x 24^2 floats).
        progress: receives a line every ``progress_every_s`` seconds of searching (images searched, rate).
    """

    def __init__(
        self,
        train_images: np.ndarray,
        side: int = 64,
        candidates: int = 24,
        chunk: int = 2048,
        progress: Callable[[str], None] | None = None,
        progress_every_s: float = 30.0,
    ):
        if len(train_images) == 0:
            raise AuditError("no training images to compare with")
        self.side = min(side, train_images.shape[1])
        self.candidates = min(candidates, len(train_images))
        self.chunk = chunk
        self.train = np.stack([_resized(img, self.side) for img in train_images])
        self.fine, self.coarse = self.side / 64, 4 * self.side / 64
        # the training images' spectra, zoomed (index z * N + i)
        self._index = _spectra(
            [_retrieval_image(zoom_about_centre(img, z)) for z in RETRIEVAL_ZOOMS for img in self.train]
        )
        self._zoomed: dict[int, list[np.ndarray]] = {}  # training image -> its band-passed zooms, as verified
        self.progress, self.progress_every_s = progress, progress_every_s
        self.searched, self._started, self._reported = 0, time.perf_counter(), time.perf_counter()
        self.cache_size = 2048
        s = RETRIEVAL_SIDE
        reach = s // 5
        self._shifts = torch.as_tensor(list(range(reach + 1)) + list(range(s - reach, s)))

    def _retrieve(self, query: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Per training image: the best circular correlation over views, zooms and shifts, and the two best views."""
        views = _spectra([_retrieval_image(v) for v in dihedral_views(query)])  # (8, C, S, S//2+1)
        n = len(self.train)
        best_per_view = torch.empty(len(RETRIEVAL_ZOOMS) * n, 8)
        for start in range(0, len(self._index), self.chunk):
            block = self._index[start : start + self.chunk]
            product = torch.einsum("vcxy,ncxy->vnxy", views.conj(), block)  # summed over channels
            corr = torch.fft.irfft2(product, s=(RETRIEVAL_SIDE, RETRIEVAL_SIDE))
            corr = corr[:, :, self._shifts][:, :, :, self._shifts]
            best_per_view[start : start + len(block)] = corr.flatten(2).amax(dim=2).T
        per_view = best_per_view.view(len(RETRIEVAL_ZOOMS), n, 8).amax(dim=0)  # (N, 8)
        return per_view.amax(dim=1), per_view.topk(2, dim=1).indices

    def _verification_images(self, i: int) -> list[np.ndarray]:
        if i not in self._zoomed:
            if len(self._zoomed) >= self.cache_size:  # the oldest goes: all of HAM10000's would take ~2 GB
                del self._zoomed[next(iter(self._zoomed))]
            img = self.train[i]
            self._zoomed[i] = [
                band_pass(_resized(img, int(round(self.side * z))), self.fine, self.coarse) for z in VERIFY_ZOOMS
            ]
        return self._zoomed[i]

    def verify(self, query: np.ndarray, i: int, views: Sequence[int] = range(8)) -> float:
        """Best normalised cross-correlation of the query's centre (the given dihedral views) with training image
        ``i`` at every zoom and placement."""
        query = _resized(query, self.side)
        margin = self.side // 8
        best = -1.0
        all_views = dihedral_views(query)
        for v in views:
            template = band_pass(all_views[v], self.fine, self.coarse)[margin:-margin, margin:-margin]
            template = np.ascontiguousarray(template)
            for reference in self._verification_images(i):
                if reference.shape[0] >= template.shape[0]:
                    best = max(best, float(cv2.matchTemplate(reference, template, cv2.TM_CCOEFF_NORMED).max()))
        return best

    def score(self, queries: np.ndarray, exclude: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(best verified correlation, index of that training image) per query.

        ``exclude[q]``: a training index query ``q`` may not match (itself, when a training image is the query), or
        -1.
        """
        scores, nearest = np.empty(len(queries)), np.zeros(len(queries), dtype=np.int64)
        for q, query in enumerate(queries):
            query = _resized(query, self.side)
            retrieved, top_views = self._retrieve(query)
            if exclude is not None and exclude[q] >= 0:
                retrieved[exclude[q]] = -float("inf")
            best, where = -1.0, 0
            for i in torch.topk(retrieved, self.candidates).indices.tolist():
                value = self.verify(query, i, top_views[i].tolist())
                if value > best:
                    best, where = value, i
            scores[q], nearest[q] = best, where
            self.searched += 1
            now = time.perf_counter()
            if self.progress is not None and now - self._reported >= self.progress_every_s:
                self._reported = now
                self.progress(
                    f"near-copy search: {self.searched} images searched in {len(self.train)} training images "
                    f"({self.searched / (now - self._started):.1f}/s)"
                )
        return scores, nearest


def plant_near_copies(images: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """Near-copies of ``images`` (uint8, N x H x W x 3) of one kind, with sizes relative to a 64 px side:

    - ``shift``: 4-8 px along the longer axis, the uncovered border reflected;
    - ``crop``: an 80% square at a random place, resized back;
    - ``flip_turn``: one of the seven non-identity flips/quarter turns;
    - ``colour``: each channel's gain within 15% and offset within 15 grey levels;
    - ``blur``: a Gaussian blur of sigma 0.6-1.2 px.
    """
    if kind not in NEAR_COPY_KINDS:
        raise ValueError(f"unknown near-copy kind {kind!r}; known: {', '.join(NEAR_COPY_KINDS)}")
    rng = np.random.default_rng(seed)
    out = []
    for img in images:
        side = img.shape[0]
        unit = side / 64
        if kind == "shift":
            dx, dy = rng.uniform(4, 8) * unit * rng.choice([-1, 1]), rng.uniform(-8, 8) * unit
            if rng.random() < 0.5:
                dx, dy = dy, dx
            shift = np.float32([[1, 0, round(dx)], [0, 1, round(dy)]])
            x = cv2.warpAffine(img, shift, (side, side), borderMode=cv2.BORDER_REFLECT)
        elif kind == "crop":
            crop = int(round(0.8 * side))
            ox, oy = rng.integers(0, side - crop + 1, size=2)
            x = cv2.resize(img[oy : oy + crop, ox : ox + crop], (side, side), interpolation=cv2.INTER_LINEAR)
        elif kind == "flip_turn":
            x = dihedral_views(img)[int(rng.integers(1, 8))]
        elif kind == "colour":
            x = img.astype(np.float32) * rng.uniform(0.85, 1.15, 3) + rng.uniform(-15, 15, 3)
        else:
            x = cv2.GaussianBlur(img.astype(np.float32), (0, 0), rng.uniform(0.6, 1.2) * unit)
        out.append(np.clip(np.ascontiguousarray(x), 0, 255).astype(np.uint8))
    return np.stack(out)


def _rate(hits: np.ndarray) -> dict[str, Any]:
    from skinsynth.audit.privacy import binomial_interval

    k, n = int(hits.sum()), int(len(hits))
    return {"rate": k / n if n else None, "ci": binomial_interval(k, n), "n": n}


def calibrate(
    detector: CopyDetector,
    train_groups: np.ndarray,
    negative_scores: np.ndarray,
    *,
    fpr: float,
    max_pairs: int,
    plants_per_kind: int,
    seed: int,
    min_pairs: int = 20,
) -> dict[str, Any]:
    """The copy threshold and its rates, on the data's own pairs.

    - **Threshold**: the (1 - ``fpr``) quantile of ``negative_scores``, the scores of held-out real images - other
      lesions than any training image, by the lesion-grouped split: the nearest pairs from different lesions. The
      lowest threshold whose false-positive rate stays within ``fpr`` is the one that catches the most copies.
    - **Same-lesion pairs** (the true-positive rate): up to ``max_pairs`` training images whose lesion has another
      training image, each searched against the training set without itself; different images of one lesion are
      natural near-copies. Sources without such pairs fall back to planted near-copies for this rate, and say so.
    - **Planted near-copies**: ``plants_per_kind`` training images of each kind in :data:`NEAR_COPY_KINDS`, the rate
      at which each kind is caught (what the threshold means for edits a generator could make).
    """
    if len(negative_scores) == 0:
        raise AuditError("no held-out images to calibrate the copy threshold on")
    threshold = float(np.quantile(negative_scores, 1.0 - fpr, method="higher"))
    rng = np.random.default_rng(seed)
    report: dict[str, Any] = {
        "threshold": threshold,
        "fpr_target": fpr,
        "negatives": {
            "what": "held-out real images (lesions the generator never saw) against the training set",
            **_rate(negative_scores >= threshold),
        },
    }
    groups = np.asarray(train_groups)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    paired = np.flatnonzero(counts[inverse] >= 2)
    if len(paired) >= min_pairs:
        chosen = np.sort(rng.choice(paired, size=min(max_pairs, len(paired)), replace=False))
        scores, nearest = detector.score(detector.train[chosen], exclude=chosen)
        same = groups[nearest] == groups[chosen]
        report["positives"] = {
            "what": "training images against the other images of the training set: same-lesion pairs",
            "source": "same_lesion_pairs",
            "nearest_is_same_lesion": float(same.mean()),
            **_rate(scores >= threshold),
        }
        report["positive_scores"] = scores.tolist()
    plant_rates, plant_scores = {}, []
    for k, kind in enumerate(NEAR_COPY_KINDS):
        sources = rng.choice(len(detector.train), size=min(plants_per_kind, len(detector.train)), replace=False)
        scores, nearest = detector.score(plant_near_copies(detector.train[sources], kind, seed + k))
        plant_rates[kind] = {**_rate(scores >= threshold), "found_source": float((nearest == sources).mean())}
        plant_scores.append(scores)
    report["planted"] = plant_rates
    if "positives" not in report:
        scores = np.concatenate(plant_scores)
        report["positives"] = {
            "what": f"planted near-copies of training images ({', '.join(NEAR_COPY_KINDS)}): fewer than "
            f"{min_pairs} training images share a lesion, so there are no same-lesion pairs to calibrate on",
            "source": "planted_near_copies",
            **_rate(scores >= threshold),
        }
        report["positive_scores"] = scores.tolist()
    return report
