"""Estimated lesion groups for sources without lesion ids: likely views of one lesion, found by image similarity.

Every decodable image gets a 64-bit DCT perceptual hash (pHash: the signs of the lowest 8x8 DCT coefficients of a
32x32 grey thumbnail against their median; Zauner, "Implementation and benchmarking of perceptual image hash
functions", 2010; computed by the ``imagehash`` library). Images whose hashes differ in at most ``threshold`` bits
are joined (union-find, so chains join too). This finds re-encoded, rescaled, slightly shifted or re-exposed copies
of one photograph; distinct photographs of one lesion (another zoom, angle or visit) mostly differ as much as
different lesions do, so the groups are an estimate: they lower, not remove, the risk of a lesion in two splits.
The default threshold was calibrated on HAM10000, whose lesion ids are known (docs/stages/prepare.md).
"""

from __future__ import annotations

import io

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from skinsynth.data.splits import GroupJoiner

HASH_BITS = 64
_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (``np.bitwise_count`` is numpy >= 2 only; the project allows numpy 1.26)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    return _BYTE_BITS[values.view(np.uint8)].reshape(*values.shape, 8).sum(axis=-1)


def perceptual_hash(data: bytes) -> int | None:
    """The 64-bit pHash of an encoded image; None when it cannot be decoded (the worker quarantines it later)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            bits = imagehash.phash(image.convert("RGB")).hash.flatten()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming_pairs(hashes: np.ndarray, threshold: int, chunk: int = 2048) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, whose 64-bit hashes differ in at most ``threshold`` bits."""
    values = np.asarray(hashes, dtype=np.uint64)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(values), chunk):
        block = values[start : start + chunk]
        distance = _popcount(block[:, None] ^ values[None, :])
        rows, cols = np.nonzero(distance <= threshold)
        keep = cols > rows + start
        pairs += list(zip((rows[keep] + start).tolist(), cols[keep].tolist()))
    return pairs


def merge_similar_groups(frame: pd.DataFrame, threshold: int) -> tuple[pd.Series, list[list[str]]]:
    """Join the groups of images whose perceptual hashes lie within ``threshold`` bits of each other.

    Args:
        frame: columns ``image_id``, ``group_id``, ``phash`` (an int, or None for images that did not decode).
        threshold: the largest Hamming distance that joins two images.

    Returns:
        The new ``group_id`` per row (the smallest id among the joined groups) and the sets of images joined by
        similarity (each set sorted; only sets that span more than one former group).
    """
    joiner = GroupJoiner(frame["group_id"])
    hashed = frame[frame["phash"].notna()]
    groups = hashed["group_id"].tolist()
    hashes = np.array([int(h) for h in hashed["phash"]], dtype=np.uint64)
    for i, j in hamming_pairs(hashes, threshold):
        joiner.join(groups[i], groups[j])
    merged = frame["group_id"].map(joiner.find)
    sets = [
        sorted(members["image_id"])
        for _, members in frame.assign(merged=merged).groupby("merged", sort=True)
        if members["group_id"].nunique() > 1
    ]
    return merged, sets
