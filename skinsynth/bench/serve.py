"""``skinsynth bench serve``: the Serve endpoint against a plain single-process FastAPI/uvicorn server, same run.

The endpoint itself lives in ``skinsynth.serve``; this module is only the load generator and the comparison. Both
servers serve the same model with the same routes and preprocessing (``skinsynth.serve.app``); the plain server
runs every request on its own, the Serve replica batches them (``@serve.batch``). Load is generated on 127.0.0.1:

- closed loop: ``c`` clients each send the next request as soon as the last one answered, for a fixed time, at
  each concurrency; throughput, p50/p95/p99 latency and errors per level;
- open loop: requests are sent on a fixed schedule (``rate`` per second) whatever the answers do, and latency is
  counted from the scheduled send time, so a stalled server cannot hide its queue (no coordinated omission).

The load generator shares the machine's cores with the servers; the same generator runs against both.
"""

from __future__ import annotations

import http.client
import json
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


def _upload_bodies(n: int = 16) -> list[bytes]:
    """PNG uploads for the load: phantom renders at 128 px (the server preprocesses them like any upload)."""
    import cv2

    from skinsynth.data.phantom import phantom_records, render_phantom

    rows = phantom_records(n, seed=123, image_size=128).to_dict("records")
    return [cv2.imencode(".png", cv2.cvtColor(render_phantom(r), cv2.COLOR_RGB2BGR))[1].tobytes() for r in rows]


def bench_serve(
    cfg,
    model_dir: str | Path,
    *,
    seconds: float = 10.0,
    rate: float = 50.0,
    concurrencies: tuple[int, ...] = CONCURRENCIES,
    progress: Progress = print,
) -> dict[str, Any]:
    """Closed-loop levels and an open-loop rate against the Serve endpoint and the plain server; ratios.

    Args:
        cfg: experiment (``serve`` section: batching, replicas, upload limit).
        model_dir: the model both servers load.
        seconds: duration of each level.
        rate: open-loop requests per second.
        concurrencies: closed-loop client counts.
        progress: receives one-line messages.

    Returns:
        The benchmark record (also printed as a table).
    """
    from ray import serve

    from skinsynth.serve.app import start_endpoint, wait_until_healthy

    model_dir = Path(model_dir)
    sc = cfg.serve
    bodies = _upload_bodies()
    record: dict[str, Any] = {
        "benchmark": "serve",
        "model_dir": str(model_dir),
        "serve": config_to_dict(sc),
        "baseline": "plain FastAPI app on one uvicorn process, same model, routes and preprocessing, no batching",
        "seconds_per_level": seconds,
    }
    for name in ("plain", "serve"):
        if name == "plain":
            process, url = start_plain_server(str(model_dir), sc)
        else:
            sc_bench = ServeConfig(**{**config_to_dict(sc), "port": _free_port()})
            url = start_endpoint(str(model_dir), sc_bench)
            wait_until_healthy(url)
        try:
            closed_loop(url, bodies, 4, 3.0)  # warm-up: first-call allocations, thread pools
            levels = []
            for c in concurrencies:
                level = closed_loop(url, bodies, c, seconds)
                levels.append(level)
                progress(
                    f"bench serve: {name:5s} c={c:3d}  {level['throughput_rps']:7.1f} req/s  p50 {level['p50_ms']} "
                    f"p95 {level['p95_ms']} p99 {level['p99_ms']} ms  errors {level['errors']}"
                )
            paced = open_loop(url, bodies, rate, seconds)
            progress(
                f"bench serve: {name:5s} open loop {rate:.0f} req/s  p50 {paced['p50_ms']} p95 {paced['p95_ms']} "
                f"p99 {paced['p99_ms']} ms  errors {paced['errors']}"
            )
            record[name] = {"closed_loop": levels, "open_loop": paced}
        finally:
            if name == "plain":
                process.terminate()
                process.wait(timeout=30)
            else:
                serve.shutdown()
    ratios = {
        f"c{p['concurrency']}": ratio(s["throughput_rps"], p["throughput_rps"], 2)
        for p, s in zip(record["plain"]["closed_loop"], record["serve"]["closed_loop"], strict=True)
    }
    record["throughput_ratio_serve_vs_plain"] = ratios
    with_machine(record)
    progress("bench serve: throughput ratio Serve / plain: " + ", ".join(f"{k} {v}x" for k, v in ratios.items()))
    return record
