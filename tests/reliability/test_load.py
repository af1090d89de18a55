"""Load: one ONNX Runtime session shared by 8 threads, and `infer` streaming 1,000 images.

Memory is the process's resident set from /proc/self/status (VmRSS now, VmHWM peak). No timing
assertions: the machine is shared. `bench/soak_bench.py` runs the same at 640x640 and prints
the figures.
"""
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.runtimes.backend import Backend
from detdeploy.runtimes.preprocess import preprocess

INPUT_HW = (64, 64)
THREADS = 8
INFERENCES = 2000
WARMUP = 200
SHARED_SESSION_GROWTH_MB = 100     # generous: measured +0.1 to +0.8 MB after warm-up
STREAM_GROWTH_MB = 25              # 800 more images of 128x128 (39 MB of pixels) must not stay


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux: "5" to /proc/self/clear_refs)."""
    try:
        Path('/proc/self/clear_refs').write_text('5')
        return True
    except OSError:
        return False


def rss_mb(field: str = 'VmRSS') -> float:
    """Resident memory of this process in MB (VmRSS: now, VmHWM: peak), from /proc."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f'{field} not in /proc/self/status')


@pytest.fixture(scope='module')
def onnx_model(tmp_path_factory, tiny_checkpoint):
    """rtmdet-tiny (synthetic weights from the saved checkpoint) exported at 64x64,
    `--nms onnx`, deploy preset, unsimplified. Exported once per session: the same file as
    test_preprocess_property.py's (an export takes 15-30 s on this busy machine)."""
    import torch

    from detdeploy.export.exporter import ExportOptions, export_onnx
    from detdeploy.models import load_detector
    from detdeploy.models.rtmdet import DEPLOY_NMS
    path = tmp_path_factory.getbasetemp() / 'reliability_tiny_64x64.onnx'
    if not path.exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)       # far faster than two on a busy 2-core machine
        try:
            export_onnx(load_detector('rtmdet-tiny', tiny_checkpoint), path,
                        ExportOptions(nms_mode='onnx', nms=DEPLOY_NMS, input_hw=INPUT_HW,
                                      simplify=False))
        finally:
            torch.set_num_threads(threads)
    return path


def test_one_session_shared_by_8_threads(onnx_model):
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    backend = OnnxRuntimeBackend(onnx_model, OrtOptions(threads=1))
    config = PreprocessConfig(input_size=INPUT_HW)
    batches = [preprocess(make_image(h, w, seed), config)[0][None]
               for seed, (h, w) in enumerate([(64, 64), (48, 80), (100, 30), (37, 41)] * 4)]
    reference = [backend.run(batch) for batch in batches]     # sequential, one thread
    assert any(int(r[0][0, 0]) > 0 for r in reference)
    errors, mismatches, done = [], [], []
    lock = threading.Lock()

    def worker(worker_index: int, count: int) -> None:
        for step in range(count):
            which = (worker_index * 5 + step) % len(batches)
            try:
                outputs = backend.run(batches[which])
            except Exception as exc:   # anything at all is a failure of the shared session
                with lock:
                    errors.append(repr(exc))
                continue
            same = all(np.array_equal(a, b) for a, b in zip(outputs, reference[which]))
            with lock:
                done.append(1)
                if not same:
                    mismatches.append(which)

    def run_all(total: int) -> None:
        with ThreadPoolExecutor(THREADS) as pool:
            share = total // THREADS
            list(pool.map(worker, range(THREADS), [share] * THREADS))

    before = rss_mb()
    run_all(WARMUP)
    after_warmup = rss_mb()
    run_all(INFERENCES - WARMUP)
    at_end = rss_mb()
    print(f'RSS MB: before {before:.1f}, after warm-up {after_warmup:.1f}, end {at_end:.1f}, '
          f'growth after warm-up {at_end - after_warmup:+.1f}')
    assert errors == []
    assert len(done) == INFERENCES and mismatches == []
    assert at_end - after_warmup < SHARED_SESSION_GROWTH_MB


class RssRecordingBackend(Backend):
    """Wraps a backend; records the resident memory at each run (once per batch)."""

    name = 'rss-recording'

    def __init__(self, backend: Backend):
        self.backend, self.metadata = backend, backend.metadata
        self.rss_mb: list[float] = []

    def _run(self, batch):
        self.rss_mb.append(rss_mb())
        return self.backend.run(batch)


@pytest.fixture(scope='module')
def thousand_images(tmp_path_factory):
    """1,000 PNGs of 128x128 (blocks of colour: small files, 48 KB each once decoded)."""
    folder = tmp_path_factory.mktemp('thousand')
    rng = np.random.default_rng(0)
    for index in range(1000):
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((16, 16, 1), np.uint8))).save(
            folder / f'img_{index:04d}.png', compress_level=1)
    return folder


def test_infer_streams_1000_images_in_bounded_memory(onnx_model, thousand_images):
    """Memory after 200 images and after 1,000 is the same: images and results are not kept
    (1,000 decoded images alone would be 47 MB). Without an output folder: drawing 100 labels
    and writing JSON per image would take minutes here (bench/soak_bench.py runs that path)."""
    from detdeploy.inference.batch import collect_images, run_infer
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    backend = RssRecordingBackend(OnnxRuntimeBackend(onnx_model, OrtOptions(threads=1)))
    images = collect_images([thousand_images])
    assert len(images) == 1000
    peak_was_reset = reset_peak_rss()
    before = rss_mb()
    report = run_infer(backend, images, None, batch_size=8)
    peak = rss_mb('VmHWM') if peak_was_reset else max(backend.rss_mb)
    assert len(report.images) == 1000 and not getattr(report, 'skipped', [])
    assert len(backend.rss_mb) == 125
    at_200, at_1000 = backend.rss_mb[25], backend.rss_mb[-1]
    print(f'RSS MB: before {before:.1f}, at image 200 {at_200:.1f}, at image 1000 '
          f'{at_1000:.1f}, peak during the run {peak:.1f}')
    assert at_1000 - at_200 < STREAM_GROWTH_MB
    assert peak - before < 2 * STREAM_GROWTH_MB
    assert sum(image.num_detections for image in report.images) > 0
