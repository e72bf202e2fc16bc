"""The Ray Train side shared by the classifier and the generator: worker threads and runtime env, mixed precision,
and checkpoint save/restore of a loop's state through ``ray.train.report``."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Collection
from pathlib import Path

from skinsynth.core.allocator import allocator_env


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
