"""Generator training with Ray Train: DDPM on the real train split, classifier-free guidance, EMA weights.

The loop (``generator_train_loop``) is the DDPM objective of Ho et al. 2020 - noise an image to a random level,
predict the noise (or the velocity, ``generator.prediction``), mean squared error (weighted by min-SNR-gamma with
``generator.loss_weighting``; see ``skinsynth.generate.diffusion``) - with three additions: label dropout (a share
of images get the null token, so one network is both the conditional and the unconditional model of
classifier-free guidance, Ho & Salimans 2022), an exponential moving average of the weights (what sampling uses;
Song & Ermon 2020 found it essential for sample quality), and gradient accumulation for large effective batches
on small devices. DDP across ``generator.num_workers`` workers, bf16/fp16 autocast on GPU, a checkpoint through
``ray.train.report`` every ``checkpoint_every`` steps; re-running the same command resumes from the last one (the
driver, checkpoint save/restore and optimiser step are those of the classifier too: ``skinsynth.core.raytrain``).

The generator never trains on synthetic rows (model-collapse guard, Shumailov et al. 2024, "AI models collapse when
trained on recursively generated data"): ``train_generator`` refuses with a clear error if any input row is
synthetic.

Output, ``RUN_DIR/generator/``: ``unet/`` (EMA weights), ``scheduler/`` (the DDPM noise schedule),
``conditioning.json``, ``grid.png`` (per-class samples), ``grids/`` (grids during training), ``training.json``
and ``generator_card.json``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from skinsynth.config import ExperimentConfig, GeneratorConfig, changed_settings, config_to_dict
from skinsynth.core.console import worker_progress
from skinsynth.core.fid import INCEPTION_INSTALL, InceptionFeatures, frechet_distance, inception_weights_path
from skinsynth.core.rundir import (
    GENERATOR_CARD,
    GENERATOR_GRID,
    GENERATOR_POOL_IDS,
    GENERATOR_TRAINING_IDS,
    RAY_TRAIN_FOLDER,
    StageIdentity,
    current_identity,
    ids_hash,
    layout,
    replace_dir,
    write_manifest,
)
from skinsynth.core.shards import decode_png_arrays, load_split_table, read_pool_labels, read_rows, split_ids
from skinsynth.errors import SkinsynthError
from skinsynth.generate.diffusion import (
    SCHEDULER_DIR,
    check_objective,
    diffusion_loss,
    from_uint8_images,
    generate_images,
    to_generator_side,
    training_noise_scheduler,
)
from skinsynth.generate.model import (
    UNET_DIR,
    Conditioning,
    create_generator,
    generator_side,
    save_generator,
)

Progress = Callable[[str], None]
GENERATOR_COLUMNS = ["image_id", "image", "label", "tone"]
GRID_PER_CLASS = 6
GRID_SAMPLER = {"sampler": "ddim", "steps": 25, "guidance": 2.0}  # the grids' sampler, and the checkpoint choice's
GRIDS_DIR = "grids"  # the grids sampled during training, in the Ray Train run's folder and then generator/
HISTORY_FILE = "training.json"  # generator/training.json: the loss history and step count
OBJECTIVES = {
    "epsilon": "DDPM noise prediction (Ho et al. 2020)",
    "v_prediction": "DDPM velocity prediction (Salimans & Ho 2022)",
    "edm": "EDM preconditioning and log-normal noise levels (Karras et al. 2022)",
}


class GeneratorCollate:
    """Ray Data batch -> (images in [-1, 1], joint conditioning labels), with random flips and quarter turns.

    Dermoscopy has no up, down, left or right, so the eight dihedral transforms are exact, label-preserving
    augmentations that multiply a small training set without inventing pixels.
    """

    def __init__(self, conditioning: Conditioning, augment: bool = True):
        self.conditioning = conditioning
        self.augment = augment

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        from skinsynth.core.shards import decode_pngs

        images = to_generator_side(from_uint8_images(decode_pngs(batch["image"])), self.conditioning.image_size)
        if self.augment:
            images = torch.stack([dihedral(img) for img in images])
        c = self.conditioning
        tones = [c.tone_index(tone) for tone in batch["tone"]] if c.tones else [None] * len(images)
        # a negative label marks a pool image learnt unconditionally (semi-supervised generator): the null token
        labels = [c.null_index if int(y) < 0 else c.index(int(y), tone) for y, tone in zip(batch["label"], tones)]
        return images, torch.as_tensor(labels, dtype=torch.long)


def dihedral(img: torch.Tensor) -> torch.Tensor:
    img = torch.rot90(img, int(torch.randint(0, 4, ())), dims=(1, 2))
    return torch.flip(img, dims=(2,)) if torch.rand(()) < 0.5 else img


def sample_grid(
    unet: torch.nn.Module,
    conditioning: Conditioning,
    scheduler_config: Any,
    per_class: int = GRID_PER_CLASS,
    seed: int = 0,
) -> np.ndarray:
    """One row of ``per_class`` DDIM samples per class (fixed seeds, so grids over training are comparable),
    tiled into an RGB image with the class code at the start of each row; at the side samples are delivered at."""
    size = conditioning.sample_size
    labels = torch.arange(len(conditioning.classes)).repeat_interleave(per_class)
    images = generate_images(
        unet,
        scheduler_config,
        GRID_SAMPLER["sampler"],
        [conditioning.index(int(lab)) for lab in labels],
        [seed + i for i in range(len(labels))],
        image_size=conditioning.image_size,
        output_size=size,
        null_label=conditioning.null_index,
        steps=GRID_SAMPLER["steps"],
        guidance=GRID_SAMPLER["guidance"],
    )
    label_w = max(48, size)
    rows = []
    for c, dx in enumerate(conditioning.classes):
        strip = np.full((size, label_w, 3), 255, np.uint8)
        cv2.putText(strip, dx, (2, size // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([strip, *images[c * per_class : (c + 1) * per_class]], axis=1))
    return np.concatenate(rows, axis=0)


def save_png(rgb: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def selection_reference(gc: GeneratorConfig, run_dir: Path) -> dict[str, Any] | None:
    """The real side of the checkpoint choice (``generator.select_every``; None when off): a seeded subset of
    ``select_images`` validation images, their FID Inception features, and their labels and tones, which the
    checkpoints' samples take so that both sides have the same class (and tone) mix.

    Validation images, because FID against the training images would reward a generator for copying them, and test
    images choose nothing.

    Raises:
        SkinsynthError: the FID Inception weights are not installed, or the split has under 2 validation images.
    """
    if not gc.select_every:
        return None
    if gc.select_every < 0 or gc.select_images < 2:
        raise SkinsynthError(
            f"generator.select_every must be 0 (off) or a positive number of steps, and generator.select_images at "
            f"least 2 (FID needs two images a side); got {gc.select_every} and {gc.select_images}"
        )
    weights = inception_weights_path()
    if weights is None:
        raise SkinsynthError(
            f"generator.select_every chooses the exported weights by FID, which needs the FID Inception weights: "
            f"{INCEPTION_INSTALL} (or set generator.select_every=0 to export the last step's weights)"
        )
    val_ids = split_ids(load_split_table(run_dir), "val")
    if len(val_ids) < 2:
        raise SkinsynthError(
            f"generator.select_every needs at least 2 validation images, the split has {len(val_ids)}"
        )
    rng = np.random.default_rng(gc.seed)
    chosen = sorted(rng.choice(val_ids, size=min(gc.select_images, len(val_ids)), replace=False).tolist())
    rows = read_rows(run_dir, chosen, columns=["image", "label", "tone"])
    features = InceptionFeatures(weights)(np.stack(decode_png_arrays(rows["image"])))
    return {
        "features": features.numpy(),
        "labels": rows["label"].astype(int).tolist(),
        "tones": rows["tone"].tolist(),
        "image_ids": rows["image_id"].tolist(),
        "n": len(chosen),
    }


def selection_fid(unet, conditioning: Conditioning, scheduler_config, reference: dict, extractor) -> float:
    """FID at matched n between ``unet``'s samples (fixed seeds, the reference's labels and tones, the grids' sampler)
    and the reference's validation images: the figure the exported checkpoint is chosen on."""
    labels = [
        conditioning.index(int(y), conditioning.tone_index(tone) if conditioning.tones else None)
        for y, tone in zip(reference["labels"], reference["tones"])
    ]
    images = generate_images(
        unet,
        scheduler_config,
        GRID_SAMPLER["sampler"],
        labels,
        list(range(len(labels))),
        image_size=conditioning.image_size,
        output_size=conditioning.sample_size,
        null_label=conditioning.null_index,
        steps=GRID_SAMPLER["steps"],
        guidance=GRID_SAMPLER["guidance"],
    )
    return frechet_distance(torch.as_tensor(reference["features"]), extractor(images))


def generator_train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (see the module docstring). ``config`` holds plain values only."""
    import ray.train
    import ray.train.torch
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from skinsynth.core import raytrain
    from skinsynth.core.shards import SHUFFLE_BUFFER_ROWS, collated_batches

    gc = GeneratorConfig(**config["generator"])
    rank, world = raytrain.start_worker(config, gc.seed)
    unet, conditioning = create_generator(gc, config["image_size"], config["output_size"])
    ema = EMAModel(unet.parameters(), decay=gc.ema_decay, use_ema_warmup=True, power=3 / 4)
    model = ray.train.torch.prepare_model(unet)
    device = ray.train.torch.get_device()
    ema.to(device)
    amp_dtype = raytrain.mixed_precision_dtype(
        gc.amp, device, cpu_bf16=gc.cpu_amp, announce="generate train" if rank == 0 else None
    )
    scaler = raytrain.grad_scaler(amp_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=gc.lr, weight_decay=0.0)
    lr_schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=gc.warmup_steps)
    noise_scheduler = training_noise_scheduler(gc.num_train_timesteps, gc.prediction)

    # what a checkpoint saves and a resumed run restores, by the keys checkpoints have always used
    stateful = {"model": model, "ema": ema, "optimizer": optimizer, "lr_schedule": lr_schedule, "scaler": scaler}
    state: dict[str, Any] | None = raytrain.restore_training_state(stateful, raytrain.load_train_checkpoint())
    if state is None:
        state = {"step": 0, "history": [], "seconds": 0.0}
    else:
        ema.to(device)  # the checkpoint's averages were loaded onto the CPU
        if rank == 0:
            worker_progress(f"generate train: resuming from the checkpoint of step {state['step']}")

    reference = config.get("selection")
    extractor = None
    if reference and rank == 0:
        weights = inception_weights_path()  # on this worker's node, which need not be the driver's
        if weights is None:
            raise SkinsynthError(
                f"generator.select_every needs the FID Inception weights on every node: {INCEPTION_INSTALL}"
            )
        extractor = InceptionFeatures(weights)

    collate = GeneratorCollate(conditioning)
    shard = ray.train.get_dataset_shard("train")
    grid_dir = Path(config["grid_dir"])
    window_loss, window_images, window_start = 0.0, 0, time.perf_counter()
    micro = 0
    epoch = 0
    while state["step"] < gc.train_steps:
        batches = collated_batches(
            shard,
            collate,
            device,  # on CPU, decode in this thread between steps (see collated_batches)
            batch_size=gc.batch_size,
            local_shuffle_buffer_size=max(gc.batch_size * 8, SHUFFLE_BUFFER_ROWS),
            local_shuffle_seed=gc.seed + 1000 * rank + epoch,
            drop_last=True,
        )
        epoch += 1
        steps_before = state["step"]
        for x0, labels in batches:
            model.train()
            x0, labels = x0.to(device), labels.to(device)
            loss = diffusion_loss(model, noise_scheduler, x0, labels, conditioning.null_index, gc, amp_dtype)
            scaler.scale(loss / gc.grad_accum).backward()
            window_loss += float(loss.detach()) * x0.shape[0]
            window_images += x0.shape[0]
            micro += 1
            if micro % gc.grad_accum:
                continue
            raytrain.optimizer_step(model, optimizer, scaler, lr_schedule)
            ema.step(raytrain.unwrap_model(model).parameters())
            state["step"] += 1
            step = state["step"]
            last = step >= gc.train_steps
            if step % gc.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                row = {
                    "step": step,
                    "loss": window_loss / max(window_images, 1),
                    "images_per_s": window_images * world / max(elapsed, 1e-9),
                    "lr": lr_schedule.get_last_lr()[0],
                }
                state["history"].append(row)
                state["seconds"] += elapsed
                if rank == 0:
                    worker_progress(
                        f"generate train: step {step}/{gc.train_steps}  loss {row['loss']:.4f}  "
                        f"{row['images_per_s']:.1f} img/s  lr {row['lr']:.1e}",
                        step,
                        gc.train_steps,
                        "steps",
                    )
                window_loss, window_images, window_start = 0.0, 0, time.perf_counter()
            paused = time.perf_counter()  # grids and checkpoints are not training time
            if rank == 0 and gc.grid_every and step % gc.grid_every == 0 and not last:
                grid = grid_dir / f"step-{step:07d}.png"
                _grid_with_ema(raytrain.unwrap_model(model), ema, conditioning, noise_scheduler.config, grid)
            if extractor is not None and (step % gc.select_every == 0 or last):
                _select(
                    raytrain.unwrap_model(model),
                    ema,
                    conditioning,
                    noise_scheduler.config,
                    reference,
                    extractor,
                    state,
                )
            if step % gc.checkpoint_every == 0 or last:
                # the checkpoint's step, not that of the last progress line (which may be earlier)
                metrics = {**(state["history"][-1] if state["history"] else {}), "step": step}
                raytrain.save_training_state(stateful, state, metrics, rank)
            window_start += time.perf_counter() - paused
            if last:
                break
        if state["step"] == steps_before and micro == 0:
            raise RuntimeError("a pass over the training shard gave no full batch; lower generator.batch_size")


def _select(unet, ema, conditioning, scheduler_config, reference, extractor, state: dict[str, Any]) -> None:
    """Score the EMA weights of this step (:func:`selection_fid`) into ``state["selection"]``, and keep a copy of
    them as ``state["best"]`` when their FID is the lowest so far (checkpoints carry both, so a resumed run goes on
    choosing among every step it has scored)."""
    step = state["step"]
    with ema_weights(unet, ema):
        fid = selection_fid(unet, conditioning, scheduler_config, reference, extractor)
    state.setdefault("selection", []).append({"step": step, "fid": fid})
    best = state.get("best")
    if best is None or fid < best["fid"]:
        best = state["best"] = {"step": step, "fid": fid, "ema": _cpu_copy(ema.state_dict())}
    worker_progress(
        f"generate train: step {step}: FID {fid:.1f} against {reference['n']} validation images; "
        f"best {best['fid']:.1f} at step {best['step']}"
    )


def _cpu_copy(ema_state: dict[str, Any]) -> dict[str, Any]:
    """A copy of an ``EMAModel.state_dict()`` that later steps cannot change (its ``shadow_params`` are the live
    averages, updated in place) and that holds no accelerator memory."""
    return {
        key: [t.detach().to("cpu", copy=True) for t in value] if key == "shadow_params" else copy.deepcopy(value)
        for key, value in ema_state.items()
    }


@contextlib.contextmanager
def ema_weights(unet, ema):
    """``unet`` in eval mode with the EMA weights (what sampling uses) inside the block; its training weights after."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    unet.eval()
    try:
        yield unet
    finally:
        ema.restore(unet.parameters())


def _grid_with_ema(unet, ema, conditioning, scheduler_config, path: Path) -> None:
    with ema_weights(unet, ema):
        save_png(sample_grid(unet, conditioning, scheduler_config), path)


def check_no_synthetic_rows(run_dir: Path, image_ids: list[str]) -> None:
    """Model-collapse guard: refuse if any training row is marked synthetic (or comes from a synthetic source)."""
    rows = read_rows(run_dir, image_ids, columns=["image_id", "synthetic", "source"])
    bad = rows[rows["synthetic"] | (rows["source"] == "synthetic")]
    if len(bad):
        examples = ", ".join(bad["image_id"].head(3))
        raise SkinsynthError(
            f"generator training refuses synthetic images (model-collapse guard): {len(bad)} of {len(rows)} "
            f"training rows are marked synthetic (e.g. {examples}); train the generator on real images only"
        )


@dataclass
class PoolInputs:
    """What a semi-supervised generator learns from its classifier's unlabelled pool (``generator.pseudo_labels_from``;
    You et al. 2023): pool images with confident pseudo-labels, and those learnt unconditionally."""

    model: str  # the classifier under models/ whose pool labels these are
    model_identity: str  # its stage identity when it labelled the pool
    threshold: float
    pseudo_labels: dict[str, int]  # image id -> pseudo-label (class index), confidence >= threshold
    unconditional: list[str]  # the other pool images (empty with unconfident_unconditional off)
    classifier_labelled_ids: list[str]  # the labelled ids the classifier trained on: its labels stand behind these

    @property
    def labels(self) -> dict[str, int]:
        """Image id -> training label for every pool image: the pseudo-label, or -1 (the null token)."""
        return {**dict.fromkeys(self.unconditional, -1), **self.pseudo_labels}

    def record(self) -> dict[str, Any]:
        """``generator/pool_ids.json``: what the provenance check of a synthetic mix reads."""
        return {
            "model": self.model,
            "model_identity": self.model_identity,
            "threshold": self.threshold,
            "classifier_labelled_ids": sorted(self.classifier_labelled_ids),
            "pseudo_labelled": sorted(self.pseudo_labels),
            "unconditional": sorted(self.unconditional),
        }


def pool_inputs(gc: GeneratorConfig, run_dir: Path, train_ids: list[str]) -> PoolInputs | None:
    """The pool images a semi-supervised generator adds to ``train_ids`` (None: ``pseudo_labels_from`` is unset).

    Raises:
        SkinsynthError: a threshold outside (0, 1], no pool labels for the named classifier, or pool images that are
            not training images of this run's split.
    """
    if not gc.pseudo_labels_from:
        return None
    if not 0.0 < gc.pseudo_label_threshold <= 1.0:
        raise SkinsynthError(f"generator.pseudo_label_threshold must be in (0, 1], got {gc.pseudo_label_threshold}")
    name = gc.pseudo_labels_from
    path = layout(run_dir).model_pool_labels(name)
    if not path.is_file():
        raise SkinsynthError(
            f"generator.pseudo_labels_from is '{name}' but {path} does not exist: a classifier writes its pool's "
            f"pseudo-labels when its run has an unlabelled pool. Train it first, e.g. 'skinsynth train --set "
            f"train.name={name} --set train.ssl.method=fixmatch' on data prepared with data.split.label_fraction < 1"
        )
    table, record = read_pool_labels(path)
    split_of = load_split_table(run_dir).set_index("image_id")["split"]
    outside = [i for i in table["image_id"] if split_of.get(i) != "train"]
    if outside:
        raise SkinsynthError(
            f"{path} labels {len(outside)} images that are not in this run's train split (e.g. {outside[0]}): the "
            "split has changed since the classifier ran; train it again"
        )
    table = table[~table["image_id"].isin(set(train_ids))]  # a pool image this generator knows the label of
    confident = table["confidence"] >= gc.pseudo_label_threshold
    return PoolInputs(
        model=name,
        model_identity=str(record.get("model_identity")),
        threshold=gc.pseudo_label_threshold,
        pseudo_labels=dict(zip(table.loc[confident, "image_id"], table.loc[confident, "label"].astype(int))),
        unconditional=sorted(table.loc[~confident, "image_id"]) if gc.unconfident_unconditional else [],
        classifier_labelled_ids=list(record.get("labelled_ids", [])),
    )


def generator_dataset(run_dir: Path, train_ids: list[str], pool: PoolInputs, seed: int, block_rows: int = 1024):
    """The labelled images with their labels and the pool images with their pseudo-labels (or -1), as one shuffled
    Ray Dataset held in the object store. The pool is read without its label column, so the true labels of the
    pool never reach a training worker."""
    import ray.data

    labelled = read_rows(run_dir, train_ids, columns=GENERATOR_COLUMNS)
    labels = pool.labels
    unlabelled = read_rows(run_dir, sorted(labels), columns=["image_id", "image", "tone"])
    unlabelled["label"] = unlabelled["image_id"].map(labels).astype(labelled["label"].dtype)
    rows = pd.concat([labelled[GENERATOR_COLUMNS], unlabelled[GENERATOR_COLUMNS]], ignore_index=True)
    rows = rows.iloc[np.random.default_rng(seed).permutation(len(rows))].reset_index(drop=True)
    return ray.data.from_pandas([rows.iloc[i : i + block_rows] for i in range(0, len(rows), block_rows)])


# settings that only say how a run reports or reads its data: they change no weight
REPORTING_KEYS = frozenset({"checkpoint_every", "grid_every", "log_every", "cache_rows", "enabled"})


def generator_identity(cfg: ExperimentConfig, run_dir: Path, train_ids: list[str] | None = None) -> StageIdentity:
    """The generator's identity: its settings, the prepared set's identity and the ids of the images it learns from
    (the labelled train split). ``train_steps`` only lengthens a run: more steps resume the same Ray Train run."""
    if train_ids is None:
        train_ids = split_ids(load_split_table(run_dir), "train", labelled_only=True)
    settings = {k: v for k, v in changed_settings(cfg.generator).items() if k not in REPORTING_KEYS}
    inputs = {"data": current_identity(run_dir, "data"), "train_ids": ids_hash(train_ids)}
    if cfg.generator.pseudo_labels_from:  # a re-trained classifier gives other pseudo-labels: another generator
        stage = f"model:{cfg.generator.pseudo_labels_from}"
        inputs[stage] = current_identity(run_dir, stage)
    return StageIdentity("generator", settings, inputs, config_to_dict(cfg.generator), frozenset({"train_steps"}))


@dataclass
class GeneratorResult:
    """Where the generator went and how training went."""

    generator_dir: Path
    generator_id: str
    steps: int
    seconds: float
    history: list[dict[str, Any]]


def train_generator(cfg: ExperimentConfig, *, progress: Progress = print) -> GeneratorResult:
    """Train ``cfg.generator`` on the real train split of ``RUN_DIR/data`` and write ``RUN_DIR/generator/``.

    Raises:
        SkinsynthError: no prepared data, synthetic rows among the inputs, an image size the preset cannot take,
            or a GPU asked for that is not there.
    """
    from skinsynth.core.ray import ensure_ray, quiet_ray_data, resolve_use_gpu
    from skinsynth.core.raytrain import fit_torch_run
    from skinsynth.core.shards import cached_dataset, shard_dataset
    from skinsynth.core.storage import open_run_store

    store = open_run_store(cfg.run.out, cfg.run.cache_dir)
    run_dir = store.local.resolve()
    gc = cfg.generator
    # labelled images only: with a label budget (data.split.label_fraction < 1) the hidden labels of the SSL pool
    # must not reach a class-conditional generator either
    train_ids = split_ids(load_split_table(run_dir), "train", labelled_only=True)
    if not train_ids:
        raise SkinsynthError(f"no labelled training images in {layout(run_dir).data}")
    pool = pool_inputs(gc, run_dir, train_ids)
    pool_ids = sorted(pool.labels) if pool else []
    check_no_synthetic_rows(run_dir, train_ids + pool_ids)
    if len(train_ids) + len(pool_ids) < gc.batch_size * gc.num_workers:
        raise SkinsynthError(
            f"{len(train_ids) + len(pool_ids)} training images cannot fill one batch of {gc.batch_size} per worker "
            f"x {gc.num_workers} worker(s); lower generator.batch_size"
        )
    card = json.loads(layout(run_dir).data_card.read_text())
    data_size = int(card["image_size"])
    image_size = generator_side(gc, data_size)
    check_objective(gc.prediction, gc.loss_weighting)
    reference = selection_reference(gc, run_dir)
    ensure_ray(cfg.data.num_cpus)
    use_gpu = resolve_use_gpu(gc.use_gpu, "generator.use_gpu")
    if pool:
        progress(
            f"generate train: semi-supervised: {len(pool.pseudo_labels)} pool images pseudo-labelled by "
            f"'{pool.model}' (confidence >= {pool.threshold:g}) and {len(pool.unconditional)} learnt unconditionally, "
            f"besides {len(train_ids)} labelled"
        )
    progress(
        f"generate train: '{gc.size}' UNet at {image_size} px"
        + (f" (samples resized up to the data's {data_size} px)" if image_size != data_size else "")
        + f" on {len(train_ids) + len(pool_ids)} real training "
        f"images, {gc.train_steps} steps of {gc.batch_size * gc.grad_accum * gc.num_workers} images, "
        f"{gc.num_workers} worker(s), {'GPU' if use_gpu else 'CPU'}"
    )
    identity = generator_identity(cfg, run_dir, train_ids)
    name = identity.run_name("generator")
    storage = layout(run_dir).ray_train  # the grids (checkpoints go to the run's storage, on its URI when remote)
    quiet_ray_data()
    t0 = time.perf_counter()
    if pool:
        # the pool's labels are not in the shards: the rows are put together on the driver (cache_rows implied)
        train_images = generator_dataset(run_dir, train_ids, pool, gc.seed)
    elif gc.cache_rows:
        # a pass over a small training set is a few seconds of compute; re-reading and filtering every shard for it
        # costs seconds of Ray Data start-up on 2 cores (the demo's 60 steps of 16 over 88 images are 11 passes)
        train_images = cached_dataset(run_dir, train_ids, GENERATOR_COLUMNS, shuffle_seed=gc.seed)
    else:
        train_images = shard_dataset(run_dir, train_ids, GENERATOR_COLUMNS, shuffle_seed=gc.seed)
    saved = fit_torch_run(
        generator_train_loop,
        {
            "generator": config_to_dict(gc),
            "image_size": image_size,
            "output_size": data_size,
            "grid_dir": str(storage / name / GRIDS_DIR),
            "selection": reference,
        },
        name=name,
        storage=store.ray_storage(RAY_TRAIN_FOLDER),
        num_workers=gc.num_workers,
        use_gpu=use_gpu,
        torch_threads=gc.torch_threads,
        datasets={"train": train_images},
    )
    generator_dir = export_generator(
        run_dir,
        gc,
        saved,
        image_size=image_size,
        output_size=data_size,
        train_ids=train_ids,
        data_card=card,
        grids=storage / name / GRIDS_DIR,
        identity=identity,
        pool=pool,
    )
    info = json.loads((generator_dir / GENERATOR_CARD).read_text())
    progress(
        f"generate train: {saved['state']['step']} steps; generator {info['generator_id']} written to "
        f"{generator_dir} (per-class samples: {generator_dir / GENERATOR_GRID})"
    )
    state = saved["state"]
    return GeneratorResult(
        generator_dir, info["generator_id"], state["step"], time.perf_counter() - t0, state["history"]
    )


def export_generator(
    run_dir: Path,
    gc: GeneratorConfig,
    saved: dict[str, Any],
    *,
    image_size: int,
    output_size: int,
    train_ids: list[str],
    data_card: dict[str, Any],
    grids: Path,
    identity: StageIdentity,
    pool: PoolInputs | None = None,
) -> Path:
    """Write the EMA weights, noise schedule, a final grid, the generator card and the stage manifest (``identity``)
    to ``RUN_DIR/generator/`` (with ``pool``, also ``pool_ids.json``)."""
    from diffusers.training_utils import EMAModel

    unet, conditioning = create_generator(gc, image_size, output_size)
    ema = EMAModel(unet.parameters(), decay=gc.ema_decay, use_ema_warmup=True, power=3 / 4)
    state = saved["state"]
    # the weights of the step with the lowest checkpoint-choice FID (generator.select_every), else the last step's
    ema.load_state_dict(state["best"]["ema"] if state.get("best") else saved["ema"])
    ema.copy_to(unet.parameters())
    unet.eval()

    generator_dir = layout(run_dir).generator
    tmp = generator_dir.with_name(f".{generator_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    save_generator(unet, conditioning, tmp)
    noise_scheduler = training_noise_scheduler(gc.num_train_timesteps, gc.prediction)
    noise_scheduler.save_pretrained(tmp / SCHEDULER_DIR)
    save_png(sample_grid(unet, conditioning, noise_scheduler.config), tmp / GENERATOR_GRID)
    if grids.is_dir():
        shutil.copytree(grids, tmp / GRIDS_DIR)
    weights = next((tmp / UNET_DIR).glob("*.safetensors"))
    generator_id = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    history = {"history": state["history"], "steps": state["step"], "selection": state.get("selection", [])}
    (tmp / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    # the images it learnt from (the labelled train images), not the whole train split of the data card
    learnt = read_rows(run_dir, train_ids, columns=["image_id", "dx"])["dx"].value_counts()
    class_counts = {dx: int(learnt.get(dx, 0)) for dx in conditioning.classes}
    card = generator_card(gc, generator_id, unet, conditioning, state, train_ids, data_card, class_counts, pool)
    (tmp / GENERATOR_CARD).write_text(json.dumps(card, indent=2, default=str))
    # the ids themselves, not only their hash: a classifier run that mixes in this generator's samples checks them
    # one by one against its own labelled images (skinsynth.classify.mixing.check_generator_provenance)
    (tmp / GENERATOR_TRAINING_IDS).write_text(json.dumps(sorted(train_ids)))
    if pool:
        (tmp / GENERATOR_POOL_IDS).write_text(json.dumps(pool.record()))
    write_manifest(tmp, identity, generator_id=generator_id, steps=state["step"])
    replace_dir(tmp, generator_dir)
    return generator_dir


def generator_card(
    gc: GeneratorConfig,
    generator_id: str,
    unet: torch.nn.Module,
    conditioning: Conditioning,
    state: dict[str, Any],
    train_ids: list[str],
    data_card: dict[str, Any],
    class_counts: dict[str, int],
    pool: PoolInputs | None = None,
) -> dict[str, Any]:
    """What the generator is, what it was trained on (``class_counts`` of ``train_ids``, and the pool images of a
    semi-supervised generator), and what it must not be used for."""
    import diffusers

    from skinsynth import __version__
    from skinsynth.core.ray import git_commit

    return {
        "generator_id": generator_id,
        "model": f"diffusers.UNet2DModel, '{gc.size}' preset",
        "parameters": sum(p.numel() for p in unet.parameters()),
        "objective": OBJECTIVES[gc.prediction]
        + (f", min-SNR-{gc.snr_gamma:g} weighting (Hang et al. 2023)" if gc.loss_weighting == "min_snr" else "")
        + (", cosine schedule" if gc.prediction != "edm" else "")
        + f", classifier-free guidance by label dropout {gc.label_dropout}, EMA decay {gc.ema_decay}",
        "image_size": conditioning.image_size,
        "sample_size": conditioning.sample_size,  # the side its samples are delivered at (resized up when larger)
        "classes": list(conditioning.classes),
        "tone_conditioning": list(conditioning.tones),
        "training_data": {
            "source": data_card.get("source"),
            "split": "train, labelled real images only"
            if pool is None
            else "train: labelled real images, and the unlabelled pool with pseudo-labels or unconditionally",
            "images": len(train_ids),
            "image_ids_sha256": ids_hash(train_ids),
            "class_counts": class_counts,
            "pseudo_labels": None if pool is None else pool_summary(pool, conditioning),
            "licence": data_card.get("licence"),
        },
        "training": {
            "steps": state["step"],
            "batch_size": gc.batch_size,
            "grad_accum": gc.grad_accum,
            "workers": gc.num_workers,
            "lr": gc.lr,
            "seconds": round(state.get("seconds", 0.0), 1),
            "final_loss": state["history"][-1]["loss"] if state["history"] else None,
            "seed": gc.seed,
        },
        "checkpoint_choice": checkpoint_choice(gc, state),
        "default_sampling": {"samplers": ["ddim", "dpm"], "steps": 25, "guidance": 2.0},
        "intended_use": "research on synthetic data augmentation for skin-lesion classifiers; never a diagnosis",
        "limitations": [
            "trained from scratch on one dataset: it reproduces that dataset's devices, populations and biases",
            "rare classes have few training images; their samples are the least reliable",
            "synthetic images can copy training images: run the privacy audit before sharing any",
            "not validated by dermatologists; synthetic images are not clinical evidence",
        ],
        "versions": {"skinsynth": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def checkpoint_choice(gc: GeneratorConfig, state: dict[str, Any]) -> dict[str, Any]:
    """Which step's weights were exported, and why: the lowest FID of ``generator.select_every``, or the last step."""
    best = state.get("best")
    if not best:
        return {"method": "last step", "exported_step": state["step"]}
    return {
        "method": f"lowest FID against at most {gc.select_images} validation images (matched n, FID Inception), "
        f"every {gc.select_every} steps and at the last, on samples of the EMA weights with the grids' sampler "
        f"({GRID_SAMPLER['sampler']}, {GRID_SAMPLER['steps']} steps, guidance {GRID_SAMPLER['guidance']:g})",
        "exported_step": best["step"],
        "fid": best["fid"],
        "scored": state.get("selection", []),
    }


def pool_summary(pool: PoolInputs, conditioning: Conditioning) -> dict[str, Any]:
    """The generator card's account of a semi-supervised generator's pool images."""
    per_class = np.bincount(list(pool.pseudo_labels.values()), minlength=len(conditioning.classes))
    return {
        "method": "You et al. 2023 (dual pseudo training): confident pseudo-labels, the rest unconditional",
        "classifier": pool.model,
        "classifier_identity": pool.model_identity,
        "classifier_labelled_images": len(pool.classifier_labelled_ids),
        "threshold": pool.threshold,
        "pseudo_labelled_images": len(pool.pseudo_labels),
        "pseudo_labelled_class_counts": {dx: int(n) for dx, n in zip(conditioning.classes, per_class, strict=False)},
        "unconditional_images": len(pool.unconditional),
    }
