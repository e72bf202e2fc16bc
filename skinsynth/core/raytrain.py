"""The Ray Train side shared by the classifier and the generator: the driver (:func:`fit_torch_run`), a worker's
start (threads, seeds), mixed precision and the optimiser step, and checkpoint save/restore of a loop's stateful
objects through ``ray.train.report``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from skinsynth.core.allocator import allocator_env
from skinsynth.errors import SkinsynthError


def threads_per_worker(num_workers: int, use_gpu: bool) -> int:
    """CPU threads for each worker's torch ops: the machine's cores shared among local workers (1 on GPU)."""
    if use_gpu:
        return 1
    return max(1, (os.cpu_count() or 1) // max(1, num_workers))


def worker_group_resources(use_gpu: bool, extra: Mapping[str, float] | None) -> dict[str, float] | None:
    """What each Ray Train worker asks for: Ray's default (one CPU, or one GPU with ``use_gpu``) plus ``extra``.

    Ray replaces its default by ``resources_per_worker`` when one is given, so the default is spelt out here; None
    (Ray's default itself) without ``extra``.
    """
    if not extra:
        return None
    return {**({"GPU": 1.0} if use_gpu else {"CPU": 1.0}), **{name: float(n) for name, n in extra.items()}}


def torch_worker_runtime_env(threads: int) -> dict:
    """A Ray Train worker's runtime env: ``OMP_NUM_THREADS`` set to the torch threads it will use, and
    :func:`allocator_env`.

    Ray starts a worker that holds one CPU with ``OMP_NUM_THREADS=1`` unless its environment names a value, and
    ``torch.set_num_threads`` in the training loop does not undo all of that: a bf16 step in a thread of such a
    process runs measurably slower than with the variable set (``skinsynth bench train``; figures in
    docs/results.md). The training loop runs in a thread Ray starts, which without the allocator settings pays
    glibc's per-thread arena as well.

    ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``: Ray Train 2.60 routes a worker's ``print`` to its logger *and*, because Ray
    has replaced the worker's ``sys.stdout``, to that stream as well, so every progress line reached the driver twice.
    """
    return {"env_vars": {"OMP_NUM_THREADS": str(threads), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **allocator_env()}}


def fit_torch_run(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    name: str,
    storage: tuple[str, Any],
    num_workers: int,
    use_gpu: bool,
    torch_threads: int,
    datasets: dict[str, Any],
    callbacks: list[Any] | None = None,
    dataset_config: Any = None,
    worker_resources: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Run a training loop on ``num_workers`` Ray Train workers (DDP) and return what its last checkpoint saved.

    The run lives at ``storage`` under ``name`` and keeps only its latest checkpoint: run again under the same name,
    Ray Train hands the loop that checkpoint (:func:`load_train_checkpoint`) and the loop resumes from it.

    Args:
        loop: the worker loop; it starts with :func:`start_worker` and reports through :func:`save_training_state`.
        loop_config: plain values for the loop; ``torch_threads`` is added to it.
        name: the run's name (see :meth:`skinsynth.core.rundir.StageIdentity.run_name`).
        storage: ``(storage_path, storage_filesystem)`` where Ray Train keeps the run's checkpoints.
        num_workers: training workers.
        use_gpu: one GPU per worker.
        torch_threads: CPU threads per worker's torch ops; 0 shares this node's cores among its workers
            (:func:`threads_per_worker`).
        datasets: Ray Datasets by name; the loop reads them with ``ray.train.get_dataset_shard``.
        callbacks: Ray Train callbacks (a sweep passes Tune's report callback).
        dataset_config: a ``ray.train.DataConfig`` (Ray's default, which splits every dataset, when None).
        worker_resources: Ray resources each worker asks for beside its CPU (and its GPU with ``use_gpu``), e.g. a
            custom resource that only one node type carries: workers then run on such nodes, and where none is up
            they wait for the autoscaler to add one (Ray Train retries a worker group that did not start).

    Returns:
        The dict the loop's last checkpoint saved (:func:`save_training_state`): each stateful object's
        ``state_dict()`` by key, and the loop's own ``state``.

    Raises:
        SkinsynthError: the run ended without reporting a checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    threads = torch_threads or threads_per_worker(num_workers, use_gpu)
    storage_path, storage_filesystem = storage
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "torch_threads": threads},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_group_resources(use_gpu, worker_resources),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
            worker_runtime_env=torch_worker_runtime_env(threads),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise SkinsynthError(f"the Ray Train run '{name}' reported no checkpoint; see the log above")
    return read_run_checkpoint(result.checkpoint)


def start_worker(config: dict[str, Any], seed: int) -> tuple[int, int]:
    """A training loop's first lines on its worker: torch's threads (``config["torch_threads"]``, which
    :func:`fit_torch_run` sets) and torch's and numpy's global seeds (``seed`` plus the worker's rank, so workers
    draw different batches' noise and augmentations).

    Ray gives each worker one logical CPU and sets ``OMP_NUM_THREADS=1``; on a CPU-only node the worker should still
    use the cores it shares with no other trainer (data decoding is light next to the model's work).

    Args:
        config: the loop's config.
        seed: the run's seed.

    Returns:
        ``(rank, world_size)`` of this worker.
    """
    import numpy as np
    import ray.train
    import torch

    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(config["torch_threads"])
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    return rank, context.get_world_size()


CHECKPOINT_FILE = "state.pt"


def unwrap_model(model):
    """The model inside a DDP wrapper (Ray Train wraps it when there is more than one worker)."""
    return model.module if hasattr(model, "module") else model


# the x86 instruction sets that compute in bf16, as /proc/cpuinfo names them
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower.

    On x86 Linux the answer is in the CPU flags (``cpuinfo``: the text of /proc/cpuinfo, read when None). oneDNN's own
    ``_is_mkldnn_bf16_supported`` is not that question: it says yes on any AVX512 CPU, where bf16 autocast is emulated
    and trains slower than fp32 (docs/results.md#generator-demo).
    """
    import torch

    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: oneDNN's answer is all there is
            return True
    flag_lines = [line.split(":", 1)[1] for line in cpuinfo.splitlines() if line.startswith("flags")]
    flags = {flag for line in flag_lines for flag in line.split()}
    return not flags or any(flag in flags for flag in NATIVE_BF16_FLAGS)  # no x86 flags (e.g. ARM): oneDNN's answer


def mixed_precision_dtype(enabled: bool, device, cpu_bf16: bool = False, announce: str | None = None):
    """The autocast dtype for a worker: bf16 where the GPU supports it, else fp16; on CPU bf16 only when ``cpu_bf16``
    is asked for and the CPU has native bf16 instructions; None otherwise or when off. With ``announce`` (a log
    prefix) a CPU worker that was asked for bf16 says whether it got it.

    Why CPU autocast is opt-in: it changes a run's numbers (bf16 activations), and only pays on CPUs with native bf16.
    Where it does, a whole-network fine-tune of EfficientNet-Lite0 trains markedly faster than in fp32 (figures in
    docs/results.md).
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
        from skinsynth.core.console import worker_progress

        worker_progress(f"{announce}: {got}")
    return torch.bfloat16 if native else None


# the gradient-norm clip of both loops (diffusers' training scripts clip at 1.0 too): one batch of outsized gradients
# cannot throw the weights far
GRAD_CLIP_NORM = 1.0


def grad_scaler(amp_dtype):
    """A ``GradScaler`` that scales the loss only under fp16 autocast (bf16 and fp32 have the range to need none);
    disabled, each of its calls passes straight through."""
    import torch

    return torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)


def optimizer_step(model, optimizer, scaler, schedule, clip_norm: float = GRAD_CLIP_NORM) -> None:
    """One optimiser step from the gradients ``scaler.scale(loss).backward()`` left: unscale them, clip their norm,
    step (``scaler.step`` skips a step whose gradients overflowed), update the loss scale, clear the gradients, and
    advance the learning-rate schedule.

    Args:
        model: the (possibly DDP-wrapped) model whose gradients are clipped.
        optimizer: its optimiser.
        scaler: a ``GradScaler`` (:func:`grad_scaler`; disabled, it passes through).
        schedule: the learning-rate scheduler, stepped once per optimiser step.
        clip_norm: the largest total gradient norm.
    """
    import torch

    scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()


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


def _stateful_target(obj):
    """What a stateful object saves and loads: the model inside a DDP wrapper, anything else itself."""
    import torch

    return unwrap_model(obj) if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj


def save_training_state(stateful: Mapping[str, Any], state: dict, metrics: dict, rank: int) -> None:
    """Report ``metrics`` with a checkpoint of every stateful object and the loop's own ``state``
    (:func:`report_with_checkpoint`: every worker reports, rank 0 writes).

    The checkpoint is a dict: ``stateful``'s keys with each object's ``state_dict()`` (None for a None object: a
    feature that is off), and ``"state"``: the plain values (step or epoch, early-stopping state, history, ...).
    :func:`restore_training_state` reads it back into the same objects.

    Args:
        stateful: model (DDP-wrapped or not), optimiser, schedule, EMA, loss scaler, ... by the key they are saved
            under; each has ``state_dict()`` and ``load_state_dict()``.
        state: the loop's plain state (picklable values and tensors).
        metrics: what this report says (every worker's; a sweep reads rank 0's).
        rank: this worker's world rank.
    """
    saved: dict[str, Any] = {"state": state}
    if rank == 0:
        for key, obj in stateful.items():
            saved[key] = None if obj is None else _stateful_target(obj).state_dict()
    report_with_checkpoint(metrics, saved, rank)


def restore_training_state(stateful: Mapping[str, Any], saved: dict | None) -> dict | None:
    """Load a checkpoint of :func:`save_training_state` into the stateful objects and return its plain state.

    An object whose key the checkpoint lacks, or saved as None or empty, keeps its fresh state: a checkpoint
    written before the object was saved (the classifier's ``scaler``) or by a disabled ``GradScaler`` (whose
    ``state_dict()`` is empty, and which an fp16 run could not load) still resumes.

    Args:
        stateful: the objects to restore, by the keys they were saved under (None: a feature that is off).
        saved: the checkpoint's dict (:func:`load_train_checkpoint`); None on a fresh run.

    Returns:
        The saved ``state``, or None when there was no checkpoint (a fresh run).
    """
    if saved is None:
        return None
    for key, obj in stateful.items():
        if obj is not None and saved.get(key):
            _stateful_target(obj).load_state_dict(saved[key])
    return saved["state"]
