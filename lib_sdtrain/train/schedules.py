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


def multiplier(name: str, total_steps: int, warmup_steps: int = 0, cycles: float = 1.0, power: float = 1.0
               ) -> Callable[[int], float]:
    """The schedule's multiplier of the base rate after `s` optimizer steps (the rate step s + 1 trains at)."""
    if name not in SCHEDULES:
        raise UserError(f"unknown learning-rate schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    fn = SCHEDULES[name]
    kw = {"cycles": cycles if name != "cosine" else 0.5 * cycles, "power": power}
    return lambda s: fn(s, total_steps, warmup_steps, **kw)


def make_scheduler(optimizer, name: str, total_steps: int, warmup_steps: int = 0, cycles: float = 1.0,
                   power: float = 1.0):
    """A `LambdaLR` over `optimizer` for `total_steps` optimizer steps."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier(name, total_steps, warmup_steps, cycles, power))


def _rate(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


def resumed_schedule_note(name: str, base_lr: float, step: int, old_total: int, new_total: int, warmup: int = 0,
                          cycles: float = 1.0, power: float = 1.0, finished: bool = False) -> str | None:
    """What the learning rate does when a run resumed at `step` has another total than it was planned for
    (`old_total`), or None when the schedule does not depend on the total or nothing is left to train.

    The schedule is the one of a run planned for the new total from its start (as kohya's resume restores the
    scheduler's step count under the new total): stretched, a decaying rate at the old end rises again for the
    added steps; squeezed, it falls faster. Warmup counts steps, so it never starts again."""
    if name == "constant" or old_total == new_total or new_total <= step or step == 0:
        return None   # (at step 0 nothing was trained yet: the run is simply planned for the new total)
    old = multiplier(name, old_total, warmup, cycles, power)
    new = multiplier(name, new_total, warmup, cycles, power)
    # the rate of step k + 1 is base_lr * new(k): the first, the last and the highest of the steps left (one pass,
    # no list: a run may have up to 10^9 steps)
    nxt, end = base_lr * new(step), base_lr * new(new_total - 1)
    peak = max(range(step, new_total), key=new)
    top, highest = peak - step, base_lr * new(peak)
    then = f", rises to {_rate(highest)} at step {peak + 1}" if top and highest > nxt * (1 + 1e-6) else ""
    last = base_lr * old(step - 1)
    way = "back up to" if nxt > last * (1 + 1e-6) else "down to" if nxt < last * (1 - 1e-6) else "on at"
    how = "stretched over" if new_total > old_total else "squeezed into"
    ends = f"{_rate(end)} at step {new_total}"
    if finished:
        return (f"continuing the finished run: its {name} learning-rate schedule, planned for {old_total} steps, is "
                f"{how} the new {new_total}, so the rate goes from {_rate(last)} (step {step}, its last) {way} "
                f"{_rate(nxt)} at step {step + 1}{then}, and ends at {ends}. This is the schedule of a run planned for "
                f"{new_total} steps from its start (kohya's resume does the same). For a schedule of its own over the "
                "added steps (any warmup again, then the whole decay), begin a new run from the final file instead "
                "(start_from; Dreambooth and finetune: that file as the model)")
    return (f"the run was planned for {old_total} steps and now has {new_total}: its {name} learning-rate schedule "
            f"is {how} the new total, so the rate goes from {_rate(last)} at step {step} {way} {_rate(nxt)} at step "
            f"{step + 1} (planned: {_rate(base_lr * old(step)) if step < old_total else 'no more steps'}){then}, and "
            f"ends at {ends}")
