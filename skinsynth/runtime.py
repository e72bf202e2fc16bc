"""Ray start-up shared by every stage: local by default, a cluster when ``RAY_ADDRESS`` is set."""

from __future__ import annotations

import logging
import os
import platform

import ray


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
