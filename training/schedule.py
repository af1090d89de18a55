"""RTMDet's optimiser and learning-rate schedule.

AdamW (weight decay 0.05, none on norm layers and biases, as MMDetection's paramwise config);
the rate warms up linearly from 1e-5 of base over `warmup_iters`, stays flat until half the
epochs, then follows a cosine to 5% of base at the end, per iteration.
"""
from __future__ import annotations

import math

import torch


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay for conv/linear weights; no decay for norm parameters and biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, (torch.nn.modules.batchnorm._BatchNorm,
                                          torch.nn.GroupNorm, torch.nn.LayerNorm))
            (no_decay if is_norm or name == 'bias' else decay).append(param)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.05
                   ) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr,
                             betas=(0.9, 0.999), weight_decay=weight_decay)


def lr_factor(iteration: int, iters_per_epoch: int, epochs: int, warmup_iters: int,
              start_factor: float = 1e-5, final_factor: float = 0.05) -> float:
    """Multiplier of the base rate at `iteration` (0-based, counted over the whole run)."""
    warm = 1.0
    if iteration < warmup_iters:
        warm = start_factor + (1 - start_factor) * iteration / warmup_iters
    total = iters_per_epoch * epochs
    flat_until = iters_per_epoch * (epochs // 2)
    if iteration < flat_until or total <= flat_until:
        cosine = 1.0
    else:
        progress = min(1.0, (iteration - flat_until) / (total - flat_until))
        cosine = final_factor + (1 - final_factor) * (1 + math.cos(math.pi * progress)) / 2
    return warm * cosine


def make_scheduler(optimizer: torch.optim.Optimizer, iters_per_epoch: int, epochs: int,
                   warmup_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, epochs, warmup_iters))
