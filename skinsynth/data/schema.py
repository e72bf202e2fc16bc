"""The data contract shared by every stage (see DESIGN.md, "Data contract").

Class codes and their order are fixed everywhere (HAM10000 / DermaMNIST order), so label ``i`` means the
same class in every shard, model and report.
"""

from __future__ import annotations

import pyarrow as pa

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_TO_LABEL: dict[str, int] = {dx: i for i, dx in enumerate(CLASSES)}
MALIGNANT: frozenset[str] = frozenset({"akiec", "bcc", "mel"})
CLASS_NAMES: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}

# Individual Typology Angle bins (Chardon et al. 1991; Del Bino & Bernerd 2013), lower bound inclusive.
TONE_BINS: tuple[tuple[str, float], ...] = (
    ("very_light", 55.0),
    ("light", 41.0),
    ("intermediate", 28.0),
    ("tan", 10.0),
    ("brown", -30.0),
    ("dark", float("-inf")),
)
TONES: tuple[str, ...] = tuple(name for name, _ in TONE_BINS)

SPLITS: tuple[str, ...] = ("train", "val", "test")

# One row per image. Synthetic provenance columns are null for real rows.
IMAGE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # PNG bytes at the prepared size
        pa.field("dx", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),  # lesion id: the unit of every split
        pa.field("source", pa.string(), nullable=False),
        pa.field("synthetic", pa.bool_(), nullable=False),
        pa.field("age", pa.float32()),
        pa.field("sex", pa.string()),
        pa.field("localization", pa.string()),
        pa.field("ita", pa.float32()),
        pa.field("tone", pa.string()),
        pa.field("fitzpatrick", pa.int8()),  # only where a source carries it
        pa.field("tone_true", pa.string()),  # phantom ground truth; null for real data
        pa.field("sha256", pa.string(), nullable=False),  # of the original file (or rendered phantom PNG)
        pa.field("width", pa.int32(), nullable=False),  # prepared size
        pa.field("height", pa.int32(), nullable=False),
        pa.field("generator_id", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("sampler", pa.string()),
        pa.field("steps", pa.int32()),
        pa.field("guidance", pa.float32()),
    ]
)
IMAGE_COLUMNS: tuple[str, ...] = tuple(IMAGE_SCHEMA.names)

SPLIT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("labelled", pa.bool_(), nullable=False),
        pa.field("fold", pa.int8()),  # k-fold index on train+val when requested, else null
    ]
)


def tone_from_ita(ita: float | None) -> str | None:
    """Bin an Individual Typology Angle (degrees) into the six ITA skin-tone groups; None stays None."""
    if ita is None or ita != ita:  # NaN
        return None
    for name, lower in TONE_BINS:
        if ita > lower:
            return name
    return TONE_BINS[-1][0]  # -inf itself


def age_band(age: float | None) -> str | None:
    """Decade-wide age band used by data cards and fairness reports (e.g. ``40-49``, ``80+``)."""
    if age is None or age != age:
        return None
    if age >= 80:
        return "80+"
    lo = int(age // 10) * 10
    return f"{lo}-{lo + 9}"
