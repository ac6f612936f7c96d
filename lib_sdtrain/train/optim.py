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


# The largest learning rate each optimizer takes; a larger one is refused before any work (it used to run until the
# divergence guard stopped it). Adam-style optimizers (AdamW, Lion, Adafactor at a fixed rate) move every trained
# weight by about the rate each step, and a diffusion model's weights are about 0.01 to 1 in size: above 1 the first
# step overwrites them. Prodigy multiplies the step size it estimates itself by the rate (1.0 by convention, as for
# D-Adaptation). SGD's step is the rate times the gradient, whose size depends on the model: a typo guard only.
RATE_LIMITS: dict[str, float] = {"adamw": 1.0, "adamw8bit": 1.0, "lion8bit": 1.0, "adafactor": 1.0, "prodigy": 10.0,
                                 "sgd": 100.0}
_RATE_WHY = {
    "prodigy": "prodigy estimates its own step size and multiplies it by the rate: 1.0 is the convention, 0.5 to 2 "
               "the usual range",
    "sgd": "its step is the rate times the gradient, so a larger rate throws the weights far off in one step",
}
_ADAM_WHY = ("it moves every trained weight by about the rate each step, so a larger rate overwrites the model in "
             "one step (usual rates: 1e-6 to 5e-6 for a fine-tune or DreamBooth, 1e-5 to 1e-2 for LoRA, embeddings "
             "and hypernetworks)")
# Above these an Adam-style run of the method is warned (it may still be meant; the full-model methods warn in
# their own hook, from 2e-5). Measured rates on the toy model: LoRA 6e-3, embedding 5e-2, hypernetwork 1e-3.
RATE_HINTS: dict[str, float] = {"lora": 1e-2, "embedding": 0.1, "hypernetwork": 1e-3}
PRODIGY_USUAL = (0.1, 2.0)


def _given_rates(cfg: Any) -> list[tuple[str, float]]:
    """(setting, value) of every learning rate the settings give, LoRA+'s up-matrix rates included."""
    out = [(n, getattr(cfg, n)) for n in ("learning_rate", "unet_lr", "text_encoder_lr") if getattr(cfg, n)]
    lora = getattr(cfg, "lora", None)
    if cfg.method == "lora" and lora is not None and lora.loraplus:
        out += [(f"{n if getattr(cfg, n) else 'learning_rate'} × lora.loraplus_lr_ratio (the up matrices' rate)",
                 (getattr(cfg, n) or cfg.learning_rate) * lora.loraplus_lr_ratio) for n, on in (("unet_lr", lora.train_unet), ("text_encoder_lr", lora.train_text_encoder)) if on]
    return out


def check_rates(cfg: Any) -> None:
    """UserError for a learning rate above what the run's optimizer can use (non-finite ones never get here)."""
    limit = RATE_LIMITS[cfg.optimizer]
    for name, value in _given_rates(cfg):
        if value > limit:
            raise UserError(f"{name}: {value:g} is above {limit:g}, the largest learning rate the {cfg.optimizer} "
                            f"optimizer takes: {_RATE_WHY.get(cfg.optimizer, _ADAM_WHY)}")


def rate_warnings(cfg: Any) -> list[str]:
    """Warnings for a learning rate that is allowed but far from what the method usually trains with."""
    if cfg.method == "embedding":
        used = [("text_encoder_lr", cfg.text_encoder_lr)]
    elif cfg.method == "hypernetwork":
        used = [("unet_lr", cfg.unet_lr)]
    else:   # a LoRA's untrained part has no rate
        lora = getattr(cfg, "lora", None) if cfg.method == "lora" else None
        used = [(n, getattr(cfg, n)) for n, on in (("unet_lr", lora is None or lora.train_unet),
                                                   ("text_encoder_lr", lora is None or lora.train_text_encoder)) if on]
    rates = [(name if value else "learning_rate", value or cfg.learning_rate) for name, value in used]
    if cfg.optimizer == "prodigy":
        low, high = PRODIGY_USUAL
        return [f"{name} {value:g} with prodigy: prodigy multiplies the step size it estimates itself by the rate, "
                f"so 1.0 is the convention and {value:g} makes every step {value:g} times that size"
                for name, value in dict(rates).items() if not low <= value <= high]
    hint = RATE_HINTS.get(cfg.method)
    if hint is None or cfg.optimizer == "sgd":
        return []
    return [f"{name} {value:g} is high for {cfg.method} training (usually at most {hint:g}); if the loss jumps or the "
            "control pictures turn to noise, lower it" for name, value in dict(rates).items() if value > hint]
