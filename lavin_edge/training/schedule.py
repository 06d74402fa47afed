"""LaVIN's optimiser and schedule: AdamW (0.9, 0.95), weight decay on matrices only, lr scaled by
batch / 256, linear warmup then a half-cycle cosine down to ``min_lr``."""

from __future__ import annotations

import math

import torch
from torch import nn


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The paper's rule: lr = base_lr x (effective batch) / 256."""
    return base_lr * global_batch / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: 1-D ones (biases; norms if any) get no weight decay."""
    decay, no_decay = [], []
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    # foreach=False: one code path on every device, so CPU and resume runs are bit-reproducible.
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, foreach=False)


class WarmupCosine:
    """lr(step) for optimizer steps 0..total-1: linear warmup from 0 over ``warmup`` steps, then
    min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * progress)). Its state is the step counter."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, warmup: int, total: int,
                 min_lr: float = 0.0) -> None:
        self.optimizer, self.peak, self.warmup, self.total, self.min_lr = optimizer, peak_lr, warmup, total, min_lr
        self.step_num = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            # (step + 1): the first update already moves, as the reference's per-iteration schedule does.
            return self.peak * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step_num)

    @property
    def lr(self) -> float:
        return self.lr_at(self.step_num)

    def step(self) -> None:
        self.step_num += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_num": self.step_num, "peak": self.peak, "warmup": self.warmup, "total": self.total,
                "min_lr": self.min_lr}

    def load_state_dict(self, d: dict) -> None:
        self.step_num, self.peak, self.warmup = d["step_num"], d["peak"], d["warmup"]
        self.total, self.min_lr = d["total"], d["min_lr"]
        self._apply()
