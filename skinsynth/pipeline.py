"""Runs the stages of an experiment in order, skipping those whose manifest matches (``demo`` and ``run``).

Stages: prepare -> pseudo-label (only for a semi-supervised generator: the classifier whose pool labels it learns
from) -> generate (train the generator) -> sample -> train (the classifier) -> audit (the synthetic set,
with the classifier as one feature extractor) -> evaluate -> tune (a sweep over classifier settings when the
experiment has a ``tune.space``; its best trial on validation goes to ``models/best`` and is evaluated once). Each
stage writes its own ``manifest.json`` with its identity (``skinsynth.core.rundir``: its settings and the identities
of the stages it read); a stage runs when the identity it would have now differs from its manifest's, and says why,
so a change upstream re-runs everything downstream of it - the rule ``skinsynth train`` and the others follow alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinsynth import DISCLAIMER
from skinsynth.config import ExperimentConfig, RunConfig, dump_config
from skinsynth.core.compute import record_compute, recorded_compute, total_compute, track_compute
from skinsynth.core.console import stage_log
from skinsynth.core.rundir import BEST_MODEL, GENERATOR_GRID, StageIdentity, layout, stale_stages, why_rerun
from skinsynth.core.storage import display_uri, local_run_dir, synced_run
from skinsynth.data.card import format_data_card
from skinsynth.data.prepare import prepare_images
from skinsynth.errors import SkinsynthError

Progress = Callable[[str], None]


@dataclass
class StageOutcome:
    """One stage's result in a run summary.

    ``compute``: the stage's compute and energy (:mod:`skinsynth.core.compute`): this run's figures for a stage that
    ran, the figures its manifest recorded when it last ran for a skipped one (None: none recorded).
    """

    name: str
    seconds: float
    skipped: bool
    detail: str
    compute: dict[str, Any] | None = None
    up_to_date: bool = True  # a skipped stage: up to date (False: the experiment does not ask for it)


def not_applicable(name: str, why: str) -> StageOutcome:
    """A stage this experiment does not ask for, skipped for ``why``."""
    return StageOutcome(name, 0.0, True, why, up_to_date=False)


def _stage_prepare(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    t0 = time.perf_counter()
    with track_compute(cfg.run) as meter:
        result = prepare_images(cfg.data, run_dir, force=force, progress=progress)
    if not result.skipped:
        record_compute(result.data_dir, meter.figures)
    compute = recorded_compute(result.data_dir) if result.skipped else meter.figures
    card = result.card
    detail = f"{card['images']} images, {card['quarantined']} quarantined -> {result.data_dir}"
    return StageOutcome("prepare", time.perf_counter() - t0, result.skipped, detail, compute)


def _unless_up_to_date(
    stage: str,
    run_dir: Path,
    expected: StageIdentity,
    force: bool,
    progress: Progress,
    work: Callable[[], str],
    run: RunConfig | None = None,
) -> StageOutcome:
    """Skip ``stage`` when its manifest records ``expected`` (the identity the stage itself computes and writes);
    else say why and run ``work``, which writes the stage's outputs and manifest and returns a one-line detail; its
    compute and energy (measured with ``run``'s settings) join that manifest."""
    t0 = time.perf_counter()
    stage_dir = layout(run_dir).stage_dir(expected.stage)
    reason = "--force" if force else why_rerun(run_dir, expected)
    if reason is None:
        progress(f"{stage}: {stage_dir} is up to date; skipping")
        return StageOutcome(stage, time.perf_counter() - t0, True, str(stage_dir), recorded_compute(stage_dir))
    progress(f"{stage}: running ({reason})")
    with track_compute(run) as meter:
        detail = work()
    record_compute(stage_dir, meter.figures)
    return StageOutcome(stage, time.perf_counter() - t0, False, detail, meter.figures)


def pseudo_label_classifier(cfg: ExperimentConfig) -> ExperimentConfig:
    """The experiment of a semi-supervised generator's classifier (``generator.pseudo_labels_from``): the train
    section under that name and without a synthetic mix - the generator it labels the pool for does not exist yet."""
    train = dataclasses.replace(
        cfg.train, name=cfg.generator.pseudo_labels_from, mix=dataclasses.replace(cfg.train.mix, ratio=0.0)
    )
    return dataclasses.replace(cfg, train=train)


def _stage_pseudo_labels(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    """FixMatch classifier first, then the generator (You et al. 2023): train the classifier whose predictions on
    its unlabelled pool the generator learns from (it writes ``models/<name>/pool_labels.parquet``)."""
    from skinsynth.classify.train import model_identity, train_classifier

    if not (cfg.generator.enabled and cfg.generator.pseudo_labels_from):
        return not_applicable("pseudo-label", "not asked for (generator.pseudo_labels_from is empty)")
    teacher = pseudo_label_classifier(cfg)

    def work() -> str:
        result = train_classifier(teacher, progress=progress)
        best = result.best_val_balanced_accuracy
        pool = layout(run_dir).model_pool_labels(teacher.train.name)
        return f"classifier '{teacher.train.name}', best val balanced accuracy {best:.3f} -> {pool}"

    identity = model_identity(teacher.train, run_dir)
    return _unless_up_to_date("pseudo-label", run_dir, identity, force, progress, work, cfg.run)


def _stage_generate(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.generate.train import generator_identity, train_generator

    if not cfg.generator.enabled:
        return not_applicable("generate", "disabled (generator.enabled: false)")

    def work() -> str:
        result = train_generator(cfg, progress=progress)
        grid = result.generator_dir / GENERATOR_GRID
        return f"generator {result.generator_id}, {result.steps} steps -> {grid}"

    return _unless_up_to_date("generate", run_dir, generator_identity(cfg, run_dir), force, progress, work, cfg.run)


def _stage_sample(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.generate.sample import sample_synthetic, synthetic_identity

    if not cfg.generator.enabled:
        return not_applicable("sample", "disabled (generator.enabled: false)")

    def work() -> str:
        result = sample_synthetic(cfg.sample, run_dir, force=True, progress=progress)
        return f"{result.card['images']} synthetic images -> {result.synthetic_dir}"

    return _unless_up_to_date(
        "sample", run_dir, synthetic_identity(cfg.sample, run_dir), force, progress, work, cfg.run
    )


def _stage_train(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.classify.train import model_identity, train_classifier

    def work() -> str:
        result = train_classifier(cfg, progress=progress)
        best = result.best_val_balanced_accuracy
        return f"best val balanced accuracy {best:.3f} -> {result.model_dir}"

    return _unless_up_to_date("train", run_dir, model_identity(cfg.train, run_dir), force, progress, work, cfg.run)


def _stage_audit(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.audit.report import audit_identity, failed_verdicts, run_audit

    if not cfg.generator.enabled:
        return not_applicable("audit", "disabled (generator.enabled: false)")

    def work() -> str:
        gate = run_audit(cfg, run_dir, progress=progress)["gate"]
        failed = " and not ".join(failed_verdicts(gate))
        verdict = "share_ok" if gate["share_ok"] else f"NOT share_ok (not {failed})"
        worst = f"attack AUC {gate['attack_auc']:.2f} (upper {gate['attack_auc_upper']:.2f}, {gate['attack']})"
        detail = f"memorised {gate['memorised_share']:.1%}, {worst}: {verdict}"
        return f"{detail} -> {layout(run_dir).audit}"

    return _unless_up_to_date("audit", run_dir, audit_identity(cfg, run_dir), force, progress, work, cfg.run)


def _stage_tune(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.tune.sweep import run_sweep, sweep_stage

    if not cfg.tune.space:
        return not_applicable("tune", "no sweep (tune.space is empty)")

    def work() -> str:
        # an interrupted sweep resumes; one made with other settings or data starts again
        best = run_sweep(cfg, fresh=force, restart_if_changed=True, progress=progress).best or {}
        val, test = best.get("best_val_balanced_accuracy", 0.0), best.get("test_balanced_accuracy", 0.0)
        return (
            f"best trial {best.get('trial_id')}: val balanced accuracy {val:.3f}, test {test:.3f} "
            f"-> {layout(run_dir).model('best')}"
        )

    return _unless_up_to_date("tune", run_dir, sweep_stage(cfg, run_dir), force, progress, work, cfg.run)


def _stage_evaluate(cfg: ExperimentConfig, run_dir: Path, force: bool, progress: Progress) -> StageOutcome:
    from skinsynth.classify.evaluate import evaluate_model, evaluation_identity

    def work() -> str:
        test = evaluate_model(cfg, progress=progress)["test"]
        detail = f"test balanced accuracy {test['balanced_accuracy']:.3f}, macro AUROC {test['macro_auroc']:.3f}"
        return f"{detail} -> {layout(run_dir).evaluation(cfg.train.name)}"

    return _unless_up_to_date("evaluate", run_dir, evaluation_identity(cfg, run_dir), force, progress, work, cfg.run)


STAGES: list[tuple[str, Callable[[ExperimentConfig, Path, bool, Progress], StageOutcome]]] = [
    ("prepare", _stage_prepare),
    ("pseudo-label", _stage_pseudo_labels),
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
            with stage_log(name):  # Ray's lines of this stage: RUN_DIR/logs/<name>.log (skinsynth.core.console)
                outcome = stage(cfg, run_dir, force, progress)
            outcomes.append(outcome)
            if outcome.skipped and not outcome.up_to_date:
                continue  # a stage the experiment does not ask for: the run summary says why
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
        lines.append(f"  {o.name:<12} {state:>9}  {o.detail}")
    lines.extend(compute_lines(outcomes))
    lines.extend(stale_lines(run_dir))
    lines.append(f"next: skinsynth data summary {run_dir}")
    run = layout(run_dir)
    lines.append(f"      open {run.evaluation_report(cfg.train.name)} and its figures")
    if cfg.generator.enabled:
        lines.append(f"      open {run.audit_report} (fidelity, privacy, export gate)")
    if cfg.tune.space:
        lines.append(f"      open {run.sweep_trials(cfg.tune.name)} and {run.evaluation_report(BEST_MODEL)}")
    lines.append(f"      skinsynth serve --out {out}      # the classifier over HTTP on 127.0.0.1:8000")
    lines.append(f"      skinsynth view --runs {run_dir.parent}      # the results viewer")
    lines.append(DISCLAIMER)
    return "\n".join(lines)


def _compute_row(label: str, figures: dict[str, Any]) -> str:
    def cell(value: Any, scale: float = 1.0, digits: int = 1) -> str:
        return "-" if value is None else f"{float(value) * scale:.{digits}f}"

    return (
        f"  {label:<20} {cell(figures.get('wall_s')):>9} {cell(figures.get('cpu_s')):>9} "
        f"{cell(figures.get('gpu_s')):>8} {cell(figures.get('peak_rss_mb'), digits=0):>8} "
        f"{cell(figures.get('energy_kwh'), 1000, 3):>9} {cell(figures.get('co2e_kg'), 1000, 3):>9}"
    )


def compute_lines(outcomes: list[StageOutcome]) -> list[str]:
    """The summary's compute table: per stage its wall, CPU and GPU time, peak memory, energy (Wh) and CO2e (g), and
    a TOTAL of the stages this run ran. A stage skipped as up to date shows the figures its manifest recorded when it
    ran, marked ``(earlier)``, and is left out of the total. No lines when no stage has figures."""
    shown = [o for o in outcomes if o.compute]
    if not shown:
        return []
    header = f"  {'compute':<20} {'wall s':>9} {'CPU s':>9} {'GPU s':>8} {'peak MB':>8} {'energy Wh':>9} {'g CO2e':>9}"
    lines = ["", header]
    lines += [_compute_row(f"{o.name} (earlier)" if o.skipped else o.name, o.compute or {}) for o in shown]
    ran = [o.compute for o in shown if not o.skipped and o.compute]
    total = total_compute(ran)
    total["peak_rss_mb"] = total["peak_rss_mb"] if ran else None
    lines.append(_compute_row(f"TOTAL ({len(ran)} ran)", total))
    lines.append(
        "  TOTAL: the stages this run ran (peak MB: their highest); '(earlier)': skipped as up to date, not counted"
    )
    methods = sorted({str(c.get("energy_method")) for o in shown if (c := o.compute) and c.get("energy_method")})
    intensities = sorted({c.get("carbon_intensity_g_per_kwh") for o in shown if (c := o.compute)} - {None})
    grid = " / ".join(f"{i:g}" for i in intensities)
    lines.append(
        f"  energy: {'; '.join(methods) or 'none measured'}; CO2e at {grid} g/kWh (run.carbon_intensity_g_per_kwh)"
    )
    lines.append(
        "  (CPU time and energy of this machine's processes: the driver and its descendants, local Ray's included)"
    )
    return lines


def stale_lines(run_dir: str | Path) -> list[str]:
    """Lines naming the stages of ``run_dir`` made from inputs that have since been replaced (none: no lines)."""
    stale = stale_stages(run_dir)
    if not stale:
        return []
    lines = [f"STALE: {len(stale)} stage(s) were made from inputs that have since been replaced:"]
    lines += [f"  {s.describe()}" for s in stale]
    return lines


def data_summary_text(run_dir: str | Path) -> str:
    """Readable data card of ``RUN_DIR/data``; raises SkinsynthError naming what is missing or broken."""
    card_path = layout(run_dir).data_card
    if not card_path.is_file():
        raise SkinsynthError(f"no data card at {card_path}: run 'skinsynth data prepare --out {run_dir}' first")
    try:
        card: dict[str, Any] = json.loads(card_path.read_text())
    except ValueError as err:
        raise SkinsynthError(f"data card {card_path} is not valid JSON ({err}); re-run prepare with --force") from None
    return "\n".join([format_data_card(card), *stale_lines(run_dir)])
