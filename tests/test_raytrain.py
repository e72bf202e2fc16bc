"""The Ray Train helpers both training loops share: checkpoint save/restore of every stateful object (through a real
``ray.train.Checkpoint`` directory) and the optimiser step. The full runs, killed and resumed through the shared
driver, are in test_train.py and test_generate.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skinsynth.core.raytrain import (
    optimizer_step,
    read_run_checkpoint,
    restore_training_state,
    save_training_state,
    unwrap_model,
)
from tests.conftest import same_state as same


def small_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )  # BatchNorm: buffers too


def classifier_objects(seed: int, wrap=lambda model: model) -> tuple[dict, object]:
    """What the classifier's loop saves, under its keys: model, AdamW, warm-up/cosine schedule, timm's EMA (its
    averaged copy), distribution alignment, and an enabled loss scaler (the CPU's stands in for the GPU's fp16
    one); and its EMA update."""
    import timm.utils

    from skinsynth.classify.ssl import DistributionAlignment
    from skinsynth.classify.train import warmup_cosine

    net = small_net(seed)
    model = wrap(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, 2, 10))
    ema = timm.utils.ModelEmaV3(net, decay=0.9, use_warmup=True, warmup_power=3 / 4)
    stateful = {
        "model": model,
        "ema": ema.module,
        "optimizer": optimizer,
        "scheduler": schedule,
        "alignment": DistributionAlignment(torch.tensor([0.5, 0.3, 0.2])),
        "scaler": torch.amp.GradScaler("cpu"),
    }
    return stateful, lambda: ema.update(net, step=schedule.last_epoch)


def generator_objects(seed: int, wrap=lambda model: model) -> tuple[dict, object]:
    """What the generator's loop saves, under its keys: model, diffusers' EMA, AdamW, warm-up schedule, scaler; and
    its EMA update."""
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    net = small_net(seed)
    model = wrap(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    ema = EMAModel(net.parameters(), decay=0.9, use_ema_warmup=True, power=3 / 4)
    stateful = {
        "model": model,
        "ema": ema,
        "optimizer": optimizer,
        "lr_schedule": get_constant_schedule_with_warmup(optimizer, num_warmup_steps=3),
        "scaler": torch.amp.GradScaler("cpu"),
    }
    return stateful, lambda: ema.step(net.parameters())


def train_step(objs: dict, update_ema, batch: int) -> None:
    """One step as the loops take it: scaled loss, the shared optimiser step, EMA and alignment updates."""
    generator = torch.Generator().manual_seed(batch)
    x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    model = objs["model"]
    model.train()
    logits = model(x)
    objs["scaler"].scale(F.cross_entropy(logits, y)).backward()
    optimizer_step(model, objs["optimizer"], objs["scaler"], objs.get("scheduler") or objs["lr_schedule"])
    update_ema()
    if "alignment" in objs:
        objs["alignment"](torch.softmax(logits.detach(), dim=1))


def state_dicts(objs: dict) -> dict:
    return {key: unwrap_model(obj).state_dict() for key, obj in objs.items()}


@pytest.fixture
def reports(monkeypatch):
    """``ray.train.report`` outside a Ray Train run: each call's metrics and, read back through
    :func:`read_run_checkpoint` while its directory exists, the checkpoint's contents (None: no checkpoint)."""
    import ray.train

    seen: list[tuple[dict, dict | None]] = []

    def report(metrics, checkpoint=None):
        seen.append((metrics, None if checkpoint is None else read_run_checkpoint(checkpoint)))

    monkeypatch.setattr(ray.train, "report", report)
    return seen


@pytest.fixture
def ddp(tmp_path):
    """Wrap a model in DDP (a one-process gloo group), as Ray Train does with more than one worker."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield torch.nn.parallel.DistributedDataParallel
    dist.destroy_process_group()


@pytest.mark.parametrize("objects", [classifier_objects, generator_objects], ids=["classifier", "generator"])
def test_every_stateful_object_comes_back_from_a_checkpoint_and_training_continues_alike(objects, reports, ddp):
    trained, trained_ema = objects(seed=0, wrap=ddp)  # saved from DDP, restored into a plain model (no "module.")
    for batch in range(4):
        train_step(trained, trained_ema, batch)
    trained["scaler"].update(1234.0)  # a loss scale a fresh scaler (65536) would not have
    state = {"epoch": 4, "best_score": 0.61, "best_epoch": 2, "stale_epochs": 1, "history": [{"loss": 1.5}] * 4}
    state["best_model"] = {k: v.clone() for k, v in unwrap_model(trained["model"]).state_dict().items()}

    save_training_state(trained, state, {"epoch": 3}, rank=0)
    ((metrics, saved),) = reports
    assert metrics == {"epoch": 3} and set(saved) == {*trained, "state"}
    assert not any(k.startswith("module.") for k in saved["model"])

    resumed, resumed_ema = objects(seed=1)
    before = state_dicts(resumed)
    assert all(not same(before[key], value) for key, value in state_dicts(trained).items())  # so the test can fail
    assert same(restore_training_state(resumed, saved), state)
    after = state_dicts(resumed)
    for key, value in state_dicts(trained).items():
        assert same(after[key], value), key
    assert resumed["scaler"].get_scale() == 1234.0
    assert resumed["optimizer"].param_groups[0]["lr"] == trained["optimizer"].param_groups[0]["lr"]

    # the next step of the resumed objects is the next step of the uninterrupted ones
    train_step(trained, trained_ema, 4)
    train_step(resumed, resumed_ema, 4)
    for key, value in state_dicts(trained).items():
        assert same(state_dicts(resumed)[key], value), key


def test_only_rank_zero_writes_a_checkpoint_but_every_rank_reports(reports):
    save_training_state({"model": small_net(0)}, {"step": 3}, {"step": 3, "loss": 0.5}, rank=1)
    assert reports == [({"step": 3, "loss": 0.5}, None)]


def test_a_checkpoint_without_an_object_or_from_a_disabled_scaler_still_restores():
    older = small_net(0)
    model, scaler = small_net(1), torch.amp.GradScaler("cpu")
    stateful = {"model": model, "ema": None, "scaler": scaler}  # ema None: the feature is off in this run
    # a checkpoint written before the classifier saved its scaler, with an EMA saved as None
    saved = {"model": older.state_dict(), "ema": None, "state": {"epoch": 2}}
    assert restore_training_state(stateful, saved) == {"epoch": 2}
    assert same(model.state_dict(), older.state_dict())
    assert scaler.get_scale() == 65536.0  # its fresh scale
    # a disabled scaler (CPU, bf16) saves {}, which an enabled one cannot load: an fp16 run resumed from it starts
    # with a fresh scale instead of failing
    saved["scaler"] = torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved["scaler"] == {}
    assert restore_training_state(stateful, saved) == {"epoch": 2}
    assert scaler.get_scale() == 65536.0
    assert restore_training_state(stateful, None) is None  # a fresh run


def test_the_optimiser_step_clips_the_unscaled_gradient_and_steps_the_schedule():
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = (model(torch.full((1, 3), 100.0)) - 1.0).pow(2).sum()  # gradient norm 200 * sqrt(3) * 100
    scaler.scale(loss).backward()
    optimizer_step(model, optimizer, scaler, schedule)
    # SGD at lr 1 moves the weights by the clipped gradient: norm 1, not 1/1024 (clipped before unscaling) or 346
    assert float(model.weight.detach().norm()) == pytest.approx(1.0, rel=1e-5)
    assert model.weight.grad is None and schedule.last_epoch == 1 and scaler.get_scale() == 1024.0
