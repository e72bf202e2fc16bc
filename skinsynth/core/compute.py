"""Compute and energy of a stage: wall and CPU time, peak memory, GPU time, energy and its CO2e.

Each stage that runs records a ``compute`` block in its ``manifest.json`` (:func:`record_compute`), measured by
:func:`track_compute` around the stage's work:

``wall_s``
    measured: elapsed time.
``cpu_s``
    measured: CPU time (user + system) of this process and its descendants over the stage, sampled every
    ``sample_s`` and at the start and end (:class:`ProcessTree`): a process that exits mid-stage counts to its last
    sample, and children too short-lived to be sampled count through the parent that reaped them. (Ray's raylet
    reaps its workers without adding their time to its own, so reaped-children times alone would lose every
    Ray Train worker.) A local Ray's processes (GCS, raylet, workers) are descendants of the driver, so they are all
    counted. On a cluster (``RAY_ADDRESS`` set) only this machine's processes are: the other nodes' work is missing
    from ``cpu_s`` and from the energy.
``peak_rss_mb``
    measured: the highest sampled sum of resident memory over the same process tree. Shared pages (Ray's object
    store, shared libraries) count once per process that maps them, so it is an upper bound on what the stage needed.
``gpu_s``, ``gpu_model``, ``gpu_count``
    when NVML sees a GPU the process may use: GPU-seconds *held* (wall time x visible GPUs), not their utilisation;
    ``None`` on a CPU-only machine.
``energy_kwh``, ``energy_method``, ``energy_cpu_kwh``, ``energy_ram_kwh``, ``energy_gpu_kwh``
    estimated, with CodeCarbon (Courty et al., "CodeCarbon", 2024, https://github.com/mlco2/codecarbon; after
    Lacoste et al. 2019, "Quantifying the Carbon Emissions of Machine Learning"), tracking the process tree
    (``tracking_mode="process"``). Where the CPU exposes RAPL energy counters CodeCarbon reads them (measured, but
    for the whole CPU package); in a container or VM without them (the usual case) it models the CPU's power as its
    TDP (from its table of CPU models; 4 W per thread for a model it does not know) scaled by the tree's CPU load,
    plus RAM and NVML-measured GPU power. ``energy_method`` says which. Where CodeCarbon cannot run (not installed,
    or fails to start) or measured nothing for a stage that used CPU, energy is the documented fallback
    ``cpu_s x run.cpu_watts_per_core / 3.6e6`` kWh.
``co2e_kg``, ``carbon_intensity_g_per_kwh``
    ``energy_kwh x run.carbon_intensity_g_per_kwh / 1000``: the grid intensity is a setting, not looked up.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skinsynth.config import RunConfig
from skinsynth.core.rundir import read_manifest, update_manifest

COMPUTE = "compute"  # the manifest key of a stage's figures
JOULES_PER_KWH = 3.6e6
# the figures a total sums (its peak memory is the highest of the stages')
SUMMED = ("wall_s", "cpu_s", "gpu_s", "energy_kwh", "co2e_kg")


def _tree(root: Any) -> list[Any]:
    """``root`` and its live descendants (psutil processes)."""
    import psutil

    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


@dataclass
class _Seen:
    """One process of the tree: its parent and CPU seconds (own; its reaped children's) at the stage's start (0 for
    one born since) and when last seen."""

    ppid: int
    own0: float
    children0: float
    own: float
    children: float
    alive: bool = True


class ProcessTree:
    """CPU time and resident memory of a process and its descendants over a stage, sampled.

    Each process's CPU time counts from the start of the stage (or its birth) to the end (or the last sample before
    it exited). A process's reaped children's time (``children_user`` + ``children_system``) counts where it exceeds
    the time already counted for the children seen to exit: so a ``subprocess.run`` too short to be sampled is
    counted through the parent that waited for it, while Ray's workers, whose raylet reaps them without adding their
    time to its own, are counted from their last sample (losing at most one sampling interval each).
    """

    def __init__(self, root: Any):
        self.root = root
        self.seen: dict[tuple[int, float], _Seen] = {}
        self.peak_rss_mb = 0.0
        self.sample(start=True)

    def sample(self, start: bool = False) -> None:
        import psutil

        live, rss = set(), 0
        for proc in _tree(self.root):
            try:
                with proc.oneshot():
                    key, times, ppid = (proc.pid, proc.create_time()), proc.cpu_times(), proc.ppid()
                    rss += proc.memory_info().rss
            except psutil.Error:  # exited since the listing
                continue
            own, children = times.user + times.system, times.children_user + times.children_system
            live.add(key)
            if key not in self.seen:
                base = (own, children) if start else (0.0, 0.0)
                self.seen[key] = _Seen(ppid, *base, own, children)
            else:
                self.seen[key].own, self.seen[key].children = own, children
        for key, proc in self.seen.items():
            proc.alive = key in live
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)

    def cpu_s(self) -> float:
        """CPU seconds of the tree since the first sample (call :meth:`sample` first for the end)."""
        exited: dict[int, float] = {}  # pid of a parent -> the time counted for its children seen to exit
        for proc in self.seen.values():
            if not proc.alive:
                exited[proc.ppid] = (
                    exited.get(proc.ppid, 0.0) + (proc.own - proc.own0) + (proc.children - proc.children0)
                )
        total = 0.0
        for (pid, _created), proc in self.seen.items():
            reaped = (proc.children - proc.children0) - exited.get(pid, 0.0)
            total += (proc.own - proc.own0) + max(0.0, reaped)
        return total


def visible_gpus() -> list[str]:
    """Names of the NVIDIA GPUs this process may use (NVML, narrowed by ``CUDA_VISIBLE_DEVICES``); [] without."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            names = [
                pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                for i in range(pynvml.nvmlDeviceGetCount())
            ]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver, no GPU
        return []
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if visible is not None:
        names = names[: len([v for v in visible.split(",") if v.strip()])]
    return names


def _start_codecarbon(intensity: float, sample_s: float) -> tuple[Any, str | None]:
    """A started CodeCarbon tracker of this process tree, or None and why not."""
    # its INFO and WARNING lines (one per tracker: "offline tracker init", "multiple instances allowed") stay out
    # of the terminal; only its errors show
    # (its import sets the level from CODECARBON_LOG_LEVEL, INFO by default, so the variable, then the level)
    os.environ.setdefault("CODECARBON_LOG_LEVEL", "error")
    try:
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)

        tracker = OfflineEmissionsTracker(
            country_iso_code="USA",  # required offline; unused: the intensity below overrides its grid data
            force_carbon_intensity_g_co2e_kwh=intensity,
            output_methods=[],  # no emissions.csv in the working directory, nothing sent anywhere
            log_level="error",
            # "process": this process and its descendants (a local Ray's processes), not the whole machine, which
            # may be shared with other users and jobs ("machine" would charge their load to the stage)
            tracking_mode="process",
            measure_power_secs=sample_s,
            allow_multiple_runs=True,  # no lock file: tests and concurrent runs each have their own tracker
        )
        tracker.start()
    except Exception as err:  # not installed, or no sensors it can use: the fallback model below
        return None, f"{type(err).__name__}: {err}".splitlines()[0][:200]
    return tracker, None


def _codecarbon_method(tracker: Any) -> str:
    """How the tracker measured the CPU: RAPL counters, or its TDP model (with the CPU model and TDP used)."""
    for hardware in getattr(tracker, "_hardware", []):
        mode = getattr(hardware, "_mode", None)
        if mode is None or type(hardware).__name__ != "CPU":
            continue
        if mode == "intel_rapl":
            return "codecarbon (RAPL)"
        if mode in ("cpu_load", "constant"):
            return f"codecarbon (TDP model: {getattr(hardware, '_model', '?')} {getattr(hardware, '_tdp', '?')} W)"
        return f"codecarbon ({mode})"
    return "codecarbon"


@dataclass
class ComputeMeter:
    """What :func:`track_compute` measures; ``figures`` is complete once the ``with`` block has ended."""

    run: RunConfig
    sample_s: float = 0.5
    use_codecarbon: bool = True
    figures: dict[str, Any] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _sampler(self, tree: ProcessTree) -> None:
        while not self._stop.wait(self.sample_s):
            tree.sample()


@contextmanager
def track_compute(
    run: RunConfig | None = None, *, sample_s: float = 0.5, use_codecarbon: bool = True
) -> Iterator[ComputeMeter]:
    """Measure the compute and energy of the ``with`` block (see the module docstring for each figure).

    Args:
        run: the run's settings (``carbon_intensity_g_per_kwh``, ``cpu_watts_per_core``); defaults when None.
        sample_s: seconds between samples of the process tree (CodeCarbon's power: every 2 s at most often; both
            sample once more at the end). A process that exits loses at most this much of its CPU time.
        use_codecarbon: False skips CodeCarbon and uses the per-core watt model.

    Yields:
        A :class:`ComputeMeter` whose ``figures`` are filled when the block ends, with an exception too.
    """
    import psutil

    run = run or RunConfig()
    meter = ComputeMeter(run, sample_s, use_codecarbon)
    root = psutil.Process()
    gpus = visible_gpus()
    power_s = max(sample_s, 2.0)
    tracker, why_not = _start_codecarbon(run.carbon_intensity_g_per_kwh, power_s) if use_codecarbon else (None, None)
    tree, t0 = ProcessTree(root), time.perf_counter()
    sampler = threading.Thread(target=meter._sampler, args=(tree,), name="skinsynth-compute", daemon=True)
    sampler.start()
    try:
        yield meter
    finally:
        wall_s = time.perf_counter() - t0
        meter._stop.set()
        sampler.join()
        tree.sample()
        cpu_s = tree.cpu_s()
        energy_kwh, method = 0.0, ""
        parts: dict[str, float | None] = {"cpu": None, "ram": None, "gpu": None}
        if tracker is not None:
            try:
                tracker.stop()
                data = tracker.final_emissions_data
                energy_kwh = float(data.energy_consumed)
                parts = {part: float(getattr(data, f"{part}_energy", 0.0) or 0.0) for part in parts}
                method = _codecarbon_method(tracker)
            except Exception as err:
                why_not = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        if energy_kwh <= 0 and cpu_s > 0:  # no tracker, or it saw none of the work (processes between samples)
            watts = run.cpu_watts_per_core
            energy_kwh = cpu_s * watts / JOULES_PER_KWH
            parts = {"cpu": energy_kwh, "ram": None, "gpu": None}
            reason = f"; codecarbon unavailable ({why_not})" if why_not else ""
            method = f"model: CPU time x {watts:g} W per core (run.cpu_watts_per_core){reason}"
        intensity = run.carbon_intensity_g_per_kwh
        meter.figures = {
            "wall_s": round(wall_s, 3),
            "cpu_s": round(cpu_s, 3),
            "peak_rss_mb": round(tree.peak_rss_mb, 1),
            "gpu_s": round(wall_s * len(gpus), 3) if gpus else None,
            "gpu_count": len(gpus),
            "gpu_model": ", ".join(sorted(set(gpus))) or None,
            "energy_kwh": energy_kwh,
            # CodeCarbon's parts of it (its RAM model: a few W per memory module the tree's resident memory fills,
            # two at least, so about 10 W for any stage); the CPU model's: all CPU
            **{f"energy_{part}_kwh": value for part, value in parts.items()},
            "energy_method": method,
            "co2e_kg": energy_kwh * intensity / 1000,
            "carbon_intensity_g_per_kwh": intensity,
            "scope": "this machine: the driver and its descendants"
            + (" (RAY_ADDRESS set: other nodes not counted)" if os.environ.get("RAY_ADDRESS") else ""),
        }


def cpu_model_energy(cpu_s: float, run: RunConfig) -> tuple[float, float]:
    """``(energy_kwh, co2e_kg)`` of ``cpu_s`` CPU seconds under the per-core watt model (a sweep's trials)."""
    energy = cpu_s * run.cpu_watts_per_core / JOULES_PER_KWH
    return energy, energy * run.carbon_intensity_g_per_kwh / 1000


def record_compute(stage_dir: str | Path, figures: dict[str, Any]) -> Path | None:
    """Merge ``{"compute": figures}`` into ``stage_dir/manifest.json`` (atomically); None when it has no manifest."""
    return update_manifest(stage_dir, **{COMPUTE: figures})


def recorded_compute(stage_dir: str | Path) -> dict[str, Any] | None:
    """The ``compute`` block a stage's manifest holds, or None."""
    value = (read_manifest(stage_dir) or {}).get(COMPUTE)
    return value if isinstance(value, dict) else None


def total_compute(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of ``blocks`` for the summed figures (GPU seconds only where recorded) and the highest peak memory."""
    total: dict[str, Any] = {key: sum(float(b.get(key) or 0.0) for b in blocks) for key in SUMMED}
    if not any(b.get("gpu_s") is not None for b in blocks):
        total["gpu_s"] = None
    total["peak_rss_mb"] = max((float(b.get("peak_rss_mb") or 0.0) for b in blocks), default=0.0)
    return total
