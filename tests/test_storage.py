"""Run storage through pyarrow's filesystem layer: local paths, ``file://`` URIs, and a real S3 API (moto's server
on 127.0.0.1) for a remote ``run.out``, including the whole demo pipeline with Ray Train and Tune writing there."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time

import pandas as pd
import pytest

from skinsynth.core.storage import REMOTE_MARKER, display_uri, open_run_store, remote_shards, synced_run
from skinsynth.errors import SkinsynthError
from tests.conftest import BAD_EXPECTED, DEMO_SMALL, REPO, load_cluster_file

BUCKET = "skinsynth-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on loopback: the same HTTP API an S3 bucket answers, started for real."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    import pyarrow.fs as pafs

    filesystem = pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        endpoint_override=endpoint,
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    filesystem.create_dir(BUCKET)
    yield endpoint, filesystem
    server.stop()


def _uri(endpoint: str, path: str) -> str:
    # credentials and endpoint in the URI: Ray Train/Tune and Ray Data get the same filesystem object
    return f"s3://testing:testing@{BUCKET}/{path}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


class _Run:
    def __init__(self, out: str, cache_dir: str = "") -> None:
        self.out, self.cache_dir = out, cache_dir


def test_local_paths_and_file_uris_are_used_as_they_are(tmp_path):
    store = open_run_store(str(tmp_path / "run"))
    assert store.local == tmp_path / "run" and not store.remote
    assert store.ray_storage("ray_train") == (str(tmp_path / "run" / "ray_train"), None)
    as_uri = open_run_store(f"file://{tmp_path}/run")
    assert as_uri.local == tmp_path / "run" and not as_uri.remote
    with synced_run(_Run(str(tmp_path / "run"))) as synced:
        assert synced.local == tmp_path / "run"
    assert not (tmp_path / "run").exists()  # nothing to pull, nothing written
    assert remote_shards(tmp_path / "run", "data", "images") == (str(tmp_path / "run" / "data" / "images"), None)


def test_credentials_in_a_uri_are_masked_for_display():
    assert display_uri("s3://key:secret@bucket/run?region=x") == "s3://***@bucket/run?region=x"
    assert display_uri("gs://bucket/a@b") == "gs://bucket/a@b"  # an @ in the path is not a credential
    assert display_uri("runs/demo") == "runs/demo"


def test_an_unknown_scheme_is_an_error_naming_the_uri(tmp_path):
    with pytest.raises(SkinsynthError, match="run.out 'nosuchfs://bucket/run'"):
        open_run_store("nosuchfs://bucket/run", str(tmp_path))


def test_a_remote_run_is_pulled_and_pushed_by_size_and_age(s3_endpoint, tmp_path):
    endpoint, filesystem = s3_endpoint
    out = _uri(endpoint, "sync/run")
    store = open_run_store(out, str(tmp_path / "cache-a"))
    assert store.remote and store.local == tmp_path / "cache-a" / "s3" / BUCKET / "sync" / "run"
    assert store.ray_storage("tune", "x") == (f"{BUCKET}/sync/run/tune/x", store.filesystem)

    with synced_run(_Run(out, str(tmp_path / "cache-a")), progress=lambda _: None) as synced:
        (synced.local / "data").mkdir(parents=True)
        (synced.local / "data" / "manifest.json").write_text('{"stage": "data"}')
        (synced.local / "ray_train" / "grids").mkdir(parents=True)
        (synced.local / "ray_train" / "grids" / "g.png").write_bytes(b"png")
    assert json.loads((synced.local / REMOTE_MARKER).read_text()) == {"out": out}
    remote = {info.path for info in filesystem.get_file_info(_selector(f"{BUCKET}/sync/run"))}
    assert f"{BUCKET}/sync/run/data/manifest.json" in remote
    assert not any(path.endswith(REMOTE_MARKER) for path in remote)  # the marker is the copy's, not the run's
    assert store.push() == 0  # nothing changed since

    time.sleep(1.1)  # S3 times have one-second resolution
    (store.local / "data" / "manifest.json").write_text('{"stage": "data!"}')
    assert store.push() == 1
    # another machine: an empty copy pulls everything but Ray Train's folder, which Ray reads remotely itself
    other = open_run_store(out, str(tmp_path / "cache-b"))
    assert other.pull() == 1
    assert json.loads((other.local / "data" / "manifest.json").read_text()) == {"stage": "data!"}
    assert not (other.local / "ray_train").exists()
    assert other.push() == 0  # pulled copies keep their source's age, so they are not sent back
    assert remote_shards(store.local, "data", "images") == (f"{BUCKET}/sync/run/data/images", store.filesystem)

    # the first machine changes the file again at the same size (a manifest's new identity hash is as long as the
    # old one): the second machine's copy is older than the run's, so it is pulled again, not kept by its size
    time.sleep(1.1)
    (store.local / "data" / "manifest.json").write_text('{"stage": "atad!"}')
    assert store.push() == 1
    assert other.pull() == 1
    assert json.loads((other.local / "data" / "manifest.json").read_text()) == {"stage": "atad!"}
    assert other.pull() == 0 and store.pull() == 0
    # a local change not pushed yet is newer than the run's copy: a pull keeps it
    time.sleep(0.1)
    (other.local / "data" / "manifest.json").write_text('{"stage": "local"}')
    assert other.pull() == 0 and other.push() == 1


def test_an_unreachable_endpoint_fails_before_any_work(tmp_path):
    bad = f"s3://testing:testing@{BUCKET}/run?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    with pytest.raises(SkinsynthError, match="cannot read run.out 's3://"):
        with synced_run(_Run(bad, str(tmp_path)), progress=lambda _: None):
            pytest.fail("the command body must not run")


def _upload(filesystem, local_root, remote_root: str) -> int:
    files = [p for p in sorted(local_root.rglob("*")) if p.is_file()]
    for path in files:
        target = f"{remote_root}/{path.relative_to(local_root).as_posix()}"
        filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(target) as sink:
            sink.write(path.read_bytes())
    return len(files)


def test_a_source_folder_on_s3_prepares_like_the_same_folder_on_disk(
    ray_local, s3_endpoint, messy_ham_dir, tmp_path, monkeypatch
):
    """data.path as a URI: the folder is pulled into a local copy and listed there, the records and quarantine name
    the files' URIs, and the shards equal those of the same folder prepared from disk."""
    import pandas as pd

    import skinsynth.core.storage as storage
    from skinsynth.config import DataConfig
    from skinsynth.data.prepare import prepare_images

    endpoint, filesystem = s3_endpoint
    monkeypatch.setattr(storage, "SOURCE_CACHE", str(tmp_path / "sources"))
    sent = _upload(filesystem, messy_ham_dir, f"{BUCKET}/src/ham")
    source = _uri(endpoint, "src/ham")
    messages: list[str] = []
    on_s3 = prepare_images(
        DataConfig(source="ham10000", path=source), tmp_path / "from-s3", engine="ray", progress=messages.append
    )
    assert any(f"({sent} file(s) pulled)" in m and "testing:testing" not in m for m in messages), messages
    on_disk = prepare_images(
        DataConfig(source="ham10000", path=str(messy_ham_dir)),
        tmp_path / "from-disk",
        engine="local",
        progress=lambda _m: None,
    )
    assert on_s3.card["quarantine_reasons"] == on_disk.card["quarantine_reasons"]
    assert on_s3.card["quarantined"] == on_disk.card["quarantined"] == len(BAD_EXPECTED) + 1  # + the duplicate id
    columns = ["image_id", "image", "dx", "group_id", "sha256", "ita"]
    shards = {
        name: pd.read_parquet(tmp_path / name / "data" / "images", columns=columns).sort_values("image_id")
        for name in ("from-s3", "from-disk")
    }
    assert len(shards["from-s3"]) == 15
    pd.testing.assert_frame_equal(shards["from-s3"].reset_index(drop=True), shards["from-disk"].reset_index(drop=True))
    quarantine = pd.read_csv(tmp_path / "from-s3" / "data" / "quarantine.csv").set_index("image_id")
    # bad files are reported under their URI (a file read at listing time and one refused by a prepare task)
    assert quarantine.at["ISIC_trunc", "uri"].startswith(f"s3://testing:testing@{BUCKET}/src/ham/")
    assert quarantine.at["ISIC_trunc", "reason"].startswith("truncated or corrupt image")
    assert quarantine.at["ISIC_orphan", "uri"].endswith("ISIC_orphan.jpg?" + source.split("?", 1)[1])

    # a prepare task on a node without the local copy reads the file from the URI itself
    uri = quarantine.at["ISIC_orphan", "uri"]
    mirrored = storage.source_mirror(uri)
    expected = mirrored.read_bytes()
    mirrored.unlink()
    assert storage.read_source_bytes(uri) == expected

    with pytest.raises(SkinsynthError, match="data.path 's3://\\*\\*\\*@skinsynth-test/src/none.* does not exist"):
        prepare_images(DataConfig(source="ham10000", path=_uri(endpoint, "src/none")), tmp_path / "x")

    # a prepared set on S3 (an external set, a run to audit) is read from a pulled copy
    _upload(filesystem, tmp_path / "from-disk", f"{BUCKET}/prepared/ham")
    copy = storage.local_prepared_copy(_uri(endpoint, "prepared/ham"), progress=lambda _m: None)
    assert copy != tmp_path / "from-disk" and (copy / "data" / "splits.parquet").is_file()
    assert storage.local_prepared_copy(tmp_path / "from-disk") == tmp_path / "from-disk"


def _trained_outputs(filesystem, run_dir) -> dict:
    """What a re-split must change: the split table, the Ray Train runs (on the bucket), and the exported weights
    (in the local copy ``run_dir``)."""
    import torch
    from safetensors.torch import load_file

    def model(name: str) -> dict:
        return torch.load(run_dir / "models" / name / "model.pt", map_location="cpu", weights_only=True)

    import pyarrow.fs as pafs

    runs = [i.base_name for i in filesystem.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/demo/ray_train"))]
    return {
        "splits": (run_dir / "data" / "splits.parquet").read_bytes(),
        "runs": {p: {r for r in runs if r.startswith(f"{p}-")} for p in ("classifier", "generator")},
        "classifier": model("classifier"),
        "best": model("best"),
        "generator": load_file(next((run_dir / "generator" / "unet").glob("*.safetensors"))),
    }


def _weights_differ(a: dict, b: dict) -> bool:
    return any(not a[k].equal(b[k]) for k in a if a[k].is_floating_point())


def _skipped(stage: str, summary: str) -> bool:
    return bool(re.search(rf"^  {stage}\s+skipped", summary, re.MULTILINE))


@pytest.mark.slow
def test_the_demo_runs_on_s3_resumes_on_a_fresh_machine_reruns_what_changed_and_runs_as_a_ray_job(
    ray_local, s3_endpoint, tmp_path, capsys, monkeypatch
):
    """The whole pipeline with run.out on S3: stages work in a local copy and push after each one, Ray Train and Tune
    checkpoint straight to the bucket, training reads the shards from it; a re-split, submitted through
    `ray job submit`'s API to a real Ray head, re-runs every stage downstream of the data in new Ray Train runs and,
    stopped during tuning, finishes when submitted again; a second machine (an empty local copy) then finds every
    stage done (two runs of the demo cover all of it: each is minutes on 2 cores)."""
    from ray.job_submission import JobStatus

    from skinsynth.cli import main
    from tests.conftest import RAY_INTERNALS, running_ray_head, submit_job, wait_for_job

    endpoint, filesystem = s3_endpoint
    out = _uri(endpoint, "runs/demo")
    args = ["demo", *DEMO_SMALL, "--set", f"run.out={out}", "--set", f"run.cache_dir={tmp_path / 'machine-a'}"]
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "SIMULATED phantom data" in printed and "images: 70 at 32 px" in printed
    # a quiet terminal: skinsynth's own lines, at most 100; Ray's go to RUN_DIR/logs/<stage>.log (in real file
    # descriptors too: the Ray job rounds below check the output of a separate process)
    terminal = printed + captured.err
    assert len(terminal.splitlines()) <= 100, terminal
    for internal in RAY_INTERNALS:
        assert internal not in terminal, internal
    local = tmp_path / "machine-a" / "s3" / BUCKET / "runs" / "demo"
    stage_logs = {path.stem: path.read_text() for path in (local / "logs").glob("*.log")}
    assert {"prepare", "generate", "sample", "train", "audit", "evaluate", "tune"} <= set(stage_logs)
    assert "(RayTrainWorker pid=" in stage_logs["train"] and "(RayTrainWorker pid=" in stage_logs["generate"]
    assert "Configuration for experiment" in stage_logs["tune"]
    # what each stage cost: every stage that ran records its CPU time and an energy estimate in its manifest, the
    # run summary totals them, and the sweep's table has them per trial
    for stage_dir in (
        "data",
        "generator",
        "synthetic",
        "models/classifier",
        "audit",
        "eval/classifier",
        "tune/demo_sweep",
    ):
        compute = json.loads((local / stage_dir / "manifest.json").read_text())["compute"]
        assert compute["cpu_s"] > 0 and compute["energy_kwh"] > 0 and compute["co2e_kg"] > 0, stage_dir
        assert compute["energy_method"] and compute["wall_s"] > 0 and compute["peak_rss_mb"] > 0, stage_dir
    assert re.search(r"^  TOTAL \(7 ran\)\s+[0-9.]+\s+[0-9.]+", printed, re.MULTILINE), printed
    trials = pd.read_csv(local / "tune" / "demo_sweep" / "trials.csv")
    assert (trials[["wall_s", "cpu_s", "energy_kwh", "co2e_kg"]] > 0).all().all(), trials
    assert re.search(r"== stage prepare: done in [0-9.]+ s; \d+ file\(s\) pushed to s3://", printed)
    assert "testing:testing" not in printed  # the URI's credentials are masked in every line
    assert re.search(r"^  evaluate\s+[0-9.]+ s  test balanced accuracy", printed, re.MULTILINE)
    assert re.search(r"^  audit\s+[0-9.]+ s  memorised [0-9.]+%, attack AUC", printed, re.MULTILINE)
    assert re.search(r"^  tune\s+[0-9.]+ s  best trial \w+: val balanced accuracy [0-9.]+", printed, re.MULTILINE)
    remote = {
        info.path.removeprefix(f"{BUCKET}/runs/demo/")
        for info in filesystem.get_file_info(_selector(f"{BUCKET}/runs/demo"))
    }
    for name in (
        "data/manifest.json",
        "models/classifier/model.pt",
        "eval/classifier/report.json",
        "audit/report.json",
        "tune/demo_sweep/trials.parquet",
        "models/best/model.pt",
        "eval/best/report.json",
        "generator/grid.png",
    ):
        assert name in remote, name
    # Ray Train (classifier, generator) and the sweep's trials checkpointed on S3, not in the local copy
    assert any(re.match(r"ray_train/classifier-\w+/checkpoint_", p) for p in remote)
    assert any(re.match(r"ray_train/generator-\w+/checkpoint_", p) for p in remote)
    swept = sorted(p for p in remote if p.startswith("tune/"))
    assert any(re.match(r"tune/demo_sweep/trials/trial-\w+/.+/checkpoint_", p) for p in remote), swept
    # where to watch the sweep: TensorBoard over its folder on the bucket, which holds the trials' event files
    assert f"tensorboard --logdir s3://{BUCKET}/runs/demo/tune/demo_sweep " in printed
    assert any(re.match(r"tune/demo_sweep/trial-\w+/events\.out\.tfevents\.", p) for p in remote), swept
    assert not list((local / "ray_train").glob("classifier-*/checkpoint_*"))
    card = json.loads((local / "synthetic" / "synthetic_card.json").read_text())
    assert card["images"] > 0 and card["synthetic"] is True
    report = json.loads((local / "eval" / "classifier" / "report.json").read_text())
    assert report["synthetic_conditioning"]["n"] == card["images"]
    audit = json.loads((local / "audit" / "report.json").read_text())
    assert audit["images"]["synthetic"] == card["images"] and isinstance(audit["gate"]["share_ok"], bool)

    machine_b = tmp_path / "machine-b" / "s3" / BUCKET / "runs" / "demo"
    args_b = ["demo", *DEMO_SMALL, "--set", f"run.out={out}", "--set", f"run.cache_dir={tmp_path / 'machine-b'}"]
    # (which settings reach which stage's identity, an audit setting re-running the audit alone among them:
    # tests/test_identity.py; a second machine finding every stage done is machine B's pull at the end)

    # Regression: a re-split once resumed the finished Ray Train runs of the old split (their names hashed only the
    # source files) and exported their weights, whose training lesions could now be test lesions. A re-split is a
    # new data identity: every stage downstream re-runs, saying why, in new Ray Train runs with new weights.
    # It runs as a Ray job on a real head (the demo's own process on the cluster, as `ray job submit` starts it),
    # stopped as its sweep starts and submitted again: the second job finds every finished stage on S3.
    before = _trained_outputs(filesystem, local)
    resplit = ["--set", "audit.gallery_pairs=4", "--set", "data.split.seed=7"]
    job_args = ["demo", *DEMO_SMALL, "--set", f"run.out={out}", "--set", f"run.cache_dir={tmp_path / 'machine-c'}"]
    entrypoint = shlex.join([sys.executable, "-m", "skinsynth", *job_args, *resplit])  # a shell runs it
    excludes = load_cluster_file("runtime_env.yaml")["excludes"]
    runtime_env = {"working_dir": str(REPO), "excludes": [*excludes, "tests/"]}
    with running_ray_head(tmp_path) as client:  # started now, not beside the demo's own runs above
        first = submit_job(client, entrypoint=entrypoint, runtime_env=runtime_env)
        status = wait_for_job(client, first, 900, until=lambda logs: "tune: starting sweep" in logs)
        assert status == JobStatus.RUNNING, client.get_job_logs(first)[-3000:]
        client.stop_job(first)
        assert wait_for_job(client, first, 120) == JobStatus.STOPPED
        logs = client.get_job_logs(first)
        assert "run summary" not in logs and "== stage tune: done" not in logs
        for internal in RAY_INTERNALS:  # the job's stdout and stderr: a process's real file descriptors
            assert internal not in logs, internal
        assert "== stage prepare: done in" in logs
        for stage in ("generate", "train", "audit", "evaluate", "tune"):
            assert re.search(rf"^{stage}: running \(data changed \(\w+ -> \w+\)", logs, re.MULTILINE), stage
        assert re.search(r"^sample: running \(generator changed", logs, re.MULTILINE)

        second = submit_job(client, entrypoint=entrypoint, runtime_env=runtime_env)
        status = wait_for_job(client, second, 900)
        logs = client.get_job_logs(second)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        for internal in RAY_INTERNALS:
            assert internal not in logs, internal
        summary = logs[logs.index("run summary: demo") :]
        for stage in ("prepare", "generate", "sample", "train", "audit", "evaluate"):
            assert _skipped(stage, summary), (stage, summary)
        assert re.search(r"^  tune\s+[0-9.]+ s  best trial", summary, re.MULTILINE), summary
        assert "STALE" not in summary

    # a second machine (machine B, an empty local copy) pulls the re-split run: every stage done, new Ray Train
    # runs, new weights
    assert main([*args_b, *resplit]) == 0
    summary = capsys.readouterr().out
    for stage in ("prepare", "generate", "sample", "train", "audit", "evaluate", "tune"):
        assert _skipped(stage, summary), stage
    assert (machine_b / "eval" / "best" / "report.json").is_file()
    after = _trained_outputs(filesystem, machine_b)
    # each stage's manifest records the --set values it ran with (here the audit's, given on the job's command line)
    assert json.loads((machine_b / "audit" / "manifest.json").read_text())["config"]["gallery_pairs"] == 4
    assert before["splits"] != after["splits"]
    for prefix in ("classifier", "generator"):
        assert len(after["runs"][prefix] - before["runs"][prefix]) == 1, f"no new Ray Train run of {prefix}"
    for weights in ("classifier", "generator", "best"):
        assert _weights_differ(before[weights], after[weights]), weights

    # the audit and an external set by URI: the audit of the run on S3 is redone and pushed back, and the demo's
    # own prepared set on S3 serves as an external set of its best model
    monkeypatch.setattr("skinsynth.core.storage.DEFAULT_CACHE", str(tmp_path / "machine-c"))
    before_audit = filesystem.get_file_info(f"{BUCKET}/runs/demo/audit/report.json").mtime_ns
    time.sleep(1.1)  # S3 times have one-second resolution
    assert main(["audit", out]) == 0
    assert filesystem.get_file_info(f"{BUCKET}/runs/demo/audit/report.json").mtime_ns > before_audit
    evaluate = ["evaluate", "--set", f"run.out={out}", "--set", "train.name=best", "--n-boot", "50"]
    assert main([*evaluate, "--external", out]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"evaluate: external s3://\*\*\*@skinsynth-test/runs/demo\S*: balanced accuracy", printed)
    with filesystem.open_input_stream(f"{BUCKET}/runs/demo/eval/best/report.json") as stream:
        report = json.loads(stream.read())
    (external,) = report["external"].values()
    assert external["n"] == 70


def _selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, recursive=True)
