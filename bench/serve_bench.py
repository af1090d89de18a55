"""Serving and batch inference on Ray against one process: HTTP requests/s and latency (p50,
p99) of `detdeploy serve` with 1 and 2 replicas, images/s of `batch-infer` with 1 and 2 actors,
and the single-process figures (the same request handling called in a loop; `run_infer`).

Run by hand:  .venv/bin/python bench/serve_bench.py [--model FILE.onnx] [--requests 64]
              [--clients 4] [--images 32] [--replicas 1,2] [--actors 1,2] [--batch 4]
              [--max-batch 4] [--ort-threads 1]

Without --model, the bundled rtmdet (shapes) is exported at 320x320 with a dynamic batch by
`detdeploy export` in a child process. One local Ray cluster (all CPUs, loopback, no
dashboard); requests go to 127.0.0.1 only. Each replica and actor reserves one CPU and runs
ONNX Runtime on --ort-threads threads, as the single process does. Batch-inference times are
wall times of whole runs, actor start-up (opening the model) included; the first Ray Data run
of the process (one image on one actor) is timed apart, as it carries one-time set-up. The
single-process batch figure is `run_infer` without output files (batch-infer writes only
coco_results.json).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from detdeploy.inference.batch import collect_images, run_infer
from detdeploy.models.synthetic_weights import make_image
from detdeploy.runtimes.model_file import read_onnx_metadata
from detdeploy.serving.http_detect import DetectionService, upload_from_body
from detdeploy.serving.ray_cluster import ModelToOpen, connect


def percentile_ms(latencies_s: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(latencies_s) * 1000, q))


def make_images(folder: Path, count: int) -> list[Path]:
    sizes = [(300, 400), (480, 640), (500, 333), (240, 320)]
    paths = []
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        path = folder / f'img{index:03d}.jpg'
        Image.fromarray(make_image(height, width, index)).save(path, quality=90)
        paths.append(path)
    return paths


def single_process_requests(model: ModelToOpen, payloads: list[bytes]) -> dict:
    """The request handling of a replica, called in a loop: decode + detect, one at a time."""
    service = DetectionService(model.open())
    latencies = []
    start = time.perf_counter()
    for payload in payloads:
        begin = time.perf_counter()
        upload = upload_from_body('image/jpeg', payload)
        service.detect([upload.name], [service.decode(upload)])
        latencies.append(time.perf_counter() - begin)
    wall = time.perf_counter() - start
    return {'rps': len(payloads) / wall, 'p50': percentile_ms(latencies, 50),
            'p99': percentile_ms(latencies, 99)}


def http_requests(url: str, payloads: list[bytes], clients: int) -> dict:
    def send(payload: bytes) -> float:
        begin = time.perf_counter()
        response = requests.post(f'{url}/detect', data=payload, timeout=120,
                                 headers={'Content-Type': 'image/jpeg'})
        response.raise_for_status()
        return time.perf_counter() - begin

    for payload in payloads[:clients * 2]:          # warm-up: sessions, first batches
        send(payload)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(send, payloads))
    wall = time.perf_counter() - start
    return {'rps': len(payloads) / wall, 'p50': percentile_ms(latencies, 50),
            'p99': percentile_ms(latencies, 99)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model')
    parser.add_argument('--requests', type=int, default=64)
    parser.add_argument('--clients', type=int, default=4)
    parser.add_argument('--images', type=int, default=32)
    parser.add_argument('--replicas', default='1,2')
    parser.add_argument('--actors', default='1,2')
    parser.add_argument('--batch', type=int, default=4, help='batch-infer images per call')
    parser.add_argument('--max-batch', type=int, default=4, help='serve dynamic batch')
    parser.add_argument('--ort-threads', type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix='serve_bench.'))
    model_path = args.model
    if model_path is None:
        model_path = str(work / 'rtmdet_320.onnx')
        subprocess.run([str(Path(sys.executable).parent / 'detdeploy'), 'export',
                        '--input-size', '320', '--dynamic-batch', '-o', model_path],
                       check=True, capture_output=True)
    model = ModelToOpen(model_path, threads=args.ort_threads)
    metadata = read_onnx_metadata(model_path)
    (work / 'images').mkdir()
    images = make_images(work / 'images', args.images)
    payloads = [images[i % len(images)].read_bytes() for i in range(args.requests)]
    load_before = os.getloadavg()
    rows = []

    single = single_process_requests(model, payloads)
    rows.append(('requests, single process (sequential)', single))
    start = time.perf_counter()
    run_infer(model.open(), collect_images([work / 'images']), None)     # detections only
    rows.append(('batch, single process run_infer', {
        'ips': len(images) / (time.perf_counter() - start)}))

    ray = connect()
    from ray import serve

    from detdeploy.serving.ray_batch import BatchInferOptions, run_batch_infer
    from detdeploy.serving.ray_serve import ServeOptions, build_app
    port = free_port()
    serve.start(http_options={'host': '127.0.0.1', 'port': port})
    for replicas in (int(r) for r in args.replicas.split(',')):
        options = ServeOptions(port=port, replicas=replicas, cpus_per_replica=1.0,
                               max_batch=args.max_batch)
        serve.run(build_app(model, options, metadata), name='bench', route_prefix='/')
        rows.append((f'requests, serve {replicas} replica(s), {args.clients} clients',
                     http_requests(f'http://127.0.0.1:{port}', payloads, args.clients)))
        serve.delete('bench')
    start = time.perf_counter()
    run_batch_infer(model, images[:1], work / 'ray_startup', BatchInferOptions(actors=1))
    rows.append(('batch, first Ray Data run: 1 image, 1 actor (set-up)', {
        'seconds': time.perf_counter() - start}))
    for actors in (int(a) for a in args.actors.split(',')):
        options = BatchInferOptions(actors=actors, batch=args.batch, cpus_per_actor=1.0)
        start = time.perf_counter()
        run_batch_infer(model, collect_images([work / 'images']), work / f'ray_{actors}', options)
        rows.append((f'batch, Ray Data {actors} actor(s), batch {args.batch}', {
            'ips': len(images) / (time.perf_counter() - start)}))
    serve.shutdown()
    ray.shutdown()
    load_after = os.getloadavg()

    print(f'model {model_path} ({metadata.arch}, input {metadata.preprocess.input_size}), '
          f'{args.requests} requests, {args.images} images, ORT threads {args.ort_threads}, '
          f'{os.cpu_count()} CPUs; load average {load_before[0]:.1f} before, '
          f'{load_after[0]:.1f} after')
    print(f'{"what":58s} {"req/s":>7s} {"p50 ms":>8s} {"p99 ms":>8s} {"img/s":>7s} '
          f'{"wall s":>7s}')
    for name, values in rows:
        cells = [f'{values[k]:7.2f}' if k in values else f'{"":7s}' for k in ('rps',)]
        cells += [f'{values[k]:8.1f}' if k in values else f'{"":8s}' for k in ('p50', 'p99')]
        cells += [f'{values[k]:7.2f}' if k in values else f'{"":7s}' for k in ('ips', 'seconds')]
        print(f'{name:58s} ' + ' '.join(cells))
    print(json.dumps({name: values for name, values in rows}))


if __name__ == '__main__':
    main()
