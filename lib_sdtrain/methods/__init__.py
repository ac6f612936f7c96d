"""Training methods, by name. Each module holds one method: its settings and its TrainingMethod class."""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:Class" under lib_sdtrain.methods (imported on use: methods pull in peft/torch)
METHODS: dict[str, str] = {
    "lora": "lora:LoraMethod",
    "dreambooth": "dreambooth:DreamboothMethod",
    "finetune": "finetune:FinetuneMethod",
    "embedding": "embedding:EmbeddingMethod",
    "hypernetwork": "hypernetwork:HypernetworkMethod",
}


def create_method(cfg: Any):
    """The TrainingMethod for `cfg.method`, built from its settings section (`cfg.<method>`)."""
    from ..errors import UserError

    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    module, cls = METHODS[cfg.method].split(":")
    method_cls = getattr(importlib.import_module(f"lib_sdtrain.methods.{module}"), cls)
    return method_cls(getattr(cfg, cfg.method))
