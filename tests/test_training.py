"""Training: the shapes dataset, a few real steps, exact resume, checkpoints, DDP on 2 CPU
processes, and `detdeploy train` / `make-dataset` on the command line.

Everything runs on 64x64 images so a step takes a fraction of a second.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detdeploy.models import load_detector
from detdeploy.training.shapes import SHAPE_CLASSES, make_shapes_dataset
from detdeploy.training.trainer import LAST, LOG, Trainer, TrainConfig

SIZE = 64


@pytest.fixture(scope='module')
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('shapes')
    make_shapes_dataset(out, train=12, val=4, size=SIZE, seed=3)
    return out


def config(shapes: Path, out: Path, **changes) -> TrainConfig:
    values = dict(model='rtmdet-tiny', train_ann=str(shapes / 'annotations/instances_train.json'),
                  train_images=str(shapes / 'train'), out=str(out), epochs=2, batch=4,
                  img_size=SIZE, lr=0.002, warmup_iters=2, log_interval=1, seed=1,
                  max_iters_per_epoch=2)
    values.update(changes)
    return TrainConfig(**values)


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


# --- dataset ------------------------------------------------------------------------------------
def test_shapes_dataset_is_deterministic_for_a_seed(shapes, tmp_path):
    make_shapes_dataset(tmp_path / 'again', train=12, val=4, size=SIZE, seed=3)
    assert digest_tree(tmp_path / 'again') == digest_tree(shapes)
    make_shapes_dataset(tmp_path / 'other', train=2, val=0, size=SIZE, seed=4)
    assert (tmp_path / 'other/train/000000.png').read_bytes() != \
        (shapes / 'train/000000.png').read_bytes()


def test_shapes_dataset_is_valid_coco(shapes):
    from PIL import Image
    from pycocotools.coco import COCO
    for split, count in (('train', 12), ('val', 4)):
        coco = COCO(str(shapes / f'annotations/instances_{split}.json'))
        assert len(coco.getImgIds()) == count
        assert [coco.cats[i]['name'] for i in sorted(coco.getCatIds())] == list(SHAPE_CLASSES)
        assert coco.getAnnIds(), 'no objects at all'
        for image_id, image in coco.imgs.items():
            with Image.open(shapes / split / image['file_name']) as pil:
                assert pil.size == (image['width'], image['height']) == (SIZE, SIZE)
                assert pil.mode == 'RGB'
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                x, y, w, h = ann['bbox']
                assert w > 0 and h > 0 and x >= 0 and y >= 0
                assert x + w <= SIZE + 1e-6 and y + h <= SIZE + 1e-6
                assert ann['category_id'] in coco.cats and ann['iscrowd'] == 0
                mask = coco.annToMask(ann).astype(bool)      # the visible part, in its box
                assert ann['area'] == mask.sum() > 0
                ys, xs = np.nonzero(mask)
                assert xs.min() >= int(x) and xs.max() < x + w + 1
                assert ys.min() >= int(y) and ys.max() < y + h + 1


# --- training -----------------------------------------------------------------------------------
def test_training_steps_reduce_the_loss(shapes, tmp_path):
    trainer = Trainer(config(shapes, tmp_path, lr=0.004), show_progress=False)
    images, boxes, labels = next(iter(trainer._loader(0)))
    losses = [trainer.train_step(images, boxes, labels)['loss'] for _ in range(12)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_resume_gives_identical_next_step_losses(shapes, tmp_path):
    straight = Trainer(config(shapes, tmp_path / 'straight'), show_progress=False)
    straight.fit()
    interrupted = Trainer(config(shapes, tmp_path / 'resumed'), show_progress=False)
    interrupted.train_epoch()                       # epoch 1 only, then "stop"
    interrupted._save(LAST)
    resumed = Trainer(config(shapes, tmp_path / 'resumed'), resume=True, show_progress=False)
    assert (resumed.epoch, resumed.iteration) == (1, 2)
    resumed.fit()

    def step_losses(run: str) -> dict[int, float]:
        rows = [json.loads(line) for line in (tmp_path / run / LOG).read_text().splitlines()]
        return {row['iter']: row['loss'] for row in rows if 'loss' in row}
    assert step_losses('resumed') == step_losses('straight')
    assert set(step_losses('straight')) == {1, 2, 3, 4}
    a = torch.load(tmp_path / 'straight' / LAST, weights_only=True)['state_dict']
    b = torch.load(tmp_path / 'resumed' / LAST, weights_only=True)['state_dict']
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_refuses_a_changed_setting(shapes, tmp_path):
    from detdeploy.core.errors import DetdeployError
    Trainer(config(shapes, tmp_path, epochs=1), show_progress=False).fit()
    with pytest.raises(DetdeployError, match='--lr'):
        Trainer(config(shapes, tmp_path, epochs=1, lr=0.01), resume=True, show_progress=False)


def test_resume_may_lengthen_or_shorten_the_run(shapes, tmp_path):
    from detdeploy.core.errors import DetdeployError
    notes = []
    Trainer(config(shapes, tmp_path, epochs=3, max_iters_per_epoch=1), show_progress=False
            ).fit()                                     # 3 epochs of one step
    longer = Trainer(config(shapes, tmp_path, epochs=4, max_iters_per_epoch=1), resume=True,
                     show_progress=False, echo=notes.append)
    assert longer.epochs_changed == (3, 4) and 'recomputed for 4 epochs' in notes[0]
    longer.fit()
    meta = torch.load(tmp_path / LAST, weights_only=True)['meta']['detdeploy_train']
    assert (meta['epoch'], meta['train_config']['epochs']) == (4, 4)
    with pytest.raises(DetdeployError, match='already done 4 epochs'):
        Trainer(config(shapes, tmp_path, epochs=2, max_iters_per_epoch=1), resume=True,
                show_progress=False)


def test_checkpoint_is_mmdetection_format_and_reloads_strictly(shapes, tmp_path):
    trainer = Trainer(config(shapes, tmp_path, epochs=1, val_ann=str(
        shapes / 'annotations/instances_val.json'), val_images=str(shapes / 'val')),
        show_progress=False)
    summary = trainer.fit()
    assert set(summary['val']) == {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}
    for name in ('last.pth', 'best.pth', 'log.jsonl', 'curves.png'):
        assert (tmp_path / name).is_file(), name
    raw = torch.load(tmp_path / LAST, map_location='cpu', weights_only=True)
    assert raw['meta']['dataset_meta']['classes'] == SHAPE_CLASSES
    assert raw['meta']['detdeploy']['input_size'] == [SIZE, SIZE]
    ema = trainer.ema.module.state_dict()
    assert set(raw['state_dict']) == set(ema)
    detector = load_detector('rtmdet-tiny', tmp_path / LAST)       # strict load
    assert detector.class_names == SHAPE_CLASSES
    assert detector.spec.preprocessing.input_size == (SIZE, SIZE)
    loaded = detector.model.state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_ddp_on_two_cpu_processes(shapes, tmp_path):
    """torchrun with 2 gloo processes: half the steps each, only rank 0 writes, and a run that
    resumes from the DDP checkpoint in one process."""
    out = tmp_path / 'ddp'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2',
               '--standalone', '-m', 'detdeploy', 'train',
               '--train-ann', str(shapes / 'annotations/instances_train.json'),
               '--train-images', str(shapes / 'train'), '--epochs', '1', '--batch', '2',
               '--img-size', str(SIZE), '--lr', '0.002', '--warmup-iters', '1',
               '--out', str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '2 process(es)' in done.stdout and '3 steps each' in done.stdout   # 12 / (2 x 2)
    assert done.stdout.count('done:') == 1                  # rank 0 alone reports and writes
    assert sorted(p.name for p in out.iterdir()) == ['best.pth', 'curves.png', 'last.pth',
                                                       'log.jsonl']
    checkpoint = torch.load(out / LAST, map_location='cpu', weights_only=True)
    assert checkpoint['meta']['detdeploy_train']['iter'] == 3
    assert not any(key.startswith('module.') for key in checkpoint['state_dict'])
    load_detector('rtmdet-tiny', out / LAST)


# --- command line -------------------------------------------------------------------------------
def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'detdeploy', *args], capture_output=True,
                          text=True, timeout=300, **kwargs)


def test_cli_make_dataset_and_train(tmp_path):
    done = run_cli(['make-dataset', 'shapes', '--out', str(tmp_path / 'data'), '--train', '8',
                    '--val', '2', '--size', '64', '--seed', '5'])
    assert done.returncode == 0, done.stderr
    assert 'train: 8 images' in done.stdout and 'val: 2 images' in done.stdout
    data = tmp_path / 'data'
    done = run_cli(['train', '--train-ann', str(data / 'annotations/instances_train.json'),
                    '--train-images', str(data / 'train'), '--val-ann',
                    str(data / 'annotations/instances_val.json'), '--val-images',
                    str(data / 'val'), '--epochs', '1', '--batch', '4', '--img-size', '64',
                    '--out', str(tmp_path / 'run')])
    assert done.returncode == 0, done.stderr
    assert 'epoch 1/1: loss' in done.stdout and 'val AP' in done.stdout
    assert (tmp_path / 'run/best.pth').is_file()


@pytest.mark.parametrize('args, message', [
    (['train', '--train-ann', 'missing.json', '--train-images', '.', '--out', 'x'],
     'missing.json'),
    (['train', '--model', 'rtmdet-tinny', '--train-ann', 'a.json', '--train-images', '.',
      '--out', 'x'], "did you mean 'rtmdet-tiny'"),
    (['train', '--train-ann', 'a.json', '--train-images', '.', '--out', 'x', '--img-size',
      '100'], 'multiples of 32'),
    (['train', '--train-ann', 'a.json', '--train-images', '.', '--out', 'x', '--val-ann',
      'v.json'], '--val-ann and --val-images together'),
    (['make-dataset', 'shapes', '--out', 'x', '--train', '0', '--val', '0'], 'above 0'),
])
def test_cli_training_bad_input_is_one_line_exit_2(tmp_path, args, message):
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert 'Traceback' not in done.stderr and len(done.stderr.strip().splitlines()) == 1
