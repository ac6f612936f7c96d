"""Optimizers by name: a small table, with optional libraries imported only when chosen."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import UserError

KERNELS = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "for-loop": {"foreach": False}}


def _adamw(groups, lr, wd, kernel: str = "auto", **_):
    import torch

    if kernel not in KERNELS:
        raise UserError(f"unknown optimizer kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    try:
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, **KERNELS[kernel])
    except (RuntimeError, ValueError) as e:   # e.g. fused on a device / dtype this torch has no kernel for
        raise UserError(f"AdamW kernel {kernel!r} is not available here ({str(e).splitlines()[0]}); "
                        "choose auto") from None


def _bnb(name: str) -> Callable:
    def make(groups, lr, wd, **_):
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(f"the {name} optimizer needs bitsandbytes (pip install 'bitsandbytes>=0.43,<0.46'); "
                            "choose adamw to train without it") from None
        cls = {"adamw8bit": bnb.optim.AdamW8bit, "lion8bit": bnb.optim.Lion8bit}[name]
        return cls(groups, lr=lr, weight_decay=wd)

    return make


def _adafactor(groups, lr, wd, **_):
    import torch

    if hasattr(torch.optim, "Adafactor"):  # torch >= 2.5
        return torch.optim.Adafactor(groups, lr=lr, weight_decay=wd)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False, warmup_init=False)


def _prodigy(groups, lr, wd, **_):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("the prodigy optimizer needs the prodigyopt package (pip install prodigyopt)") from None
    return Prodigy(groups, lr=lr, weight_decay=wd)


def _sgd(groups, lr, wd, **_):
    import torch

    return torch.optim.SGD(groups, lr=lr, weight_decay=wd, momentum=0.9)


OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "adamw": _adamw,
    "adamw8bit": _bnb("adamw8bit"),
    "lion8bit": _bnb("lion8bit"),
    "adafactor": _adafactor,
    "prodigy": _prodigy,
    "sgd": _sgd,
}


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float, *,
                   kernel: str = "auto"):
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise UserError("nothing to train: the method selected no parameters")
    return OPTIMIZERS[name](groups, lr, weight_decay, kernel=kernel)
