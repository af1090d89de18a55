"""`detdeploy bench`: statistics on synthetic timings, the alternating schedule, the JSON schema,
and short real runs (exit codes and files only, no timing assertions)."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detdeploy.benchmark.report import SCHEMA_VERSION, format_report, result_to_json
from detdeploy.benchmark.stats import (alternating_schedule, paired_ratios, summarize,
                                       throughput_ips)
from detdeploy.benchmark.timing import IO_BINDING_KEY, Entry, run_benchmark
from detdeploy.cli import main
from detdeploy.core.metadata import ModelMetadata
from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.runtimes.backend import IO_BINDING, Backend

DETDEPLOY = str(Path(sys.executable).parent / 'detdeploy')
STATS_KEYS = {'count', 'mean', 'min', 'p50', 'p90', 'p99', 'max'}


@pytest.mark.parametrize('size', [1, 2, 7, 100, 1001])
def test_summary_matches_the_statistics_module(size):
    samples = np.random.default_rng(size).lognormal(3.0, 0.4, size)
    stats = summarize(samples)
    values = samples.tolist()
    assert stats.count == size
    assert stats.mean == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert (stats.min, stats.max) == (min(values), max(values))
    if size > 1:      # 'inclusive' is linear interpolation between order statistics
        cuts = statistics.quantiles(values, n=100, method='inclusive')
        assert (stats.p50, stats.p90, stats.p99) == pytest.approx(
            (cuts[49], cuts[89], cuts[98]), rel=1e-12)
    else:
        assert stats.p50 == stats.p90 == stats.p99 == values[0]


def test_summary_percentiles_by_hand():
    stats = summarize([10.0, 20.0, 30.0, 40.0, 50.0])
    # positions (n - 1) * q: 2.0, 3.6, 3.96
    assert (stats.p50, stats.p90, stats.p99) == pytest.approx((30.0, 46.0, 49.6))
    with pytest.raises(ValueError):
        summarize([])


def test_throughput_counts_images_over_total_time():
    assert throughput_ips([100.0, 300.0], batch=4) == pytest.approx(8 / 0.4)


def test_paired_ratios_cancel_drift_between_rounds():
    drift = np.array([1.0, 3.0, 0.5, 2.0, 1.2])          # the machine slows and speeds up
    baseline = 100.0 * drift                               # batch 1
    other = 8 * 40.0 * drift                               # batch 8, 40 ms per image
    ratios = paired_ratios(other.tolist(), 8, baseline.tolist(), 1)
    np.testing.assert_allclose(ratios, 0.4)
    assert np.median(paired_ratios([1, 2, 9], 1, [2, 2, 3], 1)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        paired_ratios([1, 2], 1, [1], 1)


def test_alternating_schedule_by_rounds():
    assert list(alternating_schedule(3, rounds=2)) == [(0, 0), (0, 1), (0, 2),
                                                       (1, 0), (1, 1), (1, 2)]
    assert list(alternating_schedule(2, rounds=0)) == []
    with pytest.raises(ValueError):
        list(alternating_schedule(2))
    with pytest.raises(ValueError):
        list(alternating_schedule(2, rounds=1, seconds=1.0))


def test_alternating_schedule_by_time_keeps_rounds_complete():
    now = [0.0]

    def clock():
        return now[0]

    pairs = []
    for pair in alternating_schedule(3, seconds=10.0, clock=clock):
        pairs.append(pair)
        now[0] += 1.5                    # each pair takes 1.5 s: 4.5 s per round
    # after round 0: 4.5 s, after round 1: 9 s, after round 2: 13.5 s >= 10 -> stop
    assert pairs == [(r, c) for r in range(3) for c in range(3)]


FAKE_METADATA = ModelMetadata(
    arch='fake', class_names=('a',), preprocess=PreprocessConfig(input_size=(64, 64)),
    nms_mode='onnx', nms=NMSConfig(), batch=None, dynamic_shape=True, opset=17,
    detdeploy_version='0', torch_version='', onnx_version='', checkpoint='none',
    checkpoint_sha256=None)


class FixedOutputBackend(Backend):
    """A backend with fixed detections that logs its calls, to check the order. Like ONNX
    Runtime it has an I/O binding, which the benchmark uses only on a GPU provider (`gpu`)."""

    name = 'ort'
    capabilities = frozenset({IO_BINDING})
    metadata = FAKE_METADATA

    def __init__(self, label, log, gpu=False):
        self.label, self.log, self.gpu = label, log, gpu

    def describe(self):
        return {'backend': self.name, 'device': 'cuda' if self.gpu else 'cpu',
                'providers': ['CUDAExecutionProvider' if self.gpu else 'CPUExecutionProvider'],
                'threads': {}, 'weights': 'none', 'nms_mode': 'onnx', 'arch': 'fake'}

    def _run(self, batch):
        self.log.append((self.label, len(batch)))
        size = len(batch)
        boxes = np.tile(np.array([[[4, 4, 20, 20], [0, 0, 0, 0]]], np.float32), (size, 1, 1))
        return [np.full((size, 1), 1, np.int32), boxes,
                np.tile(np.array([[0.9, 0.0]], np.float32), (size, 1)),
                np.tile(np.array([[0, -1]], np.int32), (size, 1))]

    def io_binding(self):
        log, label = self.log, self.label

        class Binding:
            def set_input(self, batch):
                self.batch = batch

            def run(self):
                log.append((label + ' bound', len(self.batch)))

        return Binding()


class FixedOutputEntries:
    """Entries around fake backends sharing one call log."""

    def __init__(self):
        self.calls = []

    def make(self, name, gpu=False):
        return Entry(name, FixedOutputBackend(name, self.calls, gpu))


def test_run_benchmark_alternates_and_records_every_stage():
    fake = FixedOutputEntries()
    entries = [fake.make('A'), fake.make('B', gpu=True)]
    images = [np.zeros((32, 48, 3), np.uint8), np.zeros((48, 32, 3), np.uint8)]
    result = run_benchmark(entries, (1, 2), images, ['x', 'y'], 'test images', warmup=1,
                           iters=3)
    # warm-up round, then 3 timed rounds; B's extra call per pass is its I/O-binding run
    one_round = [('A', 1), ('A', 2), ('B', 1), ('B bound', 1), ('B', 2), ('B bound', 2)]
    assert fake.calls == one_round * 4
    assert [c.label for c in result.configs] == ['A ort/cpu b1', 'A ort/cpu b2',
                                                 'B ort/cuda b1', 'B ort/cuda b2']
    for config in result.configs:
        samples = config.samples_ms
        assert all(len(values) == 3 for values in samples.values())
        parts = np.add(np.add(samples['preprocess'], samples['inference']),
                       samples['postprocess'])
        np.testing.assert_allclose(parts, samples['end_to_end'], rtol=1e-6, atol=1e-6)
    assert result.configs[0].inference_only_key == 'inference'
    assert result.configs[2].inference_only_key == IO_BINDING_KEY
    np.testing.assert_allclose(result.ratios(0, 'end_to_end'), 1.0)
    report = format_report(result)
    assert 'ratio' in report
    assert f'NMS in graph (onnx): {NMSConfig().describe()};' in report


class PaddedOutputBackend(FixedOutputBackend):
    """As FixedOutputBackend, for a model padded to a multiple of 32 (RetinaNet, YOLOv3):
    each batch's network input is its own canvas."""
    metadata = FAKE_METADATA.__class__(**{**FAKE_METADATA.__dict__, 'preprocess': PreprocessConfig(
        input_size=(64, 64), resize='fit', pad='divisor', size_divisor=32)})


def test_the_input_label_is_what_was_fed():
    """Not the resize scale: the padded shapes that ran, with their round counts."""
    calls = []
    entry = Entry('P', PaddedOutputBackend('P', calls))
    images = [np.zeros((32, 64, 3), np.uint8), np.zeros((64, 32, 3), np.uint8)]
    result = run_benchmark([entry], (1, 2), images, ['x', 'y'], 'test', warmup=1, iters=3)
    single, pair = result.configs
    assert single.input_shapes == [([1, 3, 32, 64], 2), ([1, 3, 64, 32], 1)]
    assert single.input_shape == [1, 3, 32, 64]
    assert pair.input_shapes == [([2, 3, 64, 64], 3)]       # each batch padded to its largest
    assert 'input 1x3x32x64 (2 rounds), 1x3x64x32 (1 rounds); 2x3x64x64; NMS' in format_report(
        result)
    record = json.loads(json.dumps(result_to_json(result)))
    assert record['configs'][0]['input_shapes'] == [{'shape': [1, 3, 32, 64], 'rounds': 2},
                                                    {'shape': [1, 3, 64, 32], 'rounds': 1}]
    assert record['configs'][1]['input_shape'] == [2, 3, 64, 64]


def test_json_schema_on_a_fake_run():
    fake = FixedOutputEntries()
    result = run_benchmark([fake.make('A'), fake.make('B', gpu=True)], (1,),
                           [np.zeros((32, 32, 3), np.uint8)], ['x'], 'test', warmup=0, iters=2)
    record = json.loads(json.dumps(result_to_json(result)))     # JSON-serialisable
    check_schema(record, rounds=2)
    assert IO_BINDING_KEY in record['configs'][1]['samples_ms']


def check_schema(record, rounds):
    assert record['schema_version'] == SCHEMA_VERSION == 1
    assert record['tool'] == 'detdeploy bench'
    assert {'date', 'cpu_model', 'logical_cores', 'usable_cores', 'load_average_1_5_15min', 'gpu',
            'torch_threads', 'versions', 'platform', 'python'} <= set(record['system'])
    assert 'numpy' in record['system']['versions']
    assert record['settings']['rounds'] == rounds
    for index, config in enumerate(record['configs']):
        assert {'label', 'model', 'backend', 'device', 'batch', 'input_shape', 'providers',
                'threads', 'nms_mode', 'nms', 'weights', 'inference_only_method', 'notes',
                'samples_ms', 'stats_ms', 'throughput_images_per_s',
                'ratio_to_baseline'} <= set(config)
        assert config['input_shape'][0] == config['batch']
        assert {'preprocess', 'inference', 'postprocess', 'end_to_end'} <= set(
            config['samples_ms'])
        for series in config['samples_ms'].values():
            assert len(series) == rounds and all(value >= 0 for value in series)
        assert set(config['stats_ms']) == set(config['samples_ms']) | {'inference_only'}
        for stats in config['stats_ms'].values():
            assert set(stats) == STATS_KEYS and stats['min'] <= stats['p50'] <= stats['max']
        assert set(config['throughput_images_per_s']) == {'end_to_end', 'inference_only'}
        for ratio in config['ratio_to_baseline'].values():
            assert len(ratio['per_round']) == rounds
            assert ratio['median'] == pytest.approx(np.median(ratio['per_round']))
            if index == 0:
                assert ratio['median'] == pytest.approx(1.0)


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory, tiny_onnx, tiny_checkpoint):
    out = tmp_path_factory.mktemp('bench')
    path, _ = tiny_onnx
    result = subprocess.run(
        [DETDEPLOY, 'bench', str(path), 'rtmdet-tiny', '--checkpoint', str(tiny_checkpoint),
         '--input-size', '320', '--batch', '1,2', '--warmup', '1', '--iters', '2',
         '--threads', '1', '--json', str(out / 'bench.json'), '--plot', str(out / 'bench.png')],
        capture_output=True, text=True, timeout=300)
    return result, out


def test_cli_run_on_onnx_and_torch(cli_run, tiny_onnx):
    result, out = cli_run
    assert result.returncode == 0, result.stderr
    assert 'Traceback' not in result.stderr
    for text in ('CPU ', 'versions:', 'providers CPUExecutionProvider', 'torch_intra_op 1',
                 'ort_intra_op 1', 'no disk I/O', 'end to end', 'inference only', 'stages'):
        assert text in result.stdout, text
    record = json.loads((out / 'bench.json').read_text())
    check_schema(record, rounds=2)
    configs = record['configs']
    assert [(c['backend'], c['batch']) for c in configs] == [('ort', 1), ('ort', 2),
                                                            ('torch', 1), ('torch', 2)]
    assert configs[0]['model'] == tiny_onnx[0].name and configs[2]['model'] == 'rtmdet-tiny'
    assert configs[1]['input_shape'] == [2, 3, 320, 320]
    assert configs[1]['input_shapes'] == [{'shape': [2, 3, 320, 320], 'rounds': 2}]
    assert configs[0]['providers'] == ['CPUExecutionProvider']
    assert configs[0]['nms'] == configs[2]['nms'] == {'score_thr': 0.05, 'pre_top_k': 1000,
                                                      'iou_thr': 0.65, 'max_det': 100}
    assert (out / 'bench.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert not list(out.glob('.*.tmp'))                 # atomic writes leave no temp files


@pytest.mark.parametrize('args, message', [
    (['missing.onnx'], 'model file not found'),
    (['rtmdet-q'], "unknown model 'rtmdet-q'"),
    (['x.onnx', '--iters', '2', '--seconds', '1'], '--iters or --seconds'),
    (['x.onnx', '--batch', '0'], "--batch '0'"),
    (['x.onnx', '--backend', 'tvm'], "--backend 'tvm'"),
    (['x.onnx', '--backend', 'torch'], 'leaves out'),
    (['rtmdet-tiny', '--backend', 'trt'], 'needs an .engine file'),
    (['model.engine'], 'model file not found'),
    (['model.plan'], 'model file not found'),
    ([], 'no model given'),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['bench', *args])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith('error: ') and message in error and '\n' not in error


def test_engine_without_tensorrt_is_one_line(tmp_path, capsys):
    engine = tmp_path / 'model.engine'
    engine.write_bytes(b'not an engine')
    with pytest.raises(SystemExit) as exit_info:
        main(['bench', str(engine), '--iters', '1', '--warmup', '0'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count('\n') == 0
