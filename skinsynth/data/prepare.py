"""The ``prepare`` stage: a Ray Data pipeline from a raw source to Parquet image shards under ``RUN_DIR/data/``.

The driver lists the source and hashes every file, so byte-identical copies join one lesion group before any
split is made. One Ray Data pass then runs, per batch of images in an actor pool: read (file or phantom render) ->
decode/validate -> hair removal -> ITA -> colour constancy -> resize/crop -> PNG -> one Parquet shard; each batch
returns only a small metadata table (hash, tone, refusal reason), from which the driver builds the quarantine list,
the lesion-grouped splits and the data card. Pixels never travel back to the driver. Outputs are written into a
temporary folder and renamed into place, so an interrupted run never leaves a half-written ``data/``.

Layout of ``RUN_DIR/data/``::

    images/*.parquet   one row per good image (schema: skinsynth.data.schema.IMAGE_SCHEMA)
    splits.parquet     image_id -> split, labelled, fold (schema: SPLIT_SCHEMA)
    quarantine.csv     image_id, uri, dx, reason for every item not in the shards
    data_card.json     counts per class, split, tone, sex, age band, site; quarantine; source and licence
    manifest.json      config and input hashes (what ``skinsynth run`` compares to skip the stage)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from skinsynth.config import DataConfig, PreprocessConfig, changed_settings, config_to_dict
from skinsynth.core.rundir import (
    DATA_CARD,
    IMAGES,
    QUARANTINE,
    SPLITS,
    StageIdentity,
    layout,
    read_manifest,
    replace_dir,
    write_manifest,
)
from skinsynth.core.storage import read_source_bytes
from skinsynth.data.card import build_data_card
from skinsynth.data.grouping import merge_similar_groups, perceptual_hash
from skinsynth.data.preprocess import BadImage, encode_png, preprocess_image
from skinsynth.data.schema import (
    CLASS_TO_LABEL,
    IMAGE_SCHEMA,
    SPLIT_SCHEMA,
    tone_from_ita,
)
from skinsynth.data.sources import SourceListing, list_source
from skinsynth.data.splits import lesion_grouped_split, merge_duplicate_groups

# What each batch returns to the driver: one row per image, ``error`` set for refused images.
RESULT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("dx", pa.string()),
        pa.field("group_id", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("ita", pa.float32()),
        pa.field("tone", pa.string()),
        pa.field("error", pa.string()),
    ]
)
QUARANTINE_COLUMNS = ["image_id", "uri", "dx", "reason"]
Progress = Callable[[str], None]


def read_original(record: Mapping[str, Any]) -> bytes:
    """Bytes of one source image: the file at ``uri``, or a phantom image rendered from its seed and PNG-encoded."""
    if record["source"] == "phantom":
        from skinsynth.data.phantom import render_phantom

        return encode_png(render_phantom(record))
    return read_source_bytes(record["uri"])


def process_batch(
    batch: pd.DataFrame,
    cfg: PreprocessConfig,
    shard_dir: str,
    loader: Callable[[Mapping[str, Any]], bytes] = read_original,
) -> pa.Table:
    """Preprocess a batch of source records, write the good images as one Parquet shard, return per-image results.

    Args:
        batch: source records (:data:`skinsynth.data.sources.RECORD_COLUMNS` plus ``row``, the record's position,
            which names the shard so that reruns give the same files).
        cfg: preprocessing settings.
        shard_dir: folder for the shard (``part-<first row>.parquet``).
        loader: returns the original bytes of a record; injected so tests and other storage can swap it.

    Returns:
        A table in :data:`RESULT_SCHEMA`, one row per input record.
    """
    # Ray runs one worker per core already; OpenCV's own thread pool would only oversubscribe the cores.
    cv2.setNumThreads(1)
    good: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for record in batch.to_dict("records"):
        result = {"image_id": record["image_id"], "dx": record["dx"], "group_id": record["group_id"]}
        try:
            prepared = preprocess_image(loader(record), cfg)
        except BadImage as err:
            results.append({**result, "error": str(err)})
            continue
        except OSError as err:
            results.append({**result, "error": f"cannot read file: {err.strerror or err}"})
            continue
        tone = tone_from_ita(prepared.ita)
        results.append({**result, "sha256": prepared.sha256, "ita": prepared.ita, "tone": tone})
        good.append(
            {
                **result,
                "image": prepared.png,
                "label": CLASS_TO_LABEL[record["dx"]],
                "source": record["source"],
                "synthetic": False,
                "age": _none_if_nan(record.get("age")),
                "sex": _none_if_nan(record.get("sex")),
                "localization": _none_if_nan(record.get("localization")),
                "fitzpatrick": _none_if_nan(record.get("fitzpatrick")),
                "tone_true": _none_if_nan(record.get("tone_true")),
                "sha256": prepared.sha256,
                "width": prepared.width,
                "height": prepared.height,
                "ita": prepared.ita,
                "tone": tone,
            }
        )
    if good:
        first_row = int(batch["row"].iloc[0])
        pq.write_table(
            pa.Table.from_pylist(good, schema=IMAGE_SCHEMA), Path(shard_dir) / f"part-{first_row:07d}.parquet"
        )
    return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)


def _none_if_nan(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    return value


@dataclass
class PrepareResult:
    """What ``prepare`` produced."""

    data_dir: Path
    card: dict[str, Any]
    skipped: bool = False


class _BatchPreprocessor:
    """Ray Data actor around :func:`process_batch`: long-lived workers skip per-task start-up on small machines."""

    def __init__(self, cfg: PreprocessConfig, shard_dir: str):
        self._cfg = cfg
        self._shard_dir = shard_dir

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        return process_batch(batch, self._cfg, self._shard_dir)


QUARANTINE_SHOWN = 5  # quarantined files named on the terminal; quarantine.csv holds them all


def _batches(records: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [records.iloc[i : i + size] for i in range(0, len(records), size)]


def _run_ray(records: pd.DataFrame, cfg: DataConfig, shard_dir: Path) -> pd.DataFrame:
    """The per-image work as a Ray Data actor pool, one actor per CPU of the cluster."""
    import ray
    import ray.data

    from skinsynth.core.console import counter
    from skinsynth.core.ray import ensure_ray

    ensure_ray(cfg.num_cpus)
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # results in record order
    batches = _batches(records, cfg.batch_size)
    workers = max(1, min(len(batches), int(ray.cluster_resources().get("CPU", 1))))
    processed = ray.data.from_pandas(batches).map_batches(
        _BatchPreprocessor,
        batch_format="pandas",
        batch_size=cfg.batch_size,
        fn_constructor_kwargs={"cfg": cfg.preprocess, "shard_dir": str(shard_dir)},
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
    )
    images = counter("prepare", len(records), "images")  # a bar on a terminal, periodic lines elsewhere
    frames = []
    for frame in processed.iter_batches(batch_format="pandas", batch_size=None):
        frames.append(frame)
        if images is not None:
            images.update(len(frame))
    return pd.concat(frames, ignore_index=True) if frames else processed.to_pandas()  # no rows: its schema


def _process_batches(batches: list[pd.DataFrame], cfg: PreprocessConfig, shard_dir: str) -> pa.Table:
    """:func:`process_batch` over ``batches`` in turn (module-level, so a spawned process can run it)."""
    tables = [process_batch(batch, cfg, shard_dir) for batch in batches]
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()


def _run_local(records: pd.DataFrame, cfg: DataConfig, shard_dir: Path) -> pd.DataFrame:
    """The same per-image work in a plain single-process loop (the baseline of ``skinsynth bench prepare``)."""
    return _process_batches(_batches(records, cfg.batch_size), cfg.preprocess, str(shard_dir)).to_pandas()


def _run_processes(records: pd.DataFrame, cfg: DataConfig, shard_dir: Path) -> pd.DataFrame:
    """The same work split evenly over one plain (spawned) process per core, no Ray: the parallel ceiling that
    ``skinsynth bench prepare`` measures the Ray engine against, on whatever share of the cores the machine gives."""
    import concurrent.futures
    import multiprocessing

    batches = _batches(records, cfg.batch_size)
    workers = max(1, min(len(batches), cfg.num_cpus or os.cpu_count() or 1))
    chunks = [batches[i::workers] for i in range(workers)]
    context = multiprocessing.get_context("spawn")  # fork is unsafe in a process that may hold Ray's threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        tables = list(pool.map(_process_batches, chunks, [cfg.preprocess] * workers, [str(shard_dir)] * workers))
    frame = pa.concat_tables(tables).to_pandas()
    return frame.set_index("image_id").loc[records["image_id"]].reset_index()  # record order, as the others


ENGINES: dict[str, Callable[[pd.DataFrame, DataConfig, Path], pd.DataFrame]] = {
    "ray": _run_ray,
    "local": _run_local,
    "processes": _run_processes,
}


def hash_files(records: pd.DataFrame) -> pd.Series:
    """sha256 of every record's file (None for phantom rows and unreadable files), read on the driver.

    Hashing here, before any image is processed, lets byte-identical copies share a lesion group in the shards
    themselves, and gives the stage a content fingerprint that a touched-but-unchanged file does not invalidate.
    """
    hashes = []
    for uri in records["uri"]:
        try:
            hashes.append(hashlib.sha256(read_source_bytes(uri)).hexdigest() if uri else None)
        except OSError:
            hashes.append(None)  # the worker reports the read error as the quarantine reason
    return pd.Series(hashes, index=records.index, dtype=object)


def perceptual_hashes(records: pd.DataFrame) -> pd.Series:
    """64-bit pHash of every record's file (None for phantom rows and files that do not read or decode)."""
    hashes = []
    for uri in records["uri"]:
        try:
            hashes.append(perceptual_hash(read_source_bytes(uri)) if uri else None)
        except OSError:
            hashes.append(None)
    return pd.Series(hashes, index=records.index, dtype=object)


def estimate_groups(
    records: pd.DataFrame, listing: SourceListing, cfg: DataConfig, progress: Progress
) -> tuple[str, list[list[str]]]:
    """Without lesion ids, join likely views of one lesion (:mod:`skinsynth.data.grouping`) into ``group_id`` in
    place, and say in one line that the splits follow estimated groups. Returns the grouping the data card records
    (``lesion_id``, ``estimated`` or ``image``) and the image sets joined by similarity."""
    if listing.grouping != "image":
        return listing.grouping, []
    if cfg.group_similar is None:
        progress(
            f"prepare: WARNING {listing.name} has no lesion ids and data.group_similar is off: splits are by image, "
            "so views of one lesion can sit in two splits (add a lesion_id column to the metadata CSV)"
        )
        return "image", []
    hashed = records[records["sha256"].notna()]
    frame = hashed[["image_id", "group_id"]].assign(phash=perceptual_hashes(hashed))
    merged, similar = merge_similar_groups(frame, cfg.group_similar)
    records.loc[hashed.index, "group_id"] = merged
    progress(
        f"prepare: WARNING {listing.name} has no lesion ids: splits follow lesion groups estimated from image "
        f"similarity ({records['group_id'].nunique()} groups for {len(records)} images, {len(similar)} sets "
        f"joined; data.group_similar={cfg.group_similar}); add a lesion_id column to the metadata CSV for exact ones"
    )
    return "estimated", similar


def input_fingerprint(records: pd.DataFrame, quarantine: list[dict[str, Any]]) -> str:
    """Hash of what the stage reads: every record (with its file's sha256) and every listing-time refusal."""
    digest = hashlib.sha256()
    for record in records.sort_values("image_id").itertuples(index=False):
        digest.update(f"{record.image_id}|{record.uri}|{record.dx}|{record.group_id}|{record.sha256}\n".encode())
    for item in quarantine:
        digest.update(f"q|{item['image_id']}|{item['uri']}|{item['reason']}\n".encode())
    return digest.hexdigest()[:16]


# data settings that change how the work is run, not what it makes
EXECUTION_KEYS = frozenset({"num_cpus"})


def data_identity(cfg: DataConfig, fingerprint: str) -> StageIdentity:
    """The prepared set's identity: the source's content fingerprint plus every data setting that shapes the
    output - split and preprocessing included, so a re-split set has a new identity (and so does everything
    trained on it)."""
    settings = {k: v for k, v in changed_settings(cfg).items() if k not in EXECUTION_KEYS}
    return StageIdentity("data", settings, {"source": fingerprint}, config_to_dict(cfg))


def prepare_images(
    cfg: DataConfig,
    run_dir: str | Path,
    *,
    engine: str = "ray",
    force: bool = False,
    listing: SourceListing | None = None,
    progress: Progress = print,
) -> PrepareResult:
    """Run the ``prepare`` stage into ``RUN_DIR/data/``.

    Args:
        cfg: the data section of the experiment config.
        run_dir: run directory; ``data/`` is created (or replaced) inside it.
        engine: ``ray`` (Ray Data actor pool), ``local`` (single-process loop, same steps; the baseline) or
            ``processes`` (a plain process pool; the benchmark's parallel ceiling).
        force: redo the stage even when its manifest says inputs and config are unchanged.
        listing: records to process instead of listing ``cfg.source`` (e.g. a subset for a benchmark).
        progress: receives one-line progress messages.

    Returns:
        A :class:`PrepareResult` with the data card.

    Raises:
        SourceError: the source cannot be read.
        SplitError: impossible split settings or a lesion that would leak between splits.
    """
    run_dir = Path(run_dir)
    data_dir = layout(run_dir).data
    started = time.perf_counter()
    listing = listing if listing is not None else list_source(cfg, progress)
    records = listing.records.assign(sha256=hash_files(listing.records))
    hashed = records[records["sha256"].notna()]
    merged_groups, duplicates = merge_duplicate_groups(hashed)
    records.loc[hashed.index, "group_id"] = merged_groups
    grouping, similar = estimate_groups(records, listing, cfg, progress)
    fingerprint = input_fingerprint(records, listing.quarantine)
    identity = data_identity(cfg, fingerprint)
    manifest = read_manifest(data_dir)
    if not force and manifest and manifest.get("identity") == identity.identity:
        progress(f"prepare: {data_dir} is up to date (same config and inputs); skipping")
        return PrepareResult(data_dir, json.loads(layout(run_dir).data_card.read_text()), skipped=True)

    progress(
        f"prepare: {len(listing.records)} images from {listing.name}"
        + (f" ({len(listing.quarantine)} quarantined while listing)" if listing.quarantine else "")
        + f", {engine} engine"
    )
    if engine not in ENGINES:
        raise ValueError(f"unknown engine '{engine}' (known: {', '.join(ENGINES)})")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(f".{data_dir.name}.tmp-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = data_dir.with_name(f".{data_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()

    (tmp_dir / IMAGES).mkdir()
    t0 = time.perf_counter()
    # Process (and so shard) the records in a seeded random order: source listings are often sorted by diagnosis
    # (HAM10000's metadata is), and class-sorted shards would make every streamed training batch one class.
    order = np.random.default_rng(cfg.split.seed).permutation(len(records))
    shuffled = records.iloc[order].reset_index(drop=True)
    results = ENGINES[engine](shuffled.assign(row=np.arange(len(shuffled))), cfg, tmp_dir / IMAGES)
    process_s = time.perf_counter() - t0
    progress(
        f"prepare: processed {len(results)} images in {process_s:.1f} s ({len(results) / max(process_s, 1e-9):.0f}/s)"
    )

    bad = results[results["error"].notna()]
    good = results[results["error"].isna()].reset_index(drop=True)
    by_id = records.set_index("image_id")
    quarantine = pd.DataFrame(
        listing.quarantine
        + [
            {"image_id": r.image_id, "uri": by_id.at[r.image_id, "uri"], "dx": r.dx, "reason": r.error}
            for r in bad.itertuples(index=False)
        ],
        columns=QUARANTINE_COLUMNS,
    )
    good["source_split"] = good["image_id"].map(by_id["source_split"]) if len(good) else None
    splits = lesion_grouped_split(good, cfg.split) if len(good) else pd.DataFrame(columns=SPLIT_SCHEMA.names)

    pq.write_table(pa.Table.from_pandas(splits, schema=SPLIT_SCHEMA, preserve_index=False), tmp_dir / SPLITS)
    quarantine.to_csv(tmp_dir / QUARANTINE, index=False)

    good = good.merge(records[["image_id", "age", "sex", "localization"]], on="image_id", how="left")
    extra_truth = records[["image_id", "ita_true", "tone_true"]] if "ita_true" in records else None
    card = build_data_card(
        good,
        splits,
        quarantine,
        listing=listing,
        cfg=cfg,
        duplicates=duplicates,
        grouping=grouping,
        similar=similar,
        ita_truth=extra_truth,
        seconds={"total": round(time.perf_counter() - started, 2), "process": round(process_s, 2)},
        engine=engine,
    )
    (tmp_dir / DATA_CARD).write_text(json.dumps(card, indent=2, default=str))
    write_manifest(tmp_dir, identity, input_hash=fingerprint, rows=int(len(good)), quarantined=int(len(quarantine)))
    replace_dir(tmp_dir, data_dir)
    progress(
        f"prepare: wrote {len(good)} images to {layout(run_dir).data_images}, {len(quarantine)} quarantined "
        f"({time.perf_counter() - started:.1f} s)"
    )
    if len(quarantine):
        shown = QUARANTINE_SHOWN
        for item in quarantine.head(shown).itertuples(index=False):
            where = f" ({item.uri})" if isinstance(item.uri, str) and item.uri else ""  # none: no file found
            progress(f"  quarantined {item.image_id}{where}: {item.reason}")
        more = f"; {len(quarantine) - shown} more" if len(quarantine) > shown else ""
        progress(f"  every quarantined file and its reason{more}: {layout(run_dir).quarantine}")
    return PrepareResult(data_dir, card)
