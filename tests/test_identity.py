"""Stage identity and staleness (skinsynth.core.rundir). The end-to-end re-split regression - new Ray Train runs and
new weights for the classifier, the generator and the sweep after `data.split.seed` changes - is in
tests/test_storage.py's S3 demo test; the stale audit in the viewer and the run summary is in tests/test_view.py."""

from __future__ import annotations

import pytest

from skinsynth.core.rundir import StageIdentity, layout, read_manifest, stale_stages, why_rerun


def test_identity_follows_settings_and_inputs_and_says_why_a_stage_reruns(tmp_path):
    stage_dir = tmp_path / "models" / "classifier"
    stage_dir.mkdir(parents=True)
    made = StageIdentity("model:classifier", {"lr": 0.01}, {"data": "aaa"}, {"lr": 0.01}, frozenset({"epochs"}))
    from skinsynth.core.rundir import write_manifest

    write_manifest(stage_dir, made)
    assert why_rerun(tmp_path, made) is None
    resplit = StageIdentity("model:classifier", {"lr": 0.01}, {"data": "bbb"})
    assert why_rerun(tmp_path, resplit) == "data changed (aaa -> bbb)"
    assert why_rerun(tmp_path, StageIdentity("model:classifier", {"lr": 0.02}, {"data": "aaa"})) == (
        "its settings changed"
    )
    assert why_rerun(tmp_path, StageIdentity("audit", {}, {})) == "no previous output"
    # a longer run keeps its Ray Train run name (it resumes) but is another stage output
    longer = StageIdentity("model:classifier", {"lr": 0.01, "epochs": 9}, {"data": "aaa"}, {}, frozenset({"epochs"}))
    assert longer.run_name("classifier") == made.run_name("classifier")
    assert longer.identity != made.identity
    assert resplit.run_name("classifier") != made.run_name("classifier")


def test_a_replaced_input_marks_every_stage_that_read_it_stale_with_the_refresh_command(tmp_path):
    from skinsynth.core.rundir import write_manifest

    def make(stage: str, inputs: dict) -> StageIdentity:
        identity = StageIdentity(stage, {}, inputs)
        stage_dir = layout(tmp_path).stage_dir(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_manifest(stage_dir, identity)
        return identity

    data = make("data", {"source": "f1"})
    generator = make("generator", {"data": data.identity})
    synthetic = make("synthetic", {"generator": generator.identity})
    model = make("model:classifier", {"data": data.identity})
    make("audit", {"synthetic": synthetic.identity, "model:classifier": model.identity})
    make("eval:classifier", {"model:classifier": model.identity, "data": data.identity})
    assert stale_stages(tmp_path) == []
    make("synthetic", {"generator": generator.identity, "settings": "other"})  # sampled again
    stale = stale_stages(tmp_path)
    assert [s.stage for s in stale] == ["audit"]
    assert stale[0].input == "synthetic" and stale[0].command == f"skinsynth audit {tmp_path}"
    make("data", {"source": "f2"})  # re-prepared: everything made from the data, directly or not, is stale
    stale = {s.stage: s for s in stale_stages(tmp_path)}
    assert set(stale) == {"generator", "synthetic", "model:classifier", "eval:classifier", "audit"}
    assert stale["generator"].input == "data" and "generate train" in stale["generator"].command
    assert stale["synthetic"].input == "generator" and "(itself stale)" in stale["synthetic"].describe()


def test_each_stage_identity_follows_only_the_settings_that_reach_it(tmp_path):
    """A changed setting re-runs the stages that use it and no other: an audit setting once started the whole sweep
    again, because the sweep hashed every section of the config."""
    from skinsynth.audit.report import audit_identity
    from skinsynth.classify.evaluate import evaluation_identity
    from skinsynth.classify.train import model_identity
    from skinsynth.config import load_config
    from skinsynth.tune.sweep import sweep_stage

    def identities(*settings: str) -> dict[str, str]:
        cfg = load_config(None, [f"run.out={tmp_path}", *settings])
        return {
            "model": model_identity(cfg.train, tmp_path).identity,
            "audit": audit_identity(cfg, tmp_path).identity,
            "evaluate": evaluation_identity(cfg, tmp_path).identity,
            "sweep": sweep_stage(cfg, tmp_path).identity,
        }

    base = identities()
    reaches = {
        "train.lr=0.002": {"model", "sweep"},
        "tune.num_samples=3": {"sweep"},
        "audit.gallery_pairs=4": {"audit"},
        "serve.port=8123": set(),
        "run.cache_dir=/elsewhere": set(),
        "tune.external=[runs/isic]": set(),  # where the best model is also scored, not what the sweep trains
    }
    for setting, stages in reaches.items():
        changed = identities(setting)
        assert {stage for stage in base if changed[stage] != base[stage]} == stages, setting


@pytest.mark.slow
def test_a_model_whose_ssl_had_no_pool_records_the_identity_run_compares(phantom_prepared, tmp_path):
    """Training falls back to supervised when every image is labelled; its manifest must still record the identity of
    the settings as asked for, or `skinsynth run` would train it again every time."""
    from skinsynth.classify.train import model_identity, train_classifier
    from skinsynth.config import load_config
    from tests.conftest import PHANTOM_SMALL, TINY_CLASSIFIER, copy_run

    out = copy_run(phantom_prepared, tmp_path / "run")
    cfg = load_config(None, [f"run.out={out}", *PHANTOM_SMALL, *TINY_CLASSIFIER, "train.ssl.method=fixmatch"])
    train_classifier(cfg, progress=lambda _m: None)
    assert read_manifest(out / "models" / "classifier")["config"]["ssl"]["method"] == "fixmatch"
    assert why_rerun(out, model_identity(cfg.train, out)) is None
