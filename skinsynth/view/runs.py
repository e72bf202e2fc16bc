"""What the viewer reads from run directories, as plain Python (no Streamlit), so it can be unit-tested.

Every reader returns ``None`` when its file is absent (a stage not run yet: the page says which command makes it)
and raises :class:`UnreadableFile`, naming the file, when a file is there but cannot be used (truncated JSON, a CSV
without the expected columns, a damaged Parquet shard). Nothing here computes anything heavy: it reads the outputs
the stages wrote.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from skinsynth.core.compute import COMPUTE, total_compute
from skinsynth.core.rundir import (
    AUDIT_FOLDER,
    AUDIT_REPORT,
    DATA_CARD,
    DATA_FOLDER,
    EVAL_FOLDER,
    EVAL_REPORT,
    GENERATOR_CARD,
    GENERATOR_FOLDER,
    MANIFEST,
    MODEL_WEIGHTS,
    MODELS_FOLDER,
    NAMED_KINDS,
    STAGE_FOLDERS,
    SWEEP_TRIALS,
    SWEEP_TRIALS_PARQUET,
    SYNTHETIC_CARD,
    SYNTHETIC_FOLDER,
    TUNE_FOLDER,
    layout,
    stage_manifests,
    stale_stages,
)
from skinsynth.data.schema import CLASSES
from skinsynth.errors import SkinsynthError

# the provenance a synthetic row carries (DESIGN.md, data contract)
PROVENANCE_COLUMNS = ["generator_id", "seed", "sampler", "steps", "guidance"]
TRIALS_REQUIRED_COLUMNS = ("trial_id", "best_val_balanced_accuracy")


DEFAULT_ENDPOINT = "http://127.0.0.1:8000"


def viewer_settings(argv: list[str], environ: Mapping[str, str]) -> tuple[Path, str]:
    """``--runs`` and ``--endpoint`` from the script arguments, else from the environment, else the defaults."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--runs", default=environ.get("SKINSYNTH_RUNS", "runs"))
    parser.add_argument("--endpoint", default=environ.get("SKINSYNTH_ENDPOINT", DEFAULT_ENDPOINT))
    known, _unknown = parser.parse_known_args(argv)
    return Path(known.runs).expanduser().resolve(), known.endpoint


class ViewError(SkinsynthError):
    """A viewer setting the user can fix (a ``--runs`` folder that does not exist)."""


class UnreadableFile(SkinsynthError):
    """A run-directory file that exists but cannot be read or lacks what the viewer needs."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Stage:
    """One stage folder of a run directory, the file that shows it finished, and the command that makes it."""

    kind: str  # the run layout's stage kind (``skinsynth.core.rundir.STAGE_FOLDERS``)
    done_marker: str  # a glob under the run directory
    command: str  # with {run} for the run directory

    @property
    def folder(self) -> str:
        return STAGE_FOLDERS[self.kind]

    @property
    def name(self) -> str:
        """The stage's row in the viewer: its folder's name."""
        return self.folder

    @property
    def named(self) -> bool:
        """One folder per model / evaluation / sweep under the stage folder."""
        return self.kind in NAMED_KINDS

    def how_to_make(self, run_dir: Path) -> str:
        """The command that produces this stage for ``run_dir``."""
        return self.command.format(run=run_dir)


STAGES: tuple[Stage, ...] = (
    Stage("data", f"{DATA_FOLDER}/{DATA_CARD}", "skinsynth data prepare --out {run}"),
    Stage("generator", f"{GENERATOR_FOLDER}/{GENERATOR_CARD}", "skinsynth generate train --out {run}"),
    Stage("synthetic", f"{SYNTHETIC_FOLDER}/{SYNTHETIC_CARD}", "skinsynth generate sample --out {run}"),
    Stage("audit", f"{AUDIT_FOLDER}/{AUDIT_REPORT}", "skinsynth audit {run}"),
    Stage("model", f"{MODELS_FOLDER}/*/{MODEL_WEIGHTS}", "skinsynth train --out {run}"),
    Stage("eval", f"{EVAL_FOLDER}/*/{EVAL_REPORT}", "skinsynth evaluate --out {run}"),
    # the Parquet table is written when a sweep ends, just before the CSV; its trial log (trials.jsonl) grows from its
    # first trial on, so a "trials.*" glob showed a running sweep as done
    Stage("sweep", f"{TUNE_FOLDER}/*/{SWEEP_TRIALS_PARQUET}", "skinsynth tune --config EXPERIMENT.yaml --out {run}"),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
STAGE_BY_KIND = {stage.kind: stage for stage in STAGES}


def missing_message(stage_name: str, run_dir: Path, what: str | None = None) -> str:
    """One line saying a stage's output is absent and which command makes it (``stage_name``: the viewer's row,
    ``tune``, or the run layout's kind, ``sweep``)."""
    stage = STAGE_BY_NAME.get(stage_name) or STAGE_BY_KIND[stage_name]
    return f"No {what or stage.folder + '/'} in {run_dir}: run `{stage.how_to_make(run_dir)}`."


# --- reading files ------------------------------------------------------------------------------------------------


def load_json(path: Path) -> Any | None:
    """A JSON file's content, or ``None`` when the file is absent.

    Raises:
        UnreadableFile: the file exists but is not valid JSON (e.g. truncated by a killed writer) or unreadable.
    """
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UnreadableFile(path, f"not valid JSON ({err})") from err


def load_json_object(path: Path) -> dict[str, Any] | None:
    """:func:`load_json` for files that must hold a JSON object (reports, cards, manifests)."""
    value = load_json(path)
    if value is not None and not isinstance(value, dict):
        raise UnreadableFile(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def load_yaml_text(path: Path) -> str | None:
    """A YAML file's text (for display), or ``None`` when absent; raises :class:`UnreadableFile` when unparsable."""
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UnreadableFile(path, f"not valid YAML ({err})") from err
    return text


def load_table(path: Path, required_columns: tuple[str, ...] = ()) -> pd.DataFrame | None:
    """A CSV or Parquet table, or ``None`` when absent.

    Args:
        path: ``*.csv`` or ``*.parquet``.
        required_columns: columns the caller needs; a table without them is unreadable for the viewer (garbage in a
            CSV still parses, as one odd column).

    Raises:
        UnreadableFile: unparsable, or lacking a required column.
    """
    if not path.is_file():
        return None
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as err:  # pandas/pyarrow raise many types for damaged files; all mean the same to a reader
        raise UnreadableFile(path, f"cannot be read as a table ({type(err).__name__}: {err})") from err
    missing = [column for column in required_columns if column not in table.columns]
    if missing:
        raise UnreadableFile(path, f"lacks the column(s) {missing}; found {list(table.columns)[:8]}")
    return table


# --- experiments and stages ---------------------------------------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    """A folder with a resolved ``config.yaml`` or any stage folder."""
    return path.is_dir() and (layout(path).config.is_file() or any((path / s.folder).is_dir() for s in STAGES))


def find_experiments(runs_root: Path) -> list[Path]:
    """The run directories under ``runs_root`` (or ``runs_root`` itself when it is one), sorted by name.

    Raises:
        ViewError: ``runs_root`` is not a folder.
    """
    if not runs_root.is_dir():
        raise ViewError(f"runs folder does not exist: {runs_root} (pass --runs with a folder of run directories)")
    if is_run_dir(runs_root):
        return [runs_root]
    return sorted(child for child in runs_root.iterdir() if is_run_dir(child))


@dataclass
class StageStatus:
    """Whether a stage's outputs are there, when it was made and how long it took (where recorded)."""

    stage: Stage
    done: bool
    created: str | None = None
    seconds: float | None = None
    detail: str = ""
    problems: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # why (and how to refresh), one line per stale stage
    configs: dict[str, Any] = field(default_factory=dict)  # folder name -> the resolved config its manifest holds


def _stage_dirs(run_dir: Path, stage: Stage) -> list[Path]:
    """The folders holding a stage's manifest: the stage folder, or one per model / sweep under it."""
    if stage.named:
        base = run_dir / stage.folder
        return sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    return [run_dir / stage.folder]


def _recorded_seconds(run_dir: Path, stage: Stage) -> float | None:
    """The duration a stage's own outputs record (data card, generator card, synthetic card, audit and eval
    reports); ``None`` where the stage records none."""
    run = layout(run_dir)
    if stage.kind == "data":
        card = load_json_object(run.data_card) or {}
        return (card.get("seconds") or {}).get("total")
    if stage.kind == "generator":
        card = load_json_object(run.generator_card) or {}
        return (card.get("training") or {}).get("seconds")
    if stage.kind == "synthetic":
        return (load_json_object(run.synthetic_card) or {}).get("seconds")
    if stage.kind == "audit":
        return (load_json_object(run.audit_report) or {}).get("seconds")
    if stage.kind == "eval":
        seconds = [(load_json_object(d / EVAL_REPORT) or {}).get("seconds") for d in _stage_dirs(run_dir, stage)]
        seconds = [s for s in seconds if s is not None]
        return sum(seconds) if seconds else None
    return None


def stage_statuses(run_dir: Path) -> list[StageStatus]:
    """The status of every stage of ``run_dir``; unreadable files become ``problems``, never exceptions."""
    stale_by_row: dict[str, list[str]] = {}
    for stale in stale_stages(run_dir):
        stale_by_row.setdefault(STAGE_BY_KIND[stale.stage.partition(":")[0]].name, []).append(stale.describe())
    statuses = []
    for stage in STAGES:
        status = StageStatus(stage, done=bool(list(run_dir.glob(stage.done_marker))))
        status.stale = stale_by_row.get(stage.name, [])
        created = []
        for folder in _stage_dirs(run_dir, stage):
            try:
                manifest = load_json_object(folder / MANIFEST) or {}
            except UnreadableFile as err:
                status.problems.append(str(err))
                continue
            if manifest.get("created"):
                created.append(manifest["created"])
            if manifest.get("config"):
                status.configs[folder.name] = manifest["config"]
        status.created = max(created) if created else None
        try:
            status.seconds = _recorded_seconds(run_dir, stage)
        except UnreadableFile as err:
            status.problems.append(str(err))
        if stage.named:
            status.detail = ", ".join(p.name for p in _stage_dirs(run_dir, stage))
        statuses.append(status)
    return statuses


def compute_table(run_dir: Path) -> pd.DataFrame | None:
    """Each stage's compute and energy as its manifest recorded them when it last ran (skinsynth.core.compute): one
    row per stage folder (``model:classifier``, ...), then a TOTAL row (sums; peak memory: the highest). None when
    no stage recorded any."""
    rows = []
    for stage, manifest in stage_manifests(run_dir).items():
        figures = manifest.get(COMPUTE)
        if isinstance(figures, dict):
            rows.append({"stage": stage, **figures})
    if not rows:
        return None
    total = total_compute(rows)
    methods = sorted({str(r["energy_method"]) for r in rows if r.get("energy_method")})
    rows.append({"stage": "TOTAL", **total, "energy_method": "; ".join(methods)})

    def number(value: Any, scale: float = 1.0) -> float | None:
        return None if value is None else float(value) * scale

    return pd.DataFrame(
        [
            {
                "stage": r["stage"],
                "wall s": number(r.get("wall_s")),
                "CPU s": number(r.get("cpu_s")),
                "GPU s": number(r.get("gpu_s")),
                "peak MB": number(r.get("peak_rss_mb")),
                "energy Wh": number(r.get("energy_kwh"), 1000),
                "CO2e g": number(r.get("co2e_kg"), 1000),
                "g/kWh": number(r.get("carbon_intensity_g_per_kwh")),
                "GPU": r.get("gpu_model") or "",
                "energy measured by": r.get("energy_method") or "",
            }
            for r in rows
        ]
    )


# --- data and synthetic images ------------------------------------------------------------------------------------


def read_image_index(images_dir: Path, extra_columns: list[str] | None = None) -> pd.DataFrame | None:
    """The id, class and ``extra_columns`` of every row of the Parquet shards in ``images_dir`` (no image bytes).

    Raises:
        UnreadableFile: a shard cannot be read.
    """
    shards = sorted(images_dir.glob("*.parquet")) if images_dir.is_dir() else []
    if not shards:
        return None
    frames = []
    for shard in shards:
        try:
            schema = pq.read_schema(shard)
            wanted = ["image_id", "dx", *[c for c in extra_columns or [] if c in schema.names]]
            frames.append(pq.read_table(shard, columns=wanted).to_pandas())
        except Exception as err:  # a damaged shard: name it, keep the others out of a half-read index
            raise UnreadableFile(shard, f"cannot be read as Parquet ({type(err).__name__}: {err})") from err
    return pd.concat(frames, ignore_index=True)


def pick_per_class(index: pd.DataFrame, per_class: int, classes: list[str] | None = None) -> pd.DataFrame:
    """The first ``per_class`` rows (by ``image_id``) of each class, in the fixed class order."""
    rows = index.sort_values("image_id")
    picked = [rows[rows["dx"] == dx].head(per_class) for dx in classes or CLASSES]
    picked = [frame for frame in picked if not frame.empty]
    return pd.concat(picked, ignore_index=True) if picked else rows.head(0)


def read_image_bytes(images_dir: Path, image_ids: list[str]) -> dict[str, bytes]:
    """PNG bytes of the given ids from the shards in ``images_dir`` (the id filter is pushed into the read).

    Raises:
        UnreadableFile: the shards cannot be read.
    """
    if not image_ids:
        return {}
    try:
        table = pq.read_table(
            images_dir,
            columns=["image_id", "image"],
            filters=pc.field("image_id").isin(pa.array(image_ids, pa.string())),
        )
    except Exception as err:
        raise UnreadableFile(images_dir, f"cannot read images ({type(err).__name__}: {err})") from err
    return dict(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()))


def split_counts(splits: pd.DataFrame) -> pd.DataFrame:
    """Images per split, and how many of them are labelled (``splits.parquet``)."""
    labelled = splits["labelled"] if "labelled" in splits.columns else pd.Series(True, index=splits.index)
    table = splits.assign(labelled=labelled.astype(bool)).groupby("split")["labelled"].agg(["size", "sum"])
    table.columns = ["images", "labelled"]
    known = ("train", "val", "test")
    order = [s for s in known if s in table.index] + [s for s in table.index if s not in known]
    return table.loc[order].reset_index()


def card_distribution(card: dict[str, Any], key: str) -> pd.DataFrame | None:
    """One distribution of a data card (``classes``, ``tone``, ``sex``, ``age_band``, ``localization``) as a
    two-column table, or ``None`` when the card has none."""
    counts = card.get(key)
    if not isinstance(counts, dict) or not counts:
        return None
    return pd.DataFrame({key: list(counts), "images": list(counts.values())})


def provenance_caption(row: dict[str, Any]) -> str:
    """A synthetic image's provenance in one caption line."""
    parts = [f"{column} {row[column]}" for column in PROVENANCE_COLUMNS if column in row and pd.notna(row[column])]
    return "synthetic · " + ", ".join(parts)


# --- audit ---------------------------------------------------------------------------------------------------------

FIDELITY_FIELDS = (
    "n",
    "fid",
    "kid_mean",
    "kid_std",
    "precision",
    "recall",
    "density",
    "coverage",
    "floor_n",
    "fid_floor",
    "kid_floor_mean",
    "kid_floor_std",
    "n_real_available",
    "n_synthetic_available",
)
# reports written before figures were compared at matched n: their nearest column under the old name
_FIDELITY_OLD_NAMES = {
    "fid_floor": "fid_real_train_vs_held_out",
    "n_real_available": "n_real",
    "n_synthetic_available": "n_synthetic",
}
PER_CLASS_FIDELITY_FIELDS = ("n", "small", "fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage")


def fidelity_table(report: dict[str, Any]) -> pd.DataFrame:
    """One row per feature extractor: FID/KID (with KID's std), precision/recall/density/coverage at the matched n,
    and the floor a generator can reach with these features: the FID/KID of real training images against held-out
    real images at ``floor_n`` (= n unless the held-out set is smaller); then the counts the n was drawn from."""
    rows = []
    for name, block in (report.get("fidelity") or {}).items():
        row = {"extractor": name}
        for key in FIDELITY_FIELDS:
            row[key] = block.get(key, block.get(_FIDELITY_OLD_NAMES.get(key, key)))
        rows.append(row)
    return pd.DataFrame(rows)


def fidelity_per_class_table(report: dict[str, Any], extractor: str) -> pd.DataFrame:
    """Per-class fidelity of one extractor at matched n per class: classes under 50 images per side are ``small``
    and carry KID alone (FID withheld) with their note."""
    per_class = ((report.get("fidelity") or {}).get(extractor) or {}).get("per_class") or {}
    table = pd.DataFrame([{"class": dx, **values} for dx, values in per_class.items()])
    if table.empty:
        return table
    first = ["class", *(c for c in PER_CLASS_FIDELITY_FIELDS if c in table)]
    return table[first + [c for c in table.columns if c not in first]]


def utility_table(utility: dict[str, Any]) -> pd.DataFrame:
    """The Classification Accuracy Score arms (synthetic only vs count-matched real only) side by side."""
    rows = []
    for arm in ("synthetic_only", "real_only"):
        block = utility.get(arm) or {}
        rows.append(
            {
                "trained on": arm.replace("_", " "),
                "n_train": block.get("n_train"),
                "balanced_accuracy": block.get("balanced_accuracy"),
                "macro_auroc": block.get("macro_auroc"),
                "note": block.get("reason", ""),
            }
        )
    return pd.DataFrame(rows)


def membership_attacks(privacy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's membership attacks by name (``loss``, ``pia``); a report written before the second attack held
    one attack's figures directly, shown as ``loss``."""
    block = privacy.get("membership_inference") or {}
    if "auc" in block:
        return {"loss": block}
    return {name: attack for name, attack in block.items() if isinstance(attack, dict)}


def _bounds(ci: Any) -> tuple[Any, Any]:
    return (ci[0], ci[1]) if isinstance(ci, list) and len(ci) == 2 else (None, None)


def _attack_row(attack: dict[str, Any]) -> dict[str, Any]:
    auc_low, auc_high = _bounds(attack.get("auc_ci"))
    tpr_low, tpr_high = _bounds(attack.get("tpr_at_1pct_fpr_ci"))
    return {
        "auc": attack.get("auc"),
        "auc_low": auc_low,
        "auc_high": auc_high,
        "tpr_at_1pct_fpr": attack.get("tpr_at_1pct_fpr"),
        "tpr_low": tpr_low,
        "tpr_high": tpr_high,
        "n_members": attack.get("n_members"),
        "n_non_members": attack.get("n_non_members"),
    }


def membership_table(privacy: dict[str, Any]) -> pd.DataFrame:
    """One row per membership attack: AUC and TPR at 1% FPR with their 95% bounds, the counts, the seconds it took
    and the method (0.5 AUC = the attack tells members from non-members no better than chance)."""
    return pd.DataFrame(
        [
            {"attack": name, **_attack_row(attack), "seconds": attack.get("seconds"), "method": attack.get("method")}
            for name, attack in membership_attacks(privacy).items()
        ]
    )


def membership_per_class_table(privacy: dict[str, Any]) -> pd.DataFrame:
    """One row per attack and class, rarest class first as the report lists them; a class with too few members or
    non-members has its counts and the reason instead of figures."""
    rows = []
    for name, attack in membership_attacks(privacy).items():
        for dx, entry in (attack.get("per_class") or {}).items():
            rows.append({"attack": name, "class": dx, **_attack_row(entry), "note": entry.get("reason", "")})
    return pd.DataFrame(rows)


# --- study (tune) --------------------------------------------------------------------------------------------------


def find_sweeps(run_dir: Path) -> list[Path]:
    """Sweep folders under ``RUN_DIR/tune`` that hold a trials table (CSV or Parquet)."""
    tune_dir = layout(run_dir).sweeps
    if not tune_dir.is_dir():
        return []
    return sorted(
        d
        for d in tune_dir.iterdir()
        if d.is_dir() and ((d / SWEEP_TRIALS).is_file() or (d / SWEEP_TRIALS_PARQUET).is_file())
    )


@dataclass
class TrialsRead:
    """A sweep's trials table, where it came from, and what went wrong reading the preferred file."""

    table: pd.DataFrame | None
    source: Path | None
    problems: list[str]


def read_trials(sweep_dir: Path) -> TrialsRead:
    """``trials.csv`` (what users open), else ``trials.parquet`` (the same rows plus checkpoint paths).

    A damaged ``trials.csv`` is reported in ``problems`` and the Parquet copy is used when it reads.
    """
    problems = []
    for name in (SWEEP_TRIALS, SWEEP_TRIALS_PARQUET):
        path = sweep_dir / name
        try:
            table = load_table(path, TRIALS_REQUIRED_COLUMNS)
        except UnreadableFile as err:
            problems.append(str(err))
            continue
        if table is not None:
            return TrialsRead(table.drop(columns=["checkpoint_path"], errors="ignore"), path, problems)
    return TrialsRead(None, None, problems)


def summary_metrics(summary: pd.DataFrame) -> list[str]:
    """The metrics of a grid's ``summary.csv`` (columns ``<metric>_mean`` with a ``<metric>_std`` beside them)."""
    return [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean") and f"{c[:-5]}_std" in summary.columns]


def summary_keys(summary: pd.DataFrame) -> list[str]:
    """The swept config keys of a ``summary.csv`` (every column that is not a metric statistic)."""
    stats = {f"{m}_{s}" for m in summary_metrics(summary) for s in ("mean", "std", "count")}
    return [c for c in summary.columns if c not in stats]


def error_bar_frame(summary: pd.DataFrame, x_key: str, metric: str) -> pd.DataFrame:
    """Mean ± sample standard deviation of ``metric`` per value of ``x_key`` (one series per combination of the
    other swept keys), ready to plot: ``x, series, mean, low, high, n``. A cell run with one seed has no spread and
    gets a zero-length bar."""
    others = [k for k in summary_keys(summary) if k != x_key]
    std = summary[f"{metric}_std"].fillna(0.0)
    frame = pd.DataFrame(
        {
            "x": summary[x_key].astype(float),
            "series": summary[others].astype(str).agg(", ".join, axis=1) if others else "all",
            "mean": summary[f"{metric}_mean"],
            "low": summary[f"{metric}_mean"] - std,
            "high": summary[f"{metric}_mean"] + std,
            "n": summary.get(f"{metric}_count"),
        }
    )
    return frame.sort_values(["series", "x"]).reset_index(drop=True)


# --- evaluation ----------------------------------------------------------------------------------------------------

HEADLINE_METRICS = ("balanced_accuracy", "macro_auroc", "malignant_auroc", "macro_f1", "accuracy", "ece")


def find_evaluations(run_dir: Path) -> list[Path]:
    """``RUN_DIR/eval/<model>`` folders (with or without a readable report)."""
    eval_dir = layout(run_dir).evaluations
    return sorted(d for d in eval_dir.iterdir() if d.is_dir()) if eval_dir.is_dir() else []


def per_class_table(split_report: dict[str, Any]) -> pd.DataFrame:
    """Support, sensitivity, specificity, F1 and AUROC per class of one split's report."""
    return pd.DataFrame([{"class": dx, **values} for dx, values in (split_report.get("per_class") or {}).items()])


def internal_vs_external(report: dict[str, Any]) -> pd.DataFrame:
    """Validation, internal test and every external set on the headline metrics, with the drop from internal test
    (restricted to the external set's classes, as the report computes it)."""
    rows = []
    for name, block in (("validation", report.get("validation")), ("internal test", report.get("test"))):
        if block:
            rows.append({"set": name, "n": block.get("n"), **{m: block.get(m) for m in HEADLINE_METRICS[:3]}})
    for path, block in (report.get("external") or {}).items():
        drop = block.get("drop_from_internal_test") or {}
        rows.append(
            {
                "set": f"external: {path}",
                "n": block.get("n"),
                **{m: block.get(m) for m in HEADLINE_METRICS[:3]},
                "balanced_accuracy_drop": drop.get("balanced_accuracy"),
                "classes": ", ".join(block.get("renormalised_over") or []),
            }
        )
    return pd.DataFrame(rows)


def fairness_gaps(split_report: dict[str, Any]) -> pd.DataFrame:
    """Per attribute: worst and best judged group, the balanced-accuracy and malignant-sensitivity gaps, and the
    groups too small to judge."""
    rows = []
    for attribute, block in (split_report.get("fairness") or {}).items():
        rows.append(
            {
                "attribute": attribute,
                "worst_group": block.get("worst_group"),
                "best_group": block.get("best_group"),
                "balanced_accuracy_gap": block.get("balanced_accuracy_gap"),
                "malignant_sensitivity_gap": block.get("malignant_sensitivity_gap"),
                "judged_groups": len(block.get("judged_groups") or []),
                "too_small_groups": ", ".join(map(str, block.get("flagged_groups") or [])),
            }
        )
    return pd.DataFrame(rows)


def small_groups(fairness: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``fairness_test.csv`` flagged ``too_small`` (their figures are shown but not judged)."""
    if "too_small" not in fairness.columns:
        return fairness.head(0)
    flags = fairness["too_small"].astype(str).str.lower().isin(["true", "1"])
    return fairness[flags]


# --- the prediction endpoint ---------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """What ``POST {endpoint}/v1/predict`` answered: the JSON body, or an error message for the user."""

    body: dict[str, Any] | None
    error: str | None
    status: int | None = None


def _multipart(field_name: str, filename: str, content: bytes, content_type: str) -> tuple[bytes, str]:
    """A multipart/form-data body holding one file (the standard library has no encoder for it)."""
    import uuid

    boundary = f"skinsynth-{uuid.uuid4().hex}"
    safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{safe_name}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def predict(
    endpoint: str, filename: str, content: bytes, content_type: str, *, explain: bool = False, timeout_s: float = 60
) -> Prediction:
    """Send one image to the serve endpoint as the multipart field ``file``.

    Args:
        endpoint: base URL, e.g. ``http://127.0.0.1:8000``.
        filename, content, content_type: the uploaded file.
        explain: ask for a Grad-CAM heatmap (``?explain=gradcam``).
        timeout_s: seconds to wait for the answer.

    Returns:
        A :class:`Prediction`: the JSON body on 200; otherwise an ``error`` that says what happened (the endpoint's
        ``detail`` on 4xx, that it is down or not answering, or that it answered something other than JSON).
    """
    import urllib.error
    import urllib.request

    url = endpoint.rstrip("/") + "/v1/predict" + ("?explain=gradcam" if explain else "")
    body, header = _multipart("file", filename, content, content_type)
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": header})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
        except (ValueError, AttributeError):
            detail = raw.decode(errors="replace")[:300] or err.reason
        return Prediction(None, f"the endpoint refused the image (HTTP {err.code}): {detail}", err.code)
    except (urllib.error.URLError, OSError) as err:  # refused connection, DNS, timeout
        reason = getattr(err, "reason", err)
        return Prediction(
            None, f"the endpoint at {endpoint} is not reachable ({reason}); start it with `skinsynth serve`", None
        )
    try:
        parsed = json.loads(raw)
    except ValueError:
        return Prediction(None, f"the endpoint answered HTTP {status} but not with JSON: {raw[:200]!r}", status)
    if not isinstance(parsed, dict):
        return Prediction(None, f"the endpoint answered HTTP {status} with JSON that is not an object", status)
    return Prediction(parsed, None, status)


def probabilities_table(body: dict[str, Any]) -> pd.DataFrame:
    """The per-class probabilities of a prediction, highest first (the field may be a mapping or a list)."""
    probs = body.get("probabilities") or {}
    if isinstance(probs, list):
        if probs and isinstance(probs[0], dict):
            frame = pd.DataFrame(probs)
            frame = frame.rename(columns={"dx": "class", "probability": "probability"})
        else:
            frame = pd.DataFrame({"class": CLASSES[: len(probs)], "probability": probs})
    else:
        frame = pd.DataFrame({"class": list(probs), "probability": list(probs.values())})
    if "probability" in frame.columns:
        frame = frame.sort_values("probability", ascending=False)
    return frame.reset_index(drop=True)
