"""Training methods, by name: the registry (`METHODS`). Each module holds one method: its settings section and
its TrainingMethod class (a `base.MethodBase`).

One `MethodSpec` line describes a method completely; everything else derives from it: the `method` choice and
the `[name]` settings sections of `TrainSettings` (train/settings.py), the output folder kind and file suffixes
of jobs and run discovery (jobs.py, evaluate/runs.py), how compare and the toy bench put a saved file back on a
model (evaluate/apply.py, toy/quality.py: `applied_as`), and the trained-parameter estimate (train/estimate.py,
through the class's `estimate_parameters`). Adding a method = its module + one line in `METHODS`; the table
test (tests/test_methods_table.py) then runs it through attach → 2 steps → save → reload → apply → detach.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

APPLIED_AS = ("adapter", "checkpoint")


@dataclass(frozen=True)
class MethodSpec:
    name: str                    # the `method` setting's value and the name of its settings section
    module: str                  # lib_sdtrain.methods.<module>
    cls: str                     # its TrainingMethod class (a MethodBase)
    settings: str                # its settings dataclass (a ConfigBase): the `[name]` section of a run config
    output_kind: str             # Host.output_dir kind its files go to: lora | embedding | hypernetwork | checkpoint
    suffixes: tuple[str, ...]    # suffixes its saved files may have; the first is the default
    applied_as: str              # "adapter": attached, then `load_weights` + `set_strength` per file;
                                 # "checkpoint": each saved file is a whole model the host loads
    help: str                    # one line for `--help` and the UI

    def method_class(self) -> type:
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.cls)

    def settings_class(self) -> type:
        return getattr(importlib.import_module(f"{__name__}.{self.module}"), self.settings)


METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("lora", "lora", "LoraMethod", "LoraSettings", "lora", (".safetensors",), "adapter",
               "LoRA / LoCon / LoHa / LoKr / DoRA adapters (kohya files)"),
    MethodSpec("dreambooth", "dreambooth", "DreamboothMethod", "DreamboothSettings", "checkpoint",
               (".safetensors", ".ckpt"), "checkpoint", "Dreambooth with prior preservation (a whole checkpoint)"),
    MethodSpec("finetune", "finetune", "FinetuneMethod", "FinetuneSettings", "checkpoint",
               (".safetensors", ".ckpt"), "checkpoint", "full fine-tune of the model's weights (a whole checkpoint)"),
    MethodSpec("embedding", "embedding", "EmbeddingMethod", "EmbeddingSettings", "embedding",
               (".safetensors", ".pt"), "adapter", "textual inversion (an A1111 embedding)"),
    MethodSpec("hypernetwork", "hypernetwork", "HypernetworkMethod", "HypernetworkSettings", "hypernetwork",
               (".pt", ".safetensors"), "adapter", "hypernetwork (A1111's .pt)"),
)}

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

# Host.output_dir kind -> the suffixes files of that kind may have (every method saving into it)
KIND_SUFFIXES: dict[str, tuple[str, ...]] = {}
for _spec in METHODS.values():
    KIND_SUFFIXES[_spec.output_kind] = tuple(dict.fromkeys(KIND_SUFFIXES.get(_spec.output_kind, ()) + _spec.suffixes))
del _spec


def method_spec(name: str) -> MethodSpec:
    """The registry entry of `name`; UserError for a name not registered."""
    from ..errors import UserError

    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def create_method(cfg: Any):
    """The TrainingMethod for `cfg.method`, built from its settings section (`cfg.<method>`)."""
    spec = method_spec(cfg.method)
    return spec.method_class()(getattr(cfg, spec.name))
