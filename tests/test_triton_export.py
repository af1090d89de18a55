"""`detdeploy export-triton`: every config.pbtxt parses strictly with Triton's own protobuf, its
shapes are the ONNX file's, the ensemble's wiring is closed, and the repository's pipeline
(its model.py files under a stand-in for Triton's Python-stub API, ONNX Runtime on its
model.onnx) answers what `infer` answers. No Triton server runs here.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

from conftest import fake_metadata
from detdeploy.core.errors import DetdeployError
from detdeploy.inference.batch import collect_images, run_infer
from detdeploy.runtimes.model_file import read_onnx_metadata
from detdeploy.runtimes.open import open_model_file
from detdeploy.serving.triton import (_check_servable, _max_batch, export_triton,
                                      model_config_module, parse_config, plan_repository)

pytestmark = pytest.mark.serving
DETDEPLOY = str(Path(sys.executable).parent / 'detdeploy')
ONNX_TO_TRITON = {'FLOAT': 'TYPE_FP32', 'INT32': 'TYPE_INT32', 'INT64': 'TYPE_INT64'}


@pytest.fixture(scope='module')
def repository(tiny_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp('triton')
    done = subprocess.run([DETDEPLOY, 'export-triton', str(tiny_onnx[0]), '-o', str(root),
                           '--name', 'rtmdet'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "max_batch_size 8, configs parsed with Triton's model_config protobuf" in done.stdout
    return root


@pytest.fixture(scope='module')
def configs(repository):
    pb2 = model_config_module()
    assert pb2 is not None, 'tritonclient is part of the test install (make install)'
    return {folder.name: parse_config((folder / 'config.pbtxt').read_text(), folder.name, pb2)
            for folder in repository.iterdir()}


def test_repository_layout(repository):
    assert sorted(str(p.relative_to(repository)) for p in repository.rglob('*')) == [
        'rtmdet', 'rtmdet/1', 'rtmdet/config.pbtxt',
        'rtmdet_model', 'rtmdet_model/1', 'rtmdet_model/1/model.onnx',
        'rtmdet_model/config.pbtxt',
        'rtmdet_postprocess', 'rtmdet_postprocess/1', 'rtmdet_postprocess/1/model.py',
        'rtmdet_postprocess/config.pbtxt',
        'rtmdet_preprocess', 'rtmdet_preprocess/1', 'rtmdet_preprocess/1/model.py',
        'rtmdet_preprocess/config.pbtxt']


def test_parsing_is_strict():
    with pytest.raises(DetdeployError, match='not a valid Triton model config'):
        parse_config('name: "x"\nmax_batch_sise: 8\n')


def test_model_config_matches_the_onnx_file(configs, tiny_onnx):
    graph = onnx.load(str(tiny_onnx[0]), load_external_data=False).graph

    def dims(info):
        return [d.dim_value if d.HasField('dim_value') else -1
                for d in info.type.tensor_type.shape.dim]

    pb2 = model_config_module()
    model = configs['rtmdet_model']
    assert model.platform == 'onnxruntime_onnx' and model.max_batch_size == 8
    assert model.dynamic_batching.max_queue_delay_microseconds == 2000
    assert dims(graph.input[0])[0] == -1            # the batch axis Triton fills
    for config_io, graph_io in ((model.input, graph.input), (model.output, graph.output)):
        assert [(t.name, list(t.dims)) for t in config_io] == [
            (g.name, dims(g)[1:]) for g in graph_io]
        assert [pb2.DataType.Name(t.data_type) for t in config_io] == [
            ONNX_TO_TRITON[onnx.TensorProto.DataType.Name(g.type.tensor_type.elem_type)]
            for g in graph_io]
    pre = configs['rtmdet_preprocess']
    assert list(pre.output[0].dims) == dims(graph.input[0])[1:]
    assert json.loads(pre.parameters['preprocess'].string_value)['input_size'] == [320, 320]


def test_ensemble_wiring_is_closed(configs, tiny_onnx):
    """Each step's tensors exist in the model it calls, every input it reads is the
    ensemble's input or an earlier step's output, and the ensemble's outputs are produced."""
    assert_wiring_closed(configs, 'rtmdet')
    ensemble = configs['rtmdet']
    assert tuple(json.loads(ensemble.parameters['class_names'].string_value)) == \
        read_onnx_metadata(tiny_onnx[0]).class_names


def assert_wiring_closed(configs: dict, ensemble_name: str) -> None:
    ensemble = configs[ensemble_name]
    assert ensemble.platform == 'ensemble'
    available = {t.name for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        called = configs[step.model_name]
        assert called.max_batch_size == ensemble.max_batch_size
        assert set(step.input_map) == {t.name for t in called.input}
        assert set(step.output_map) <= {t.name for t in called.output}
        assert set(step.input_map.values()) <= available
        available |= set(step.output_map.values())
    assert {t.name for t in ensemble.output} <= available


def fake_pb_utils() -> types.ModuleType:
    """The part of Triton's `triton_python_backend_utils` the model.py files use, as its docs
    describe it (Tensor, InferenceResponse, TritonError, get_input_tensor_by_name)."""
    module = types.ModuleType('triton_python_backend_utils')

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, array

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self._tensors, self._error = output_tensors, error

        def output_tensors(self):
            return self._tensors

        def error(self):
            return self._error

    module.Tensor, module.TritonError, module.InferenceResponse = (Tensor, TritonError,
                                                                   InferenceResponse)
    module.get_input_tensor_by_name = lambda request, name: next(
        (t for t in request if t.name() == name), None)
    return module


def load_python_model(folder: Path, config, monkeypatch):
    """`folder/1/model.py`'s TritonPythonModel, initialised as the Python stub does it (the
    model config as JSON with protobuf field names)."""
    from google.protobuf import json_format
    spec = importlib.util.spec_from_file_location(f'model_{folder.name}', folder / '1' / 'model.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({'model_config': json_format.MessageToJson(
        config, preserving_proto_field_name=True), 'model_name': folder.name})
    return model


def test_the_repository_pipeline_answers_like_infer(repository, configs, tiny_onnx, image_dir,
                                                     tmp_path, monkeypatch):
    """One request of three images: preprocess model.py -> ONNX Runtime on the repository's
    model.onnx -> postprocess model.py gives infer's detections (as its JSON rounds them)."""
    pb_utils = fake_pb_utils()
    monkeypatch.setitem(sys.modules, 'triton_python_backend_utils', pb_utils)
    pre = load_python_model(repository / 'rtmdet_preprocess', configs['rtmdet_preprocess'],
                            monkeypatch)
    post = load_python_model(repository / 'rtmdet_postprocess', configs['rtmdet_postprocess'],
                             monkeypatch)
    paths = collect_images([image_dir])
    encoded = np.array([[p.read_bytes()] for p in paths], dtype=object)     # [3, 1] bytes
    [pre_response] = pre.execute([[pb_utils.Tensor('IMAGE', encoded)]])
    assert pre_response.error() is None
    prepared = {t.name(): t.as_numpy() for t in pre_response.output_tensors()}
    session = onnxruntime.InferenceSession(str(repository / 'rtmdet_model/1/model.onnx'),
                                           providers=['CPUExecutionProvider'])
    raw = session.run(None, {'images': prepared['images']})
    request = [pb_utils.Tensor(f'raw_{name}', array) for name, array in
               zip(('num_dets', 'boxes', 'scores', 'labels'), raw)]
    request += [pb_utils.Tensor(name, prepared[name]) for name in ('image_hw', 'scale_wh')]
    [post_response] = post.execute([request])
    answer = {t.name(): t.as_numpy() for t in post_response.output_tensors()}
    assert answer['boxes'].shape == (3, 100, 4) and answer['num_dets'].dtype == np.int32
    report = run_infer(open_model_file(tiny_onnx[0]), paths, tmp_path)
    for index, image in enumerate(report.images):
        expected = json.loads(image.json_path.read_text())['detections']
        count = int(answer['num_dets'][index, 0])
        got = [{'bbox_xyxy': [round(float(v), 3) for v in answer['boxes'][index, row]],
                'score': round(float(answer['scores'][index, row]), 6),
                'label': int(answer['labels'][index, row])} for row in range(count)]
        assert got == [{k: d[k] for k in ('bbox_xyxy', 'score', 'label')} for d in expected]
        assert (answer['labels'][index, count:] == -1).all()

    broken = np.array([[b'not an image']], dtype=object)
    [refused] = pre.execute([[pb_utils.Tensor('IMAGE', broken)]])
    assert 'cannot read image IMAGE: not an image' in refused.error().message()


def test_engine_repository_uses_the_sidecar(tmp_path):
    """An .engine: tensorrt_plan with the sidecar's input, outputs and batch profile (the plan
    file is copied as it is; no GPU needed to write the repository)."""
    from detdeploy.runtimes.tensorrt_common import (BatchProfile, EngineBuildInfo,
                                                    EngineSidecar, write_sidecar)
    engine = tmp_path / 'm.engine'
    engine.write_bytes(b'plan bytes')
    metadata = fake_metadata(input_hw=(320, 320), nms_mode='trt')
    build = EngineBuildInfo('fp16', BatchProfile(1, 4, 16), (320, 320), 'images',
                            ('num_dets', 'boxes', 'scores', 'labels'), '10.9', 'gpu', 'm.onnx',
                            '0' * 64, None, None, '0.1.0')
    write_sidecar(engine, EngineSidecar(metadata, build, '0' * 64))
    models, batch = plan_repository(engine, 'det')
    pb2 = model_config_module()
    parsed = {m.name: parse_config(m.config, m.name, pb2) for m in models}
    net = parsed['det_model']
    assert models[1].config.startswith('# The plan ends in EfficientNMS_TRT')
    assert (net.platform, net.max_batch_size, batch) == ('tensorrt_plan', 16, 16)
    assert [(t.name, list(t.dims)) for t in net.output] == [
        ('num_dets', [1]), ('boxes', [1, 4]), ('scores', [1]), ('labels', [1])]   # max_det 1
    assert dict(models[1].files) == {'model.plan': engine}


def test_batch_rules_and_refusals():
    assert _max_batch(None, None, None, Path('m.onnx')) == 8
    assert _max_batch(None, None, 32, Path('m.onnx')) == 32
    assert _max_batch(1, 1, None, Path('m.onnx')) == 1
    with pytest.raises(DetdeployError, match='static batch of 4.*--dynamic-batch'):
        _max_batch(4, 4, None, Path('m.onnx'))
    with pytest.raises(DetdeployError, match='--nms none'):
        _check_servable(fake_metadata(nms_mode='none'), Path('m.onnx'))
    with pytest.raises(DetdeployError, match='EfficientNMS_TRT'):
        _check_servable(fake_metadata(nms_mode='trt'), Path('m.onnx'))
    with pytest.raises(DetdeployError, match="'rotated' models is not implemented"):
        _check_servable(fake_metadata(task='rotated'), Path('m.onnx'))


def test_existing_model_folders_are_refused(repository, tiny_onnx):
    with pytest.raises(DetdeployError, match='model folder rtmdet_preprocess exists'):
        export_triton(tiny_onnx[0], repository, name='rtmdet')


def test_outputs_never_overwrite_the_model_they_are_made_from(tiny_onnx, tmp_path):
    """The shared rule (`core.fileio.refuse_overwriting_inputs`), also with --overwrite: a model
    file kept where the repository's copy of it goes, reached by another spelling of the path
    or a symlink, is refused before anything is written."""
    import shutil
    from detdeploy.core.errors import OutputError
    repo = tmp_path / 'repo'
    version = repo / 'det_model' / '1'
    version.mkdir(parents=True)
    inside = version / 'model.onnx'
    shutil.copyfile(tiny_onnx[0], inside)
    before = inside.read_bytes()
    with pytest.raises(OutputError, match=r'-o .*det_model/1/model.onnx would overwrite the '
                       'input MODEL'):
        export_triton(inside, repo, name='det', overwrite=True)
    link = tmp_path / 'link.onnx'
    link.symlink_to(inside)
    with pytest.raises(OutputError, match='would overwrite the input MODEL'):
        export_triton(tmp_path / 'repo' / '..' / 'link.onnx', repo, name='det', overwrite=True)
    assert inside.read_bytes() == before
    assert sorted(p.name for p in repo.iterdir()) == ['det_model']      # nothing written
    done = subprocess.run([DETDEPLOY, 'export-triton', str(inside), '-o', str(repo), '--name',
                           'det', '--overwrite'], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and 'Traceback' not in done.stderr
    assert done.stderr.count('\n') == 1 and 'would overwrite the input MODEL' in done.stderr
    # the same files under another name are a new repository: allowed
    report = export_triton(inside, repo, name='other')
    assert report.models[1] == 'other_model' and inside.read_bytes() == before


def test_engine_with_a_height_width_profile_has_dynamic_dims(tmp_path):
    """An engine built over a range of heights and widths (divisor-padded families) declares
    those dims -1 to Triton; a fixed side keeps its size."""
    from detdeploy.runtimes.tensorrt_common import (BatchProfile, EngineBuildInfo,
                                                    EngineSidecar, ShapeProfile, write_sidecar)
    engine = tmp_path / 'y.engine'
    engine.write_bytes(b'plan bytes')
    metadata = fake_metadata(input_hw=(320, 320), nms_mode='trt', dynamic_shape=True)
    for profile, dims in ((ShapeProfile((32, 32), (320, 320), (320, 320), 32), [3, -1, -1]),
                          (ShapeProfile((320, 32), (320, 320), (320, 640), 32), [3, 320, -1])):
        build = EngineBuildInfo('fp32', BatchProfile(1, 1, 8), profile.opt, 'images',
                                ('num_dets', 'boxes', 'scores', 'labels'), '10.9', 'gpu',
                                'y.onnx', '0' * 64, None, None, '0.1.0', shape_profile=profile)
        write_sidecar(engine, EngineSidecar(metadata, build, '0' * 64))
        models, _ = plan_repository(engine, 'y')
        net = parse_config(models[1].config, models[1].name, model_config_module())
        assert list(net.input[0].dims) == dims


@pytest.mark.parametrize('frame', ['box', 'input'])
def test_instance_repository_declares_masks_and_answers_infers_rle(frame, tmp_path,
                                                                   monkeypatch):
    """An instance model (a hand-made ONNX file with instance metadata, tests/test_mask_host.py,
    both mask frames): the network's config declares its masks output with the graph's dims,
    the ensemble answers `segmentation` [K] strings, and the repository's pipeline gives, per
    detection, COCO RLE that pycocotools decodes to the masks `infer`'s pipeline pastes."""
    from pycocotools import mask as mask_utils

    from detdeploy.evaluation.coco_eval import load_coco
    from detdeploy.runtimes.pipeline import detect
    from detdeploy.training.shapes import make_shapes_dataset
    from test_mask_host import FRAMES, MAX_DET, constant_onnx, image_outputs, instance_metadata

    make_shapes_dataset(tmp_path / 'shapes', train=0, val=2, size=64, seed=5)
    coco = load_coco(tmp_path / 'shapes/annotations/instances_val.json')
    config = FRAMES[frame]
    model_file = constant_onnx(tmp_path / 'ins.onnx',
                               image_outputs(coco, sorted(coco.getImgIds())[0], config),
                               instance_metadata(config))
    report = export_triton(model_file, tmp_path / 'repo', name='ins')
    assert report.validated
    pb2 = model_config_module()
    configs = {folder.name: parse_config((folder / 'config.pbtxt').read_text(), folder.name,
                                         pb2) for folder in (tmp_path / 'repo').iterdir()}
    assert_wiring_closed(configs, 'ins')
    mask_hw = [28, 28] if frame == 'box' else [16, 16]          # 64 px input at stride 4
    assert [(t.name, list(t.dims)) for t in configs['ins_model'].output][-1] == (
        'masks', [MAX_DET, *mask_hw])
    [segmentation] = [t for t in configs['ins'].output if t.name == 'segmentation']
    assert pb2.DataType.Name(segmentation.data_type) == 'TYPE_STRING'
    assert list(segmentation.dims) == [MAX_DET]
    post_config = configs['ins_postprocess']
    assert json.loads(post_config.parameters['mask'].string_value) == config.to_dict()

    pb_utils = fake_pb_utils()
    monkeypatch.setitem(sys.modules, 'triton_python_backend_utils', pb_utils)
    pre = load_python_model(tmp_path / 'repo/ins_preprocess', configs['ins_preprocess'],
                            monkeypatch)
    post = load_python_model(tmp_path / 'repo/ins_postprocess', post_config, monkeypatch)
    paths = sorted((tmp_path / 'shapes/val').iterdir())
    encoded = np.array([[p.read_bytes()] for p in paths], dtype=object)
    [pre_response] = pre.execute([[pb_utils.Tensor('IMAGE', encoded)]])
    prepared = {t.name(): t.as_numpy() for t in pre_response.output_tensors()}
    session = onnxruntime.InferenceSession(str(tmp_path / 'repo/ins_model/1/model.onnx'),
                                           providers=['CPUExecutionProvider'])
    raw = session.run(None, {'images': prepared['images']})
    request = [pb_utils.Tensor(f'raw_{name}', array) for name, array in
               zip(('num_dets', 'boxes', 'scores', 'labels', 'masks'), raw)]
    request += [pb_utils.Tensor(name, prepared[name]) for name in ('image_hw', 'scale_wh')]
    [post_response] = post.execute([request])
    answer = {t.name(): t.as_numpy() for t in post_response.output_tensors()}
    assert answer['segmentation'].shape == (2, MAX_DET)
    expected = [found for found, _ in detect(open_model_file(model_file), paths)]
    for index, detections in enumerate(expected):
        count = int(answer['num_dets'][index, 0])
        assert count == len(detections) > 0 and detections.masks.any()
        height, width = (int(v) for v in prepared['image_hw'][index])
        decoded = [mask_utils.decode({'size': [height, width], 'counts': counts}).astype(bool)
                   for counts in answer['segmentation'][index, :count]]
        assert np.array_equal(np.stack(decoded), detections.masks)
        assert (answer['segmentation'][index, count:] == b'').all()


def test_instance_engine_repository_sizes_masks_by_the_mask_frame(tmp_path):
    """An instance .engine: the masks output's dims come from the metadata's mask frame (28x28
    per box; input side / stride over the input, -1 where the profile lets the side vary)."""
    from detdeploy.core.masks import MaskConfig
    from detdeploy.runtimes.tensorrt_common import (BatchProfile, EngineBuildInfo,
                                                    EngineSidecar, ShapeProfile, write_sidecar)
    engine = tmp_path / 'ins.engine'
    engine.write_bytes(b'plan bytes')
    names = ('num_dets', 'boxes', 'scores', 'labels', 'masks')
    for mask, profile, dims in (
            (MaskConfig('box', size=28), None, [1, 28, 28]),
            (MaskConfig('input', stride=8), None, [1, 32, 40]),
            (MaskConfig('input', stride=8), ShapeProfile((256, 32), (256, 320), (256, 640), 32),
             [1, 32, -1])):
        metadata = fake_metadata(input_hw=(256, 320), task='instance', mask=mask,
                                 dynamic_shape=profile is not None)
        build = EngineBuildInfo('fp16', BatchProfile(1, 2, 4), (256, 320), 'images', names,
                                '10.9', 'gpu', 'ins.onnx', '0' * 64, None, None, '0.1.0',
                                shape_profile=profile)
        write_sidecar(engine, EngineSidecar(metadata, build, '0' * 64))
        models, _ = plan_repository(engine, 'ins')
        parsed = {m.name: parse_config(m.config, m.name, model_config_module()) for m in models}
        assert [(t.name, list(t.dims)) for t in parsed['ins_model'].output][-1] == (
            'masks', dims)
        assert [t.name for t in parsed['ins'].output][-1] == 'segmentation'
