"""Running on a Ray cluster: every manifest in cluster/ parses and holds what it must, and the demo experiment
goes through `ray job submit`'s API to a real head started on 127.0.0.1, killed during tuning and submitted again."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_every_cluster_yaml_parses():
    names = sorted(p.name for p in CLUSTER.glob("*.yaml"))
    assert names == ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "ray-cluster.yaml", "runtime_env.yaml"]
    for name in names:
        assert isinstance(_load(name), dict), name


def test_launcher_has_a_cpu_head_and_autoscaling_gpu_workers():
    launcher = _load("ray-cluster.yaml")
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"]["CPU"] > 0 and head["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] <= launcher["max_workers"] for t in gpu)
    assert launcher["idle_timeout_minutes"] > 0
    assert any("--head" in c and "--autoscaling-config" in c for c in launcher["head_start_ray_commands"])


def test_kuberay_cluster_and_job_hold_head_gpu_workers_runtime_env_and_entrypoint():
    cluster = _load("kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"] and int(head["resources"]["limits"]["cpu"]) > 0
    (gpu_group,) = spec["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_group["minReplicas"] == 0 < gpu_group["maxReplicas"]

    job = _load("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["rayClusterSpec"] == spec  # the same cluster as the standing one
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:4] == ["python", "-m", "skinsynth", "run"] and (REPO / entrypoint[4]).is_file()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    assert runtime_env["pip"] == _load("runtime_env.yaml")["pip"]


def test_runtime_env_leaves_history_runs_and_data_behind_and_lists_the_dependencies():
    runtime_env = _load("runtime_env.yaml")
    assert runtime_env["working_dir"] == "."
    assert {".git", "/runs/", "/data/", "/bench/", ".venv"} <= set(runtime_env["excludes"])
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # everything the project needs except what the cluster image brings (ray and a CUDA build of torch)
    needed = _requirement_names(project["dependencies"]) - {"ray", "torch", "torchvision"}
    assert _requirement_names(runtime_env["pip"]) == needed


def test_runtime_env_uploads_every_file_of_the_package():
    """The excludes are gitignore-style: an unanchored ``data/`` or ``bench/`` would also leave ``skinsynth/data/`` or
    ``skinsynth/bench/`` behind, which the editable install here hides and a cluster job would not survive."""
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, _load("runtime_env.yaml")["excludes"])
    package = [p for p in (REPO / "skinsynth").rglob("*.py") if "__pycache__" not in p.parts]
    assert package and not [str(p.relative_to(REPO)) for p in package if excluded(p)]
    for left_behind in ("runs/demo/x.parquet", "data/ham10000/x.jpg", "bench/train.json", ".git/HEAD"):
        assert excluded(REPO / left_behind), left_behind


def test_submit_script_checks_its_argument_and_submits_a_ray_job():
    script = CLUSTER / "submit.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "ray job submit" in text and "--runtime-env cluster/runtime_env.yaml" in text
    assert "python -m skinsynth run" in text
    missing = subprocess.run([str(script), "experiments/no_such.yaml"], capture_output=True, text=True)
    assert missing.returncode == 2 and "experiment file not found" in missing.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head on 127.0.0.1 (`ray start --head --block`), stopped with its process group afterwards."""
    import tempfile

    from ray.job_submission import JobSubmissionClient

    ray = Path(sys.executable).parent / "ray"
    gcs, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    log = open(tmp_path / "head.log", "w")
    # every port its own: the test session's embedded Ray already holds the defaults (e.g. the job agent's 52365)
    ports = [
        f"--{flag}={_free_port()}"
        for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                     "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    ]  # fmt: skip
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp_dir}",
         *ports],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
                break
            except Exception:  # the dashboard is not up yet
                if head.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(
                        "ray head did not come up:\n" + (tmp_path / "head.log").read_text()[-3000:]
                    ) from None
                time.sleep(2)
        yield client
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(client, **job) -> str:
    """Submit, retrying while the head's job agent is still starting ("No available agent to submit job")."""
    deadline = time.monotonic() + 180
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(3)


def _wait(client, job_id: str, timeout_s: float, until=None) -> str:
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


@pytest.mark.slow
def test_demo_submitted_as_a_ray_job_killed_during_tuning_resumes_on_resubmission(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    from tests.conftest import DEMO_SMALL

    client = ray_head
    out = tmp_path / "demo"
    entrypoint = " ".join(
        [sys.executable, "-m skinsynth demo --out", str(out), *DEMO_SMALL, "--set tune.num_samples=2"]
    )
    runtime_env = {"working_dir": str(REPO), "excludes": _load("runtime_env.yaml")["excludes"] + ["tests/"]}

    first = _submit(client, entrypoint=entrypoint, runtime_env=runtime_env)
    status = _wait(client, first, 900, until=lambda logs: "tune: starting sweep" in logs)
    assert status == JobStatus.RUNNING, client.get_job_logs(first)[-3000:]
    client.stop_job(first)
    assert _wait(client, first, 120) == JobStatus.STOPPED
    assert "run summary" not in client.get_job_logs(first)

    second = _submit(client, entrypoint=entrypoint, runtime_env=runtime_env)
    status = _wait(client, second, 900)
    logs = client.get_job_logs(second)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    summary = logs[logs.index("run summary: demo") :]
    for stage in ("prepare", "generate", "sample", "train", "audit", "evaluate"):
        assert re.search(rf"^  {stage}\s+skipped", summary, re.MULTILINE), (stage, summary)
    assert re.search(r"^  tune\s+[0-9.]+ s  best trial", summary, re.MULTILINE), summary
    assert (out / "models" / "best" / "model.pt").is_file()
