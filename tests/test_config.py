from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import yaml

from skinsynth.config import (
    ConfigError,
    ExperimentConfig,
    changed_settings,
    dump_config,
    load_config,
    parse_override,
)
from skinsynth.core.rundir import StageIdentity


def _settings_hash(section) -> str:
    return StageIdentity("model:m", changed_settings(section), {}).identity


def _run_name(section, run_length=(), data="d") -> str:
    return StageIdentity("model:m", changed_settings(section), {"data": data}, {}, frozenset(run_length)).run_name("m")


def test_defaults_are_the_phantom_demo():
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert cfg.data.source == "phantom"
    assert cfg.data.preprocess.size == 64


def test_yaml_file_and_overrides_are_typed(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("run: {name: x, out: runs/x}\ndata:\n  source: ham10000\n  split: {label_fraction: 0.1}\n")
    cfg = load_config(
        path, ["data.preprocess.size=96", "data.split.val_fraction=0", "data.preprocess.hair_removal=false"]
    )
    assert cfg.run.name == "x"
    assert cfg.data.source == "ham10000"
    assert cfg.data.split.label_fraction == 0.1
    assert cfg.data.preprocess.size == 96
    # an int given for a float field is accepted losslessly
    assert cfg.data.split.val_fraction == 0.0 and isinstance(cfg.data.split.val_fraction, float)
    assert cfg.data.preprocess.hair_removal is False


def test_later_override_wins():
    cfg = load_config(None, ["data.preprocess.size=32", "data.preprocess.size=48"])
    assert cfg.data.preprocess.size == 48


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.preprocess.sise=64",
            "unknown config key 'data.preprocess.sise' (did you mean 'data.preprocess.size'?)",
        ),
        ("dta.source=phantom", "unknown config key 'dta' (did you mean 'data'?)"),
        ("data.preprocess.size=big", "config key 'data.preprocess.size' must be int, got 'big'"),
        ("data.preprocess.size=6.5", "config key 'data.preprocess.size' must be int, got 6.5"),
        ("data.source=dicom", "config key 'data.source' must be one of 'phantom' | 'ham10000' | 'isic' | 'folder'"),
        ("data.preprocess.hair_removal=3", "config key 'data.preprocess.hair_removal' must be bool, got 3"),
        ("data.preprocess.size.x=1", "config key 'data.preprocess.size' is a value, not a section"),
        ("nokey", "override 'nokey' must look like key.path=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_key_in_file_names_nearest_spelling(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  split:\n    label_fracton: 0.2\n")
    with pytest.raises(
        ConfigError, match=r"'data\.split\.label_fracton' \(did you mean 'data\.split\.label_fraction'\?\)"
    ):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        load_config(scalar)


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=0.25") == ("a.b", 0.25)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.split.label_fraction=0.2", "run.name=rt"])
    path = dump_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    reloaded = load_config(path)
    assert reloaded == cfg
    assert yaml.safe_load(path.read_text())["data"]["split"]["label_fraction"] == 0.2


def test_every_experiment_file_loads():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))
    assert files, "experiments/ holds no YAML files"
    for path in files:
        load_config(path)


def test_demo_file_is_the_embedded_default():
    """`skinsynth demo` runs the built-in defaults plus its small sweep; experiments/demo.yaml says exactly that."""
    from pathlib import Path

    from skinsynth.config import DEMO_SETTINGS

    demo = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
    assert load_config(demo) == load_config(None, base=DEMO_SETTINGS)
    assert load_config(None).tune.space == {}  # other experiments sweep only when their file says so


def test_mapping_values_and_their_overrides_are_type_checked():
    cfg = load_config(None, ["sample.plan=counts", "sample.counts.mel=40", "sample.counts.df=5"])
    assert cfg.sample.counts == {"mel": 40, "df": 5}
    with pytest.raises(ConfigError, match="'sample.counts.mel' must be int, got 'many'"):
        load_config(None, ["sample.counts.mel=many"])
    with pytest.raises(ConfigError, match="'sample.counts' must be a mapping"):
        load_config(None, ["sample.counts=7"])


def test_cli_config_errors_are_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "skinsynth.cli", "data", "prepare", "--out", str(tmp_path), "--set", "data.sise=3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "skinsynth: error: unknown config key 'data.sise' (did you mean 'data.preprocess.size'?); "
        "valid keys here: batch_size, group_similar, metadata, num_cpus, path, phantom, preprocess, source, split"
    ]
    assert "Traceback" not in proc.stderr


@dataclass
class _InnerV1:
    depth: int = 3


@dataclass
class _SectionV1:
    lr: float = 1e-3
    inner: _InnerV1 = field(default_factory=_InnerV1)


@dataclass
class _InnerV2:  # a later version adds a setting whose default keeps the old behaviour
    depth: int = 3
    dropout: float = 0.0


@dataclass
class _SectionV2:
    lr: float = 1e-3
    inner: _InnerV2 = field(default_factory=_InnerV2)
    cpu_amp: bool = False


def test_identity_hashes_ignore_settings_added_at_their_default():
    old, new = _SectionV1(lr=0.01, inner=_InnerV1(depth=5)), _SectionV2(lr=0.01, inner=_InnerV2(depth=5))
    assert changed_settings(old) == changed_settings(new) == {"lr": 0.01, "inner": {"depth": 5}}
    assert _settings_hash(old) == _settings_hash(new)
    assert _run_name(old, {"lr"}) == _run_name(new, {"lr"})
    # ... while a change of any setting, old or new, changes them
    assert _settings_hash(_SectionV2(lr=0.01, inner=_InnerV2(depth=5, dropout=0.1))) != _settings_hash(new)
    assert _run_name(_SectionV2(cpu_amp=True)) != _run_name(_SectionV2())
    assert _run_name(new) != _run_name(new, data="other data")
    # run-length settings leave the run name alone (a longer run resumes) but not the stage identity
    longer = _SectionV2(lr=0.02, inner=_InnerV2(depth=5))
    assert _run_name(longer, {"lr"}) == _run_name(new, {"lr"})
    identity = StageIdentity("model:m", changed_settings(longer), {"data": "d"}).identity
    assert identity != StageIdentity("model:m", changed_settings(new), {"data": "d"}).identity
    assert changed_settings(ExperimentConfig()) == {}
