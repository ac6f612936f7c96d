"""Learning-rate schedules with warmup, as multipliers of the base rate (`LambdaLR`).

Same shapes as diffusers' `get_scheduler` / transformers' schedules: linear warmup from 0, then constant,
linear decay to 0, cosine (with `cycles` half-waves), cosine with hard restarts, or polynomial decay.
"""

from __future__ import annotations

import math
from typing import Callable

from ..errors import UserError


def schedule_constant(step: int, total: int, warmup: int, **_) -> float:
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def schedule_linear(step: int, total: int, warmup: int, **_) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def schedule_cosine(step: int, total: int, warmup: int, cycles: float = 0.5, **_) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * cycles * progress)))


def schedule_cosine_with_restarts(step: int, total: int, warmup: int, cycles: float = 1, **_) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))


def schedule_polynomial(step: int, total: int, warmup: int, power: float = 1.0, end: float = 0.0, **_) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return end
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return (1 - end) * remaining ** power + end


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": schedule_constant,
    "linear": schedule_linear,
    "cosine": schedule_cosine,
    "cosine_with_restarts": schedule_cosine_with_restarts,
    "polynomial": schedule_polynomial,
}


def make_scheduler(optimizer, name: str, total_steps: int, warmup_steps: int = 0, cycles: float = 1.0,
                   power: float = 1.0):
    """A `LambdaLR` over `optimizer` for `total_steps` optimizer steps."""
    import torch

    if name not in SCHEDULES:
        raise UserError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    fn = SCHEDULES[name]
    kw = {"cycles": cycles if name != "cosine" else 0.5 * cycles, "power": power}
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: fn(s, total_steps, warmup_steps, **kw))
