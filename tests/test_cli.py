from __future__ import annotations

import re
import subprocess
import sys

from skinsynth.cli import main
from tests.conftest import BAD_EXPECTED


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
    quarantined = len(BAD_EXPECTED) + 1  # every bad file, plus the duplicated metadata row
    assert "images: 15 at 32 px" in printed and f"quarantined: {quarantined}" in printed
    # the terminal names the first quarantined files with their reasons, and where the rest are
    named = re.findall(r"^  quarantined (\S+)(?: \(.+\))?: (.+)$", printed, re.MULTILINE)
    assert len(named) == 5 and all(reason for _id, reason in named), printed
    assert f"{quarantined - 5} more: {out / 'data' / 'quarantine.csv'}" in printed
    assert (out / "config.yaml").is_file()
    assert main(["data", "summary", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "mel" in summary and "truncated or corrupt image" in summary
    assert "research tool, not a medical device" in summary
