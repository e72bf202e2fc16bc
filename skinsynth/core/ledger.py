"""The test ledger: every computation of metrics on a run's test split, one JSON line in
``RUN_DIR/test_ledger.jsonl``.

A test split gives an unbiased estimate only the first time a choice is *not* made on it. Each look that informs
a choice - a recipe kept for its test score, a trial picked by it - spends some of that (Dwork et al. 2015, "The
reusable holdout", Science 349:636). The code chooses epochs, thresholds and trials on validation; the ledger makes
visible what the code cannot prevent: how many times people have looked. ``skinsynth evaluate`` reports the count
of looks at the current data identity's test split and the distinct models they scored, and so do the model card and
the viewer's Evaluation page.

Each line: ``time``, ``command`` (the argv of the process), ``model_id``, ``data_identity`` (the prepared set's
identity: a re-split set is another test split, with its own count), ``metrics`` (what was computed), ``n_images``
and ``git_commit``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from skinsynth.core.rundir import current_identity, layout


def _command() -> str:
    """The command line of this process, as a user would type it (``skinsynth evaluate ...``)."""
    import shlex

    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("skinsynth", "__main__.py"):
        argv[0] = "skinsynth"
    return shlex.join(argv)


def record_test_look(
    run_dir: str | Path, *, model_id: str, metrics: list[str], n_images: int, command: str | None = None
) -> dict[str, Any]:
    """Append one look at ``run_dir``'s test split to its ledger and return the line written.

    Args:
        run_dir: the run directory (its ``data`` manifest gives the data identity).
        model_id: what was scored (a model's stage identity, or ``trial:<id>`` for a sweep trial).
        metrics: the metrics computed on test.
        n_images: test images scored.
        command: the command (default: this process's argv).
    """
    from skinsynth.core.ray import git_commit

    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command or _command(),
        "model_id": model_id,
        "data_identity": current_identity(run_dir, "data"),
        "metrics": sorted(metrics),
        "n_images": int(n_images),
        "git_commit": git_commit(),
    }
    path = layout(run_dir).test_ledger
    with path.open("a", encoding="utf-8") as ledger:  # one write per line: appends do not interleave
        ledger.write(json.dumps(entry) + "\n")
    return entry


def read_ledger(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every line of the run's test ledger (a line that does not parse is skipped: the file is append-only)."""
    path = layout(run_dir).test_ledger
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def count_test_looks(run_dir: str | Path, data_identity: str | None = None) -> dict[str, Any]:
    """How often the test split of ``data_identity`` (default: the run's current one) has been looked at:
    ``{"data_identity", "looks", "models", "ledger"}``."""
    identity = data_identity or current_identity(run_dir, "data")
    looks = [e for e in read_ledger(run_dir) if e.get("data_identity") == identity]
    return {
        "data_identity": identity,
        "looks": len(looks),
        "models": len({e.get("model_id") for e in looks}),
        "ledger": str(layout(run_dir).test_ledger),
    }


def describe_looks(looks: dict[str, Any]) -> str:
    """``test split looked at 3 times, by 2 models (ledger: ...)``."""
    times = "once" if looks["looks"] == 1 else f"{looks['looks']} times"
    models = "1 model" if looks["models"] == 1 else f"{looks['models']} models"
    return f"test split looked at {times}, by {models} (ledger: {looks['ledger']})"
