"""The Streamlit viewer on a real run directory made by the real stages (phantom, 32 px, tiny models), driven with
Streamlit's AppTest: what each page shows against the files the stages wrote, a run with only some stages done,
damaged files, the "Try it" page against a loopback endpoint that follows the serve contract, and the CLI."""

from __future__ import annotations

import base64
import http.server
import json
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest
import yaml
from streamlit.testing.v1 import AppTest

from skinsynth import DISCLAIMER
from skinsynth.cli import build_parser, main
from skinsynth.view import APP_PATH, launch_command
from skinsynth.view import runs as R
from tests.conftest import command_in_own_group, free_port

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
FIXTURE_EXPERIMENT = {
    "run": {"name": "viewer_fixture"},
    "data": {"phantom": {"n_images": 140}, "preprocess": {"size": 32}},
    "generator": {"size": "tiny", "train_steps": 4, "batch_size": 8},
    # every class sampled, so a trial that mixes synthetic images finds some of each class
    "sample": {"plan": "counts", "counts": {dx: 6 for dx in CLASSES}, "steps": 3},
    "train": {
        "model": "test_efficientnet",
        "pretrained": "none",
        "epochs": 1,
        "batch_size": 32,
        "lr": 0.003,
        "cache_rows": False,
    },
    "audit": {"extractor": "classifier", "mia_images": 24, "calibration_images": 40, "copy_plants": 6},
    "tune": {
        "name": "ratio_grid",
        "search": "grid",
        "scheduler": "none",
        "space": {"train.mix.ratio": {"choice": [0.0, 0.25]}},
    },
}


@pytest.fixture(scope="module")
def viewer_run(ray_local, tmp_path_factory) -> Path:
    """A complete run directory made by the real stages: prepare, generator, synthetic set, a 2-trial grid over the
    synthetic ratio (its best trial exported to models/best and evaluated into eval/best), and the audit, which uses
    that classifier as its feature extractor (one classifier trained fewer than a separate train stage would)."""
    from skinsynth.audit.report import run_audit
    from skinsynth.config import dump_config, load_config
    from skinsynth.data.prepare import prepare_images
    from skinsynth.generate.sample import sample_synthetic
    from skinsynth.generate.train import train_generator
    from skinsynth.tune.sweep import run_sweep

    root = tmp_path_factory.mktemp("view")
    out = root / "runs" / "viewer_fixture"
    experiment = root / "experiment.yaml"
    experiment.write_text(
        yaml.safe_dump({**FIXTURE_EXPERIMENT, "run": {**FIXTURE_EXPERIMENT["run"], "out": str(out)}})
    )
    cfg = load_config(experiment)
    quiet = lambda _message: None  # noqa: E731
    dump_config(cfg, out)
    prepare_images(cfg.data, out, progress=quiet)
    train_generator(cfg, progress=quiet)
    sample_synthetic(cfg.sample, out, progress=quiet)
    run_sweep(cfg, progress=quiet)
    cfg.train.name = "best"
    run_audit(cfg, out, progress=quiet)
    return out


def _app(runs_root: Path, monkeypatch, endpoint: str = "http://127.0.0.1:9") -> AppTest:
    monkeypatch.setenv("SKINSYNTH_RUNS", str(runs_root))
    monkeypatch.setenv("SKINSYNTH_ENDPOINT", endpoint)
    app = AppTest.from_file(str(APP_PATH), default_timeout=120)
    app.run()
    return app


def _page(app: AppTest, name: str) -> AppTest:
    app.sidebar.radio[0].set_value(name).run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.warning[0].value == DISCLAIMER  # every page opens with it
    assert app.header[0].value.startswith(name)
    return app


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _texts(elements) -> list[str]:
    return [e.value for e in elements]


def _metric(app: AppTest, label: str) -> str:
    values = [m.value for m in app.metric if m.label == label]
    assert len(values) == 1, f"metric {label!r} shown {len(values)} times: {[m.label for m in app.metric]}"
    return values[0]


# --- pages on the complete run --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_overview_shows_every_stage_done_with_manifest_times_and_the_config(viewer_run, monkeypatch):
    app = _page(_app(viewer_run.parent, monkeypatch), "Overview")
    assert app.sidebar.selectbox[0].value == viewer_run
    stages = app.dataframe[0].value
    assert list(stages["stage"]) == [s.name for s in R.STAGES]
    assert (stages["status"] == "done").all() and (stages["command to make it"] == "").all()
    row = stages.set_index("stage")
    assert row.loc["data", "created"] == _json(viewer_run / "data" / "manifest.json")["created"]
    assert row.loc["data", "seconds"] == _json(viewer_run / "data" / "data_card.json")["seconds"]["total"]
    assert row.loc["audit", "seconds"] == _json(viewer_run / "audit" / "report.json")["seconds"]
    assert row.loc["tune", "contents"] == "ratio_grid" and row.loc["models", "contents"] == "best"
    assert row.loc["eval", "seconds"] == _json(viewer_run / "eval" / "best" / "report.json")["seconds"]
    assert not app.error
    config_text = (viewer_run / "config.yaml").read_text()
    assert app.code[0].value == config_text.rstrip("\n") and "name: viewer_fixture" in config_text


@pytest.mark.slow
def test_sampling_again_after_the_audit_marks_the_audit_stale_in_the_overview_and_the_run_summary(
    viewer_run, tmp_path, monkeypatch
):
    import shutil

    from skinsynth.config import load_config
    from skinsynth.generate.sample import sample_synthetic
    from skinsynth.pipeline import StageOutcome, format_run_summary

    run = tmp_path / "runs" / "resampled"
    shutil.copytree(viewer_run, run, ignore=shutil.ignore_patterns("ray_train"))
    app = _page(_app(run.parent, monkeypatch), "Overview")
    assert "STALE" not in set(app.dataframe[0].value["status"]) and not app.warning[1:]
    audited = _json(run / "audit" / "manifest.json")["inputs"]["synthetic"]
    cfg = load_config(None, [f"run.out={run}", "sample.plan=counts", "sample.counts={nv: 3}", "sample.steps=2"])
    sample_synthetic(cfg.sample, run, progress=lambda _m: None)  # another synthetic set: the audit no longer holds
    assert _json(run / "synthetic" / "manifest.json")["identity"] != audited

    app = _page(_app(run.parent, monkeypatch), "Overview")
    status = app.dataframe[0].value.set_index("stage")["status"]
    assert status["audit"] == "STALE" and status["synthetic"] == "done" and status["data"] == "done"
    warnings = [w for w in _texts(app.warning) if w.startswith("Stale:")]
    # the audit, and eval/best (its report scores the synthetic set too); models/best when its trial mixed synthetic
    assert any(w.startswith("Stale: eval:best is stale") for w in warnings), warnings
    audit_warning = next(w for w in warnings if w.startswith("Stale: audit is stale"))
    assert f"made from synthetic {audited}" in audit_warning and f"skinsynth audit {run}" in audit_warning
    # each stage's own resolved config is on the page, from its manifest
    assert _json(run / "synthetic" / "manifest.json")["config"]["counts"] == {"nv": 3}
    assert any(e.label == "synthetic: synthetic" for e in app.expander)

    summary = format_run_summary(cfg, [StageOutcome("sample", 1.0, False, "3 synthetic images")])
    assert f"STALE: {len(warnings)} stage(s)" in summary
    assert f"audit is stale: made from synthetic {audited}" in summary and f"skinsynth audit {run}" in summary


@pytest.mark.slow
def test_data_page_shows_the_card_splits_and_images_of_every_class(viewer_run, monkeypatch):
    card = _json(viewer_run / "data" / "data_card.json")
    app = _page(_app(viewer_run, monkeypatch), "Data")  # --runs may also name one run directory
    assert _metric(app, "images") == str(card["images"]) and _metric(app, "quarantined") == str(card["quarantined"])
    assert any("Simulated data (phantom)" in w for w in _texts(app.warning))  # phantom is labelled as such
    splits = pd.read_parquet(viewer_run / "data" / "splits.parquet")
    shown = {row["split"]: row for row in app.dataframe[1].value.to_dict("records")}
    assert {s: r["images"] for s, r in shown.items()} == splits["split"].value_counts().to_dict()
    assert shown["train"]["labelled"] == int(splits.loc[splits["split"] == "train", "labelled"].sum())
    class_by_split = app.dataframe[0].value
    assert class_by_split.loc["train"].to_dict() == card["class_by_split"]["train"]
    # one gallery per class, 4 images each (every phantom class has more than 4)
    galleries = app.get("image")
    assert len(galleries) == 7 and all(len(g.proto.imgs) == 4 for g in galleries)
    assert [g.proto.imgs[0].caption for g in galleries] == [
        R.pick_per_class(R.read_image_index(viewer_run / "data" / "images"), 1, [dx])["image_id"][0] for dx in CLASSES
    ]


@pytest.mark.slow
def test_synthetic_page_puts_real_and_synthetic_side_by_side_with_provenance(viewer_run, monkeypatch):
    card = _json(viewer_run / "synthetic" / "synthetic_card.json")
    app = _page(_app(viewer_run.parent, monkeypatch), "Synthetic")
    assert _metric(app, "synthetic images") == str(card["images"]) == "42"
    assert _metric(app, "generator") == card["generator_id"]
    captions = [img.caption for g in app.get("image") for img in g.proto.imgs]
    synthetic = [c for c in captions if c.startswith("synthetic")]
    real = [c for c in captions if c.startswith("real")]
    assert len(synthetic) == len(real) == 7 * 4  # 4 per class on each side, 7 classes
    assert all(
        f"generator_id {card['generator_id']}" in c and "sampler ddim" in c and "steps 3" in c for c in synthetic
    )
    assert not app.error


@pytest.mark.slow
def test_audit_page_shows_fidelity_utility_privacy_and_the_gate_from_the_report(viewer_run, monkeypatch):
    report = _json(viewer_run / "audit" / "report.json")
    app = _page(_app(viewer_run.parent, monkeypatch), "Audit")
    fidelity = app.dataframe[0].value.set_index("extractor")
    assert list(fidelity.index) == ["classifier"]
    block = report["fidelity"]["classifier"]
    assert fidelity.loc["classifier", "fid"] == pytest.approx(block["fid"])
    assert fidelity.loc["classifier", "kid_mean"] == pytest.approx(block["kid_mean"])
    assert fidelity.loc["classifier", "n_synthetic_available"] == block["n_synthetic_available"] == 42
    assert fidelity.loc["classifier", "n"] == block["n"] == min(42, block["n_real_available"])
    assert fidelity.loc["classifier", "fid_floor"] == pytest.approx(block["fid_real_train_vs_held_out"])
    assert fidelity.loc["classifier", "precision"] == pytest.approx(block["precision"])
    utility = app.dataframe[2].value.set_index("trained on")
    assert utility.loc["synthetic only", "n_train"] == report["utility"]["synthetic_only"]["n_train"]
    assert utility.loc["real only", "balanced_accuracy"] == pytest.approx(
        report["utility"]["real_only"]["balanced_accuracy"]
    )
    privacy = report["privacy"]
    assert _metric(app, "memorisation rate") == f"{privacy['memorisation']['memorised_share']:.3f}"
    worst = report["gate"]["attack"]  # the tiles show the attack with the highest upper bound
    assert _metric(app, "membership attack AUC") == f"{privacy['membership_inference'][worst]['auc']:.3f}"
    attacks = app.dataframe[3].value.set_index("attack")
    assert list(attacks.index) == ["loss", "pia"]
    assert attacks.loc["pia", "auc_high"] == pytest.approx(privacy["membership_inference"]["pia"]["auc_ci"][1])
    assert _metric(app, "synthetic images") == str(report["images"]["synthetic"])
    verdict = [s.value for s in app.success] + [e.value for e in app.error]
    assert len(verdict) == 1 and verdict[0].startswith("Gate passed" if report["gate"]["share_ok"] else "Gate failed")
    figures = [img.caption for g in app.get("image") for img in g.proto.imgs]
    assert figures[0].startswith("audit/gallery.png") and figures[1].startswith("audit/similarity.png")


@pytest.mark.slow
def test_study_page_shows_the_trials_the_grid_summary_with_error_bars_and_the_best_trial(viewer_run, monkeypatch):
    sweep = viewer_run / "tune" / "ratio_grid"
    trials = pd.read_csv(sweep / "trials.csv")
    summary = pd.read_csv(sweep / "summary.csv")
    best = _json(sweep / "best.json")
    app = _page(_app(viewer_run.parent, monkeypatch), "Study")
    assert len(trials) == 2 and len(app.dataframe[0].value) == 2
    assert sorted(app.dataframe[0].value["trial_id"].astype(str)) == sorted(trials["trial_id"].astype(str))
    assert any("**2 trials** (0 failed)" in m for m in _texts(app.markdown))
    assert len(app.dataframe[1].value) == len(summary) == 2
    assert _metric(app, "best validation balanced accuracy") == f"{best['best_val_balanced_accuracy']:.3f}"
    assert _metric(app, "its test balanced accuracy") == f"{best['test_balanced_accuracy']:.3f}"
    assert "**best_val_balanced_accuracy vs train.mix.ratio** (mean ± sample std over seeds)" in _texts(app.markdown)
    assert len(app.get("vega_lite_chart")) == 1  # the error-bar chart
    assert not app.error
    # the plotted frame: one point per ratio at the summary's mean; one seed per cell, so no spread
    frame = R.error_bar_frame(summary, "train.mix.ratio", "best_val_balanced_accuracy")
    assert list(frame["x"]) == [0.0, 0.25]
    assert list(frame["mean"]) == list(summary.sort_values("train.mix.ratio")["best_val_balanced_accuracy_mean"])
    assert (frame["low"] == frame["mean"]).all() and (frame["high"] == frame["mean"]).all()


def test_a_sweep_is_done_when_its_trials_table_is_written_not_while_its_trial_log_grows(tmp_path):
    sweep = tmp_path / "tune" / "grid"
    sweep.mkdir(parents=True)
    (sweep / "trials.jsonl").write_text('{"event": "start", "trial_id": "a"}\n')  # a sweep still running
    assert not {s.stage.name: s for s in R.stage_statuses(tmp_path)}["tune"].done
    pd.DataFrame({"trial_id": ["a"]}).to_parquet(sweep / "trials.parquet")  # its end
    assert {s.stage.name: s for s in R.stage_statuses(tmp_path)}["tune"].done


def test_error_bars_are_mean_plus_minus_std_per_series():
    summary = pd.DataFrame(
        {
            "train.mix.ratio": [0.0, 1.0, 0.0, 1.0],
            "train.label_fraction": [0.1, 0.1, 1.0, 1.0],
            "acc_mean": [0.5, 0.6, 0.7, 0.8],
            "acc_std": [0.1, float("nan"), 0.05, 0.02],
            "acc_count": [3, 1, 3, 3],
        }
    )
    assert R.summary_metrics(summary) == ["acc"] and R.summary_keys(summary) == [
        "train.mix.ratio",
        "train.label_fraction",
    ]
    frame = R.error_bar_frame(summary, "train.mix.ratio", "acc")
    assert list(frame["series"]) == ["0.1", "0.1", "1.0", "1.0"]
    assert list(frame["low"]) == pytest.approx([0.4, 0.6, 0.65, 0.78]) and list(frame["high"]) == pytest.approx(
        [0.6, 0.6, 0.75, 0.82]
    )


@pytest.mark.slow
def test_evaluation_page_shows_metrics_figures_fairness_and_internal_vs_external(viewer_run, monkeypatch):
    report = _json(viewer_run / "eval" / "best" / "report.json")
    fairness = pd.read_csv(viewer_run / "eval" / "best" / "fairness_test.csv")
    app = _page(_app(viewer_run.parent, monkeypatch), "Evaluation")
    assert app.selectbox[0].value == viewer_run / "eval" / "best"
    for metric in ("balanced_accuracy", "macro_auroc", "malignant_auroc", "ece"):
        assert _metric(app, metric) == f"{report['test'][metric]:.3f}"
    low, high = report["test"]["intervals_95"]["balanced_accuracy"]
    assert f"95% CI {low:.3f}-{high:.3f}" in _texts(app.caption)
    per_class = app.dataframe[0].value
    assert list(per_class["class"]) == CLASSES and list(per_class["support"]) == [
        report["test"]["per_class"][dx]["support"] for dx in CLASSES
    ]
    # two columns of figures: the element tree lists them column by column
    assert sorted(img.caption for g in app.get("image") for img in g.proto.imgs) == sorted(report["figures"])
    assert len(report["figures"]) == 4
    gaps = app.dataframe[1].value
    assert set(gaps["attribute"]) == set(report["test"]["fairness"])
    shown_fairness = app.dataframe[2].value
    assert len(shown_fairness) == len(fairness)
    n_small = int(fairness["too_small"].sum())
    assert n_small > 0  # 140 phantom images: every test group is small, and the page must say so
    assert any(
        w.startswith(f"{n_small} of {len(fairness)} groups are too small to judge") for w in _texts(app.warning)
    )
    comparison = app.dataframe[3].value
    assert list(comparison["set"]) == ["validation", "internal test"]
    assert comparison.loc[1, "n"] == report["test"]["n"]
    assert any("No external set evaluated" in c for c in _texts(app.caption))


# --- partial and damaged runs ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_with_only_prepared_data_names_each_missing_stage_and_its_command(viewer_run, tmp_path, monkeypatch):
    partial = tmp_path / "partial"
    shutil.copytree(viewer_run / "data", partial / "data")
    shutil.copy(viewer_run / "config.yaml", partial / "config.yaml")
    app = _page(_app(tmp_path, monkeypatch), "Overview")
    stages = app.dataframe[0].value.set_index("stage")
    assert stages.loc["data", "status"] == "done"
    for name in ("generator", "synthetic", "audit", "models", "eval", "tune"):
        assert stages.loc[name, "status"] == "missing"
        assert stages.loc[name, "command to make it"] == R.STAGE_BY_NAME[name].command.format(run=partial)
    assert _metric(_page(app, "Data"), "images") == str(_json(partial / "data" / "data_card.json")["images"])
    expected = {
        "Synthetic": f"skinsynth generate sample --out {partial}",
        "Audit": f"skinsynth audit {partial}",
        "Study": "skinsynth tune --config EXPERIMENT.yaml",
        "Evaluation": f"skinsynth evaluate --out {partial}",
    }
    for page, command in expected.items():
        infos = _texts(_page(app, page).info)
        assert any(command in i for i in infos), (page, infos)
        assert not app.error


@pytest.mark.slow
def test_damaged_reports_are_named_and_every_other_page_still_renders(viewer_run, tmp_path, monkeypatch):
    broken = tmp_path / "runs" / "broken"
    shutil.copytree(viewer_run, broken, ignore=shutil.ignore_patterns("ray_train", "trial-*"))
    report = broken / "eval" / "best" / "report.json"
    report.write_text(report.read_text()[:200])  # truncated, as by a killed writer
    (broken / "audit" / "report.json").unlink()
    (broken / "tune" / "ratio_grid" / "trials.csv").write_text("%%% not a table\n\x00\x01 garbage\n")
    app = _app(tmp_path / "runs", monkeypatch)

    _page(app, "Evaluation")
    errors = _texts(app.error)
    assert len(errors) == 1 and "eval/best/report.json" in errors[0] and "not valid JSON" in errors[0]
    assert not app.metric  # nothing half-read is shown as a figure

    _page(app, "Audit")
    assert _texts(app.info) == [f"No audit/report.json in {broken}: run `skinsynth audit {broken}`."]

    _page(app, "Study")
    errors = _texts(app.error)
    assert len(errors) == 1 and "trials.csv" in errors[0] and "lacks the column(s)" in errors[0]
    assert "Showing trials.parquet instead." in _texts(app.warning)
    assert len(app.dataframe[0].value) == 2  # the Parquet copy of the same trials

    _page(app, "Overview")
    stages = app.dataframe[0].value.set_index("stage")
    assert stages.loc["audit", "status"] == "missing" and stages.loc["eval", "status"] == "done"
    assert any("eval/best/report.json" in e and "not valid JSON" in e for e in _texts(app.error))
    for page in ("Data", "Synthetic"):
        assert not _page(app, page).error and app.get("image")


@pytest.mark.slow
def test_a_damaged_image_shard_is_named_on_the_data_page(viewer_run, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(viewer_run / "data", broken / "data")
    shard = sorted((broken / "data" / "images").glob("*.parquet"))[0]
    shard.write_bytes(b"PAR1 this is not a parquet file")
    app = _page(_app(broken, monkeypatch), "Data")
    errors = _texts(app.error)
    assert len(errors) == 1 and shard.name in errors[0] and "cannot be read as Parquet" in errors[0]
    assert _metric(app, "images")  # the card above the gallery still shows


def test_corrupt_json_and_wrong_shapes_raise_unreadable_file_naming_the_file(tmp_path):
    bad = tmp_path / "report.json"
    bad.write_text('{"test": {"n": 3')
    with pytest.raises(R.UnreadableFile, match="report.json: not valid JSON"):
        R.load_json_object(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(R.UnreadableFile, match="expected a JSON object, found list"):
        R.load_json_object(bad)
    assert R.load_json_object(tmp_path / "absent.json") is None
    with pytest.raises(R.ViewError, match="runs folder does not exist"):
        R.find_experiments(tmp_path / "nope")
    assert R.find_experiments(tmp_path) == []


# --- Try it: the serve contract over loopback -----------------------------------------------------------------------


class _FakeEndpoint(http.server.BaseHTTPRequestHandler):
    """Answers POST /v1/predict as the serve endpoint's contract says; remembers what it received."""

    received: list[dict] = []
    answer: tuple[int, dict] = (200, {})

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"path": self.path, "content_type": self.headers["Content-Type"], "body": body})
        status, payload = type(self).answer
        raw = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeEndpoint.received = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _png(viewer_run: Path) -> bytes:
    index = R.read_image_index(viewer_run / "data" / "images")
    image_id = index["image_id"].iloc[0]
    return R.read_image_bytes(viewer_run / "data" / "images", [image_id])[image_id]


def _upload_and_predict(app: AppTest, content: bytes) -> AppTest:
    _page(app, "Try it")
    app.file_uploader[0].set_value(("lesion.png", content, "image/png")).run()
    app.button[0].click().run()
    assert not app.exception
    return app


@pytest.mark.slow
def test_try_it_posts_the_upload_and_shows_the_answer_with_heatmap_and_disclaimer(
    viewer_run, fake_endpoint, monkeypatch
):
    png = _png(viewer_run)
    heatmap = png  # any PNG will do as the overlay
    probabilities = {dx: p for dx, p in zip(CLASSES, [0.05, 0.05, 0.1, 0.05, 0.6, 0.1, 0.05])}
    _FakeEndpoint.answer = (
        200,
        {
            "probabilities": probabilities,
            "top_class": "mel",
            "top_probability": 0.6,
            "malignant_probability": 0.7,
            "risk_band": "high",
            "uncertainty": {"entropy": 1.2, "normalised_entropy": 0.62, "tta_std": None},
            "out_of_distribution": False,
            "heatmap_png_base64": base64.b64encode(heatmap).decode(),
            "disclaimer": DISCLAIMER,
        },
    )
    app = _upload_and_predict(_app(viewer_run.parent, monkeypatch, fake_endpoint), png)
    (request,) = _FakeEndpoint.received
    assert request["path"] == "/v1/predict?explain=gradcam"
    assert request["content_type"].startswith("multipart/form-data; boundary=")
    assert b'name="file"; filename="lesion.png"' in request["body"] and png in request["body"]
    assert not app.error
    assert _metric(app, "top class") == "mel" and _metric(app, "malignant probability") == "0.700"
    assert _metric(app, "risk band") == "high" and _metric(app, "out of distribution") == "no"
    shown = app.dataframe[0].value
    assert list(shown["class"])[0] == "mel" and dict(zip(shown["class"], shown["probability"])) == probabilities
    assert any("normalised_entropy 0.620" in m for m in _texts(app.markdown))
    captions = [img.caption for g in app.get("image") for img in g.proto.imgs]
    assert captions == ["lesion.png", "Grad-CAM heatmap (top class)"]
    assert f"Endpoint: {DISCLAIMER}" in _texts(app.warning)

    # without the heatmap box ticked, no explain query
    app.checkbox[0].uncheck().run()
    app.button[0].click().run()
    assert _FakeEndpoint.received[-1]["path"] == "/v1/predict"


@pytest.mark.slow
def test_try_it_shows_the_endpoints_refusal_and_an_endpoint_that_is_down(viewer_run, fake_endpoint, monkeypatch):
    _FakeEndpoint.answer = (400, {"detail": "not an image: cannot decode the upload"})
    app = _upload_and_predict(_app(viewer_run.parent, monkeypatch, fake_endpoint), b"not an image at all")
    assert _texts(app.warning)[-1] == "lesion.png cannot be previewed: it may not be a valid JPEG or PNG."
    assert _texts(app.error) == ["the endpoint refused the image (HTTP 400): not an image: cannot decode the upload"]
    assert not app.metric

    closed = f"http://127.0.0.1:{free_port()}"  # a loopback port nothing listens on
    app = _upload_and_predict(_app(viewer_run.parent, monkeypatch, closed), _png(viewer_run))
    (error,) = _texts(app.error)
    assert error.startswith(f"the endpoint at {closed} is not reachable") and "skinsynth serve" in error


# --- settings and the command ---------------------------------------------------------------------------------------


def test_settings_come_from_script_arguments_then_the_environment():
    env = {"SKINSYNTH_RUNS": "/tmp/a", "SKINSYNTH_ENDPOINT": "http://127.0.0.1:1"}
    assert R.viewer_settings([], env) == (Path("/tmp/a"), "http://127.0.0.1:1")
    assert R.viewer_settings(["--runs", "/tmp/b", "--endpoint", "http://127.0.0.1:2", "-q"], env) == (
        Path("/tmp/b"),
        "http://127.0.0.1:2",
    )
    assert R.viewer_settings([], {})[1] == R.DEFAULT_ENDPOINT


def test_view_command_parses_its_flags_and_launches_streamlit_headless_on_loopback(tmp_path):
    args = build_parser().parse_args(
        ["view", "--runs", str(tmp_path), "--endpoint", "http://127.0.0.1:8123", "--port", "8600"]
    )
    assert (args.command, args.runs, args.endpoint, args.port) == (
        "view",
        str(tmp_path),
        "http://127.0.0.1:8123",
        8600,
    )
    defaults = build_parser().parse_args(["view"])
    assert (defaults.runs, defaults.endpoint, defaults.port) == ("runs", "http://127.0.0.1:8000", 8501)
    command = launch_command(tmp_path, "http://127.0.0.1:8123", 8600, python="python")
    assert command[:5] == ["python", "-m", "streamlit", "run", str(APP_PATH)]
    assert {"--server.headless=true", "--server.address=127.0.0.1", "--server.port=8600"} <= set(command)
    assert command[command.index("--") :] == ["--", "--runs", str(tmp_path), "--endpoint", "http://127.0.0.1:8123"]


def test_view_with_a_missing_runs_folder_or_a_bad_endpoint_is_one_clear_error(tmp_path, capsys):
    assert main(["view", "--runs", str(tmp_path / "nope")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        f"skinsynth: error: runs folder does not exist: {tmp_path / 'nope'} (pass --runs with a folder of run "
        "directories)"
    ]
    assert "Traceback" not in captured.err and captured.out == ""
    assert main(["view", "--runs", str(tmp_path), "--endpoint", "127.0.0.1:8000"]) == 2
    assert "--endpoint must be an http(s) URL" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_stops_the_viewer_and_its_streamlit_child_so_the_port_is_free(tmp_path):
    """``skinsynth view`` in its own process group gets SIGTERM (as from docker, Kubernetes or systemd), sent to it
    alone: it exits 0, its Streamlit child has stopped too, and the viewer's port can be bound again."""
    import os
    import signal
    import socket
    import sys

    port = free_port()
    log = tmp_path / "view.log"
    command = [sys.executable, "-m", "skinsynth.cli", "view", "--runs", str(tmp_path), "--port", str(port)]
    with command_in_own_group(command, log, f"http://127.0.0.1:{port}/_stcore/health", timeout_s=120) as process:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert "view: stopped" in log.read_text()
        with socket.socket() as sock:  # SO_REUSEADDR: a closed connection's TIME_WAIT is no listener
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))  # OSError "Address already in use" while an orphaned Streamlit listens
        with pytest.raises(ProcessLookupError):  # nothing of the command's process group is left
            os.killpg(process.pid, 0)
