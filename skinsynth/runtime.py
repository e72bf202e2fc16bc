"""Ray start-up shared by every stage: local by default, a cluster when ``RAY_ADDRESS`` is set."""

from __future__ import annotations

import logging
import os
import platform

import ray

from skinsynth.errors import SkinsynthError


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process.

    Locally it starts an embedded Ray with ``num_cpus`` cores (all when None); with ``RAY_ADDRESS`` set or under
    ``ray job submit`` it joins that cluster, where a CPU count cannot be imposed.
    """
    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def machine_info() -> dict:
    """Cores, GPUs and library versions, recorded next to every measurement."""
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "gpus": gpus,
    }


def threads_per_worker(num_workers: int, use_gpu: bool) -> int:
    """CPU threads for each worker's torch ops: the machine's cores shared among local workers (1 on GPU)."""
    if use_gpu:
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))


def resolve_use_gpu(setting: bool | str, key: str) -> bool:
    """``auto`` means: use GPUs when the Ray cluster has them (never ask for one that is absent: Ray would wait).

    Args:
        setting: the config value (true, false or "auto").
        key: the config key, named in the error.
    """
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    if setting and ray.cluster_resources().get("GPU", 0) == 0:
        raise SkinsynthError(f"{key} is true but the Ray cluster has no GPU (use 'auto' or false)")
    return bool(setting)


def git_commit() -> str | None:
    """The commit of the skinsynth checkout in use (None outside a git checkout), for cards and reports."""
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
