"""``skinsynth predict``: the endpoint's predictions for a whole folder, bucket or prepared run, with Ray Data.

Every image goes through the very code ``POST /v1/predict`` runs (``skinsynth.serve.model``): ``prepare_upload``
(the data plane's decode, checks and pixel steps, with ``serve.max_pixels``), ``predict_images`` (probabilities, top
class, malignant probability, risk band, uncertainty, OOD flag, disclaimer) and, with ``explain``, ``gradcam_png``.
A prepared run's images are its shards' PNGs, which already are ``prepare_pixels``' output: they go to the model as
they are, as ``evaluate`` scores them.

The work runs as a Ray Data actor pool (``map_batches`` with a callable class holding the model: one replica per
CPU, or per GPU when the cluster has GPUs). The inputs are cut into blocks of ``predict.batch_size`` images in
image-id order; each block is one model call and one Parquet part file under ``<out>.parts/``, named by a hash of
its images (id, location, size and modification time, or the prepared row's sha256) and of everything that shapes
its answers (model weights, calibration, settings). A rerun skips the blocks whose part exists, so a killed run
resumes without redoing finished blocks, and a changed file or model redoes only what it changes.

Bad files are never dropped silently: the data plane's refusals (empty, not an image, truncated or corrupt,
grayscale, too small, over the pixel cap, unreadable) and files of an unsupported type go to
``<out stem>.quarantine.csv`` with their reason. Inputs and outputs may be local paths or storage URIs (``s3://``).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from skinsynth import DISCLAIMER
from skinsynth.config import PredictConfig, ServeConfig
from skinsynth.core.storage import display_uri, is_uri, read_source_bytes
from skinsynth.errors import SkinsynthError
from skinsynth.serve.model import ServedModel, gradcam_png, predict_images, prepare_upload

Progress = Callable[[str], None]
Loader = Callable[[str], bytes]
SPLITS = ("train", "val", "test", "all")
PROGRESS_EVERY_S = 10.0  # how often a long run says how far it got
QUARANTINE_COLUMNS = ["image_id", "uri", "reason"]
QUARANTINE_SHOWN = 5  # quarantined files named on the terminal; the CSV holds them all


class PredictError(SkinsynthError, ValueError):
    """An input, output or split that ``predict`` cannot use, with the reason."""


def result_schema(classes: list[str]) -> pa.Schema:
    """One row per input image: its identity, the refusal reason (``error``) or the endpoint's answer, flattened."""
    return pa.schema(
        [
            pa.field("image_id", pa.string()),
            pa.field("uri", pa.string()),
            pa.field("dx", pa.string()),  # a prepared run's label (None for a folder)
            pa.field("split", pa.string()),
            pa.field("error", pa.string()),
            pa.field("model_id", pa.string()),
            pa.field("top_class", pa.string()),
            pa.field("top_probability", pa.float64()),
            pa.field("malignant_probability", pa.float64()),
            pa.field("risk_band", pa.string()),
            pa.field("risk_medium_from", pa.float64()),
            pa.field("risk_high_from", pa.float64()),
            *[pa.field(f"prob_{name}", pa.float64()) for name in classes],
            pa.field("entropy", pa.float64()),
            pa.field("normalised_entropy", pa.float64()),
            pa.field("tta_std", pa.float64()),
            pa.field("out_of_distribution", pa.bool_()),
            pa.field("ood_score", pa.float64()),
            pa.field("ood_threshold", pa.float64()),
            pa.field("gradcam", pa.string()),
            pa.field("disclaimer", pa.string()),
        ]
    )


def response_row(body: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's response body (``predict_images``) as one flat table row; no field is recomputed here."""
    row = {key: body[key] for key in ("model_id", "top_class", "top_probability", "malignant_probability")}
    row.update(
        risk_band=body["risk_band"],
        risk_medium_from=body["risk_thresholds"]["medium_from"],
        risk_high_from=body["risk_thresholds"]["high_from"],
        **{f"prob_{name}": p for name, p in body["probabilities"].items()},
        **{key: body["uncertainty"][key] for key in ("entropy", "normalised_entropy", "tta_std")},
        out_of_distribution=body["out_of_distribution"],
        ood_score=body["ood_score"],
        ood_threshold=body["ood_threshold"],
        disclaimer=body["disclaimer"],
    )
    return row


# --- where things are: local paths or storage URIs ----------------------------------------------------------------


def open_location(location: str, what: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path)`` of a local path or a storage URI."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError, ImportError) as exc:
        raise PredictError(f"{what} '{display_uri(location)}' is not a storage URI pyarrow can open: {exc}") from exc


@dataclass(frozen=True)
class OutputPaths:
    """Where one prediction run writes: the table, its quarantine list, the Grad-CAM PNGs and the resumable parts."""

    out: str
    quarantine: str
    gradcam: str
    parts: str

    @classmethod
    def of(cls, out: str) -> OutputPaths:
        out = str(out)
        base, sep, query = out.partition("?")  # an s3 URI may carry options after '?'
        if not base.endswith((".parquet", ".csv")):
            raise PredictError(f"--out must end in .parquet or .csv, got '{display_uri(out)}'")
        stem = base.rsplit(".", 1)[0]
        return cls(
            out, f"{stem}.quarantine.csv{sep}{query}", f"{stem}.gradcam{sep}{query}", f"{stem}.parts{sep}{query}"
        )

    def local_paths(self) -> set[Path]:
        """This run's own outputs as local paths (none for URIs): a folder input that holds them skips them."""
        if is_uri(self.out):
            return set()
        return {Path(p).expanduser().resolve() for p in (self.out, self.quarantine, self.gradcam, self.parts)}


def _join(location: str, name: str) -> str:
    base, sep, query = location.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def write_atomically(filesystem: Any, path: str, write: Callable[[Any], None]) -> None:
    """Write a file under a temporary name and move it into place: a file there is always whole."""
    parent = path.rsplit("/", 1)[0]
    filesystem.create_dir(parent, recursive=True)
    tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
    with filesystem.open_output_stream(tmp) as sink:
        write(sink)
    filesystem.move(tmp, path)


# --- what to predict ---------------------------------------------------------------------------------------------


@dataclass
class PredictInput:
    """The images of one input: a folder (or bucket prefix) of files, or a prepared run's split."""

    kind: str  # "folder" or "run"
    location: str
    records: pd.DataFrame  # image_id, uri, fingerprint; a run's rows also dx, split and png (the prepared image)
    quarantine: list[dict[str, Any]] = field(default_factory=list)  # refused while listing (unsupported type)
    run_dir: Path | None = None  # the prepared run (its local copy for a URI)
    split: str | None = None
    skipped_hidden: int = 0


def _is_prepared_run(location: str) -> bool:
    import pyarrow.fs as pafs

    from skinsynth.core.rundir import layout

    if not is_uri(location):
        return layout(Path(location).expanduser()).data_card.is_file()
    filesystem, path = open_location(location, "--input")
    card = f"{path.rstrip('/')}/{layout(Path('.')).data_card.relative_to(Path('.')).as_posix()}"
    try:
        return filesystem.get_file_info(card).type == pafs.FileType.File
    except OSError as exc:
        raise PredictError(f"cannot read --input '{display_uri(location)}': {exc}") from exc


def list_folder(location: str, skip: set[Path] | None = None, progress: Progress = print) -> PredictInput:
    """Every file below a folder (or a storage URI, pulled into a local copy first, as ``prepare`` does).

    The image id is the file's path relative to the folder, unique by construction. Files whose extension is no
    image format go to the quarantine list; hidden files (``.name``) are counted and skipped.
    """
    from skinsynth.core.storage import mirror_source, remote_uri_of
    from skinsynth.data.sources import IMAGE_EXTENSIONS

    root = mirror_source(location, "--input", progress) if is_uri(location) else Path(location).expanduser()
    if not root.is_dir():
        raise PredictError(f"--input '{display_uri(location)}' is not a folder, a storage URI or a prepared run")
    root = root.resolve()
    skip = skip or set()
    rows, quarantine, hidden = [], [], 0
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            hidden += path.is_file()
            continue
        if not path.is_file() or path in skip or any(parent in skip for parent in path.parents):
            continue
        uri = remote_uri_of(path, root, location) if is_uri(location) else str(path)
        image_id = relative.as_posix()
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            reason = f"unsupported file type '{path.suffix or path.name}'"
            quarantine.append({"image_id": image_id, "uri": display_uri(uri), "reason": reason})
            continue
        stat = path.stat()
        rows.append({"image_id": image_id, "uri": uri, "fingerprint": f"{stat.st_size}:{stat.st_mtime_ns}"})
    records = pd.DataFrame(rows, columns=["image_id", "uri", "fingerprint"])
    return PredictInput("folder", location, records, quarantine, skipped_hidden=hidden)


def list_prepared(run_dir: Path, location: str, split: str | None) -> PredictInput:
    """A prepared run's images of ``split`` (``all``: every split), read from its shards."""
    from skinsynth.core.shards import load_split_table, read_rows

    if split not in SPLITS:
        raise PredictError(
            f"--input {display_uri(location)} is a prepared run: choose its images with --split "
            f"{'|'.join(SPLITS)} (test and all are recorded in the run's test ledger)"
        )
    splits = load_split_table(run_dir)
    chosen = splits if split == "all" else splits[splits["split"] == split]
    rows = read_rows(run_dir, sorted(chosen["image_id"]), ["image_id", "image", "dx", "sha256"])
    rows = rows.merge(chosen[["image_id", "split"]], on="image_id", how="left")
    records = pd.DataFrame(
        {
            "image_id": rows["image_id"],
            "uri": [f"{display_uri(location)}#{i}" for i in rows["image_id"]],
            "fingerprint": rows["sha256"].fillna("") + ":" + rows["image"].map(lambda b: hashlib.sha1(b).hexdigest()),
            "dx": rows["dx"],
            "split": rows["split"],
            "png": rows["image"],
        }
    )
    return PredictInput("run", location, records, run_dir=run_dir, split=split)


# --- the work on one block ---------------------------------------------------------------------------------------


def served_on(served: ServedModel, device: Any) -> ServedModel:
    """``served`` with its model and training features on ``device`` (``predict_images`` follows the features)."""
    return replace(served, model=served.model.to(device), train_features=served.train_features.to(device))


def predict_block(
    served: ServedModel,
    block: pd.DataFrame,
    *,
    max_pixels: int,
    tta: bool = False,
    gradcam_dir: str | None = None,
    loader: Loader = read_source_bytes,
) -> pa.Table:
    """The endpoint's answer for every image of a block, or the reason it was refused; one row per input.

    Args:
        served: the loaded model (``load_served_model``).
        block: records of :class:`PredictInput` (a prepared row carries ``png``: its prepared image).
        max_pixels: the pixel cap (``serve.max_pixels``), checked on the header before decoding.
        tta: add the flip spread to the uncertainty (the endpoint's ``?tta=true``).
        gradcam_dir: write a Grad-CAM PNG per image there (local path or URI); None = none.
        loader: returns a file's bytes from its URI (injected so tests can swap it).
    """
    from skinsynth.data.preprocess import BadImage, decode_png

    rows: list[dict[str, Any]] = []
    good: list[tuple[int, np.ndarray]] = []
    for record in block.to_dict("records"):
        row = {key: record.get(key) for key in ("image_id", "dx", "split")}
        row["uri"] = display_uri(record["uri"])  # credentials a URI carries never reach the table
        try:
            png = record.get("png")
            # a prepared row is prepare_pixels' lossless output already: the pixels the model learnt from
            image = (
                decode_png(png)
                if isinstance(png, bytes)
                else prepare_upload(loader(row["uri"]), served.preprocess, max_pixels)
            )
        except BadImage as err:
            row["error"] = str(err)
        except OSError as err:
            row["error"] = f"cannot read file: {err.strerror or err}"
        else:
            good.append((len(rows), image))
        rows.append(row)
    bodies = predict_images(served, [image for _, image in good], [tta] * len(good))
    filesystem, folder = open_location(gradcam_dir, "gradcam folder") if gradcam_dir else (None, "")
    for (index, image), body in zip(good, bodies, strict=True):
        rows[index].update(response_row(body))
        if filesystem is not None:
            target = f"{folder}/{rows[index]['image_id']}.png"
            png_bytes = gradcam_png(served, image)
            write_atomically(filesystem, target, lambda sink, data=png_bytes: sink.write(data))
            rows[index]["gradcam"] = _join(gradcam_dir, f"{rows[index]['image_id']}.png")
    return pa.Table.from_pylist(rows, schema=result_schema(served.classes))


@dataclass(frozen=True)
class BlockPlan:
    """One block: its records and the part file that records it done."""

    index: int
    records: pd.DataFrame
    part: str  # file name under the parts folder


def plan_blocks(records: pd.DataFrame, batch_size: int, salt: str) -> list[BlockPlan]:
    """Blocks of ``batch_size`` records in image-id order, each named by a hash of its images and of ``salt``
    (what shapes the answers): a part with that name is the finished block, whatever run wrote it."""
    records = records.sort_values("image_id").reset_index(drop=True)
    blocks = []
    for index, start in enumerate(range(0, len(records), max(1, batch_size))):
        chunk = records.iloc[start : start + batch_size]
        digest = hashlib.sha256(salt.encode())
        for image_id, uri, fingerprint in zip(chunk["image_id"], chunk["uri"], chunk["fingerprint"], strict=True):
            digest.update(f"\n{image_id}|{uri}|{fingerprint}".encode())
        blocks.append(BlockPlan(index, chunk, f"part-{index:06d}-{digest.hexdigest()[:16]}.parquet"))
    return blocks


def write_part(table: pa.Table, parts: str, name: str) -> None:
    filesystem, folder = open_location(parts, "--out")
    write_atomically(filesystem, f"{folder}/{name}", lambda sink: pq.write_table(table, sink))


class PredictActor:
    """Ray Data actor: one model replica (one GPU, or one CPU core) that predicts blocks and writes their parts."""

    def __init__(
        self,
        served: ServedModel,
        sc: ServeConfig,
        parts: str,
        tta: bool,
        gradcam_dir: str | None,
        loader: Loader = read_source_bytes,
    ):
        import cv2
        import torch

        cv2.setNumThreads(1)  # one actor per core: OpenCV's and torch's own thread pools would oversubscribe it
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cpu":
            torch.set_num_threads(1)
        # the model the driver loaded, shipped through Ray's object store: an actor on another node reads nothing
        # from the driver's disk
        self.served = served_on(served, device)
        self.sc, self.parts, self.tta, self.gradcam_dir, self.loader = sc, parts, tta, gradcam_dir, loader

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        done = []
        # one model call and one part per block, whatever rows Ray Data hands over at once
        for part, block in batch.groupby("part", sort=True):
            table = predict_block(
                self.served,
                block.drop(columns="part"),
                max_pixels=self.sc.max_pixels,
                tta=self.tta,
                gradcam_dir=self.gradcam_dir,
                loader=self.loader,
            )
            write_part(table, self.parts, str(part))
            done.append({"part": part, "images": len(block)})
        return pd.DataFrame(done, columns=["part", "images"])


def actor_resources(gpus: float, num_actors: int, use_gpu: bool) -> dict[str, float]:
    """One GPU per replica (a share when there are more replicas than GPUs; a whole one on a cluster whose
    autoscaler adds GPU nodes and has none yet), else one CPU core."""
    if not use_gpu:
        return {"num_cpus": 1}
    return {"num_gpus": min(1.0, gpus / num_actors) if gpus > 0 else 1.0}


@dataclass
class EngineRun:
    """How one engine's pass went: replicas, and when its first block came back (a pool's start-up shows there)."""

    actors: int
    images: int
    blocks: int
    seconds: float
    first_block_s: float
    first_block_images: int

    def steady_images_per_s(self) -> float | None:
        """Images/s after the first block came back; None with fewer than 5 blocks per replica, where it says
        little: the other replicas' blocks in flight when the first one lands count in it, and their time not."""
        later = self.seconds - self.first_block_s
        if later <= 0 or self.blocks < 5 * self.actors:
            return None
        return round((self.images - self.first_block_images) / later, 2)


class _Clock:
    """Counts images as blocks finish and notes when the first one did."""

    def __init__(self, total: int, progress: Progress):
        self.start = time.perf_counter()
        self.images, self.blocks, self.first_s, self.first_images = 0, 0, 0.0, 0
        self._update = _report_every(total, progress)

    def block_done(self, images: int, blocks: int = 1) -> None:
        self.images += images
        self.blocks += blocks
        if not self.first_images:
            self.first_s, self.first_images = time.perf_counter() - self.start, images
        self._update(images)

    def run(self, actors: int) -> EngineRun:
        seconds = time.perf_counter() - self.start
        return EngineRun(
            actors, self.images, self.blocks, round(seconds, 3), round(self.first_s, 3), self.first_images
        )


def _report_every(total: int, progress: Progress) -> Callable[[int], None]:
    """A callback taking images done: the command's progress bar (plain lines off a terminal), or without one a
    line every :data:`PROGRESS_EVERY_S` seconds and at the end."""
    from skinsynth.core.console import counter

    bar = counter("predict", total, "images") if progress is print else None
    if bar is not None:
        return bar.update
    state = {"done": 0, "start": time.perf_counter(), "last": time.perf_counter()}

    def update(images: int) -> None:
        state["done"] += images
        now = time.perf_counter()
        if now - state["last"] >= PROGRESS_EVERY_S or state["done"] >= total:
            rate = state["done"] / max(now - state["start"], 1e-9)
            progress(f"predict: {state['done']}/{total} images ({state['done'] / max(total, 1):.0%}), {rate:.1f}/s")
            state["last"] = now

    return update


def run_ray(
    blocks: list[BlockPlan],
    served: ServedModel,
    sc: ServeConfig,
    pc: PredictConfig,
    *,
    parts: str,
    tta: bool,
    gradcam_dir: str | None,
    progress: Progress,
    loader: Loader = read_source_bytes,
) -> EngineRun:
    """Predict ``blocks`` with a Ray Data actor pool."""
    import ray
    import ray.data

    from skinsynth.core.ray import ensure_ray, quiet_ray_data, resolve_use_gpu

    ensure_ray()
    quiet_ray_data()  # our own progress lines instead of Ray Data's blocks
    use_gpu = resolve_use_gpu(pc.use_gpu, "predict.use_gpu")
    resources = ray.cluster_resources()
    slots = max(1, int(resources.get("GPU", 0)) if use_gpu else int(resources.get("CPU", 1)))
    # never more replicas than the cluster can place (one that cannot be placed is waited for), nor than blocks
    actors = max(1, min(pc.num_actors or slots, slots, len(blocks)))
    frames = [b.records.assign(part=b.part) for b in blocks]
    clock = _Clock(sum(len(b.records) for b in blocks), progress)
    results = ray.data.from_pandas(frames).map_batches(
        PredictActor,
        batch_format="pandas",
        batch_size=None,  # a whole block per call: one model batch, one part file
        fn_constructor_kwargs={
            "served": served,
            "sc": sc,
            "parts": parts,
            "tta": tta,
            "gradcam_dir": gradcam_dir,
            "loader": loader,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        **actor_resources(resources.get("GPU", 0), actors, use_gpu),
    )
    for batch in results.iter_batches(batch_format="pandas", batch_size=None):
        clock.block_done(int(batch["images"].sum()), len(batch))
    return clock.run(actors)


def run_local(
    blocks: list[BlockPlan],
    served: ServedModel,
    sc: ServeConfig,
    *,
    parts: str,
    tta: bool,
    gradcam_dir: str | None,
    progress: Progress,
    loader: Loader = read_source_bytes,
) -> EngineRun:
    """The same blocks in a plain single-process loop (the baseline of ``skinsynth bench predict``)."""
    import cv2

    cv2.setNumThreads(1)  # as the endpoint sets it; torch keeps its default threads, as a plain script would
    clock = _Clock(sum(len(b.records) for b in blocks), progress)
    for block in blocks:
        table = predict_block(
            served, block.records, max_pixels=sc.max_pixels, tta=tta, gradcam_dir=gradcam_dir, loader=loader
        )
        write_part(table, parts, block.part)
        clock.block_done(len(block.records))
    return clock.run(1)


# --- the command -------------------------------------------------------------------------------------------------


@dataclass
class PredictResult:
    """What ``predict`` did."""

    out: str
    quarantine: str
    images: int  # inputs, quarantined ones included
    predicted: int
    quarantined: int
    blocks: int
    blocks_done_before: int  # found finished from an earlier run: not redone
    blocks_computed: int
    seconds: float
    engine_run: EngineRun | None = None  # None when every block was done before
    test_looks: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def _salt(served: ServedModel, sc: ServeConfig, tta: bool, explain: bool, kind: str) -> str:
    """Everything besides the images that shapes a block's rows: a change redoes every block."""
    settings = {
        "model_id": served.model_id,
        "calibration": served.calibration.summary(),
        "max_pixels": sc.max_pixels,
        "tta": tta,
        "explain": explain,
        "kind": kind,
    }
    return json.dumps(settings, sort_keys=True, default=str)


def _list_input(location: str, split: str | None, outputs: OutputPaths, progress: Progress):
    """The input's listing, inside the run store of a prepared run (pulled, and pushed back when it ends)."""
    import contextlib

    if _is_prepared_run(location):
        from skinsynth.config import RunConfig
        from skinsynth.core.storage import synced_run

        @contextlib.contextmanager
        def opened():
            if split not in SPLITS:  # before any pull
                yield list_prepared(Path(location), location, split)
                return
            with synced_run(RunConfig(out=location), progress) as store:
                yield list_prepared(store.local, location, split)

        return opened()
    if split is not None:
        raise PredictError(f"--split applies to a prepared run; {display_uri(location)} is a folder")
    return contextlib.nullcontext(list_folder(location, outputs.local_paths(), progress))


def batch_predict(
    model_dir: str | Path,
    input_location: str,
    out: str,
    *,
    sc: ServeConfig,
    pc: PredictConfig,
    split: str | None = None,
    explain: bool = False,
    tta: bool = False,
    engine: str = "ray",
    progress: Progress = print,
    loader: Loader = read_source_bytes,
) -> PredictResult:
    """Score every image of a folder, bucket or prepared run as ``POST /v1/predict`` would, into ``out``.

    Args:
        model_dir: a ``models/<name>`` directory (calibrated on first use, as ``serve`` does).
        input_location: a folder or storage URI of image files, or a prepared run directory (local or URI).
        out: the result table, ``.parquet`` or ``.csv``, local or URI; the quarantine list, Grad-CAM PNGs and the
            resumable parts go next to it (``<stem>.quarantine.csv``, ``<stem>.gradcam/``, ``<stem>.parts/``).
        sc: the ``serve`` section (pixel cap, calibration settings).
        pc: the ``predict`` section (block size, actors, GPU).
        split: a prepared run's split (``train``, ``val``, ``test`` or ``all``); required for a run, refused for a
            folder. ``test`` and ``all`` add one look to the run's test ledger, as ``evaluate`` does.
        explain: write a Grad-CAM PNG per image.
        tta: add the flip spread to the uncertainty.
        engine: ``ray`` (the actor pool) or ``local`` (a plain single-process loop, the benchmark's baseline).
        progress: receives one-line messages.
        loader: reads a file's bytes from its URI (injected so tests can swap it).

    Raises:
        PredictError: an unusable input, output or split.
        ServeError: a model directory that cannot be served.
    """
    import pyarrow.fs as pafs

    from skinsynth.serve.model import load_served_model

    if engine not in ("ray", "local"):
        raise ValueError(f"unknown engine '{engine}' (known: ray, local)")
    started = time.perf_counter()
    outputs = OutputPaths.of(out)
    served = load_served_model(model_dir, sc)  # fails early with its reason; writes the calibration once
    with _list_input(input_location, split, outputs, progress) as listing:
        records = listing.records
        blocks = plan_blocks(records, pc.batch_size, _salt(served, sc, tta, explain, listing.kind))
        filesystem, parts_path = open_location(outputs.parts, "--out")
        filesystem.create_dir(parts_path, recursive=True)
        existing = {
            info.base_name
            for info in filesystem.get_file_info(pafs.FileSelector(parts_path, allow_not_found=True))
            if info.type == pafs.FileType.File
        }
        wanted = {b.part for b in blocks}
        for name in existing - wanted:  # another model's, settings' or input's parts; half-written temporaries
            filesystem.delete_file(f"{parts_path}/{name}")
        todo = [b for b in blocks if b.part not in existing]
        what = f"{listing.split} split of prepared run" if listing.kind == "run" else "folder"
        progress(
            f"predict: {len(records)} images in {what} {display_uri(input_location)}"
            + (f" ({len(listing.quarantine)} refused while listing)" if listing.quarantine else "")
            + (f" ({listing.skipped_hidden} hidden files skipped)" if listing.skipped_hidden else "")
            + f"; model {served.model_id}; {len(blocks) - len(todo)} of {len(blocks)} blocks already done"
        )
        if listing.kind == "run":
            _warn_other_preprocessing(listing, served, progress)
        gradcam_dir = outputs.gradcam if explain else None
        engine_run = None
        if todo:
            common = {"parts": outputs.parts, "tta": tta, "gradcam_dir": gradcam_dir, "progress": progress}
            if engine == "ray":
                engine_run = run_ray(todo, served, sc, pc, loader=loader, **common)
            else:
                engine_run = run_local(todo, served, sc, loader=loader, **common)
        table = _read_parts(filesystem, parts_path, [b.part for b in blocks], served.classes)
        looks = None
        if listing.kind == "run" and listing.split in ("test", "all"):
            looks = _record_test_look(listing, served, table)
        predicted, quarantined = _write_outputs(table, listing, outputs, served, input_location)
    seconds = time.perf_counter() - started
    summary = PredictResult(
        out=outputs.out,
        quarantine=outputs.quarantine,
        images=len(records) + len(listing.quarantine),
        predicted=predicted,
        quarantined=quarantined,
        blocks=len(blocks),
        blocks_done_before=len(blocks) - len(todo),
        blocks_computed=len(todo),
        seconds=round(seconds, 2),
        engine_run=engine_run,
        test_looks=looks,
    )
    progress(
        f"predict: {predicted} predictions in {display_uri(outputs.out)}, {quarantined} quarantined in "
        f"{display_uri(outputs.quarantine)} ({seconds:.1f} s; {len(todo)} blocks computed, "
        f"{len(blocks) - len(todo)} reused)"
    )
    return summary


def _warn_other_preprocessing(listing: PredictInput, served: ServedModel, progress: Progress) -> None:
    """Say so when a prepared run's pixels were made with other settings than the model's (they are scored as they
    are: the originals are not in the run)."""
    from skinsynth.core.rundir import layout

    assert listing.run_dir is not None
    theirs = json.loads(layout(listing.run_dir).data_card.read_text()).get("preprocess", {})
    ours = asdict(served.preprocess)
    differ = sorted(
        k for k in ours if k not in ("estimate_tone", "max_pixels") and k in theirs and theirs[k] != ours[k]
    )
    if differ:
        settings = ", ".join(f"{k} {theirs[k]} (model: {ours[k]})" for k in differ)
        progress(
            f"predict: WARNING {display_uri(listing.location)} was prepared with other settings than the model's "
            f"data ({settings}): its images are scored as they are, which is not what the endpoint would answer for "
            "the originals"
        )


def _read_parts(filesystem: Any, parts_path: str, names: list[str], classes: list[str]) -> pa.Table:
    schema = result_schema(classes)
    tables = []
    for name in names:
        with filesystem.open_input_file(f"{parts_path}/{name}") as source:
            tables.append(pq.read_table(source).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _record_test_look(listing: PredictInput, served: ServedModel, table: pa.Table) -> dict[str, Any]:
    """Predictions on test are a look at it: one ledger line before the table is written, and the count so far."""
    from skinsynth.core.ledger import count_test_looks, record_test_look

    assert listing.run_dir is not None
    frame = table.select(["split", "error"]).to_pandas()
    n_test = int(((frame["split"] == "test") & frame["error"].isna()).sum())
    record_test_look(listing.run_dir, model_id=served.model_id, metrics=["predictions"], n_images=n_test)
    return count_test_looks(listing.run_dir)


def _write_outputs(
    table: pa.Table, listing: PredictInput, outputs: OutputPaths, served: ServedModel, location: str
) -> tuple[int, int]:
    """The predictions table and the quarantine CSV, each written whole; returns their row counts."""
    import pyarrow.compute as pa_compute
    import pyarrow.csv as pacsv

    refused = pa_compute.is_valid(table["error"])
    predictions = table.filter(pa_compute.invert(refused)).drop_columns(["error"])
    if listing.kind == "folder":
        predictions = predictions.drop_columns(["dx", "split"])
    if not bool(pa_compute.any(pa_compute.is_valid(predictions["gradcam"])).as_py() or False):
        predictions = predictions.drop_columns(["gradcam"])
    if not bool(pa_compute.any(pa_compute.is_valid(predictions["tta_std"])).as_py() or False):
        predictions = predictions.drop_columns(["tta_std"])
    predictions = predictions.replace_schema_metadata(
        {
            "disclaimer": DISCLAIMER,
            "model_id": served.model_id,
            "model_dir": str(served.model_dir),
            "input": display_uri(location),
        }
    )
    bad = table.filter(refused).select(["image_id", "uri", "error"]).rename_columns(QUARANTINE_COLUMNS)
    quarantine = pd.concat(
        [pd.DataFrame(listing.quarantine, columns=QUARANTINE_COLUMNS), bad.to_pandas()], ignore_index=True
    ).sort_values("image_id", kind="stable")
    filesystem, out_path = open_location(outputs.out, "--out")
    if out_path.endswith(".csv"):
        write_atomically(filesystem, out_path, lambda sink: pacsv.write_csv(predictions, sink))
    else:
        write_atomically(filesystem, out_path, lambda sink: pq.write_table(predictions, sink))
    q_fs, q_path = open_location(outputs.quarantine, "--out")
    write_atomically(q_fs, q_path, lambda sink: sink.write(quarantine.to_csv(index=False).encode()))
    return predictions.num_rows, len(quarantine)


def quarantine_lines(quarantine_location: str) -> list[str]:
    """The first quarantined files and their reasons, for the terminal."""
    filesystem, path = open_location(quarantine_location, "--out")
    with filesystem.open_input_stream(path) as source:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    lines = [f"  quarantined {r.image_id}: {r.reason}" for r in frame.head(QUARANTINE_SHOWN).itertuples(index=False)]
    if len(frame) > QUARANTINE_SHOWN:
        lines.append(f"  {len(frame) - QUARANTINE_SHOWN} more in {display_uri(quarantine_location)}")
    return lines
