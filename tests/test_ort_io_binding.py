"""ONNX Runtime I/O binding: the same outputs as `run_raw` on the CPU provider, reusable across
runs and inputs; on CUDA the input and outputs stay on the device (GPU machines only)."""
import threading

import numpy as np
import pytest
import torch

from conftest import make_image
from detdeploy.core.errors import DetdeployError
from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
from detdeploy.runtimes.preprocess import preprocess


@pytest.fixture(scope='module')
def backend(tiny_onnx):
    return OnnxRuntimeBackend(tiny_onnx[0], OrtOptions(device='cpu', threads=1))


@pytest.fixture(scope='module')
def batches(backend):
    images = [make_image(300, 400, 60), make_image(500, 333, 61), make_image(97, 203, 62)]
    tensors = [preprocess(image, backend.preprocess_config)[0] for image in images]
    return [np.stack(tensors[:1]), np.stack(tensors)]


def test_run_bound_equals_run_raw_on_cpu(backend, batches):
    for batch in batches:
        bound = backend.run_bound(batch)
        expected = backend.run(batch)
        assert len(bound) == 4 and all(isinstance(a, np.ndarray) for a in bound)
        for got, want in zip(bound, expected):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


def test_binding_is_reusable_across_runs_and_inputs(backend, batches):
    binding = backend.io_binding()
    assert binding.device == 'cpu'
    with pytest.raises(DetdeployError, match='call set_input first'):
        binding.run()
    for batch in (batches[1], batches[0], batches[1]):
        binding.set_input(batch)
        binding.run()
        binding.run()                       # a benchmark loop repeats run() on one input
        values = binding.output_values()
        assert [v.device_name().lower() for v in values] == ['cpu'] * 4
        for got, want in zip(binding.outputs(), backend.run(batch)):
            np.testing.assert_array_equal(got, want)


def test_one_binding_per_thread(backend, batches):
    expected = backend.run(batches[1])
    errors = []

    def worker():
        try:
            binding = backend.io_binding()
            binding.set_input(batches[1])
            for _ in range(3):
                binding.run()
                for got, want in zip(binding.outputs(), expected):
                    np.testing.assert_array_equal(got, want)
        except Exception as exc:   # noqa: BLE001  (reported below)
            errors.append(exc)
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs an NVIDIA GPU (CUDA provider)')
def test_cuda_binding_keeps_tensors_on_the_device(tiny_onnx, batches):
    backend = OnnxRuntimeBackend(tiny_onnx[0], OrtOptions(device='cuda', strict_device=True))
    binding = backend.io_binding()
    assert binding.device == 'cuda'
    binding.set_input(batches[1])
    binding.run()
    assert all(v.device_name().lower() == 'cuda' for v in binding.output_values())
    reference = OnnxRuntimeBackend(tiny_onnx[0]).run(batches[1])
    got = binding.outputs()
    np.testing.assert_array_equal(got[0], reference[0])          # same detection counts
