"""Where runs live: a local folder, or any URI pyarrow's filesystem layer resolves (``s3://``, ``gs://``,
``hdfs://``, ``file://``).

A run whose ``run.out`` is a remote URI is worked on in a local copy (``run.cache_dir``, by default
``~/.cache/skinsynth/runs/<scheme>/<bucket>/<path>``):

- every command first **pulls** what the URI already holds that the copy lacks, so a job resubmitted on a fresh
  cluster finds its finished stages (their manifests) and skips them;
- the pipeline **pushes** the copy back after every stage, and every command pushes when it stops, finished,
  failed or interrupted, so nothing already done is lost with the machine;
- Ray Train and Ray Tune write checkpoints and experiment state straight to the URI (``storage_path`` plus
  ``storage_filesystem``): Ray needs storage every node can reach for multi-node runs, and a restarted job resumes
  from there;
- Ray Data reads the prepared and synthetic Parquet shards for training from the URI, since its read tasks may run
  on any node.

A local path (or a ``file://`` URI) is used as it is: no copy, nothing to push.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skinsynth.core.rundir import RAY_TRAIN_FOLDER, TUNE_FOLDER
from skinsynth.errors import SkinsynthError

# written into a local copy: which URI it mirrors (lets code that only has the folder find the remote shards)
REMOTE_MARKER = ".skinsynth-remote.json"
DEFAULT_CACHE = "~/.cache/skinsynth/runs"
# local copies of remote raw-image sources (data.path) and of remote prepared sets read by evaluation and audit
SOURCE_CACHE = "~/.cache/skinsynth/sources"
# chunk size for copies between filesystems: large enough for S3 throughput, small enough for any machine
COPY_CHUNK = 8 << 20


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` (a pyarrow filesystem URI), False for a plain path."""
    return "://" in str(location)


def display_uri(location: str | Path) -> str:
    """``location`` for logs and errors: credentials written into a URI (``s3://key:secret@bucket``) are masked."""
    scheme, sep, rest = str(location).partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return str(location)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


@dataclass(frozen=True)
class RunStore:
    """A run directory: the local folder stages work in and, for a remote run, the filesystem and path it
    mirrors."""

    out: str  # run.out as given
    local: Path
    filesystem: Any = None  # pyarrow.fs.FileSystem of a remote run; None for a local one
    remote_path: str = ""  # the run's path inside ``filesystem``

    @property
    def remote(self) -> bool:
        return self.filesystem is not None

    def ray_storage(self, *parts: str) -> tuple[str, Any]:
        """``(storage_path, storage_filesystem)`` for a Ray Train/Tune ``RunConfig`` under ``RUN_DIR/parts``."""
        if not self.remote:
            return str(self.local.resolve().joinpath(*parts)), None
        return "/".join([self.remote_path.rstrip("/"), *parts]), self.filesystem

    def pull(self) -> int:
        """Copy the files the URI holds and the local copy lacks, holds at another size, or holds older; returns how
        many.

        Checkpoints stay remote: Ray reads them there itself (see :func:`_read_remotely`)."""
        if not self.remote:
            return 0
        return _pull_tree(self.filesystem, self.remote_path, self.local, skip=_read_remotely)

    def push(self) -> int:
        """Copy local files the URI lacks, holds at another size, or holds older; returns how many."""
        if not self.remote:
            return 0
        import pyarrow.fs as pafs

        if not self.local.exists():
            return 0
        files = sorted(p for p in self.local.rglob("*") if p.is_file())
        files = [p for p in files if p.name != REMOTE_MARKER and not p.name.endswith(".part")]
        root = self.remote_path.rstrip("/")
        targets = [f"{root}/{p.relative_to(self.local).as_posix()}" for p in files]
        remote = {info.path: info for info in self.filesystem.get_file_info(targets)}
        sent = []
        for path, target in zip(files, targets, strict=True):
            info, stat = remote[target], path.stat()
            if info.type == pafs.FileType.File and info.size == stat.st_size and _not_older(info, stat):
                continue
            self.filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with open(path, "rb") as source, self.filesystem.open_output_stream(target) as sink:
                while chunk := source.read(COPY_CHUNK):
                    sink.write(chunk)
            sent.append((path, target))
        # object stores stamp the upload time, often to the second: the local file takes that time, so it counts as
        # pushed until it changes again
        for (path, _), info in zip(sent, self.filesystem.get_file_info([t for _, t in sent]), strict=True):
            if info.mtime_ns is not None:
                os.utime(path, ns=(info.mtime_ns, info.mtime_ns))
        return len(sent)


def _pull_tree(filesystem: Any, remote_root: str, local: Path, skip: Callable[[str], bool] | None = None) -> int:
    """Copy every file under ``remote_root`` that ``local`` lacks, holds at another size or holds older than the
    remote copy (``skip``: relative paths to leave remote); returns how many were copied. A pulled file keeps its
    source's mtime, as a pushed one takes its upload's, so a copy in step is never pulled again.

    Age matters as well as size: another machine that re-ran a stage rewrites files at the same size (a manifest
    whose identity hash changed, a split table of the same rows), and a copy kept by size alone would be stale."""
    import pyarrow.fs as pafs

    root = remote_root.rstrip("/")
    if filesystem.get_file_info(root).type == pafs.FileType.NotFound:
        return 0
    copied = 0
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        relative = info.path[len(root) + 1 :]
        if info.type != pafs.FileType.File or (skip is not None and skip(relative)):
            continue
        target = local / relative
        if target.is_file() and target.stat().st_size == info.size and not _remote_newer(info, target.stat()):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        with filesystem.open_input_stream(info.path) as source, open(partial, "wb") as sink:
            while chunk := source.read(COPY_CHUNK):
                sink.write(chunk)
        partial.replace(target)  # an interrupted pull leaves no half file under the real name
        if info.mtime_ns is not None:  # the copy is as old as its source, so push leaves it alone
            os.utime(target, ns=(info.mtime_ns, info.mtime_ns))
        copied += 1
    return copied


def _read_remotely(relative: str) -> bool:
    """Files of a remote run that Ray Train and Tune read from the URI themselves, so no copy pulls them: Ray
    Train's runs (``ray_train/``) and a sweep's trial folders (``tune/<sweep>/<trial folder>/...``)."""
    parts = relative.split("/")
    return parts[0] == RAY_TRAIN_FOLDER or (parts[0] == TUNE_FOLDER and len(parts) > 3)


def _not_older(info: Any, stat: os.stat_result) -> bool:
    """The remote copy was written no earlier than the local file was last changed (no mtime: assume it was)."""
    if info.mtime_ns is None:
        return True
    return info.mtime_ns >= stat.st_mtime_ns


def _remote_newer(info: Any, stat: os.stat_result) -> bool:
    """The remote copy was written after the local file was last changed (no mtime: assume it was not)."""
    return info.mtime_ns is not None and info.mtime_ns > stat.st_mtime_ns


def open_run_store(out: str | Path, cache_dir: str = "") -> RunStore:
    """Resolve ``run.out``: a local path, or a URI and the local copy it is worked on in.

    Raises:
        SkinsynthError: a URI pyarrow cannot resolve (unknown scheme, no credentials, a pyarrow without that
            filesystem).
    """
    out = str(out)
    if not is_uri(out):
        return RunStore(out, Path(out))
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(out)
    except (ValueError, OSError, ImportError) as exc:
        raise SkinsynthError(f"run.out '{display_uri(out)}' is not a storage URI pyarrow can open: {exc}") from exc
    if isinstance(filesystem, pafs.LocalFileSystem):
        return RunStore(out, Path(path))
    scheme = out.split("://", 1)[0]
    local = Path(os.path.expanduser(cache_dir or DEFAULT_CACHE)) / scheme / path.strip("/")
    return RunStore(out, local, filesystem, path)


def local_run_dir(run: Any) -> Path:
    """The folder a run's stages read and write (``run`` is the config's ``run:`` section)."""
    return open_run_store(run.out, getattr(run, "cache_dir", "")).local


def remote_shards(local_dir: str | Path, *parts: str) -> tuple[str, Any]:
    """``(path, filesystem)`` to read ``RUN_DIR/parts`` with Ray Data: the remote copy for a mirrored run (its
    read tasks may run on nodes that have no local copy), else the local folder (filesystem None)."""
    marker = Path(local_dir) / REMOTE_MARKER
    if marker.is_file():
        store = open_run_store(json.loads(marker.read_text())["out"])
        if store.remote:
            return store.ray_storage(*parts)
    return str(Path(local_dir).joinpath(*parts)), None


@contextlib.contextmanager
def synced_run(run: Any, progress: Any = print, push: bool = True) -> Iterator[RunStore]:
    """Open ``run.out`` for a command: pull a remote run's files first, push them back however the command ends
    (``push=False``: a reader, such as a sweep trial, whose results reach the URI another way).

    Raises:
        SkinsynthError: an unusable URI (see :func:`open_run_store`).
    """
    from skinsynth.core.console import set_run_dir

    store = open_run_store(run.out, getattr(run, "cache_dir", ""))
    set_run_dir(store.local)  # the command's log files: RUN_DIR/logs/ (see skinsynth.core.console)
    if not store.remote:
        yield store
        return
    store.local.mkdir(parents=True, exist_ok=True)
    (store.local / REMOTE_MARKER).write_text(json.dumps({"out": store.out}))
    try:
        pulled = store.pull()
    except OSError as exc:  # credentials, endpoint, bucket: say which URI before any work starts
        raise SkinsynthError(f"cannot read run.out '{display_uri(store.out)}': {exc}") from exc
    progress(f"storage: {display_uri(store.out)} <-> local copy {store.local} ({pulled} file(s) pulled)")
    try:
        yield store
    finally:
        if push:
            progress(f"storage: {store.push()} file(s) pushed to {display_uri(store.out)}")


def _filesystem_of(location: str, what: str) -> tuple[Any, str]:
    """``(filesystem, path)`` of a URI, or a :class:`SkinsynthError` naming ``what`` it was given as."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError, ImportError) as exc:
        raise SkinsynthError(f"{what} '{display_uri(location)}' is not a storage URI pyarrow can open: {exc}") from exc


def source_mirror(location: str) -> Path:
    """Where the local copy of a remote source folder lives (``~/.cache/skinsynth/sources/<scheme>/<path>``): a
    deterministic place, so every node that has pulled it reads from disk (see :func:`read_source_bytes`)."""
    scheme, _, rest = location.partition("://")
    path = rest.split("@", 1)[1] if "@" in rest.split("/", 1)[0] else rest  # no credentials in a folder name
    return Path(os.path.expanduser(SOURCE_CACHE)) / scheme / path.split("?", 1)[0].strip("/")


def mirror_source(location: str, what: str = "data.path", progress: Any = print) -> Path:
    """A local folder holding ``location``: the folder itself for a local path or ``file://`` URI, else the
    remote folder pulled (by size: a second call copies only what changed) into :func:`source_mirror`.

    Raises:
        SkinsynthError: an unusable URI, or one that holds nothing.
    """
    if not is_uri(location):
        return Path(location).expanduser()
    import pyarrow.fs as pafs

    filesystem, path = _filesystem_of(location, what)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return Path(path)
    local = source_mirror(location)
    try:
        if filesystem.get_file_info(path.rstrip("/")).type == pafs.FileType.NotFound:
            raise SkinsynthError(f"{what} '{display_uri(location)}' does not exist")
        copied = _pull_tree(filesystem, path, local)
    except OSError as exc:  # credentials, endpoint, bucket
        raise SkinsynthError(f"cannot read {what} '{display_uri(location)}': {exc}") from exc
    progress(f"storage: {display_uri(location)} -> local copy {local} ({copied} file(s) pulled)")
    return local


def remote_uri_of(local_file: str | Path, mirror: Path, location: str) -> str:
    """The URI of a file found in the local copy ``mirror`` of the remote folder ``location``."""
    relative = Path(local_file).relative_to(mirror).as_posix()
    base, sep, query = location.partition("?")
    return f"{base.rstrip('/')}/{relative}{sep}{query}"


def read_source_bytes(location: str | Path) -> bytes:
    """The bytes of one source file: a local path, or a URI - read from this node's copy of it when
    :func:`mirror_source` pulled one here, else from the URI itself (a prepare task on another node)."""
    location = str(location)
    if not is_uri(location):
        return Path(location).read_bytes()
    mirrored = source_mirror(location)
    if mirrored.is_file():
        return mirrored.read_bytes()
    filesystem, path = _filesystem_of(location, "source file")
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def local_prepared_copy(location: str | Path, what: str = "prepared set", progress: Any = print) -> Path:
    """A local folder holding the run directory ``location`` for reading (evaluation's external sets, the audit):
    the folder itself when local, else a pulled copy (nothing is pushed back)."""
    location = str(location)
    if not is_uri(location):
        return Path(location)
    store = open_run_store(location)
    if not store.remote:
        return store.local
    try:
        pulled = store.pull()
    except OSError as exc:
        raise SkinsynthError(f"cannot read {what} '{display_uri(location)}': {exc}") from exc
    progress(f"storage: {display_uri(location)} -> local copy {store.local} ({pulled} file(s) pulled)")
    return store.local
