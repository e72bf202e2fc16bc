"""Shared fixtures: one local Ray for the session, the shared real data (when present), image builders."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray with 2 CPUs for every test that needs it (start-up costs seconds)."""
    import ray

    from skinsynth.core.ray import ensure_ray

    ensure_ray(2)
    yield ray
    ray.shutdown()


def _require_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "metadata.csv").is_file():
        pytest.skip(f"real data not available: {path} is missing (needs ../shared/data next to the repo)")
    return path


@pytest.fixture
def ham10000_dir() -> Path:
    return _require_shared("ham10000")


@pytest.fixture
def isic2017_dir() -> Path:
    return _require_shared("isic2017")


def lab_to_rgb(lightness: float, a: float, b: float, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    """A uint8 RGB image of one CIELAB colour."""
    lab = np.zeros((*shape, 3), np.float32)
    lab[...] = (lightness, a, b)
    rgb = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def skin_with_lesion(size: int = 96, seed: int = 0) -> np.ndarray:
    """Light skin (L*=70, a*=12, b*=16) with a dark brown round lesion in the middle and mild noise."""
    rng = np.random.default_rng(seed)
    img = lab_to_rgb(70, 12, 16, (size, size)).astype(np.int16)
    yy, xx = np.mgrid[:size, :size]
    lesion = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    img[lesion] = lab_to_rgb(35, 15, 25, (1, 1))[0, 0]
    img += rng.integers(-3, 4, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    """Encode an array with Pillow (optionally converting the mode first)."""
    img = Image.fromarray(rgb)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels and which holds no pixel data: a decoder that
    got past the header would call it truncated, so refusing it for its size shows the refusal came first."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


GOOD_IDS = [f"ISIC_good{i:02d}" for i in range(14)]
GOOD_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"] * 2

# image_id -> the start of its expected quarantine reason
BAD_EXPECTED = {
    "ISIC_trunc": "truncated or corrupt image",
    "ISIC_empty": "empty file (0 bytes)",
    "ISIC_text": "not an image: the file format is not recognised",
    "ISIC_gray": "grayscale image (mode L)",
    "ISIC_tiny": "too small: 1x1 px",
    "ISIC_huge": "too large: 12000x12000 px (144.0 MP) is over the 40 MP limit; refused before decoding",
    "ISIC_unknowndx": "unknown label 'xyz'",
    "ISIC_missing": "image file not found for this image_id",
    "ISIC_orphan": "image file has no metadata row",
}


@pytest.fixture
def messy_ham_dir(tmp_path) -> Path:
    """A HAM10000-layout folder (two image parts) holding every kind of bad input next to good images.

    Good: 14 JPEGs (two per class, two images share a lesion) plus one RGBA PNG. Bad: see ``BAD_EXPECTED``, plus a
    metadata row that repeats ``ISIC_good00`` (quarantined as a duplicate image_id, the first row kept).
    """
    root = tmp_path / "ham"
    part1, part2 = root / "HAM10000_images_part_1", root / "HAM10000_images_part_2"
    part1.mkdir(parents=True)
    part2.mkdir()
    rows = []
    for i, (image_id, dx) in enumerate(zip(GOOD_IDS, GOOD_CLASSES)):
        folder = part1 if i % 2 else part2
        (folder / f"{image_id}.jpg").write_bytes(encode(skin_with_lesion(96 + i, seed=i)))
        lesion = "HAM_shared" if i in (0, 7) else f"HAM_{i:04d}"
        rows.append((lesion, image_id, dx, "histo", 50.0, "female", "back"))  # images 0 and 7 are both akiec
    (part1 / "ISIC_rgba.png").write_bytes(encode(skin_with_lesion(100, seed=99), "PNG", mode="RGBA"))
    rows.append(("HAM_rgba", "ISIC_rgba", "nv", "histo", 40.0, "male", "trunk"))
    full = encode(skin_with_lesion(120, seed=5))
    (part1 / "ISIC_trunc.jpg").write_bytes(full[: len(full) // 2])
    (part1 / "ISIC_empty.jpg").write_bytes(b"")
    (part2 / "ISIC_text.jpg").write_text("not a jpeg at all\n")
    (part2 / "ISIC_gray.jpg").write_bytes(encode(skin_with_lesion(96, seed=7), "JPEG", mode="L"))
    (part2 / "ISIC_tiny.jpg").write_bytes(encode(np.full((1, 1, 3), 200, np.uint8)))
    (part2 / "ISIC_huge.jpg").write_bytes(header_only_png(12000, 12000))  # found by content, not by extension
    (part2 / "ISIC_unknowndx.jpg").write_bytes(encode(skin_with_lesion(96, seed=8)))
    (part2 / "ISIC_orphan.jpg").write_bytes(encode(skin_with_lesion(96, seed=9)))
    for image_id in ("ISIC_trunc", "ISIC_empty", "ISIC_text", "ISIC_gray", "ISIC_tiny", "ISIC_huge", "ISIC_missing"):
        rows.append((f"HAM_{image_id}", image_id, "nv", "histo", 60.0, "male", "back"))
    rows.append(("HAM_x", "ISIC_unknowndx", "xyz", "histo", 60.0, "male", "back"))
    rows.append(("HAM_dup", GOOD_IDS[0], "mel", "histo", 61.0, "male", "back"))  # duplicated image_id
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"] + [",".join(map(str, r)) for r in rows]
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def latest_checkpoint(out: Path | str) -> dict:
    """What the newest Ray Train checkpoint under ``out/ray_train`` saved (``save_training_state``'s dict).

    The newest by time: a killed run can leave a checkpoint folder behind that Ray Train never registered.
    """
    import torch

    paths = list(Path(out, "ray_train").glob("*/checkpoint_*/state.pt"))
    assert paths, f"no checkpoint under {out}/ray_train"
    return torch.load(max(paths, key=lambda p: p.stat().st_mtime), map_location="cpu", weights_only=False)


def same_state(a, b) -> bool:
    """Whether two state dicts (nested dicts, lists, tensors, numbers) are equal, tensor by tensor."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def optimiser_steps(saved_optimizer: dict) -> set[int]:
    """The step counts an Adam(W) ``state_dict`` holds for its parameters (one value when all trained alike)."""
    return {int(param["step"]) for param in saved_optimizer["state"].values()}


def kill_after_first_checkpoint_then_rerun(
    command: list[str], checkpoint_glob: str, out: Path, finished: Path, log: Path, timeout_s: float = 240
):
    """Start a CLI ``command`` in its own process group, SIGKILL the group once ``out`` holds a file matching
    ``checkpoint_glob`` (as hard as a lost machine: nothing gets to clean up), check that it died before writing
    ``finished``, then run the same command again to the end and return that second run
    (``subprocess.CompletedProcess``, text output).

    Both runs are drivers on the session's Ray (``RAY_ADDRESS``), as under ``ray job submit``: Ray ends a killed
    driver's actors itself, and neither run pays for starting a Ray of its own.

    For Ray Train runs the glob should be the run's ``checkpoint_manager_snapshot.json``: Ray Train resumes from the
    checkpoints that snapshot lists, and a checkpoint folder can exist a moment before it is registered there.
    """
    import os
    import signal
    import subprocess
    import time

    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    with log.open("w") as sink:
        first = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + timeout_s
        while not list(out.glob(checkpoint_glob)):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, f"no checkpoint within {timeout_s} s"
            time.sleep(0.5)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert not finished.exists(), "the first run finished before it could be killed"
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return second


# the demo at test size: every stage runs, none trained to quality
# what Ray itself prints (its C++ core, token auth, Ray Data's progress blocks, worker-prefixed lines): a command's
# terminal never shows these; they go to RUN_DIR/logs/<stage>.log
RAY_INTERNALS = ("core_worker", "Token authentication", "streaming_executor", "logging_progress", "pid=")

DEMO_SMALL = [
    "--set",
    "data.phantom.n_images=70",
    "--set",
    "data.preprocess.size=32",  # a quarter of the pixels of the demo's 64: every stage runs, faster
    "--set",
    "audit.extractor=classifier",  # the Inception features have their own test in test_audit.py
    "--set",
    "audit.mia_images=24",
    "--set",
    "audit.calibration_images=40",
    "--set",
    "audit.copy_plants=6",
    "--set",
    "train.model=test_efficientnet",
    "--set",
    "train.pretrained=none",
    "--set",
    "train.epochs=1",
    "--set",
    "generator.train_steps=4",
    "--set",
    "generator.checkpoint_every=2",
    "--set",
    "generator.batch_size=8",  # the demo labels 30%: 14 of these 70 images
    "--set",
    "sample.steps=3",
    "--set",
    "sample.ratio=3",  # enough synthetic images of every class for the sweep's mix, even at 70 images
    "--set",
    "tune.num_samples=1",  # the sweep itself is tested in test_tune.py
]


def logit_adjustment_case() -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Validation predictions whose rare classes lose to the common class 0 by 0.5 to 0.4, training counts 100:10."""
    labels = np.repeat(np.arange(7), 10)
    probs = np.full((70, 7), 0.1 / 5)
    probs[labels == 0] = [0.9] + [0.1 / 6] * 6
    for c in range(1, 7):
        rows = np.flatnonzero(labels == c)
        probs[rows, 0], probs[rows, c] = 0.5, 0.4
    return probs / probs.sum(1, keepdims=True), labels, [100] + [10] * 6


# --- session-scoped phantom fixtures: made once, read by many modules. A test that changes one works on a copy
# (copy_run), never in the fixture's own folder.

PHANTOM_SMALL = ["data.phantom.n_images=140", "data.preprocess.size=32"]
TINY_CLASSIFIER = [
    "train.model=test_efficientnet",
    "train.pretrained=none",
    "train.epochs=1",
    "train.batch_size=32",
    "train.lr=0.003",
    "train.ema_decay=0.9",  # the resume test then also restores the weight average
    "train.input_size=48",  # the network sees the 32 px images upsampled: every consumer must do the same
    "train.tone_min_malignant=2",  # 21 validation images: three tone groups hold 2-3 malignant ones
]
GENERATOR_SMALL = [
    "generator.size=tiny",
    "generator.train_steps=6",
    "generator.batch_size=8",
    "generator.checkpoint_every=3",
    "generator.grid_every=3",
    "generator.log_every=3",
    "generator.warmup_steps=2",
    "generator.cpu_amp=true",  # bf16 where this CPU has it natively, else fp32 (and it says so)
]
# the generator fixture's synthetic set: two classes, eight images each
TINY_SAMPLES = ["sample.plan=counts", "sample.counts.nv=8", "sample.counts.mel=8", "sample.steps=3"]


def built_once(tmp_path_factory, worker_id: str, name: str, build):
    """A session fixture's value, built by whichever pytest-xdist process asks first and read (unpickled) by the
    others: each process used to train its own copy of the tiny models, and the suite is CPU-bound on 2 cores.
    The value must pickle, and its folders are read-only for every test (copy_run to change one)."""
    if worker_id == "master":  # no xdist
        return build()
    import pickle

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / f"{name}.pickle"
    with FileLock(f"{shared}.lock"):
        if shared.is_file():
            return pickle.loads(shared.read_bytes())
        value = build()
        shared.write_bytes(pickle.dumps(value))
        return value


def copy_run(src: Path, dst: Path) -> Path:
    """A private copy of a fixture's run directory (Ray Train's checkpoint index names its folders relatively, so a
    copied run resumes from its own copy)."""
    import shutil

    shutil.copytree(src, dst)
    return dst


def copy_config(cfg, out: Path):
    """``cfg`` (deep-copied) pointing at run directory ``out``."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.run.out = str(out)
    return cfg


@pytest.fixture(scope="session")
def phantom_prepared(ray_local, tmp_path_factory, worker_id) -> Path:
    """140 phantom images at 32 px, prepared once for the session (read it; copy it to change it)."""
    from skinsynth.config import load_config
    from skinsynth.data.prepare import prepare_images

    def build() -> Path:
        out = tmp_path_factory.mktemp("phantom") / "run"
        prepare_images(load_config(None, [f"run.out={out}", *PHANTOM_SMALL]).data, out, progress=lambda _m: None)
        return out

    return built_once(tmp_path_factory, worker_id, "phantom_prepared", build)


@pytest.fixture(scope="session")
def tiny_classifier(phantom_prepared, tmp_path_factory, worker_id):
    """A tiny timm model trained for one epoch on the session's phantom set: ``(cfg, TrainResult)``."""
    from skinsynth.classify.train import train_classifier
    from skinsynth.config import load_config

    def build():
        out = copy_run(phantom_prepared, tmp_path_factory.mktemp("classifier") / "run")
        cfg = load_config(None, [f"run.out={out}", *PHANTOM_SMALL, *TINY_CLASSIFIER])
        return cfg, train_classifier(cfg, progress=print)

    return built_once(tmp_path_factory, worker_id, "tiny_classifier", build)


@pytest.fixture(scope="session")
def tiny_generator(phantom_prepared, tmp_path_factory, worker_id):
    """A tiny generator trained for 6 steps on the session's phantom set, and a 16-image synthetic set sampled from
    it: ``(cfg, GeneratorResult)``."""
    from skinsynth.config import load_config
    from skinsynth.generate.sample import sample_synthetic
    from skinsynth.generate.train import train_generator

    def build():
        out = copy_run(phantom_prepared, tmp_path_factory.mktemp("generator") / "run")
        cfg = load_config(None, [f"run.out={out}", *PHANTOM_SMALL, *GENERATOR_SMALL, *TINY_SAMPLES])
        result = train_generator(cfg, progress=print)
        sample_synthetic(cfg.sample, out, progress=lambda _m: None)
        return cfg, result

    return built_once(tmp_path_factory, worker_id, "tiny_generator", build)


# --- a real Ray head for `ray job submit` ----------------------------------------------------------------------------


def load_cluster_file(name: str) -> dict:
    """A YAML file of ``cluster/`` (launcher, KubeRay, runtime env), parsed."""
    import yaml

    return yaml.safe_load((REPO / "cluster" / name).read_text())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


RAY_START_TIMEOUT = "The current node timed out during startup"  # Ray's fixed 30 s for a raylet to register


@contextlib.contextmanager
def running_ray_head(log_dir: Path, attempts: int = 3, num_cpus: int = 2):
    """A real Ray head on 127.0.0.1 (`ray start --head --block`) offering ``num_cpus`` CPUs to tasks, as a
    ``JobSubmissionClient`` that also carries ``gcs_address`` and ``dashboard_url`` (for a second node); killed with
    its process group on exit.

    Start it where it is needed, not beside other heavy work: a raylet that takes over 30 s to register ends
    `ray start` ("node timed out during startup", a limit fixed in Ray), which a loaded 2-core machine can reach;
    a head that dies starting is started again (up to ``attempts`` times), each time on fresh ports.
    """
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from ray.job_submission import JobSubmissionClient

    ray = Path(sys.executable).parent / "ray"
    from skinsynth.core.ray import DASHBOARD_STARTUP_TIMEOUT_S

    # the dashboard's start-up limit as `skinsynth` sets it for its own Ray
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(DASHBOARD_STARTUP_TIMEOUT_S),
    }
    env.pop("RAY_ADDRESS", None)
    for attempt in range(1, attempts + 1):
        gcs, dashboard = free_port(), free_port()
        temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
        log_path = log_dir / f"head-{attempt}.log"
        log = open(log_path, "w")
        # every port its own: the test session's embedded Ray already holds the defaults (e.g. the job agent's)
        ports = [
            f"--{flag}={free_port()}"
            for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                         "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
        ]  # fmt: skip
        head = subprocess.Popen(
            [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--num-cpus={num_cpus}",
             f"--temp-dir={temp_dir}", *ports],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            client, deadline = None, time.monotonic() + 180
            while client is None and head.poll() is None and time.monotonic() < deadline:
                try:
                    # its dashboard can answer before its raylet registers, which `ray start` may then give up on
                    if "Ray runtime started" in log_path.read_text():
                        client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
                        continue
                except Exception:  # the dashboard is not up yet
                    pass
                time.sleep(2)
            if client is None or head.poll() is not None:
                log.flush()
                if attempt < attempts:
                    continue
                raise RuntimeError(f"ray head did not come up:\n{log_path.read_text()[-3000:]}")
            client.gcs_address, client.dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
            yield client
            return
        finally:
            # SIGKILL, not SIGTERM: a throwaway head has nothing to save, and Ray's graceful stop takes half a minute
            try:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=60)
            except ProcessLookupError:
                pass
            log.close()
            shutil.rmtree(temp_dir, ignore_errors=True)


def submit_job(client, **job) -> str:
    """Submit, retrying while the head's job agent is still starting ("No available agent to submit job")."""
    import time

    deadline = time.monotonic() + 180
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(3)


def wait_for_job(client, job_id: str, timeout_s: float, until=None) -> str:
    """Poll until the job ends, or until ``until(logs)`` holds; its status then."""
    import time

    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        if until is not None and until(client.get_job_logs(job_id)):
            return status
        time.sleep(2)
    raise TimeoutError(f"job {job_id} still {client.get_job_status(job_id)} after {timeout_s:.0f} s")


@contextlib.contextmanager
def command_in_own_group(command: list[str], log: Path, ready_url: str, timeout_s: float = 300, attempts: int = 2):
    """Start ``command`` in its own process group (its output to ``log``), wait until ``ready_url`` answers 200, and
    yield the process; afterwards every process left in its group is killed.

    A command whose embedded Ray ended it at start-up because the raylet missed Ray's fixed 30 s to register ("node
    timed out during startup", which a loaded 2-core machine can reach) is started again, up to ``attempts`` times,
    as ``running_ray_head`` does for a head.
    """
    import os
    import signal
    import subprocess
    import time
    import urllib.request

    for attempt in range(1, attempts + 1):
        with log.open("w") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline, ended_by_ray_start = time.monotonic() + timeout_s, False
            while True:
                try:
                    with urllib.request.urlopen(ready_url, timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    if process.poll() is not None and attempt < attempts and RAY_START_TIMEOUT in log.read_text():
                        ended_by_ray_start = True
                        break
                    assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.5)
            if ended_by_ray_start:  # once more, on a fresh Ray
                continue
            yield process
            return
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
