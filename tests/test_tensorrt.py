"""TensorRT: engine sidecar, batch profile, batch splitting and one-line errors (run anywhere);
building and running engines against ONNX Runtime (only where an NVIDIA GPU and tensorrt exist)."""
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_detections_agree, fake_metadata, make_image
from detdeploy.core.errors import DetdeployError
from detdeploy.models.rtmdet import DEPLOY_NMS
from detdeploy.runtimes.backend import run_in_chunks
from detdeploy.runtimes.model_file import read_onnx_metadata
from detdeploy.runtimes.tensorrt_build import BuildOptions, build_engine, plan_build
from detdeploy.runtimes.tensorrt_common import (BatchProfile, EngineBuildInfo, EngineSidecar,
                                                ShapeProfile, TensorRTUnavailable,
                                                check_engine_matches, import_tensorrt,
                                                read_sidecar, sha256_bytes, sidecar_path,
                                                write_sidecar)

DETDEPLOY = str(Path(sys.executable).parent / 'detdeploy')
HAVE_TENSORRT = importlib.util.find_spec('tensorrt') is not None
HAVE_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not (HAVE_TENSORRT and HAVE_GPU),
                               reason='needs an NVIDIA GPU and the tensorrt package')
NOT_INSTALLED = ("error: TensorRT is not installed: pip install 'detdeploy[tensorrt]' on a "
                 "machine with an NVIDIA GPU")


def run_cli(*args):
    return subprocess.run([DETDEPLOY, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message in result.stderr, result.stderr


def fake_sidecar(metadata, engine_bytes=b'plan', version='10.16.1.11', profile=None):
    build = EngineBuildInfo(
        precision='fp16', batch_profile=profile or BatchProfile.for_model(metadata),
        input_hw=tuple(metadata.preprocess.input_size), input_name='images',
        output_names=('num_dets', 'boxes', 'scores', 'labels'), tensorrt_version=version,
        device_name='test GPU', source_onnx='model.onnx', source_onnx_sha256='0' * 64,
        workspace_mb=512, calibration_images=None, detdeploy_version='0.1.0')
    return EngineSidecar(metadata, build, sha256_bytes(engine_bytes))


@pytest.fixture
def without_tensorrt(monkeypatch):
    """This process as on a machine without the tensorrt package (whatever is installed)."""
    monkeypatch.setitem(sys.modules, 'tensorrt', None)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """A stand-in `tensorrt` module: lets the code reach the checks that come after the import
    (GPU, version) on a machine without TensorRT. It has no builder, so nothing is built."""
    module = types.ModuleType('tensorrt')
    module.__version__ = '10.16.1.11'
    monkeypatch.setitem(sys.modules, 'tensorrt', module)
    return module


# --- sidecar, profile, splitting: no TensorRT, no GPU -------------------------------------------

def test_sidecar_round_trip_keeps_metadata_and_build_facts(tiny_onnx, tmp_path):
    metadata = read_onnx_metadata(tiny_onnx[0])
    engine = tmp_path / 'model.engine'
    engine.write_bytes(b'plan')
    sidecar = fake_sidecar(metadata, profile=BatchProfile(1, 2, 4))
    written = write_sidecar(engine, sidecar)
    assert written == sidecar_path(engine) == tmp_path / 'model.engine.json'
    assert engine.read_bytes() == b'plan'               # the plan file is left as TensorRT wrote it
    loaded = read_sidecar(engine)
    assert loaded == sidecar
    assert loaded.metadata.class_names == metadata.class_names and len(metadata.class_names) == 80
    assert loaded.metadata.preprocess.input_size == (320, 320)
    raw = json.loads(written.read_text())
    assert raw['build']['batch_profile'] == {'min': 1, 'opt': 2, 'max': 4}
    assert raw['build']['tensorrt_version'] == '10.16.1.11'
    assert raw['metadata'] == metadata.to_props()      # the same strings as the ONNX metadata


def test_sidecar_errors_are_one_line(tiny_onnx, tmp_path):
    engine = tmp_path / 'model.engine'
    with pytest.raises(DetdeployError, match=r'model.engine.json not found: .*detdeploy '
                       r'build-engine MODEL.onnx -o .*model.engine'):
        read_sidecar(engine)
    sidecar_path(engine).write_text('{"format": "something else"}')
    with pytest.raises(DetdeployError, match='is not a detdeploy engine sidecar'):
        read_sidecar(engine)
    sidecar_path(engine).write_text('not json')
    with pytest.raises(DetdeployError, match='is not valid JSON'):
        read_sidecar(engine)
    metadata = read_onnx_metadata(tiny_onnx[0])
    text = fake_sidecar(metadata).to_json().replace('"input_name"', '"input"')
    sidecar_path(engine).write_text(text)
    with pytest.raises(DetdeployError, match='has incomplete build facts'):
        read_sidecar(engine)


def test_engine_must_match_sidecar_and_tensorrt_version(tiny_onnx, tmp_path):
    metadata = read_onnx_metadata(tiny_onnx[0])
    engine = tmp_path / 'model.engine'
    sidecar = fake_sidecar(metadata, b'plan', version='10.3.0')
    check_engine_matches(sidecar, b'plan', engine, '10.3.0')
    with pytest.raises(DetdeployError, match=r'model.engine was built with TensorRT 10.3.0, this '
                       r'is TensorRT 10.16.1.11: rebuild it here with `detdeploy build-engine '
                       r'model.onnx -o'):
        check_engine_matches(sidecar, b'plan', engine, '10.16.1.11')
    with pytest.raises(DetdeployError, match='describes a different engine'):
        check_engine_matches(sidecar, b'other plan', engine, '10.3.0')


def test_batch_profile_defaults_and_validation(tiny_onnx):
    dynamic = read_onnx_metadata(tiny_onnx[0])
    assert BatchProfile.for_model(dynamic) == BatchProfile(1, 1, 8)
    assert BatchProfile.for_model(dynamic, max_batch=16) == BatchProfile(1, 1, 16)
    assert BatchProfile.for_model(dynamic, opt_batch=12) == BatchProfile(1, 12, 12)
    assert BatchProfile.for_model(dynamic, 2, 4, 6) == BatchProfile(2, 4, 6)
    with pytest.raises(DetdeployError, match='--opt-batch 9 must lie between --min-batch 1 and '
                       '--max-batch 4'):
        BatchProfile.for_model(dynamic, opt_batch=9, max_batch=4)
    with pytest.raises(DetdeployError, match='--opt-batch 1 must lie between --min-batch 2'):
        BatchProfile(2, 1, 4)
    with pytest.raises(DetdeployError, match='--max-batch 2 is below --min-batch 3'):
        BatchProfile.for_model(dynamic, min_batch=3, max_batch=2)
    static = dynamic.__class__(**{**dynamic.__dict__, 'batch': 2})
    assert BatchProfile.for_model(static) == BatchProfile(2, 2, 2)
    assert BatchProfile.for_model(static, max_batch=2) == BatchProfile(2, 2, 2)
    with pytest.raises(DetdeployError, match='static batch of 2, so --max-batch cannot differ'):
        BatchProfile.for_model(static, max_batch=4)


def test_plan_build_checks_options(tiny_onnx, image_dir):
    images = tuple(sorted(image_dir.iterdir()))
    plan = plan_build(tiny_onnx[0], BuildOptions(fp16=True, max_batch=4))
    assert plan.profile == BatchProfile(1, 1, 4) and plan.input_hw == (320, 320)
    assert plan.calibration_batch is None
    int8 = plan_build(tiny_onnx[0], BuildOptions(int8=True, calibration_images=images))
    assert int8.calibration_batch == 3                      # min(8, profile max 8, 3 images)
    assert BuildOptions(int8=True, fp16=True).precision == 'int8+fp16'
    with pytest.raises(DetdeployError, match='--int8 needs --calib-images DIR'):
        plan_build(tiny_onnx[0], BuildOptions(int8=True))
    with pytest.raises(DetdeployError, match='--calib-images is only used with --int8'):
        plan_build(tiny_onnx[0], BuildOptions(calibration_images=images))


# --- height/width profile of divisor-padded files (RetinaNet, Faster R-CNN, YOLOv3) ----------

def _padded_family_metadata(name: str):
    """A registry family's file metadata as `export` writes it: dynamic batch and shape."""
    from detdeploy.models.registry import get_spec
    return fake_metadata(arch=name, preprocess=get_spec(name).preprocessing, dynamic_shape=True)


def _canvases(config, image_sizes):
    """The network input each image gets, by the host's own preprocessing rule."""
    return [config.canvas_size(config.resized_size(hw)) for hw in image_sizes]


IMAGE_SIZES_HW = [(480, 640), (640, 480), (427, 640), (1, 2000), (2000, 1), (5000, 30), (30, 5000),
                  (800, 1333), (1333, 800), (1000, 1000), (64, 64), (3000, 4000), (333, 500)]


@pytest.mark.parametrize('name, opt, largest', [
    ('retinanet-r50', (800, 1344), (1344, 1344)),        # scale (1333, 800), either orientation
    ('faster-rcnn-r101', (800, 1344), (1344, 1344)),
    ('yolov3-mobilenetv2-320', (320, 320), (320, 320)),   # fit inside 320x320
    ('yolov3-mobilenetv2-416', (416, 416), (416, 416))])
def test_shape_profile_spans_every_canvas_the_preprocessing_makes(name, opt, largest):
    metadata = _padded_family_metadata(name)
    profile = ShapeProfile.for_model(metadata)
    assert profile == ShapeProfile((32, 32), opt, largest, 32)
    canvases = _canvases(metadata.preprocess, IMAGE_SIZES_HW + [
        tuple(int(v) for v in np.random.default_rng(seed).integers(1, 6000, 2))
        for seed in range(200)])
    for canvas in canvases:
        assert profile.problem(canvas) is None, canvas
    # the range is no wider than needed: each side's maximum and minimum is some image's canvas
    for side in (0, 1):
        assert max(c[side] for c in canvases) == largest[side]
        assert min(c[side] for c in canvases) == 32


def test_shape_profile_flags_and_refusals():
    retinanet = _padded_family_metadata('retinanet-r50')
    assert ShapeProfile.for_model(retinanet, max_hw=(640, 640)) == ShapeProfile(
        (32, 32), (640, 640), (640, 640), 32)            # opt moved inside the narrower range
    assert ShapeProfile.for_model(retinanet, min_hw=(800, 800), opt_hw=(800, 1088)) == \
        ShapeProfile((800, 800), (800, 1088), (1344, 1344), 32)
    assert ShapeProfile.for_model(retinanet, opt_hw=(1600, 1600)).max == (1600, 1600)
    with pytest.raises(DetdeployError, match='--min-shape 100x100: both sides must be positive '
                       'multiples of 32'):
        ShapeProfile.for_model(retinanet, min_hw=(100, 100))
    with pytest.raises(DetdeployError, match='--opt-shape 800x1344 must lie between --min-shape '
                       '32x32 and --max-shape 800x800'):
        ShapeProfile.for_model(retinanet, opt_hw=(800, 1344), max_hw=(800, 800))
    with pytest.raises(DetdeployError, match='sides up to 4096'):
        ShapeProfile.for_model(retinanet, max_hw=(4128, 32))
    fixed = fake_metadata(input_hw=(320, 320))           # rtmdet: one size, no dynamic shape
    assert ShapeProfile.for_model(fixed) == ShapeProfile((320, 320), (320, 320), (320, 320), 32)
    assert ShapeProfile.for_model(fixed, max_hw=(320, 320)).static
    with pytest.raises(DetdeployError, match='fixed input of 320x320, so --max-shape cannot '
                       'differ from it; export with --dynamic-shape'):
        ShapeProfile.for_model(fixed, max_hw=(640, 640))
    # a --dynamic-shape export padded to a fixed size: that size, unless the flags widen it
    widened = fake_metadata(input_hw=(320, 320), dynamic_shape=True)
    assert ShapeProfile.for_model(widened).static
    assert ShapeProfile.for_model(widened, max_hw=(640, 640)) == ShapeProfile(
        (320, 320), (320, 320), (640, 640), 32)


def test_shape_profile_checks_inputs_at_run_time():
    profile = ShapeProfile((32, 32), (800, 1344), (1344, 1344), 32)
    assert profile.problem((800, 1088)) is None and profile.problem((1344, 32)) is None
    assert profile.problem((800, 1090)) == 'sides must be multiples of 32'
    assert 'outside the engine\'s profile (min 32x32, max 1344x1344)' in profile.problem(
        (1376, 800))
    assert ShapeProfile(*((320, 320),) * 3).problem((320, 352)) == \
        'this engine was built for 320x320 only'
    assert profile.describe() == 'min 32x32, opt 800x1344, max 1344x1344 (multiples of 32)'


def test_build_plan_sets_the_hw_profile_and_calibrates_on_one_canvas(tiny_onnx, monkeypatch):
    """What `build_engine` hands to IOptimizationProfile.set_shape, for a divisor-padded file
    (its metadata stands in for an exported RetinaNet: the plan reads nothing else of it)."""
    import detdeploy.runtimes.tensorrt_build as tensorrt_build
    metadata = _padded_family_metadata('retinanet-r50')
    monkeypatch.setattr(tensorrt_build, 'resolve_onnx_metadata', lambda path: metadata)
    plan = plan_build(tiny_onnx[0], BuildOptions(max_batch=2))
    assert plan.input_shapes() == ((1, 3, 32, 32), (1, 3, 800, 1344), (2, 3, 1344, 1344))
    assert plan.input_hw == (800, 1344)
    calibration = plan.calibration_config()        # one shape for every calibration batch
    assert (calibration.input_size, calibration.pad, calibration.resize) == (
        (800, 1344), 'fixed', 'fit')
    for hw in IMAGE_SIZES_HW:
        assert _canvases(calibration, [hw]) == [(800, 1344)]
    monkeypatch.undo()
    fixed = plan_build(tiny_onnx[0], BuildOptions())
    assert fixed.input_shapes() == ((1, 3, 320, 320), (1, 3, 320, 320), (8, 3, 320, 320))
    assert fixed.calibration_config() == fixed.metadata.preprocess


def test_sidecar_keeps_the_hw_profile_and_reads_older_sidecars(tiny_onnx, tmp_path):
    metadata = _padded_family_metadata('yolov3-mobilenetv2-320')
    sidecar = fake_sidecar(metadata)
    profile = ShapeProfile((32, 32), (320, 320), (320, 320), 32)
    with_profile = EngineSidecar(metadata, sidecar.build.__class__(
        **{**sidecar.build.__dict__, 'shape_profile': profile}), sidecar.engine_sha256)
    engine = tmp_path / 'yolo.engine'
    write_sidecar(engine, with_profile)
    assert read_sidecar(engine).build.hw_profile == profile
    older = json.loads(sidecar_path(engine).read_text())
    del older['build']['shape_profile']                # written before H/W profiles
    sidecar_path(engine).write_text(json.dumps(older))
    assert read_sidecar(engine).build.hw_profile == ShapeProfile(*((320, 320),) * 3)


def test_batches_above_the_profile_are_split_and_static_batches_padded():
    batch = np.arange(7 * 2, dtype=np.float32).reshape(7, 2, 1, 1)
    calls = []

    def run_chunk(chunk):
        calls.append(len(chunk))
        flat = chunk.reshape(len(chunk), -1)
        return [flat.sum(1, keepdims=True), flat * 10]

    expected = [batch.reshape(7, -1).sum(1, keepdims=True), batch.reshape(7, -1) * 10]
    for max_batch, static, sizes in ((8, None, [7]), (3, None, [3, 3, 1]),
                                     (4, 4, [4, 4]), (2, 2, [2, 2, 2, 2])):
        calls.clear()
        outputs = run_in_chunks(batch, max_batch, static, run_chunk)
        assert calls == sizes
        for got, want in zip(outputs, expected):
            np.testing.assert_array_equal(got, want)
    calls.clear()
    outputs = run_in_chunks(batch[:1], 4, 4, run_chunk)         # one image, static batch 4
    assert calls == [4] and outputs[0].shape == (1, 1)


# --- missing TensorRT / GPU: one-line errors ----------------------------------------------------

def test_import_tensorrt_says_how_to_install(without_tensorrt):
    with pytest.raises(TensorRTUnavailable) as error:
        import_tensorrt()
    assert str(error.value) == NOT_INSTALLED.removeprefix('error: ')


def test_build_without_tensorrt_fails_in_one_line(tiny_onnx, tmp_path, without_tensorrt):
    with pytest.raises(TensorRTUnavailable, match='TensorRT is not installed'):
        build_engine(tiny_onnx[0], tmp_path / 'model.engine')
    assert not (tmp_path / 'model.engine').exists()


@pytest.mark.skipif(HAVE_GPU, reason='checks the error of a machine without a GPU')
def test_no_gpu_is_reported_after_the_tensorrt_import(tiny_onnx, tmp_path, fake_tensorrt):
    """With TensorRT importable but no GPU (or no CUDA Python), the error names what is missing."""
    cuda_python = importlib.util.find_spec('cuda') is not None and \
        importlib.util.find_spec('cuda.bindings') is not None
    expected = 'no usable NVIDIA GPU: CUDA reports' if cuda_python else \
        'CUDA Python (cuda-bindings) is not installed'
    with pytest.raises(TensorRTUnavailable, match=expected) as error:
        build_engine(tiny_onnx[0], tmp_path / 'model.engine')
    assert '\n' not in str(error.value)
    engine = tmp_path / 'model.engine'
    engine.write_bytes(b'plan')
    write_sidecar(engine, fake_sidecar(read_onnx_metadata(tiny_onnx[0])))
    from detdeploy.runtimes.tensorrt_backend import TensorRTBackend
    with pytest.raises(TensorRTUnavailable, match=expected):
        TensorRTBackend(engine)


def test_tensorrt_11_refuses_precision_flags(tiny_onnx, tmp_path, fake_tensorrt):
    fake_tensorrt.__version__ = '11.4.0.106'
    with pytest.raises(DetdeployError, match=r"--fp16/--int8 use builder flags that TensorRT "
                       r"11.4.0.106 removed .* pip install 'tensorrt>=10,<11'"):
        build_engine(tiny_onnx[0], tmp_path / 'model.engine', BuildOptions(fp16=True))


@pytest.mark.skipif(HAVE_TENSORRT, reason='checks the error of a machine without tensorrt')
def test_cli_build_engine_and_infer_engine_without_tensorrt(tiny_onnx, image_dir, tmp_path):
    engine = tmp_path / 'model.engine'
    assert_one_line_error(run_cli('build-engine', tiny_onnx[0], '-o', engine, '--fp16'),
                          NOT_INSTALLED)
    assert not engine.exists()
    engine.write_bytes(b'plan')
    assert_one_line_error(run_cli('infer', engine, image_dir),
                          f'error: {engine}.json not found: an engine needs the JSON file')
    write_sidecar(engine, fake_sidecar(read_onnx_metadata(tiny_onnx[0])))
    assert_one_line_error(run_cli('infer', engine, image_dir), NOT_INSTALLED)
    assert_one_line_error(run_cli('infer', engine, image_dir, '--backend', 'trt',
                                  '--device', 'cuda:0'), NOT_INSTALLED)


def test_cli_bad_build_and_backend_inputs(tiny_onnx, image_dir, tmp_path):
    onnx_path = tiny_onnx[0]
    engine = tmp_path / 'model.engine'
    engine.write_bytes(b'plan')
    cases = [
        (['build-engine', tmp_path / 'missing.onnx'], 'error: model file not found'),
        (['build-engine', onnx_path, '--opt-batch', 9, '--max-batch', 4],
         'error: --opt-batch 9 must lie between --min-batch 1 and --max-batch 4'),
        (['build-engine', onnx_path, '--int8'], 'error: --int8 needs --calib-images DIR'),
        (['build-engine', onnx_path, '--calib-images', image_dir],
         'error: --calib-images is only used with --int8'),
        (['infer', onnx_path, image_dir, '--backend', 'trt'],
         'error: --backend trt needs a TensorRT engine, got'),
        (['infer', engine, image_dir, '--backend', 'ort'], 'error: --backend ort needs an .onnx'),
        (['infer', engine, image_dir, '--device', 'cpu'],
         'error: a TensorRT engine runs on an NVIDIA GPU only'),
        (['infer', onnx_path, image_dir, '--device', 'cuda:0', '--device-id', 1],
         'error: --device cuda:0 and --device-id 1 disagree'),
    ]
    for args, message in cases:
        assert_one_line_error(run_cli(*args), message)


@pytest.mark.skipif(HAVE_GPU, reason='checks the fallback of a CPU-only machine')
def test_cli_ort_tensorrt_device_strict_fails_in_one_line(tiny_onnx, image_dir):
    assert_one_line_error(
        run_cli('infer', tiny_onnx[0], image_dir, '--device', 'tensorrt', '--strict-device',
                '--trt-fp16'),
        'error: --strict-device: TensorrtExecutionProvider is not usable here')
    fallback = run_cli('infer', tiny_onnx[0], image_dir / 'wide.jpg', '--device', 'cuda:0')
    assert fallback.returncode == 0, fallback.stderr
    assert fallback.stderr.strip() == ('warning: CUDAExecutionProvider is not usable here; '
                                       'running on CPUExecutionProvider')


def test_infer_with_an_engine_never_imports_torch(tiny_onnx, image_dir, tmp_path):
    engine = tmp_path / 'model.engine'
    engine.write_bytes(b'plan')
    write_sidecar(engine, fake_sidecar(read_onnx_metadata(tiny_onnx[0])))
    code = ('import sys\nfrom detdeploy.cli import main\n'
            'try:\n'
            f'    main(["infer", {str(engine)!r}, {str(image_dir)!r}])\n'
            'except SystemExit:\n'
            '    pass\n'
            'print("torch imported:", "torch" in sys.modules)\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip().splitlines()[-1] == 'torch imported: False', result.stderr


# --- on a machine with an NVIDIA GPU and tensorrt ---------------------------------------------

IMAGES = [make_image(300, 400, 50), make_image(500, 333, 51), make_image(97, 203, 52)]


def _detections(backend, batch_size):
    from detdeploy.runtimes.pipeline import detect
    return [d for d, _ in detect(backend, IMAGES, batch_size)]


def _assert_agree(got, want, **tolerances):
    for a, b in zip(got, want):
        assert_detections_agree((a.boxes_xyxy_px, a.scores, a.labels),
                                (b.boxes_xyxy_px, b.scores, b.labels), DEPLOY_NMS.score_thr,
                                **tolerances)


@pytest.fixture(scope='module')
def fp32_engine(tiny_onnx, tmp_path_factory):
    folder = tmp_path_factory.mktemp('engine')
    report = build_engine(tiny_onnx[0], folder / 'tiny.engine',
                          BuildOptions(max_batch=2, timing_cache=folder / 'timing.cache'))
    return report


@needs_gpu
def test_fp32_engine_matches_onnx_runtime_cpu(fp32_engine, tiny_onnx):
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend
    from detdeploy.runtimes.tensorrt_backend import TensorRTBackend
    assert fp32_engine.sidecar_path.name == 'tiny.engine.json'
    assert fp32_engine.timing_cache.is_file()
    backend = TensorRTBackend(fp32_engine.engine_path)
    assert backend.max_batch == 2 and backend.describe()['precision'] == 'fp32'
    reference = _detections(OnnxRuntimeBackend(tiny_onnx[0]), 1)
    for batch_size in (1, 3):                       # 3 > max batch 2: split into 2 + 1
        _assert_agree(_detections(backend, batch_size), reference)


@needs_gpu
def test_engine_from_several_threads_matches_sequential(fp32_engine):
    import threading
    from detdeploy.runtimes.preprocess import preprocess
    from detdeploy.runtimes.tensorrt_backend import TensorRTBackend
    backend = TensorRTBackend(fp32_engine.engine_path)
    batches = [preprocess(image, backend.preprocess_config)[0][None] for image in IMAGES]
    expected = [backend.run(batch) for batch in batches]
    results, errors = [], []

    def worker(index):
        try:
            for round_ in range(5):
                which = (index + round_) % len(batches)
                results.append((which, backend.run(batches[which])))
        except Exception as exc:   # noqa: BLE001  (reported below)
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 20
    for which, outputs in results:
        for got, want in zip(outputs, expected[which]):
            np.testing.assert_array_equal(got, want)
    backend.close()


@needs_gpu
def test_timing_cache_is_reused(fp32_engine, tiny_onnx, tmp_path):
    report = build_engine(tiny_onnx[0], tmp_path / 'again.engine',
                          BuildOptions(max_batch=2, timing_cache=fp32_engine.timing_cache))
    assert report.timing_cache_loaded


@needs_gpu
def test_fp16_engine_is_close_to_onnx_runtime(tiny_onnx, tmp_path):
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend
    from detdeploy.runtimes.tensorrt_backend import TensorRTBackend
    report = build_engine(tiny_onnx[0], tmp_path / 'fp16.engine', BuildOptions(fp16=True))
    assert report.sidecar.build.precision == 'fp16'
    got = _detections(TensorRTBackend(report.engine_path), 1)
    want = _detections(OnnxRuntimeBackend(tiny_onnx[0]), 1)
    for a, b in zip(got, want):
        assert len(a) > 0 and abs(len(a) - len(b)) <= max(2, len(b) // 5)
        # fp16 moves scores by about 1e-3: compare the strongest detection only
        assert a.labels[0] == b.labels[0]
        np.testing.assert_allclose(a.scores[0], b.scores[0], atol=2e-2)
        np.testing.assert_allclose(a.boxes_xyxy_px[0], b.boxes_xyxy_px[0], atol=2.0)


@needs_gpu
def test_efficient_nms_export_builds_and_runs(tiny_checkpoint, tmp_path, tiny_onnx):
    from detdeploy.export.exporter import ExportOptions, export_onnx
    from detdeploy.models import load_detector
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend
    from detdeploy.runtimes.tensorrt_backend import TensorRTBackend
    onnx_path = tmp_path / 'tiny_trt_nms.onnx'
    export_onnx(load_detector('rtmdet-tiny', tiny_checkpoint), onnx_path,
                ExportOptions(nms_mode='trt', nms=DEPLOY_NMS, dynamic_batch=True,
                              input_hw=(320, 320)))
    report = build_engine(onnx_path, tmp_path / 'tiny_trt_nms.engine', BuildOptions(max_batch=4))
    assert report.sidecar.metadata.nms_mode == 'trt'
    got = _detections(TensorRTBackend(report.engine_path), 3)
    want = _detections(OnnxRuntimeBackend(tiny_onnx[0]), 1)
    _assert_agree(got, want)


@needs_gpu
def test_cli_build_engine_and_infer(tiny_onnx, image_dir, tmp_path):
    engine = tmp_path / 'cli.engine'
    built = run_cli('build-engine', tiny_onnx[0], '-o', engine, '--max-batch', 2,
                    '--workspace', 512)
    assert built.returncode == 0, built.stderr
    assert built.stdout.startswith(f'wrote {engine} (') and (tmp_path / 'cli.engine.json').is_file()
    out = tmp_path / 'out'
    result = run_cli('infer', engine, image_dir, '--out', out, '--batch', 3)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / 'wide.json').read_text())['width'] == 400
