"""Classifier training with Ray Train: a timm model, fed from the prepared shards through Ray Data.

One ``TorchTrainer`` run per model (``RUN_DIR/ray_train/<name>``): DDP across ``num_workers``, AdamW with a linear
warm-up then cosine schedule (Loshchilov & Hutter 2017, "SGDR" / 2019, "Decoupled weight decay"), class-weighted
or focal loss (Lin et al. 2017) for HAM10000's 58:1 imbalance, early stopping on validation balanced accuracy, and
a checkpoint through ``ray.train.report`` after every epoch. Re-running the same command continues from the last
checkpoint: Ray Train finds the run's snapshot under the same storage path and name, and the loop restores model,
optimiser, schedule, weight average, loss scale, epoch and early-stopping state from it (the driver, checkpoint
save/restore and optimiser step are those of the generator too: ``skinsynth.core.raytrain``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from skinsynth.config import ExperimentConfig, TrainConfig, changed_settings, config_to_dict, section_from_dict
from skinsynth.core.console import worker_progress
from skinsynth.core.rundir import (
    MODEL_TRAINING,
    MODEL_WEIGHTS,
    RAY_TRAIN_FOLDER,
    StageIdentity,
    current_identity,
    layout,
    read_generator_pool,
    replace_dir,
    write_manifest,
)
from skinsynth.data.schema import CLASSES
from skinsynth.errors import SkinsynthError

Progress = Callable[[str], None]
# settings a run can change and still resume its checkpoints: its length
RUN_LENGTH_KEYS = frozenset({"epochs", "early_stopping_patience"})


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, weight: torch.Tensor | None) -> torch.Tensor:
    """Focal loss (Lin et al. 2017, "Focal loss for dense object detection"): cross-entropy scaled by
    ``(1 - p_t) ** gamma`` so that easy, majority-class images stop dominating the gradient."""
    log_p = F.log_softmax(logits, dim=1)
    log_pt = log_p.gather(1, labels[:, None]).squeeze(1)
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    if weight is not None:
        loss = loss * weight[labels]
    return loss.mean()


def batch_mixer(tc: TrainConfig, num_classes: int = len(CLASSES)):
    """timm's ``Mixup`` for ``train.mixup_alpha`` / ``train.cutmix_alpha`` (mixup: Zhang et al. 2018; CutMix: Yun
    et al. 2019), or None when both are 0. It returns soft targets, with ``train.label_smoothing`` folded in."""
    if tc.mixup_alpha <= 0 and tc.cutmix_alpha <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=tc.mixup_alpha,
        cutmix_alpha=tc.cutmix_alpha,
        prob=tc.mixup_prob,
        switch_prob=0.5,
        label_smoothing=tc.label_smoothing,
        num_classes=num_classes,
    )


def labelled_loss(
    logits: torch.Tensor, targets: torch.Tensor, tc: TrainConfig, weight: torch.Tensor | None
) -> torch.Tensor:
    """The supervised loss: focal, or (class-weighted) cross-entropy against class indices or, after batch mixing,
    soft targets. With soft targets each class's term is scaled by its weight and the mean is over images (the
    form PyTorch gives probability targets)."""
    if tc.imbalance == "focal":
        return focal_loss(logits, targets, tc.focal_gamma, weight)
    smoothing = tc.label_smoothing if targets.dtype == torch.long else 0.0  # the mixer has already smoothed
    return F.cross_entropy(logits, targets, weight=weight, label_smoothing=smoothing)


def class_weights(labels: np.ndarray, num_classes: int = len(CLASSES)) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 over the classes present (absent classes get 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def balanced_repeats(labels: np.ndarray, seed: int, num_classes: int = len(CLASSES)) -> np.ndarray:
    """How many times each training row is shown per epoch under class-balanced sampling.

    Repeat-factor sampling (Gupta et al. 2019, "LVIS: a dataset for large vocabulary instance segmentation"; the
    oversampling Buda et al. 2018 found best for CNNs on imbalanced data): every class rarer than the mean class
    share 1/K is brought up to exactly ceil(N/K) rows by repeating its images - each one ``target // n`` times,
    a seeded draw of them once more - while commoner classes keep their rows. An epoch grows instead of dropping
    majority images, and HAM10000's 58:1 imbalance shrinks to about 5:1, which the loss weights of
    ``train.imbalance`` then handle without a 50x weight on a few dozen images.
    """
    counts = np.bincount(labels, minlength=num_classes)
    target = math.ceil(len(labels) / max(int((counts > 0).sum()), 1))
    repeats = np.ones(len(labels), dtype=np.int64)
    rng = np.random.default_rng(seed)
    for cls in np.flatnonzero((counts > 0) & (counts < target)):
        rows = np.flatnonzero(labels == cls)
        repeats[rows] = target // len(rows)
        repeats[rng.choice(rows, target % len(rows), replace=False)] += 1
    return repeats


def tone_repeats(labels: np.ndarray, tones: np.ndarray, seed: int) -> np.ndarray:
    """How many times each row is shown per epoch under tone-group oversampling (``train.tone_oversampling``).

    Within each class, the estimated skin-tone groups rarer than an even share of the class's rows are brought up
    to it by repeating their images (the repeat-factor rule of :func:`balanced_repeats`, over tone groups instead
    of classes), so a class's rare tones are seen as often as its common ones (the oversampling baseline of group
    robustness studies, e.g. Idrissi et al. 2022, "Simple data balancing achieves competitive worst-group-accuracy").
    Rows of unknown tone keep one showing and do not count as a group.
    """
    repeats = np.ones(len(labels), dtype=np.int64)
    known = np.array([isinstance(t, str) and t != "unknown" for t in tones])
    for cls in np.unique(labels):
        rows = np.flatnonzero((labels == cls) & known)
        if len(rows) == 0:
            continue
        names, codes = np.unique(tones[rows].astype(str), return_inverse=True)
        repeats[rows] = balanced_repeats(codes, seed + int(cls), num_classes=len(names))
    return repeats


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, preds))


def _predict(
    model, batches, device, amp_dtype, memory_format=torch.contiguous_format
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities, labels and tone indices (``Collate(with_tones=True)`` batches) of a validation pass."""
    model.eval()
    probs, labels, tones = [], [], []
    with torch.no_grad():
        for x, y, tone in batches:
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x.to(device, memory_format=memory_format))
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
            labels.append(y.cpu())
            tones.append(tone.cpu())
    if not probs:
        return np.zeros((0, len(CLASSES)), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy(), torch.cat(tones).numpy()


def _worst_tone_sensitivity(probs: np.ndarray, labels: np.ndarray, tones: np.ndarray, min_malignant: int) -> float:
    """Validation's worst-tone-group malignant sensitivity (NaN when no tone group has enough malignant images)."""
    from skinsynth.classify.metrics import worst_group_sensitivity
    from skinsynth.data.schema import TONES

    if not len(labels):
        return float("nan")
    names = [TONES[i] if i >= 0 else None for i in tones.tolist()]
    sensitivity, _group = worst_group_sensitivity(probs, labels, names, min_malignant)
    return float("nan") if sensitivity is None else sensitivity


@dataclass
class TrainingModel:
    """A classifier set up for fine-tuning, with the input normalisation its weights expect."""

    model: torch.nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    memory_format: torch.memory_format
    frozen: list[str]


def build_training_model(tc: TrainConfig) -> TrainingModel:
    """The model exactly as training uses it: created, early layers frozen, in the configured memory format.

    Shared by the Ray Train loop and the plain-loop baseline of ``skinsynth bench train``, so both time one model.
    """
    import timm.data

    from skinsynth.classify.models import create_classifier, freeze_early_layers

    model = create_classifier(tc.model, num_classes=len(CLASSES), pretrained=tc.pretrained, input_size=tc.input_size)
    frozen = freeze_early_layers(model, tc.freeze_blocks)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    memory_format = torch.channels_last if tc.channels_last else torch.contiguous_format
    return TrainingModel(
        model.to(memory_format=memory_format),
        tuple(data_cfg["mean"]),
        tuple(data_cfg["std"]),
        memory_format,
        frozen,
    )


def make_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (frozen layers carry no optimiser state)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (see the module docstring). ``config`` holds plain values only."""
    import ray.train
    import ray.train.torch

    from skinsynth.classify.data import Collate, DermoscopyAugmentation
    from skinsynth.core import raytrain
    from skinsynth.core.shards import SHUFFLE_BUFFER_ROWS, collated_batches

    tc = section_from_dict(TrainConfig, config["train"])
    cpu0, wall0 = time.process_time(), time.perf_counter()  # this run's compute, reported with every epoch
    rank, world = raytrain.start_worker(config, tc.seed)
    setup = build_training_model(tc)
    if setup.frozen and rank == 0:
        worker_progress(f"train: kept at pretrained values: {', '.join(setup.frozen)}")
    mean, std, memory_format = setup.mean, setup.std, setup.memory_format
    model = ray.train.torch.prepare_model(setup.model)
    device = ray.train.torch.get_device()
    amp_dtype = raytrain.mixed_precision_dtype(
        tc.amp, device, cpu_bf16=tc.cpu_amp, announce="train" if rank == 0 else None
    )
    scaler = raytrain.grad_scaler(amp_dtype)

    optimizer = make_optimizer(model, tc)
    steps_per_epoch = max(1, math.ceil(config["train_images"] / (tc.batch_size * world)))
    total_steps = steps_per_epoch * tc.epochs
    warmup_steps = int(tc.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
    )
    weight = torch.tensor(config["class_weights"], dtype=torch.float32, device=device)
    mixer = batch_mixer(tc)
    use_weight = tc.imbalance in ("weighted_loss", "focal")
    # weight averaging (Polyak & Juditsky 1992; timm's ModelEmaV3 averages BatchNorm statistics too): validation,
    # model selection and the exported model all use the average, which is steadier than the last step's weights
    ema = None
    if tc.ema_decay > 0:
        import timm.utils

        ema = timm.utils.ModelEmaV3(
            raytrain.unwrap_model(model), decay=tc.ema_decay, use_warmup=True, warmup_power=3 / 4
        )

    ssl = tc.ssl
    alignment = None
    if ssl.method != "none" and ssl.distribution_alignment:
        from skinsynth.classify.ssl import DistributionAlignment

        counts = torch.tensor(config["class_counts"], dtype=torch.float32)
        alignment = DistributionAlignment(counts / counts.sum())

    # what a checkpoint saves and a resumed run restores, by the keys checkpoints have always used (None: off)
    stateful = {
        "model": model,
        "ema": ema.module if ema is not None else None,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "alignment": alignment,
        "scaler": scaler,
    }
    state = raytrain.restore_training_state(stateful, raytrain.load_train_checkpoint())
    resumed = state is not None
    if not resumed:
        state = {
            "epoch": 0,
            "best_score": -1.0,
            "best_epoch": -1,
            "stale_epochs": 0,
            "history": [],
            "best_model": None,
        }
    elif rank == 0:
        worker_progress(
            f"train: resuming from the checkpoint of epoch {state['epoch']} (best {state['best_score']:.3f})"
        )

    # a resumed run goes on from what its checkpoint recorded (a sweep's per-trial compute: skinsynth.tune.sweep)
    compute_before = (state.get("workers_cpu_s", 0.0), state.get("worker_wall_s", 0.0))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    unlabelled_shard = ray.train.get_dataset_shard("unlabelled") if ssl.method != "none" else None
    finished = state["epoch"] >= tc.epochs or state["stale_epochs"] >= tc.early_stopping_patience
    if resumed and state["history"] and finished:
        # the run had finished before an interruption (a sweep killed between a trial's last epoch and recording
        # it): report the last result again, from the same weights, so the caller gets it without training again
        raytrain.save_training_state(stateful, state, state["history"][-1], rank)
    for epoch in range(state["epoch"], tc.epochs):
        if state["stale_epochs"] >= tc.early_stopping_patience:
            break
        model.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        # seeded per epoch and worker: a resumed run draws the augmentations the uninterrupted one would have
        augment = DermoscopyAugmentation(config["image_size"], seed=(tc.seed, epoch, rank)) if tc.augment else None
        batches = collated_batches(
            train_shard,
            Collate(mean, std, augment),
            # on a GPU, decoding the next batch in a background thread overlaps the step; on CPU that thread takes
            # a core from the model's threads mid-step and costs more than it hides, so batches come in-line
            device,
            batch_size=tc.batch_size,
            # mixes many shards, so no batch is dominated by one shard's lesions
            local_shuffle_buffer_size=max(tc.batch_size * 8, SHUFFLE_BUFFER_ROWS),
            local_shuffle_seed=tc.seed + epoch,
            drop_last=False,
        )
        unlabelled = (
            _unlabelled_batches(unlabelled_shard, tc, config, mean, std, epoch, rank, device)
            if unlabelled_shard is not None
            else None
        )
        mask_sum, mask_n = 0.0, 0
        np.random.seed([tc.seed, epoch, rank])  # timm's Mixup draws from numpy: a resumed epoch mixes alike
        for x, y in batches:
            x, y = x.to(device, memory_format=memory_format), y.to(device)
            targets = y
            # timm's Mixup pairs each image with its mirror in the batch, so it needs an even count: a short last
            # batch of odd size trains unmixed
            if mixer is not None and len(y) % 2 == 0:
                x, targets = mixer(x, y)
            views = [v.to(device, memory_format=memory_format) for v in next(unlabelled)] if unlabelled else []
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                # one forward pass over labelled and unlabelled views, so BatchNorm sees them as one batch
                all_logits = model(torch.cat([x, *views])) if views else model(x)
                logits = all_logits[: len(y)]
                loss = labelled_loss(logits.float(), targets, tc, weight if use_weight else None)
                if views:
                    unlabelled_loss, mask = _unlabelled_loss(all_logits[len(y) :], ssl, alignment)
                    loss = loss + ssl.unlabelled_weight * unlabelled_loss
                    mask_sum, mask_n = mask_sum + float(mask.sum()), mask_n + len(mask)
            scaler.scale(loss).backward()
            raytrain.optimizer_step(model, optimizer, scaler, scheduler)
            if ema is not None:
                ema.update(raytrain.unwrap_model(model), step=scheduler.last_epoch)
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
        if unlabelled is not None:
            unlabelled.close()  # ends the pool's pass now rather than when the generator is collected
        train_s = time.perf_counter() - t0

        val_batches = collated_batches(
            val_shard, Collate(mean, std, with_tones=True), device, batch_size=tc.batch_size * 2
        )
        evaluated = ema.module if ema is not None else model
        probs, labels, tones = _predict(evaluated, val_batches, device, amp_dtype, memory_format)
        val_bacc = _balanced_accuracy(labels, probs.argmax(1)) if len(labels) else float("nan")
        worst_tone = _worst_tone_sensitivity(probs, labels, tones, tc.tone_min_malignant)
        improved = val_bacc > state["best_score"]
        if improved:
            # the best epoch's figure: a sweep's second objective describes the weights the trial exports
            state.update(best_score=val_bacc, best_epoch=epoch, stale_epochs=0, best_worst_tone=worst_tone)
            best = raytrain.unwrap_model(evaluated).state_dict()
            state["best_model"] = {k: v.detach().cpu().clone() for k, v in best.items()}
            # what export needs to choose a logit adjustment on validation without predicting it again
            state["best_val"] = {
                "probs": torch.from_numpy(probs),
                "labels": torch.from_numpy(labels),
                "class_counts": config["class_counts"],
            }
        else:
            state["stale_epochs"] += 1
        metrics = {
            "epoch": epoch,
            "epochs_done": epoch + 1,  # a sweep's time axis: a resumed trial goes on counting from its checkpoint
            "train_loss": loss_sum / max(seen, 1),
            "val_balanced_accuracy": val_bacc,
            "best_val_balanced_accuracy": state["best_score"],
            "val_worst_tone_sensitivity": worst_tone,
            "best_val_worst_tone_sensitivity": state.get("best_worst_tone", float("nan")),
            "train_images_per_s": seen * world / max(train_s, 1e-9),
            "lr": scheduler.get_last_lr()[0],
        }
        if mask_n:  # share of unlabelled images confident enough to be trained on (FixMatch's "mask rate")
            metrics["pseudo_label_rate"] = mask_sum / mask_n
        # the run's compute so far, over restarts: this worker process's CPU time x the workers (alike under DDP),
        # and the time since this worker began, model set-up included (Ray Data's read tasks are not counted)
        metrics["workers_cpu_s"] = compute_before[0] + (time.process_time() - cpu0) * world
        metrics["worker_wall_s"] = compute_before[1] + (time.perf_counter() - wall0)
        state.update(workers_cpu_s=metrics["workers_cpu_s"], worker_wall_s=metrics["worker_wall_s"])
        state["history"].append(metrics)
        state["epoch"] = epoch + 1
        if rank == 0:
            pseudo = f"  pseudo-labelled {metrics['pseudo_label_rate']:.0%}" if mask_n else ""
            tone = "" if math.isnan(worst_tone) else f"  worst-tone malignant sens {worst_tone:.2f}"
            worker_progress(
                f"train: epoch {epoch + 1}/{tc.epochs}  loss {metrics['train_loss']:.4f}  "
                f"val balanced acc {val_bacc:.3f} (best {state['best_score']:.3f} @ {state['best_epoch'] + 1}){tone}  "
                f"{metrics['train_images_per_s']:.0f} img/s{pseudo}",
                epoch + 1,
                tc.epochs,
                "epochs",
            )
        raytrain.save_training_state(stateful, state, metrics, rank)


def _unlabelled_batches(shard, tc: TrainConfig, config: dict[str, Any], mean, std, epoch: int, rank: int, device):
    """Endless batches of ``unlabelled_ratio x batch_size`` unlabelled images (as weak, or weak and strong, views).

    The labelled set sets the epoch's length; the pool (usually larger) is read on in passes, each reshuffled.
    """
    from skinsynth.classify.ssl import StrongAugmentation, UnlabelledCollate
    from skinsynth.core.shards import SHUFFLE_BUFFER_ROWS, collated_batches

    ssl, image_size = tc.ssl, config["image_size"]
    batch_size = config["unlabelled_batch_size"]
    for round_ in range(1_000_000):
        seed = (tc.seed, epoch, rank, round_)
        strong = StrongAugmentation(ssl.randaugment_magnitude, ssl.cutout, seed) if ssl.method == "fixmatch" else None
        empty = True
        for views in collated_batches(
            shard,
            UnlabelledCollate(mean, std, image_size, seed, strong),
            device,
            batch_size=batch_size,
            local_shuffle_buffer_size=max(batch_size * 4, SHUFFLE_BUFFER_ROWS),
            local_shuffle_seed=hash(seed) % (2**31),
            drop_last=True,
        ):
            empty = False
            yield views
        if empty:
            raise SkinsynthError(f"the unlabelled pool has fewer than {batch_size} images (one unlabelled batch)")


def _unlabelled_loss(logits: torch.Tensor, ssl, alignment) -> tuple[torch.Tensor, torch.Tensor]:
    """The unlabelled part of the loss from the logits of the unlabelled views (weak, or weak then strong)."""
    from skinsynth.classify.ssl import fixmatch_loss, pseudo_label_loss

    if ssl.method == "fixmatch":
        weak, strong = logits.chunk(2)
        return fixmatch_loss(weak, strong, ssl.threshold, alignment)
    return pseudo_label_loss(logits, ssl.threshold, alignment)


@dataclass
class TrainingInputs:
    """The images one training run learns from, by id, and the labels the driver needs for class weights."""

    labelled: list[str]  # real train images whose labels training uses
    synthetic: list[str]  # synthetic images mixed into the labelled set (train.mix)
    unlabelled: list[str]  # the rest of the train split: the SSL pool (used only when train.ssl.method is set)
    val: list[str]
    labels: np.ndarray  # of labelled then synthetic images (class weights, class prior)
    synthetic_per_class: dict[str, int]
    repeats: np.ndarray  # per labelled then synthetic image: times shown per epoch (train.sampling)
    # the generator whose samples are mixed in, and the training ids checked against this run's labels (None: no mix)
    synthetic_provenance: dict[str, Any] | None = None

    @property
    def sampled_labels(self) -> np.ndarray:
        """The labels of one epoch's rows (repeats included): what the loss weights must balance."""
        return np.repeat(self.labels, self.repeats)

    def repeated_ids(self) -> dict[str, int]:
        """Image id -> times shown per epoch, for the images shown more than once."""
        ids = [*self.labelled, *self.synthetic]
        return {ids[i]: int(self.repeats[i]) for i in np.flatnonzero(self.repeats > 1)}


def training_inputs(run_dir: Path, tc: TrainConfig) -> TrainingInputs:
    """Partition the train split (``train.label_fraction``) and draw the synthetic mix (``train.mix``).

    Raises:
        SkinsynthError: no prepared data, no labelled image, no synthetic set when a mix is asked for, or too few
            synthetic images of a class.
    """
    from skinsynth.classify.mixing import (
        check_generator_provenance,
        labelled_partition,
        select_synthetic,
        synthetic_counts,
    )
    from skinsynth.core.shards import load_split_table, read_rows, split_ids

    splits = load_split_table(run_dir)
    train_splits = splits[splits["split"] == "train"]
    train_rows = read_rows(run_dir, list(train_splits["image_id"]), columns=["image_id", "dx", "label", "tone"])
    train_rows = train_rows.merge(train_splits[["image_id", "group_id", "labelled"]], on="image_id")
    partition = labelled_partition(train_rows, tc.label_fraction, tc.seed)
    if not partition.labelled:
        raise SkinsynthError(f"no labelled training images in {layout(run_dir).data}")
    labelled_rows = train_rows.set_index("image_id").loc[partition.labelled]
    synthetic, labels = [], labelled_rows["label"].to_numpy(np.int64)
    counts = synthetic_counts(labelled_rows["dx"].value_counts().to_dict(), tc.mix)
    provenance = None
    if sum(counts.values()):
        synthetic_dir = layout(run_dir).synthetic_images
        if not synthetic_dir.is_dir():
            raise SkinsynthError(
                f"train.mix.ratio is {tc.mix.ratio} but {synthetic_dir} does not exist: run 'skinsynth generate "
                "train' and 'skinsynth generate sample' first (or set train.mix.ratio=0)"
            )
        generator_ids, generator, pool_record = _generator_training_ids(run_dir)
        provenance = check_generator_provenance(generator_ids, partition.labelled, splits, generator, pool_record)
        import pyarrow.parquet as pq

        pool = pq.read_table(synthetic_dir, columns=["image_id", "dx", "label"]).to_pandas()
        synthetic = select_synthetic(pool, counts, tc.mix.seed)
        labels = np.concatenate([labels, pool.set_index("image_id").loc[synthetic, "label"].to_numpy(np.int64)])
    repeats = balanced_repeats(labels, tc.seed) if tc.sampling == "balanced" else np.ones(len(labels), np.int64)
    if tc.tone_oversampling:  # real labelled rows only: synthetic rows keep their class-level repeats
        real = len(partition.labelled)
        tones = labelled_rows["tone"].to_numpy(object)
        repeats[:real] *= tone_repeats(labels[:real], tones, tc.seed)
    return TrainingInputs(
        partition.labelled,
        synthetic,
        partition.unlabelled,
        split_ids(splits, "val"),
        labels,
        counts,
        repeats,
        provenance,
    )


def _generator_training_ids(run_dir: Path) -> tuple[list[str], str, dict[str, Any] | None]:
    """The ids the run's generator trained on, its id (``generator/training_ids.json`` and its card) and, for a
    semi-supervised generator, its pool record (``generator/pool_ids.json``; None otherwise).

    Raises:
        SkinsynthError: no generator, or one written before it recorded its ids (the check must be exact).
    """
    run = layout(run_dir)
    try:
        ids = json.loads(run.generator_training_ids.read_text())
        generator = json.loads(run.generator_card.read_text())["generator_id"]
    except (OSError, ValueError, KeyError):
        raise SkinsynthError(
            f"train.mix needs the generator's training image ids ({run.generator_training_ids}) to check that its "
            "labels are this run's: retrain the generator ('skinsynth generate train', then 'skinsynth generate "
            "sample'), or set train.mix.ratio=0"
        ) from None
    return list(ids), generator, read_generator_pool(run_dir)


def training_datasets(run_dir: Path, inputs: TrainingInputs, tc: TrainConfig) -> dict[str, Any]:
    """The Ray Datasets of a training run: labelled (real + synthetic) train rows, validation rows and, for SSL, the
    unlabelled pool, from the prepared and synthetic shards.

    The unlabelled pool is read without its ``label`` column, so no worker can see the labels SSL must not use.
    With ``train.cache_rows`` every set is read and filtered once and held in Ray's object store (compressed PNGs:
    about 35 kB an image at 128 px) instead of re-reading every shard each epoch; on a small machine that re-read
    competes with the model for the same cores. Without it, Ray Data streams the shards every epoch in a new file
    order. Either way the training loop's seeded, per-epoch shuffle buffer varies the batches from epoch to epoch.
    Class-balanced sampling's copies (``train.sampling``) are in the train set, shuffled once with a seed so the
    copies of one rare image spread over the epoch.
    """
    from skinsynth.core.shards import TRAIN_COLUMNS, cached_dataset, repeat_rows, shard_dataset

    # the estimated tone: validation reports the worst tone group's sensitivity
    val_columns = [*TRAIN_COLUMNS, "tone"]

    repeated = inputs.repeated_ids()
    if tc.cache_rows:
        # real and synthetic rows in one shuffled set: the synthetic ones are spread over the epoch, not at its end
        rows = {"data": inputs.labelled, "synthetic": inputs.synthetic}
        datasets = {
            "train": cached_dataset(run_dir, rows, shuffle_seed=tc.seed, repeats=repeated),
            "val": cached_dataset(run_dir, inputs.val, val_columns),
        }
        if tc.ssl.method != "none":
            pool = cached_dataset(run_dir, inputs.unlabelled, ["image_id", "image"], shuffle_seed=tc.seed + 1)
            datasets["unlabelled"] = pool
        return datasets
    train = shard_dataset(run_dir, inputs.labelled, shuffle_seed=tc.seed)
    if inputs.synthetic:
        train = train.union(shard_dataset(run_dir, inputs.synthetic, shuffle_seed=tc.seed, stage="synthetic"))
    if repeated:
        train = train.map_batches(repeat_rows, batch_format="pandas", fn_kwargs={"repeats": repeated})
        train = train.random_shuffle(seed=tc.seed)
    datasets = {"train": train, "val": shard_dataset(run_dir, inputs.val, val_columns)}
    if tc.ssl.method != "none":
        datasets["unlabelled"] = shard_dataset(run_dir, inputs.unlabelled, ["image_id", "image"], tc.seed + 1)
    return datasets


def model_identity(tc: TrainConfig, run_dir: Path, extra_inputs: dict[str, str | None] | None = None) -> StageIdentity:
    """A classifier's identity: its settings (bar its folder name), the prepared set's identity, and the synthetic
    set's when it mixes synthetic images in. ``epochs`` and ``early_stopping_patience`` only lengthen a run."""
    settings = {k: v for k, v in changed_settings(tc).items() if k != "name"}
    inputs = {"data": current_identity(run_dir, "data")}
    if tc.mix.ratio > 0:  # a re-sampled synthetic set is different data
        inputs["synthetic"] = current_identity(run_dir, "synthetic")
    inputs.update(extra_inputs or {})
    return StageIdentity(f"model:{tc.name}", settings, inputs, config_to_dict(tc), RUN_LENGTH_KEYS)


def training_run_name(tc: TrainConfig, run_dir: Path) -> str:
    """Ray Train run name: the model name plus its identity without the run's length (see
    :meth:`~skinsynth.core.rundir.StageIdentity.run_name`): the same command, or one with more epochs, resumes; a
    change of settings or of any input upstream (a re-split data set) starts a fresh run."""
    return model_identity(tc, run_dir).run_name(tc.name)


@dataclass
class TrainResult:
    """Where the trained model went and how training went."""

    model_dir: Path | None
    best_val_balanced_accuracy: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]]


def train_classifier(
    cfg: ExperimentConfig,
    *,
    progress: Progress = print,
    storage: tuple[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    export: bool = True,
) -> TrainResult:
    """Train ``cfg.train`` on ``RUN_DIR/data`` and write the best model to ``RUN_DIR/models/<name>/``.

    Args:
        cfg: the experiment (``run.out`` must hold a prepared ``data/``; and ``synthetic/`` when mixing).
        progress: receives one-line messages.
        storage: ``(storage_path, storage_filesystem)`` where Ray Train keeps the run (default ``RUN_DIR/ray_train``,
            on the run's URI for a remote run); a sweep gives each trial its own.
        callbacks: Ray Train callbacks (a sweep passes Tune's report callback).
        export: write the best model to ``RUN_DIR/models/<name>/`` (a sweep exports only its best trial).

    Returns:
        A :class:`TrainResult` (``model_dir`` is None when not exported).

    Raises:
        SkinsynthError: no prepared data, no labelled training image, or a GPU asked for that is not there.
    """
    import ray.train

    from skinsynth.core.ray import ensure_ray, quiet_ray_data, resolve_use_gpu
    from skinsynth.core.raytrain import fit_torch_run
    from skinsynth.core.storage import open_run_store

    store = open_run_store(cfg.run.out, cfg.run.cache_dir)
    run_dir = store.local.resolve()
    tc = cfg.train
    _check_train_config(tc)
    inputs = training_inputs(run_dir, tc)
    if not inputs.val:
        raise SkinsynthError(
            "training needs a validation split (model selection and early stopping use it); "
            "set data.split.val_fraction above 0 and prepare again"
        )
    if tc.ssl.method != "none" and not inputs.unlabelled:
        # every training image is labelled (label_fraction 1 in a label-budget grid): nothing for SSL to use
        progress(f"train: no unlabelled images: train.ssl.method={tc.ssl.method} has nothing to add; supervised only")
        tc = dataclasses.replace(tc, ssl=dataclasses.replace(tc.ssl, method="none"))
    unlabelled_batch = tc.batch_size * tc.ssl.unlabelled_ratio
    if tc.ssl.method != "none" and len(inputs.unlabelled) < unlabelled_batch:
        # a small pool (a demo, a tiny label budget) still trains: each step sees all of it (every worker reads the
        # whole pool, see below)
        unlabelled_batch = len(inputs.unlabelled)
        progress(
            f"train: the unlabelled pool ({len(inputs.unlabelled)} images) is smaller than batch_size x "
            f"unlabelled_ratio; unlabelled batches of {unlabelled_batch} instead"
        )
    card = json.loads(layout(run_dir).data_card.read_text())
    weights = class_weights(inputs.sampled_labels)
    labelled_counts = np.bincount(inputs.labels[: len(inputs.labelled)], minlength=len(CLASSES))
    ensure_ray(cfg.data.num_cpus)
    use_gpu = resolve_use_gpu(tc.use_gpu, "train.use_gpu")
    mix = f" + {len(inputs.synthetic)} synthetic" if inputs.synthetic else ""
    ssl = f", {tc.ssl.method} on {len(inputs.unlabelled)} unlabelled" if tc.ssl.method != "none" else ""
    progress(
        f"train: {tc.model} ({tc.pretrained} weights) on {len(inputs.labelled)} labelled{mix} images{ssl}, "
        f"{len(inputs.val)} validation, {tc.num_workers} worker(s), {'GPU' if use_gpu else 'CPU'}"
    )
    if tc.sampling == "balanced":
        per_class = np.bincount(inputs.sampled_labels, minlength=len(CLASSES))
        progress(
            f"train: class-balanced sampling: {int(inputs.repeats.sum())} rows per epoch ("
            + ", ".join(f"{code} {n}" for code, n in zip(CLASSES, per_class, strict=True) if n)
            + ")"
        )
    if tc.tone_oversampling:
        shown = int(inputs.repeats[: len(inputs.labelled)].sum())
        progress(
            f"train: tone-group oversampling within each class: {shown} showings of the {len(inputs.labelled)} "
            "labelled images per epoch"
        )
    quiet_ray_data()
    datasets = training_datasets(run_dir, inputs, tc)
    saved = fit_torch_run(
        train_loop_per_worker,
        {
            "train": config_to_dict(tc),
            "class_weights": weights.tolist(),
            "class_counts": labelled_counts.tolist(),
            "train_images": int(inputs.repeats.sum()),
            "unlabelled_batch_size": unlabelled_batch,
            "image_size": card["image_size"],
        },
        name=training_run_name(tc, run_dir),
        storage=storage or store.ray_storage(RAY_TRAIN_FOLDER),
        num_workers=tc.num_workers,
        use_gpu=use_gpu,
        torch_threads=tc.torch_threads,
        datasets=datasets,
        callbacks=callbacks,
        # the unlabelled pool is not split: its batches are drawn in lock-step with the labelled ones and abandoned
        # mid-pass at each epoch's end, which a split (a barrier across workers) does not allow; every worker reads
        # the whole pool in its own seeded order instead
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        worker_resources=tc.worker_resources,
    )
    state = saved["state"]
    model_dir = None
    if export:
        extra = {
            "labelled_images": len(inputs.labelled),
            "unlabelled_images": len(inputs.unlabelled),
            "synthetic_per_class": inputs.synthetic_per_class,
            "synthetic_provenance": inputs.synthetic_provenance,
        }
        # the identity of the settings as asked for (what `skinsynth run` compares), even where SSL had no pool
        identity = model_identity(cfg.train, run_dir)
        pool = (inputs.unlabelled, inputs.labelled)
        model_dir = export_model(run_dir, tc, state, card, extra, progress=progress, identity=identity, pool=pool)
        progress(
            f"train: best validation balanced accuracy {state['best_score']:.3f} at epoch {state['best_epoch'] + 1}; "
            f"model written to {model_dir}"
        )
    return TrainResult(model_dir, state["best_score"], state["best_epoch"], state["epoch"], state["history"])


def _check_train_config(tc: TrainConfig) -> None:
    """Settings that cannot work together, refused before any data is read."""
    if tc.freeze_blocks and tc.pretrained == "none":
        raise SkinsynthError("train.freeze_blocks keeps layers at their pretrained values: it needs train.pretrained")
    if tc.tone_min_malignant < 1:
        raise SkinsynthError(f"train.tone_min_malignant must be >= 1, got {tc.tone_min_malignant}")
    if not 0.0 <= tc.ema_decay < 1.0:
        raise SkinsynthError(f"train.ema_decay must be in [0, 1) (0 = no weight averaging), got {tc.ema_decay}")
    if tc.mixup_alpha < 0 or tc.cutmix_alpha < 0 or not 0.0 <= tc.mixup_prob <= 1.0:
        raise SkinsynthError(
            "train.mixup_alpha and train.cutmix_alpha must be >= 0 (0 = off) and train.mixup_prob in [0, 1]"
        )
    if tc.imbalance == "focal" and (tc.mixup_alpha > 0 or tc.cutmix_alpha > 0):
        raise SkinsynthError(
            "train.imbalance 'focal' takes class indices, which mixup/CutMix replace with mixed soft labels: "
            "use weighted_loss (or none) with train.mixup_alpha / train.cutmix_alpha"
        )
    if tc.ssl.method != "none":
        if not 0.0 < tc.ssl.threshold <= 1.0:
            raise SkinsynthError(f"train.ssl.threshold must be in (0, 1], got {tc.ssl.threshold}")
        if tc.ssl.unlabelled_ratio < 1:
            raise SkinsynthError(f"train.ssl.unlabelled_ratio must be >= 1, got {tc.ssl.unlabelled_ratio}")
        if tc.ssl.unlabelled_weight < 0:
            raise SkinsynthError(f"train.ssl.unlabelled_weight must be >= 0, got {tc.ssl.unlabelled_weight}")


def export_model(
    run_dir: Path,
    tc: TrainConfig,
    state: dict[str, Any],
    data_card: dict[str, Any],
    extra: dict[str, Any] | None = None,
    name: str | None = None,
    progress: Progress = print,
    identity: StageIdentity | None = None,
    pool: tuple[list[str], list[str]] | None = None,
) -> Path:
    """Write the best weights, the training config, the history and the stage manifest to ``RUN_DIR/models/<name>/``
    atomically (``name`` defaults to ``train.name``; ``extra`` joins ``training.json``; ``identity`` defaults to
    :func:`model_identity` of ``tc``). ``pool``: the run's (unlabelled pool, labelled) ids; a non-empty pool gets the
    exported model's pseudo-labels (``pool_labels.parquet``, :mod:`skinsynth.classify.pool_labels`) in the same
    atomic write, so a model folder never lacks the labels a semi-supervised generator reads."""
    name = name or tc.name
    model_dir = layout(run_dir).model(name)
    tmp = model_dir.with_name(f".{name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    weights, adjustment = state["best_model"], None
    if tc.logit_adjustment:
        weights, adjustment = logit_adjusted_weights(tc, state)
        progress(
            f"export: logit adjustment tau {adjustment['tau']:+.1f} (chosen on validation): balanced accuracy "
            f"{adjustment['val_balanced_accuracy_before']:.3f} -> {adjustment['val_balanced_accuracy_after']:.3f}"
        )
    torch.save(weights, tmp / MODEL_WEIGHTS)
    info = {
        "model": tc.model,
        "classes": list(CLASSES),
        "image_size": data_card["image_size"],
        "train_config": config_to_dict(tc),
        "best_epoch": state["best_epoch"] + 1,
        "best_val_balanced_accuracy": state["best_score"],
        "history": state["history"],
        "data_source": data_card["source"],
        **({"logit_adjustment": adjustment} if adjustment else {}),
        **(extra or {}),
    }
    (tmp / MODEL_TRAINING).write_text(json.dumps(info, indent=2, default=float))
    identity = identity or model_identity(dataclasses.replace(tc, name=name), run_dir)
    if pool and pool[0]:
        from skinsynth.classify.pool_labels import write_pool_labels
        from skinsynth.core.shards import load_split_table

        pool_ids, labelled_ids = pool
        splits = load_split_table(run_dir)
        write_pool_labels(tmp, name, identity.identity, pool_ids, labelled_ids, splits, run_dir, progress=progress)
    write_manifest(tmp, identity, best_epoch=state["best_epoch"] + 1)
    replace_dir(tmp, model_dir)
    return model_dir


def logit_adjusted_weights(tc: TrainConfig, state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The best weights with post-hoc logit adjustment folded into the classifier head's bias.

    Adding ``-tau * log(prior)`` to the bias is exactly the adjustment of
    :func:`skinsynth.classify.metrics.choose_logit_adjustment` (Menon et al. 2021), so every later consumer
    (evaluation, test-time augmentation, the Serve endpoint) uses the adjusted model without knowing about it.
    ``tau`` is chosen on the validation predictions of the best epoch, kept in the checkpoint's state.

    Returns:
        The weights and what ``training.json`` records about the adjustment (tau, prior, validation before/after).
    """
    from skinsynth.classify import metrics as M
    from skinsynth.classify.models import create_classifier

    best_val = state.get("best_val")
    if best_val is None:
        raise SkinsynthError(
            "train.logit_adjustment chooses its scale on the best epoch's validation predictions, which this "
            "checkpoint (written by an older skinsynth) lacks: set train.logit_adjustment false to export it as "
            "trained, or train into a new run.out"
        )
    prior = M.smoothed_class_prior(best_val["class_counts"])
    tau, before, after = M.choose_logit_adjustment(best_val["probs"].numpy(), best_val["labels"].numpy(), prior)
    offsets = M.logit_adjustment_offsets(prior, tau)
    model = create_classifier(tc.model, num_classes=len(CLASSES), pretrained="none")
    head = model.get_classifier()
    bias_key = next(f"{name}.bias" for name, module in model.named_modules() if module is head)
    weights = dict(state["best_model"])
    if weights.get(bias_key) is None:
        raise SkinsynthError(f"train.logit_adjustment needs a classifier head with a bias; {tc.model} has none")
    weights[bias_key] = weights[bias_key] + torch.from_numpy(offsets).to(weights[bias_key].dtype)
    adjustment = {
        "method": "post-hoc logit adjustment (Menon et al. 2021), tau chosen on validation balanced accuracy",
        "tau": tau,
        "class_prior": prior.tolist(),
        "logit_offsets": offsets.tolist(),
        "head_bias": bias_key,
        "val_balanced_accuracy_before": before,
        "val_balanced_accuracy_after": after,
    }
    return weights, adjustment
