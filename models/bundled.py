"""The bundled models, trained by `detdeploy train` on the synthetic shapes dataset
(`detdeploy make-dataset shapes`) and shipped as package data in fp16: `rtmdet` (rtmdet-tiny,
boxes), `rtmdet-ins` (rtmdet-ins-tiny, instance masks) and `rotated-rtmdet` (rotated-rtmdet-tiny,
oriented boxes, trained on `make-dataset shapes --rotated`).

`rtmdet` (the default), `rtmdet-ins` and `rotated-rtmdet` without `--checkpoint` (and without `--class-names`)
mean these models; the sized names (`rtmdet-tiny` ... `-x`, `rtmdet-ins-tiny` ...) stay
architectures with random weights unless given a checkpoint. `write_bundled` turns a training
checkpoint into a shipped file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from detdeploy.core.fileio import atomic_write

WEIGHTS = Path(__file__).parent / 'weights'
BUNDLED_ALIAS = 'rtmdet'
BUNDLED_FILE = WEIGHTS / 'rtmdet_tiny_shapes.pth'
DESCRIPTION = 'the bundled rtmdet-tiny shapes model (6 classes, 256x256)'
INSTANCE_ALIAS = 'rtmdet-ins'
INSTANCE_FILE = WEIGHTS / 'rtmdet_ins_tiny_shapes.pth'
ROTATED_ALIAS = 'rotated-rtmdet'
ROTATED_FILE = WEIGHTS / 'rotated_rtmdet_tiny_shapes.pth'
# alias -> (file, what the commands' note calls it)
BUNDLED = {
    BUNDLED_ALIAS: (BUNDLED_FILE, DESCRIPTION),
    INSTANCE_ALIAS: (INSTANCE_FILE,
                     'the bundled rtmdet-ins-tiny shapes model (6 classes, 256x256, masks)'),
    ROTATED_ALIAS: (ROTATED_FILE, 'the bundled rotated-rtmdet-tiny shapes model '
                                  '(6 classes, 256x256, oriented boxes)'),
}


def bundled_checkpoint(name: str | None) -> Path | None:
    """The shipped checkpoint if `name` selects one (the default model or an alias)."""
    file, _ = BUNDLED.get((name or BUNDLED_ALIAS).lower(), (None, None))
    return file if file is not None and file.is_file() else None


def bundled_description(name: str | None) -> str:
    return BUNDLED[(name or BUNDLED_ALIAS).lower()][1]


def write_bundled(source: str | Path, target: str | Path = BUNDLED_FILE,
                  card: dict | None = None) -> Path:
    """Keep the EMA weights (the checkpoint's `state_dict`) in fp16 and the metadata; drop the
    optimizer and training state. `card` (data, command, metrics) goes into meta."""
    checkpoint = torch.load(source, map_location='cpu', weights_only=True)
    state_dict = {key: value.half() if value.is_floating_point() else value
                  for key, value in checkpoint['state_dict'].items()}
    meta = {key: value for key, value in checkpoint['meta'].items() if key != 'detdeploy_train'}
    train = checkpoint['meta'].get('detdeploy_train', {})
    meta['detdeploy_model_card'] = {**{k: train[k] for k in ('epoch', 'iter', 'best_ap',
                                                              'train_config') if k in train},
                                    **(card or {})}
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as handle:
        torch.save({'meta': meta, 'state_dict': state_dict}, handle)
    return Path(target)
