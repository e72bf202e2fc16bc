"""``skinsynth bench serve``: the Serve endpoint behind each of its ingresses against a plain single-process
FastAPI/uvicorn server, all in one run.

The endpoint itself lives in ``skinsynth.serve``; this module is only the load generator and the comparison. Every
server serves the same model with the same routes and preprocessing (``skinsynth.serve.app``); the plain server runs
every request on its own, the Serve replica batches them (``@serve.batch``). The Serve endpoint is measured as users
run it, a ``skinsynth serve`` process on its own local Ray, once per ingress (``serve.ingress``: Serve's Python
proxy actor, and HAProxy straight to the replicas), since Serve reads the ingress when its processes start; each
is stopped with SIGTERM, and its exit code is recorded. Load is generated on 127.0.0.1:

- closed loop: ``c`` clients each send the next request as soon as the last one answered, for a fixed time, at
  each concurrency; throughput, p50/p95/p99 latency and errors per level;
- open loop: requests are sent on a fixed schedule (``rate`` per second) whatever the answers do, and latency is
  counted from the scheduled send time, so a stalled server cannot hide its queue (no coordinated omission).

The load generator shares the machine's cores with the servers; the same generator runs against every server.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from skinsynth.bench import Progress, ratio, with_machine
from skinsynth.config import ServeConfig, config_to_dict

CONCURRENCIES = (1, 8, 32, 64)
INGRESSES = ("proxy", "haproxy")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post_once(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": "image/png"})
    response = conn.getresponse()
    response.read()
    return response.status


def _latency_summary(latencies: list[float], errors: int, seconds: float) -> dict[str, Any]:
    ms = np.asarray(latencies) * 1000.0
    return {
        "requests": len(latencies) + errors,
        "ok": len(latencies),
        "errors": errors,
        "seconds": round(seconds, 2),
        "throughput_rps": round(len(latencies) / seconds, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
    }


def closed_loop(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` clients on keep-alive connections, back to back, for ``seconds``."""
    parts = urlsplit(url)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(worker: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        i = worker
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                ok = _post_once(conn, bodies[i % len(bodies)]) == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
            elapsed = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1
            i += concurrency
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"concurrency": concurrency, **_latency_summary(latencies, errors[0], time.perf_counter() - t0)}


def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """Requests sent at ``rate`` per second on a fixed schedule; latency from the scheduled send time."""
    parts = urlsplit(url)
    local = threading.local()
    n = int(rate * seconds)

    def one(i: int, scheduled: float) -> float | None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        try:
            ok = _post_once(local.conn, bodies[i % len(bodies)]) == 200
        except (OSError, http.client.HTTPException):
            local.conn.close()
            del local.conn
            ok = False
        return time.perf_counter() - scheduled if ok else None

    start = time.perf_counter() + 0.2
    futures = []
    with ThreadPoolExecutor(max_workers=64) as pool:
        for i in range(n):
            scheduled = start + i / rate
            pause = scheduled - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            futures.append(pool.submit(one, i, scheduled))
        results = [f.result() for f in futures]
    seconds_taken = time.perf_counter() - start
    latencies = [r for r in results if r is not None]
    return {"rate_rps": rate, **_latency_summary(latencies, n - len(latencies), seconds_taken)}


def start_plain_server(model_dir: str, sc: ServeConfig) -> tuple[subprocess.Popen, str]:
    """The baseline: ``plain_app`` in one uvicorn process (no Ray, no batching) on a free loopback port."""
    from skinsynth.serve.app import wait_until_healthy

    port = _free_port()
    code = (
        "import json, uvicorn; from skinsynth.config import ServeConfig, section_from_dict; "
        "from skinsynth.serve.app import plain_app; "
        f"sc = section_from_dict(ServeConfig, json.loads({json.dumps(config_to_dict(sc))!r})); "
        f"uvicorn.run(plain_app({model_dir!r}, sc), host='127.0.0.1', port={port}, log_level='warning')"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, timeout_s=180)
    except TimeoutError:
        process.kill()
        raise
    return process, url


def start_serve_command(model_dir: str, sc: ServeConfig, ingress: str) -> tuple[subprocess.Popen, str]:
    """``skinsynth serve`` with ``sc``'s settings and ``ingress`` on a free loopback port, on a local Ray of its own
    (``RAY_ADDRESS`` is dropped: both ingresses are measured on this machine); returns once it answers."""
    from skinsynth.serve.app import wait_until_healthy

    port = _free_port()
    settings = {**config_to_dict(sc), "ingress": ingress}
    flags = [
        f"serve.{key}={json.dumps(value) if not isinstance(value, str) else value}"
        for key, value in settings.items()
        if key not in ("model", "host", "port")
    ]
    command = [sys.executable, "-m", "skinsynth.cli", "serve", "--model", model_dir, "--port", str(port)]
    command += [arg for flag in flags for arg in ("--set", flag)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    # its own process group: the bench's Ctrl-C reaches the bench alone, which then stops the server with SIGTERM
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, timeout_s=300)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return process, url


def stop_serve_command(process: subprocess.Popen, timeout_s: float = 120.0) -> int:
    """SIGTERM (a graceful stop), and a kill of its whole process group if it has not exited within ``timeout_s``;
    returns the exit code (0 for a graceful stop)."""
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = -9
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything left of its Ray
    except ProcessLookupError:
        pass
    process.wait()
    return code


def _upload_bodies(n: int = 16, size: int = 128) -> list[bytes]:
    """PNG uploads for the load: phantom renders at ``size`` px (the server preprocesses them like any upload)."""
    import cv2

    from skinsynth.data.phantom import phantom_records, render_phantom

    rows = phantom_records(n, seed=123, image_size=size).to_dict("records")
    return [cv2.imencode(".png", cv2.cvtColor(render_phantom(r), cv2.COLOR_RGB2BGR))[1].tobytes() for r in rows]


def _measure(name: str, url: str, bodies, concurrencies, seconds: float, rate: float, progress) -> dict[str, Any]:
    closed_loop(url, bodies, 4, 3.0)  # warm-up: first-call allocations, thread pools
    levels = []
    for c in concurrencies:
        level = closed_loop(url, bodies, c, seconds)
        levels.append(level)
        progress(
            f"bench serve: {name:7s} c={c:3d}  {level['throughput_rps']:7.1f} req/s  p50 {level['p50_ms']} "
            f"p95 {level['p95_ms']} p99 {level['p99_ms']} ms  errors {level['errors']}"
        )
    paced = open_loop(url, bodies, rate, seconds)
    progress(
        f"bench serve: {name:7s} open loop {rate:.0f} req/s  p50 {paced['p50_ms']} p95 {paced['p95_ms']} "
        f"p99 {paced['p99_ms']} ms  errors {paced['errors']}"
    )
    return {"closed_loop": levels, "open_loop": paced}


def comparison_table(record: dict[str, Any]) -> list[str]:
    """The record as a table: per server, req/s at each concurrency with its ratio to plain, p50 at the lowest
    concurrency, p99 of the open loop, and errors."""
    plain = record["plain"]
    concurrencies = [level["concurrency"] for level in plain["closed_loop"]]
    rate = plain["open_loop"]["rate_rps"]
    header = ["server"] + [f"req/s c={c}" for c in concurrencies]
    header += [f"p50 c={concurrencies[0]}", f"p99 open {rate:g}/s", "errors"]
    rows = [header]
    for name in ("plain", *[n for n in INGRESSES if n in record]):
        levels, paced = record[name]["closed_loop"], record[name]["open_loop"]
        cells = [name if name == "plain" else f"serve {name}"]
        for level, base in zip(levels, plain["closed_loop"], strict=True):
            cell = f"{level['throughput_rps']:.1f}"
            if name != "plain":
                cell += f" ({ratio(level['throughput_rps'], base['throughput_rps'], 2)}x)"
            cells.append(cell)
        cells += [f"{levels[0]['p50_ms']} ms", f"{paced['p99_ms']} ms"]
        cells.append(str(sum(level["errors"] for level in levels) + paced["errors"]))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def bench_serve(
    cfg,
    model_dir: str | Path,
    *,
    seconds: float = 10.0,
    rate: float = 50.0,
    concurrencies: tuple[int, ...] = CONCURRENCIES,
    ingresses: tuple[str, ...] = INGRESSES,
    image_size: int = 128,
    progress: Progress = print,
) -> dict[str, Any]:
    """Closed-loop levels and an open-loop rate against the plain server and the Serve endpoint behind each
    ingress, one after the other on the same machine; throughput ratios to the plain server.

    Args:
        cfg: experiment (``serve`` section: batching, replicas, upload limit; ``serve.ingress`` is set per run).
        model_dir: the model every server loads.
        seconds: duration of each level.
        rate: open-loop requests per second.
        concurrencies: closed-loop client counts.
        ingresses: the Serve ingresses to measure (``proxy``, ``haproxy``).
        image_size: side in px of the uploaded PNGs (the server resizes them to the model's input size).
        progress: receives one-line messages.

    Returns:
        The benchmark record (also printed as a table).
    """
    from skinsynth.serve.app import check_ingress

    model_dir = Path(model_dir)
    sc = cfg.serve
    if "haproxy" in ingresses:
        check_ingress(ServeConfig(**{**config_to_dict(sc), "ingress": "haproxy"}))
    bodies = _upload_bodies(size=image_size)
    record: dict[str, Any] = {
        "benchmark": "serve",
        "model_dir": str(model_dir),
        "serve": config_to_dict(sc),
        "baseline": "plain FastAPI app on one uvicorn process, same model, routes and preprocessing, no batching",
        "servers": "plain, then `skinsynth serve` on its own local Ray per ingress: " + ", ".join(ingresses),
        "upload_px": image_size,
        "seconds_per_level": seconds,
    }
    for name in ("plain", *ingresses):
        if name == "plain":
            process, url = start_plain_server(str(model_dir), sc)
        else:
            process, url = start_serve_command(str(model_dir), sc, name)
        try:
            record[name] = _measure(name, url, bodies, concurrencies, seconds, rate, progress)
        finally:
            if name == "plain":
                process.terminate()
                process.wait(timeout=30)
            else:
                code = stop_serve_command(process)
                if name in record:
                    record[name]["exit_code_after_sigterm"] = code
    record["throughput_ratio_vs_plain"] = {
        name: {
            f"c{p['concurrency']}": ratio(s["throughput_rps"], p["throughput_rps"], 2)
            for p, s in zip(record["plain"]["closed_loop"], record[name]["closed_loop"], strict=True)
        }
        for name in ingresses
    }
    with_machine(record)
    progress(f"bench serve: {image_size} px uploads, {seconds:g} s per level; req/s (ratio to plain)")
    for line in comparison_table(record):
        progress("bench serve: " + line)
    return record
