"""Running on a Ray cluster: every file in cluster/ parses and holds what it must (the launcher against Ray's own
schema; images, sizes, volume, credentials and resubmission of the KubeRay files; submit.sh's commands), GPUs from
zero, and a two-node cluster on 127.0.0.1 whose second node shares no disk with the head and joins only once a sweep
submitted through cluster/submit.sh waits for it. The demo submitted through `ray job submit`'s API to a real head,
stopped during tuning and submitted again, is part of the S3 demo test in tests/test_storage.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests import test_storage
from tests.conftest import REPO, free_port, load_cluster_file

s3_endpoint = test_storage.s3_endpoint  # the fixture: moto's S3 server on loopback

CLUSTER = REPO / "cluster"


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_every_cluster_yaml_parses():
    names = sorted(p.name for p in CLUSTER.glob("*.yaml"))
    assert names == [
        "kuberay-raycluster.yaml",
        "kuberay-rayjob.yaml",
        "pvc.yaml",
        "ray-cluster.yaml",
        "runtime_env.yaml",
    ]
    for name in names:
        assert isinstance(load_cluster_file(name), dict), name


def _ray_image() -> str:
    """Ray's published GPU image at the installed Ray's version (Ray stopped publishing ``ray-ml`` after 2.49)."""
    import ray

    return f"rayproject/ray:{ray.__version__}-py311-gpu"


# the experiments the cluster files and docs/cluster.md are sized for
GPU_EXPERIMENTS = ["ratio_sweep_gpu.yaml", "label_budget_gpu.yaml", "ssl_sweep_gpu.yaml", "ham10000_baseline_gpu.yaml"]


def _gpus_wanted_at_once() -> int:
    """The most GPUs one of the GPU experiments holds at once: a sweep's concurrent trials x their workers, or the
    generator's workers."""
    from skinsynth.config import load_config

    wanted = 0
    for name in GPU_EXPERIMENTS:
        cfg = load_config(str(REPO / "experiments" / name), [])
        assert cfg.train.use_gpu is True, name  # 'auto' stays on CPU while the GPU group is at zero
        if cfg.tune.space:
            wanted = max(wanted, cfg.tune.max_concurrent_trials * cfg.train.num_workers)
        if cfg.generator.enabled and cfg.generator.use_gpu is True:
            wanted = max(wanted, cfg.generator.num_workers)
    return wanted


def test_launcher_validates_against_rays_schema_and_has_a_cpu_head_and_gpu_workers_from_zero():
    import jsonschema
    import ray

    launcher = load_cluster_file("ray-cluster.yaml")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)  # the schema `ray up` itself checks the file against
    assert launcher["docker"]["image"] == _ray_image()
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"]["CPU"] > 0 and head["resources"].get("GPU", 0) == 0
    # the head offers Ray as many CPUs as its node type says (the autoscaler plans with the latter), fewer than the
    # instance's 8 vCPUs: GCS, dashboard, autoscaler and drivers keep the rest
    (start,) = [c for c in launcher["head_start_ray_commands"] if "--head" in c]
    assert "--autoscaling-config" in start and f"--num-cpus={head['resources']['CPU']}" in start
    assert head["resources"]["CPU"] < 8
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and all(t["min_workers"] == 0 < t["max_workers"] <= launcher["max_workers"] for t in gpu)
    assert sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu) >= _gpus_wanted_at_once()
    assert launcher["idle_timeout_minutes"] > 0


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity in cores or GiB (``500m``, ``6``, ``512Mi``, ``24Gi``)."""
    text = str(value)
    for suffix, scale in (("m", 1e-3), ("Mi", 1 / 1024), ("Gi", 1.0), ("Ti", 1024.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def _containers(spec: dict) -> list[tuple[str, dict, dict]]:
    """Every Ray container of a RayCluster spec: (group, container, pod spec)."""
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return [(group, container, pod) for group, pod in pods for container in pod["containers"]]


def test_kuberay_cluster_uses_an_image_that_exists_fits_its_nodes_and_names_its_volume_and_credentials():
    import ray

    text = (CLUSTER / "kuberay-raycluster.yaml").read_text()
    cluster = load_cluster_file("kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__ and spec["enableInTreeAutoscaling"] is True
    # the node size the file is written for, from its own header: each pod, plus the autoscaler sidecar beside the
    # head, leaves at least 15% of the node's CPU and memory to the kubelet and system daemons
    cores, gib = (float(x) for x in re.search(r"nodes of (\d+) vCPU / (\d+) GiB", text).groups())
    sidecar = spec["autoscalerOptions"]["resources"]["requests"]
    pvc = load_cluster_file("pvc.yaml")
    for group, container, pod in _containers(spec):
        assert container["image"] == _ray_image(), group
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert requests == limits, group  # Ray sizes itself from the limits; requests below them would overcommit
        extra_cpu = _quantity(sidecar["cpu"]) if group == "head" else 0.0
        extra_mem = _quantity(sidecar["memory"]) if group == "head" else 0.0
        assert _quantity(requests["cpu"]) + extra_cpu <= 0.85 * cores, group
        assert _quantity(requests["memory"]) + extra_mem <= 0.85 * gib, group
        # the run's volume is the claim pvc.yaml defines, and the s3 credentials come from the named Secret
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]}, group
        assert {"secretRef": {"name": "skinsynth-s3", "optional": True}} in container["envFrom"], group
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (gpu_group,) = spec["workerGroupSpecs"]
    worker = gpu_group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # from zero, and as many one-GPU pods as the experiments hold GPUs at once (max_concurrent_trials: 8)
    assert gpu_group["minReplicas"] == gpu_group["replicas"] == 0
    assert gpu_group["maxReplicas"] == _gpus_wanted_at_once()
    # before `kubectl apply`: the header names the claim file, the Secret and how to make it
    assert "kubectl apply -f cluster/pvc.yaml" in text and "kubectl create secret generic skinsynth-s3" in text


def test_the_volume_claim_is_read_write_many():
    pvc = load_cluster_file("pvc.yaml")
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"]
    assert _quantity(pvc["spec"]["resources"]["requests"]["storage"]) > 0


def test_kuberay_job_runs_on_the_same_cluster_retries_on_failure_and_says_how_to_resubmit():
    cluster = load_cluster_file("kuberay-raycluster.yaml")
    text = (CLUSTER / "kuberay-rayjob.yaml").read_text()
    job = load_cluster_file("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]  # the same cluster as the standing one
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:4] == ["python", "-m", "skinsynth", "run"] and (REPO / entrypoint[4]).is_file()
    assert entrypoint[4].removeprefix("experiments/") in GPU_EXPERIMENTS
    # its run lives on the shared volume every pod mounts, so a retry resumes it
    assert "--set run.out=/shared/" in job["spec"]["entrypoint"]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].startswith("s3://") and runtime_env["working_dir"].endswith(".zip")
    assert runtime_env["pip"] == load_cluster_file("runtime_env.yaml")["pip"]
    # a failed job runs again on a new cluster (KubeRay's backoffLimit), and re-running it by hand is delete + apply:
    # applying an unchanged finished RayJob does nothing
    assert job["spec"]["backoffLimit"] >= 1 and job["spec"]["shutdownAfterJobFinishes"] is True
    assert "kubectl delete rayjob skinsynth-ratio-sweep && kubectl apply -f cluster/kuberay-rayjob.yaml" in text
    # the credentials its s3:// working_dir needs are named (every pod reads the Secret; see the cluster test)
    assert "skinsynth-s3" in text and "boto3" in text


def test_the_dockerfile_builds_on_the_clusters_image_and_installs_every_dependency_but_ray():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM (\S+)$", text, re.MULTILINE).group(1) == _ray_image()
    assert "pyproject.toml" in text and "pip install" in text and "boto3" in text
    assert "docker build -f cluster/Dockerfile" in text


def test_use_gpu_true_waits_for_the_autoscaler_on_a_cluster_and_auto_counts_the_gpu_types_it_can_add(monkeypatch):
    import skinsynth.core.ray as R
    from skinsynth.core.raytrain import worker_group_resources
    from skinsynth.errors import SkinsynthError

    monkeypatch.setattr(R.ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(R, "autoscaler_gpus", lambda: 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # an embedded local Ray: nothing can add a GPU, so `true` without one is an error, not an endless wait
    with pytest.raises(SkinsynthError, match="train.use_gpu is true but this local Ray has no GPU"):
        R.resolve_use_gpu(True, "train.use_gpu")
    assert R.resolve_use_gpu("auto", "train.use_gpu") is False
    # a cluster whose GPU group is at zero: `true` asks (Ray Train's worker group waits for the autoscaler) ...
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert R.resolve_use_gpu(True, "train.use_gpu") is True
    # ... and `auto` uses GPUs only where the autoscaler publishes a GPU node type it can add
    assert R.resolve_use_gpu("auto", "train.use_gpu") is False
    monkeypatch.setattr(R, "autoscaler_gpus", lambda: 8)
    assert R.resolve_use_gpu("auto", "train.use_gpu") is True
    assert R.resolve_use_gpu(False, "train.use_gpu") is False
    monkeypatch.setattr(R.ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    monkeypatch.setattr(R, "autoscaler_gpus", lambda: 0)
    assert R.resolve_use_gpu("auto", "train.use_gpu") is True
    # what a worker asks for: Ray's default, plus a custom resource only when the config names one
    assert worker_group_resources(False, {}) is None
    assert worker_group_resources(False, {"gpu_standin": 1}) == {"CPU": 1.0, "gpu_standin": 1.0}
    assert worker_group_resources(True, {"a10g": 1}) == {"GPU": 1.0, "a10g": 1.0}


def test_runtime_env_leaves_history_runs_and_data_behind_and_lists_the_dependencies():
    runtime_env = load_cluster_file("runtime_env.yaml")
    assert runtime_env["working_dir"] == "."
    assert {".git", "/runs/", "/data/", "/bench/", ".venv"} <= set(runtime_env["excludes"])
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # everything the project needs except Ray, which the image brings at the cluster's version (Ray's published
    # images have no torch: it comes from here, or from the image of cluster/Dockerfile), with pyproject's bounds
    assert _requirement_names(runtime_env["pip"]) == _requirement_names(project["dependencies"]) - {"ray"}
    assert set(runtime_env["pip"]) == {r for r in project["dependencies"] if not r.startswith("ray")}


def test_runtime_env_uploads_every_file_of_the_package():
    """The excludes are gitignore-style: an unanchored ``data/`` or ``bench/`` would also leave ``skinsynth/data/`` or
    ``skinsynth/bench/`` behind, which the editable install here hides and a cluster job would not survive."""
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, load_cluster_file("runtime_env.yaml")["excludes"])
    package = [p for p in (REPO / "skinsynth").rglob("*.py") if "__pycache__" not in p.parts]
    assert package and not [str(p.relative_to(REPO)) for p in package if excluded(p)]
    for left_behind in ("runs/demo/x.parquet", "data/ham10000/x.jpg", "bench/train.json", ".git/HEAD"):
        assert excluded(REPO / left_behind), left_behind


def test_submit_script_checks_its_arguments_and_submits_run_or_one_command_as_a_ray_job(tmp_path):
    script = CLUSTER / "submit.sh"
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    missing = subprocess.run([str(script), "experiments/no_such.yaml"], capture_output=True, text=True)
    assert missing.returncode == 2 and "experiment file not found" in missing.stderr
    missing = subprocess.run([str(script), "tune", "experiments/no_such.yaml"], capture_output=True, text=True)
    assert missing.returncode == 2 and "experiment file not found" in missing.stderr
    env = {**os.environ, "SUBMIT_RUNTIME_ENV": "cluster/none.yaml"}
    no_env = subprocess.run([str(script), "experiments/demo.yaml"], capture_output=True, text=True, env=env)
    assert no_env.returncode == 2 and "runtime env file not found: cluster/none.yaml" in no_env.stderr
    # what it hands `ray job submit`: a stand-in `ray` on PATH prints its arguments, one a line
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (bin_dir / "ray").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_ADDRESS": "http://10.0.0.1:8265"}

    def submitted(*args: str) -> list[str]:
        done = subprocess.run([str(script), *args], capture_output=True, text=True, env=env, check=True)
        lines = done.stdout.splitlines()
        assert lines[-1].startswith("submission id: skinsynth-") and lines[-2].startswith("logs: ray job logs")
        return lines[lines.index("job") : -2]  # between the script's "submitting ..." line and its last two

    run = submitted("experiments/demo.yaml", "--set", "run.out=s3://b/r?x=1&y=2")
    assert run[:5] == ["job", "submit", "--address", "http://10.0.0.1:8265", "--submission-id"]
    assert run[run.index("--runtime-env") + 1] == "cluster/runtime_env.yaml" and "--no-wait" not in run
    assert run[run.index("--") + 1 :] == [
        "python", "-m", "skinsynth", "run", "experiments/demo.yaml", "--set", "run.out=s3://b/r?x=1&y=2",
    ]  # fmt: skip
    env["SUBMIT_NO_WAIT"] = "1"
    tune = submitted("tune", "experiments/demo.yaml", "--set", "tune.num_samples=2")
    assert "--no-wait" in tune and tune[tune.index("--submission-id") + 1].startswith("skinsynth-tune-demo-")
    assert tune[tune.index("--") + 1 :] == [
        "python", "-m", "skinsynth", "tune", "--config", "experiments/demo.yaml", "--set", "tune.num_samples=2",
    ]  # fmt: skip
    two_words = submitted("generate", "train", "experiments/demo.yaml")
    assert two_words[two_words.index("--") + 1 :][3:] == ["generate", "train", "--config", "experiments/demo.yaml"]


# --- a two-node cluster on 127.0.0.1 that shares no disk ------------------------------------------------------------

STANDIN = "gpu_standin"  # a custom resource in place of a GPU node type: only the second node carries it
# the job's experiment: the demo file, at test size, without the generator, a two-trial sweep of one-epoch trials
# whose Ray Train workers ask for the stand-in (as the *_gpu.yaml experiments ask for a GPU with use_gpu: true)
CLUSTER_SWEEP = [
    "data.phantom.n_images=140",
    "data.preprocess.size=32",
    "generator.enabled=false",
    "train.model=test_efficientnet",
    "train.pretrained=none",
    "train.epochs=1",
    "train.batch_size=32",
    "train.use_gpu=false",
    f"train.worker_resources.{STANDIN}=1",
    "tune.name=cluster_sweep",
    "tune.num_samples=2",
    "tune.max_concurrent_trials=1",  # the second node's 2 CPUs: one trial's worker and its Ray Data reads
    "tune.space={train.lr: {choice: [0.001, 0.003]}}",
]


def _mount_namespaces_work() -> bool:
    """Whether this machine lets an unprivileged user make a mount namespace (``unshare --user --mount``)."""
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-current-user", "--mount", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _alive_nodes(dashboard_url: str) -> list:
    from ray.util.state import list_nodes

    return list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")], detail=True)


@contextlib.contextmanager
def _second_node(client, root: Path, hidden: Path, resources: dict[str, float], attempts: int = 3):
    """A second Ray node joining the head of ``client``: 2 CPUs and ``resources``, its own temp dir, started in its own
    mount namespace where ``hidden`` (the driver's local run copy) is replaced by an empty folder of its own,
    ``root/hidden`` (a separate machine's disk at the same path); stopped through its own process group. Yields once
    the head sees it alive. A node whose raylet misses Ray's fixed 30 s start-up limit on a loaded machine is started
    again, on fresh ports (as ``running_ray_head`` does for the head)."""
    ray = Path(sys.executable).parent / "ray"
    own = root / "hidden"
    own.mkdir(parents=True)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    for attempt in range(1, attempts + 1):
        temp_dir = Path(tempfile.mkdtemp(prefix="raynode-", dir="/tmp"))  # Ray's socket paths stay under 107 bytes
        ports = [
            f"--{flag}={free_port()}"
            for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                         "metrics-export-port", "node-manager-port", "object-manager-port")
        ]  # fmt: skip
        start = shlex.join(
            [str(ray), "start", "--block", f"--address={client.gcs_address}", "--node-ip-address=127.0.0.1",
             "--num-cpus=2", f"--resources={json.dumps(resources)}", f"--temp-dir={temp_dir}", *ports]
        )  # fmt: skip
        script = f"mount --bind {shlex.quote(str(own))} {shlex.quote(str(hidden))} && exec {start}"
        log_path = root / f"node-{attempt}.log"
        log = open(log_path, "w")
        node = subprocess.Popen(
            ["unshare", "--user", "--map-current-user", "--mount", "bash", "-c", script],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while len(_alive_nodes(client.dashboard_url)) < 2 and node.poll() is None and time.monotonic() < deadline:
                time.sleep(2)
            if len(_alive_nodes(client.dashboard_url)) < 2 or node.poll() is not None:
                if attempt < attempts:
                    continue
                raise RuntimeError(f"the second node did not come up:\n{log_path.read_text()[-3000:]}")
            yield own
            return
        finally:
            try:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=60)
            except ProcessLookupError:
                pass
            log.close()
            shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(args: list[str], env: dict[str, str]) -> str:
    """``cluster/submit.sh ARGS`` without waiting; the submission id it prints."""
    done = subprocess.run([str(CLUSTER / "submit.sh"), *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"^submission id: (\S+)$", done.stdout, re.MULTILINE).group(1)


def _pending_standin_bundles(dashboard_url: str) -> list[dict]:
    """Bundles of pending placement groups that ask for the stand-in resource (Ray's state API on the dashboard)."""
    from ray.util.state import list_placement_groups

    groups = list_placement_groups(address=dashboard_url, filters=[("state", "=", "PENDING")], detail=True)
    return [b for g in groups for b in g.bundles if STANDIN in (b.get("unit_resources") or {})]


def _standin_units(required: dict[str, float] | None) -> float:
    """Units of the stand-in an actor holds: by its own name, or in a placement group's bundle
    (``gpu_standin_group_<bundle>_<group id>``; the bundle-less ``gpu_standin_group_<group id>`` is the same units)."""
    pattern = re.compile(rf"^{STANDIN}(_group_\d+_[0-9a-f]+)?$")
    return sum(n for name, n in (required or {}).items() if pattern.match(name))


def _cluster_state(client) -> str:
    """What a failed wait reports: the job's log, placement groups, and tasks and actors not running."""
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    address = client.dashboard_url
    groups = [(g.state, g.bundles) for g in list_placement_groups(address=address, detail=True)]
    tasks = [(t.name, t.state, t.required_resources) for t in list_tasks(address=address, detail=True)]
    actors = [(a.class_name, a.state, a.required_resources) for a in list_actors(address=address, detail=True)]
    logs = "\n".join(client.get_job_logs(job.submission_id)[-2000:] for job in client.list_jobs())
    return f"{logs}\nplacement groups: {groups}\ntasks: {tasks}\nactors: {actors}"


@pytest.mark.slow
def test_a_sweep_evaluate_and_predict_run_through_submit_sh_on_a_second_node_that_appears_later_and_shares_no_disk(
    s3_endpoint, tmp_path, monkeypatch
):
    """Two Ray nodes on 127.0.0.1: a head with one CPU (the drivers, and Ray Data's reads of the shards from the
    bucket) and a second node with 2 CPUs and a custom resource standing in for a GPU node type, which joins only once
    the submitted sweep's first Ray Train run is waiting for it (as a GPU worker group scaled to zero makes it wait).
    Every job goes through cluster/submit.sh with run.out on the S3 API of moto's server. The second node runs in a
    mount namespace where the driver's local run copy is an empty folder of its own: what it needs it must take
    from the bucket, as on a separate machine. The sweep's two trials train there, their Ray Train workers (and
    nothing else) holding the stand-in; evaluate then reads the best model back, and predict scores the run's test
    images from the bucket into the bucket."""
    if not _mount_namespaces_work():
        pytest.skip("needs unprivileged mount namespaces (unshare --user --mount): the second node's own disk")
    from ray.job_submission import JobStatus
    from ray.util.state import list_actors

    from skinsynth.config import load_config
    from skinsynth.core.storage import synced_run
    from skinsynth.data.prepare import prepare_images
    from tests.conftest import running_ray_head, submit_job, wait_for_job
    from tests.test_storage import BUCKET, _selector, _uri

    endpoint, filesystem = s3_endpoint
    out = _uri(endpoint, "runs/cluster")
    driver_cache = tmp_path / "driver-cache"  # the head's local copies; hidden from the second node
    driver_cache.mkdir()
    overrides = [*CLUSTER_SWEEP, f"run.out={out}", f"run.cache_dir={driver_cache}"]
    # the prepared data, pushed from a third folder (the test's own machine): the first job pulls it
    seed_cache = f"run.cache_dir={tmp_path / 'seed-cache'}"
    seed = load_config(str(REPO / "experiments" / "demo.yaml"), [*CLUSTER_SWEEP, f"run.out={out}", seed_cache])
    with synced_run(seed.run, progress=lambda _m: None) as store:
        prepare_images(seed.data, store.local, engine="local", progress=lambda _m: None)

    # the runtime env of the cluster files without its pip list: both nodes run this checkout's environment, which
    # has every dependency (and there is no index to install from)
    runtime_env = {k: v for k, v in load_cluster_file("runtime_env.yaml").items() if k != "pip"}
    runtime_env_file = tmp_path / "runtime_env.yaml"
    runtime_env_file.write_text(yaml.safe_dump(runtime_env))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # `ray`, and the jobs' python
    sets = [arg for value in overrides for arg in ("--set", value)]
    steps = [  # (submit.sh's arguments, what each step leaves in the bucket)
        (["tune", "experiments/demo.yaml", *sets], ["tune/cluster_sweep/trials.parquet", "models/best/model.pt"]),
        (["evaluate", "experiments/demo.yaml", *sets, "--set", "train.name=best", "--n-boot", "50"],
         ["eval/best/report.json"]),
        # batch prediction of the run's own test images (from the bucket) with the sweep's best model, into the bucket
        (["predict", "experiments/demo.yaml", *sets, "--input", out, "--split", "test",
          "--out", _uri(endpoint, "runs/cluster/predictions/test.parquet")],
         ["predictions/test.parquet", "predictions/test.quarantine.csv"]),
    ]  # fmt: skip

    # one CPU on the head: a trial prepares its data there before its workers ask for the stand-in (with none, the
    # data tasks would wait for the second node's CPUs and the stand-in's wait would go unseen)
    with running_ray_head(tmp_path, num_cpus=1) as client:
        env = {**os.environ, "RAY_ADDRESS": client.dashboard_url, "SUBMIT_NO_WAIT": "1",
               "SUBMIT_RUNTIME_ENV": str(runtime_env_file)}  # fmt: skip
        first = _submit(steps[0][0], env)
        # the sweep starts with one node and no stand-in: its first trial's workers wait in a pending placement group
        status = wait_for_job(client, first, 300, until=lambda logs: "tune: starting sweep" in logs)
        assert status == JobStatus.RUNNING, client.get_job_logs(first)[-4000:]
        deadline = time.monotonic() + 180
        while not _pending_standin_bundles(client.dashboard_url):
            assert time.monotonic() < deadline, _cluster_state(client)
            assert client.get_job_status(first) == JobStatus.RUNNING, client.get_job_logs(first)[-3000:]
            time.sleep(2)
        assert len(_alive_nodes(client.dashboard_url)) == 1
        with _second_node(client, tmp_path / "node2", driver_cache, {STANDIN: 1}) as node2_disk:
            status = wait_for_job(client, first, 900)
            logs = client.get_job_logs(first)
            assert status == JobStatus.SUCCEEDED, logs[-4000:]
            assert "tune: 2 of 2 trials finished" in logs, logs[-4000:]
            for args, _outputs in steps[1:]:
                job = _submit(args, env)
                assert wait_for_job(client, job, 600) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-4000:]

            nodes = _alive_nodes(client.dashboard_url)
            head_id = next(n.node_id for n in nodes if n.is_head_node)
            (second_id,) = [n.node_id for n in nodes if not n.is_head_node]
            actors = list_actors(address=client.dashboard_url, detail=True, limit=10000)
            # the second node's view of the driver's copy: its own empty folder (a job placed there by the stand-in)
            # (written to a file: the logs of a job whose entrypoint runs on another node than the head stay there)
            seen = tmp_path / "node2" / "seen.json"
            code = f"import json, os; open({str(seen)!r}, 'w').write(json.dumps(os.listdir({str(driver_cache)!r})))"
            there = submit_job(
                client, entrypoint=shlex.join([sys.executable, "-c", code]), entrypoint_resources={STANDIN: 1}
            )
            assert wait_for_job(client, there, 120) == JobStatus.SUCCEEDED, client.get_job_logs(there)
            assert json.loads(seen.read_text()) == []
            assert os.listdir(driver_cache) == ["s3"]
        workers = [a for a in actors if a.class_name == "RayTrainWorker"]
        # one worker per trial (each trial's run, and no retry), all on the second node, each holding the stand-in
        assert len(workers) == 2, [(a.class_name, a.state) for a in actors]
        assert {a.node_id for a in workers} == {second_id}
        assert [_standin_units(a.required_resources) for a in workers] == [1.0, 1.0]
        # nothing else asked for it: not the trials' Tune functions, not the controllers, not the drivers' actors
        others = [a for a in actors if a.class_name != "RayTrainWorker"]
        assert others and not [a.class_name for a in others if _standin_units(a.required_resources)]
        assert head_id != second_id

    listing = filesystem.get_file_info(_selector(f"{BUCKET}/runs/cluster"))
    remote = {info.path.removeprefix(f"{BUCKET}/runs/cluster/") for info in listing}
    for _args, outputs in steps:
        for name in outputs:
            assert name in remote, name
    assert len([p for p in remote if re.match(r"tune/cluster_sweep/trials/trial-\w+/.+/checkpoint_", p)]) >= 2
    with filesystem.open_input_stream(f"{BUCKET}/runs/cluster/eval/best/report.json") as stream:
        report = json.loads(stream.read())
    assert 0.0 <= report["test"]["balanced_accuracy"] <= 1.0
    # the driver's copy on the head holds the run. On the second node that path was a folder of its own (what the
    # trials' workers there needed came from the bucket: the shards, their checkpoints), so a read of the driver's
    # copy from there would have failed the sweep above
    local = driver_cache / "s3" / BUCKET / "runs" / "cluster"
    assert (local / "tune" / "cluster_sweep" / "trials.parquet").is_file() and node2_disk != driver_cache
