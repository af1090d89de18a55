"""Host preprocessing on any image size and layout, and PyTorch vs ONNX Runtime detections on
random images of random sizes, as property tests (hypothesis).

Exported files hold no preprocessing (the graph takes the normalised batch), so the in-graph
side of the comparison is the whole pipeline: `runtimes.pipeline.detect` with the PyTorch
backend and with the ONNX Runtime backend on the same arrays.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import assert_detections_agree
from detdeploy.core.errors import ImageError
from detdeploy.runtimes.pipeline import detect
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.runtimes.preprocess import (preprocess,
                                           read_image)

INPUT_SIZES = [(640, 640), (320, 256), (64, 96)]
LAYOUTS = ['gray', 'gray1', 'rgb3', 'rgba4']
SETTINGS = dict(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def make_array(height: int, width: int, layout: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    channels = {'gray': 0, 'gray1': 1, 'rgb3': 3, 'rgba4': 4}[layout]
    shape = (height, width) if channels == 0 else (height, width, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def expected_rgb(array: np.ndarray, order: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    return array[:, :, 2::-1] if order == 'bgr' else array[:, :, :3]


def resizable(hw, input_hw) -> bool:
    """Every size is resizable now (a side never rounds to 0)."""
    return min(PreprocessConfig(input_size=input_hw).resized_size(hw)) >= 1


@settings(max_examples=60, **SETTINGS)
@given(height=st.integers(1, 700), width=st.integers(1, 900), layout=st.sampled_from(LAYOUTS),
       order=st.sampled_from(['bgr', 'rgb']), input_hw=st.sampled_from(INPUT_SIZES),
       seed=st.integers(0, 2**16), constant=st.booleans())
def test_host_preprocess_shape_dtype_and_padding(height, width, layout, order, input_hw, seed,
                                                 constant):
    assume(resizable((height, width), input_hw))
    array = make_array(height, width, layout, seed)
    if constant:
        array[...] = array.flat[0]
    rgb = read_image(array, order)
    assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)
    np.testing.assert_array_equal(rgb, expected_rgb(array, order))

    config = PreprocessConfig(input_size=input_hw)
    tensor, meta = preprocess(rgb, config)
    assert tensor.dtype == np.float32 and tensor.shape == (3, *input_hw)
    assert tensor.flags.c_contiguous and np.isfinite(tensor).all()
    rh, rw = meta.resized_hw
    assert meta.original_hw == (height, width)
    assert 1 <= rh <= input_hw[0] and 1 <= rw <= input_hw[1]
    assert rh == input_hw[0] or rw == input_hw[1]          # fits the input on one side
    assert meta.scale_wh == (rw / width, rh / height)

    mean, std = np.float32(config.mean), np.float32(config.std)
    pad = (np.float32(config.pad_value) - mean) / std           # per channel, network order
    bgr = rgb[:, :, ::-1]                                        # the network wants BGR
    for channel in range(3):
        plane = tensor[channel]
        assert (plane[rh:, :] == pad[channel]).all() and (plane[:, rw:] == pad[channel]).all()
        # bilinear weights are a convex combination: values stay within the source's range
        low, high = ((np.float32(v) - mean[channel]) / std[channel]
                     for v in (bgr[:, :, channel].min(), bgr[:, :, channel].max()))
        content = plane[:rh, :rw]
        assert content.min() >= low and content.max() <= high
        if constant:
            assert (content == low).all()


def test_extreme_aspect_ratio_keeps_a_pixel():
    """A 1x2000 image fits 640x640 at scale 0.32: its height would round to 0 (mmcv's rounding);
    it keeps one row."""
    tensor, meta = preprocess(np.zeros((1, 2000, 3), np.uint8), PreprocessConfig())
    assert min(meta.resized_hw) >= 1


def test_bad_arrays_are_image_errors():
    for array in (np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 2), np.uint8),
                  np.zeros((4, 4, 3), np.float32), np.zeros((2, 2, 2, 3), np.uint8)):
        with pytest.raises(ImageError):
            read_image(array)


# PyTorch vs ONNX Runtime, end to end, on random content at random sizes

INPUT_HW = (64, 64)
SATURATED = np.float32(1 - 2 ** -22)       # four float32 steps below 1


@pytest.fixture(scope='module', autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here runs PyTorch on one thread (tests/conftest.py)."""




@pytest.fixture(scope='module')
def backends(tmp_path_factory, tiny_checkpoint):
    """rtmdet-tiny (synthetic weights from the saved checkpoint) in PyTorch, and exported at
    64x64 (`--nms onnx`, deploy preset, unsimplified) in ONNX Runtime. Exported once per
    session: the same file as test_load.py's."""
    from detdeploy.export.exporter import ExportOptions, export_onnx
    from detdeploy.models import load_detector
    from detdeploy.models.rtmdet import DEPLOY_NMS
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    from detdeploy.runtimes.torch_backend import TorchBackend
    detector = load_detector('rtmdet-tiny', tiny_checkpoint)
    path = tmp_path_factory.getbasetemp() / 'reliability_tiny_64x64.onnx'
    if not path.exists():
        export_onnx(detector, path, ExportOptions(nms_mode='onnx', nms=DEPLOY_NMS,
                                                  input_hw=INPUT_HW, simplify=False))
    ort = OnnxRuntimeBackend(path, OrtOptions(threads=1))
    torch_backend = TorchBackend(detector, nms=DEPLOY_NMS,
                                 preprocess_config=PreprocessConfig(input_size=INPUT_HW))
    assert ort.preprocess_config == torch_backend.preprocess_config
    return torch_backend, ort, DEPLOY_NMS.score_thr


@settings(max_examples=30, **SETTINGS)
@given(height=st.integers(1, 700), width=st.integers(1, 900), layout=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2**16), smooth=st.booleans())
def test_pytorch_and_onnx_runtime_detect_alike(backends, height, width, layout, seed, smooth):
    torch_backend, ort, score_thr = backends
    assume(resizable((height, width), INPUT_HW))
    array = make_array(height, width, layout, seed)
    if smooth:        # blocks of colour instead of pixel noise: other score distributions
        array = np.repeat(np.repeat(array[::16, ::16], 16, 0), 16, 1)[:height, :width]
    [(want, _)] = detect(torch_backend, [array])
    [(got, _)] = detect(ort, [array])
    # Scores within a few float32 steps of 1 are ties whose order the two runtimes' Sigmoid
    # kernels decide differently (test_nms_edge_cases.py::test_sigmoid_of_extreme_logits), so
    # NMS may keep different boxes among them; such images are not compared here.
    saturated = max((result.scores >= SATURATED).sum() for result in (got, want))
    assume(saturated <= 2)
    assert got.image_hw == want.image_hw == (height, width)
    for result in (got, want):
        boxes = result.boxes_xyxy_px
        assert boxes.dtype == np.float32 and np.isfinite(boxes).all()
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
    # Tolerances of `detdeploy parity`'s fp32 preset, boxes scaled to original pixels: on
    # pixel noise the synthetic weights saturate (logits up to ~40), the two runtimes'
    # float32 convolutions differ by up to ~2e-3 in a logit, and near-equal scores can then
    # swap in NMS or at the max-det cut. Given equal inputs the post-processing itself is
    # bit-identical (test_nms_edge_cases.py).
    resized_h, resized_w = PreprocessConfig(input_size=INPUT_HW).resized_size((height, width))
    upscale = max(height / resized_h, width / resized_w, 1.0)
    assert_detections_agree((got.boxes_xyxy_px, got.scores, got.labels),
                            (want.boxes_xyxy_px, want.scores, want.labels), score_thr,
                            box_atol=2e-2 * upscale, box_rtol=1e-4, score_atol=5e-4,
                            borderline=5e-4)
