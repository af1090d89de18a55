"""`detdeploy serve`: a Ray Serve deployment answering image uploads with `infer`'s JSON, with
dynamic batching, replicas and a health route, run until SIGINT or SIGTERM.

Routes: POST /detect (the image as the body, or a multipart form's `image` file) and GET
/health. Refusals are 4xx with a one-line JSON error; failures are 500 without a traceback (that
goes to the replica's log). Request handling itself is `http_detect`, free of Ray.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Callable

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from detdeploy.core.errors import DetdeployError
from detdeploy.core.metadata import ModelMetadata
from detdeploy.runtimes.preprocess import DEFAULT_MAX_PIXELS, allow_pixels

from .http_detect import DEFAULT_MAX_BYTES, DetectionService, RequestError, upload_from_body
from .ray_cluster import LOOPBACK, ModelToOpen, check_room, connect

APP_NAME = 'detdeploy'
DETECT_ROUTE = '/detect'
HEALTH_ROUTE = '/health'
DEFAULT_MAX_BATCH = 8               # dynamic-batch files; a static-batch file uses its own
logger = logging.getLogger('ray.serve')


@dataclass(frozen=True)
class ServeOptions:
    host: str = LOOPBACK
    port: int = 8000
    replicas: int = 1
    cpus_per_replica: float = 1.0           # Ray's scheduling unit; ORT threads follow it
    gpus_per_replica: float = 0.0           # Ray then sets CUDA_VISIBLE_DEVICES per replica
    max_batch: int | None = None            # None: the file's static batch, else 8
    batch_wait_ms: float = 10.0
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    score_thr: float | None = None


def batch_size_for(metadata: ModelMetadata, requested: int | None, source: str) -> int:
    """The largest dynamic batch: a static-batch file's own size (smaller batches are padded
    to it by the backend), else `requested` or 8."""
    if metadata.batch is not None:
        if requested is not None and requested != metadata.batch:
            raise DetdeployError(f'{source} has a static batch of {metadata.batch}, so '
                                 f'--max-batch {requested} cannot differ from it; export with '
                                 '--dynamic-batch for another size')
        return metadata.batch
    return requested or DEFAULT_MAX_BATCH


@serve.deployment
class DetectorDeployment:
    """One replica: its own backend, and a batch queue collecting concurrent requests."""

    def __init__(self, model: ModelToOpen, options: ServeOptions, max_batch: int):
        allow_pixels(options.max_pixels)        # a replica is its own process: Pillow's limit
        self.service = DetectionService(model.open(), options.score_thr, options.max_pixels)
        self.max_bytes = options.max_bytes
        self.detect_batch.set_max_batch_size(max_batch)
        self.detect_batch.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=0.01)
    async def detect_batch(self, named_images: list[tuple]) -> list[dict]:
        names = [name for name, _ in named_images]
        images = [image for _, image in named_images]
        return await asyncio.to_thread(self.service.detect, names, images)

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            return await self._route(request)
        except RequestError as error:
            return JSONResponse({'error': str(error)}, status_code=error.status)
        except Exception:
            logger.exception('detdeploy serve: request failed')
            return JSONResponse({'error': 'internal error while detecting (details are in the '
                                          'server log)'}, status_code=500)

    async def _route(self, request: Request) -> JSONResponse:
        route = request.url.path.rstrip('/') or '/'
        if route == HEALTH_ROUTE:
            if request.method not in ('GET', 'HEAD'):
                raise RequestError(405, f'{HEALTH_ROUTE} takes GET')
            return JSONResponse(self.service.health())
        if route != DETECT_ROUTE:
            raise RequestError(404, f'no route {route}: POST an image to {DETECT_ROUTE}, '
                                    f'GET {HEALTH_ROUTE}')
        if request.method != 'POST':
            raise RequestError(405, f'{DETECT_ROUTE} takes POST with an image')
        body = await self._body(request)
        upload = upload_from_body(request.headers.get('content-type'), body, self.max_bytes)
        image = await asyncio.to_thread(self.service.decode, upload)
        return JSONResponse(await self.detect_batch((upload.name, image)))

    async def _body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it passes `max_bytes`, declared or streamed."""
        declared = request.headers.get('content-length')
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise RequestError(413, f'request body is {declared} bytes, above the limit of '
                                    f'{self.max_bytes} (--max-bytes)')
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_bytes:
                raise RequestError(413, f'request body is above the limit of {self.max_bytes} '
                                        'bytes (--max-bytes)')
            chunks.append(chunk)
        return b''.join(chunks)


def check_port_free(host: str, port: int) -> None:
    """A one-line error now, rather than a proxy retrying to bind later."""
    with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise DetdeployError(f'cannot listen on {host}:{port}: {exc.strerror} (--host, '
                                 '--port)') from None


def build_app(model: ModelToOpen, options: ServeOptions, metadata: ModelMetadata):
    """The Serve application for `model` (bind it with `serve.run`)."""
    max_batch = batch_size_for(metadata, options.max_batch, model.path)
    deployment = DetectorDeployment.options(
        num_replicas=options.replicas,
        ray_actor_options={'num_cpus': options.cpus_per_replica,
                           'num_gpus': options.gpus_per_replica},
        max_ongoing_requests=max(2 * max_batch, 8))
    return deployment.bind(model, options, max_batch)


@dataclass
class ServeReport:
    url: str
    replicas: int
    max_batch: int
    stopped_by: str


def serve_until_signal(model: ModelToOpen, options: ServeOptions, metadata: ModelMetadata,
                       address: str | None = None,
                       on_ready: Callable[[str], None] = lambda url: None) -> ServeReport:
    """Start (or join, with `address`) Ray, run the app on http://host:port, call `on_ready`
    with its URL, and wait for SIGINT or SIGTERM; then delete the app (replicas finish their
    requests first) and shut down the Serve and Ray this started."""
    if not address:     # a running cluster's Serve may hold the port already
        check_port_free(options.host, options.port)
    max_batch = batch_size_for(metadata, options.max_batch, model.path)
    ray = connect(address)
    if not address:
        check_room(ray, options.replicas, options.cpus_per_replica, options.gpus_per_replica,
                   'replicas')
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum, frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    try:
        serve.start(http_options={'host': options.host, 'port': options.port})
        serve.run(build_app(model, options, metadata), name=APP_NAME, route_prefix='/')
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            on_ready(f'http://{options.host}:{options.port}')
            while not stop.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if address:         # someone else's cluster: remove our app only
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return ServeReport(f'http://{options.host}:{options.port}', options.replicas, max_batch,
                       received[0] if received else 'nothing')
