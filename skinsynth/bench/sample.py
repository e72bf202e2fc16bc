"""``skinsynth bench sample``: the sampler's Ray Data actor pool (1 and 2 actors) against a single-process loop,
same run."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from skinsynth.bench import Progress, ratio, with_machine
from skinsynth.config import config_to_dict
from skinsynth.core.ray import ensure_ray
from skinsynth.core.rundir import layout
from skinsynth.core.storage import local_run_dir


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
    generator_dir = layout(run_dir).generator
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
    record = with_machine(
        {
            "benchmark": "sample",
            "generator_id": generator_id,
            "images": len(plan),
            "image_size": conditioning.image_size,
            "sample": config_to_dict(cfg.sample),
            "baseline": "single-process loop over the same model, plan and batches",
            **results,
            "ratio_2_vs_1_actor": ratio(two, one),
            "ratio_2_actors_vs_single_process": ratio(two, loop),
            "ratio_2_actors_vs_single_process_after_first_batch": ratio(
                results["actors_2"]["images_per_s_after_first_batch"],
                results["single_process"]["images_per_s_after_first_batch"],
            ),
            "images_per_s_per_gpu": round(two / min(2, gpus), 3) if gpus else None,
            "identical_images_1_vs_2_actors": True,
        }
    )
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
