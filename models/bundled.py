"""The bundled default model: rtmdet-tiny trained by `detdeploy train` on the synthetic shapes
dataset (`detdeploy make-dataset shapes`), shipped as package data in fp16.

`rtmdet` without `--checkpoint` (and without `--class-names`) means this model; the sized names
(`rtmdet-tiny` ... `-x`) stay architectures with random weights unless given a checkpoint.
`write_bundled` turns a training checkpoint into the shipped file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from detdeploy.core.fileio import atomic_write

BUNDLED_ALIAS = 'rtmdet'
BUNDLED_FILE = Path(__file__).parent / 'weights' / 'rtmdet_tiny_shapes.pth'
DESCRIPTION = 'the bundled rtmdet-tiny shapes model (6 classes, 256x256)'


def bundled_checkpoint(name: str | None) -> Path | None:
    """The shipped checkpoint if `name` selects it (the default model or its alias)."""
    if (name is None or name.lower() == BUNDLED_ALIAS) and BUNDLED_FILE.is_file():
        return BUNDLED_FILE
    return None


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
