"""``skinsynth bench train``: a Ray Train classifier epoch against a plain PyTorch loop, same run.

The plain loop trains as ``skinsynth.classify.train`` does - same model, data, augmentation, optimiser, batch size,
and the training loss itself (``labelled_loss``: focal or class-weighted cross-entropy, label smoothing, and the
batch mixer's soft targets when mixup/CutMix is on) - so both arms do the same work per image.
"""

from __future__ import annotations

import time
from typing import Any

from skinsynth.bench import Progress, ratio, with_machine
from skinsynth.core.rundir import layout
from skinsynth.core.shards import load_split_table, read_rows, split_ids
from skinsynth.core.storage import local_run_dir


def _plain_training_epoch(cfg, rows, weights) -> float:
    """One epoch of the same model, data, augmentation, loss and batch size in a plain PyTorch loop: images/s."""
    import numpy as np
    import torch

    from skinsynth.classify.data import Collate, DermoscopyAugmentation
    from skinsynth.classify.train import batch_mixer, build_training_model, labelled_loss, make_optimizer
    from skinsynth.core.raytrain import mixed_precision_dtype

    tc = cfg.train
    amp_dtype = mixed_precision_dtype(tc.amp, torch.device("cpu"), cpu_bf16=tc.cpu_amp)  # as the Ray Train worker
    torch.manual_seed(tc.seed)
    setup = build_training_model(tc)
    model = setup.model
    collate = Collate(setup.mean, setup.std, DermoscopyAugmentation(cfg.data.preprocess.size, seed=(tc.seed, 0, 0)))
    optimizer = make_optimizer(model, tc)
    # the loss as train_loop_per_worker sets it up: the class weights only where train.imbalance uses them
    mixer = batch_mixer(tc)
    weight = weights if tc.imbalance in ("weighted_loss", "focal") else None
    order = np.random.default_rng(tc.seed).permutation(len(rows))
    np.random.seed([tc.seed, 0, 0])  # timm's Mixup draws from numpy: seeded as the worker seeds its first epoch
    model.train()
    t0 = time.perf_counter()
    for start in range(0, len(rows), tc.batch_size):
        batch = rows.iloc[order[start : start + tc.batch_size]]
        x, y = collate({"image": batch["image"].to_numpy(), "label": batch["label"].to_numpy()})
        x, targets = x.contiguous(memory_format=setup.memory_format), y
        if mixer is not None and len(y) % 2 == 0:  # as in training: a short odd last batch trains unmixed
            x, targets = mixer(x, y)
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss = labelled_loss(logits.float(), targets, tc, weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(rows) / (time.perf_counter() - t0)


def bench_train(cfg, *, progress: Progress = print) -> dict[str, Any]:
    """Training images/s of the Ray Train path against a plain PyTorch loop, one epoch each, same run.

    Both use the same model, labelled train images, augmentation, training loss, optimiser and batch size. The Ray
    figure is the one the training loop measures over its epoch (Ray Data feeding included; cluster and worker
    start-up excluded, reported separately as wall time).

    Args:
        cfg: experiment whose ``run.out`` holds prepared data; ``train`` gives model and batch size.
        progress: receives one-line messages.

    Returns:
        The benchmark record.
    """
    import shutil
    import uuid

    import torch

    from skinsynth.classify.train import class_weights, train_classifier, training_run_name

    run_dir = local_run_dir(cfg.run)
    ids = split_ids(load_split_table(run_dir), "train", labelled_only=True)
    rows = read_rows(run_dir, ids, ["image_id", "image", "label"])
    weights = class_weights(rows["label"].to_numpy())
    progress(f"bench train: {cfg.train.model}, {len(rows)} images, batch {cfg.train.batch_size}; plain loop ...")
    plain = _plain_training_epoch(cfg, rows, weights)
    progress(f"bench train: plain PyTorch loop {plain:.1f} images/s ({torch.get_num_threads()} threads)")

    cfg.train.name = f"bench-{uuid.uuid4().hex[:8]}"
    cfg.train.epochs = 1
    t0 = time.perf_counter()
    try:
        result = train_classifier(cfg, progress=lambda _m: None)
    finally:
        shutil.rmtree(layout(run_dir).model(cfg.train.name), ignore_errors=True)
        run_name = training_run_name(cfg.train, run_dir.resolve())
        shutil.rmtree(layout(run_dir).ray_train / run_name, ignore_errors=True)
    wall = time.perf_counter() - t0
    ray_rate = result.history[0]["train_images_per_s"]
    record = with_machine(
        {
            "benchmark": "train",
            "model": cfg.train.model,
            "images": len(rows),
            "image_size": cfg.data.preprocess.size,
            "batch_size": cfg.train.batch_size,
            "baseline": "plain PyTorch loop in one process, same model, data, augmentation, loss and batch size",
            "plain_images_per_s": round(plain, 2),
            "ray_train_images_per_s": round(ray_rate, 2),
            "ratio": ratio(ray_rate, plain),
            "ray_train_wall_s_including_startup_and_validation": round(wall, 1),
        }
    )
    progress(
        f"bench train: Ray Train {ray_rate:.1f} images/s vs plain loop {plain:.1f} images/s -> "
        f"{record['ratio']:.2f}x (Ray run wall time {wall:.0f} s with start-up and validation)"
    )
    return record
