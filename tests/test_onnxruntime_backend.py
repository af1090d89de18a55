"""The ONNX Runtime backend against the PyTorch backend, provider reporting, threads, no torch."""
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_detections_agree, make_image
from detdeploy.core.errors import DetdeployError
from detdeploy.models.rtmdet import DEPLOY_NMS
from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from detdeploy.runtimes.pipeline import detect
from detdeploy.runtimes.torch_backend import TorchBackend

DETDEPLOY = str(Path(sys.executable).parent / 'detdeploy')
IMAGES = [make_image(300, 400, 30), make_image(500, 333, 31), make_image(97, 203, 32)]


@pytest.fixture(scope='module')
def ort_backend(tiny_onnx):
    return OnnxRuntimeBackend(tiny_onnx[0])


def assert_same_detections(a, b, **tolerances):
    """Two ImageDetections (original pixels) agree."""
    assert_detections_agree((a.boxes_xyxy_px, a.scores, a.labels),
                            (b.boxes_xyxy_px, b.scores, b.labels), DEPLOY_NMS.score_thr,
                            **tolerances)


@pytest.mark.parametrize('batch_size', [1, 3])
def test_ort_and_torch_agree_in_original_pixels(ort_backend, tiny_detector, batch_size):
    torch_backend = TorchBackend(tiny_detector, nms=DEPLOY_NMS,
                                 preprocess_config=ort_backend.preprocess_config)
    ours = [d for d, _ in detect(ort_backend, IMAGES, batch_size)]
    reference = [d for d, _ in detect(torch_backend, IMAGES, batch_size)]
    for image, a, b in zip(IMAGES, ours, reference):
        assert a.image_hw == image.shape[:2] and len(a) > 0
        assert (a.boxes_xyxy_px[:, 2] <= image.shape[1]).all()
        assert (a.boxes_xyxy_px[:, 3] <= image.shape[0]).all()
        assert_same_detections(a, b)


def test_grayscale_rgba_and_odd_sizes(ort_backend):
    gray = make_image(61, 37, 40)[:, :, 0]
    rgba = np.dstack([make_image(33, 129, 41), np.full((33, 129), 255, np.uint8)])
    results = [d for d, _ in detect(ort_backend, [gray, rgba, np.zeros((1, 1, 3), np.uint8)], 2)]
    assert [r.image_hw for r in results] == [(61, 37), (33, 129), (1, 1)]
    rgb = detect(ort_backend, [rgba[:, :, :3]], 1)
    assert_same_detections(results[1], next(rgb)[0], box_atol=0, box_rtol=0, score_atol=0)


def test_describe_and_provider_reporting(tiny_onnx):
    backend = OnnxRuntimeBackend(tiny_onnx[0], OrtOptions(device='cpu', threads=1))
    assert backend.providers == ['CPUExecutionProvider'] and backend.fallback is None
    description = backend.describe()
    assert description['inputs'] == [('images', ['batch', 3, 320, 320])]
    assert description['nms_mode'] == 'onnx' and description['arch'] == 'rtmdet-tiny'


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the fallback of a CPU-only machine')
@pytest.mark.parametrize('device, provider', [('cuda', 'CUDAExecutionProvider'),
                                              ('tensorrt', 'TensorrtExecutionProvider')])
def test_gpu_request_on_a_cpu_machine_falls_back_or_fails_strictly(tiny_onnx, device, provider):
    backend = OnnxRuntimeBackend(tiny_onnx[0], OrtOptions(device=device))
    assert backend.providers == ['CPUExecutionProvider']
    assert backend.fallback == f'{provider} is not usable here; running on CPUExecutionProvider'
    with pytest.raises(DetdeployError, match=f'--strict-device: {provider} is not usable here'):
        OnnxRuntimeBackend(tiny_onnx[0], OrtOptions(device=device, strict_device=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_provider_on_a_gpu_machine(tiny_onnx):
    backend = OnnxRuntimeBackend(tiny_onnx[0], OrtOptions(device='cuda', strict_device=True))
    assert backend.providers[0] == 'CUDAExecutionProvider'


def test_concurrent_calls_from_four_threads_match_sequential(ort_backend):
    from detdeploy.runtimes.preprocess import preprocess
    batches = [preprocess(image, ort_backend.preprocess_config)[0][None] for image in IMAGES]
    expected = [ort_backend.run(batch) for batch in batches]
    results, errors = {}, []

    def worker(index):
        try:
            for round_ in range(5):
                which = (index + round_) % len(batches)
                results[(index, round_)] = (which, ort_backend.run(batches[which]))
        except Exception as exc:   # noqa: BLE001  (reported below)
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 20
    for which, outputs in results.values():
        for got, want in zip(outputs, expected[which]):
            np.testing.assert_array_equal(got, want)


def test_infer_with_an_onnx_file_never_imports_torch(tiny_onnx, image_dir, tmp_path):
    code = ('import sys\nfrom detdeploy.cli import main\n'
            'try:\n'
            f'    main(["infer", {str(tiny_onnx[0])!r}, {str(image_dir)!r}, "--out", '
            f'{str(tmp_path)!r}])\n'
            'except SystemExit as exit_:\n'
            '    assert not exit_.code, exit_.code\n'
            'print("torch imported:", "torch" in sys.modules)\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == 'torch imported: False'
    record = json.loads((tmp_path / 'wide.json').read_text())
    assert record['detections'] and record['width'] == 400


def test_cli_infer_onnx_bad_inputs(tiny_onnx, image_dir, tmp_path):
    (tmp_path / 'other.onnx').write_bytes(b'not onnx')
    cases = [
        ([tmp_path / 'other.onnx', image_dir], f'error: {tmp_path / "other.onnx"} is not an ONNX model'),
        ([tiny_onnx[0]], 'error: no images given'),
        ([tiny_onnx[0], image_dir, '--backend', 'torch'], 'error: --backend torch needs a registry'),
        ([tiny_onnx[0], image_dir, '--device', 'tpu'], "error: unknown device 'tpu'"),
    ]
    for args, message in cases:
        result = subprocess.run([DETDEPLOY, 'infer', *map(str, args)], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert message in result.stderr
