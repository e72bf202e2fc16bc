"""Compute and energy of a stage (skinsynth/core/compute.py) and the run summary's compute table: cheap, no Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from skinsynth.config import RunConfig
from skinsynth.core.compute import record_compute, recorded_compute, track_compute
from skinsynth.core.rundir import MANIFEST, StageIdentity, read_manifest, write_manifest

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def _burn(seconds: float) -> None:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


@pytest.mark.parametrize("use_codecarbon", [True, False])
def test_track_compute_counts_this_process_and_its_children(use_codecarbon, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # CodeCarbon must leave no emissions.csv behind
    run = RunConfig(carbon_intensity_g_per_kwh=300.0, cpu_watts_per_core=10.0)
    with track_compute(run, sample_s=0.2, use_codecarbon=use_codecarbon) as meter:
        subprocess.run([sys.executable, "-c", BURN.format(s=0.5)], check=True)  # a reaped child
        _burn(0.5)
    figures = meter.figures
    assert figures["cpu_s"] >= 0.95, figures
    # the two burns ran one after the other (CPU time may exceed wall time: CodeCarbon's and the sampler's threads)
    assert figures["wall_s"] >= 0.95
    assert figures["energy_kwh"] > 0
    assert figures["co2e_kg"] == pytest.approx(figures["energy_kwh"] * 300.0 / 1000)
    assert figures["carbon_intensity_g_per_kwh"] == 300.0
    assert figures["peak_rss_mb"] > 0
    assert figures["energy_method"].startswith("codecarbon" if use_codecarbon else "model: CPU time x 10 W")
    if not use_codecarbon:
        assert figures["energy_kwh"] == pytest.approx(figures["cpu_s"] * 10.0 / 3.6e6)
    if figures["gpu_count"] == 0:
        assert figures["gpu_s"] is None and figures["gpu_model"] is None
    assert list(tmp_path.iterdir()) == []
    json.dumps(figures)  # goes into a manifest as it is


# a child that forks a grandchild and reaps it without adding its CPU time to its own, as Ray's raylet does its workers
RAYLET_LIKE = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
    "if os.fork() == 0:\n"
    "    t = time.process_time()\n"
    "    while time.process_time() - t < 0.6: pass\n"
    "    os._exit(0)\n"
    "time.sleep(1.0)\n"
)


def test_track_compute_counts_a_descendant_whose_parent_discards_its_cpu_time():
    with track_compute(sample_s=0.1, use_codecarbon=False) as meter:
        subprocess.run([sys.executable, "-c", RAYLET_LIKE], check=True)
    # the grandchild's 0.6 s, less at most the sampling interval after its last sample
    assert meter.figures["cpu_s"] >= 0.5, meter.figures


def test_record_compute_merges_into_the_stage_manifest(tmp_path):
    identity = StageIdentity("audit", {"gallery_pairs": 4}, {"data": "abc"})
    write_manifest(tmp_path, identity, note="kept")
    figures = {"wall_s": 2.0, "cpu_s": 3.0, "energy_kwh": 1e-5, "co2e_kg": 4.75e-6}
    assert record_compute(tmp_path, figures) == tmp_path / MANIFEST
    manifest = read_manifest(tmp_path)
    assert manifest["identity"] == identity.identity and manifest["note"] == "kept"
    assert manifest["compute"] == figures == recorded_compute(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]  # no temporary file left
    assert record_compute(tmp_path / "missing", figures) is None  # a stage without a manifest: nothing written
    assert not (tmp_path / "missing").exists()


def test_run_summary_prints_compute_per_stage_and_the_total_of_stages_that_ran(tmp_path):
    from skinsynth.config import ExperimentConfig
    from skinsynth.pipeline import StageOutcome, format_run_summary

    def figures(wall, cpu, mb, kwh):
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "gpu_s": None,
            "peak_rss_mb": mb,
            "energy_kwh": kwh,
            "co2e_kg": kwh * 0.475,
            "energy_method": "codecarbon (TDP model: Some CPU 8 W)",
            "carbon_intensity_g_per_kwh": 475.0,
        }

    cfg = ExperimentConfig()
    cfg.run.out = str(tmp_path)
    outcomes = [
        StageOutcome("prepare", 0.1, True, "up to date", figures(100.0, 150.0, 900.0, 0.002)),
        StageOutcome("train", 10.0, False, "trained", figures(10.0, 18.0, 1200.0, 0.001)),
        StageOutcome("evaluate", 5.0, False, "evaluated", figures(5.0, 4.0, 800.0, 0.0005)),
        StageOutcome("tune", 0.0, True, "no sweep (tune.space is empty)"),
    ]
    lines = format_run_summary(cfg, outcomes).splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.split()[:1] == ["compute"]) :]
    rows = {line.split()[0]: line.split() for line in table if len(line.split()) >= 7}
    assert rows["compute"][1:] == ["wall", "s", "CPU", "s", "GPU", "s", "peak", "MB", "energy", "Wh", "g", "CO2e"]
    assert rows["prepare"][:2] == ["prepare", "(earlier)"]
    assert rows["train"][1:] == ["10.0", "18.0", "-", "1200", "1.000", "0.475"]
    # the total counts the stages that ran, not the earlier figures of skipped ones; peak memory is the highest
    assert rows["TOTAL"][:3] == ["TOTAL", "(2", "ran)"]
    assert rows["TOTAL"][3:] == ["15.0", "22.0", "-", "1200", "1.500", "0.713"]
    assert "tune" not in rows  # no figures: no row
    assert any("'(earlier)': skipped as up to date, not counted" in line for line in lines)
    assert any("codecarbon (TDP model: Some CPU 8 W)" in line and "475 g/kWh" in line for line in lines)


def test_the_viewer_tabulates_each_stage_s_recorded_compute_with_a_total(tmp_path):
    from skinsynth.view.runs import compute_table

    assert compute_table(tmp_path) is None
    for stage, folder, cpu in (("data", "data", 2.0), ("model:classifier", "models/classifier", 6.0)):
        (tmp_path / folder).mkdir(parents=True)
        write_manifest(tmp_path / folder, StageIdentity(stage, {}, {}))
        figures = {"wall_s": cpu / 2, "cpu_s": cpu, "peak_rss_mb": cpu * 100, "energy_kwh": cpu / 1000}
        record_compute(tmp_path / folder, {**figures, "co2e_kg": cpu / 2000, "energy_method": "m"})
    (tmp_path / "eval" / "classifier").mkdir(parents=True)  # a stage that recorded no compute: no row
    write_manifest(tmp_path / "eval" / "classifier", StageIdentity("eval:classifier", {}, {}))
    table = compute_table(tmp_path)
    assert table["stage"].tolist() == ["data", "model:classifier", "TOTAL"]
    total = table.iloc[-1]
    assert (total["CPU s"], total["wall s"], total["peak MB"], total["energy Wh"]) == (8.0, 4.0, 600.0, 8.0)
    assert total["CO2e g"] == pytest.approx(4.0) and total["energy measured by"] == "m"
