"""`infer --ann`: coco_results.json carries the dataset's image and category ids, so pycocotools
scores it against that dataset, with the AP `eval` reports; the per-image line and warnings."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from detdeploy.cli import main as cli_main
from detdeploy.evaluation.coco_eval import METRIC_NAMES
from detdeploy.training.shapes import make_shapes_dataset


def run_main(capsys, *args) -> tuple[int, str, str]:
    """The CLI in-process, as `detdeploy ARGS` would run: (exit code, stdout, stderr)."""
    try:
        cli_main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope='module')
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('ids_shapes')
    make_shapes_dataset(out, train=0, val=5, size=256, seed=3)
    return out


def test_coco_results_score_like_eval(shapes, tmp_path, capsys, one_torch_thread):
    """The bundled model on a shapes val set: pycocotools on infer's coco_results.json gives
    the metrics `eval` reports for the same model, preset and images."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    ann, images = shapes / 'annotations/instances_val.json', shapes / 'val'
    out = tmp_path / 'infer'
    code, stdout, stderr = run_main(capsys, 'infer', 'rtmdet', images, '--ann', ann,
                                    '--nms-preset', 'eval', '--out', out)
    assert code == 0, stderr
    assert f'({"image_id and category_id from " + str(ann)})' in stdout
    report = tmp_path / 'eval.json'
    code, _, stderr = run_main(capsys, 'eval', 'rtmdet', '--ann', ann, '--images', images,
                               '--json', report)
    assert code == 0, stderr
    assert 'eval torch: done 5/5 img (' in stderr          # progress lines off a terminal
    eval_metrics = json.loads(report.read_text())['results'][0]['metrics']

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
        results = coco.loadRes(str(out / 'coco_results.json'))   # fails on foreign ids
        evaluator = COCOeval(coco, results, 'bbox')
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert eval_metrics['AP'] > 0.3                                # a real score, not 0
    for name, value in zip(METRIC_NAMES, evaluator.stats):
        # coco_results rounds boxes to 1e-3 px and scores to 1e-6
        assert max(float(value), 0.0) == pytest.approx(eval_metrics[name], abs=2e-3), name
    rows = json.loads((out / 'coco_results.json').read_text())
    assert {row['image_id'] for row in rows} <= set(coco.getImgIds())
    assert {row['category_id'] for row in rows} <= set(coco.getCatIds())
    assert min(coco.getCatIds()) == 1                 # so a 0-based label would not pass


def test_without_ann_the_ids_are_said(shapes, tmp_path, capsys, one_torch_thread):
    images = sorted((shapes / 'val').iterdir())[:2]
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not an image')
    code, stdout, stderr = run_main(capsys, 'predict', 'rtmdet', images[0], bad, images[1],
                                    '--out', tmp_path / 'out')
    assert code == 2                                   # one image unreadable
    assert 'position in this run from 0, category_id: class index from 0' in stdout
    lines = stdout.splitlines()
    first = next(line for line in lines if line.startswith(str(images[0])))
    # `000000.png: 2 square, 1 circle (17 detections, 3 at score > 0.3), 40 ms -> ...`
    summary, _, rest = first.partition(' (')
    assert summary.split(': ')[1] != 'nothing' and rest.split('), ')[1].split(' ')[1] == 'ms'
    rows = json.loads((tmp_path / 'out/coco_results.json').read_text())
    assert {row['image_id'] for row in rows} <= {0, 2}          # positions, the bad one was 1
    assert 'broken.png' in stderr and 'could not be read' in stderr


def test_image_missing_from_ann_is_one_line(shapes, tmp_path, capsys):
    other = tmp_path / 'elsewhere.png'
    other.write_bytes((shapes / 'val' / '000000.png').read_bytes())
    code, _, stderr = run_main(capsys, 'infer', 'rtmdet', other, '--ann',
                               shapes / 'annotations/instances_val.json')
    assert code == 2
    assert stderr.strip().splitlines()[-1].startswith('error: --ann ')
    assert '1 of 1 images are not listed in it (file_name), e.g.' in stderr


def test_a_bad_image_warning_comes_in_its_place(shapes, tmp_path, one_torch_thread):
    """stdout and stderr interleaved as a terminal shows them: the warning between the lines of
    the images before and after it."""
    from click.testing import CliRunner
    from detdeploy.cli import cli
    images = sorted((shapes / 'val').iterdir())[:2]
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not an image')
    result = CliRunner().invoke(cli, ['infer', 'rtmdet', str(images[0]), str(bad),
                                      str(images[1]), '--input-size', '64'])
    lines = [line for line in result.output.splitlines()
             if line.startswith((str(images[0]), str(images[1]), 'warning: '))]
    assert [line.split(':')[0] for line in lines] == [str(images[0]), 'warning',
                                                      str(images[1])]
    assert 'broken.png' in lines[1]
