"""Exponential moving average of a model's weights, as MMDetection's `ExpMomentumEMA`.

The averaged copy (parameters and buffers) is what evaluation, `best`/`last` checkpoints and
export use. Momentum starts near 1 and decays to `momentum` with time constant `gamma` steps:
m(t) = (1 - momentum) * exp(-(1 + t) / gamma) + momentum; avg = (1 - m) * avg + m * source.
"""
from __future__ import annotations

import copy
import math

import torch


class ExpMomentumEMA:
    def __init__(self, model: torch.nn.Module, momentum: float = 0.0002, gamma: float = 2000):
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.momentum = momentum
        self.gamma = gamma
        self.steps = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        source = model.state_dict()
        for name, averaged in self.module.state_dict().items():
            value = source[name].detach()
            if self.steps == 0 or not averaged.dtype.is_floating_point:
                averaged.copy_(value)
            else:
                momentum = ((1 - self.momentum) * math.exp(-float(1 + self.steps) / self.gamma)
                            + self.momentum)
                averaged.mul_(1 - momentum).add_(value, alpha=momentum)
        self.steps += 1

    def state_dict(self) -> dict:
        return {'module': self.module.state_dict(), 'steps': self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state['module'])
        self.steps = int(state['steps'])
