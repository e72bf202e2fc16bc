"""Ray start-up shared by every stage (local by default, a cluster when ``RAY_ADDRESS`` is set), GPU resolution,
quiet Ray Data, and the machine and commit recorded next to results."""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import ray

from skinsynth.errors import SkinsynthError

# The environment a Ray started by ensure_ray in this process began with (None: not started here, or a cluster).
_STARTED_ENV: dict[str, str] | None = None


DASHBOARD_STARTUP_TIMEOUT_S = 300  # Ray's own limit is 60 s


def _allow_a_slow_dashboard() -> None:
    """Give a local Ray's dashboard :data:`DASHBOARD_STARTUP_TIMEOUT_S` to start instead of Ray's 60 s.

    ``ray.init`` fails when its dashboard has not started within ``RAY_DASHBOARD_STARTUP_TIMEOUT_S``. The dashboard
    starts nine subprocesses, each a Python interpreter; on 2 cores shared with other work they can take longer than
    a minute, and the command would end before its first stage. Ray reads the variable once, when it is imported,
    so the limit is raised on its constants module; a value set in the environment is left as it is.
    """
    if "RAY_DASHBOARD_STARTUP_TIMEOUT_S" in os.environ:
        return
    from ray._private import ray_constants

    current = getattr(ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S", None)
    if isinstance(current, int) and current < DASHBOARD_STARTUP_TIMEOUT_S:
        ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S = DASHBOARD_STARTUP_TIMEOUT_S


def ensure_ray(num_cpus: int | None = None, env: Mapping[str, str] | None = None) -> None:
    """Start (or join) Ray once per process.

    Locally it starts an embedded Ray with ``num_cpus`` cores (all when None), even if another Ray runs on the
    machine; with ``RAY_ADDRESS`` set or under ``ray job submit`` it joins that cluster, where a CPU count cannot be
    imposed.

    Args:
        num_cpus: cores of a local Ray.
        env: variables the processes of a local Ray must start with (Ray Serve reads its feature flags, such as
            ``RAY_SERVE_ENABLE_HA_PROXY``, once at import in each of its processes, and those processes inherit this
            one's environment when Ray starts). Set here before a local start; ignored on a cluster, whose own
            environment decides. A flag left unset counts as "0".

    Raises:
        SkinsynthError: Ray already runs in this process, started here with other values for ``env``.
    """
    global _STARTED_ENV
    if ray.is_initialized():
        if env and _STARTED_ENV is not None:
            differ = {
                key: value
                for key, value in env.items()
                if _STARTED_ENV.get(key, "0" if value == "0" else None) != value
            }
            if differ:
                wanted = ", ".join(f"{key}={value}" for key, value in differ.items())
                raise SkinsynthError(
                    f"Ray already runs in this process without {wanted}, which its processes read when they start: "
                    "start the endpoint in a fresh process (skinsynth serve)"
                )
        return
    # The dashboard process serves Ray's state API, which Ray Train's placement-group cleaner needs: without it the
    # cleaner cannot tell that a finished run's controller has gone, and a sweep of many training runs in one
    # driver piles up their placement groups until no CPU is left for the next trial.
    kwargs: dict = {"include_dashboard": True, "logging_level": logging.WARNING}
    if not os.environ.get("RAY_ADDRESS"):
        # Serve's controller kills its HTTP proxy when the proxy's first readiness check misses 5 s three times in a
        # row, and `serve.start` then fails with ActorDiedError; on 2 busy cores the proxy's imports alone can take
        # that long. The processes of a local Ray inherit this process's environment, so a longer first check is
        # set here (a cluster's own environment decides on a cluster).
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        _allow_a_slow_dashboard()
        # "local": always an embedded Ray of our own, even when `ray start` left a cluster running on this machine
        # (ray.init() would join it, and refuse num_cpus); RAY_ADDRESS is how to use that cluster instead
        kwargs.update(address="local", num_cpus=num_cpus)
        os.environ.update(env or {})
    ray.init(**kwargs)
    _STARTED_ENV = None if os.environ.get("RAY_ADDRESS") else dict(os.environ)
    from skinsynth.core.console import attach_ray

    attach_ray()  # the lines Ray forwards from its workers go to the command's log, progress to its terminal


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


def quiet_ray_data() -> None:
    """No Ray Data progress bars or per-pass execution notices in this process (training runs, sampling).

    Their own lines (loss and images/s, images sampled) are the progress report; Ray Data would add a bar, or on a
    non-interactive terminal a block of log lines every few seconds, and three "Starting execution of Dataset ..."
    lines for every pass over a training set (every few seconds for a small generator training set).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def autoscaler_gpus() -> int:
    """GPUs the cluster's autoscaler can add: the node types it publishes to Ray's GCS (``node_group_configs`` of
    the cluster config, which Ray Data reads too) times their largest count; 0 where none is published (a local Ray,
    or an autoscaler that does not publish its node types)."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # an older GCS without the key, or no connection: nothing known
        return 0
    return int(limits.get("GPU", 0) or 0)


def on_cluster() -> bool:
    """Whether this process joined a Ray cluster (``RAY_ADDRESS``, which ``ray job submit`` sets for its entrypoint)
    rather than starting an embedded Ray, to which nothing can add a node."""
    return bool(os.environ.get("RAY_ADDRESS"))


def resolve_use_gpu(setting: bool | str, key: str) -> bool:
    """Whether a stage's Ray Train workers ask for one GPU each.

    ``false``: never. ``auto``: when the cluster has GPUs now, or its autoscaler publishes a node type with GPUs
    (:func:`autoscaler_gpus`); a GPU worker group that scales from zero and publishes nothing leaves ``auto`` on CPU,
    which is why the cluster experiments say ``true``. ``true``: always. On a cluster a missing GPU is then a
    pending request that the autoscaler answers by adding a GPU node, and the run waits for it: Ray Train retries a
    worker group that did not start within ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` without limit (its
    ``controller_failure_limit`` is -1). On an embedded local Ray nothing can add a GPU, so ``true`` without one is an
    error rather than a wait that never ends.

    Args:
        setting: the config value (true, false or "auto").
        key: the config key, named in the error.
    """
    if setting is False:
        return False
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if setting == "auto":
        return has_gpus or autoscaler_gpus() > 0
    if not has_gpus and not on_cluster():
        raise SkinsynthError(
            f"{key} is true but this local Ray has no GPU and nothing can add one (use 'auto' or false, or set "
            "RAY_ADDRESS to a cluster whose autoscaler adds GPU nodes)"
        )
    return bool(setting)


def git_commit() -> str | None:
    """The commit of the skinsynth checkout in use (None outside a git checkout), for cards and reports."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
