"""``skinsynth tune``: a Ray Tune sweep whose trials are classifier training runs (Ray Train), and what it leaves.

Search: Optuna's TPE sampler (Bergstra et al. 2011, "Algorithms for hyper-parameter optimization"; Akiba et al.
2019, "Optuna"), seeded, through Ray Tune's ``OptunaSearch``; or a full grid of the space's choices repeated over
``tune.seeds`` (designed experiments such as label-budget curves, where every cell is wanted, not the best one).
Scheduling: ASHA (Li et al. 2020, "A system for massively parallel hyperparameter tuning") stops trials whose
validation balanced accuracy trails at an epoch rung.

Each trial is a Tune function that builds its experiment config (the file's, with the trial's values set) and runs
the classifier's Ray Train loop with its own workers; Tune's report callback carries every epoch's metrics and
checkpoint path to the sweep. The sweep lives in ``RUN_DIR/tune/<name>/``: Tune's experiment state (trials and the
searcher's state, so a killed sweep resumes where it stopped: ``Tuner.restore``), ``trials.jsonl`` (when each trial
started and ended, by trial id), ``trials.parquet`` (one row per trial: values, metrics, checkpoint) and, for a
grid, ``summary.csv`` (mean and standard deviation over seeds per cell, on validation and test).

The best trial is chosen on validation balanced accuracy only; its weights are copied to ``RUN_DIR/models/best/``
and evaluated once, on test and the external sets, into ``RUN_DIR/eval/best/``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinsynth.config import ExperimentConfig, changed_settings, config_to_dict
from skinsynth.core.rundir import (
    BEST_MODEL,
    SWEEP_BEST,
    SWEEP_SUMMARY,
    SWEEP_TRIALS,
    SWEEP_TRIALS_PARQUET,
    TUNE_FOLDER,
    StageIdentity,
    layout,
    write_manifest,
)
from skinsynth.core.storage import RunStore, open_run_store
from skinsynth.errors import SkinsynthError
from skinsynth.tune.space import SEED_KEY, check_space, grid_size, trial_config, tune_param_space

Progress = Callable[[str], None]
METRIC = "best_val_balanced_accuracy"  # the best epoch so far: monotone, so ASHA compares trials fairly at a rung
# the optional second objective: the worst estimated-tone group's malignant sensitivity at that best epoch
TONE_METRIC = "best_val_worst_tone_sensitivity"
TRIAL_LOG = "trials.jsonl"
SWEEP_INFO = "sweep.json"  # the sweep's identity and config, beside its trials
TRIAL_RUNS = "trials"  # tune/<sweep>/trials/trial-<id>: each trial's own Ray Train storage
# what a trial reports each epoch (the training loop's metrics and the checkpoint path Tune's callback adds)
REPORTED = (
    "epoch",
    "epochs_done",
    "train_loss",
    "val_balanced_accuracy",
    METRIC,
    "val_worst_tone_sensitivity",
    TONE_METRIC,
    "train_images_per_s",
    "lr",
    "pseudo_label_rate",
    "workers_cpu_s",
    "worker_wall_s",
    "checkpoint_path",
)


def _log_event(sweep_dir: Path, event: dict[str, Any]) -> None:
    """Append one line to the sweep's trial log (a trial writes its start, the driver the end).

    The log lives on the driver's node; a trial running on another node, where the folder does not exist, skips
    its start line rather than fail (the driver's end line is what resuming relies on)."""
    if not Path(sweep_dir).is_dir():
        return
    with open(sweep_dir / TRIAL_LOG, "a") as log:
        log.write(json.dumps({**event, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def read_trial_log(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The events of ``trials.jsonl``, oldest first, each with ``trial_id`` and ``time``: ``start`` (written by the
    trial as it begins training, with its ``params``), ``end`` (written by the sweep's driver, with the final
    ``result``), ``error``, and ``recalled`` (a trial restarted after a kill that had already ended)."""
    path = Path(sweep_dir) / TRIAL_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_trial(params: dict[str, Any], base: dict[str, Any], sweep_dir: str) -> None:
    """One trial (a Tune function): train the classifier with the trial's values; metrics reach Tune per epoch.

    Args:
        params: the trial's values, keyed by dotted config key.
        base: the experiment config as a plain dict (``run.out`` absolute: Tune runs trials in their own folders).
        sweep_dir: the sweep's folder, for the trial log.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from skinsynth.classify.train import train_classifier
    from skinsynth.core.storage import synced_run

    context = ray.tune.get_context()
    trial_id = context.get_trial_id()
    # the log exists only on the driver's node; a trial on another node finds none and resumes from its Ray Train
    # checkpoint instead, which reports a finished run's last result without training again
    ended = [e for e in read_trial_log(sweep_dir) if e["trial_id"] == trial_id and e["event"] == "end"]
    if ended:
        # the sweep was killed after this trial ended but before Tune saved that: report the recorded final result
        # instead of training again
        _log_event(Path(sweep_dir), {"trial_id": trial_id, "event": "recalled"})
        ray.tune.report(ended[-1]["result"])
        return
    cfg = trial_config(base, params)
    # a remote run: a trial on another node pulls the run into its own copy (splits, cards); the shards are read
    # from the URI and the checkpoints written there, and the driver pushes the rest, so the trial pushes nothing

    def say(message: str) -> None:
        print(f"[trial {trial_id}] {message}")

    with synced_run(cfg.run, progress=say, push=False) as store:
        train_classifier(
            cfg,
            # the trial's own Ray Train storage, in the sweep's folder (Tune's trial folder lies in the Ray
            # session's temporary files, which a restarted Ray does not see): a trial restarted after a kill
            # resumes from it
            storage=store.ray_storage(TUNE_FOLDER, Path(sweep_dir).name, TRIAL_RUNS, f"trial-{trial_id}"),
            callbacks=[TuneReportCallback()],
            export=False,
            progress=say,
        )


def trial_log_callback(sweep_dir: Path, planned: int = 0, progress: Progress | None = None):
    """A Tune callback that records, from the driver, when each trial ended: completed, stopped by ASHA (Tune stops
    the trial's process, so the trial itself cannot say so) or failed; and says so to ``progress`` with the count
    of trials ended out of ``planned``."""
    import ray.tune

    def ended(trial, what: str) -> None:
        done = len({e["trial_id"] for e in read_trial_log(sweep_dir) if e["event"] in ("end", "error")})
        if progress is not None:
            progress(f"tune: trial {trial.trial_id} {what} ({done}/{planned} trials ended)")

    class TrialLog(ray.tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            result = {key: last[key] for key in REPORTED if key in last}
            _log_event(sweep_dir, {"trial_id": trial.trial_id, "event": "end", "result": result})
            score = result.get("best_val_balanced_accuracy")
            ended(trial, "ended" + (f": best validation balanced accuracy {score:.3f}" if score is not None else ""))

        def on_trial_error(self, iteration, trials, trial, **info):
            _log_event(sweep_dir, {"trial_id": trial.trial_id, "event": "error"})
            ended(trial, "failed")

    return TrialLog()


def sweep_stage(cfg: ExperimentConfig, run_dir: Path) -> StageIdentity:
    """What defines a sweep: its training and tune settings (bar the external sets its best model is also scored on)
    and the identities of the prepared and synthetic sets its trials read, so a re-split data set starts the sweep
    again. The data, generator and sample settings reach it through those identities; the audit's and serving's
    never do (a changed audit setting must not start a sweep again)."""
    from skinsynth.core.rundir import current_identity

    # a setting added by an upgrade, at its default, keeps the sweep resumable
    changed = changed_settings(cfg)
    settings = {section: dict(changed[section]) for section in ("train", "tune") if changed.get(section)}
    settings.get("tune", {}).pop("external", None)
    if settings.get("tune") == {}:
        del settings["tune"]
    inputs = {stage: current_identity(run_dir, stage) for stage in ("data", "synthetic")}
    return StageIdentity(f"sweep:{cfg.tune.name}", settings, inputs, config_to_dict(cfg))


def sweep_identity(cfg: ExperimentConfig, run_dir: Path) -> str:
    """The sweep's identity hash (:func:`sweep_stage`)."""
    return sweep_stage(cfg, run_dir).identity


def _check_inputs(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Fail before the sweep, not in one of its trials: prepared data, enough synthetic images for the largest mix
    under every class choice, and a generator whose training labels the smallest label budget keeps."""
    from skinsynth.classify.train import training_inputs

    def numeric(key: str) -> list[float]:
        dim = cfg.tune.space.get(key)
        values = (dim.choice or dim.uniform or dim.loguniform or dim.integer or []) if dim else []
        return [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]

    ratios, fractions = numeric("train.mix.ratio"), numeric("train.label_fraction")
    classes = cfg.tune.space["train.mix.classes"].choice if "train.mix.classes" in cfg.tune.space else None
    settings: dict[str, list[Any]] = {
        "train.mix.ratio": [max(ratios)] if ratios else [],
        "train.label_fraction": sorted({min(fractions), max(fractions)}) if fractions else [],
        "train.mix.classes": list(classes or []),
    }
    combos: list[dict[str, Any]] = [{}]
    for key, values in settings.items():
        combos = [{**combo, key: value} for combo in combos for value in values] if values else combos
    base = config_to_dict(cfg)
    for combo in combos:
        training_inputs(run_dir, trial_config(base, combo).train)


def objectives(tc: Any) -> list[str]:
    """The metrics a sweep maximises: validation balanced accuracy, then optionally the worst tone group's
    malignant sensitivity."""
    return [METRIC, TONE_METRIC] if tc.objective == "balanced_accuracy+worst_tone_sensitivity" else [METRIC]


def pareto_front(values: pd.DataFrame) -> pd.Series:
    """Whether each row is Pareto-optimal when every column is maximised (a NaN row never is).

    A row is on the front when no other row is at least as good in every column and better in one.
    """
    points = values.to_numpy(dtype=float)
    valid = ~np.isnan(points).any(axis=1)
    front = []
    for i, point in enumerate(points):
        others = points[valid & (np.arange(len(points)) != i)]
        dominated = bool(((others >= point).all(axis=1) & (others > point).any(axis=1)).any())
        front.append(bool(valid[i]) and not dominated)
    return pd.Series(front, index=values.index)


def _check_tone_groups(cfg: ExperimentConfig, run_dir: Path) -> None:
    """With the tone objective, validation must hold a tone group with ``train.tone_min_malignant`` malignant
    images, or every trial would report NaN for it."""
    from skinsynth.classify.metrics import is_malignant_label
    from skinsynth.core.shards import load_split_table, read_rows, split_ids

    rows = read_rows(run_dir, split_ids(load_split_table(run_dir), "val"), ["image_id", "tone", "label"])
    malignant = rows[is_malignant_label(rows["label"].to_numpy(np.int64)).numpy()]
    counts = malignant["tone"].dropna().value_counts()
    needed = cfg.train.tone_min_malignant
    if counts.empty or counts.max() < needed:
        found = ", ".join(f"{tone} {n}" for tone, n in counts.items()) or "none with a tone"
        raise SkinsynthError(
            f"tune.objective {cfg.tune.objective!r} needs a tone group with at least {needed} malignant validation "
            f"images (train.tone_min_malignant); validation has {found}: lower train.tone_min_malignant or use "
            "tune.objective=balanced_accuracy"
        )


def _discard_sweep(store: RunStore, sweep_dir: Path) -> None:
    """Delete a sweep's folder, and for a remote run its Tune state and trial checkpoints on the URI too."""
    if sweep_dir.exists():
        shutil.rmtree(sweep_dir)
    if store.remote:
        import pyarrow.fs as pafs

        remote_dir, filesystem = store.ray_storage(TUNE_FOLDER, sweep_dir.name)
        if filesystem.get_file_info(remote_dir).type != pafs.FileType.NotFound:
            filesystem.delete_dir(remote_dir)


def _has_experiment_state(experiment: str, filesystem: Any) -> bool:
    """Whether Tune saved any state of this sweep (``experiment_state-*.json``), locally or on the run's URI."""
    import pyarrow.fs as pafs

    filesystem = filesystem or pafs.LocalFileSystem()
    found = filesystem.get_file_info(pafs.FileSelector(experiment, allow_not_found=True))
    return any(info.base_name.startswith("experiment_state") for info in found)


def _tuner(cfg: ExperimentConfig, store: RunStore, trainable: Any, callback: Any):
    """A new Tuner for this sweep, or the interrupted one restored with its trials and searcher state.

    Tune's state goes to the run's storage: the URI for a remote run (trials on other nodes checkpoint there, and a
    job restarted on a fresh cluster restores from it), else ``RUN_DIR/tune``.
    """
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    tc = cfg.tune
    tune_root, filesystem = store.ray_storage(TUNE_FOLDER)
    experiment = f"{tune_root}/{tc.name}"
    # Tune writes tuner.pkl when the Tuner is made and its state only once fit() runs: a sweep killed in between
    # has nothing to resume (restoring it leaves Optuna without its search space), so it starts afresh
    started = _has_experiment_state(experiment, filesystem)
    if started and ray.tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        restored = ray.tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
        return restored, True
    search_alg = None
    # with two objectives the searcher and the scheduler name their own metrics (Tune's one metric would replace
    # the searcher's list); ASHA stops trials on balanced accuracy alone, the first objective
    two_objectives = len(objectives(tc)) > 1 and tc.search == "optuna"
    if tc.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=tc.seed)  # multi-objective TPE (Ozaki et al. 2020) on two metrics
        if two_objectives:
            search_alg = OptunaSearch(metric=objectives(tc), mode=["max"] * len(objectives(tc)), sampler=sampler)
        else:
            search_alg = OptunaSearch(sampler=sampler)
    scheduler = None
    if tc.scheduler == "asha" and cfg.train.epochs > tc.grace_period:
        scheduler = ASHAScheduler(
            time_attr="epochs_done",  # not Tune's own count, which restarts at 1 when a killed trial resumes
            max_t=cfg.train.epochs,
            grace_period=tc.grace_period,
            reduction_factor=tc.reduction_factor,
            **({"metric": METRIC, "mode": "max"} if two_objectives else {}),
        )
    tuner = ray.tune.Tuner(
        trainable,
        param_space=tune_param_space(tc),
        tune_config=ray.tune.TuneConfig(
            metric=None if two_objectives else METRIC,
            mode=None if two_objectives else "max",
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=tc.num_samples if tc.search == "optuna" else 1,
            max_concurrent_trials=tc.max_concurrent_trials,
            trial_dirname_creator=lambda trial: f"trial-{trial.trial_id}",
            # a reused trial process would start the next trial's data tasks in the previous trial's (released)
            # placement group, where they wait forever
            reuse_actors=False,
        ),
        run_config=ray.tune.RunConfig(
            # verbose 0: no trial tables on the terminal; skinsynth says when each trial ends (trial_log_callback)
            name=tc.name,
            storage_path=tune_root,
            storage_filesystem=filesystem,
            verbose=0,
            callbacks=[callback],
        ),
    )
    return tuner, False


def _watch_hint(store: RunStore, sweep_dir: Path) -> str:
    """Where to watch a running sweep: the Ray dashboard (while this Ray runs) and TensorBoard over the trials'
    event files, which Tune writes into the sweep's own folder in the run's storage
    (``trial-<id>/events.out.tfevents.*``), so they outlive the Ray session: the local folder, or for a remote run
    its URI (without credentials; TensorBoard reads ``s3://`` itself), where Tune keeps them."""
    import ray._private.worker

    dashboard = ray._private.worker.get_dashboard_url()
    where = f"Ray dashboard http://{dashboard}, " if dashboard else ""
    logdir: str | Path = sweep_dir
    if store.remote:
        scheme = store.out.split("://", 1)[0]
        logdir = f"{scheme}://{store.ray_storage(TUNE_FOLDER, sweep_dir.name)[0].lstrip('/')}"
    return f"{where}tensorboard --logdir {logdir} (pip install tensorboard)"


@dataclass
class SweepResult:
    """Where a sweep's outputs went and what it found."""

    sweep_dir: Path
    trials: pd.DataFrame
    best: dict[str, Any] | None
    summary: pd.DataFrame | None


def run_sweep(
    cfg: ExperimentConfig, *, fresh: bool = False, restart_if_changed: bool = False, progress: Progress = print
) -> SweepResult:
    """Run (or resume) the sweep of ``cfg.tune`` on ``RUN_DIR/data`` (and ``RUN_DIR/synthetic``).

    Args:
        cfg: the experiment; ``tune.space`` names what is searched, the rest of the file is every trial's base.
        fresh: discard an earlier sweep of the same name instead of resuming it.
        restart_if_changed: an earlier sweep of this name made with other settings or data is discarded (the
            pipeline's choice) instead of refused (the ``tune`` command's: a sweep is hours of work).
        progress: receives one-line messages.

    Returns:
        A :class:`SweepResult`; also written under ``RUN_DIR/tune/<name>/``.

    Raises:
        ConfigError: a malformed space.
        SkinsynthError: missing inputs, a sweep of this name made with different settings, or no trial finished.
    """
    import ray.tune

    from skinsynth.core.console import active_console, say, stdout_to_log
    from skinsynth.core.ray import ensure_ray

    check_space(cfg)
    store = open_run_store(cfg.run.out, cfg.run.cache_dir)
    run_dir = store.local.resolve()
    sweep_dir = layout(run_dir).sweep(cfg.tune.name)
    identity = sweep_identity(cfg, run_dir)
    info_path = sweep_dir / SWEEP_INFO
    if fresh:
        _discard_sweep(store, sweep_dir)
    changed = info_path.is_file() and json.loads(info_path.read_text())["identity"] != identity
    if changed and restart_if_changed:
        progress(f"tune: settings or data changed since the sweep in {sweep_dir} was made; starting it again")
        _discard_sweep(store, sweep_dir)
    elif changed:
        raise SkinsynthError(
            f"{sweep_dir} holds a sweep made with other settings or data; re-run with --fresh to discard it, or "
            "pick another --set tune.name=..."
        )
    _check_inputs(cfg, run_dir)
    if len(objectives(cfg.tune)) > 1:
        _check_tone_groups(cfg, run_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    info_path.write_text(json.dumps({"identity": identity, "config": config_to_dict(cfg)}, indent=2, default=str))

    # Tune saves the sweep's state every few seconds by default, scaled up when saving is slow; trials here take
    # minutes, so saving often costs nothing and narrows what a kill can lose to about a second
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    ensure_ray(cfg.data.num_cpus)
    base = config_to_dict(cfg)
    if not store.remote:
        base["run"]["out"] = str(run_dir)  # absolute: Tune runs trials in their own folders
    trainable = ray.tune.with_parameters(run_trial, base=base, sweep_dir=str(sweep_dir))
    # the trial function only waits on its Ray Train run, whose workers hold the CPUs and GPUs. It must not hold a
    # CPU, not even a fraction: 0.01 of one leaves 0.99 free beside a worker on a 2-core machine, and Ray Data's
    # one-CPU read tasks then wait forever. Tune refuses an empty request, so it reserves one byte of memory.
    trainable = ray.tune.with_resources(trainable, {"cpu": 0, "memory": 1})
    planned = cfg.tune.num_samples if cfg.tune.search == "optuna" else grid_size(cfg.tune)
    # the trial lines come from Tune's thread while fit() runs with its own prints sent to the log
    trial_lines = say if active_console() is not None else progress
    tuner, restored = _tuner(cfg, store, trainable, trial_log_callback(sweep_dir, planned, trial_lines))
    done_before = {e["trial_id"] for e in read_trial_log(sweep_dir) if e["event"] == "end"}
    progress(
        f"tune: {'resuming' if restored else 'starting'} sweep '{cfg.tune.name}' ({cfg.tune.search}, {planned} "
        f"trials, {len(done_before)} finished before) over {', '.join(cfg.tune.space)} -> {sweep_dir}"
    )
    progress(f"tune: watch it: {_watch_hint(store, sweep_dir)}")
    with stdout_to_log():  # Tune prints its own boxes and tables: RUN_DIR/logs/tune.log, not the terminal
        grid = tuner.fit()
    # Tune catches Ctrl-C itself and returns what it has: an unfinished sweep must not pick and export a "best"
    ended = {e["trial_id"] for e in read_trial_log(sweep_dir) if e["event"] in ("end", "error")}
    if len(ended) < planned:
        progress(
            f"tune: interrupted with {len(ended)} of {planned} trials ended; the state is saved: re-run the same "
            "command to resume"
        )
        raise KeyboardInterrupt
    trials = trials_table(grid, cfg)
    errored = trials[trials["error"].notna()]
    for row in errored.itertuples():
        progress(f"tune: trial {row.trial_id} failed: {row.error}")
    if cfg.tune.search == "grid":
        trials = add_test_metrics(trials, cfg, run_dir, progress)
    if len(objectives(cfg.tune)) > 1:
        trials["pareto"] = pareto_front(trials[objectives(cfg.tune)])
        progress(
            f"tune: {int(trials['pareto'].sum())} trials on the Pareto front of {' and '.join(objectives(cfg.tune))}"
        )
    trials.to_parquet(sweep_dir / SWEEP_TRIALS_PARQUET, index=False)
    trials.drop(columns=["checkpoint_path"]).to_csv(sweep_dir / SWEEP_TRIALS, index=False)
    finished = len(trials) - len(errored)
    progress(f"tune: {finished} of {len(trials)} trials finished; table -> {sweep_dir / SWEEP_TRIALS}")
    summary = None
    if cfg.tune.search == "grid":
        summary = summarise_over_seeds(trials, list(cfg.tune.space))
        summary.to_csv(sweep_dir / SWEEP_SUMMARY, index=False)
        progress("tune: mean ± std over seeds per cell\n" + format_summary(summary))
        if not summary.empty:
            chosen = summary.loc[summary[f"{METRIC}_mean"].idxmax()]
            cell = {key: _plain(chosen[key]) for key in cfg.tune.space}
            progress(f"tune: best cell on mean validation balanced accuracy: {cell} (chosen on validation only)")
    best = export_and_evaluate_best(trials, cfg, run_dir, progress)
    (sweep_dir / SWEEP_BEST).write_text(json.dumps(best, indent=2, default=str))
    write_manifest(sweep_dir, sweep_stage(cfg, run_dir), trials=len(trials), best_trial=best.get("trial_id"))
    return SweepResult(sweep_dir, trials, best, summary)


def trials_table(grid: Any, cfg: ExperimentConfig) -> pd.DataFrame:
    """One row per trial of a Tune ``ResultGrid``: its values, last-reported metrics and checkpoint.

    Each trial's compute (NaN for a trial that never reported): ``wall_s``, the time its training worker ran (from
    its start, model set-up included, to its last epoch; summed over restarts); ``cpu_s``, that worker process's
    CPU time x the trial's workers (Ray Data's read tasks not counted); ``energy_kwh`` and ``co2e_kg``, ``cpu_s``
    under the per-core watt model (``run.cpu_watts_per_core``, ``run.carbon_intensity_g_per_kwh``;
    :func:`skinsynth.core.compute.cpu_model_energy`), an estimate, not a measurement.
    """
    from skinsynth.core.compute import cpu_model_energy

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}  # None for a trial whose process died before it reported
        row = {"trial_id": metrics.get("trial_id") or Path(result.path).name.removeprefix("trial-")}
        cpu_s = float(metrics.get("workers_cpu_s", float("nan")))
        energy_kwh, co2e_kg = cpu_model_energy(cpu_s, cfg.run)
        row.update({key: config.get(key) for key in cfg.tune.space})
        if cfg.tune.seeds:
            row[SEED_KEY] = config.get(SEED_KEY)
        row.update(
            {
                "epochs_run": metrics.get("epochs_done", 0),
                METRIC: metrics.get(METRIC, float("nan")),
                TONE_METRIC: metrics.get(TONE_METRIC, float("nan")),
                "last_val_balanced_accuracy": metrics.get("val_balanced_accuracy", float("nan")),
                "pseudo_label_rate": metrics.get("pseudo_label_rate", float("nan")),
                "wall_s": metrics.get("worker_wall_s", float("nan")),
                "cpu_s": cpu_s,
                "energy_kwh": energy_kwh,
                "co2e_kg": co2e_kg,
                "checkpoint_path": metrics.get("checkpoint_path"),
                "error": str(result.error).splitlines()[0][:300] if result.error else None,
            }
        )
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial_id").reset_index(drop=True)


def _best_state(checkpoint_path: str, cfg: ExperimentConfig) -> dict[str, Any]:
    """The training state in a trial's last checkpoint (its ``best_model`` is the best epoch's weights); on the
    run's URI for a remote run."""
    import ray.train

    from skinsynth.core.raytrain import read_run_checkpoint

    filesystem = open_run_store(cfg.run.out, cfg.run.cache_dir).filesystem
    return read_run_checkpoint(ray.train.Checkpoint(checkpoint_path, filesystem=filesystem))["state"]


def add_test_metrics(trials: pd.DataFrame, cfg: ExperimentConfig, run_dir: Path, progress: Progress) -> pd.DataFrame:
    """Score every finished trial of a grid on the test split (test balanced accuracy and macro AUROC).

    A grid is a designed comparison, not a search: no trial is chosen by these numbers, so reading test for each
    cell does not leak test into a selection. Each trial's best-on-validation weights are scored.
    """
    from skinsynth.classify import metrics as M
    from skinsynth.classify.evaluate import predict_probs
    from skinsynth.classify.models import create_classifier
    from skinsynth.core.ledger import count_test_looks, describe_looks, record_test_look
    from skinsynth.core.shards import load_split_table, read_rows, split_ids
    from skinsynth.data.schema import CLASSES

    test_ids = split_ids(load_split_table(run_dir), "test")
    test = read_rows(run_dir, test_ids, ["image", "label", "group_id", "tone_true"])
    labels = test["label"].to_numpy(np.int64)
    # a source with known true skin tones (phantom): each trial's worst true-tone group, for fairness experiments
    true_tones = test["tone_true"].notna().all() and len(test)
    bacc, auroc, tone_rows = [], [], []
    for row in trials.to_dict("records"):
        if pd.isna(row["checkpoint_path"]) or not row["checkpoint_path"]:  # an errored trial: NaN in the table
            bacc.append(float("nan"))
            auroc.append(float("nan"))
            tone_rows.append({})
            continue
        trial = trial_config(config_to_dict(cfg), {k: _plain(row[k]) for k in cfg.tune.space}).train
        model = create_classifier(
            trial.model, num_classes=len(CLASSES), pretrained="none", input_size=trial.input_size
        )
        model.load_state_dict(_best_state(row["checkpoint_path"], cfg)["best_model"])
        probs = predict_probs(model.eval(), test["image"])
        report = M.classification_metrics(probs, labels)
        if true_tones:
            tone_rows.append(worst_true_tone_sensitivity(probs, test, trial.tone_min_malignant))
        record_test_look(
            run_dir,
            model_id=f"trial:{row['trial_id']}",
            metrics=["balanced_accuracy", "macro_auroc"] + (["worst_true_tone_sensitivity"] if true_tones else []),
            n_images=len(test),
        )
        bacc.append(report["balanced_accuracy"])
        auroc.append(report["macro_auroc"])
    looks = describe_looks(count_test_looks(run_dir))
    progress(f"tune: scored {sum(not math.isnan(b) for b in bacc)} trials on {len(test)} test images; {looks}")
    trials = trials.assign(test_balanced_accuracy=bacc, test_macro_auroc=auroc)
    if true_tones:
        trials = pd.concat([trials.reset_index(drop=True), pd.DataFrame(tone_rows, index=range(len(trials)))], axis=1)
    return trials


def worst_true_tone_sensitivity(probs: np.ndarray, rows: pd.DataFrame, min_malignant: int) -> dict[str, Any]:
    """The worst true-tone group's malignant sensitivity on ``rows`` (malignancy score >= 0.5, the rule training
    reports; groups with at least ``min_malignant`` malignant images), with a 95% lesion-bootstrap interval over
    that group's malignant lesions. The group is picked on the point estimate, so the interval describes that
    group, not the minimum over groups."""
    from skinsynth.classify import metrics as M

    labels = rows["label"].to_numpy(np.int64)
    value, group = M.worst_group_sensitivity(probs, labels, list(rows["tone_true"]), min_malignant=min_malignant)
    if group is None:
        return {TONE_TEST_METRIC: float("nan"), "test_worst_true_tone": None}
    members = (rows["tone_true"] == group).to_numpy() & M.is_malignant_label(labels).numpy()

    def sensitivity(p, _y):  # every row is a malignant image of the group: the share called malignant
        return float((M.malignant_scores(p) >= 0.5).double().mean())

    lesions = rows.loc[members, "group_id"].to_numpy()
    low, high = M.bootstrap_ci(sensitivity, probs[members], labels[members], lesions, n_boot=1000, seed=0)
    return {
        TONE_TEST_METRIC: value,
        "test_worst_true_tone": group,
        "test_worst_true_tone_ci_low": float(low),
        "test_worst_true_tone_ci_high": float(high),
        "test_worst_true_tone_malignant": int(members.sum()),
    }


TONE_TEST_METRIC = "test_worst_true_tone_sensitivity"
SUMMARY_METRICS = [METRIC, "test_balanced_accuracy", "test_macro_auroc", TONE_TEST_METRIC]


def summarise_over_seeds(trials: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Mean, sample standard deviation and count over seeds for every cell (combination of the space's values)."""
    finished = trials[trials["error"].isna()]
    metrics = [m for m in SUMMARY_METRICS if m in finished.columns]
    summary = finished.groupby(keys, dropna=False)[metrics].agg(["mean", "std", "count"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    return summary.reset_index()


def format_summary(summary: pd.DataFrame) -> str:
    """The per-cell summary as aligned text: one line per cell, ``mean ± std (n)`` per metric."""
    keys = [c for c in summary.columns if not any(c.startswith(m) for m in SUMMARY_METRICS)]
    metrics = [m for m in SUMMARY_METRICS if f"{m}_mean" in summary.columns]
    titles = ["val bal. acc", "test bal. acc", "test macro AUROC", "test worst true-tone malignant sens."]
    header = keys + [title for metric, title in zip(SUMMARY_METRICS, titles, strict=True) if metric in metrics]
    lines = []
    for row in summary.to_dict("records"):
        cells = [str(row[k]) for k in keys]
        for metric in metrics:
            mean, std, count = row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_count"]
            cells.append(f"{mean:.3f} ± {0.0 if std != std else std:.3f} (n={count})")  # one seed: no spread
        lines.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*r) for r in lines)])


def export_and_evaluate_best(
    trials: pd.DataFrame, cfg: ExperimentConfig, run_dir: Path, progress: Progress
) -> dict[str, Any]:
    """Copy the best trial on validation to ``RUN_DIR/models/best/`` and evaluate it once (test, external sets).

    The best trial has the highest validation balanced accuracy; with the tone objective that trial is always on
    the Pareto front, and the table's ``pareto`` column shows the trade-offs beside it.

    Raises:
        SkinsynthError: no trial reported a checkpoint.
    """
    from skinsynth.classify.evaluate import evaluate_model
    from skinsynth.classify.train import export_model, model_identity

    usable = trials[trials["checkpoint_path"].notna() & trials[METRIC].notna()]
    if usable.empty:
        raise SkinsynthError("no trial of the sweep finished an epoch; see the errors above")
    # ties on balanced accuracy go to the better worst-tone figure, so the choice is on the Pareto front
    best = usable.sort_values([METRIC, TONE_METRIC], ascending=False, na_position="last").iloc[0]
    params = {key: _plain(best[key]) for key in cfg.tune.space}
    if cfg.tune.seeds:
        params[SEED_KEY] = int(best[SEED_KEY])
    best_cfg = trial_config(config_to_dict(cfg), params)
    best_cfg.train.name = BEST_MODEL
    card = json.loads(layout(run_dir).data_card.read_text())
    sweep = {"sweep": cfg.tune.name, "trial_id": best["trial_id"], "params": params, "chosen_on": "validation"}
    sweep_inputs = {f"sweep:{cfg.tune.name}": sweep_identity(cfg, run_dir)}
    export_model(
        run_dir,
        best_cfg.train,
        _best_state(best["checkpoint_path"], cfg),
        card,
        {"sweep": sweep},
        BEST_MODEL,
        progress=progress,
        identity=model_identity(best_cfg.train, run_dir, sweep_inputs),
    )
    tone = f", worst tone group's malignant sensitivity {best[TONE_METRIC]:.3f}" if pd.notna(best[TONE_METRIC]) else ""
    progress(
        f"tune: best trial {best['trial_id']} (validation balanced accuracy {best[METRIC]:.3f}{tone}) with {params} "
        f"-> {layout(run_dir).model(BEST_MODEL)}"
    )
    report = evaluate_model(best_cfg, external=cfg.tune.external, progress=progress)
    return {
        **sweep,
        METRIC: float(best[METRIC]),
        TONE_METRIC: _plain(best[TONE_METRIC]) if pd.notna(best[TONE_METRIC]) else None,
        "test_balanced_accuracy": report["test"]["balanced_accuracy"],
        "test_macro_auroc": report["test"]["macro_auroc"],
        "external": {k: v["balanced_accuracy"] for k, v in report["external"].items()},
        "report": str(layout(run_dir).evaluation_report(BEST_MODEL)),
    }


def _plain(value: Any) -> Any:
    """numpy scalars from a DataFrame back to Python values (for config building and JSON)."""
    return value.item() if hasattr(value, "item") else value
