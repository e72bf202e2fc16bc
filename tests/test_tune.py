"""``skinsynth tune``: the search space from the experiment file, the per-cell summary, and a real sweep on phantom
data (Ray Tune + Optuna + ASHA, trials as Ray Train runs) that is killed after its first trial and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from skinsynth.config import ConfigError, load_config
from skinsynth.errors import SkinsynthError
from skinsynth.tune.space import check_space, grid_size, trial_config, tune_param_space
from skinsynth.tune.sweep import (
    add_test_metrics,
    format_summary,
    pareto_front,
    read_trial_log,
    run_sweep,
    summarise_over_seeds,
    sweep_identity,
    worst_true_tone_sensitivity,
)


def test_sweep_identity_ignores_where_it_runs_and_external_sets_but_not_settings(tmp_path):
    base = sweep_identity(load_config(None, ["train.lr=0.002"]), tmp_path)
    elsewhere = load_config(None, ["train.lr=0.002", f"run.out={tmp_path / 'other'}", "tune.external=[runs/isic]"])
    assert sweep_identity(elsewhere, tmp_path) == base
    assert sweep_identity(load_config(None, ["train.lr=0.003"]), tmp_path) != base
    assert sweep_identity(load_config(None, ["train.lr=0.002", "tune.num_samples=3"]), tmp_path) != base


def _write(tmp_path: Path, tune: dict, **sections) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"tune": tune, **sections}))
    return path


def test_space_keys_and_values_are_checked_against_the_config_schema(tmp_path):
    ok = load_config(_write(tmp_path, {"space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}))
    check_space(ok)
    cases = [
        ({"train.lrr": {"uniform": [0.1, 0.2]}}, "did you mean 'train.lr'"),
        ({"train.ssl.method": {"choice": ["fixmatch", "mixmatch"]}}, "train.ssl.method"),
        ({"train.lr": {"loguniform": [0, 0.1]}}, "low > 0"),
        ({"train.lr": {"uniform": [0.1, 0.01]}}, "low < high"),
        ({"train.lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}, "exactly one"),
        ({"data.preprocess.size": {"choice": [32, 64]}}, "training settings"),
        ({}, "tune.space is empty"),
    ]
    for space, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_space(load_config(_write(tmp_path, {"space": space})))
    grid = {"search": "grid", "scheduler": "none"}
    with pytest.raises(ConfigError, match="must be a choice"):
        check_space(load_config(_write(tmp_path, {**grid, "space": {"train.lr": {"uniform": [0.1, 0.2]}}})))
    with pytest.raises(ConfigError, match="set tune.scheduler to none"):
        check_space(load_config(_write(tmp_path, {"search": "grid", "space": {"train.lr": {"choice": [0.1, 0.2]}}})))
    with pytest.raises(ConfigError, match="unknown config key 'tune.spaces'"):
        load_config(_write(tmp_path, {"spaces": {}}))


def test_grid_space_repeats_every_cell_over_the_seeds_and_trial_configs_carry_the_values(tmp_path):
    cfg = load_config(
        _write(
            tmp_path,
            {
                "search": "grid",
                "scheduler": "none",
                "seeds": [0, 1, 2],
                "space": {
                    "train.label_fraction": {"choice": [0.05, 0.1, 0.2, 1.0]},
                    "train.mix.ratio": {"choice": [0, 1, 5]},
                    "train.ssl.method": {"choice": ["none", "fixmatch"]},
                },
            },
        )
    )
    check_space(cfg)
    assert grid_size(cfg.tune) == 72
    space = tune_param_space(cfg.tune)
    assert space["train.seed"] == {"grid_search": [0, 1, 2]}
    assert space["train.mix.ratio"] == {"grid_search": [0, 1, 5]}
    from skinsynth.config import config_to_dict

    trial = trial_config(config_to_dict(cfg), {"train.mix.ratio": 5, "train.ssl.method": "fixmatch", "train.seed": 2})
    assert trial.train.mix.ratio == 5.0 and trial.train.ssl.method == "fixmatch" and trial.train.seed == 2
    assert trial.tune.space == {}  # a trial does not sweep


def test_summary_gives_mean_and_sample_std_per_cell_over_seeds():
    trials = pd.DataFrame(
        {
            "trial_id": list("abcdef"),
            "train.ssl.method": ["none"] * 3 + ["fixmatch"] * 3,
            "train.seed": [0, 1, 2] * 2,
            "best_val_balanced_accuracy": [0.5, 0.6, 0.7, 0.6, 0.6, 0.6],
            "test_balanced_accuracy": [0.40, 0.50, 0.60, 0.55, 0.65, np.nan],
            "test_macro_auroc": [0.8, 0.8, 0.8, 0.9, 0.7, 0.8],
            "error": [None] * 5 + ["boom"],
        }
    )
    summary = summarise_over_seeds(trials, ["train.ssl.method"]).set_index("train.ssl.method")
    assert summary.loc["none", "test_balanced_accuracy_mean"] == pytest.approx(0.5)
    assert summary.loc["none", "test_balanced_accuracy_std"] == pytest.approx(0.1)  # sample std of .4 .5 .6
    # the errored trial is left out of its cell
    assert summary.loc["fixmatch", "test_balanced_accuracy_count"] == 2
    assert summary.loc["fixmatch", "test_macro_auroc_std"] == pytest.approx(np.std([0.9, 0.7], ddof=1))
    text = format_summary(summary.reset_index())
    assert "0.500 ± 0.100 (n=3)" in text and "fixmatch" in text


def test_the_worst_true_tone_group_and_its_lesion_interval():
    """Malignant sensitivity per true tone on a hand-built test set: dark finds 3 of 12 malignant images (the
    worst), light 10 of 12; 'tan' has only 4 malignant images and is not judged; benign images do not count."""
    tones = ["dark"] * 12 + ["light"] * 12 + ["tan"] * 4 + ["dark"] * 6
    labels = [4] * 28 + [5] * 6  # mel, then nv (benign)
    found = [1] * 3 + [0] * 9 + [1] * 10 + [0] * 2 + [0] * 4 + [1] * 6
    probs = np.array([[0, 0, 0, 0, 0.9, 0.1, 0] if f else [0, 0, 0, 0, 0.1, 0.9, 0] for f in found])
    rows = pd.DataFrame(
        {"label": labels, "tone_true": tones, "group_id": [f"lesion{i // 2}" for i in range(34)]}  # two views each
    )
    result = worst_true_tone_sensitivity(probs, rows, min_malignant=10)
    assert result["test_worst_true_tone"] == "dark"
    assert result["test_worst_true_tone_sensitivity"] == pytest.approx(3 / 12)
    assert result["test_worst_true_tone_malignant"] == 12
    assert 0.0 <= result["test_worst_true_tone_ci_low"] < 0.25 < result["test_worst_true_tone_ci_high"] < 0.75
    assert worst_true_tone_sensitivity(probs, rows, min_malignant=13)["test_worst_true_tone"] is None


SWEEP = {
    "run": {"name": "phantom_sweep"},
    "data": {"phantom": {"n_images": 140}, "preprocess": {"size": 32}},
    "train": {
        "model": "test_efficientnet",
        "pretrained": "none",
        "epochs": 2,
        "batch_size": 16,
        "ssl": {"unlabelled_ratio": 1},
        "tone_min_malignant": 2,  # 21 validation images: three tone groups hold 2-3 malignant ones
    },
    "tune": {
        "name": "resume",
        # two objectives: the searcher that must survive the kill is Optuna's multi-objective TPE
        "objective": "balanced_accuracy+worst_tone_sensitivity",
        "num_samples": 2,
        "grace_period": 1,
        "space": {
            "train.lr": {"loguniform": [0.001, 0.02]},
            "train.ssl.method": {"choice": ["none", "fixmatch"]},
            "train.label_fraction": {"choice": [0.5, 1.0]},
        },
    },
}


def _sweep_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "skinsynth.cli", "tune", "--config", str(config)]


@pytest.mark.slow
def test_phantom_sweep_of_2_trials_killed_after_one_resumes_without_repeating_finished_trials(ray_local, tmp_path):
    from skinsynth.data.prepare import prepare_images
    from tests.conftest import RAY_INTERNALS

    out = tmp_path / "run"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({**SWEEP, "run": {**SWEEP["run"], "out": str(out)}}))
    prepare_images(load_config(config).data, out, engine="local", progress=lambda _m: None)
    # the sweep runs as its own driver on this session's Ray, as `ray job submit` would run it on a cluster
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    sweep_dir = out / "tune" / "resume"
    first = subprocess.Popen(_sweep_command(config), env=env, start_new_session=True, text=True)
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None:
        if sum(e["event"] == "end" for e in read_trial_log(sweep_dir)) >= 1:
            break
        time.sleep(1)
    assert first.poll() is None, "the sweep ended (or died) before it could be killed after its first trial"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = read_trial_log(sweep_dir)
    finished_before = {e["trial_id"] for e in before if e["event"] == "end"}
    assert len(finished_before) == 1  # trials run one at a time (tune.max_concurrent_trials)

    resumed = subprocess.run(_sweep_command(config), env=env, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{len(finished_before)} finished before" in resumed.stdout
    # the terminal holds skinsynth's lines; Ray's and Tune's own go to RUN_DIR/logs/tune.log
    terminal = resumed.stdout + resumed.stderr
    for internal in RAY_INTERNALS:
        assert internal not in terminal, internal
    assert "Configuration for experiment" in (out / "logs" / "tune.log").read_text()  # Tune's box, in the log
    # where to watch: TensorBoard over the sweep's own folder, which holds the trials' event files
    assert f"tensorboard --logdir {sweep_dir}" in resumed.stdout
    assert list(sweep_dir.glob("trial-*/events.out.tfevents.*"))
    events = read_trial_log(sweep_dir)
    after = events[len(before) :]
    restarted = {e["trial_id"] for e in after if e["event"] == "start"}
    assert not restarted & finished_before  # no finished trial ran again
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    assert len(trials) == 2 and trials["trial_id"].is_unique
    assert trials["error"].isna().all()
    assert finished_before < set(trials["trial_id"])
    # ASHA stopped some trials after their first epoch; every trial reported at least one
    assert (trials["epochs_run"] >= 1).all() and trials["best_val_balanced_accuracy"].notna().all()
    # every trial reported the second objective, and the table marks the Pareto front, best trial included
    sensitivity = trials["best_val_worst_tone_sensitivity"]
    assert sensitivity.notna().all() and sensitivity.between(0, 1).all()
    assert trials["pareto"].any() and f"{int(trials['pareto'].sum())} trials on the Pareto front" in resumed.stdout
    best = json.loads((sweep_dir / "best.json").read_text())
    assert trials.set_index("trial_id").loc[best["trial_id"], "pareto"]  # the exported trial is on the front
    assert best["best_val_balanced_accuracy"] == pytest.approx(trials["best_val_balanced_accuracy"].max())
    assert best["chosen_on"] == "validation"
    assert (out / "models" / "best" / "model.pt").is_file()
    report = json.loads((out / "eval" / "best" / "report.json").read_text())
    assert 0.0 <= report["test"]["balanced_accuracy"] <= 1.0

    # the same command once more: the sweep is complete, so nothing trains
    again = subprocess.run(_sweep_command(config), env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [e for e in read_trial_log(sweep_dir)[len(events) :] if e["event"] == "start"]


def test_a_sweep_killed_before_tune_saved_any_state_is_not_restored(tmp_path):
    """Tune writes tuner.pkl when the Tuner is made and its experiment state only once fit() runs; a sweep killed in
    between (the Ray job test stops the demo as its sweep starts) must start afresh, not restore an empty Tuner."""
    from skinsynth.tune.sweep import _has_experiment_state

    experiment = tmp_path / "tune" / "demo_sweep"
    assert not _has_experiment_state(str(experiment), None)  # no folder yet
    experiment.mkdir(parents=True)
    (experiment / "tuner.pkl").write_bytes(b"made, never fitted")
    assert not _has_experiment_state(str(experiment), None)
    (experiment / "experiment_state-2026-12-02_07-46-00.json").write_text("{}")
    assert _has_experiment_state(str(experiment), None)


def test_pareto_front_keeps_the_trials_no_other_beats_in_both_objectives():
    values = pd.DataFrame(
        {
            "best_val_balanced_accuracy": [0.60, 0.55, 0.50, 0.60, 0.40, float("nan")],
            "best_val_worst_tone_sensitivity": [0.50, 0.80, 0.70, 0.40, 0.80, 0.99],
        }
    )
    # 0: best accuracy; 1: best sensitivity; 2 is beaten by 1 in both; 3 by 0 in sensitivity at equal accuracy;
    # 4 ties 1 on sensitivity with lower accuracy; a trial that reported no figure is never on the front
    assert pareto_front(values).tolist() == [True, True, False, False, False, False]


def test_the_tone_objective_needs_enough_malignant_validation_images_and_errored_trials_get_no_test_score(tmp_path):
    from skinsynth.data.prepare import prepare_images

    config = tmp_path / "sweep.yaml"
    settings = {**SWEEP, "run": {**SWEEP["run"], "out": str(tmp_path / "run")}}
    settings["train"] = {**SWEEP["train"], "tone_min_malignant": 4}
    config.write_text(yaml.safe_dump(settings))
    cfg = load_config(config)
    prepare_images(cfg.data, tmp_path / "run", engine="local", progress=lambda _m: None)
    with pytest.raises(SkinsynthError, match=r"at least 4 malignant validation images .* brown 3"):
        run_sweep(cfg)
    # a grid's test scoring leaves a trial that errored before its first checkpoint without figures
    errored = pd.DataFrame(
        {"trial_id": ["a"], "train.lr": [0.01], "train.ssl.method": ["none"], "train.label_fraction": [1.0]}
    ).assign(checkpoint_path=[float("nan")])
    scored = add_test_metrics(errored, cfg, tmp_path / "run", progress=lambda _m: None)
    assert scored[["test_balanced_accuracy", "test_macro_auroc"]].isna().all(axis=None)
