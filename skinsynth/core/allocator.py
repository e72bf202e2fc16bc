"""glibc allocator settings for processes that run torch on the CPU (kept apart from ``skinsynth.core.ray`` so that
the CLI can apply them at start-up without importing Ray)."""

from __future__ import annotations

import os
import platform

# glibc malloc settings for processes that run torch on the CPU. By default glibc serves every block above its
# mmap threshold (adaptive, never above 32 MB) with a fresh mmap and unmaps it on free, and gives each thread other
# than the main one a separate arena of 64 MB heaps that it trims eagerly. A training step's activations are such
# blocks (a 192 px batch of 64 holds several of 40-75 MB), so every step asks the kernel for gigabytes of new zeroed
# pages, and a CPU training step spends much of its time in the kernel faulting them in; with one arena and freed
# memory kept for reuse the faults almost vanish (figures in docs/results.md). The cost: a process keeps its peak
# heap until it exits.
_LARGE_BLOCK = 1 << 30  # larger than any tensor of a CPU training step here; mallopt takes an int
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main arena, whose heap can grow without limit
    "MALLOC_MMAP_THRESHOLD_": str(_LARGE_BLOCK),  # large blocks come from that heap, not from mmap
    "MALLOC_TRIM_THRESHOLD_": str(_LARGE_BLOCK),  # and a free does not hand them straight back to the kernel
}


def allocator_env() -> dict[str, str]:
    """:data:`MALLOC_ENV` for a process to be started (glibc reads it at start-up); a value the user set wins.

    Empty off Linux, where these variables mean nothing.
    """
    if platform.system() != "Linux":
        return {}
    return {name: os.environ.get(name, value) for name, value in MALLOC_ENV.items()}


def keep_freed_memory() -> None:
    """Apply :data:`MALLOC_ENV`'s thresholds to this running process through ``mallopt``.

    For the CLI process, which runs the plain benchmark loops, evaluation and the single-process servers in its
    main thread. The thresholds apply to the whole process, but the arena limit cannot change once threads have
    their own arenas, whose 64 MB heaps still map large blocks afresh: processes Ray starts, whose training loop
    runs in a thread, get :func:`allocator_env` instead. Does nothing off glibc, and leaves a
    threshold the user set in the environment alone (glibc has applied it).
    """
    import ctypes

    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (musl, ...)
    for name, param in (("MALLOC_TRIM_THRESHOLD_", -1), ("MALLOC_MMAP_THRESHOLD_", -3)):  # M_* from malloc.h
        if name not in os.environ:
            libc.mallopt(param, _LARGE_BLOCK)
