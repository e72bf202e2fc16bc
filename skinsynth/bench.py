"""``skinsynth bench ...``: performance measurements, each against a plain baseline in the same run.

Every benchmark writes a JSON record with the machine (cores, GPUs, versions) next to the figures, and prints
both throughputs and their ratio. Timed assertions never live in tests; they live here.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from skinsynth.config import DataConfig, config_to_dict
from skinsynth.core.ray import ensure_ray, machine_info
from skinsynth.core.storage import local_run_dir
from skinsynth.data.prepare import prepare_images, read_original
from skinsynth.data.sources import list_source

Progress = Callable[[str], None]


def _shard_rows(data_dir: Path) -> dict[str, str]:
    table = pq.read_table(data_dir / "images", columns=["image_id", "sha256"])
    return dict(zip(table["image_id"].to_pylist(), table["sha256"].to_pylist()))


class _NoopActor:
    def __call__(self, batch):
        return batch


def actor_pool_round_trip_s(workers: int) -> float:
    """Seconds a Ray Data actor pool of ``workers`` actors takes to start and pass one tiny batch each.

    This fixed cost is paid once per ``prepare`` whatever the data set size; reporting it lets a reader tell the
    per-image speed-up from start-up on small machines.
    """
    import pandas as pd
    import ray.data

    frames = [pd.DataFrame({"x": [i]}) for i in range(workers)]
    t0 = time.perf_counter()
    ray.data.from_pandas(frames).map_batches(
        _NoopActor, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1
    ).to_pandas()
    return time.perf_counter() - t0


def bench_prepare(cfg: DataConfig, *, limit: int | None = None, progress: Progress = print) -> dict[str, Any]:
    """Images/s of the Ray Data ``prepare`` pipeline against a single-process loop doing the same steps.

    Three engines run in one process, on the same listing from a warm page cache (every file is read once before
    timing), write the same shards, and must produce the same set of images: the single-process loop (the
    baseline), the Ray Data actor pool, and a plain process pool with one process per core and no Ray. The last is
    the ceiling: on a shared or throttled machine, N processes get less than N times one process, and this says how
    much the cores gave during this very run. ``ray.init`` is timed separately and excluded.

    Args:
        cfg: data section (source, path, preprocessing) to benchmark.
        limit: only the first ``limit`` images of the source (None = all).
        progress: receives one-line messages.

    Returns:
        The benchmark record (also what the CLI writes as JSON).
    """
    listing = list_source(cfg)
    if limit is not None:
        listing.records = listing.records.head(limit).reset_index(drop=True)
        listing.quarantine = []
    n_images = len(listing.records)
    progress(f"bench prepare: {n_images} images from {cfg.source}; warming the page cache")
    for record in listing.records.to_dict("records"):
        if record["uri"]:
            read_original(record)

    t0 = time.perf_counter()
    ensure_ray(cfg.num_cpus)
    ray_startup_s = time.perf_counter() - t0

    results: dict[str, dict[str, float]] = {}
    baseline_rows: dict[str, str] | None = None  # the loop's images, which every other engine must reproduce
    with tempfile.TemporaryDirectory(prefix="skinsynth-bench-") as tmp:
        for engine in ("local", "processes", "ray"):
            progress(f"bench prepare: {engine} ...")
            t0 = time.perf_counter()
            result = prepare_images(
                cfg, Path(tmp) / engine, engine=engine, force=True, listing=listing, progress=lambda _m: None
            )
            seconds = time.perf_counter() - t0
            results[engine] = {"seconds": round(seconds, 3), "images_per_s": round(n_images / seconds, 2)}
            rows = _shard_rows(result.data_dir)
            baseline_rows = rows if baseline_rows is None else baseline_rows
            if rows != baseline_rows:
                raise RuntimeError(f"the {engine} and single-process runs wrote different images; benchmark void")
            progress(f"bench prepare: {engine}: {n_images / seconds:.1f} images/s ({seconds:.1f} s)")
    local = results["local"]["images_per_s"]
    import ray

    workers = int(ray.cluster_resources().get("CPU", 1))
    pool_s = actor_pool_round_trip_s(workers)
    record = {
        "benchmark": "prepare",
        "source": cfg.source,
        "path": cfg.path,
        "images": n_images,
        "image_size": cfg.preprocess.size,
        "baseline": "single-process loop, same steps and outputs",
        "local": results["local"],
        "processes": results["processes"],
        "ray": results["ray"],
        "ray_startup_s_excluded": round(ray_startup_s, 2),
        "speedup": round(results["ray"]["images_per_s"] / local, 3),
        "ceiling_speedup": round(results["processes"]["images_per_s"] / local, 3),
        "ray_share_of_ceiling": round(results["ray"]["images_per_s"] / results["processes"]["images_per_s"], 3),
        "actor_pool_startup_s": round(pool_s, 2),
        "machine": machine_info(),
    }
    progress(
        f"bench prepare: ray {results['ray']['images_per_s']:.1f} images/s vs single-process {local:.1f} images/s "
        f"-> {record['speedup']:.2f}x on {record['machine']['cpu_cores']} cores"
    )
    progress(
        f"bench prepare: ceiling, {workers} plain processes without Ray: {results['processes']['images_per_s']:.1f} "
        f"images/s -> {record['ceiling_speedup']:.2f}x; ray reaches {record['ray_share_of_ceiling']:.0%} of it "
        f"(ray includes starting its {workers} actors, {pool_s:.1f} s measured alone; ray.init excluded)"
    )
    return record


def write_record(record: dict[str, Any], path: str | Path) -> Path:
    """Write a benchmark record as JSON (creating folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def _plain_training_epoch(cfg, rows, weights) -> float:
    """One epoch of the same model, data, augmentation, loss and batch size in a plain PyTorch loop: images/s."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from skinsynth.classify.data import Collate, DermoscopyAugmentation
    from skinsynth.classify.train import build_training_model, make_optimizer
    from skinsynth.core.raytrain import mixed_precision_dtype

    tc = cfg.train
    amp_dtype = mixed_precision_dtype(tc.amp, torch.device("cpu"), cpu_bf16=tc.cpu_amp)  # as the Ray Train worker
    torch.manual_seed(tc.seed)
    setup = build_training_model(tc)
    model = setup.model
    collate = Collate(setup.mean, setup.std, DermoscopyAugmentation(cfg.data.preprocess.size, seed=(tc.seed, 0, 0)))
    optimizer = make_optimizer(model, tc)
    order = np.random.default_rng(tc.seed).permutation(len(rows))
    model.train()
    t0 = time.perf_counter()
    for start in range(0, len(rows), tc.batch_size):
        batch = rows.iloc[order[start : start + tc.batch_size]]
        x, y = collate({"image": batch["image"].to_numpy(), "label": batch["label"].to_numpy()})
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x.contiguous(memory_format=setup.memory_format))
        loss = F.cross_entropy(logits.float(), y, weight=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return len(rows) / (time.perf_counter() - t0)


def bench_train(cfg, *, progress: Progress = print) -> dict[str, Any]:
    """Training images/s of the Ray Train path against a plain PyTorch loop, one epoch each, same run.

    Both use the same model, labelled train images, augmentation, weighted loss, optimiser and batch size. The Ray
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
    from skinsynth.core.shards import load_split_table, read_rows, split_ids

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
        shutil.rmtree(run_dir / "models" / cfg.train.name, ignore_errors=True)
        shutil.rmtree(run_dir / "ray_train" / training_run_name(cfg.train, run_dir.resolve()), ignore_errors=True)
    wall = time.perf_counter() - t0
    ray_rate = result.history[0]["train_images_per_s"]
    record = {
        "benchmark": "train",
        "model": cfg.train.model,
        "images": len(rows),
        "image_size": cfg.data.preprocess.size,
        "batch_size": cfg.train.batch_size,
        "baseline": "plain PyTorch loop in one process, same model, data, augmentation, loss and batch size",
        "plain_images_per_s": round(plain, 2),
        "ray_train_images_per_s": round(ray_rate, 2),
        "ratio": round(ray_rate / plain, 3),
        "ray_train_wall_s_including_startup_and_validation": round(wall, 1),
        "machine": machine_info(),
    }
    progress(
        f"bench train: Ray Train {ray_rate:.1f} images/s vs plain loop {plain:.1f} images/s -> "
        f"{record['ratio']:.2f}x (Ray run wall time {wall:.0f} s with start-up and validation)"
    )
    return record


def bench_sample(cfg, *, images: int = 64, progress: Progress = print) -> dict[str, Any]:
    """Images/s of the sampler: a single-process loop, then the Ray Data actor pool with 1 and 2 actors, same run.

    All three sample the same plan (``images`` spread evenly over the classes, cut into the same batches) with the
    same generator and settings; the 1- and 2-actor runs must give byte-identical images, or the benchmark is void.
    Actor-pool times include starting the actors and loading the model (what a user waits for); each run also
    reports its rate after its first batch came back, which leaves that start-up (and the loop's first-batch warm-up)
    out: what a long plan would see.

    Args:
        cfg: experiment whose ``run.out`` holds a trained ``generator/``; ``sample`` gives sampler, steps, guidance
            and batch size.
        images: images in the benchmark plan.
        progress: receives one-line messages.

    Returns:
        The benchmark record.
    """
    import dataclasses

    import pandas as pd
    import ray
    import torch

    from skinsynth.data.schema import CLASSES
    from skinsynth.generate.diffusion import training_scheduler_config
    from skinsynth.generate.model import load_generator
    from skinsynth.generate.sample import (
        SamplerSettings,
        build_plan,
        generator_id_of,
        plan_batches,
        run_actor_pool,
        sample_rows,
        write_shard,
    )

    run_dir = local_run_dir(cfg.run)
    generator_dir = run_dir / "generator"
    generator_id = generator_id_of(generator_dir)
    unet, conditioning = load_generator(generator_dir)
    per_class = {dx: images // len(CLASSES) + (i < images % len(CLASSES)) for i, dx in enumerate(CLASSES)}
    plan_cfg = dataclasses.replace(cfg.sample, plan="counts", counts=per_class, max_images=0)
    tones = list(conditioning.tones[:1]) * len(CLASSES) if conditioning.tones else [None] * len(CLASSES)
    plan = build_plan(plan_cfg, pd.DataFrame({"dx": list(CLASSES), "tone": tones}), conditioning)
    batches = plan_batches(plan, cfg.sample.batch_size)
    s = cfg.sample
    settings = SamplerSettings(
        s.sampler, s.steps, s.guidance, generator_id, dict(training_scheduler_config(generator_dir))
    )
    progress(
        f"bench sample: {len(plan)} images at {conditioning.image_size} px, {s.sampler} {s.steps} steps, "
        f"guidance {s.guidance}, batch {s.batch_size}; single-process loop ..."
    )
    ensure_ray(cfg.data.num_cpus)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    unet = unet.to(device)
    results: dict[str, dict[str, float]] = {}
    hashes: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="skinsynth-bench-") as tmp:
        loop_dir = Path(tmp) / "loop"
        loop_dir.mkdir()
        t0 = time.perf_counter()
        first_s = None
        for batch in batches:
            write_shard(sample_rows(unet, conditioning, batch, settings), loop_dir, int(batch["plan_index"].iloc[0]))
            first_s = time.perf_counter() - t0 if first_s is None else first_s
        seconds = time.perf_counter() - t0
        results["single_process"] = _sampling_rates(len(plan), seconds, first_s, len(batches[0]))
        progress(
            f"bench sample: single-process loop {len(plan) / seconds:.2f} images/s "
            f"({torch.get_num_threads()} torch threads, {device.type})"
        )
        for actors in (1, 2):
            out = Path(tmp) / f"actors{actors}"
            out.mkdir()
            t0 = time.perf_counter()
            pool = run_actor_pool(generator_dir, settings, batches, out, actors)
            seconds = time.perf_counter() - t0
            rates = _sampling_rates(len(plan), seconds, pool.seconds_to_first_result, pool.first_result_images)
            results[f"actors_{actors}"] = rates
            hashes[f"actors_{actors}"] = pq.read_table(out, columns=["sha256"])["sha256"].to_pylist()
            after = rates["images_per_s_after_first_batch"] or 0.0
            progress(
                f"bench sample: {actors} actor(s) {len(plan) / seconds:.2f} images/s ({seconds:.1f} s; first results "
                f"after {pool.seconds_to_first_result:.1f} s, then {after:.2f} images/s)"
            )
    if sorted(hashes["actors_1"]) != sorted(hashes["actors_2"]):
        raise RuntimeError("1 and 2 actors produced different images from the same plan; the benchmark is void")
    one, two = results["actors_1"]["images_per_s"], results["actors_2"]["images_per_s"]
    loop = results["single_process"]["images_per_s"]
    record = {
        "benchmark": "sample",
        "generator_id": generator_id,
        "images": len(plan),
        "image_size": conditioning.image_size,
        "sample": config_to_dict(cfg.sample),
        "baseline": "single-process loop over the same model, plan and batches",
        **results,
        "ratio_2_vs_1_actor": round(two / one, 3),
        "ratio_2_actors_vs_single_process": round(two / loop, 3),
        "ratio_2_actors_vs_single_process_after_first_batch": _ratio(
            results["actors_2"]["images_per_s_after_first_batch"],
            results["single_process"]["images_per_s_after_first_batch"],
        ),
        "images_per_s_per_gpu": round(two / min(2, gpus), 3) if gpus else None,
        "identical_images_1_vs_2_actors": True,
        "machine": machine_info(),
    }
    progress(
        f"bench sample: 2 actors {two:.2f} vs 1 actor {one:.2f} images/s -> {record['ratio_2_vs_1_actor']:.2f}x; "
        f"vs single-process {loop:.2f} images/s -> {record['ratio_2_actors_vs_single_process']:.2f}x "
        f"({record['ratio_2_actors_vs_single_process_after_first_batch']}x after the first batch)"
    )
    return record


def _sampling_rates(images: int, seconds: float, first_s: float, first_images: int) -> dict[str, Any]:
    """A sampling run's rate end to end, and after its first batch (start-up and warm-up left out; None when the
    first batch was all of it)."""
    rest_s = seconds - first_s
    return {
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 3),
        "seconds_to_first_batch": round(first_s, 2),
        "images_per_s_after_first_batch": round((images - first_images) / rest_s, 3)
        if images > first_images and rest_s > 0
        else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None
