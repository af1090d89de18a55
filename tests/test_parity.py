"""`detdeploy parity`: a correct export passes; broken copies fail with the right explanation;
the comparison rules (Polygraphy semantics, detection matching, borderline cases) by hand."""
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from detdeploy.cli import main
from detdeploy.verification.compare import (TOLERANCE_PRESETS, DetectionSet, compare_arrays,
                                      match_detections, pair_rows, tolerances_for)

PERTURBED_WEIGHT = 'model.backbone.stage2.1.main_conv.conv.weight'
TOL = TOLERANCE_PRESETS['fp32']


def _edited_copy(source, target, edit):
    model = onnx.load(str(source))
    edit(model)
    onnx.save(model, str(target))
    return target


def _set_prop(model, key, value):
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value


def _perturb_weight(model):
    [init] = [i for i in model.graph.initializer if i.name == PERTURBED_WEIGHT]
    values = onnx.numpy_helper.to_array(init).copy()
    values.flat[0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))


def _wrong_mean_std(model):
    preprocess = json.loads({p.key: p.value for p in model.metadata_props}['preprocess'])
    preprocess['mean'], preprocess['std'] = [0.0, 0.0, 0.0], [255.0, 255.0, 255.0]
    _set_prop(model, 'preprocess', json.dumps(preprocess))


def _flipped_channels(model):
    preprocess = json.loads({p.key: p.value for p in model.metadata_props}['preprocess'])
    preprocess['channel_order'] = 'rgb'
    _set_prop(model, 'preprocess', json.dumps(preprocess))


def _no_raw_output_names(model):
    """As files exported before the metadata named the raw outputs."""
    kept = [p for p in model.metadata_props if p.key != 'raw_outputs']
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


def _swapped_outputs(model):
    outputs = list(model.graph.output)
    outputs[1], outputs[2] = outputs[2], outputs[1]          # boxes <-> scores
    del model.graph.output[:]
    model.graph.output.extend(outputs)


@pytest.fixture(scope='module')
def files(tmp_path_factory, tiny_onnx):
    """The correct export (conftest's tiny_onnx: 320x320, --nms onnx, dynamic batch, exported
    once) and broken copies of it."""
    folder = tmp_path_factory.mktemp('parity')
    good = tiny_onnx[0]
    return {
        'good': good,
        'perturbed': _edited_copy(good, folder / 'perturbed.onnx', _perturb_weight),
        'mean_std': _edited_copy(good, folder / 'mean_std.onnx', _wrong_mean_std),
        'channels': _edited_copy(good, folder / 'channels.onnx', _flipped_channels),
        'swapped': _edited_copy(good, folder / 'swapped.onnx', _swapped_outputs),
        'unnamed_raw': _edited_copy(good, folder / 'unnamed_raw.onnx', _no_raw_output_names),
        'not_onnx': _write(folder / 'not_onnx.onnx', b'not an onnx file'),
    }


def _write(path, data):
    path.write_bytes(data)
    return path


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(['parity', *map(str, args)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_correct_export_passes_on_a_mixed_batch(files, tiny_checkpoint, image_dir, tmp_path,
                                                capsys):
    report_path = tmp_path / 'report.json'
    code, out, err = run_cli(capsys, files['good'], '--checkpoint', tiny_checkpoint,
                             '--images', image_dir, '--batch', '3', '--json', report_path)
    assert code == 0, out + err
    assert 'parity: done 3/3 img (' in err          # progress off a terminal (issue 20)
    lines = out.splitlines()
    assert lines[-2] == f'report: {report_path}'
    assert lines[-1].startswith(f"PASS: {files['good']} agrees with PyTorch on 3 images")
    assert 'metadata: ok' in out
    assert 'nms (both sides, --nms onnx): score > ' in out
    report = json.loads(report_path.read_text())
    assert report['verdict'] == 'PASS' and report['failures'] == []
    assert report['arch'] == 'rtmdet-tiny'            # --model defaulted from the metadata
    assert [Path(image['source']).name for image in report['images']] == [
        'gray.png', 'tall.png', 'wide.jpg']
    for image in report['images']:
        assert image['status'] in ('ok', 'borderline')
        assert image['matched'] >= image['torch_count'] - len(image['unmatched']) > 0
        assert image['max_box_error_px'] <= TOL.box_atol_px
    raw = report['raw_outputs']
    assert sorted(raw) == sorted([f'cls_scores.{i}' for i in range(3)] +
                                 [f'bbox_preds.{i}' for i in range(3)])
    assert all(r['failing'] == 0 and r['max_abs_error'] < TOL.atol for r in raw.values())
    assert raw['cls_scores.0']['shape'] == [80, 40, 40]
    props = {p.key: p.value for p in onnx.load(str(files['good'])).metadata_props}
    assert report['nms'] == json.loads(props['nms'])          # PyTorch ran the file's NMS
    assert len(report['raw_outputs_by_image']) == 3


def test_perturbed_weight_fails_and_per_layer_names_the_layer(files, tiny_checkpoint, capsys):
    code, out, _ = run_cli(capsys, files['perturbed'], '--checkpoint', tiny_checkpoint,
                           '--random', '1', '--per-layer')
    assert code == 1
    assert 'FAIL: ' in out and 'raw outputs differ' in out
    [found] = [line for line in out.splitlines() if 'first diverging:' in line]
    assert '(Conv)' in found and 'module backbone.stage2.1.main_conv.bn' in found
    assert PERTURBED_WEIGHT in out
    assert 'its inputs agree:' in out
    # the search's pruned runs, counted by the ONNX Runtime backend's run_tensors
    runs = re.search(r'per-layer \((\d+) pruned runs', out)
    assert runs and 0 < int(runs.group(1)) < 20


def test_file_naming_no_raw_outputs_gets_a_note(files, tiny_checkpoint, capsys):
    code, out, _ = run_cli(capsys, files['unnamed_raw'], '--checkpoint', tiny_checkpoint,
                           '--random', '1', '--per-layer')
    assert code == 0, out
    assert ('note: raw outputs not compared: the file names none (exported by an older '
            'detdeploy?)') in out
    assert 'raw outputs before NMS' not in out and 'per-layer (' not in out


@pytest.mark.parametrize('broken, cause', [
    ('mean_std', 'metadata: MISMATCH preprocess.mean: preprocess mean (0, 0, 0) in the file '
                 "differs from rtmdet-tiny's (103.53, 116.28, 123.675)"),
    ('channels', 'metadata: MISMATCH preprocess.channel_order: channel order is RGB in the file '
                 'but rtmdet-tiny was trained on BGR'),
    ('swapped', 'metadata: MISMATCH outputs: outputs are (num_dets, scores, boxes, labels) but '
                'the layout in the metadata is (num_dets, boxes, scores, labels)'),
])
def test_broken_metadata_fails_with_its_cause(files, tiny_checkpoint, capsys, broken, cause):
    code, out, _ = run_cli(capsys, files[broken], '--checkpoint', tiny_checkpoint,
                           '--random', '1')
    assert code == 1
    assert cause in out
    verdict = out.splitlines()[-1]
    assert verdict.startswith('FAIL: metadata: ')
    # the network itself is intact: raw outputs agree
    assert 'raw outputs differ' not in verdict
    if broken == 'mean_std':
        assert 'metadata: MISMATCH preprocess.std' in out


@pytest.mark.parametrize('args, message', [
    (['missing.onnx', '--random', '1'], 'error: model file not found: missing.onnx'),
    (['{good}'], 'error: give either images (--images PATH, repeatable, or paths after MODEL_FILE) or --random N'),
    (['{good}', '--random', '1', '--backend', 'trt'], 'error: '),
    (['{ckpt}', '--model', 'rtmdet-tiny', '--random', '1'], 'model files end in .onnx'),
    (['{bad}', '--random', '1'], 'is not an ONNX model'),
])
def test_bad_input_is_one_line_and_exit_2(files, tiny_checkpoint, capsys, args, message):
    args = [a.format(good=files['good'], ckpt=tiny_checkpoint, bad=files['not_onnx'])
            for a in args]
    code, out, err = run_cli(capsys, *args, '--checkpoint', tiny_checkpoint)
    assert code == 2
    assert message in err and 'Traceback' not in err
    assert len([line for line in err.splitlines() if line.startswith('error: ')]) == 1


# ---- comparison rules on hand-made data -------------------------------------------------

def test_array_comparison_uses_polygraphy_semantics():
    want = np.array([[100.0, 1.0], [0.0, -2.0]])
    got = want + np.array([[0.05, 2e-4], [1e-4, 0.0]])
    # 100 -> 100.05: abs 0.05 > atol but rel 5e-4 <= rtol: passes; 0 -> 1e-4: rel inf, abs ok
    passing = compare_arrays(got, want, atol=1e-2, rtol=1e-3)
    assert passing.passed and passing.failing == 0
    assert passing.max_abs_error == pytest.approx(0.05)
    assert passing.worst_index == [0, 0] and passing.max_rel_error == np.inf
    failing = compare_arrays(got, want, atol=1e-5, rtol=1e-4)
    assert not failing.passed and failing.failing == 3 and failing.failing_share == 0.75
    assert failing.worst_index == [0, 0]
    assert (failing.worst_got, failing.worst_want) == (pytest.approx(100.05), 100.0)


def test_array_comparison_nan_and_shape_mismatch_fail():
    nan = compare_arrays(np.array([1.0, np.nan]), np.array([1.0, 2.0]), atol=1, rtol=1)
    assert not nan.passed and nan.failing == 1 and nan.worst_index == [1]
    same_nan = compare_arrays(np.array([np.nan]), np.array([np.nan]), atol=0, rtol=0)
    assert same_nan.passed
    assert not compare_arrays(np.zeros((2, 3)), np.zeros((3, 2)), atol=1, rtol=1).passed


def _dets(rows):
    """rows of (x1, y1, x2, y2, score, label), best first."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    return DetectionSet(rows[:, :4], rows[:, 4], rows[:, 5].astype(np.int64))


def test_matcher_pairs_by_label_and_iou_and_measures_errors():
    want = _dets([(10, 10, 50, 50, 0.9, 1), (12, 12, 52, 52, 0.8, 2), (100, 100, 150, 160, 0.7, 1)])
    got = _dets([(100, 100, 150, 160.001, 0.70001, 1), (12, 12, 52, 52, 0.8, 2),
                 (10, 10, 50, 50, 0.9, 1)])
    match = match_detections(want, got, TOL, score_thr=0.05, max_det=100)
    assert (match.matched, match.failed_pairs, match.unmatched) == (3, 0, [])
    assert match.max_box_error_px == pytest.approx(1e-3, rel=1e-3)
    assert match.max_score_error == pytest.approx(1e-5, rel=1e-3)
    assert match.status == 'ok'
    # a label change or a moved box is a failure
    moved = _dets([(10, 10, 50, 50, 0.9, 1), (12, 12, 52, 52, 0.8, 3), (100, 100, 150, 170, 0.7, 1)])
    match = match_detections(want, moved, TOL, score_thr=0.05, max_det=100)
    assert match.matched == 2 and match.failed_pairs == 1 and match.status == 'FAIL'
    assert {(u.side, u.label) for u in match.unmatched} == {('torch', 2), ('backend', 3)}
    assert not any(u.borderline for u in match.unmatched)


def test_borderline_at_score_threshold_and_max_det_cut():
    score_thr, max_det = 0.3, 3
    # PyTorch's third detection sits 1e-4 above the threshold; the backend scores it just below
    want = _dets([(0, 0, 10, 10, 0.9, 0), (20, 20, 30, 30, 0.8, 0), (40, 40, 50, 50, 0.3001, 4)])
    got = _dets([(0, 0, 10, 10, 0.9, 0), (20, 20, 30, 30, 0.8, 0)])
    match = match_detections(want, got, TOL, score_thr, max_det)
    assert match.status == 'borderline' and match.failed_pairs == 0
    assert [(u.side, u.label, u.borderline) for u in match.unmatched] == [('torch', 4, True)]
    # both sides full (max-det 3); their third detections differ, scores tied at the cut
    want = _dets([(0, 0, 10, 10, 0.9, 0), (20, 20, 30, 30, 0.8, 0), (40, 40, 50, 50, 0.5, 1)])
    got = _dets([(0, 0, 10, 10, 0.9, 0), (20, 20, 30, 30, 0.8, 0), (60, 60, 70, 70, 0.4999, 2)])
    match = match_detections(want, got, TOL, score_thr, max_det)
    assert match.status == 'borderline' and match.matched == 2
    assert all(u.borderline for u in match.unmatched) and len(match.unmatched) == 2
    # the same pair of cut-off detections, same label and overlapping: not a failed pair
    got = _dets([(0, 0, 10, 10, 0.9, 0), (20, 20, 30, 30, 0.8, 0), (41, 40, 51, 50, 0.4999, 1)])
    match = match_detections(want, got, TOL, score_thr, max_det)
    assert match.status == 'borderline' and match.failed_pairs == 0 and match.matched == 2
    # far from the cut and the threshold, a missing detection fails
    got = _dets([(0, 0, 10, 10, 0.9, 0), (40, 40, 50, 50, 0.5, 1)])
    match = match_detections(want, got, TOL, score_thr, max_det)
    assert match.status == 'FAIL'
    assert [(u.label, u.score, u.borderline) for u in match.unmatched] == [(0, 0.8, False)]
    # everything tied at the cut but nothing in common: more than a quarter is not a tie effect
    want = _dets([(i, 0, i + 5, 5, 1.0, 0) for i in range(0, 40, 10)])
    got = _dets([(i, 50, i + 5, 55, 1.0, 0) for i in range(0, 40, 10)])
    match = match_detections(want, got, TOL, score_thr, max_det=4)
    assert match.status == 'FAIL' and match.too_many_borderline and match.matched == 0


def _grid_boxes(count: int) -> np.ndarray:
    """`count` disjoint 8x8 boxes (no two overlap), 10 px apart."""
    x, y = np.arange(count) % 40 * 10.0, np.arange(count) // 40 * 10.0
    return np.stack([x, y, x + 8, y + 8], 1)


def test_rows_after_an_nms_pair_by_box_within_a_budget_of_ties():
    """`pair_rows`, the rule `parity` applies to rows that come out of an NMS (Faster R-CNN's
    proposals): reordered rows and padding pair; a row swapped for its neighbour at the NMS's
    IoU threshold (0.7) or pushed below the row cap is excused up to 1 % of the rows (at least
    2); a row with no such explanation, or too many, fails."""
    want = np.concatenate([_grid_boxes(300), np.zeros((4, 4))])
    got = want.copy()
    got[[10, 11]] = got[[11, 10]] + 0.01                       # a near tie reordered
    got[20] = want[20] + [0, 0, 0.9, 0]                          # kept its neighbour (IoU 0.9)
    pairing = pair_rows(got, want, nms_iou=0.7, max_rows=1000, key='proposals')
    assert (pairing.torch_rows, pairing.backend_rows, pairing.paired, pairing.reordered) == \
        (300, 300, 299, 2)
    assert (pairing.unpaired_torch, pairing.unpaired_backend, pairing.unexplained) == (1, 1, 0)
    assert pairing.passed and pairing.budget == 3
    assert list(pairing.torch_index[:12][-2:]) == [10, 11] and \
        list(pairing.backend_index[:12][-2:]) == [11, 10]
    assert len(pairing.torch_index) == 299 + 4                  # padding pairs with padding
    far = got.copy()
    far[20] = [500, 500, 508, 508]                               # a box no NMS tie explains
    pairing = pair_rows(far, want, 0.7, 1000)
    assert (pairing.unpaired_torch, pairing.unexplained, pairing.passed) == (1, 2, False)
    many = got.copy()
    many[30:34] += [0, 0, 0.9, 0]                                # 5 ties > budget 3
    pairing = pair_rows(many, want, 0.7, 1000)
    assert (pairing.unpaired_torch, pairing.unexplained, pairing.passed) == (5, 0, False)
    # both sides at the row cap (300): the last row on each side differs, pushed below the cut
    cut = want[:300].copy()
    cut[-1] = [500, 500, 508, 508]
    pairing = pair_rows(cut, want[:300], 0.7, max_rows=300)
    assert (pairing.unpaired_torch, pairing.unexplained, pairing.passed) == (1, 0, True)
    pairing = pair_rows(cut, want[:300], 0.7, max_rows=1000)     # no cut reached: unexplained
    assert (pairing.unexplained, pairing.passed) == (2, False)


def test_tolerance_presets_by_precision():
    assert tolerances_for(None) == tolerances_for('fp32') == TOL
    assert tolerances_for('fp16').atol > TOL.atol
    assert tolerances_for('int8+fp16') == TOLERANCE_PRESETS['int8']


def test_without_model_or_checkpoint_the_recorded_checkpoint_is_used(files, capsys):
    """A file records the checkpoint it was exported from (path and sha256): parity uses it
    when it is still there, instead of random weights for the arch (issue 20)."""
    code, out, err = run_cli(capsys, files['good'], '--random', '1')
    assert code == 0, out + err
    assert 'using the one' in err and 'was exported from' in err and 'random weights' not in err
