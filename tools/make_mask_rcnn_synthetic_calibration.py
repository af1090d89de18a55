"""Stores what `randomize_detector` measures for tests/test_mask_rcnn.py's synthetic Mask R-CNN
R50 weights (BN statistics, predictor output spreads: two R50 forwards of 4 images at 320 px,
over a minute on the shared machine), so the test replays them instead of running them.

Writes tests/data/mask_rcnn_r50_synthetic_calibration.npz (float32) and checks that the replay
gives the measured weights bit for bit.
Run: .venv/bin/python tools/make_mask_rcnn_synthetic_calibration.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from test_mask_rcnn import CALIBRATION, synthetic_model  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    record: dict[str, torch.Tensor] = {}
    measured = synthetic_model(measure=True, record=record).state_dict()
    np.savez_compressed(CALIBRATION, **{key: value.numpy() for key, value in record.items()})
    replayed = synthetic_model().state_dict()
    differ = [key for key, value in measured.items() if not torch.equal(replayed[key], value)]
    assert not differ, f'replay differs at {differ[:3]}'
    print(f'{CALIBRATION}: {len(record)} arrays, {CALIBRATION.stat().st_size} bytes; '
          'replay equals measuring')


if __name__ == '__main__':
    main()
