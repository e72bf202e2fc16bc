"""Sampling: a plan of images per class (and tone), our own guided denoising loop, and a Ray Data actor pool.

The stock diffusers pipelines take no class labels, so the loop is written out here (``denoise``): DDIM
(Song et al. 2021, "Denoising diffusion implicit models", eta = 0) or DPM-Solver++ (Lu et al. 2022, "DPM-Solver++:
fast solver for guided sampling") from the diffusers schedulers, with classifier-free guidance
(Ho & Salimans 2022): ``eps = eps_uncond + w * (eps_cond - eps_uncond)``.

Determinism: image ``i`` of a plan starts from noise drawn with seed ``sample.seed + i``, both samplers are
deterministic from there, and batches are cut from the plan in order, so the same plan, seed and generator give
the same images whatever the number of actors.

Layout of ``RUN_DIR/synthetic/``::

    images/*.parquet       one row per synthetic image (IMAGE_SCHEMA; synthetic = true, provenance columns set)
    plan.parquet           the plan: plan_index, dx, label, tone (requested), seed
    synthetic_card.json    counts per class and tone, sampler settings, generator id, timing
    manifest.json          config and input hashes (what ``skinsynth run`` compares to skip the stage)

An interrupted run keeps the shards it finished (in ``RUN_DIR/.synthetic.partial-<plan hash>/``) and the same
command continues with the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from skinsynth.config import SampleConfig, changed_settings, config_to_dict
from skinsynth.core.rundir import (
    GENERATOR_CARD,
    IMAGES,
    SYNTHETIC_CARD,
    StageIdentity,
    current_identity,
    layout,
    read_manifest,
    replace_dir,
    write_manifest,
)
from skinsynth.data.preprocess import encode_png
from skinsynth.data.schema import CLASS_TO_LABEL, CLASSES, IMAGE_SCHEMA
from skinsynth.data.tone import estimate_tone
from skinsynth.errors import SkinsynthError
from skinsynth.generate.diffusion import generate_images, training_scheduler_config
from skinsynth.generate.model import Conditioning, load_generator, read_conditioning

Progress = Callable[[str], None]
PLAN_COLUMNS = ["plan_index", "dx", "label", "tone", "seed"]
PLAN_FILE = "plan.parquet"  # synthetic/plan.parquet: what was asked for, one row per image
RESULT_SCHEMA = pa.schema(
    [pa.field("image_id", pa.string()), pa.field("dx", pa.string()), pa.field("tone", pa.string())]
)


def _largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` into integers proportional to ``weights`` (Hamilton's method; ties by name)."""
    norm = sum(weights.values())
    if total <= 0 or norm <= 0:
        return {k: 0 for k in weights}
    exact = {k: total * w / norm for k, w in weights.items()}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    order = sorted(weights, key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def class_counts_for_plan(cfg: SampleConfig, real_counts: dict[str, int]) -> dict[str, int]:
    """Synthetic images per class from the plan kind and the real train counts.

    Raises:
        SkinsynthError: counts naming an unknown class, negative numbers, or a plan that asks for nothing.
    """
    if cfg.plan == "fill":
        if cfg.fill_to <= 0:
            raise SkinsynthError("sample.plan 'fill' needs sample.fill_to > 0 (images per class, real + synthetic)")
        counts = {dx: max(0, cfg.fill_to - real_counts.get(dx, 0)) for dx in CLASSES}
    elif cfg.plan == "ratio":
        if cfg.ratio < 0:
            raise SkinsynthError(f"sample.ratio must be >= 0, got {cfg.ratio}")
        counts = {dx: int(math.floor(cfg.ratio * real_counts.get(dx, 0) + 0.5)) for dx in CLASSES}  # half up
    else:
        unknown = sorted(set(cfg.counts) - set(CLASSES))
        if unknown:
            raise SkinsynthError(f"sample.counts names unknown classes {unknown}; known: {', '.join(CLASSES)}")
        if any(n < 0 for n in cfg.counts.values()):
            raise SkinsynthError("sample.counts must be >= 0 for every class")
        counts = {dx: int(cfg.counts.get(dx, 0)) for dx in CLASSES}
    total = sum(counts.values())
    if cfg.max_images and total > cfg.max_images:
        counts = _largest_remainder(cfg.max_images, {k: float(v) for k, v in counts.items()})
    if sum(counts.values()) == 0:
        raise SkinsynthError(f"the sampling plan ({cfg.plan}) asks for no images; check sample.* settings")
    return counts


def build_plan(cfg: SampleConfig, real_train: pd.DataFrame, conditioning: Conditioning) -> pd.DataFrame:
    """The sampling plan: one row per image with class, requested tone (tone-conditioned generators) and seed.

    Args:
        cfg: the ``sample`` section.
        real_train: the real train rows (columns ``dx`` and ``tone``) the counts and tone mix come from.
        conditioning: the generator's conditioning (whether it knows tones).

    Returns:
        A frame with :data:`PLAN_COLUMNS`, ordered by class then tone; ``seed`` is ``cfg.seed + plan_index``.
    """
    real_counts = real_train["dx"].value_counts().to_dict()
    counts = class_counts_for_plan(cfg, real_counts)
    rows: list[tuple[str, str | None]] = []
    for dx in CLASSES:
        n = counts[dx]
        if not conditioning.tones:
            rows += [(dx, None)] * n
            continue
        known = real_train[real_train["tone"].isin(conditioning.tones)]
        if cfg.tones == "match" and (known["dx"] == dx).any():
            weights = known.loc[known["dx"] == dx, "tone"].value_counts().to_dict()
        else:  # uniform over the tone groups seen in training (a class with no known tone also lands here)
            weights = dict.fromkeys(known["tone"].unique(), 1.0) or {conditioning.tones[0]: 1.0}
        per_tone = _largest_remainder(n, {t: float(w) for t, w in weights.items()})
        for tone in conditioning.tones:
            rows += [(dx, tone)] * per_tone.get(tone, 0)
    plan = pd.DataFrame(rows, columns=["dx", "tone"])
    plan.insert(0, "plan_index", np.arange(len(plan), dtype=np.int64))
    plan.insert(2, "label", plan["dx"].map(CLASS_TO_LABEL).astype(np.int64))
    plan["seed"] = cfg.seed + plan["plan_index"]
    return plan[PLAN_COLUMNS]


@dataclass
class SamplerSettings:
    """Everything an actor needs besides the model; plain values so it crosses the Ray boundary cheaply."""

    sampler: str
    steps: int
    guidance: float
    generator_id: str
    scheduler_config: dict[str, Any]


def sample_rows(
    unet: torch.nn.Module, conditioning: Conditioning, plan: pd.DataFrame, settings: SamplerSettings
) -> list[dict[str, Any]]:
    """Generate the images of ``plan`` rows as one batch and return them as IMAGE_SCHEMA rows."""
    labels = [
        conditioning.index(int(r.label), conditioning.tone_index(r.tone) if conditioning.tones else None)
        for r in plan.itertuples(index=False)
    ]
    images = generate_images(
        unet,
        settings.scheduler_config,
        settings.sampler,
        labels,
        plan["seed"].tolist(),
        image_size=conditioning.image_size,
        output_size=conditioning.sample_size,
        null_label=conditioning.null_index,
        steps=settings.steps,
        guidance=settings.guidance,
    )
    out = []
    for r, rgb in zip(plan.itertuples(index=False), images):
        png = encode_png(rgb)
        ita, tone = estimate_tone(rgb)
        image_id = f"syn-{settings.generator_id[:8]}-{int(r.plan_index):07d}"
        out.append(
            {
                "image_id": image_id,
                "image": png,
                "dx": r.dx,
                "label": int(r.label),
                "group_id": image_id,  # every synthetic image is its own group; none ever enters val or test
                "source": "synthetic",
                "synthetic": True,
                "ita": ita,
                "tone": tone,
                "sha256": hashlib.sha256(png).hexdigest(),
                "width": rgb.shape[1],
                "height": rgb.shape[0],
                "generator_id": settings.generator_id,
                "seed": int(r.seed),
                "sampler": settings.sampler,
                "steps": settings.steps,
                "guidance": settings.guidance,
            }
        )
    return out


def write_shard(rows: list[dict[str, Any]], shard_dir: str | Path, first_index: int) -> Path:
    """One Parquet shard, written under a temporary name and renamed (a finished shard is always whole)."""
    target = Path(shard_dir) / f"part-{first_index:07d}.parquet"
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:6]}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), tmp)
    tmp.rename(target)
    return target


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class SamplerActor:
    """Ray Data actor: one generator replica (one GPU, or one CPU core) that samples plan batches into shards.

    ``loader`` returns ``(unet, conditioning)`` for the generator folder; injected so tests and other storage can
    swap it.
    """

    def __init__(
        self,
        generator_dir: str,
        settings: SamplerSettings,
        shard_dir: str,
        loader: Callable[[str], tuple[torch.nn.Module, Conditioning]] = load_generator,
    ):
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # one actor per core: intra-op threads would only oversubscribe
        unet, self.conditioning = loader(generator_dir)
        self.unet = unet.to(_device()).eval()
        self.settings = settings
        self.shard_dir = shard_dir

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        made = []
        # one model batch and one shard per plan batch, exactly as cut, whatever rows Ray Data hands over at once
        for _, plan_batch in batch.groupby("plan_batch", sort=True):
            rows = sample_rows(self.unet, self.conditioning, plan_batch.drop(columns="plan_batch"), self.settings)
            write_shard(rows, self.shard_dir, int(plan_batch["plan_index"].iloc[0]))
            made += [{"image_id": r["image_id"], "dx": r["dx"], "tone": r["tone"]} for r in rows]
        return pa.Table.from_pylist(made, schema=RESULT_SCHEMA)


def plan_batches(plan: pd.DataFrame, batch_size: int) -> list[pd.DataFrame]:
    """The plan cut into model batches, in order (the cut is part of what makes sampling reproducible)."""
    return [plan.iloc[i : i + batch_size] for i in range(0, len(plan), batch_size)]


def sampler_resources(gpus: float, num_actors: int) -> dict[str, float]:
    """What each sampler replica asks Ray for: one GPU, or a share of one when there are more replicas than GPUs
    (a replica asking for a whole GPU that is not there would wait for ever), or one CPU core without GPUs."""
    return {"num_gpus": min(1.0, gpus / num_actors)} if gpus > 0 else {"num_cpus": 1}


PROGRESS_EVERY_S = 15.0  # how often a long sampling run says how far it got


@dataclass(frozen=True)
class PoolRun:
    """What an actor-pool run made, and when its first results came back (the pool's start-up shows there)."""

    images: int
    seconds_to_first_result: float
    first_result_images: int


def run_actor_pool(
    generator_dir: Path,
    settings: SamplerSettings,
    batches: list[pd.DataFrame],
    shard_dir: Path,
    num_actors: int,
    progress: Callable[[str], None] | None = None,
) -> PoolRun:
    """Sample ``batches`` with a Ray Data actor pool of ``num_actors`` replicas.

    ``progress`` gets a line every :data:`PROGRESS_EVERY_S` seconds (images done, rate) in place of Ray Data's own
    progress blocks, which are off for this dataset.
    """
    import ray.data

    from skinsynth.core.ray import quiet_ray_data

    quiet_ray_data()
    resources = sampler_resources(ray.cluster_resources().get("GPU", 0), num_actors)
    results = ray.data.from_pandas([b.assign(plan_batch=i) for i, b in enumerate(batches)]).map_batches(
        SamplerActor,
        batch_format="pandas",
        # the plan's cut (Ray Data asks GPU work for a batch size; the actor re-splits by plan_batch regardless)
        batch_size=max(len(b) for b in batches),
        fn_constructor_kwargs={
            "generator_dir": str(generator_dir),
            "settings": settings,
            "shard_dir": str(shard_dir),
        },
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        **resources,
    )
    total = sum(len(b) for b in batches)
    made, start = 0, time.perf_counter()
    last, first_s, first_images = start, 0.0, 0
    # the results are the small per-image rows; the images themselves are in the shards
    for block in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        made += block.num_rows
        now = time.perf_counter()
        if not first_images:
            first_s, first_images = now - start, block.num_rows
        if progress is not None and now - last >= PROGRESS_EVERY_S and made < total:
            progress(f"sample: {made}/{total} images, {made / (now - start):.2f}/s so far")
            last = now
    return PoolRun(made, first_s, first_images)


def default_num_actors(requested: int) -> int:
    """``sample.num_actors`` (at most what the cluster can hold: an actor that cannot be placed would be waited
    for forever), or one per GPU of the cluster, or one per CPU when it has none."""
    import ray

    resources = ray.cluster_resources()
    slots = max(1, int(resources.get("GPU", 0)) or int(resources.get("CPU", 1)))
    return min(requested, slots) if requested > 0 else slots


def generator_id_of(generator_dir: Path) -> str:
    """The generator's id from its card (a content hash of its weights)."""
    card_path = generator_dir / GENERATOR_CARD
    if not card_path.is_file():
        raise SkinsynthError(f"no trained generator at {generator_dir}: run 'skinsynth generate train' first")
    return json.loads(card_path.read_text())["generator_id"]


# settings that spread the work, not change it: image i of a plan is the same whatever the number of actors
EXECUTION_KEYS = frozenset({"num_actors"})


def synthetic_identity(cfg: SampleConfig, run_dir: Path, generator_id: str | None = None) -> StageIdentity:
    """The synthetic set's identity: the sampling settings, the generator's identity and its weights' id (the plan
    follows from these and the prepared set the generator's identity already holds)."""
    generator_dir = layout(run_dir).generator
    inputs = {
        "generator": current_identity(run_dir, "generator"),
        "generator_id": generator_id or generator_id_of(generator_dir),
    }
    settings = {k: v for k, v in changed_settings(cfg).items() if k not in EXECUTION_KEYS}
    return StageIdentity("synthetic", settings, inputs, config_to_dict(cfg))


@dataclass
class SampleResult:
    """What ``generate sample`` produced."""

    synthetic_dir: Path
    card: dict[str, Any]
    skipped: bool = False


def sample_synthetic(
    cfg: SampleConfig,
    run_dir: str | Path,
    *,
    force: bool = False,
    progress: Progress = print,
) -> SampleResult:
    """Sample the plan of ``cfg`` from ``RUN_DIR/generator`` into ``RUN_DIR/synthetic/``.

    Args:
        cfg: the ``sample`` section.
        run_dir: run directory with ``data/`` (for the real counts) and a trained ``generator/``.
        force: sample again even when the manifest matches.
        progress: receives one-line messages.

    Returns:
        A :class:`SampleResult` with the synthetic card.

    Raises:
        SkinsynthError: no generator or data, or a plan that asks for nothing.
    """
    from skinsynth.core.ray import ensure_ray
    from skinsynth.core.shards import load_split_table, read_rows, split_ids

    run_dir = Path(run_dir)
    generator_dir = layout(run_dir).generator
    synthetic_dir = layout(run_dir).synthetic
    generator_id = generator_id_of(generator_dir)
    labelled = split_ids(load_split_table(run_dir), "train", labelled_only=True)  # what the generator learnt from
    real_train = read_rows(run_dir, labelled, columns=["image_id", "dx", "tone"])
    conditioning = read_conditioning(generator_dir)
    plan = build_plan(cfg, real_train, conditioning)
    identity = synthetic_identity(cfg, run_dir, generator_id)
    expected = identity.identity
    manifest = read_manifest(synthetic_dir)
    if not force and manifest and manifest.get("identity") == expected:
        progress(f"sample: {synthetic_dir} is up to date (same plan and generator); skipping")
        return SampleResult(synthetic_dir, json.loads(layout(run_dir).synthetic_card.read_text()), True)

    partial = synthetic_dir.with_name(f".{synthetic_dir.name}.partial-{expected}")
    shard_dir = partial / IMAGES
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(f".{synthetic_dir.name}.partial-*"):
        if stale != partial:
            shutil.rmtree(stale, ignore_errors=True)
    for tmp in shard_dir.glob(".*.tmp"):
        tmp.unlink()
    batches = plan_batches(plan, cfg.batch_size)
    finished = {p.name for p in shard_dir.glob("part-*.parquet")}
    todo = [b for b in batches if f"part-{int(b['plan_index'].iloc[0]):07d}.parquet" not in finished]
    ensure_ray()
    actors = min(default_num_actors(cfg.num_actors), max(1, len(todo)))
    settings = SamplerSettings(
        cfg.sampler, cfg.steps, cfg.guidance, generator_id, dict(training_scheduler_config(generator_dir))
    )
    progress(
        f"sample: {len(plan)} images ({_counts_text(plan)}) with {cfg.sampler}, {cfg.steps} steps, guidance "
        f"{cfg.guidance}; {len(batches) - len(todo)} of {len(batches)} batches already done; {actors} actor(s)"
    )
    t0 = time.perf_counter()
    made = run_actor_pool(generator_dir, settings, todo, shard_dir, actors, progress).images if todo else 0
    seconds = time.perf_counter() - t0
    progress(f"sample: {made} images in {seconds:.1f} s ({made / max(seconds, 1e-9):.2f}/s)")

    pq.write_table(pa.Table.from_pandas(plan, preserve_index=False), partial / PLAN_FILE)
    written = pq.read_table(shard_dir, columns=["image_id", "dx", "tone"]).to_pandas()
    if len(written) != len(plan):
        raise SkinsynthError(f"sampling wrote {len(written)} images for a plan of {len(plan)}; re-run to finish")
    card = {
        "generator_id": generator_id,
        "images": int(len(written)),
        "classes": {dx: int((written["dx"] == dx).sum()) for dx in CLASSES},
        "estimated_tones": written["tone"].fillna("unknown").value_counts().to_dict(),
        "requested_tones": plan["tone"].fillna("none").value_counts().to_dict(),
        "sample": config_to_dict(cfg),
        "actors": actors,
        "seconds": round(seconds, 2),
        "synthetic": True,
        "note": "synthetic images from a generative model: not real patients, never a diagnosis",
    }
    (partial / SYNTHETIC_CARD).write_text(json.dumps(card, indent=2))
    write_manifest(partial, identity, images=len(written))
    replace_dir(partial, synthetic_dir)
    progress(f"sample: wrote {len(written)} synthetic images to {layout(run_dir).synthetic_images}")
    return SampleResult(synthetic_dir, card)


def _counts_text(plan: pd.DataFrame) -> str:
    counts = plan["dx"].value_counts()
    return ", ".join(f"{dx} {int(counts[dx])}" for dx in CLASSES if dx in counts)
