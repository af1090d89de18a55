"""`detdeploy serve` (Ray Serve) and `batch-infer` (Ray Data) against `infer`: real HTTP requests
from concurrent clients to a local deployment, bad uploads refused with 4xx while it stays up,
a clean SIGTERM stop, and a folder on Ray actors giving infer's very files.

One local Ray cluster for the module (2 CPUs, loopback, no dashboard); the CLI runs join it with
--address. Requests go to 127.0.0.1 only, bounded in number and time.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from detdeploy.core.errors import DetdeployError
from detdeploy.inference.batch import collect_images, run_infer
from detdeploy.runtimes.open import open_model_file
from detdeploy.serving.http_detect import (DetectionService, RequestError, Upload,
                                           upload_from_body)

pytestmark = pytest.mark.serving
DETDEPLOY = str(Path(sys.executable).parent / 'detdeploy')
MAX_BYTES = 1_000_000                   # the served endpoint's --max-bytes
REQUEST_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@pytest.fixture(scope='module')
def ray_address():
    """A local Ray cluster for this module; the address CLI runs join."""
    os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
    import ray
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address='127.0.0.1',
             log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope='module')
def infer_reference(tiny_onnx, image_dir, tmp_path_factory):
    """What `infer` writes for image_dir (one image at a time, the CLI's default)."""
    out = tmp_path_factory.mktemp('infer_reference')
    report = run_infer(open_model_file(tiny_onnx[0]), collect_images([image_dir]), out)
    return out, {Path(image.source).name: json.loads(image.json_path.read_text())
                 for image in report.images}


class Server:
    def __init__(self, process: subprocess.Popen, url: str):
        self.process, self.url = process, url

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 90) -> tuple[int, str, str]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        stdout, stderr = self.process.communicate(timeout=timeout_s)
        return self.process.returncode, stdout, stderr


@pytest.fixture(scope='module')
def server(ray_address, tiny_onnx):
    """`detdeploy serve` on the module's cluster: 2 replicas, batches of up to 4."""
    port = free_port()
    process = subprocess.Popen(
        [DETDEPLOY, 'serve', str(tiny_onnx[0]), '--address', ray_address, '--port', str(port),
         '--replicas', '2', '--cpus-per-replica', '0.5', '--max-batch', '4',
         '--batch-wait-ms', '20', '--max-bytes', str(MAX_BYTES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running = Server(process, f'http://127.0.0.1:{port}')
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f'{running.url}/health', timeout=2).status_code == 200:
                break
        except requests.RequestException:      # not listening yet, or busy starting
            pass
        time.sleep(0.5)
    else:
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f'serve did not come up (exit {process.returncode}): {stderr[-2000:]}')
    yield running
    if process.poll() is None:
        process.kill()
        process.communicate()


def post_image(url: str, path: Path, multipart: bool) -> requests.Response:
    data = path.read_bytes()
    if multipart:
        return requests.post(f'{url}/detect', files={'image': (path.name, data, 'image/png')},
                             timeout=REQUEST_TIMEOUT_S)
    return requests.post(f'{url}/detect', data=data, timeout=REQUEST_TIMEOUT_S,
                         headers={'Content-Type': 'application/octet-stream'})


# ---- request handling, without a server -------------------------------------------------------

def test_uploads_are_taken_from_raw_bodies_and_forms():
    png = io.BytesIO()
    Image.new('RGB', (8, 6)).save(png, format='PNG')
    data = png.getvalue() + b'\r\n--edge\r\n'       # bytes a naive form parser would cut
    assert upload_from_body('image/png', data) == Upload('upload', data)
    assert upload_from_body('application/octet-stream', data).data == data
    form = requests.Request('POST', 'http://localhost/detect', data={'note': 'x'},
                            files={'image': ('cat.png', data, 'image/png')}).prepare()
    assert upload_from_body(form.headers['Content-Type'], form.body) == Upload('cat.png', data)


@pytest.mark.parametrize('content_type, body, status', [
    ('text/plain', b'abc', 415), (None, b'abc', 415), ('image/png', b'x' * 101, 413),
    ('multipart/form-data; boundary=zz', b'--zz\r\nContent-Disposition: form-data; '
     b'name="other"\r\n\r\nv\r\n--zz--\r\n', 400)])
def test_refused_uploads_carry_their_status(content_type, body, status):
    with pytest.raises(RequestError) as caught:
        upload_from_body(content_type, body, max_bytes=100)
    assert caught.value.status == status and '\n' not in str(caught.value)


def test_service_answers_as_infer_does_for_any_batch(tiny_onnx, image_dir, infer_reference):
    """Several images of different sizes in one batch: each answer equals infer's file."""
    _, reference = infer_reference
    service = DetectionService(open_model_file(tiny_onnx[0]))
    paths = sorted(image_dir.iterdir())
    uploads = [Upload(p.name, p.read_bytes()) for p in paths]
    answers = service.detect([u.name for u in uploads], [service.decode(u) for u in uploads])
    for path, answer in zip(paths, answers):
        assert answer['detections'] == reference[path.name]['detections']
        assert (answer['height'], answer['width']) == (reference[path.name]['height'],
                                                       reference[path.name]['width'])
    with pytest.raises(RequestError) as caught:
        service.decode(Upload('x.png', paths[0].read_bytes()[:200]))
    assert caught.value.status == 400
    small = DetectionService(service.backend, max_pixels=1000)
    with pytest.raises(RequestError, match='above the limit of 0.001') as caught:
        small.decode(uploads[0])
    assert caught.value.status == 413


def test_workers_open_any_backend_the_file_takes(tiny_onnx, image_dir, tmp_path):
    """serve/batch-infer --backend openvino-f32: what each worker opens is OpenVINO, and its
    answers are `infer --backend openvino-f32`'s."""
    pytest.importorskip('openvino')
    from detdeploy.cli import cli
    from detdeploy.serving.ray_cluster import ModelToOpen
    for name in ('serve', 'batch-infer'):
        [option] = [p for p in cli.commands[name].params if p.name == 'backend']
        assert {'ort', 'trt', 'openvino', 'openvino-f32'} <= set(option.type.choices)
    backend = ModelToOpen(str(tiny_onnx[0]), 'openvino-f32', threads=1).open()
    assert backend.name == 'openvino-f32'
    paths = sorted(image_dir.iterdir())
    report = run_infer(open_model_file(tiny_onnx[0], 'openvino-f32', threads=1),
                       collect_images([image_dir]), tmp_path)
    expected = {Path(image.source).name: json.loads(image.json_path.read_text())
                for image in report.images}
    service = DetectionService(backend)
    uploads = [Upload(p.name, p.read_bytes()) for p in paths]
    answers = service.detect([u.name for u in uploads], [service.decode(u) for u in uploads])
    for path, answer in zip(paths, answers):
        assert answer['detections'] == expected[path.name]['detections']


def test_batches_are_grouped_by_padded_size():
    """With divisor padding (a --dynamic-shape file), images padded to different sizes run in
    separate forward passes, so each is padded as it would be alone; answers keep their order."""
    from dataclasses import replace

    from conftest import fake_metadata
    from detdeploy.runtimes.backend import Backend
    from detdeploy.serving.http_detect import detect_by_canvas

    class ShapeRecorder(Backend):
        name = 'recorder'
        metadata = fake_metadata((64, 64))
        metadata = replace(metadata, preprocess=replace(metadata.preprocess, pad='divisor'))

        def __init__(self):
            self.batch_shapes = []

        def _run(self, batch):
            self.batch_shapes.append(batch.shape)
            size = len(batch)
            return (np.ones((size, 1), np.int32), np.tile([[[2, 2, 10, 10]]], (size, 1, 1)
                                                          ).astype(np.float32),
                    np.full((size, 1), 0.5, np.float32), np.zeros((size, 1), np.int32))

    backend = ShapeRecorder()
    wide, square = np.zeros((32, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)
    found = detect_by_canvas(backend, ['w1', 's1', 'w2'], [wide, square, wide])
    assert backend.batch_shapes == [(2, 3, 32, 64), (1, 3, 64, 64)]
    assert [d.source for d in found] == ['w1', 's1', 'w2']
    assert [d.image_hw for d in found] == [(32, 64), (64, 64), (32, 64)]


def test_failures_answer_500_without_internals(tiny_onnx):
    """A replica whose backend breaks answers 500 with a generic line: no traceback, no
    exception text (the replica's log has them)."""
    from starlette.requests import Request

    from detdeploy.serving.ray_serve import DetectorDeployment

    class BrokenBackend:
        def __init__(self, backend):
            self.metadata, self.name, self.source = backend.metadata, 'broken', 'x'
            self.preprocess_config, self.class_names = (backend.preprocess_config,
                                                        backend.class_names)

        def run(self, batch):
            raise RuntimeError('secret internal detail')

    replica = object.__new__(DetectorDeployment.func_or_class)
    replica.service = DetectionService(BrokenBackend(open_model_file(tiny_onnx[0])))
    replica.max_bytes = MAX_BYTES
    png = io.BytesIO()
    Image.new('RGB', (40, 30)).save(png, format='PNG')

    async def call():
        sent = []

        async def receive():
            if sent:
                return {'type': 'http.disconnect'}
            sent.append(1)
            return {'type': 'http.request', 'body': png.getvalue(), 'more_body': False}
        scope = {'type': 'http', 'method': 'POST', 'path': '/detect', 'query_string': b'',
                 'headers': [(b'content-type', b'image/png')]}
        return await replica(Request(scope, receive))

    response = asyncio.run(call())
    assert response.status_code == 500
    text = response.body.decode()
    assert 'secret' not in text and 'Traceback' not in text and json.loads(text)['error']


def test_static_batch_files_fix_the_batch_size():
    from detdeploy.serving.ray_serve import batch_size_for
    from conftest import fake_metadata
    assert batch_size_for(fake_metadata(batch=None), None, 'm.onnx') == 8
    assert batch_size_for(fake_metadata(batch=None), 3, 'm.onnx') == 3
    assert batch_size_for(fake_metadata(batch=4), None, 'm.onnx') == 4
    with pytest.raises(DetdeployError, match='static batch of 4'):
        batch_size_for(fake_metadata(batch=4), 2, 'm.onnx')


# ---- a real deployment ------------------------------------------------------------------------

def test_health_describes_the_model(server):
    health = requests.get(f'{server.url}/health', timeout=REQUEST_TIMEOUT_S).json()
    assert health['status'] == 'ok' and health['arch'] == 'rtmdet-tiny'
    assert health['input_size'] == [320, 320] and health['batch'] == 'dynamic'


def test_concurrent_clients_get_infer_detections(server, image_dir, infer_reference):
    """12 requests from 6 clients at once (raw bodies and forms, batched by the replicas):
    every answer is the JSON infer writes for that image."""
    _, reference = infer_reference
    jobs = [(path, index % 2 == 0) for index, path in
            enumerate(sorted(image_dir.iterdir()) * 4)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda job: post_image(server.url, *job), jobs))
    for (path, multipart), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        answer = json.loads(response.text)
        assert answer['image'] == (path.name if multipart else 'upload')
        assert {k: v for k, v in answer.items() if k != 'image'} == {
            k: v for k, v in reference[path.name].items() if k != 'image'}


def test_bad_uploads_get_4xx_and_the_server_stays_up(server, image_dir):
    good = image_dir / 'tall.png'
    url = f'{server.url}/detect'
    cases = [
        (requests.post(url, data=b'not an image', headers={'Content-Type': 'image/png'},
                       timeout=REQUEST_TIMEOUT_S), 400),
        (requests.post(url, data=good.read_bytes()[:300], timeout=REQUEST_TIMEOUT_S,
                       headers={'Content-Type': 'image/png'}), 400),
        (requests.post(url, data=b'{}', headers={'Content-Type': 'application/json'},
                       timeout=REQUEST_TIMEOUT_S), 415),
        (requests.post(url, data=os.urandom(MAX_BYTES + 1), timeout=REQUEST_TIMEOUT_S,
                       headers={'Content-Type': 'image/jpeg'}), 413),
        (requests.post(url, files={'photo': ('a.png', good.read_bytes())},
                       timeout=REQUEST_TIMEOUT_S), 400),
        (requests.get(url, timeout=REQUEST_TIMEOUT_S), 405),
        (requests.get(f'{server.url}/nowhere', timeout=REQUEST_TIMEOUT_S), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        error = response.json()['error']
        assert error and '\n' not in error and 'Traceback' not in response.text
    assert post_image(server.url, good, multipart=False).status_code == 200


# ---- Ray Data -------------------------------------------------------------------------------

def test_batch_infer_on_ray_writes_infer_files(ray_address, tiny_onnx, image_dir, tmp_path):
    """A folder (with one broken file) on 2 actors, batches of 2: coco_results.json and the PNGs
    are byte for byte those of single-process infer; the broken file is skipped, exit 2."""
    folder = tmp_path / 'images'
    shutil.copytree(image_dir, folder)
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    expected = tmp_path / 'infer'
    report = run_infer(open_model_file(tiny_onnx[0]), collect_images([folder]), expected)
    assert [s.source for s in report.skipped] == [str(folder / 'broken.jpg')]
    out = tmp_path / 'ray'
    done = subprocess.run(
        [DETDEPLOY, 'batch-infer', str(tiny_onnx[0]), str(folder), '-o', str(out), '--actors',
         '2', '--cpus-per-actor', '0.5', '--batch', '2', '--png', '--address', ray_address],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert 'broken.jpg' in done.stderr and '1 of 4 images could not be read' in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ['coco_results.json', 'gray.png',
                                                    'tall.png', 'wide.png']
    assert (out / 'coco_results.json').read_bytes() == (expected / 'coco_results.json'
                                                        ).read_bytes()
    for name in ('gray.png', 'tall.png', 'wide.png'):
        assert np.array_equal(np.asarray(Image.open(out / name)),
                              np.asarray(Image.open(expected / name)))


def test_batch_infer_refuses_more_cpus_than_the_cluster_has(ray_address, tiny_onnx, image_dir,
                                                            tmp_path):
    from detdeploy.serving.ray_batch import BatchInferOptions, run_batch_infer
    from detdeploy.serving.ray_cluster import ModelToOpen
    with pytest.raises(DetdeployError, match='3 actors x 1 CPUs = 3 CPUs, but the Ray cluster '
                                             'has 2'):
        run_batch_infer(ModelToOpen(str(tiny_onnx[0])), collect_images([image_dir]), tmp_path,
                        BatchInferOptions(actors=3, cpus_per_actor=1.0))
    with pytest.raises(DetdeployError, match='1 actors x 1 GPUs = 1 GPUs'):
        run_batch_infer(ModelToOpen(str(tiny_onnx[0])), collect_images([image_dir]), tmp_path,
                        BatchInferOptions(actors=1, gpus_per_actor=1.0))


def test_sigterm_stops_the_server_cleanly(server):
    """Last: SIGTERM ends `serve` with exit 0 after removing its application."""
    code, stdout, stderr = server.stop(signal.SIGTERM)
    assert code == 0, stderr[-2000:]
    assert 'stopped (SIGTERM)' in stdout and 'Traceback' not in stderr
    try:        # the cluster's Serve proxy outlives our application: 404, or no answer
        status = requests.get(f'{server.url}/health', timeout=5).status_code
    except requests.ConnectionError:
        status = None
    assert status != 200
