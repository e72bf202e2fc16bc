from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd

from skinsynth.cli import main
from tests.conftest import DEMO_SMALL


def _trained_outputs(run_dir) -> dict:
    """What a re-split must change: the split table, the Ray Train runs, and the exported weights."""
    import torch
    from safetensors.torch import load_file

    def model(name: str) -> dict:
        return torch.load(run_dir / "models" / name / "model.pt", map_location="cpu", weights_only=True)

    return {
        "splits": (run_dir / "data" / "splits.parquet").read_bytes(),
        "runs": {p: {d.name for d in (run_dir / "ray_train").glob(f"{p}-*")} for p in ("classifier", "generator")},
        "classifier": model("classifier"),
        "best": model("best"),
        "generator": load_file(next((run_dir / "generator" / "unet").glob("*.safetensors"))),
    }


def _weights_differ(a: dict, b: dict) -> bool:
    return any(not a[k].equal(b[k]) for k in a if a[k].is_floating_point())


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skinsynth.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_missing_source_path_is_one_clear_line(tmp_path):
    proc = _run(
        "data", "prepare", "--source", "ham10000", "--path", str(tmp_path / "nope"), "--out", str(tmp_path / "r")
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"skinsynth: error: source path does not exist: {tmp_path / 'nope'}"]
    assert not (tmp_path / "r" / "data").exists()


def test_summary_of_a_run_without_data_says_what_to_do(tmp_path, capsys):
    assert main(["data", "summary", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no data card at" in err and "skinsynth data prepare" in err


def test_prepare_then_summary_on_messy_folder(messy_ham_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "data",
            "prepare",
            "--source",
            "ham10000",
            "--path",
            str(messy_ham_dir),
            "--out",
            str(out),
            "--size",
            "32",
            "--engine",
            "local",
            "--set",
            "data.split.val_fraction=0.2",
            "--set",
            "data.split.test_fraction=0.2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "images: 15 at 32 px" in printed and "quarantined: 9" in printed
    assert (out / "config.yaml").is_file()
    assert main(["data", "summary", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "mel" in summary and "truncated or corrupt image" in summary
    assert "research tool, not a medical device" in summary


def test_demo_runs_end_to_end_on_phantom(ray_local, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *DEMO_SMALL]) == 0
    printed = capsys.readouterr().out
    assert "SIMULATED phantom data" in printed
    assert "images: 70 at 64 px" in printed
    assert "run summary: demo" in printed
    assert re.search(r"^  evaluate\s+[0-9.]+ s  test balanced accuracy", printed, re.MULTILINE)
    assert (out / "eval" / "classifier" / "report.json").is_file()
    assert (out / "generator" / "grid.png").is_file()
    card = json.loads((out / "synthetic" / "synthetic_card.json").read_text())
    assert card["images"] > 0 and card["synthetic"] is True
    report = json.loads((out / "eval" / "classifier" / "report.json").read_text())
    assert report["synthetic_conditioning"]["n"] == card["images"]
    audit = json.loads((out / "audit" / "report.json").read_text())
    assert audit["images"]["synthetic"] == card["images"] and isinstance(audit["gate"]["share_ok"], bool)
    assert re.search(r"^  audit\s+[0-9.]+ s  memorised [0-9.]+%, attack AUC", printed, re.MULTILINE)
    assert re.search(r"^  tune\s+[0-9.]+ s  best trial \w+: val balanced accuracy [0-9.]+", printed, re.MULTILINE)
    assert len(pd.read_parquet(out / "tune" / "demo_sweep" / "trials.parquet")) == 1
    assert (out / "models" / "best" / "model.pt").is_file() and (out / "eval" / "best" / "report.json").is_file()
    # second run: every stage is up to date and skipped
    assert main(["demo", "--out", str(out), *DEMO_SMALL]) == 0
    summary = capsys.readouterr().out
    for stage in ("prepare", "generate", "sample", "train", "audit", "evaluate", "tune"):
        assert re.search(rf"^  {stage}\s+skipped", summary, re.MULTILINE), stage
    # a changed training setting re-runs training and evaluation, not prepare
    assert main(["demo", "--out", str(out), *DEMO_SMALL, "--set", "train.lr=0.002"]) == 0
    summary = capsys.readouterr().out
    assert re.search(r"^  prepare\s+skipped", summary, re.MULTILINE)
    assert re.search(r"^  generate\s+skipped", summary, re.MULTILINE)
    assert not re.search(r"^  train\s+skipped", summary, re.MULTILINE)
    assert not re.search(r"^  audit\s+skipped", summary, re.MULTILINE)  # the classifier is one of its extractors
    assert not re.search(r"^  evaluate\s+skipped", summary, re.MULTILINE)
    assert not re.search(r"^  tune\s+skipped", summary, re.MULTILINE)  # its trials' base config changed
    # the classifier's own manifest records the --set value it ran with (config.yaml is the run's, not the stage's)
    assert json.loads((out / "models" / "classifier" / "manifest.json").read_text())["config"]["lr"] == 0.002

    # Regression: a re-split once resumed the finished Ray Train runs of the old split (their names hashed only the
    # source files) and exported their weights, whose training lesions could now be test lesions. A re-split is a
    # new data identity: every stage downstream re-runs, saying why, in new Ray Train runs with new weights.
    before = _trained_outputs(out)
    assert main(["demo", "--out", str(out), *DEMO_SMALL, "--set", "train.lr=0.002", "--set", "data.split.seed=7"]) == 0
    summary = capsys.readouterr().out
    assert not re.search(r"^  prepare\s+skipped", summary, re.MULTILINE)
    for stage in ("generate", "sample", "train", "audit", "evaluate", "tune"):
        assert re.search(rf"^{stage}: running \(data changed \(\w+ -> \w+\)", summary, re.MULTILINE) or (
            stage in ("sample", "audit")
            and re.search(rf"^{stage}: running \(generator changed", summary, re.MULTILINE)
        ), stage
        assert not re.search(rf"^  {stage}\s+skipped", summary, re.MULTILINE), stage
    after = _trained_outputs(out)
    assert before["splits"] != after["splits"]
    for prefix in ("classifier", "generator"):
        assert len(after["runs"][prefix] - before["runs"][prefix]) == 1, f"no new Ray Train run of {prefix}"
    for weights in ("classifier", "generator", "best"):
        assert _weights_differ(before[weights], after[weights]), weights
    assert "STALE" not in summary
