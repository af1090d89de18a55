"""Shared fixtures: spec paths, deterministic test weights and generated images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SPEC_DIR = Path(__file__).resolve().parents[2] / 'shared' / 'spec'
DATA_DIR = Path(__file__).resolve().parent / 'data'


def randomize_detector(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give a model non-trivial weights: random BN statistics, spread class scores and boxes
    with positive extent, so it produces detections and checkpoint round trips mean something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(1 + 0.1 * torch.randn(size, generator=generator))
                module.bias.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
        head = model.bbox_head
        for tower in (*head.cls_convs, *head.reg_convs):    # MMDetection's N(0, 0.01) init
            for layer in tower:                              # makes head features near constant
                fan_in = layer.conv.weight[0].numel()
                layer.conv.weight.normal_(0, (2 / fan_in) ** 0.5, generator=generator)
        for rtm_cls, rtm_reg in zip(head.rtm_cls, head.rtm_reg):
            rtm_cls.weight.normal_(0, 0.3, generator=generator)
            rtm_cls.bias.copy_(-3 + torch.randn(rtm_cls.bias.shape, generator=generator))
            rtm_reg.weight.normal_(0, 0.1, generator=generator)
            rtm_reg.bias.fill_(0.0 if head.exp_on_reg else 2.0)
    return model.eval()


@pytest.fixture(scope='session')
def tiny_detector():
    from detdeploy.models import load_detector
    torch.manual_seed(0)
    detector = load_detector('rtmdet-tiny')
    randomize_detector(detector.model)
    return detector


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory, tiny_detector):
    from detdeploy.models import save_checkpoint
    path = tmp_path_factory.mktemp('ckpt') / 'rtmdet_tiny_test.pth'
    save_checkpoint(path, tiny_detector.model, tiny_detector.spec, tiny_detector.class_names)
    return path


def make_image(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 RGB image with smooth colour blobs on noise (something for a detector to see)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for _ in range(4):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        y1, x1 = y0 + rng.integers(height // 8, height // 2), x0 + rng.integers(width // 8, width // 2)
        image[y0:y1, x0:x1] = rng.integers(80, 255, 3, dtype=np.uint8)
    return image


@pytest.fixture(scope='session')
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('images')
    Image.fromarray(make_image(300, 400, 0)).save(folder / 'wide.jpg', quality=95)
    Image.fromarray(make_image(500, 333, 1)).save(folder / 'tall.png')
    Image.fromarray(make_image(64, 64, 2)[:, :, 0]).save(folder / 'gray.png')
    return folder
