"""Process set-up shared by the stages: the glibc allocator settings for torch on the CPU, and the start-up limit a
local Ray gives its dashboard."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from skinsynth.core.allocator import MALLOC_ENV, allocator_env
from skinsynth.core.raytrain import torch_worker_runtime_env

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="glibc malloc settings only apply on Linux")

# Ten forward and backward passes of one convolution whose output (16 x 32 x 192 x 192 floats, 75 MB) is the size of
# a training step's activations, in the main thread (as the CLI's plain loops run) or in another one (as Ray Train
# runs its training loop); prints the minor page faults of the ten passes.
FAULTS = """
import resource, sys, threading, torch
if sys.argv[2] == "keep":
    from skinsynth.core.allocator import keep_freed_memory
    keep_freed_memory()
def work(out):
    conv = torch.nn.Conv2d(3, 32, 3, padding=1)
    x = torch.rand(16, 3, 192, 192)
    conv(x).square().mean().backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        conv(x).square().mean().backward()
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
out = []
if sys.argv[1] == "main":
    work(out)
else:
    thread = threading.Thread(target=work, args=(out,))
    thread.start()
    thread.join()
print(out[0])
"""


def _faults(where: str, mode: str, env: dict[str, str]) -> int:
    run = subprocess.run(
        [sys.executable, "-c", FAULTS, where, mode], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return int(run.stdout.strip())


def test_allocator_env_keeps_large_blocks_and_lets_the_user_override(monkeypatch):
    for name in MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    assert allocator_env() == MALLOC_ENV
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert allocator_env()["MALLOC_ARENA_MAX"] == "4"
    worker_env = torch_worker_runtime_env(2)["env_vars"]
    assert worker_env["OMP_NUM_THREADS"] == "2" and worker_env["MALLOC_ARENA_MAX"] == "4"


def _transparent_huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.is_file() and "[always]" in path.read_text()


@pytest.mark.skipif(
    _transparent_huge_pages_always(),
    reason="with transparent huge pages always on, large blocks fault in 2 MB pages: the counts below assume 4 kB",
)
def test_the_allocator_settings_stop_the_page_faults_of_reused_large_blocks():
    plain = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    # glibc's defaults: every large block is a fresh mmap, 18,000 pages (75 MB) faulted in several times a pass
    default = _faults("thread", "plain", plain)
    assert default > 10 * 18_000
    # a process started with allocator_env() (a Ray Train worker) reuses the blocks it freed
    assert _faults("thread", "plain", {**plain, **MALLOC_ENV}) < default / 5
    # the CLI's mallopt does the same for its main thread
    assert _faults("main", "plain", plain) > 10 * 18_000
    assert _faults("main", "keep", plain) < default / 5


def test_a_local_ray_gives_its_dashboard_five_minutes_unless_the_environment_says_otherwise(monkeypatch):
    """Ray's 60 s for its dashboard to start ended whole commands on a loaded 2-core machine (a ``skinsynth serve``
    in this suite once failed so). The limit is read when ray is imported, so it is raised on Ray's constants."""
    from ray._private import ray_constants

    from skinsynth.core.ray import DASHBOARD_STARTUP_TIMEOUT_S, _allow_a_slow_dashboard

    monkeypatch.delenv("RAY_DASHBOARD_STARTUP_TIMEOUT_S", raising=False)
    monkeypatch.setattr(ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S", 60)
    _allow_a_slow_dashboard()
    assert ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S == DASHBOARD_STARTUP_TIMEOUT_S == 300
    monkeypatch.setattr(ray_constants, "RAY_DASHBOARD_STARTUP_TIMEOUT_S", 45)
    monkeypatch.setenv("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "45")  # the user's own choice stands
    _allow_a_slow_dashboard()
    assert ray_constants.RAY_DASHBOARD_STARTUP_TIMEOUT_S == 45
