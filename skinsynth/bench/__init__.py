"""``skinsynth bench ...``: performance measurements, each against a plain baseline in the same run.

One module per benchmark: :mod:`~skinsynth.bench.prepare` (Ray Data preparation), :mod:`~skinsynth.bench.train`
(a Ray Train epoch), :mod:`~skinsynth.bench.sample` (the sampler's actor pool), :mod:`~skinsynth.bench.serve`
(the Serve endpoint under load) and :mod:`~skinsynth.bench.predict` (Ray Data batch prediction). Every benchmark
writes a JSON record with the machine (cores, GPUs, versions) next to the figures, and prints both throughputs and
their ratio. Timed assertions never live in tests; they live here.

This package sits above the stages: it may import any of them, and none of them imports it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skinsynth.core.ray import machine_info

Progress = Callable[[str], None]


def with_machine(record: dict[str, Any]) -> dict[str, Any]:
    """Add the machine the figures were measured on (``record["machine"]``) and return the record."""
    record["machine"] = machine_info()
    return record


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """``a / b`` rounded to ``digits``, or None when either side is missing or ``b`` is 0."""
    return round(a / b, digits) if a is not None and b else None


def write_record(record: dict[str, Any], path: str | Path) -> Path:
    """Write a benchmark record as JSON (creating folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path
