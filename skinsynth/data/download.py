"""Download public dermoscopy datasets from their official sources (``skinsynth data download``).

Only HAM10000 is known so far. It is published on Harvard Dataverse (doi:10.7910/DVN/DBW86T), so this module
talks to the Dataverse native API:

* ``GET {base}/api/datasets/:persistentId/?persistentId=<doi>`` returns ``{"status": "OK", "data": {...}}`` where
  ``data.latestVersion.files[*]`` describes each file; its ``dataFile`` carries ``id``, ``filename``,
  ``filesize``, ``checksum: {"type": "MD5" | "SHA-1" | "SHA-256" | "SHA-512", "value": ...}`` (plus a legacy
  ``md5`` copy when the type is MD5), ``tabularData`` and, for tabular files that Dataverse ingested into ``.tab``,
  ``originalFileName``, ``originalFileFormat`` and ``originalFileSize``.
* ``GET {base}/api/access/datafile/<id>`` streams the file; ``?format=original`` returns the file as uploaded
  instead of the ingested ``.tab``. For ingested files the stored checksum is that of the saved original
  (Dataverse maintainers in IQSS/dataverse#7275 and #8901), so it is checked against the ``format=original``
  bytes. The checksums are never hard-coded here: they come from the server's own listing.

Downloads are resumable (``<name>.part`` plus an HTTP ``Range`` request), verified, and then unpacked into::

    out_dir/HAM10000_images_part_1/*.jpg
    out_dir/HAM10000_images_part_2/*.jpg
    out_dir/HAM10000_metadata.csv
    out_dir/DOWNLOAD.json          # provenance: DOI, licence, citation, checksums, timestamp
    out_dir/.downloads/            # the verified archives and their markers (lets a re-run skip everything)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import stat
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import requests

from skinsynth import __version__
from skinsynth.errors import SkinsynthError

__all__ = ["DATASETS", "DatasetSpec", "DownloadError", "WantedFile", "download_dataset"]

# Attempts per HTTP request (the first try included) and the base of the exponential backoff between them.
# Module-level so tests can shrink the backoff instead of sleeping for seconds.
RETRIES = 4
BACKOFF_S = 2.0
# Progress lines at most this often, so a multi-GB download does not flood a terminal or a Ray log.
PROGRESS_INTERVAL_S = 2.0
# Read size for downloads. When a connection drops, urllib3 discards the partly filled chunk, so a resume loses at
# most this much; 64 KiB keeps that loss small without measurable per-chunk overhead.
DOWNLOAD_CHUNK_BYTES = 64 << 10
HASH_CHUNK_BYTES = 1 << 20

CACHE_DIRNAME = ".downloads"
MANIFEST_NAME = "DOWNLOAD.json"

# Statuses worth retrying: rate limiting and transient server/proxy failures. Other 4xx/5xx are final.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_OFFLINE_HINT = "skinsynth data download needs internet; alternatively point --path at a local HAM10000 folder"


class DownloadError(SkinsynthError):
    """A download could not be completed; ``str(err)`` is a one-line message meant for a human."""


@dataclass(frozen=True)
class WantedFile:
    """One file of a Dataverse dataset that we need.

    Attributes:
        key: Short stable name used in DOWNLOAD.json (e.g. ``"images_part_1"``).
        stems: Accepted file names without extension, compared case-insensitively with the listing's
            ``filename``, ``originalFileName`` and ``label`` (ingest changes the extension, so we match stems).
        kind: ``"zip"`` (unpacked into ``out_dir/<dest>/``) or ``"table"`` (copied to ``out_dir/<dest>``).
        dest: Directory name (zip) or file name (table) inside ``out_dir``.
    """

    key: str
    stems: tuple[str, ...]
    kind: str
    dest: str


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset we know how to fetch from a Dataverse installation."""

    name: str
    title: str
    doi: str
    licence: str
    licence_url: str
    citation: str
    dataset_citation: str
    files: tuple[WantedFile, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


DATASETS: dict[str, DatasetSpec] = {
    "ham10000": DatasetSpec(
        name="ham10000",
        title=(
            "The HAM10000 dataset, a large collection of multi-source dermatoscopic images of common pigmented "
            "skin lesions"
        ),
        doi="doi:10.7910/DVN/DBW86T",
        licence="CC BY-NC 4.0",
        licence_url="https://creativecommons.org/licenses/by-nc/4.0/",
        citation=(
            "Tschandl, P., Rosendahl, C. & Kittler, H. The HAM10000 dataset, a large collection of multi-source "
            "dermatoscopic images of common pigmented skin lesions. Sci. Data 5, 180161 (2018). "
            "https://doi.org/10.1038/sdata.2018.161"
        ),
        dataset_citation=(
            'Tschandl, Philipp, 2018, "The HAM10000 dataset, a large collection of multi-source dermatoscopic '
            'images of common pigmented skin lesions", https://doi.org/10.7910/DVN/DBW86T, Harvard Dataverse'
        ),
        files=(
            WantedFile(
                key="images_part_1",
                stems=("HAM10000_images_part_1", "HAM10000_images_part1"),
                kind="zip",
                dest="HAM10000_images_part_1",
            ),
            WantedFile(
                key="images_part_2",
                stems=("HAM10000_images_part_2", "HAM10000_images_part2"),
                kind="zip",
                dest="HAM10000_images_part_2",
            ),
            WantedFile(key="metadata", stems=("HAM10000_metadata",), kind="table", dest="HAM10000_metadata.csv"),
        ),
        notes=("CC BY-NC 4.0: non-commercial use only, with attribution (cite the paper and the dataset).",),
    ),
}


@dataclass(frozen=True)
class _RemoteFile:
    """A wanted file resolved against the server's listing."""

    wanted: WantedFile
    file_id: int
    local_name: str  # name in the cache dir: the original name for ingested tabular files
    url: str
    params: dict[str, str]
    size: int | None
    checksum_type: str | None  # normalised: md5, sha1, sha256, sha512
    checksum: str | None
    ingested: bool
    original_format: str | None


class _RetryableStatus(Exception):
    """A transient HTTP status (429/5xx) that deserves another attempt."""


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------


def download_dataset(
    name: str,
    out_dir: str | Path,
    *,
    base_url: str = "https://dataverse.harvard.edu",
    progress: Callable[[str], None] = print,
    timeout: float = 60.0,
) -> Path:
    """Download, verify and unpack a known dataset into ``out_dir``.

    Re-running is cheap: files whose verified marker matches the server's checksum are not fetched again, an
    interrupted ``.part`` file is resumed with an HTTP Range request, and archives already unpacked are left alone.

    Args:
        name: Dataset name, a key of :data:`DATASETS` (case-insensitive), e.g. ``"ham10000"``.
        out_dir: Destination folder; created if missing.
        base_url: Dataverse installation to talk to (tests point this at a local server).
        progress: Receives one human-readable line per event (start, progress at most every ~2 s, done, skip).
        timeout: Seconds to wait for a connection or for the next bytes of a response.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`, now holding the unpacked dataset and ``DOWNLOAD.json``.

    Raises:
        ValueError: ``name`` is not a known dataset.
        DownloadError: The server is unreachable, answers with an HTTP error, lacks a wanted file, sends a file
            whose checksum does not match its listing, or an archive contains unsafe paths.
    """
    spec = DATASETS.get(name.strip().lower())
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    base_url = base_url.rstrip("/")
    out = Path(out_dir).expanduser()
    cache = out / CACHE_DIRNAME
    cache.mkdir(parents=True, exist_ok=True)

    with requests.Session() as session:
        session.headers["User-Agent"] = f"skinsynth/{__version__} (+data download)"
        listing = _fetch_listing(session, base_url, spec.doi, timeout=timeout)
        version = listing.get("latestVersion") or {}
        remotes = _resolve_files(spec, version.get("files") or [], base_url)
        progress(
            f"{spec.name}: {spec.doi} version {_version_label(version)} on {base_url}; licence {spec.licence} "
            f"({spec.licence_url}); {len(remotes)} files wanted"
        )
        verified: dict[str, bool] = {}
        for remote in remotes:
            verified[remote.wanted.key] = _download_file(session, remote, cache, progress=progress, timeout=timeout)

    outputs: dict[str, str] = {}
    for remote in remotes:
        archive = cache / remote.local_name
        if remote.wanted.kind == "zip":
            _unpack_zip(archive, out, remote, cache, progress=progress)
        else:
            _place_table(archive, out, remote, progress=progress)
        outputs[remote.wanted.key] = remote.wanted.dest

    manifest = _manifest(spec, base_url, listing, remotes, verified, outputs)
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST_NAME)
    progress(f"{spec.name}: ready in {out} (provenance in {MANIFEST_NAME}; cite: {spec.citation})")
    return out


# --------------------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------------------


def _fetch_listing(session: requests.Session, base_url: str, doi: str, *, timeout: float) -> dict[str, Any]:
    """Fetch the dataset's native-API JSON and return its ``data`` object.

    Args:
        session: HTTP session to use.
        base_url: Dataverse installation, without trailing slash.
        doi: Persistent id, ``doi:...``.
        timeout: Connect/read timeout in seconds.

    Returns:
        The ``data`` member of the response (has ``latestVersion.files``).
    """
    url = f"{base_url}/api/datasets/:persistentId/"
    last: BaseException | None = None
    for attempt in range(RETRIES):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            resp = session.get(url, params={"persistentId": doi}, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            last = exc
            continue
        except requests.RequestException as exc:  # malformed base URL and the like: retrying will not help
            raise DownloadError(f"cannot query {base_url}: {_describe(exc)}") from exc
        if resp.status_code in _RETRY_STATUSES:
            last = _RetryableStatus(f"HTTP {resp.status_code}")
            continue
        if resp.status_code != 200:
            raise DownloadError(
                f"{base_url} answered HTTP {resp.status_code} for dataset {doi}: {_server_message(resp)}"
            )
        try:
            body = resp.json()
        except ValueError as exc:
            raise DownloadError(f"{base_url} sent a dataset listing for {doi} that is not JSON: {exc}") from exc
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict) or body.get("status", "OK") != "OK":
            raise DownloadError(f"{base_url} sent an unexpected dataset listing for {doi}: {str(body)[:200]}")
        return data
    raise DownloadError(_failure_message(base_url, last, f"the listing of {doi}")) from last


def _resolve_files(spec: DatasetSpec, files: list[dict[str, Any]], base_url: str) -> list[_RemoteFile]:
    """Match the wanted files of ``spec`` against the listing's ``files`` array."""
    remotes: list[_RemoteFile] = []
    missing: list[str] = []
    for wanted in spec.files:
        stems = {s.lower() for s in wanted.stems}
        entry = next((f for f in files if stems & _entry_stems(f)), None)
        if entry is None:
            missing.append(wanted.stems[0])
            continue
        remotes.append(_remote_from_entry(wanted, entry, base_url))
    if missing:
        available = sorted({str((f.get("dataFile") or {}).get("filename") or f.get("label")) for f in files})
        raise DownloadError(
            f"{spec.doi} on {base_url} lists no file named {', '.join(missing)} "
            f"(it has: {', '.join(available) or 'no files'}); the dataset may have been reorganised"
        )
    return remotes


def _entry_stems(entry: dict[str, Any]) -> set[str]:
    df = entry.get("dataFile") or {}
    names = (df.get("filename"), df.get("originalFileName"), entry.get("label"))
    return {_stem(str(n)).lower() for n in names if n}


def _stem(name: str) -> str:
    base = PurePosixPath(name).name
    return base.rsplit(".", 1)[0] if "." in base else base


def _remote_from_entry(wanted: WantedFile, entry: dict[str, Any], base_url: str) -> _RemoteFile:
    df = entry.get("dataFile") or {}
    file_id = int(df["id"])
    # Newer servers say so in "tabularData"; older ones only add originalFileFormat to ingested files.
    tabular = df.get("tabularData")
    ingested = bool(tabular) if tabular is not None else bool(df.get("originalFileFormat"))
    ctype, cvalue = _checksum_of(df)
    if ingested:
        # Download the file as uploaded: the ingested .tab differs byte-wise, and the listed checksum (and
        # originalFileSize) describe the saved original, not the .tab.
        original = df.get("originalFileName") or f"{_stem(str(df.get('filename', wanted.stems[0])))}.csv"
        local_name = PurePosixPath(str(original)).name
        size = df.get("originalFileSize")
        params = {"format": "original"}
    else:
        local_name = PurePosixPath(str(df.get("filename") or entry.get("label"))).name
        size = df.get("filesize")
        params = {}
    return _RemoteFile(
        wanted=wanted,
        file_id=file_id,
        local_name=local_name,
        url=f"{base_url}/api/access/datafile/{file_id}",
        params=params,
        size=int(size) if size is not None else None,
        checksum_type=ctype,
        checksum=cvalue,
        ingested=ingested,
        original_format=df.get("originalFileFormat"),
    )


def _checksum_of(df: dict[str, Any]) -> tuple[str | None, str | None]:
    """Return (normalised algorithm, lower-case hex) from a ``dataFile``; ``checksum`` wins over legacy ``md5``."""
    cs = df.get("checksum")
    if isinstance(cs, dict) and cs.get("value") and cs.get("type"):
        algo = _normalise_algo(str(cs["type"]))
        if algo is not None:
            return algo, str(cs["value"]).strip().lower()
    if df.get("md5"):
        return "md5", str(df["md5"]).strip().lower()
    return None, None


def _normalise_algo(kind: str) -> str | None:
    # Dataverse spells them "MD5", "SHA-1", "SHA-256", "SHA-512"; accept hyphen-less variants too.
    algo = kind.lower().replace("-", "").replace("_", "")
    return algo if algo in {"md5", "sha1", "sha256", "sha512"} else None


def _version_label(version: dict[str, Any]) -> str:
    major, minor = version.get("versionNumber"), version.get("versionMinorNumber")
    if major is None:
        return str(version.get("versionState") or "unknown")
    return f"{major}.{minor if minor is not None else 0}"


# --------------------------------------------------------------------------------------------------------------
# Download with resume and verification
# --------------------------------------------------------------------------------------------------------------


def _download_file(
    session: requests.Session,
    remote: _RemoteFile,
    cache: Path,
    *,
    progress: Callable[[str], None],
    timeout: float,
) -> bool:
    """Make ``cache/<local_name>`` hold the verified file, fetching or resuming as needed.

    Args:
        session: HTTP session to use.
        remote: The resolved file.
        cache: Directory that holds downloads, ``.part`` files and markers.
        progress: Line sink.
        timeout: Connect/read timeout in seconds.

    Returns:
        True if a checksum was verified, False if the server published none (size-only check).
    """
    final = cache / remote.local_name
    if _is_verified(final, remote, progress=progress):
        progress(f"{remote.local_name}: already downloaded and verified, skipping")
        return remote.checksum is not None

    part = cache / f"{remote.local_name}.part"
    last: BaseException | None = None
    for attempt in range(RETRIES):
        if attempt:
            delay = BACKOFF_S * 2 ** (attempt - 1)
            progress(f"{remote.local_name}: retry {attempt}/{RETRIES - 1} in {delay:.0f} s after: {_describe(last)}")
            time.sleep(delay)
        try:
            if _fetch_into_part(session, remote, part, progress=progress, timeout=timeout):
                break
            last = OSError("the connection ended before the whole file arrived")
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last = exc
        except _RetryableStatus as exc:
            last = exc
        except requests.RequestException as exc:
            raise DownloadError(f"cannot download {remote.local_name} from {remote.url}: {_describe(exc)}") from exc
    else:
        have = part.stat().st_size if part.exists() else 0
        host = urlsplit(remote.url)
        what = f"{remote.local_name} ({have} bytes kept in {part.name}; re-run to resume)"
        raise DownloadError(_failure_message(f"{host.scheme}://{host.netloc}", last, what)) from last

    verified = _verify(part, remote, progress=progress)
    os.replace(part, final)
    _write_marker(final, remote)
    return verified


def _fetch_into_part(
    session: requests.Session,
    remote: _RemoteFile,
    part: Path,
    *,
    progress: Callable[[str], None],
    timeout: float,
) -> bool:
    """One HTTP attempt: append to (or restart) ``part``; return True once it holds the whole file."""
    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None and offset > remote.size:
        part.unlink()  # longer than the file can be: not ours to resume
        offset = 0
    if remote.size is not None and offset == remote.size and offset > 0:
        return True  # a previous run got every byte but stopped before verifying
    # identity: a compressed transfer would make Range offsets refer to encoded bytes, not to the file.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(
        remote.url, params=remote.params, headers=headers, stream=True, timeout=timeout, allow_redirects=True
    ) as resp:
        if resp.status_code in _RETRY_STATUSES:
            raise _RetryableStatus(f"HTTP {resp.status_code} from {urlsplit(resp.url).netloc}")
        if resp.status_code == 416 and offset:
            # The server thinks our offset is past the end: the .part is stale or from another version.
            progress(f"{remote.local_name}: server refused to resume at byte {offset}; starting over")
            part.unlink()
            return False
        if resp.status_code not in (200, 206):
            hint = " (the file may be restricted or need access approval)" if resp.status_code in (401, 403) else ""
            raise DownloadError(
                f"HTTP {resp.status_code} downloading {remote.local_name} from {remote.url}{hint}: "
                f"{_server_message(resp)}"
            )
        if resp.status_code == 206:
            start = _content_range_start(resp.headers.get("Content-Range", ""))
            if start != offset:
                progress(f"{remote.local_name}: server resumed at byte {start}, not {offset}; starting over")
                part.unlink(missing_ok=True)
                return False
            mode = "ab"
            if offset:
                progress(f"{remote.local_name}: resuming at byte {offset} ({_mb(offset)} MB)")
        else:
            if offset:
                progress(f"{remote.local_name}: server ignored the Range request; starting over")
            offset, mode = 0, "wb"
        total = remote.size
        if total is None and resp.headers.get("Content-Length", "").isdigit():
            total = offset + int(resp.headers["Content-Length"])
        _stream(resp, part, mode, offset, total, remote.local_name, progress)
    done = part.stat().st_size
    return total is None or done >= total


def _stream(
    resp: requests.Response,
    part: Path,
    mode: str,
    offset: int,
    total: int | None,
    label: str,
    progress: Callable[[str], None],
) -> None:
    """Copy the body to ``part`` chunk by chunk, reporting progress at most every PROGRESS_INTERVAL_S."""
    started = last_report = time.monotonic()
    got = 0
    with open(part, mode) as fh:
        for chunk in resp.iter_content(chunk_size=DOWNLOAD_CHUNK_BYTES):
            if not chunk:
                continue
            fh.write(chunk)
            got += len(chunk)
            now = time.monotonic()
            if now - last_report >= PROGRESS_INTERVAL_S:
                last_report = now
                progress(_progress_line(label, offset + got, total, got / max(now - started, 1e-6)))
    elapsed = max(time.monotonic() - started, 1e-6)
    progress(_progress_line(label, offset + got, total, got / elapsed))


def _progress_line(label: str, done: int, total: int | None, rate: float) -> str:
    if total:
        return f"{label}: {_mb(done)}/{_mb(total)} MB ({100 * done / total:.0f}%) at {rate / 1e6:.1f} MB/s"
    return f"{label}: {_mb(done)} MB at {rate / 1e6:.1f} MB/s"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _content_range_start(value: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", value)
    return int(m.group(1)) if m else None


def _verify(part: Path, remote: _RemoteFile, *, progress: Callable[[str], None]) -> bool:
    """Check size and checksum of a complete ``.part``; on mismatch delete it and raise DownloadError."""
    size = part.stat().st_size
    if remote.size is not None and size != remote.size:
        part.unlink()
        raise DownloadError(
            f"size mismatch for {remote.local_name}: expected {remote.size} bytes, got {size}; "
            "the partial file was deleted, re-run to download it again"
        )
    if remote.checksum is None or remote.checksum_type is None:
        progress(
            f"{remote.local_name}: WARNING the server publishes no checksum for this file; only its size "
            f"({'checked' if remote.size is not None else 'unknown, not checked'}) was verified"
        )
        return False
    actual = _hash_file(part, remote.checksum_type)
    if actual != remote.checksum:
        part.unlink()
        what = " (checksum of the original upload, fetched with format=original)" if remote.ingested else ""
        raise DownloadError(
            f"checksum mismatch for {remote.local_name}: expected {remote.checksum_type} {remote.checksum}{what}, "
            f"got {actual}; the corrupt download was deleted, re-run to try again"
        )
    progress(f"{remote.local_name}: {remote.checksum_type} verified ({actual})")
    return True


def _hash_file(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_CHUNK_BYTES), b""):
            h.update(block)
    return h.hexdigest()


def _marker_path(final: Path) -> Path:
    return final.with_name(final.name + ".verified.json")


def _marker_payload(remote: _RemoteFile) -> dict[str, Any]:
    return {
        "file_id": remote.file_id,
        "size": remote.size,
        "checksum_type": remote.checksum_type,
        "checksum": remote.checksum,
    }


def _write_marker(final: Path, remote: _RemoteFile) -> None:
    _marker_path(final).write_text(json.dumps(_marker_payload(remote)) + "\n", encoding="utf-8")


def _is_verified(final: Path, remote: _RemoteFile, *, progress: Callable[[str], None]) -> bool:
    """True if ``final`` is known-good for this listing entry (marker match, else a re-hash that matches)."""
    if not final.exists():
        return False
    size = final.stat().st_size
    if remote.size is not None and size != remote.size:
        return False
    marker = _marker_path(final)
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == _marker_payload(remote):
            return True
    except (OSError, ValueError):
        pass
    if remote.checksum is None or remote.checksum_type is None:
        return False  # nothing to re-check against: fetch again rather than trust an unknown file
    progress(f"{remote.local_name}: found without a matching marker, re-hashing")
    if _hash_file(final, remote.checksum_type) == remote.checksum:
        _write_marker(final, remote)
        return True
    return False


# --------------------------------------------------------------------------------------------------------------
# Unpacking
# --------------------------------------------------------------------------------------------------------------


def _unpack_zip(
    archive: Path, out: Path, remote: _RemoteFile, cache: Path, *, progress: Callable[[str], None]
) -> None:
    """Extract ``archive`` into ``out/<dest>/`` safely and idempotently.

    A single top-level folder in the zip is dropped, so the images land in ``out/<dest>/`` whether the zip holds
    bare JPEGs or a folder (mirrors differ). Extraction goes to a temporary sibling that is renamed into place,
    so an interrupted unpack never leaves a half-filled folder that looks complete.
    """
    dest = out / remote.wanted.dest
    marker = cache / f"{archive.name}.unpacked.json"
    stamp = {"archive": archive.name, "checksum": remote.checksum, "size": remote.size, "dest": remote.wanted.dest}
    try:
        if dest.is_dir() and json.loads(marker.read_text(encoding="utf-8")) == stamp:
            progress(f"{archive.name}: already unpacked in {dest.name}/, skipping")
            return
    except (OSError, ValueError):
        pass

    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        names = [_safe_member_name(archive.name, m) for m in members]
        prefix = _common_top_folder(names)
        tmp = out / f".{remote.wanted.dest}.unpacking"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        root = tmp.resolve()
        progress(f"{archive.name}: unpacking {len(members)} files into {dest.name}/")
        for info, name in zip(members, names, strict=True):
            rel = name[len(prefix) :] if prefix else name
            target = (tmp / rel).resolve()
            # Belt and braces after the name check: the resolved path must stay inside the temporary root.
            if root not in target.parents:
                shutil.rmtree(tmp)
                raise DownloadError(f"refusing to unpack {archive.name}: member {info.filename!r} escapes {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, HASH_CHUNK_BYTES)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    marker.write_text(json.dumps(stamp) + "\n", encoding="utf-8")


def _safe_member_name(archive: str, info: zipfile.ZipInfo) -> str:
    """Return the member's normalised relative name, or raise DownloadError for absolute/``..``/link members."""
    raw = info.filename
    name = raw.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts or not parts:
        raise DownloadError(f"refusing to unpack {archive}: unsafe member path {raw!r} (absolute or contains '..')")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DownloadError(f"refusing to unpack {archive}: member {raw!r} is a symbolic link")
    return "/".join(parts)


def _common_top_folder(names: list[str]) -> str:
    """``"folder/"`` if every member sits under the same single top-level folder, else ``""``."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return f"{tops.pop()}/"
    return ""


def _place_table(archive: Path, out: Path, remote: _RemoteFile, *, progress: Callable[[str], None]) -> None:
    """Copy the verified table to ``out/<dest>`` (atomic replace, so re-runs are idempotent)."""
    if remote.original_format and "csv" not in remote.original_format.lower():
        progress(
            f"{archive.name}: WARNING original format is {remote.original_format}, not CSV; "
            f"saved unchanged as {remote.wanted.dest}"
        )
    dest = out / remote.wanted.dest
    tmp = out / f".{remote.wanted.dest}.tmp"
    shutil.copyfile(archive, tmp)
    os.replace(tmp, dest)


# --------------------------------------------------------------------------------------------------------------
# Provenance and messages
# --------------------------------------------------------------------------------------------------------------


def _manifest(
    spec: DatasetSpec,
    base_url: str,
    listing: dict[str, Any],
    remotes: list[_RemoteFile],
    verified: dict[str, bool],
    outputs: dict[str, str],
) -> dict[str, Any]:
    version = listing.get("latestVersion") or {}
    server_licence = version.get("license")
    if isinstance(server_licence, dict):
        server_licence = server_licence.get("name") or server_licence.get("uri")
    return {
        "dataset": spec.name,
        "title": spec.title,
        "doi": spec.doi,
        "doi_url": f"https://doi.org/{spec.doi.removeprefix('doi:')}",
        "source": base_url,
        "dataset_version": _version_label(version),
        "licence": spec.licence,
        "licence_url": spec.licence_url,
        "licence_reported_by_server": server_licence or version.get("termsOfUse"),
        "citation": spec.citation,
        "dataset_citation": spec.dataset_citation,
        "notes": list(spec.notes),
        "files": [
            {
                "key": r.wanted.key,
                "name": r.local_name,
                "dataverse_file_id": r.file_id,
                "url": r.url + ("?" + "&".join(f"{k}={v}" for k, v in r.params.items()) if r.params else ""),
                "size": r.size,
                "checksum_type": r.checksum_type,
                "checksum": r.checksum,
                "checksum_verified": verified.get(r.wanted.key, False),
                "output": outputs.get(r.wanted.key),
            }
            for r in remotes
        ],
        "downloaded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "skinsynth_version": __version__,
    }


def _server_message(resp: requests.Response) -> str:
    """Dataverse errors are ``{"status": "ERROR", "message": ...}``; fall back to the start of the body."""
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("message"):
            return _one_line(str(body["message"]))
    except ValueError:
        pass
    text = _one_line(resp.text or "")
    return text[:200] if text else (resp.reason or "no details")


def _failure_message(server: str, exc: BaseException | None, what: str) -> str:
    """One line for a request that failed RETRIES times: unreachable server vs. a server that keeps erroring."""
    if isinstance(exc, _RetryableStatus):
        return f"{server} kept failing ({exc}) while fetching {what} after {RETRIES} attempts; try again later"
    return f"cannot reach {server}: {_describe(exc)} while fetching {what} ({_OFFLINE_HINT})"


def _describe(exc: BaseException | None) -> str:
    """Shorten requests' nested exception text to its root cause, e.g. ``[Errno 111] Connection refused``."""
    if exc is None:
        return "unknown error"
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if m:
        return m.group(0).strip()
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection broken mid-transfer"
    return _one_line(text)[:200] or type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())
