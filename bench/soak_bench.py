"""Soak: one ONNX Runtime session shared by many threads, and `infer` streaming many images;
prints whether results stay identical, resident memory (RSS) and throughput.

Run by hand:  .venv/bin/python bench/soak_bench.py [--threads 8] [--inferences 2000]
              [--warmup 200] [--input-size 640] [--ort-threads N] [--images 1000]
              [--image-size 480x640] [--batch 1] [--model FILE.onnx]

rtmdet-tiny with synthetic weights (`randomize_detector`, so NMS has candidates) is exported
with `--nms onnx` at the deploy preset, in a child process: this process imports numpy and
onnxruntime only, as `detdeploy infer model.onnx` does, so its RSS is a deployment's.
Part 1: `--threads` threads share one `OnnxRuntimeBackend` for `--inferences` runs on 16
distinct images, each output compared bit for bit with a sequential run of the same image.
Part 2: `run_infer` over `--images` generated PNGs with JSON and PNG output, RSS sampled at
every batch. RSS from /proc/self/status (VmRSS now, VmHWM peak, reset via clear_refs).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from detdeploy.runtimes.backend import Backend


def rss_mb(field: str = 'VmRSS') -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


def reset_peak_rss() -> bool:
    try:
        Path('/proc/self/clear_refs').write_text('5')
        return True
    except OSError:
        return False


def export_synthetic(path: str, input_hw: tuple[int, int]) -> None:
    """In a child process (imports torch): rtmdet-tiny, synthetic weights, --nms onnx."""
    import torch

    from detdeploy.export.exporter import ExportOptions, export_onnx
    from detdeploy.models import load_detector
    from detdeploy.models.synthetic_weights import randomize_detector
    torch.set_num_threads(1)    # on a busy 2-core machine one thread exports much faster
    torch.manual_seed(0)
    detector = load_detector('rtmdet-tiny')
    randomize_detector(detector.model)
    detector.source = 'synthetic weights (randomize_detector)'
    export_onnx(detector, path, ExportOptions(nms_mode='onnx', nms=detector.spec.nms('deploy'),
                                              input_hw=input_hw))


def blob_image(height: int, width: int, seed: int) -> np.ndarray:
    """Colour blocks on noise (as the tests' make_image, without importing torch)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for _ in range(4):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        image[y0:y0 + height // 3, x0:x0 + width // 3] = rng.integers(80, 255, 3, dtype=np.uint8)
    return image


def parse_hw(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.lower().split('x')]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def shared_session_soak(model: Path, args) -> bool:
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    from detdeploy.runtimes.preprocess import preprocess
    rss_start = rss_mb()
    backend = OnnxRuntimeBackend(model, OrtOptions(threads=args.ort_threads))
    rss_session = rss_mb()
    sizes = [(480, 640), (640, 480), (333, 500), (640, 640)] * 4
    batches = [preprocess(blob_image(h, w, seed), backend.preprocess_config)[0][None]
               for seed, (h, w) in enumerate(sizes)]
    reference = [backend.run(batch) for batch in batches]
    detections = [int(r[0][0, 0]) for r in reference]
    errors, mismatches, done = [], [], [0]
    lock = threading.Lock()

    def worker(index: int, count: int) -> None:
        for step in range(count):
            which = (index * 5 + step) % len(batches)
            try:
                outputs = backend.run(batches[which])
            except Exception as exc:       # any failure of the shared session is reported
                with lock:
                    errors.append(repr(exc))
                continue
            same = all(np.array_equal(a, b) for a, b in zip(outputs, reference[which]))
            with lock:
                done[0] += 1
                if not same:
                    mismatches.append(which)

    def run_all(total: int) -> float:
        started = time.perf_counter()
        shares = [total // args.threads + (i < total % args.threads) for i in range(args.threads)]
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(worker, range(args.threads), shares))
        return time.perf_counter() - started

    reset_peak_rss()
    run_all(args.warmup)
    rss_warm = rss_mb()
    seconds = run_all(args.inferences - args.warmup)
    rss_end, rss_peak = rss_mb(), rss_mb('VmHWM')
    measured = args.inferences - args.warmup
    print(f'part 1: one ONNX Runtime session ({", ".join(backend.providers)}, intra-op threads '
          f'{args.ort_threads or "default"}), {args.threads} threads, {args.inferences} '
          f'inferences ({args.warmup} warm-up), input {args.input_size}')
    print(f'  detections per reference image: {detections}')
    print(f'  completed {done[0]} of {args.inferences}; errors {len(errors)}; outputs differing '
          f'from the sequential run: {len(mismatches)}'
          + (f'; first error: {errors[0]}' if errors else ''))
    print(f'  RSS MB: start {rss_start:.1f}, session loaded {rss_session:.1f}, after warm-up '
          f'{rss_warm:.1f}, end {rss_end:.1f}, peak {rss_peak:.1f}; '
          f'growth after warm-up {rss_end - rss_warm:+.1f}')
    print(f'  throughput after warm-up: {measured / seconds:.2f} inferences/s '
          f'({seconds:.1f} s for {measured})', flush=True)
    return not errors and not mismatches and done[0] == args.inferences


class RssRecordingBackend(Backend):
    """An ONNX Runtime backend whose every run first records the resident memory."""

    name = 'ort'

    def __init__(self, backend: Backend):
        self.backend = backend
        self.metadata = backend.metadata
        self.fallback = backend.fallback
        self.rss_mb: list[float] = []

    def describe(self) -> dict:
        return self.backend.describe()

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        self.rss_mb.append(rss_mb())
        return list(self.backend.run(batch))


def streaming_infer(model: Path, folder: Path, args) -> bool:
    from detdeploy.inference.batch import collect_images, run_infer
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    height, width = parse_hw(args.image_size)
    image_dir = folder / 'images'
    image_dir.mkdir()
    for index in range(args.images):
        Image.fromarray(blob_image(height, width, 1000 + index)).save(
            image_dir / f'img_{index:05d}.png', compress_level=1)
    backend = RssRecordingBackend(OnnxRuntimeBackend(model, OrtOptions(threads=args.ort_threads)))
    images = collect_images([image_dir])
    peak_reset = reset_peak_rss()
    rss_start = rss_mb()
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):          # run_infer's progress bar
        report = run_infer(backend, images, folder / 'out', batch_size=args.batch)
    seconds = time.perf_counter() - started
    peak = rss_mb('VmHWM') if peak_reset else max(backend.rss_mb)
    samples = backend.rss_mb
    fifth = samples[len(samples) // 5]
    print(f'part 2: run_infer over {args.images} PNGs of {height}x{width} (batch {args.batch}, '
          f'JSON + PNG per image, coco_results.json streamed)')
    print(f'  images done {len(report.images)}, skipped {len(getattr(report, "skipped", []))}')
    print(f'  RSS MB: start {rss_start:.1f}, at image {len(images) // 5} {fifth:.1f}, at the last '
          f'image {samples[-1]:.1f}, peak during the run {peak:.1f}; growth from image '
          f'{len(images) // 5} to the last {samples[-1] - fifth:+.1f}')
    print(f'  throughput: {len(report.images) / seconds:.2f} images/s ({seconds:.1f} s)',
          flush=True)
    return len(report.images) == args.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=8)
    parser.add_argument('--inferences', type=int, default=2000)
    parser.add_argument('--warmup', type=int, default=200)
    parser.add_argument('--input-size', default='640', help='network input, 640 or HxW')
    parser.add_argument('--ort-threads', type=int, help='intra-op threads [default: ORT\'s]')
    parser.add_argument('--images', type=int, default=1000, help='part 2 images (0: skip)')
    parser.add_argument('--image-size', default='480x640', help='part 2 image HxW')
    parser.add_argument('--batch', type=int, default=1, help='part 2 batch size')
    parser.add_argument('--model', help='an exported .onnx file instead of the synthetic export')
    args = parser.parse_args()
    if not 0 <= args.warmup < args.inferences:
        parser.error('--warmup must be at least 0 and below --inferences')
    print(f'soak_bench: {os.cpu_count()} CPUs, load average '
          f'{" ".join(f"{v:.2f}" for v in os.getloadavg())}', flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = Path(args.model) if args.model else folder / 'rtmdet-tiny.onnx'
        if not args.model:
            started = time.perf_counter()
            child = multiprocessing.get_context('spawn').Process(
                target=export_synthetic, args=(str(model), parse_hw(args.input_size)))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f'export failed (exit code {child.exitcode})')
            print(f'exported rtmdet-tiny (synthetic weights) at {args.input_size} in '
                  f'{time.perf_counter() - started:.1f} s (child process)', flush=True)
        ok = shared_session_soak(model, args)
        if args.images:
            ok = streaming_infer(model, folder, args) and ok
    print(f'soak_bench: {"ok" if ok else "FAILED"}; load average now '
          f'{" ".join(f"{v:.2f}" for v in os.getloadavg())}')
    raise SystemExit(0 if ok else 1)


if __name__ == '__main__':
    main()
