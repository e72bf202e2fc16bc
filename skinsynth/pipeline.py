"""Runs the stages of an experiment in order, skipping those whose manifest matches (``demo`` and ``run``).

Stages: prepare -> generate (train the generator) -> sample -> train (the classifier) -> audit (the synthetic set,
with the classifier as one feature extractor) -> evaluate -> tune (a sweep over classifier settings when the
experiment has a ``tune.space``; its best trial on validation goes to ``models/best`` and is evaluated once). Each
later stage writes a ``manifest.json`` with the hash of its own config section and of its input stages' manifests, so
a change upstream re-runs everything downstream of it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinsynth import DISCLAIMER
from skinsynth.config import ExperimentConfig, changed_settings, dump_config
from skinsynth.core.rundir import read_manifest
from skinsynth.core.storage import display_uri, local_run_dir, synced_run
from skinsynth.data.card import format_data_card
from skinsynth.data.prepare import prepare_images
from skinsynth.errors import SkinsynthError

Progress = Callable[[str], None]


@dataclass
class StageOutcome:
    """One stage's result in a run summary."""

    name: str
    seconds: float
    skipped: bool
    detail: str


def _stage_prepare(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    t0 = time.perf_counter()
    result = prepare_images(cfg.data, run_dir, force=force, progress=progress)
    card = result.card
    detail = f"{card['images']} images, {card['quarantined']} quarantined -> {result.data_dir}"
    return StageOutcome("prepare", time.perf_counter() - t0, result.skipped, detail)


def _manifest_hash(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def _up_to_date(stage_dir: Path, expected: str) -> bool:
    return (read_manifest(stage_dir) or {}).get("input_hash") == expected


def _write_manifest(stage_dir: Path, stage: str, expected: str) -> None:
    payload = {"stage": stage, "input_hash": expected, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (stage_dir / "manifest.json").write_text(json.dumps(payload, indent=2))


def _unless_up_to_date(
    stage: str,
    stage_dir: Path,
    expected: str,
    force: bool,
    progress: Progress,
    work: Callable[[], tuple[Path, str]],
) -> StageOutcome:
    """Skip ``stage`` when ``stage_dir``'s manifest records the same inputs; else run ``work`` (which returns the
    directory it wrote and a one-line detail) and record the inputs in that directory's manifest."""
    t0 = time.perf_counter()
    if not force and _up_to_date(stage_dir, expected):
        progress(f"{stage}: {stage_dir} is up to date; skipping")
        return StageOutcome(stage, time.perf_counter() - t0, True, str(stage_dir))
    written, detail = work()
    _write_manifest(written, stage, expected)
    return StageOutcome(stage, time.perf_counter() - t0, False, detail)


def _stage_generate(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.generate.train import train_generator

    if not cfg.generator.enabled:
        return StageOutcome("generate", 0.0, True, "disabled (generator.enabled: false)")

    def work() -> tuple[Path, str]:
        result = train_generator(cfg, progress=progress)
        grid = result.generator_dir / "grid.png"
        return result.generator_dir, f"generator {result.generator_id}, {result.steps} steps -> {grid}"

    expected = _manifest_hash(changed_settings(cfg.generator), _file_hash(run_dir / "data" / "manifest.json"))
    return _unless_up_to_date("generate", run_dir / "generator", expected, force, progress, work)


def _stage_sample(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.generate.sample import sample_synthetic

    if not cfg.generator.enabled:
        return StageOutcome("sample", 0.0, True, "disabled (generator.enabled: false)")
    t0 = time.perf_counter()
    result = sample_synthetic(cfg.sample, run_dir, force=force, progress=progress)
    detail = f"{result.card['images']} synthetic images -> {result.synthetic_dir}"
    return StageOutcome("sample", time.perf_counter() - t0, result.skipped, detail)


def _stage_train(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.classify.train import train_classifier

    def work() -> tuple[Path, str]:
        result = train_classifier(cfg, progress=progress)
        best = result.best_val_balanced_accuracy
        return result.model_dir, f"best val balanced accuracy {best:.3f} -> {result.model_dir}"

    expected = _manifest_hash(changed_settings(cfg.train), _file_hash(run_dir / "data" / "manifest.json"))
    return _unless_up_to_date("train", run_dir / "models" / cfg.train.name, expected, force, progress, work)


def _stage_audit(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.audit.report import run_audit

    if not cfg.generator.enabled:
        return StageOutcome("audit", 0.0, True, "disabled (generator.enabled: false)")
    audit_dir = run_dir / "audit"

    def work() -> tuple[Path, str]:
        gate = run_audit(cfg, run_dir, progress=progress)["gate"]
        verdict = "share_ok" if gate["share_ok"] else "NOT share_ok"
        detail = f"memorised {gate['memorised_share']:.1%}, attack AUC {gate['attack_auc']:.2f}: {verdict}"
        return audit_dir, f"{detail} -> {audit_dir}"

    expected = _manifest_hash(
        changed_settings(cfg.audit),
        _file_hash(run_dir / "synthetic" / "manifest.json"),
        _file_hash(run_dir / "models" / cfg.train.name / "manifest.json"),  # its features are one extractor
    )
    return _unless_up_to_date("audit", audit_dir, expected, force, progress, work)


def _stage_tune(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.tune.sweep import run_sweep

    if not cfg.tune.space:
        return StageOutcome("tune", 0.0, True, "no sweep (tune.space is empty)")
    sweep_dir = run_dir / "tune" / cfg.tune.name

    def work() -> tuple[Path, str]:
        # an interrupted sweep resumes; one made with other settings or data starts again
        best = run_sweep(cfg, fresh=force, restart_if_changed=True, progress=progress).best or {}
        val, test = best.get("best_val_balanced_accuracy", 0.0), best.get("test_balanced_accuracy", 0.0)
        detail = (
            f"best trial {best.get('trial_id')}: val balanced accuracy {val:.3f}, test {test:.3f} "
            f"-> {run_dir / 'models' / 'best'}"
        )
        return sweep_dir, detail

    expected = _manifest_hash(
        changed_settings(cfg.tune),
        changed_settings(cfg.train),
        _file_hash(run_dir / "data" / "manifest.json"),
        _file_hash(run_dir / "synthetic" / "manifest.json"),
    )
    return _unless_up_to_date("tune", sweep_dir, expected, force, progress, work)


def _stage_evaluate(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.classify.evaluate import evaluate_model

    eval_dir = run_dir / "eval" / cfg.train.name

    def work() -> tuple[Path, str]:
        test = evaluate_model(cfg, progress=progress)["test"]
        detail = f"test balanced accuracy {test['balanced_accuracy']:.3f}, macro AUROC {test['macro_auroc']:.3f}"
        return eval_dir, f"{detail} -> {eval_dir}"

    expected = _manifest_hash(
        _file_hash(run_dir / "models" / cfg.train.name / "manifest.json"),
        _file_hash(run_dir / "synthetic" / "manifest.json"),  # the report scores the synthetic set too
    )
    return _unless_up_to_date("evaluate", eval_dir, expected, force, progress, work)


STAGES: list[tuple[str, Callable[[ExperimentConfig, Path, bool, Progress], StageOutcome]]] = [
    ("prepare", _stage_prepare),
    ("generate", _stage_generate),
    ("sample", _stage_sample),
    ("train", _stage_train),
    ("audit", _stage_audit),
    ("evaluate", _stage_evaluate),
    ("tune", _stage_tune),
]


def run_experiment(cfg: ExperimentConfig, *, force: bool = False, progress: Progress = print) -> list[StageOutcome]:
    """Run every stage of ``cfg`` into ``cfg.run.out``, writing the resolved config first.

    Args:
        cfg: the experiment.
        force: redo stages even when their manifests match.
        progress: receives one-line progress messages.

    Returns:
        One :class:`StageOutcome` per stage, in order.
    """
    with synced_run(cfg.run, progress) as store:
        run_dir = store.local
        dump_config(cfg, run_dir)
        progress(f"run '{cfg.run.name}' -> {display_uri(cfg.run.out)} (resolved config: {run_dir / 'config.yaml'})")
        outcomes = []
        for name, stage in STAGES:
            progress(f"== stage {name}")
            outcome = stage(cfg, run_dir, force, progress)
            outcomes.append(outcome)
            state = "skipped (up to date)" if outcome.skipped else f"done in {outcome.seconds:.1f} s"
            if store.remote and not outcome.skipped:
                # a lost machine loses no finished stage
                state += f"; {store.push()} file(s) pushed to {display_uri(cfg.run.out)}"
            progress(f"== stage {name}: {state}")
    return outcomes


def format_run_summary(cfg: ExperimentConfig, outcomes: list[StageOutcome]) -> str:
    """The closing summary of a run: per-stage status and time, where results are, what to run next."""
    run_dir = local_run_dir(cfg.run)
    out = display_uri(cfg.run.out)
    where = out if run_dir == Path(cfg.run.out) else f"{out}, local copy {run_dir}"
    lines = ["", f"run summary: {cfg.run.name} ({where})"]
    for o in outcomes:
        state = "skipped" if o.skipped else f"{o.seconds:6.1f} s"
        lines.append(f"  {o.name:<10} {state:>9}  {o.detail}")
    lines.append(f"next: skinsynth data summary {run_dir}")
    lines.append(f"      open {run_dir / 'eval' / cfg.train.name / 'report.json'} and its figures")
    if cfg.generator.enabled:
        lines.append(f"      open {run_dir / 'audit' / 'report.json'} (fidelity, privacy, export gate)")
    if cfg.tune.space:
        trials = run_dir / "tune" / cfg.tune.name / "trials.csv"
        lines.append(f"      open {trials} and {run_dir / 'eval' / 'best' / 'report.json'}")
    lines.append(f"      skinsynth serve --out {out}      # the classifier over HTTP on 127.0.0.1:8000")
    lines.append(f"      skinsynth view --runs {run_dir.parent}      # the results viewer")
    lines.append(DISCLAIMER)
    return "\n".join(lines)


def data_summary_text(run_dir: str | Path) -> str:
    """Readable data card of ``RUN_DIR/data``; raises SkinsynthError naming what is missing or broken."""
    card_path = Path(run_dir) / "data" / "data_card.json"
    if not card_path.is_file():
        raise SkinsynthError(f"no data card at {card_path}: run 'skinsynth data prepare --out {run_dir}' first")
    try:
        card: dict[str, Any] = json.loads(card_path.read_text())
    except ValueError as err:
        raise SkinsynthError(f"data card {card_path} is not valid JSON ({err}); re-run prepare with --force") from None
    return format_data_card(card)
