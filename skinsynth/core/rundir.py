"""The run directory: every stage folder and file named once, stage identity, manifests, staleness, and atomic folder
replacement.

Layout of ``RUN_DIR/``::

    config.yaml       the resolved config of the last `skinsynth run` / `demo` (each stage keeps its own)
    data/             images/ (shards), splits.parquet, data_card.json, quarantine.csv     (stage "data")
    generator/        the diffusion generator: weights, schedule, generator_card.json, grid.png (stage "generator")
    synthetic/        images/ (shards), plan, synthetic_card.json                          (stage "synthetic")
    models/<name>/    a classifier: model.pt, training.json, model_card.json               (stage "model:<name>")
    audit/            report.json and its figures: fidelity, privacy, the sharing gate     (stage "audit")
    eval/<name>/      evaluation of models/<name>: report.json, fairness_test.csv, figures (stage "eval:<name>")
    tune/<sweep>/     a sweep: trials.csv, trials.parquet, summary.csv (grid), best.json   (stage "sweep:<sweep>")
    ray_train/        Ray Train runs (checkpoints), named by their stage's identity
    logs/             <stage>.log: Ray's log lines for each stage (skinsynth.core.console)
    test_ledger.jsonl every look at the test split: when, by which command, which model (skinsynth.core.ledger)

These names are spelt here and nowhere else (bar ``config.yaml``, spelt by :mod:`skinsynth.config`, which writes it
and sits below this layer): other modules take folders and files from :class:`RunLayout`
(``layout(run_dir).data_card``) or, for a file inside a folder they already hold (a stage's temporary folder), from
the constants below (``tmp / DATA_CARD``). Files only one stage reads, inside its own folder (the generator's
weights, the sampling plan, a sweep's Tune state), are named by that stage's module.

Every stage folder holds ``manifest.json``: the stage's identity, the identities of the stages it read (``inputs``),
the resolved config it ran with (``--set`` values included) and when it was made.

**Identity.** A stage's identity is a hash of its own settings that differ from their defaults and the identities of
the stages it reads (the data identity hashes the source fingerprint and the data settings, split and preprocessing
included). So a re-split data set changes the identity of every stage downstream of it: their Ray Train run names
change (a new run starts rather than resuming one trained on the old split), and ``skinsynth run`` re-runs them. A
setting added by an upgrade, left at its default, changes no identity.

**Staleness.** A stage is stale when a stage it read has since been replaced: the identity its manifest recorded
for that input is no longer the input's current identity. :func:`stale_stages` lists them with the command that
refreshes each.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# RUN_DIR/config.yaml: spelt in config (which writes it and sits below core), part of the layout here
from skinsynth.config import CONFIG_FILE

MANIFEST = "manifest.json"  # in every stage folder

# folders under RUN_DIR
DATA_FOLDER = "data"
GENERATOR_FOLDER = "generator"
SYNTHETIC_FOLDER = "synthetic"
AUDIT_FOLDER = "audit"
MODELS_FOLDER = "models"
EVAL_FOLDER = "eval"
TUNE_FOLDER = "tune"
RAY_TRAIN_FOLDER = "ray_train"
TEST_LEDGER = "test_ledger.jsonl"  # RUN_DIR/test_ledger.jsonl
LOGS_FOLDER = "logs"  # RUN_DIR/logs/<stage>.log

# stage kinds -> folder under RUN_DIR; a kind with a name ("model:best") lives in <folder>/<name>
STAGE_FOLDERS = {
    "data": DATA_FOLDER,
    "generator": GENERATOR_FOLDER,
    "synthetic": SYNTHETIC_FOLDER,
    "audit": AUDIT_FOLDER,
    "model": MODELS_FOLDER,
    "eval": EVAL_FOLDER,
    "sweep": TUNE_FOLDER,
}
NAMED_KINDS = frozenset({"model", "eval", "sweep"})  # kinds with one folder per name under their stage folder

# files and folders inside the stage folders
IMAGES = "images"  # data/ and synthetic/: the Parquet image shards
DATA_CARD = "data_card.json"
SPLITS = "splits.parquet"
QUARANTINE = "quarantine.csv"
GENERATOR_CARD = "generator_card.json"
GENERATOR_GRID = "grid.png"  # one row of samples per class
GENERATOR_TRAINING_IDS = "training_ids.json"  # the image ids the generator learnt from (the provenance guard's)
# a semi-supervised generator's pool images: those it learnt with a classifier's pseudo-labels and those it learnt
# unconditionally, and the classifier (with the labelled ids it trained on) that gave the labels
GENERATOR_POOL_IDS = "pool_ids.json"
SYNTHETIC_CARD = "synthetic_card.json"
AUDIT_REPORT = "report.json"
AUDIT_GALLERY = "gallery.png"  # the most training-like synthetic images beside their nearest training image
AUDIT_SIMILARITY = "similarity.png"
MODEL_WEIGHTS = "model.pt"
MODEL_TRAINING = "training.json"  # the training config, history and best epoch
MODEL_CARD = "model_card.json"
# a classifier's predictions on the unlabelled pool of its own training run (image_id, label, confidence): the
# pseudo-labels a semi-supervised generator learns from
MODEL_POOL_LABELS = "pool_labels.parquet"
EVAL_REPORT = "report.json"
EVAL_FAIRNESS = "fairness_test.csv"
SWEEP_TRIALS = "trials.csv"  # one row per trial (what users open)
SWEEP_TRIALS_PARQUET = "trials.parquet"  # the same rows plus each trial's checkpoint path
SWEEP_SUMMARY = "summary.csv"  # a grid's mean and spread over seeds per cell
SWEEP_BEST = "best.json"  # the best trial on validation
# the command that makes (or refreshes) each kind of stage; {run} is the run directory, {name} the stage's name
REFRESH_COMMANDS = {
    "data": "skinsynth data prepare --out {run} --force",
    "generator": "skinsynth generate train --out {run}",
    "synthetic": "skinsynth generate sample --out {run}",
    "audit": "skinsynth audit {run}",
    "model": "skinsynth train --out {run}{name_set}",
    "eval": "skinsynth evaluate --out {run}{name_set}",
    "sweep": "skinsynth tune --out {run}",
}
DEFAULT_MODEL_NAME = "classifier"
BEST_MODEL = "best"  # models/best, eval/best: a sweep's best trial


@dataclass(frozen=True)
class RunLayout:
    """Where each stage's outputs live inside one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def data(self) -> Path:
        return self.root / DATA_FOLDER

    @property
    def data_images(self) -> Path:
        return self.data / IMAGES

    @property
    def splits(self) -> Path:
        return self.data / SPLITS

    @property
    def data_card(self) -> Path:
        return self.data / DATA_CARD

    @property
    def quarantine(self) -> Path:
        return self.data / QUARANTINE

    @property
    def generator(self) -> Path:
        return self.root / GENERATOR_FOLDER

    @property
    def generator_card(self) -> Path:
        return self.generator / GENERATOR_CARD

    @property
    def generator_grid(self) -> Path:
        return self.generator / GENERATOR_GRID

    @property
    def generator_training_ids(self) -> Path:
        return self.generator / GENERATOR_TRAINING_IDS

    @property
    def generator_pool_ids(self) -> Path:
        return self.generator / GENERATOR_POOL_IDS

    @property
    def synthetic(self) -> Path:
        return self.root / SYNTHETIC_FOLDER

    @property
    def synthetic_images(self) -> Path:
        return self.synthetic / IMAGES

    @property
    def synthetic_card(self) -> Path:
        return self.synthetic / SYNTHETIC_CARD

    @property
    def audit(self) -> Path:
        return self.root / AUDIT_FOLDER

    @property
    def audit_report(self) -> Path:
        return self.audit / AUDIT_REPORT

    @property
    def test_ledger(self) -> Path:
        return self.root / TEST_LEDGER

    @property
    def ray_train(self) -> Path:
        return self.root / RAY_TRAIN_FOLDER

    @property
    def models(self) -> Path:
        return self.root / MODELS_FOLDER

    @property
    def evaluations(self) -> Path:
        return self.root / EVAL_FOLDER

    @property
    def sweeps(self) -> Path:
        return self.root / TUNE_FOLDER

    def model(self, name: str) -> Path:
        return self.models / name

    def model_pool_labels(self, name: str) -> Path:
        return self.model(name) / MODEL_POOL_LABELS

    def evaluation(self, name: str) -> Path:
        return self.evaluations / name

    def evaluation_report(self, name: str) -> Path:
        return self.evaluation(name) / EVAL_REPORT

    def sweep(self, name: str) -> Path:
        return self.sweeps / name

    def sweep_trials(self, name: str) -> Path:
        return self.sweep(name) / SWEEP_TRIALS

    def shards(self, stage: str) -> Path:
        """The image shards of a stage that holds them (``data`` or ``synthetic``)."""
        return self.stage_dir(stage) / IMAGES

    def stage_dir(self, stage: str) -> Path:
        """The folder of a stage key (``data``, ``model:classifier``, ``sweep:ratio``, ...)."""
        kind, _, name = stage.partition(":")
        if kind not in STAGE_FOLDERS:
            raise ValueError(f"unknown stage '{stage}' (known kinds: {', '.join(STAGE_FOLDERS)})")
        folder = self.root / STAGE_FOLDERS[kind]
        return folder / name if name else folder

    def parts(self, path: Path) -> tuple[str, ...]:
        """The parts of ``path`` under the run directory (``("data", "images")``): how storage names it on a run's
        URI (:func:`skinsynth.core.storage.remote_shards`, ``RunStore.ray_storage``)."""
        return Path(path).relative_to(self.root).parts

    def relative(self, path: Path) -> str:
        """``path`` relative to the run directory (``data/data_card.json``): how messages name a run's file."""
        return "/".join(self.parts(path))


def layout(run_dir: str | Path) -> RunLayout:
    """The :class:`RunLayout` of ``run_dir``."""
    return RunLayout(Path(run_dir))


# --- identity ---


def identity_hash(payload: Any) -> str:
    """Short, stable hash of a JSON-able payload (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ids_hash(image_ids: list[str]) -> str:
    """Hash of a set of image ids (order-free): what a generator or model learnt from."""
    return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageIdentity:
    """What defines one stage's output: its own non-default settings and the identities of what it read.

    ``run_length`` names settings that only lengthen a run (epochs, steps, logging): they count in the stage's
    identity (more epochs is another model) but not in its Ray Train run name, so the longer run resumes the shorter.
    """

    stage: str
    settings: Mapping[str, Any]
    inputs: Mapping[str, str | None]
    config: Mapping[str, Any] = field(default_factory=dict)
    run_length: frozenset[str] = frozenset()

    @property
    def identity(self) -> str:
        return identity_hash({"settings": dict(self.settings), "inputs": dict(self.inputs)})

    def run_name(self, prefix: str) -> str:
        """A Ray Train run name: ``prefix`` plus the identity without the run-length settings.

        Ray Train resumes from the latest checkpoint under the same storage path and name, so the same command (or
        one that only lengthens the run) continues it, while any other change - settings or any input upstream,
        such as a re-split data set - starts a fresh run instead of silently resuming a different one.
        """
        settings = {k: v for k, v in self.settings.items() if k not in self.run_length}
        return f"{prefix}-{identity_hash({'settings': settings, 'inputs': dict(self.inputs)})[:10]}"


# --- manifests ---


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    """The stage manifest, or None when absent or unreadable."""
    try:
        value = json.loads((Path(stage_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_generator_pool(run_dir: str | Path) -> dict[str, Any] | None:
    """A semi-supervised generator's pool record (``generator/pool_ids.json``: the classifier, its labelled ids, the
    pool ids learnt with pseudo-labels and unconditionally), or None for a generator of labelled images only."""
    path = layout(run_dir).generator_pool_ids
    return json.loads(path.read_text()) if path.is_file() else None


def pool_image_ids(pool: dict[str, Any]) -> list[str]:
    """Every pool image a semi-supervised generator learnt from (pseudo-labelled, then unconditional)."""
    return [*pool.get("pseudo_labelled", []), *pool.get("unconditional", [])]


def current_identity(run_dir: str | Path, stage: str) -> str | None:
    """The identity recorded in a stage's manifest (None: the stage has not run, or ran before identities)."""
    return (read_manifest(layout(run_dir).stage_dir(stage)) or {}).get("identity")


def write_manifest(stage_dir: str | Path, identity: StageIdentity, **extra: Any) -> Path:
    """Write ``stage_dir/manifest.json`` for ``identity`` (``extra`` keys join it) and return its path."""
    path = Path(stage_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}")
    payload = {
        "stage": identity.stage,
        "identity": identity.identity,
        "inputs": dict(identity.inputs),
        "settings": dict(identity.settings),
        "config": dict(identity.config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


def update_manifest(stage_dir: str | Path, **fields: Any) -> Path | None:
    """Merge ``fields`` into ``stage_dir/manifest.json`` (replaced atomically, like :func:`write_manifest`) and return
    its path; None, writing nothing, when the stage has no readable manifest."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return None
    path = Path(stage_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({**manifest, **fields}, indent=2, default=str))
    tmp.replace(path)
    return path


def why_rerun(run_dir: str | Path, expected: StageIdentity) -> str | None:
    """None when the stage's manifest matches ``expected``; else one line saying why it must run."""
    manifest = read_manifest(layout(run_dir).stage_dir(expected.stage))
    if manifest is None:
        return "no previous output"
    if manifest.get("identity") == expected.identity:
        return None
    if "identity" not in manifest:
        return "its output predates stage identities"
    before = manifest.get("inputs") or {}
    changed = [
        key for key in sorted(set(before) | set(expected.inputs)) if before.get(key) != expected.inputs.get(key)
    ]
    reasons = [f"{key} changed ({before.get(key)} -> {expected.inputs.get(key)})" for key in changed]
    if manifest.get("settings") != dict(expected.settings):
        reasons.append("its settings changed")
    return "; ".join(reasons) or "its identity changed"


# --- staleness ---


@dataclass(frozen=True)
class StaleStage:
    """A stage whose output was made from an input that has since been replaced."""

    stage: str
    input: str
    recorded: str | None
    current: str | None
    command: str

    def describe(self) -> str:
        now = self.current or "missing"
        made = f"made from {self.input} {self.recorded}, which is now {now}"
        return f"{self.stage} is stale: {made}; refresh: {self.command}"


def refresh_command(run_dir: str | Path, stage: str) -> str:
    """The command that remakes ``stage`` in ``run_dir``."""
    kind, _, name = stage.partition(":")
    name_set = (
        f" --set train.name={name}" if kind in ("model", "eval") and name not in ("", DEFAULT_MODEL_NAME) else ""
    )
    return REFRESH_COMMANDS[kind].format(run=run_dir, name_set=name_set)


def stage_manifests(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every stage manifest of a run, by stage key."""
    root = Path(run_dir)
    found: dict[str, dict[str, Any]] = {}
    for kind, folder in STAGE_FOLDERS.items():
        named = kind in NAMED_KINDS
        dirs = sorted(p for p in (root / folder).iterdir() if p.is_dir()) if named and (root / folder).is_dir() else []
        for stage_dir in dirs if named else [root / folder]:
            manifest = read_manifest(stage_dir)
            if manifest is not None:
                found[f"{kind}:{stage_dir.name}" if named else kind] = manifest
    return found


def stale_stages(run_dir: str | Path) -> list[StaleStage]:
    """The stages of ``run_dir`` whose recorded inputs are no longer the inputs' current identities, and the stages
    made from those (a synthetic set sampled from a generator trained on a replaced data set is stale too)."""
    manifests = stage_manifests(run_dir)
    stale: dict[str, StaleStage] = {}
    changed = True
    while changed:  # to a fixed point: staleness flows downstream whatever order the stages are listed in
        changed = False
        for stage, manifest in manifests.items():
            if stage in stale:
                continue
            for source, recorded in sorted((manifest.get("inputs") or {}).items()):
                if source.partition(":")[0] not in STAGE_FOLDERS or recorded is None:
                    continue  # not a stage (a source fingerprint, a set of image ids), or not read
                current = (manifests.get(source) or {}).get("identity")
                if current != recorded or source in stale:
                    now = current if current != recorded else f"{current} (itself stale)"
                    stale[stage] = StaleStage(stage, source, recorded, now, refresh_command(run_dir, stage))
                    changed = True
                    break
    return sorted(stale.values(), key=lambda s: list(manifests).index(s.stage))


# --- folders ---


def replace_dir(new: Path, target: Path) -> None:
    """Swap a finished temp folder into place; the old one is removed only after the new one is in."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
