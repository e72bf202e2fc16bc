"""``skinsynth predict``: batch inference over a folder with bad files (each quarantined with its reason, the good
ones answered exactly as the endpoint answers them), resuming after a crash without redoing finished blocks, a
prepared run's test split recorded in its ledger, and ``bench predict`` printing its ratio."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from skinsynth.config import PredictConfig
from tests import test_storage
from tests.conftest import BAD_EXPECTED, GOOD_IDS
from tests.test_storage import BUCKET
from tests.test_storage import _uri as _s3_uri

s3_endpoint = test_storage.s3_endpoint  # the fixture: moto's S3 server on loopback

pytestmark = pytest.mark.slow

# the messy folder's files that a folder listing sees (the metadata-level refusals of prepare do not apply: predict
# reads files, not a metadata table)
FILE_LEVEL_BAD = ("ISIC_trunc", "ISIC_empty", "ISIC_text", "ISIC_gray", "ISIC_tiny", "ISIC_huge")
GOOD_STEMS = {*GOOD_IDS, "ISIC_rgba", "ISIC_unknowndx", "ISIC_orphan"}


def _model(tiny_classifier):
    cfg, result = tiny_classifier
    return cfg, result.model_dir


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def test_folder_with_bad_files_quarantines_each_with_its_reason_and_matches_the_endpoint(
    tiny_classifier, messy_ham_dir, ray_local, tmp_path
):
    from skinsynth.serve.model import load_served_model, predict_images, prepare_upload
    from skinsynth.serve.predict import batch_predict

    cfg, model_dir = _model(tiny_classifier)
    out = tmp_path / "out" / "predictions.parquet"
    result = batch_predict(
        model_dir, str(messy_ham_dir), str(out), sc=cfg.serve, pc=PredictConfig(batch_size=5), progress=print
    )
    files = _files(messy_ham_dir)
    quarantine = pd.read_csv(tmp_path / "out" / "predictions.quarantine.csv", dtype=str)
    predictions = pd.read_parquet(out)
    # nothing dropped silently: every file is either answered or quarantined, once
    assert sorted([*predictions["image_id"], *quarantine["image_id"]]) == sorted(files)
    assert result.predicted == len(predictions) == len(GOOD_STEMS) and result.quarantined == len(quarantine)

    reasons = dict(zip(quarantine["image_id"], quarantine["reason"], strict=True))
    assert reasons.pop("HAM10000_metadata.csv") == "unsupported file type '.csv'"
    assert {Path(i).stem for i in reasons} == set(FILE_LEVEL_BAD)
    for image_id, reason in reasons.items():
        assert reason.startswith(BAD_EXPECTED[Path(image_id).stem]), (image_id, reason)
    assert {Path(i).stem for i in predictions["image_id"]} == GOOD_STEMS

    # the endpoint's own offline inference (the function POST /v1/predict runs), one image at a time
    served = load_served_model(model_dir, cfg.serve)
    for row in predictions.to_dict("records"):
        upload = files[row["image_id"]].read_bytes()
        body = predict_images(served, [prepare_upload(upload, served.preprocess, cfg.serve.max_pixels)], [False])[0]
        for name in served.classes:
            assert row[f"prob_{name}"] == pytest.approx(body["probabilities"][name], abs=1e-5)
        assert row["top_class"] == body["top_class"] and row["risk_band"] == body["risk_band"]
        assert row["malignant_probability"] == pytest.approx(body["malignant_probability"], abs=1e-5)
        assert row["out_of_distribution"] == body["out_of_distribution"]
        assert row["ood_score"] == pytest.approx(body["ood_score"], abs=1e-4)
        assert row["model_id"] == served.model_id and row["disclaimer"] == body["disclaimer"]
    assert b"not a diagnosis" in pq.read_schema(out).metadata[b"disclaimer"]


def test_crashed_predict_resumes_without_redoing_finished_blocks(tiny_classifier, messy_ham_dir, ray_local, tmp_path):
    from skinsynth.core.storage import read_source_bytes
    from skinsynth.serve.predict import batch_predict

    cfg, model_dir = _model(tiny_classifier)
    out = tmp_path / "predictions.csv"
    pc = PredictConfig(batch_size=4)
    calls = []

    def crash_on_ninth(uri: str) -> bytes:  # the process dies while block 3 (files 9-12) is half done
        calls.append(uri)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return read_source_bytes(uri)

    with pytest.raises(KeyboardInterrupt):
        batch_predict(
            model_dir, str(messy_ham_dir), str(out), sc=cfg.serve, pc=pc, engine="local", loader=crash_on_ninth
        )
    parts = tmp_path / "predictions.parts"
    done = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    assert sorted(name[:11] for name in done) == ["part-000000", "part-000001"] and not out.exists()

    # the rerun (on Ray this time) computes only the blocks that were not finished
    result = batch_predict(model_dir, str(messy_ham_dir), str(out), sc=cfg.serve, pc=pc, engine="ray")
    assert result.blocks == 6 and result.blocks_done_before == 2 and result.blocks_computed == 4
    assert {name: (parts / name).stat().st_mtime_ns for name in done} == done  # untouched
    assert len(list(parts.glob("part-*.parquet"))) == 6
    predictions = pd.read_csv(out)
    assert len(predictions) == result.predicted == len(GOOD_STEMS)
    # a third run finds every block done and recomputes none
    again = batch_predict(model_dir, str(messy_ham_dir), str(out), sc=cfg.serve, pc=pc, engine="local")
    assert again.blocks_computed == 0 and again.blocks_done_before == 6
    pd.testing.assert_frame_equal(pd.read_csv(out), predictions)


def test_prepared_run_needs_a_split_and_test_is_recorded_in_the_ledger(tiny_classifier, ray_local, tmp_path, capsys):
    from skinsynth.cli import main
    from skinsynth.core.ledger import read_ledger
    from skinsynth.core.shards import load_split_table

    cfg, model_dir = _model(tiny_classifier)
    run = tmp_path / "run"
    shutil.copytree(Path(cfg.run.out) / "data", run / "data")  # the fixture's run is read-only
    out = tmp_path / "test.csv"
    base = ["predict", "--model", str(model_dir), "--input", str(run), "--out", str(out)]
    assert main(base) == 2
    assert "--split" in capsys.readouterr().err and not out.exists()

    assert main([*base, "--split", "test", "--explain", "--set", "predict.batch_size=8"]) == 0
    printed = capsys.readouterr().out
    assert "test split looked at once" in printed and "not a diagnosis" in printed
    splits = load_split_table(run)
    test_ids = sorted(splits.loc[splits["split"] == "test", "image_id"])
    predictions = pd.read_csv(out)
    assert list(predictions["image_id"]) == test_ids and set(predictions["split"]) == {"test"}
    assert predictions["dx"].notna().all()
    assert all(Path(p).is_file() and Path(p).read_bytes()[:4] == b"\x89PNG" for p in predictions["gradcam"])
    (entry,) = read_ledger(run)
    assert entry["metrics"] == ["predictions"] and entry["n_images"] == len(test_ids)


def test_bench_predict_prints_images_per_second_and_the_ratio(tiny_classifier, ray_local):
    from skinsynth.bench.predict import bench_predict

    cfg, model_dir = _model(tiny_classifier)
    lines: list[str] = []
    record = bench_predict(cfg, model_dir, images=12, progress=lines.append)
    assert record["local"]["predicted"] == record["ray"]["predicted"] == 12
    # the ratio of the two rates, rounded to 3 digits
    expected = record["ray"]["images_per_s"] / record["local"]["images_per_s"]
    assert record["speedup"] == pytest.approx(expected, rel=0.01, abs=6e-4)
    assert any(f"-> {record['speedup']:.2f}x on {record['machine']['cpu_cores']} cores" in line for line in lines), (
        lines
    )


def test_bucket_in_bucket_out(tiny_classifier, ray_local, s3_endpoint, tmp_path):
    import io

    from skinsynth.bench.predict import render_phantom_folder
    from skinsynth.serve.predict import batch_predict

    endpoint, filesystem = s3_endpoint
    cfg, model_dir = _model(tiny_classifier)
    local = render_phantom_folder(tmp_path / "images", 5, 64)
    (local / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a signature and nothing else
    for path in local.iterdir():
        with filesystem.open_output_stream(f"{BUCKET}/incoming/{path.name}") as sink:
            sink.write(path.read_bytes())
    out = _s3_uri(endpoint, "scores/today.parquet")
    result = batch_predict(
        model_dir, _s3_uri(endpoint, "incoming"), out, sc=cfg.serve, pc=PredictConfig(batch_size=2), progress=print
    )
    assert (result.predicted, result.quarantined, result.blocks_computed) == (5, 1, 3)
    with filesystem.open_input_file(f"{BUCKET}/scores/today.parquet") as source:
        predictions = pq.read_table(source).to_pandas()
    assert sorted(predictions["image_id"]) == sorted(p.name for p in local.iterdir() if p.name != "broken.png")
    # where each file was read, with the credentials the URI carried masked
    assert all(uri.startswith("s3://***@") and "testing:" not in uri for uri in predictions["uri"])
    with filesystem.open_input_stream(f"{BUCKET}/scores/today.quarantine.csv") as source:
        quarantine = pd.read_csv(io.BytesIO(source.read()))
    assert list(quarantine["image_id"]) == ["broken.png"]
    assert quarantine["reason"][0] == "not an image: the file format is not recognised"
    # the finished blocks live in the bucket: a rerun (a fresh machine would do the same) recomputes none
    again = batch_predict(model_dir, _s3_uri(endpoint, "incoming"), out, sc=cfg.serve, pc=PredictConfig(batch_size=2))
    assert again.blocks_done_before == 3 and again.blocks_computed == 0


def test_killed_predict_command_resumes_without_redoing_finished_blocks(tiny_classifier, ray_local, tmp_path):
    """SIGKILL the command (its whole process group, as a lost machine) once its first blocks are written, then run it
    again: the parts written before the kill are kept as they are and only the rest are computed."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    import cv2
    import numpy as np

    from skinsynth.bench.predict import render_phantom_folder

    cfg, model_dir = _model(tiny_classifier)
    # 40 one-image blocks of 800 px photographs: hair removal at the 512 px working size makes each block take a
    # while, so the command is still running when its first parts land
    small = render_phantom_folder(tmp_path / "small", 40, 128)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for path in sorted(small.iterdir()):
        big = cv2.resize(cv2.imread(str(path)), (800, 800), interpolation=cv2.INTER_CUBIC)
        noisy = np.clip(big.astype(np.int16) + rng.integers(-4, 5, big.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(images / f"{path.stem}.jpg"), noisy)
    out = tmp_path / "out" / "predictions.parquet"
    parts = tmp_path / "out" / "predictions.parts"
    command = [sys.executable, "-m", "skinsynth", "predict", "--model", str(model_dir), "--input", str(images)]
    command += ["--out", str(out), "--set", "predict.batch_size=1", "--set", "predict.num_actors=1"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}  # a driver on the session's Ray
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + 240
        while len(list(parts.glob("part-*.parquet"))) < 2:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no block finished within 240 s"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert not out.exists(), "the first run finished before it could be killed"
    done = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.parquet")}
    assert 2 <= len(done) < 40

    second = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"{len(done)} of 40 blocks already done" in second.stdout
    computed = re.search(r"(\d+) blocks computed, (\d+) reused", second.stdout)
    assert computed is not None and (int(computed[1]), int(computed[2])) == (40 - len(done), len(done))
    assert {name: (parts / name).stat().st_mtime_ns for name in done} == done  # the finished blocks, untouched
    assert len(pd.read_parquet(out)) == 40
