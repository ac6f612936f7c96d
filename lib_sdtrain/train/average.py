"""An exponential moving average (EMA) of an adapter method's trained tensors (`adapter_ema`).

LoRA-family networks, embeddings and hypernetworks are small, so the average is a float32 copy beside the
weights. It follows each optimizer step with the usual warm-up, decay_n = min(decay, (1 + n) / (10 + n)), the
rule the full-model methods' EMA uses (diffusers `EMAModel`): early on it follows the weights closely, later it
averages over about 1 / (1 - decay) steps. When it is on, every saved file holds the averaged weights (its
metadata says `lab.weights = ema`), the resumable state holds both (a state resumes only with the setting it was
written with), and control pictures show the raw weights being trained.

`AveragedMethod` wraps an attached method: it forwards everything to it and adds the average to `after_step`,
`save`, `training_state` and `load_training_state`. The full-model methods keep their own EMA (it can live in
CPU memory and follows FSDP's sharding), so they are not wrapped.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

PREFIX = "lab_ema."          # the average's keys in the resumable state (no method's own key starts so)
UPDATES = PREFIX + "updates"


class AveragedMethod:
    """`method` (attached, training `params`) with an EMA of `params`."""

    def __init__(self, method: Any, params: list[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise UserError(f"adapter_ema_decay must be between 0 and 1 (exclusive), got {decay}")
        self._method, self._params, self._decay = method, list(params), float(decay)
        self._average = [p.detach().to(torch.float32, copy=True) for p in self._params]
        self._updates = 0

    def __getattr__(self, name: str) -> Any:     # everything else is the method's own
        return getattr(self._method, name)

    @property
    def wrapped(self) -> Any:
        return self._method

    # ---- the average ------------------------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        self._method.after_step(step)
        decay = min(self._decay, (1 + self._updates) / (10 + self._updates))
        with torch.no_grad():
            for avg, p in zip(self._average, self._params):
                avg.lerp_(p.detach().to(avg.device, torch.float32), 1.0 - decay)
        self._updates += 1

    @contextmanager
    def averaged_weights(self):
        """The averaged values in place of the trained ones for the duration (the trained ones come back)."""
        kept = [p.detach().clone() for p in self._params]
        try:
            with torch.no_grad():
                for p, avg in zip(self._params, self._average):
                    p.copy_(avg.to(p.device, p.dtype))
            yield
        finally:
            with torch.no_grad():
                for p, old in zip(self._params, kept):
                    p.copy_(old)

    def save(self, path: Path, metadata: dict[str, str], *, run_info: dict[str, Any] | None = None) -> Path:
        info = {**(metadata or {}), "lab.weights": "ema", "lab.ema_decay": str(self._decay),
                "lab.ema_updates": str(self._updates)}
        with self.averaged_weights():
            return self._method.save(path, info, run_info=run_info)

    # ---- resuming ----------------------------------------------------------------------------------------
    def training_state(self) -> dict[str, torch.Tensor]:
        state = dict(self._method.training_state())
        state.update({f"{PREFIX}{i}": a.detach().to("cpu").clone() for i, a in enumerate(self._average)})
        state[UPDATES] = torch.tensor([self._updates], dtype=torch.int64)
        return state

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
        self._method.load_training_state(own)
        saved = {k: v for k, v in state.items() if k.startswith(PREFIX) and k != UPDATES}
        want = {f"{PREFIX}{i}": a for i, a in enumerate(self._average)}
        if set(saved) != set(want) or any(tuple(saved[k].shape) != tuple(a.shape) for k, a in want.items()) \
                or UPDATES not in state:
            raise UserError("the saved weight average does not fit this run (were the method's settings changed?)")
        self._average = [saved[f"{PREFIX}{i}"].to(a.device, torch.float32).clone()
                         for i, a in enumerate(self._average)]
        self._updates = int(state[UPDATES].reshape(-1)[0])
