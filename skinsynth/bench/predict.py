"""``skinsynth bench predict``: Ray Data batch prediction against a plain single-process loop, same images, same run.

Both engines run :func:`skinsynth.serve.predict.batch_predict` on the same listing, into fresh output folders: the
loop (``engine="local"``) predicts the same blocks one after another in this process, with torch's default threads
as a plain script would have them; the Ray engine spreads them over its actor pool (one replica per core, or per
GPU). Both must write the same predictions, or the benchmark is void. ``ray.init`` is timed apart and excluded; the
actor pool's start-up (each replica loads the model) is included, as a user pays it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinsynth.bench import Progress, ratio, with_machine
from skinsynth.config import ExperimentConfig
from skinsynth.errors import SkinsynthError

PROBABILITY_TOLERANCE = 1e-4  # the loop's torch runs multi-threaded, the actors single-threaded: float sums differ


def render_phantom_folder(folder: Path, images: int, image_size: int, seed: int = 7) -> Path:
    """``images`` phantom dermoscopy images as PNG files in ``folder`` (the default input of the benchmark)."""
    from skinsynth.data.phantom import phantom_records, render_phantom
    from skinsynth.data.preprocess import encode_png

    folder.mkdir(parents=True, exist_ok=True)
    for record in phantom_records(images, seed=seed, image_size=image_size).to_dict("records"):
        (folder / f"{record['image_id']}.png").write_bytes(encode_png(render_phantom(record)))
    return folder


def linked_subset(folder: Path, limit: int, into: Path) -> Path:
    """The first ``limit`` image files of a local folder (sorted by path), linked into ``into``."""
    from skinsynth.data.sources import IMAGE_EXTENSIONS

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    into.mkdir(parents=True, exist_ok=True)
    for path in files[:limit]:
        (into / path.relative_to(folder).as_posix().replace("/", "__")).symlink_to(path.resolve())
    return into


def _same_predictions(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if list(a["image_id"]) != list(b["image_id"]) or list(a["top_class"]) != list(b["top_class"]):
        return False
    probs = [c for c in a.columns if c.startswith("prob_")]
    return bool(np.allclose(a[probs].to_numpy(), b[probs].to_numpy(), atol=PROBABILITY_TOLERANCE))


def bench_predict(
    cfg: ExperimentConfig,
    model_dir: str | Path,
    input_location: str | None = None,
    *,
    split: str | None = None,
    images: int = 256,
    limit: int | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    """Images/s of ``skinsynth predict`` on Ray Data against a single-process loop over the same images.

    Args:
        cfg: the experiment config (``serve`` and ``predict`` sections).
        model_dir: the model to score with.
        input_location: a folder, URI or prepared run (None: ``images`` phantom images rendered at
            ``data.phantom.image_size`` into a temporary folder).
        split: a prepared run's split.
        images: phantom images to render without ``input_location``.
        limit: only the first ``limit`` image files of a local ``input_location`` folder.
        progress: receives one-line messages.

    Returns:
        The benchmark record (also what the CLI writes as JSON).
    """
    import ray
    import torch

    from skinsynth.core.ray import ensure_ray
    from skinsynth.serve.model import load_served_model
    from skinsynth.serve.predict import batch_predict

    load_served_model(model_dir, cfg.serve)  # fails early with its reason; writes the calibration once
    results: dict[str, dict[str, Any]] = {}
    frames: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory(prefix="skinsynth-bench-predict-") as tmp:
        if input_location is None:
            input_location = str(render_phantom_folder(Path(tmp) / "images", images, cfg.data.phantom.image_size))
            described = f"{images} phantom images at {cfg.data.phantom.image_size} px"
        elif limit is not None:
            from skinsynth.core.storage import is_uri

            if is_uri(input_location) or not Path(input_location).is_dir():
                raise SkinsynthError(f"--limit takes a local folder as --input, not {input_location}")
            described = f"the first {limit} image files of {input_location}"
            input_location = str(linked_subset(Path(input_location), limit, Path(tmp) / "subset"))
        else:
            described = input_location
        t0 = time.perf_counter()
        ensure_ray()
        ray_startup_s = time.perf_counter() - t0
        progress(f"bench predict: {described}; model {model_dir}")
        for engine in ("local", "ray"):
            out = Path(tmp) / engine / "predictions.parquet"
            result = batch_predict(
                model_dir,
                input_location,
                str(out),
                sc=cfg.serve,
                pc=cfg.predict,
                split=split,
                engine=engine,
                progress=lambda _m: None,
            )
            n, run = result.images, result.engine_run
            assert run is not None  # a fresh output folder: every block is computed
            results[engine] = {
                "seconds": result.seconds,  # listing, model load, the blocks, writing the table
                "images_per_s": round(n / max(result.seconds, 1e-9), 2),
                "predicted": result.predicted,
                "quarantined": result.quarantined,
                "actors": run.actors,
                "blocks_seconds": run.seconds,
                "first_block_s": run.first_block_s,  # for Ray: the actors' start-up and model loads show here
                "images_per_s_after_first_block": run.steady_images_per_s(),
            }
            frames[engine] = pd.read_parquet(out)
            progress(
                f"bench predict: {engine}: {results[engine]['images_per_s']:.1f} images/s ({result.seconds:.1f} s)"
            )
        if not _same_predictions(frames["local"], frames["ray"]):
            raise RuntimeError("the Ray and single-process runs predicted differently; benchmark void")
    record = with_machine(
        {
            "benchmark": "predict",
            "input": described,
            "model_dir": str(model_dir),
            "images": results["local"]["predicted"] + results["local"]["quarantined"],
            "batch_size": cfg.predict.batch_size,
            "baseline": f"single-process loop, same blocks and outputs, torch threads {torch.get_num_threads()}",
            "local": results["local"],
            "ray": results["ray"],
            "ray_cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
            "ray_startup_s_excluded": round(ray_startup_s, 2),
            "speedup": ratio(results["ray"]["images_per_s"], results["local"]["images_per_s"]),
            "speedup_after_first_block": ratio(
                results["ray"]["images_per_s_after_first_block"], results["local"]["images_per_s_after_first_block"]
            ),
        }
    )
    progress(
        f"bench predict: ray {results['ray']['images_per_s']:.1f} images/s ({results['ray']['actors']} actors) vs "
        f"single-process {results['local']['images_per_s']:.1f} images/s -> {record['speedup']:.2f}x on "
        f"{record['machine']['cpu_cores']} cores (actor start-up included; ray.init excluded)"
    )
    if record["speedup_after_first_block"] is not None:
        progress(
            f"bench predict: after the first block (start-up left out): ray "
            f"{results['ray']['images_per_s_after_first_block']:.1f} images/s vs single-process "
            f"{results['local']['images_per_s_after_first_block']:.1f} -> {record['speedup_after_first_block']:.2f}x"
        )
    return record
