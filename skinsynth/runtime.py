"""Ray start-up shared by every stage: local by default, a cluster when ``RAY_ADDRESS`` is set."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Collection
from pathlib import Path

import ray

from skinsynth.allocator import allocator_env
from skinsynth.errors import SkinsynthError


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process.

    Locally it starts an embedded Ray with ``num_cpus`` cores (all when None), even if another Ray runs on the
    machine; with ``RAY_ADDRESS`` set or under ``ray job submit`` it joins that cluster, where a CPU count cannot be
    imposed.
    """
    if ray.is_initialized():
        return
    # The dashboard process serves Ray's state API, which Ray Train's placement-group cleaner needs: without it the
    # cleaner cannot tell that a finished run's controller has gone, and a sweep of many training runs in one
    # driver piles up their placement groups until no CPU is left for the next trial (seen on Ray 2.60).
    kwargs: dict = {"include_dashboard": True, "logging_level": logging.WARNING}
    if not os.environ.get("RAY_ADDRESS"):
        # "local": always an embedded Ray of our own, even when `ray start` left a cluster running on this machine
        # (ray.init() would join it, and refuse num_cpus); RAY_ADDRESS is how to use that cluster instead
        kwargs.update(address="local", num_cpus=num_cpus)
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


def torch_worker_runtime_env(threads: int) -> dict:
    """A Ray Train worker's runtime env: ``OMP_NUM_THREADS`` set to the torch threads it will use, and
    :func:`allocator_env`.

    Ray starts a worker that holds one CPU with ``OMP_NUM_THREADS=1`` unless its environment names a value, and
    ``torch.set_num_threads`` in the training loop does not undo all of that: a bf16 EfficientNet-Lite0 step on
    2 cores ran at 71 images/s in a thread of such a process against 88 without the variable (``skinsynth bench
    train`` on the HAM10000 128 px recipe: 0.68x of the plain loop before, 0.78x after). The training loop runs in
    a thread Ray starts, which without the allocator settings pays glibc's per-thread arena as well.

    ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``: Ray Train 2.60 routes a worker's ``print`` to its logger *and*, because Ray
    has replaced the worker's ``sys.stdout``, to that stream as well, so every progress line reached the driver twice.
    """
    return {"env_vars": {"OMP_NUM_THREADS": str(threads), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **allocator_env()}}


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

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# --- helpers shared by the Ray Train loops (classifier and generator) ---

CHECKPOINT_FILE = "state.pt"


def unwrap_model(model):
    """The model inside a DDP wrapper (Ray Train wraps it when there is more than one worker)."""
    return model.module if hasattr(model, "module") else model


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def mixed_precision_dtype(enabled: bool, device, cpu_bf16: bool = False, announce: str | None = None):
    """The autocast dtype for a worker: bf16 where the GPU supports it, else fp16; on CPU bf16 only when ``cpu_bf16``
    is asked for and the CPU has native bf16 instructions; None otherwise or when off. With ``announce`` (a log
    prefix) a CPU worker that was asked for bf16 says whether it got it.

    Why CPU autocast is opt-in: it changes a run's numbers (bf16 activations), and only pays on CPUs with native bf16.
    Where it does, a whole-network fine-tune of EfficientNet-Lite0 at 128 px trains about 1.6x faster (measured on
    2 AVX512-BF16 cores: 64 against 41 images/s, batch 64, model only).
    """
    import torch

    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu" or not cpu_bf16:
        return None
    native = cpu_has_native_bf16()
    if announce:
        got = "bf16 autocast on CPU" if native else "cpu_amp is on, but this CPU lacks native bf16"
        print(f"{announce}: {got}")
    return torch.bfloat16 if native else None


def load_train_checkpoint() -> dict | None:
    """The state :func:`report_with_checkpoint` saved in this Ray Train run's latest checkpoint (None: a fresh run)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return read_run_checkpoint(checkpoint) if checkpoint else None


def report_with_checkpoint(metrics: dict, state: dict, rank: int) -> None:
    """``ray.train.report`` from every worker, with rank 0 attaching a checkpoint of ``state`` (torch-saved).

    Only rank 0 writes: DDP keeps the replicas identical, and Ray Train needs every worker to report each time.
    """
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            torch.save(state, Path(directory) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def read_run_checkpoint(checkpoint) -> dict:
    """The state :func:`report_with_checkpoint` saved in a Ray Train ``Checkpoint`` (in a worker or the driver)."""
    import torch

    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def resumable_run_name(
    prefix: str, section: str, settings: object, ignore: Collection[str], data_hash: str | None
) -> str:
    """A Ray Train run name: ``prefix`` plus a hash of the settings that define the run and of its data.

    Ray Train resumes from the latest checkpoint under the same storage path and name, so the same command (or
    one that only changes ``ignore``d keys: length, logging) continues a run, while any other change (model,
    learning rate, data, ...) starts a fresh run instead of silently resuming a different one. ``settings`` is the
    config section; only its :func:`~skinsynth.config.changed_settings` count, so a setting added by an upgrade
    does not orphan an interrupted run.
    """
    from skinsynth.config import changed_settings

    identity = {k: v for k, v in changed_settings(settings).items() if k not in ignore}
    payload = json.dumps({section: identity, "data": data_hash}, sort_keys=True)
    return f"{prefix}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"
