"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr_ratio * lr` or constant.

The schedule is a pure function of the step, so resuming needs no scheduler state beyond the step itself.
"""

from __future__ import annotations

import math

from loopdlm.config import LR_SCHEDULES as SCHEDULES
from loopdlm.config import TrainConfig
from loopdlm.errors import UserError


def learning_rate(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer update number `step` (1-based: the first update is step 1).

    Warmup rises linearly, reaching `config.lr` at step `warmup_steps`. After it, 'constant' stays at `lr` and
    'cosine' falls along half a cosine to `min_lr_ratio * lr`, reached at step `config.steps` (and held after).
    """
    if config.lr_schedule not in SCHEDULES:
        raise UserError(f"unknown train.lr_schedule '{config.lr_schedule}'; choose one of {', '.join(SCHEDULES)}")
    peak = config.lr
    if step <= config.warmup_steps:
        return peak * step / config.warmup_steps
    if config.lr_schedule == "constant":
        return peak
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = peak * config.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
