"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay to ``min_lr``.

``learning_rate(step, cfg)`` is the rate of the ``step``-th optimizer update, counted from 1. It equals the
multiplier of transformers' schedulers evaluated at ``step`` (``get_cosine_with_min_lr_schedule_with_warmup``,
``get_polynomial_decay_schedule_with_warmup(power=1, lr_end=min_lr)``, ``get_constant_schedule_with_warmup``) times
``lr``: counting from 1 means the first update already moves the weights (transformers' step 0 has rate 0).
Past ``total_steps`` the rate stays at ``min_lr`` (transformers' cosine would rise again).

``LearningRate`` is the same formula as an in-graph Cell, so the optimizer computes the rate from its own saved
step counter and a resumed run continues the schedule without being told where it was.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import mindspore as ms
from mindspore import nn, ops

from mindspore_llm.config_utils import require


@dataclass
class ScheduleConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 1000
    decay: Literal["cosine", "linear", "constant"] = "cosine"

    def validate(self) -> None:
        require(self.lr > 0, f"lr must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")
        require(self.total_steps > 0, f"total_steps must be positive, got {self.total_steps}")
        require(0 <= self.warmup_steps <= self.total_steps,
                f"warmup_steps must be between 0 and total_steps ({self.total_steps}), got {self.warmup_steps}")
        require(self.decay in ("cosine", "linear", "constant"),
                f"decay must be 'cosine', 'linear' or 'constant', got {self.decay!r}")


def learning_rate(step: int, cfg: ScheduleConfig) -> float:
    """The rate of update number `step` (1-based), in double precision (for logging and tests)."""
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    progress = min((step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps), 1.0)
    remaining = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * remaining


class LearningRate(nn.Cell):
    """``learning_rate`` in the graph: fp32 rate for a step count held in a tensor."""

    def __init__(self, cfg: ScheduleConfig):
        super().__init__()
        self.lr = float(cfg.lr)
        self.min_lr = float(cfg.min_lr)
        self.warmup_steps = float(cfg.warmup_steps)
        self.decay_steps = float(max(1, cfg.total_steps - cfg.warmup_steps))
        self.decay = cfg.decay

    def construct(self, step):
        step = step.astype(ms.float32)
        warmup = self.lr * step / max(self.warmup_steps, 1.0)
        if self.decay == "constant":
            decayed = ops.full_like(step, self.lr)
        else:
            progress = ops.clamp((step - self.warmup_steps) / self.decay_steps, 0.0, 1.0)
            if self.decay == "cosine":
                remaining = 0.5 * (1.0 + ops.cos(math.pi * progress))
            else:
                remaining = 1.0 - progress
            decayed = self.min_lr + (self.lr - self.min_lr) * remaining
        return ops.select(step < self.warmup_steps, warmup, decayed)
