from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from skinsynth.classify.train import class_weights, focal_loss, warmup_cosine
from skinsynth.config import load_config


def test_class_weights_are_inverse_frequency_with_mean_one():
    labels = np.array([5] * 60 + [4] * 20 + [0] * 20)
    w = class_weights(labels)
    assert w.shape == (7,)
    present = w[[0, 4, 5]]
    assert float(present.mean()) == pytest.approx(1.0)
    assert float(w[0]) == pytest.approx(3 * float(w[5]))
    assert float(w[1]) == 0.0  # absent class


def test_focal_loss_reduces_to_cross_entropy_at_gamma_zero_and_downweights_easy_examples():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.2], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert float(focal_loss(logits, labels, 0.0, None)) == pytest.approx(float(ce), rel=1e-6)
    # hand value for gamma = 2 on the first (easy) example: -(1-p)^2 log p
    p = torch.softmax(logits[:1], 1)[0, 0]
    assert float(focal_loss(logits[:1], labels[:1], 2.0, None)) == pytest.approx(float(-((1 - p) ** 2) * torch.log(p)))
    assert float(focal_loss(logits, labels, 2.0, None)) < float(ce)


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def phantom_run(ray_local, tmp_path_factory):
    from skinsynth.data.prepare import prepare_images

    out = tmp_path_factory.mktemp("train") / "run"
    cfg = load_config(None, [f"run.out={out}", "data.phantom.n_images=70", "data.preprocess.size=32"])
    prepare_images(cfg.data, out, progress=lambda _m: None)
    return cfg


def test_train_on_phantom_writes_model_and_resumes(phantom_run, capsys):
    from skinsynth.classify.train import train_classifier

    overrides = {"model": "test_efficientnet", "pretrained": "none", "epochs": 1, "batch_size": 32, "lr": 3e-3}
    for key, value in overrides.items():
        setattr(phantom_run.train, key, value)
    result = train_classifier(phantom_run, progress=print)
    assert result.epochs_run == 1 and len(result.history) == 1
    assert (result.model_dir / "model.pt").is_file()
    info = json.loads((result.model_dir / "training.json").read_text())
    assert info["model"] == "test_efficientnet" and info["image_size"] == 32
    assert info["best_val_balanced_accuracy"] == max(h["val_balanced_accuracy"] for h in result.history)
    state = torch.load(result.model_dir / "model.pt", weights_only=True)
    assert any(k.endswith("classifier.weight") and v.shape[0] == 7 for k, v in state.items())

    # the same command with more epochs continues from the last checkpoint instead of starting over
    phantom_run.train.epochs = 2
    t0 = time.perf_counter()
    resumed = train_classifier(phantom_run, progress=print)
    print(f"resumed run took {time.perf_counter() - t0:.1f} s")
    out = capsys.readouterr().out
    assert "resuming from the checkpoint of epoch 1" in out
    assert resumed.epochs_run == 2
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[:1] == result.history
