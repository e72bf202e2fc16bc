"""Runs the stages of an experiment in order, skipping those whose manifest matches (``demo`` and ``run``).

Stages so far: prepare. Later stages (generate, audit, tune, evaluate) append themselves to :data:`STAGES`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinsynth import DISCLAIMER
from skinsynth.config import ExperimentConfig, dump_config
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


STAGES: list[tuple[str, Callable[[ExperimentConfig, Path, bool, Progress], StageOutcome]]] = [
    ("prepare", _stage_prepare),
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
    run_dir = Path(cfg.run.out)
    dump_config(cfg, run_dir)
    progress(f"run '{cfg.run.name}' -> {run_dir} (resolved config: {run_dir / 'config.yaml'})")
    outcomes = []
    for name, stage in STAGES:
        progress(f"== stage {name}")
        outcome = stage(cfg, run_dir, force, progress)
        outcomes.append(outcome)
        state = "skipped (up to date)" if outcome.skipped else f"done in {outcome.seconds:.1f} s"
        progress(f"== stage {name}: {state}")
    return outcomes


def format_run_summary(cfg: ExperimentConfig, outcomes: list[StageOutcome]) -> str:
    """The closing summary of a run: per-stage status and time, where results are, what to run next."""
    lines = ["", f"run summary: {cfg.run.name} ({cfg.run.out})"]
    for o in outcomes:
        state = "skipped" if o.skipped else f"{o.seconds:6.1f} s"
        lines.append(f"  {o.name:<10} {state:>9}  {o.detail}")
    lines.append(f"next: skinsynth data summary {cfg.run.out}")
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
