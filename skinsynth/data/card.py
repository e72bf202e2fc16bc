"""The data card of a prepared set, and its readable table for ``skinsynth data summary``."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from skinsynth import DISCLAIMER
from skinsynth.config import DataConfig, config_to_dict
from skinsynth.data.schema import CLASSES, SPLITS, TONES, age_band
from skinsynth.data.sources import SOURCE_INFO, SourceListing


def _counts(values: pd.Series, order: tuple[str, ...] | None = None) -> dict[str, int]:
    """Value counts as a dict: the ``order`` keys first (zeros included), then any others sorted."""
    counts = values.fillna("unknown").astype(str).value_counts()
    keys = [*(order or ()), *sorted(set(counts.index) - set(order or ()))]
    return {k: int(counts.get(k, 0)) for k in keys}


def build_data_card(
    good: pd.DataFrame,
    splits: pd.DataFrame,
    quarantine: pd.DataFrame,
    *,
    listing: SourceListing,
    cfg: DataConfig,
    duplicates: list[list[str]],
    grouping: str = "lesion_id",
    similar: list[list[str]] | None = None,
    ita_truth: pd.DataFrame | None,
    seconds: dict[str, float],
    engine: str,
) -> dict[str, Any]:
    """Counts that describe a prepared set (what a datasheet for datasets would ask; Gebru et al. 2021)."""
    with_split = good.merge(splits[["image_id", "split", "labelled"]], on="image_id", how="left")
    info = SOURCE_INFO[listing.name]
    card: dict[str, Any] = {
        "source": listing.name,
        "path": cfg.path,
        "licence": info["licence"],
        "citation": info["citation"],
        "simulated": listing.name == "phantom",
        "disclaimer": DISCLAIMER,
        "image_size": cfg.preprocess.size,
        "images": int(len(good)),
        "lesion_groups": int(good["group_id"].nunique()) if len(good) else 0,
        # lesion_id: from the source; estimated: joined by image similarity (skinsynth.data.grouping); image: none
        "grouping": grouping,
        "classes": _counts(good["dx"], CLASSES),
        "splits": _counts(with_split["split"], SPLITS),
        "labelled_train_images": int(with_split.loc[with_split["split"] == "train", "labelled"].sum()),
        "class_by_split": {s: _counts(with_split.loc[with_split["split"] == s, "dx"], CLASSES) for s in SPLITS},
        "tone": _counts(good["tone"], TONES),
        "tone_note": "estimated from ITA on non-lesion skin; a proxy, not a Fitzpatrick skin type",
        "sex": _counts(good["sex"]),
        "age_band": _counts(good["age"].map(age_band)),
        "localization": _counts(good["localization"]),
        "quarantined": int(len(quarantine)),
        "quarantine_reasons": _counts(quarantine["reason"].str.split(":").str[0]) if len(quarantine) else {},
        "exact_duplicate_sets": duplicates,
        "similar_image_sets": similar or [],
        "preprocess": config_to_dict(cfg.preprocess),
        "split_config": config_to_dict(cfg.split),
        "engine": engine,
        "seconds": seconds,
    }
    if ita_truth is not None and len(good):
        joined = good.merge(ita_truth, on="image_id", how="left").dropna(subset=["ita", "ita_true"])
        if len(joined):
            card["tone_estimate_check"] = {
                "images": int(len(joined)),
                "ita_mean_abs_error_deg": round(float(np.mean(np.abs(joined["ita"] - joined["ita_true"]))), 2),
                "tone_group_agreement": round(float(np.mean(joined["tone"] == joined["tone_true"])), 3),
            }
    return card


GROUPING_TEXT = {
    "lesion_id": "lesion ids from the source",
    "estimated": "ESTIMATED from image similarity (no lesion ids; views of one lesion may still sit in two splits)",
    "image": "one per image (no lesion ids; views of one lesion may sit in two splits)",
}


def _table(title: str, counts: dict[str, int], total: int | None = None) -> list[str]:
    total = total if total is not None else sum(counts.values())
    width = max([len(k) for k in counts] + [8])
    lines = [f"{title}:"]
    for key, n in counts.items():
        share = f"{100.0 * n / total:5.1f}%" if total else "    -"
        lines.append(f"  {key:<{width}}  {n:>7}  {share}")
    return lines


def format_data_card(card: dict[str, Any]) -> str:
    """Render a data card as the plain-text table printed by ``skinsynth data summary``."""
    lines = [
        f"source: {card['source']}"
        + ("  (SIMULATED phantom data, not clinical images)" if card.get("simulated") else ""),
        f"licence: {card['licence']}",
        f"cite: {card['citation']}",
        f"images: {card['images']} at {card['image_size']} px in {card['lesion_groups']} lesion groups; "
        f"quarantined: {card['quarantined']}",
        "lesion groups: " + GROUPING_TEXT.get(card.get("grouping", "lesion_id"), str(card.get("grouping"))),
        "",
    ]
    split_header = "  ".join(f"{s:>7}" for s in card["class_by_split"])
    lines.append(f"{'class':<8}  {'total':>7}  {split_header}")
    for dx, n in card["classes"].items():
        per_split = "  ".join(f"{card['class_by_split'][s].get(dx, 0):>7}" for s in card["class_by_split"])
        lines.append(f"{dx:<8}  {n:>7}  {per_split}")
    totals = "  ".join(f"{card['splits'].get(s, 0):>7}" for s in card["class_by_split"])
    lines.append(f"{'all':<8}  {card['images']:>7}  {totals}")
    lines.append(f"labelled train images: {card['labelled_train_images']} of {card['splits'].get('train', 0)}")
    lines.append("")
    lines += _table("estimated skin tone (ITA)", card["tone"], card["images"])
    lines.append(f"  note: {card['tone_note']}")
    if "tone_estimate_check" in card:
        check = card["tone_estimate_check"]
        lines.append(
            f"  phantom ground truth: mean |ITA error| {check['ita_mean_abs_error_deg']} deg, "
            f"tone group agreement {check['tone_group_agreement']:.1%} over {check['images']} images"
        )
    for key, title in (("sex", "sex"), ("age_band", "age band"), ("localization", "site")):
        if card.get(key):
            lines += _table(title, card[key], card["images"])
    if card["quarantined"]:
        lines += _table("quarantine reasons", card["quarantine_reasons"], card["quarantined"])
    if card.get("exact_duplicate_sets"):
        lines.append(f"byte-identical image sets merged into one lesion group: {len(card['exact_duplicate_sets'])}")
    if card.get("similar_image_sets"):
        lines.append(f"similar image sets joined into one estimated lesion group: {len(card['similar_image_sets'])}")
    lines.append("")
    lines.append(card["disclaimer"])
    return "\n".join(lines)
