"""``skinsynth bench prepare``: the Ray Data ``prepare`` pipeline against a single-process loop, same run."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from skinsynth.bench import Progress, ratio, with_machine
from skinsynth.config import DataConfig
from skinsynth.core.ray import ensure_ray
from skinsynth.core.rundir import IMAGES
from skinsynth.data.prepare import prepare_images, read_original
from skinsynth.data.sources import list_source


def _shard_rows(data_dir: Path) -> dict[str, str]:
    table = pq.read_table(data_dir / IMAGES, columns=["image_id", "sha256"])
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
    record = with_machine(
        {
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
            "speedup": ratio(results["ray"]["images_per_s"], local),
            "ceiling_speedup": ratio(results["processes"]["images_per_s"], local),
            "ray_share_of_ceiling": ratio(results["ray"]["images_per_s"], results["processes"]["images_per_s"]),
            "actor_pool_startup_s": round(pool_s, 2),
        }
    )
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
