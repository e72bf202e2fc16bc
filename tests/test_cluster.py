"""Running on a Ray cluster: every manifest in cluster/ parses and holds what it must. The demo submitted through
`ray job submit`'s API to a real head on 127.0.0.1, stopped during tuning and submitted again, is part of the S3 demo
test in tests/test_storage.py (one run of the demo covers both: each is minutes on 2 cores)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import yaml

from tests.conftest import REPO, load_cluster_file

CLUSTER = REPO / "cluster"


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_every_cluster_yaml_parses():
    names = sorted(p.name for p in CLUSTER.glob("*.yaml"))
    assert names == ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "ray-cluster.yaml", "runtime_env.yaml"]
    for name in names:
        assert isinstance(load_cluster_file(name), dict), name


def test_launcher_has_a_cpu_head_and_autoscaling_gpu_workers():
    launcher = load_cluster_file("ray-cluster.yaml")
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"]["CPU"] > 0 and head["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] <= launcher["max_workers"] for t in gpu)
    assert launcher["idle_timeout_minutes"] > 0
    assert any("--head" in c and "--autoscaling-config" in c for c in launcher["head_start_ray_commands"])


def test_kuberay_cluster_and_job_hold_head_gpu_workers_runtime_env_and_entrypoint():
    cluster = load_cluster_file("kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"] and int(head["resources"]["limits"]["cpu"]) > 0
    (gpu_group,) = spec["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_group["minReplicas"] == 0 < gpu_group["maxReplicas"]

    job = load_cluster_file("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["rayClusterSpec"] == spec  # the same cluster as the standing one
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:4] == ["python", "-m", "skinsynth", "run"] and (REPO / entrypoint[4]).is_file()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    assert runtime_env["pip"] == load_cluster_file("runtime_env.yaml")["pip"]


def test_runtime_env_leaves_history_runs_and_data_behind_and_lists_the_dependencies():
    runtime_env = load_cluster_file("runtime_env.yaml")
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

    excluded = _get_excludes(REPO, load_cluster_file("runtime_env.yaml")["excludes"])
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
