"""The command's terminal: skinsynth's lines on it; Ray's (file descriptors 1 and 2, worker lines) in the log."""

from __future__ import annotations

import os
import time

from skinsynth.core.console import WORKER_PROGRESS_MARK, quiet_terminal, set_run_dir, stage_log, worker_progress


def _wait_for(path, text: str, timeout_s: float = 5.0) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never reached {path}")


def test_skinsynth_lines_reach_the_terminal_and_fd_writes_and_worker_lines_go_to_the_stage_log(tmp_path, capsys):
    with quiet_terminal() as console:
        set_run_dir(tmp_path)
        with stage_log("train") as log:
            print("train: running (no previous output)")
            # what Ray's C++ core and its loggers write: straight to the process's file descriptors
            os.write(2, b"[2026-12-05 E 1 1] core_worker.cc:2465: Actor with class name ...\n")
            os.write(1, b"INFO streaming_executor.py:215 -- Starting execution of Dataset\n")
            console.worker_line("Checkpoint successfully created at: ...", "RayTrainWorker pid=7")
            console.worker_line(
                f"{WORKER_PROGRESS_MARK}2/3/epochs train: epoch 2/3  loss 1.76", "RayTrainWorker pid=7"
            )
            _wait_for(log, "streaming_executor")
        assert log == tmp_path / "logs" / "train.log"
    out = capsys.readouterr().out
    assert out.splitlines() == ["train: running (no previous output)", "train: epoch 2/3  loss 1.76"]
    content = log.read_text()
    assert "core_worker.cc" in content and "streaming_executor" in content
    assert "(RayTrainWorker pid=7) Checkpoint successfully created" in content
    assert "train: epoch 2/3" in content  # the terminal's lines are in the log too, in their place


def test_verbose_shows_the_log_lines_on_the_terminal_too(tmp_path, capsys):
    with quiet_terminal(verbose=True) as console:
        set_run_dir(tmp_path)
        with stage_log("prepare"):
            console.worker_line("Progress bars disabled.", "SplitCoordinator pid=3")
    assert "(SplitCoordinator pid=3) Progress bars disabled." in capsys.readouterr().out
    assert "Progress bars disabled." in (tmp_path / "logs" / "prepare.log").read_text()


def test_an_error_names_the_log_of_the_stage_it_left(tmp_path, capsys):
    with quiet_terminal() as console:
        set_run_dir(tmp_path)
        try:
            with stage_log("audit"):
                raise RuntimeError("boom")
        except RuntimeError:
            console.error("skinsynth: error: RuntimeError: boom")
        console.error("skinsynth: error: a bad setting", with_log=False)  # a user's error: one line
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "skinsynth: error: RuntimeError: boom",
        f"full log: {tmp_path / 'logs' / 'audit.log'}",
        "skinsynth: error: a bad setting",
    ]


def test_a_worker_progress_line_is_its_plain_text_without_a_console(capsys):
    worker_progress("generate train: step 5/60", 5, 60, "steps")
    line = capsys.readouterr().out.strip()
    assert line == f"{WORKER_PROGRESS_MARK}5/60/steps generate train: step 5/60"
