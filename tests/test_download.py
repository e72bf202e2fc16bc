"""Tests for skinsynth.data.download against a local fake of the Harvard Dataverse API (127.0.0.1 only).

The fake serves what the real installation serves for doi:10.7910/DVN/DBW86T, in miniature: the native-API dataset
listing (``dataFile`` with ``id``, ``filename``, ``filesize``, ``md5`` and ``checksum``; the metadata table
ingested into ``.tab`` with ``originalFileName``/``originalFileFormat``/``originalFileSize`` and the checksum of
the original upload) and ``/api/access/datafile/<id>`` with Range support and ``format=original``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from skinsynth.data import download as dl
from skinsynth.data.download import DATASETS, DownloadError, download_dataset
from tests.conftest import free_port

DOI = DATASETS["ham10000"].doi
METADATA_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
PART1_IMAGES = ("ISIC_0024306", "ISIC_0024307")
PART2_IMAGES = ("ISIC_0029306", "ISIC_0029307", "ISIC_0029308")
ID_PART1, ID_PART2, ID_META, ID_EXTRA = 101, 102, 103, 104


# ----------------------------------------------------------------------------------------------------------------
# Fixture data built at test time
# ----------------------------------------------------------------------------------------------------------------


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), ((seed * 40) % 256, 90, 160)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _zip(members: dict[str, bytes], *, dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    # Stored, not deflated: keeps the archives big enough for the "cut after N bytes" tests.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for d in dirs:
            zf.writestr(zipfile.ZipInfo(d), b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _images_zip(folder: str | None, image_ids: tuple[str, ...], seed: int) -> bytes:
    prefix = f"{folder}/" if folder else ""
    members = {f"{prefix}{iid}.jpg": _jpeg(seed + i) for i, iid in enumerate(image_ids)}
    return _zip(members, dirs=(prefix,) if prefix else ())


def _metadata_csv() -> bytes:
    rows = [
        ("HAM_0000118", "ISIC_0024306", "bkl", "histo", "80.0", "male", "scalp"),
        ("HAM_0000118", "ISIC_0024307", "bkl", "histo", "80.0", "male", "scalp"),
        ("HAM_0002730", "ISIC_0029306", "nv", "follow_up", "45.0", "female", "back"),
        ("HAM_0001466", "ISIC_0029307", "mel", "histo", "", "unknown", "face"),
        ("HAM_0002761", "ISIC_0029308", "bcc", "consensus", "60.0", "male", "lower extremity"),
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(METADATA_COLUMNS)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _as_tab(csv_bytes: bytes) -> bytes:
    # What ingest produces: tab-separated, quoted strings; deliberately different bytes from the original.
    rows = list(csv.reader(io.StringIO(csv_bytes.decode())))
    return "\n".join("\t".join(f'"{c}"' for c in row) for row in rows).encode() + b"\n"


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class FakeFile:
    file_id: int
    filename: str
    body: bytes  # bytes served by default (the .tab for ingested files)
    original: bytes | None = None  # served for format=original
    original_name: str | None = None
    listed_checksum: str | None = None  # overrides the true checksum in the listing
    checksum_style: str = "both"  # "both" (md5 + checksum object), "legacy" (md5 only) or "none"

    def entry(self) -> dict[str, Any]:
        true = self.original if self.original is not None else self.body
        value = self.listed_checksum or _md5(true)
        df: dict[str, Any] = {
            "id": self.file_id,
            "persistentId": "",
            "filename": self.filename,
            "contentType": "application/zip",
            "filesize": len(self.body),
            "storageIdentifier": f"s3://dvn-cloud:{self.file_id:x}",
            "rootDataFileId": -1,
            "tabularData": False,
            "creationDate": "2018-06-04",
        }
        if self.checksum_style in ("both", "legacy"):
            df["md5"] = value
        if self.checksum_style == "both":
            df["checksum"] = {"type": "MD5", "value": value}
        if self.original is not None:
            df.update(
                contentType="text/tab-separated-values",
                originalFileFormat="text/csv",
                originalFormatLabel="Comma Separated Values",
                originalFileSize=len(self.original),
                originalFileName=self.original_name,
                UNF="UNF:6:AAAAAAAAAAAAAAAAAAAAAA==",
                tabularData=True,
            )
        return {"label": self.filename, "restricted": False, "version": 1, "datasetVersionId": 1, "dataFile": df}


@dataclass
class FakeDataverse:
    """State of the fake server; tests mutate it between calls."""

    files: dict[int, FakeFile]
    base_url: str = ""
    log: list[dict[str, Any]] = field(default_factory=list)
    cut_after: dict[int, int] = field(default_factory=dict)  # file id -> bytes sent before dropping (once)
    fail_once: dict[int, int] = field(default_factory=dict)  # file id -> HTTP status returned once
    ignore_range: bool = False
    listing_status: int = 200
    lock: threading.Lock = field(default_factory=threading.Lock)

    def listing(self) -> dict[str, Any]:
        return {
            "status": "OK",
            "data": {
                "id": 3172585,
                "identifier": "DVN/DBW86T",
                "persistentUrl": "https://doi.org/10.7910/DVN/DBW86T",
                "protocol": "doi",
                "authority": "10.7910",
                "publisher": "Harvard Dataverse",
                "latestVersion": {
                    "id": 1,
                    "versionNumber": 4,
                    "versionMinorNumber": 0,
                    "versionState": "RELEASED",
                    "license": {"name": "CC BY-NC 4.0", "uri": "http://creativecommons.org/licenses/by-nc/4.0"},
                    "files": [f.entry() for f in self.files.values()],
                },
            },
        }

    def file_gets(self, file_id: int | None = None) -> list[dict[str, Any]]:
        return [r for r in self.log if r["file_id"] is not None and file_id in (None, r["file_id"])]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
        pass  # keep pytest output clean

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        fake = self.server.fake
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        m = re.fullmatch(r"/api/access/datafile/(\d+)", url.path)
        with fake.lock:
            fake.log.append(
                {"path": url.path, "query": query, "range": self.headers.get("Range"), "file_id": m and int(m[1])}
            )
        if url.path == "/api/datasets/:persistentId/":
            if fake.listing_status != 200 or query.get("persistentId") != DOI:
                status = fake.listing_status if fake.listing_status != 200 else 404
                msg = f"Dataset with Persistent ID {query.get('persistentId')} not found."
                self._json(status, {"status": "ERROR", "message": msg})
            else:
                self._json(200, fake.listing())
            return
        if m is None or int(m[1]) not in fake.files:
            self._json(404, {"status": "ERROR", "message": "File not found"})
            return
        self._serve_file(fake, fake.files[int(m[1])], query)

    def _serve_file(self, fake: FakeDataverse, f: FakeFile, query: dict[str, str]) -> None:
        status = fake.fail_once.pop(f.file_id, None)
        if status is not None:
            self._json(status, {"status": "ERROR", "message": "temporarily unavailable"})
            return
        body = f.original if (query.get("format") == "original" and f.original is not None) else f.body
        start = 0
        rng = self.headers.get("Range")
        if rng and not fake.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = fake.cut_after.pop(f.file_id, None)
        if cut is not None:
            # Simulate a dropped connection: promise the whole body, send part of it, hang up.
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeDataverse


def _default_files() -> dict[int, FakeFile]:
    meta = _metadata_csv()
    return {
        ID_PART1: FakeFile(
            ID_PART1, "HAM10000_images_part_1.zip", _images_zip("HAM10000_images_part_1", PART1_IMAGES, 1)
        ),
        ID_PART2: FakeFile(
            ID_PART2, "HAM10000_images_part_2.zip", _images_zip("HAM10000_images_part_2", PART2_IMAGES, 5)
        ),
        ID_META: FakeFile(
            ID_META, "HAM10000_metadata.tab", _as_tab(meta), original=meta, original_name="HAM10000_metadata.csv"
        ),
        # Present in the real dataset, not wanted: must never be requested.
        ID_EXTRA: FakeFile(ID_EXTRA, "ISIC2018_Task3_Test_Images.zip", _zip({"ISIC_0034524.jpg": _jpeg(9)})),
    }


CHUNK = 256  # download read size in tests, so the tiny fixture archives span several chunks


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)
    # A dropped connection loses the partly read chunk (urllib3 discards it), so the tests cut on chunk
    # boundaries and can predict the exact resume offset.
    monkeypatch.setattr(dl, "DOWNLOAD_CHUNK_BYTES", CHUNK)


@pytest.fixture
def dataverse() -> Iterator[FakeDataverse]:
    fake = FakeDataverse(files=_default_files())
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = fake
    fake.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _run(fake: FakeDataverse, out: Path, lines: list[str] | None = None) -> Path:
    sink = lines.append if lines is not None else (lambda _line: None)
    return download_dataset("ham10000", out, base_url=fake.base_url, progress=sink, timeout=5.0)


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------


def test_full_download_unpacks_expected_layout_and_manifest(dataverse: FakeDataverse, tmp_path: Path) -> None:
    out = tmp_path / "ham"
    lines: list[str] = []
    assert _run(dataverse, out, lines) == out

    for folder, ids in (("HAM10000_images_part_1", PART1_IMAGES), ("HAM10000_images_part_2", PART2_IMAGES)):
        jpgs = sorted(p.name for p in (out / folder).glob("*.jpg"))
        assert jpgs == sorted(f"{i}.jpg" for i in ids)
        with Image.open(out / folder / jpgs[0]) as im:
            assert im.format == "JPEG" and im.size == (16, 12)
        assert not (out / folder / folder).exists()  # the zip's own top folder was not nested

    meta = out / "HAM10000_metadata.csv"
    assert meta.read_bytes() == dataverse.files[ID_META].original  # the original CSV, not the ingested .tab
    with meta.open(newline="") as fh:
        assert next(csv.reader(fh)) == METADATA_COLUMNS

    meta_gets = dataverse.file_gets(ID_META)
    assert meta_gets and all(r["query"].get("format") == "original" for r in meta_gets)
    assert all("format" not in r["query"] for r in dataverse.file_gets(ID_PART1) + dataverse.file_gets(ID_PART2))
    assert not dataverse.file_gets(ID_EXTRA)

    manifest = json.loads((out / "DOWNLOAD.json").read_text())
    assert manifest["doi"] == DOI and manifest["source"] == dataverse.base_url
    assert manifest["licence"] == "CC BY-NC 4.0" and manifest["licence_reported_by_server"] == "CC BY-NC 4.0"
    assert "Sci. Data 5, 180161" in manifest["citation"]
    assert manifest["dataset_version"] == "4.0"
    assert re.match(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00$", manifest["downloaded_at"])
    by_key = {f["key"]: f for f in manifest["files"]}
    assert set(by_key) == {"images_part_1", "images_part_2", "metadata"}
    assert by_key["images_part_1"]["checksum"] == _md5(dataverse.files[ID_PART1].body)
    assert by_key["metadata"]["checksum"] == _md5(dataverse.files[ID_META].original)
    assert by_key["metadata"]["name"] == "HAM10000_metadata.csv"
    assert all(f["checksum_type"] == "md5" and f["checksum_verified"] for f in manifest["files"])
    assert by_key["images_part_2"]["output"] == "HAM10000_images_part_2"

    assert any("MB/s" in line for line in lines)
    assert not list(out.rglob("*.part"))


def test_connection_cut_is_resumed_with_range_in_same_call(dataverse: FakeDataverse, tmp_path: Path) -> None:
    body = dataverse.files[ID_PART1].body
    cut = (len(body) // 3) // CHUNK * CHUNK
    dataverse.cut_after[ID_PART1] = cut
    out = _run(dataverse, tmp_path / "ham")

    gets = dataverse.file_gets(ID_PART1)
    assert [g["range"] for g in gets] == [None, f"bytes={cut}-"]
    assert (out / ".downloads" / "HAM10000_images_part_1.zip").read_bytes() == body
    assert len(list((out / "HAM10000_images_part_1").glob("*.jpg"))) == len(PART1_IMAGES)


def test_second_call_resumes_interrupted_download(
    dataverse: FakeDataverse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = dataverse.files[ID_PART2].body
    cut = (len(body) // 2) // CHUNK * CHUNK
    dataverse.cut_after[ID_PART2] = cut
    monkeypatch.setattr(dl, "RETRIES", 1)  # no in-call retry: the first call must give up
    out = tmp_path / "ham"
    with pytest.raises(DownloadError, match="re-run to resume"):
        _run(dataverse, out)
    part = out / ".downloads" / "HAM10000_images_part_2.zip.part"
    assert part.stat().st_size == cut
    assert not (out / "DOWNLOAD.json").exists()

    dataverse.log.clear()
    _run(dataverse, out)
    assert [g["range"] for g in dataverse.file_gets(ID_PART2)] == [f"bytes={cut}-"]
    assert not dataverse.file_gets(ID_PART1)  # verified in the first call, not fetched again
    assert (out / ".downloads" / "HAM10000_images_part_2.zip").read_bytes() == body
    assert not part.exists()
    assert (out / "DOWNLOAD.json").exists()


def test_existing_part_file_is_resumed(dataverse: FakeDataverse, tmp_path: Path) -> None:
    body = dataverse.files[ID_PART1].body
    cache = tmp_path / "ham" / ".downloads"
    cache.mkdir(parents=True)
    (cache / "HAM10000_images_part_1.zip.part").write_bytes(body[:300])
    lines: list[str] = []
    _run(dataverse, tmp_path / "ham", lines)
    assert [g["range"] for g in dataverse.file_gets(ID_PART1)] == ["bytes=300-"]
    assert (cache / "HAM10000_images_part_1.zip").read_bytes() == body
    assert any("resuming" in line for line in lines)


def test_server_ignoring_range_starts_over(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.ignore_range = True
    cache = tmp_path / "ham" / ".downloads"
    cache.mkdir(parents=True)
    (cache / "HAM10000_images_part_1.zip.part").write_bytes(b"garbage that must not survive")
    _run(dataverse, tmp_path / "ham")
    assert (cache / "HAM10000_images_part_1.zip").read_bytes() == dataverse.files[ID_PART1].body


def test_transient_http_error_is_retried(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.fail_once[ID_PART2] = 503
    _run(dataverse, tmp_path / "ham")
    assert len(dataverse.file_gets(ID_PART2)) == 2
    assert (tmp_path / "ham" / "HAM10000_images_part_2").is_dir()


def test_checksum_mismatch_raises_and_leaves_no_corrupt_file(dataverse: FakeDataverse, tmp_path: Path) -> None:
    wrong = "0" * 32
    dataverse.files[ID_PART2].listed_checksum = wrong
    actual = _md5(dataverse.files[ID_PART2].body)
    out = tmp_path / "ham"
    with pytest.raises(DownloadError) as err:
        _run(dataverse, out)
    msg = str(err.value)
    assert "checksum mismatch" in msg and "HAM10000_images_part_2.zip" in msg
    assert wrong in msg and actual in msg and "\n" not in msg
    cache = out / ".downloads"
    assert not (cache / "HAM10000_images_part_2.zip").exists()
    assert not (cache / "HAM10000_images_part_2.zip.part").exists()
    assert not (out / "HAM10000_images_part_2").exists()
    assert not (out / "DOWNLOAD.json").exists()


def test_rerun_skips_verified_files(dataverse: FakeDataverse, tmp_path: Path) -> None:
    out = tmp_path / "ham"
    _run(dataverse, out)
    first = json.loads((out / "DOWNLOAD.json").read_text())
    jpg = out / "HAM10000_images_part_1" / f"{PART1_IMAGES[0]}.jpg"
    mtime = jpg.stat().st_mtime_ns

    dataverse.log.clear()
    lines: list[str] = []
    _run(dataverse, out, lines)
    assert dataverse.file_gets() == []  # only the listing was fetched again
    assert sum("already downloaded and verified" in line for line in lines) == 3
    assert sum("already unpacked" in line for line in lines) == 2
    assert jpg.stat().st_mtime_ns == mtime  # not re-extracted
    assert json.loads((out / "DOWNLOAD.json").read_text())["files"] == first["files"]

    # Without the marker the archive is re-hashed, still no download.
    (out / ".downloads" / "HAM10000_images_part_1.zip.verified.json").unlink()
    dataverse.log.clear()
    lines.clear()
    _run(dataverse, out, lines)
    assert dataverse.file_gets() == []
    assert any("re-hashing" in line for line in lines)


def test_corrupt_cached_archive_is_downloaded_again(dataverse: FakeDataverse, tmp_path: Path) -> None:
    out = tmp_path / "ham"
    _run(dataverse, out)
    archive = out / ".downloads" / "HAM10000_images_part_1.zip"
    data = bytearray(archive.read_bytes())
    data[10] ^= 0xFF  # same size, different content
    archive.write_bytes(bytes(data))
    (out / ".downloads" / "HAM10000_images_part_1.zip.verified.json").unlink()
    dataverse.log.clear()
    _run(dataverse, out)
    assert len(dataverse.file_gets(ID_PART1)) == 1
    assert archive.read_bytes() == dataverse.files[ID_PART1].body


@pytest.mark.parametrize("evil", ["../evil.txt", "HAM10000_images_part_1/../../evil.txt", "/tmp/evil.txt"])
def test_zip_with_unsafe_member_is_rejected(dataverse: FakeDataverse, tmp_path: Path, evil: str) -> None:
    members = {f"HAM10000_images_part_1/{PART1_IMAGES[0]}.jpg": _jpeg(1), evil: b"pwned"}
    dataverse.files[ID_PART1].body = _zip(members)
    out = tmp_path / "a" / "ham"
    with pytest.raises(DownloadError, match="refusing to unpack HAM10000_images_part_1.zip"):
        _run(dataverse, out)
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (out / "HAM10000_images_part_1").exists()
    assert not (out / "DOWNLOAD.json").exists()


def test_flat_zip_still_lands_in_named_folder(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.files[ID_PART1].body = _images_zip(None, PART1_IMAGES, 1)
    out = _run(dataverse, tmp_path / "ham")
    assert sorted(p.name for p in (out / "HAM10000_images_part_1").iterdir()) == [f"{i}.jpg" for i in PART1_IMAGES]


def test_legacy_md5_field_and_missing_checksum(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.files[ID_PART1].checksum_style = "legacy"  # only "md5", as older Dataverse versions send
    dataverse.files[ID_PART2].checksum_style = "none"
    lines: list[str] = []
    out = _run(dataverse, tmp_path / "ham", lines)
    files = {f["key"]: f for f in json.loads((out / "DOWNLOAD.json").read_text())["files"]}
    assert files["images_part_1"]["checksum_verified"] is True
    assert files["images_part_2"]["checksum_verified"] is False
    assert any("HAM10000_images_part_2.zip: WARNING" in line and "size" in line for line in lines)


def test_malformed_base_url_raises_download_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="cannot query"):
        download_dataset("ham10000", tmp_path, base_url="dataverse.example", progress=lambda _: None)


def test_unknown_dataset_name_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known datasets: ham10000"):
        download_dataset("isic2099", tmp_path)


def test_unreachable_server_raises_clear_download_error(tmp_path: Path) -> None:
    port = free_port()
    # The port is closed now: connections are refused at once.
    with pytest.raises(DownloadError) as err:
        download_dataset("ham10000", tmp_path, base_url=f"http://127.0.0.1:{port}", progress=lambda _: None)
    msg = str(err.value)
    assert msg.startswith(f"cannot reach http://127.0.0.1:{port}:")
    assert "needs internet" in msg and "--path" in msg and "\n" not in msg


def test_listing_http_error_raises_download_error(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.listing_status = 403
    with pytest.raises(DownloadError, match=r"HTTP 403 for dataset doi:10\.7910/DVN/DBW86T"):
        _run(dataverse, tmp_path / "ham")


def test_missing_file_in_listing_raises(dataverse: FakeDataverse, tmp_path: Path) -> None:
    del dataverse.files[ID_PART2]
    with pytest.raises(DownloadError, match="lists no file named HAM10000_images_part_2") as err:
        _run(dataverse, tmp_path / "ham")
    assert "HAM10000_images_part_1.zip" in str(err.value)  # tells what is there instead
    assert dataverse.file_gets() == []  # nothing downloaded before the listing was validated


def test_cli_download_gives_a_folder_the_ham10000_source_reads(
    dataverse: FakeDataverse, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from skinsynth.cli import main
    from skinsynth.data.sources import list_ham10000

    out = tmp_path / "ham"
    assert main(["data", "download", "ham10000", "--out", str(out), "--base-url", dataverse.base_url]) == 0
    assert f"skinsynth data prepare --source ham10000 --path {out}" in capsys.readouterr().out
    listing = list_ham10000(str(out))
    assert set(listing.records["image_id"]) == set(PART1_IMAGES + PART2_IMAGES)
    assert listing.quarantine == []
    by_id = listing.records.set_index("image_id")
    assert by_id.at["ISIC_0024306", "group_id"] == by_id.at["ISIC_0024307", "group_id"] == "HAM_0000118"


def test_cli_download_without_network_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from skinsynth.cli import main

    code = main(["data", "download", "ham10000", "--out", str(tmp_path / "x"), "--base-url", "http://127.0.0.1:9"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("skinsynth: error: cannot reach http://127.0.0.1:9")
