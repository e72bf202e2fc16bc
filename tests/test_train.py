from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from skinsynth.classify.evaluate import load_trained_model
from skinsynth.classify.models import create_classifier
from skinsynth.classify.train import (
    _check_train_config,
    balanced_repeats,
    batch_mixer,
    class_weights,
    focal_loss,
    labelled_loss,
    logit_adjusted_weights,
    tone_repeats,
    warmup_cosine,
)
from skinsynth.config import TrainConfig, load_config
from skinsynth.errors import SkinsynthError


def test_class_weights_are_inverse_frequency_with_mean_one():
    labels = np.array([5] * 60 + [4] * 20 + [0] * 20)
    w = class_weights(labels)
    assert w.shape == (7,)
    present = w[[0, 4, 5]]
    assert float(present.mean()) == pytest.approx(1.0)
    assert float(w[0]) == pytest.approx(3 * float(w[5]))
    assert float(w[1]) == 0.0  # absent class


def test_balanced_sampling_brings_rare_classes_up_to_the_mean_share_and_keeps_common_ones():
    # HAM10000-like: 600 nv, 90 mel, 30 bcc, 8 df (one class absent)
    labels = np.repeat([5, 4, 1, 3], [600, 90, 30, 8])
    repeats = balanced_repeats(labels, seed=0)
    target = int(np.ceil(len(labels) / 4))  # 182: four classes present
    per_class = np.bincount(labels, weights=repeats, minlength=7)
    assert per_class[5] == 600 and (repeats[labels == 5] == 1).all()  # commoner than the mean share: untouched
    assert per_class[4] == per_class[1] == per_class[3] == target
    assert set(repeats[labels == 3]) <= {22, 23}  # 182 = 8 x 22 + 6: every df image shown 22 or 23 times
    assert (repeats[labels == 3] == 23).sum() == 6
    assert per_class[0] == 0
    assert (balanced_repeats(labels, seed=0) == repeats).all()
    assert (balanced_repeats(labels, seed=1) != repeats).any()  # which images get the extra copy is seeded


def test_tone_oversampling_evens_the_tone_groups_within_each_class():
    # mel: 38 very_light, 2 dark; nv: 30 light, 10 tan, 5 of unknown tone
    labels = np.repeat([4, 4, 5, 5, 5], [38, 2, 30, 10, 5])
    tones = np.array(["very_light"] * 38 + ["dark"] * 2 + ["light"] * 30 + ["tan"] * 10 + [None] * 5, dtype=object)
    repeats = tone_repeats(labels, tones, seed=0)

    def shown(tone):
        return int(repeats[tones == tone].sum()) if tone else int(repeats[[t is None for t in tones]].sum())

    # mel: two groups over 40 images, so each reaches ceil(40 / 2) = 20 showings; the common one is untouched
    assert shown("very_light") == 38 and shown("dark") == 20 and set(repeats[tones == "dark"]) == {10}
    # nv: 40 images of known tone in two groups: tan brought up to 20 (each image twice); unknown tone shown once
    assert shown("light") == 30 and shown("tan") == 20 and shown(None) == 5
    assert (tone_repeats(labels, tones, seed=1) == repeats).all()  # these cases divide evenly: no seeded extra


def test_focal_loss_reduces_to_cross_entropy_at_gamma_zero_and_downweights_easy_examples():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.2], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert float(focal_loss(logits, labels, 0.0, None)) == pytest.approx(float(ce), rel=1e-6)
    # hand value for gamma = 2 on the first (easy) example: -(1-p)^2 log p
    p = torch.softmax(logits[:1], 1)[0, 0]
    assert float(focal_loss(logits[:1], labels[:1], 2.0, None)) == pytest.approx(float(-((1 - p) ** 2) * torch.log(p)))
    assert float(focal_loss(logits, labels, 2.0, None)) < float(ce)


def test_mixup_blends_images_and_labels_and_the_weighted_soft_loss_matches_a_hand_value():
    tc = TrainConfig(mixup_alpha=0.4, mixup_prob=1.0)
    mixer = batch_mixer(tc)
    x = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    y = torch.tensor([0, 5])
    np.random.seed(3)
    mixed, soft = mixer(x.clone(), y)
    lam = float(mixed[0, 0, 0, 0])  # image 0 (zeros) blended with its mirror, image 1 (ones): 1 - lam of ones
    lam = 1.0 - lam
    assert 0.0 < lam < 1.0
    assert torch.allclose(mixed[1], torch.full((3, 4, 4), lam))
    assert soft[0, 0] == pytest.approx(lam) and soft[0, 5] == pytest.approx(1 - lam)
    assert torch.allclose(soft.sum(1), torch.ones(2))
    # weighted cross-entropy against soft targets: -(1/N) sum_i sum_c w_c t_ic log p_ic
    logits = torch.tensor([[2.0, 0, 0, 0, 0, 1.0, 0], [0.5, 0, 0, 0, 0, -1.0, 0]])
    weight = torch.tensor([2.0, 1, 1, 1, 1, 0.5, 1])
    logp = torch.log_softmax(logits, 1)
    by_hand = -sum(float((weight * soft[i] * logp[i]).sum()) for i in range(2)) / 2
    assert float(labelled_loss(logits, soft, tc, weight)) == pytest.approx(by_hand, rel=1e-6)
    assert batch_mixer(TrainConfig()) is None


def test_mixup_settings_that_cannot_work_are_refused():
    with pytest.raises(SkinsynthError, match="focal"):
        _check_train_config(TrainConfig(imbalance="focal", cutmix_alpha=1.0))
    with pytest.raises(SkinsynthError, match="mixup_prob"):
        _check_train_config(TrainConfig(mixup_alpha=0.2, mixup_prob=1.5))
    with pytest.raises(SkinsynthError, match="tone_min_malignant must be >= 1"):
        _check_train_config(TrainConfig(tone_min_malignant=0))


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture
def trained_phantom(tiny_classifier, tmp_path):
    """The session's tiny classifier (one epoch, 140 phantom images at 32 px) in a private copy of its run directory:
    these tests export, evaluate and train on into it."""
    from tests.conftest import copy_config, copy_run

    cfg, result = tiny_classifier
    out = copy_run(Path(cfg.run.out), tmp_path / "run")
    return copy_config(cfg, out), dataclasses.replace(result, model_dir=out / "models" / cfg.train.name)


def test_training_writes_the_best_model(trained_phantom):
    cfg, result = trained_phantom
    assert result.epochs_run == 1 and len(result.history) == 1
    assert (result.model_dir / "model.pt").is_file()
    info = json.loads((result.model_dir / "training.json").read_text())
    assert info["model"] == "test_efficientnet" and info["image_size"] == 32
    assert info["best_val_balanced_accuracy"] == max(h["val_balanced_accuracy"] for h in result.history)
    # the epoch reports the worst tone group's malignant sensitivity, and the best epoch's (the same, one epoch)
    (epoch,) = result.history
    assert 0.0 <= epoch["val_worst_tone_sensitivity"] <= 1.0
    assert epoch["best_val_worst_tone_sensitivity"] == epoch["val_worst_tone_sensitivity"]
    state = torch.load(result.model_dir / "model.pt", weights_only=True)
    assert any(k.endswith("classifier.weight") and v.shape[0] == 7 for k, v in state.items())
    # with ema_decay the exported model is the weight average, not the last step's weights
    (checkpoint,) = Path(cfg.run.out, "ray_train").glob("*/checkpoint_*/state.pt")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["ema"] is not None
    assert all(torch.equal(state[k], saved["ema"][k]) for k in state)  # best epoch = the only epoch
    assert any(not torch.equal(saved["model"][k], saved["ema"][k]) for k in state if state[k].is_floating_point())
    # the exported model loads with the input size it was trained at: a 32 px image is scored as its 48 px upsample
    model, _ = load_trained_model(result.model_dir)
    plain = create_classifier("test_efficientnet", num_classes=7).eval()
    plain.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32)
    upsampled = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(upsampled), atol=1e-5)


def test_logit_adjustment_is_folded_into_the_head_bias_and_evaluation_can_take_it_out(trained_phantom):
    from skinsynth.classify.evaluate import without_logit_adjustment
    from skinsynth.classify.metrics import adjust_probs
    from tests.conftest import logit_adjustment_case

    cfg, result = trained_phantom
    (checkpoint,) = Path(cfg.run.out, "ray_train").glob("*/checkpoint_*/state.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state"]
    # the checkpoint keeps the best epoch's validation predictions for export to choose tau on
    assert state["best_val"]["probs"].shape == (len(state["best_val"]["labels"]), 7)
    assert sum(state["best_val"]["class_counts"]) > 0
    probs, labels, counts = logit_adjustment_case()  # validation predictions for which tau = 0.2 is best
    state["best_val"] = {"probs": torch.from_numpy(probs), "labels": torch.from_numpy(labels), "class_counts": counts}
    tc = dataclasses.replace(cfg.train, logit_adjustment=True)
    weights, adjustment = logit_adjusted_weights(tc, state)
    assert adjustment["tau"] == pytest.approx(0.2) and adjustment["head_bias"] == "classifier.bias"
    assert adjustment["val_balanced_accuracy_before"] == pytest.approx(1 / 7)
    assert adjustment["val_balanced_accuracy_after"] == pytest.approx(1.0)
    assert all(torch.equal(weights[k], v) for k, v in state["best_model"].items() if k != "classifier.bias")

    plain, _info = load_trained_model(result.model_dir)
    adjusted, _ = load_trained_model(result.model_dir)
    adjusted.load_state_dict(weights)
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        p_plain, p_adjusted = torch.softmax(plain(x), 1).numpy(), torch.softmax(adjusted(x), 1).numpy()
        p_restored = torch.softmax(without_logit_adjustment(adjusted, adjustment)(x), 1).numpy()
    assert p_adjusted == pytest.approx(adjust_probs(p_plain, np.array(adjustment["class_prior"]), 0.2), abs=1e-5)
    assert not np.allclose(p_adjusted, p_plain, atol=1e-3)
    assert p_restored == pytest.approx(p_plain, abs=1e-5)

    # exported and evaluated: the report gives tau and the test figures of the head as trained, which equal an
    # evaluation of the unadjusted model
    from skinsynth.classify.evaluate import evaluate_model
    from skinsynth.classify.train import export_model

    run_dir = Path(cfg.run.out)
    card = json.loads((run_dir / "data" / "data_card.json").read_text())
    export_model(run_dir, tc, state, card, name="adjusted")
    info = json.loads((run_dir / "models" / "adjusted" / "training.json").read_text())
    assert info["logit_adjustment"]["tau"] == pytest.approx(0.2)
    adjusted_cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, name="adjusted"))
    report = evaluate_model(adjusted_cfg, n_boot=10, progress=print)
    plain_report = evaluate_model(cfg, n_boot=10, progress=print)
    without = report["logit_adjustment"]["test_without"]
    assert without["balanced_accuracy"] == pytest.approx(plain_report["test"]["balanced_accuracy"])
    assert without["macro_auroc"] == pytest.approx(plain_report["test"]["macro_auroc"], abs=1e-6)
    model_card = json.loads((run_dir / "models" / "adjusted" / "model_card.json").read_text())
    assert model_card["logit_adjustment"]["tau"] == pytest.approx(0.2)

    del state["best_val"]  # a checkpoint from before this option
    with pytest.raises(SkinsynthError, match="logit_adjustment false"):
        logit_adjusted_weights(tc, state)


def _rgb_images(n: int, size: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (size, size + 6, 3), dtype=np.uint8) for _ in range(n)]


def test_augmentation_without_crop_rotation_or_jitter_only_flips():
    from skinsynth.classify.data import DermoscopyAugmentation

    images = [img[:, :40] for img in _rgb_images(12)]
    augment = DermoscopyAugmentation(40, seed=3, scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate_p=0.0, jitter=0.0, hue=0.0)
    out = augment(images)
    assert out.shape == (12, 3, 40, 40) and out.dtype == torch.float32
    flips_seen = set()
    for image, augmented in zip(images, out):
        ref = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        views = (ref, ref.flip(-1), ref.flip(-2), ref.flip(-1, -2))
        errors = [float((augmented - view).abs().max()) for view in views]
        assert min(errors) < 1e-6  # exactly one of the four flips of the input, pixel for pixel
        flips_seen.add(int(np.argmin(errors)))
    assert len(flips_seen) >= 3  # and the flips are drawn


def test_augmentation_is_seeded_and_stays_in_range():
    from skinsynth.classify.data import DermoscopyAugmentation

    images = _rgb_images(6)
    a = DermoscopyAugmentation(32, seed=(0, 1, 0))(images)
    b = DermoscopyAugmentation(32, seed=(0, 1, 0))(images)
    c = DermoscopyAugmentation(32, seed=(0, 2, 0))(images)
    assert a.shape == (6, 3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_colour_jitter_matrix_hue_rotation_keeps_luma_and_no_jitter_is_identity():
    from skinsynth.classify.data import DermoscopyAugmentation

    still = DermoscopyAugmentation(32, jitter=0.0, hue=0.0)
    matrix, contrast = still.colour()
    assert np.allclose(matrix, np.eye(3), atol=1e-9) and contrast == 1.0
    hue_only = DermoscopyAugmentation(32, seed=5, jitter=0.0, hue=0.5)
    luma = np.array([0.299, 0.587, 0.114])
    for _ in range(5):
        matrix, _ = hue_only.colour()
        assert not np.allclose(matrix, np.eye(3), atol=1e-3)
        assert np.allclose(luma @ matrix, luma, atol=1e-9)  # a hue rotation leaves brightness (Y) alone


def test_evaluation_reports_phantom_tone_groups_with_their_sizes(trained_phantom):
    import pandas as pd
    import pyarrow.parquet as pq

    from skinsynth.classify.evaluate import evaluate_model

    cfg, _ = trained_phantom
    report = evaluate_model(cfg, n_boot=50, progress=print)
    out = cfg.run.out
    eval_dir = Path(out) / "eval" / cfg.train.name
    saved = json.loads((eval_dir / "report.json").read_text())
    assert saved["test"]["balanced_accuracy"] == report["test"]["balanced_accuracy"]
    assert 0.0 <= report["test"]["balanced_accuracy"] <= 1.0
    low, high = report["test"]["intervals_95"]["balanced_accuracy"]
    assert low <= high
    assert report["operating_point"]["chosen_on"] == "val"
    # the fairness table shows the tones the phantom was built with, with the true group sizes of the test split
    splits = pd.read_parquet(f"{out}/data/splits.parquet")
    test_ids = set(splits.loc[splits["split"] == "test", "image_id"])
    images = pq.read_table(f"{out}/data/images", columns=["image_id", "tone_true", "tone"]).to_pandas()
    expected = images[images["image_id"].isin(test_ids)]["tone_true"].value_counts().to_dict()
    fairness = pd.read_csv(eval_dir / "fairness_test.csv")
    shown = fairness[fairness["attribute"] == "tone_true"].set_index("group")["n"].to_dict()
    assert shown == expected
    assert len(shown) >= 4  # the phantom covers the whole tone range
    assert set(fairness["attribute"]) >= {"tone_true", "tone", "sex", "age_band", "localization"}
    for name in report["figures"]:
        assert (eval_dir / name).stat().st_size > 1000
    card = json.loads((Path(out) / "models" / cfg.train.name / "model_card.json").read_text())
    assert "not a medical device" in card["intended_use"]
    assert card["metrics_test"]["balanced_accuracy"] == report["test"]["balanced_accuracy"]


def test_synthetic_conditioning_check_scores_the_conditioning_class(trained_phantom, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from skinsynth.classify.evaluate import predict_probs, synthetic_conditioning
    from skinsynth.core.shards import load_split_table, read_rows, split_ids

    cfg, result = trained_phantom
    model, _ = load_trained_model(result.model_dir)
    assert synthetic_conditioning(model, tmp_path) is None  # no synthetic set, nothing to report
    # stand-in "synthetic" images whose conditioning class is their true class: the check must equal plain accuracy
    rows = read_rows(cfg.run.out, split_ids(load_split_table(cfg.run.out), "test"), ["image", "label"])
    (tmp_path / "synthetic" / "images").mkdir(parents=True)
    table = pa.table({"image": rows["image"], "label": rows["label"], "generator_id": ["g0"] * len(rows)})
    pq.write_table(table, tmp_path / "synthetic" / "images" / "part-0000000.parquet")
    check = synthetic_conditioning(model, tmp_path)
    labels = rows["label"].to_numpy()
    preds = predict_probs(model, rows["image"]).argmax(1)
    assert check["n"] == len(rows) and check["generator_id"] == "g0"
    assert check["accuracy"] == pytest.approx(float(np.mean(preds == labels)))
    present = sorted(set(labels.tolist()))
    recalls = [float(np.mean(preds[labels == c] == c)) for c in present]
    assert check["balanced_accuracy"] == pytest.approx(float(np.mean(recalls)))
    assert check["chance_balanced_accuracy"] == pytest.approx(1 / len(present))


@pytest.mark.slow
def test_training_resumes_from_the_last_checkpoint(trained_phantom, capsys):
    from skinsynth.classify.train import train_classifier
    from tests.conftest import latest_checkpoint, optimiser_steps, same_state

    cfg, first = trained_phantom
    before = latest_checkpoint(cfg.run.out)
    cfg.train.epochs = 2  # the same command, asked for one more epoch
    resumed = train_classifier(cfg, progress=print)
    out = capsys.readouterr().out
    assert "resuming from the checkpoint of epoch 1" in out
    assert resumed.epochs_run == 2
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[:1] == first.history
    # the optimiser and the schedule came back: they go on counting from the first epoch's steps (fresh ones would
    # stop at one epoch's); so did the early-stopping state
    after = latest_checkpoint(cfg.run.out)
    epoch_steps = before["scheduler"]["last_epoch"]
    assert epoch_steps > 0 and optimiser_steps(before["optimizer"]) == {epoch_steps}
    assert after["scheduler"]["last_epoch"] == 2 * epoch_steps
    assert optimiser_steps(after["optimizer"]) == {2 * epoch_steps}
    second = resumed.history[1]["val_balanced_accuracy"]
    improved = second > before["state"]["best_score"]
    assert after["state"]["best_score"] == max(before["state"]["best_score"], second)
    assert after["state"]["stale_epochs"] == (0 if improved else before["state"]["stale_epochs"] + 1)
    assert after["state"]["best_epoch"] == (1 if improved else before["state"]["best_epoch"])
    # a CPU run's loss scaler is off (fp32): the checkpoint keeps its empty state (an fp16 one its scale)
    assert after["scaler"] == {} and after["ema"] is not None and after["alignment"] is None

    # the same command once more: the run is complete, so the loop restores every object, trains nothing and reports
    # its last result again with a checkpoint saved from the restored objects: the one it resumed from
    ray_train = Path(cfg.run.out, "ray_train")
    resumed_from = set(ray_train.glob("*/checkpoint_*/state.pt"))
    again = train_classifier(cfg, progress=print)
    assert "resuming from the checkpoint of epoch 2" in capsys.readouterr().out
    assert again.epochs_run == 2 and again.history == resumed.history
    assert set(ray_train.glob("*/checkpoint_*/state.pt")).isdisjoint(resumed_from)  # a checkpoint written by this run
    final = latest_checkpoint(cfg.run.out)
    assert set(final) == set(after)
    for key in after:
        assert same_state(final[key], after[key]), key  # a fresh EMA, say, would hold the initial weights


@pytest.mark.slow
def test_killed_training_resumes_with_the_same_command(ray_local, phantom_prepared, tmp_path):
    """Kill ``skinsynth train`` (the whole process group) after its first checkpoint, run it again, see it resume."""
    import sys

    from tests.conftest import copy_run, kill_after_first_checkpoint_then_rerun

    out = copy_run(phantom_prepared, tmp_path / "run")  # the session's 140 phantom images at 32 px
    settings = [
        "--set", "data.phantom.n_images=140", "--set", "data.preprocess.size=32",
        "--set", "train.model=test_efficientnet", "--set", "train.pretrained=none",
        "--set", "train.epochs=4", "--set", "train.batch_size=16",
    ]  # fmt: skip
    cli = [sys.executable, "-m", "skinsynth.cli"]
    second = kill_after_first_checkpoint_then_rerun(
        [*cli, "train", "--out", str(out), *settings],
        "ray_train/*/checkpoint_manager_snapshot.json",
        out,
        finished=out / "models" / "classifier",
        log=tmp_path / "first.log",
    )
    resumed = [line for line in (second.stdout + second.stderr).splitlines() if "resuming from the checkpoint" in line]
    assert resumed, second.stdout[-3000:]
    info = json.loads((out / "models" / "classifier" / "training.json").read_text())
    assert [h["epoch"] for h in info["history"]] == list(range(4))
    # the stage's own manifest records the --set values it ran with (config.yaml holds the prepare-time values)
    ran_with = json.loads((out / "models" / "classifier" / "manifest.json").read_text())["config"]
    assert (ran_with["model"], ran_with["epochs"], ran_with["batch_size"]) == ("test_efficientnet", 4, 16)
    # the optimiser and the schedule came back across the kill: they counted every epoch's steps, not only those
    # after the resume
    from skinsynth.core.shards import load_split_table, split_ids
    from tests.conftest import latest_checkpoint, optimiser_steps

    saved = latest_checkpoint(out)
    steps = 4 * -(-len(split_ids(load_split_table(out), "train", labelled_only=True)) // 16)
    assert saved["scheduler"]["last_epoch"] == steps and optimiser_steps(saved["optimizer"]) == {steps}
    assert "scaler" in saved


def test_cpu_autocast_is_bf16_only_when_asked_and_the_cpu_has_native_bf16():
    from skinsynth.core.raytrain import cpu_has_native_bf16, mixed_precision_dtype

    cpu = torch.device("cpu")
    assert mixed_precision_dtype(True, cpu) is None  # the default: CPU training stays fp32
    assert mixed_precision_dtype(False, cpu, cpu_bf16=True) is None  # amp off wins
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert mixed_precision_dtype(True, cpu, cpu_bf16=True) is expected


def test_native_bf16_is_read_from_the_cpu_flags_not_from_onednn_alone(monkeypatch):
    """oneDNN says bf16 is supported on any AVX512 CPU; only AVX512-BF16 or AMX compute it natively."""
    from skinsynth.core.raytrain import cpu_has_native_bf16

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    avx512 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni\n"
    assert not cpu_has_native_bf16(avx512)
    assert cpu_has_native_bf16(avx512.replace("avx512_vnni", "avx512_vnni avx512_bf16"))
    assert cpu_has_native_bf16(avx512.replace("avx512_vnni", "amx_bf16 amx_tile"))
    assert cpu_has_native_bf16("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # no x86 flags: oneDNN's answer
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not cpu_has_native_bf16(avx512.replace("avx512_vnni", "avx512_bf16"))


@pytest.mark.parametrize(
    "overrides",
    [["train.imbalance=focal", "train.focal_gamma=2.0"], ["train.mixup_alpha=0.4", "train.mixup_prob=1.0"]],
    ids=["focal", "mixup"],
)
def test_bench_train_plain_loop_trains_with_the_training_loss(overrides, monkeypatch):
    """The baseline of ``skinsynth bench train`` computes every batch's loss with training's own ``labelled_loss``
    (focal, or the mixer's soft targets), not a plain cross-entropy: both arms must do the same work."""
    import cv2
    import pandas as pd

    import skinsynth.classify.train as train_module
    from skinsynth.bench.train import _plain_training_epoch

    cfg = load_config(
        None,
        [
            "data.preprocess.size=32",
            "train.model=test_efficientnet",
            "train.pretrained=none",
            "train.batch_size=4",
            "train.imbalance=weighted_loss",
            *overrides,
        ],
    )
    rng = np.random.default_rng(0)
    labels = [0, 1, 4, 5, 5, 5, 5, 2, 3, 5]  # batches of 4, 4 and 2: all even, so the mixer mixes each
    images = [cv2.imencode(".png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))[1].tobytes() for _ in labels]
    rows = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(labels))], "image": images, "label": labels})
    weights = class_weights(np.asarray(labels))

    calls = []
    real = train_module.labelled_loss

    def recording_loss(logits, targets, tc, weight):
        loss = real(logits, targets, tc, weight)
        calls.append((logits.detach().clone(), targets.detach().clone(), tc, weight, loss.detach()))
        return loss

    monkeypatch.setattr(train_module, "labelled_loss", recording_loss)
    assert _plain_training_epoch(cfg, rows, weights) > 0
    assert len(calls) == 3  # every batch, none left to a loss of the bench's own
    for logits, targets, tc, weight, loss in calls:
        assert tc is cfg.train and weight is weights and logits.dtype == torch.float32
        if cfg.train.imbalance == "focal":
            assert targets.dtype == torch.long
            expected = focal_loss(logits, targets, 2.0, weights)
            assert float(loss) == pytest.approx(float(expected), rel=1e-6)
            assert float(loss) != pytest.approx(
                float(torch.nn.functional.cross_entropy(logits, targets, weight=weights)), rel=1e-3
            )
        else:  # the mixer's soft targets: each row a blend of two labels, summing to 1
            assert targets.shape == (len(logits), 7) and targets.dtype.is_floating_point
            assert torch.allclose(targets.sum(1), torch.ones(len(logits)))


def test_a_stage_failing_inside_a_ray_worker_puts_its_error_and_log_path_on_the_terminal(
    phantom_prepared, tmp_path, capsys
):
    """Ray's lines go to RUN_DIR/logs/<stage>.log, not the terminal; an error raised inside a Ray Train worker (here
    the training loop's PNG decode, on shards whose image bytes were overwritten) still reaches the terminal, with
    the path of the log that holds its whole traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from skinsynth.cli import main
    from tests.conftest import PHANTOM_SMALL, TINY_CLASSIFIER, copy_run

    out = copy_run(phantom_prepared, tmp_path / "run")
    for shard in sorted((out / "data" / "images").glob("*.parquet")):
        table = pq.read_table(shard)
        garbage = pa.array([b"not a png"] * len(table), pa.binary())
        pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", garbage), shard)
    settings = [arg for value in [*PHANTOM_SMALL, *TINY_CLASSIFIER] for arg in ("--set", value)]
    assert main(["train", "--out", str(out), *settings]) == 1
    captured = capsys.readouterr()
    log = out / "logs" / "train.log"
    assert "skinsynth: error:" in captured.err and "cvtColor" in captured.err, captured.err[-2000:]
    assert f"full log: {log}" in captured.err
    assert "Traceback" in log.read_text() and "cvtColor" in log.read_text()
    assert "(RayTrainWorker pid=" not in captured.out + captured.err  # Ray's worker lines: in the log only
    assert "(RayTrainWorker pid=" in log.read_text() or "(TrainController pid=" in log.read_text()


def test_every_look_at_test_is_in_the_ledger_and_evaluate_reports_the_count(tiny_classifier, tmp_path, capsys):
    """Evaluating twice writes two ledger lines and reports two looks; a grid's per-trial test scoring adds one
    line per trial (here two 'trials' made of the classifier's own checkpoint)."""
    import pandas as pd

    from skinsynth.classify.evaluate import evaluate_model
    from skinsynth.core.ledger import count_test_looks, read_ledger
    from skinsynth.tune.sweep import add_test_metrics
    from tests.conftest import copy_config, copy_run

    trained, _ = tiny_classifier
    out = copy_run(Path(trained.run.out), tmp_path / "run")
    cfg = copy_config(trained, out)
    evaluate_model(cfg, n_boot=10, progress=print)
    report = evaluate_model(cfg, n_boot=10, progress=print)
    assert report["test_looks"]["looks"] == 2 and report["test_looks"]["models"] == 1
    assert "test split looked at 2 times, by 1 model" in capsys.readouterr().out
    card = json.loads((out / "models" / cfg.train.name / "model_card.json").read_text())
    assert card["test_looks"]["looks"] == 2
    ledger = read_ledger(out)
    data_identity = json.loads((out / "data" / "manifest.json").read_text())["identity"]
    assert len(ledger) == 2 and {e["data_identity"] for e in ledger} == {data_identity}
    assert all(e["n_images"] > 0 and "balanced_accuracy" in e["metrics"] and e["command"] for e in ledger)

    checkpoint = str(sorted(p for p in (out / "ray_train").glob("classifier-*/checkpoint_*") if p.is_dir())[-1])
    grid = pd.DataFrame({"trial_id": ["t1", "t2"], "checkpoint_path": [checkpoint, checkpoint]})
    cfg.tune.space = {}
    scored = add_test_metrics(grid, cfg, out, progress=print)
    assert scored["test_balanced_accuracy"].notna().all()
    looks = count_test_looks(out)
    assert looks["looks"] == 4 and looks["models"] == 3  # the model, and the two trials
    assert [e["model_id"] for e in read_ledger(out)[2:]] == ["trial:t1", "trial:t2"]
