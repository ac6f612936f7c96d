"""The TrainingMethod protocol, and `MethodBase`: the no-op defaults of its optional hooks.

The loop calls, in order: `prepare_data(cfg, host, events, stop)` (may return changed settings), then, after the
dataset scan, `prepare_records(records)`; `attach(parts, unet_lr=..., text_encoder_lr=...)` → parameter groups
for the optimizer; per step the model is used through `parts` as usual (the method has changed it in place:
adapters injected, vectors spliced) and `after_step(step)` runs after each optimizer step; `save(path,
metadata)` as often as the schedule says; and finally, always, `detach()`, which must leave the host's model
exactly as it was (weights, `requires_grad` flags, module tree, train/eval mode). Resuming uses
`training_state` / `load_training_state`. Comparing and scoring saved files (evaluate/apply.py, toy/quality.py)
use `load_weights(path)` and `set_strength(weight)` on an attached method.

Every method class derives from `MethodBase`, so the loop and the comparison code call every hook directly
(no `hasattr`): a method overrides only what it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from ..hosts import ModelParts


def component_groups(params: dict[str, list], unet_lr: float | None, text_encoder_lr: float | None
                     ) -> list[dict[str, Any]]:
    """Optimizer parameter groups named "unet" / "text_encoder" from {component: parameters}: one per component
    that has parameters, with its own learning rate when one is given (else the optimizer's)."""
    groups = []
    for component, lr in (("unet", unet_lr), ("text_encoder", text_encoder_lr)):
        if params.get(component):
            group: dict[str, Any] = {"name": component, "params": params[component]}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
    return groups


@runtime_checkable
class TrainingMethod(Protocol):
    name: str                             # "lora", "embedding", ...: the registry key (methods/__init__.py)
    output_kind: str                      # Host.output_dir kind: "lora", "embedding", "hypernetwork", "checkpoint"
    same_name_suffixes: tuple[str, ...]   # other files with the output's stem that would clash (A1111 embeddings)
    side_suffixes: tuple[str, ...]        # files written beside each output under its stem (checkpoints: .yaml)

    @property
    def file_suffix(self) -> str:
        """".safetensors" or ".pt" (may depend on the settings: embeddings)."""

    def attach(self, parts: ModelParts, *, unet_lr: float | None = None,
               text_encoder_lr: float | None = None) -> list[dict[str, Any]]:
        """Change the model for training; return optimizer parameter groups ({"params": [...], "lr": ...}).

        Groups may carry "name" ("unet", "text_encoder", ...) so the loop can report their learning rates.
        """

    def trains_text_encoder(self) -> bool:
        """Whether text conditioning must be computed with gradients (else it may be cached)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors in the method's own file layout (e.g. kohya LoRA keys)."""

    def save(self, path: Path, metadata: dict[str, str], *, run_info: dict[str, Any] | None = None) -> Path:
        """Write the output file (atomically) with `metadata` (the loop's run info) merged into the method's own."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors needed to resume exactly (may equal `state_dict`)."""

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `training_state` returned (after `attach`)."""

    def detach(self) -> None:
        """Undo `attach` exactly. Safe to call twice and after a failed `attach`."""

    # ---- optional hooks (MethodBase gives each a no-op default) ------------------------------------------
    def prepare_data(self, cfg: Any, host: Any, events: Any, stop: Any) -> Any:
        """Before the dataset scan: may prepare data (Dreambooth draws class pictures) and return new settings."""

    def prepare_records(self, records: list) -> None:
        """After the scan: may change the records in place (Dreambooth's instance / class prompts)."""

    def after_step(self, step: int) -> None:
        """After each optimizer step (full-model methods: the EMA update)."""

    def step_figures(self) -> dict[str, float]:
        """Figures of the last step to show beside the loss (LoRA's scale_weight_norms: kohya's three)."""

    def load_weights(self, path: str | Path, *, strict: bool = True) -> list[str]:
        """Load a saved file of this method into the attached model; returns the names the file lacked."""

    def set_strength(self, weight: float) -> None:
        """Apply the loaded file at `weight` (A1111's `<lora:name:W>` / `<hypernet:name:W>`); 1 = as saved."""


class MethodBase:
    """Defaults for every TrainingMethod: the optional hooks do nothing, file loading and strength refuse."""

    name: str = ""
    output_kind: str = ""
    file_suffix: str = ".safetensors"
    same_name_suffixes: tuple[str, ...] = ()
    side_suffixes: tuple[str, ...] = ()

    def prepare_data(self, cfg: Any, host: Any, events: Any, stop: Any) -> Any:
        return cfg

    def prepare_records(self, records: list) -> None:
        return None

    def after_step(self, step: int) -> None:
        return None

    def step_figures(self) -> dict[str, float]:
        """Figures of the last step for the progress line and TensorBoard (LoRA's scale_weight_norms)."""
        return {}

    # FSDP (distributed = "fsdp"): only methods that train the model's own weights shard (train/distributed.py)
    supports_fsdp: bool = False

    @classmethod
    def fsdp_refusal(cls) -> str:
        """Why this method does not run under distributed = 'fsdp' ("" when it does)."""
        if cls.supports_fsdp:
            return ""
        return (f"distributed = 'fsdp' is for methods that train the model's own weights (dreambooth, finetune); "
                f"{cls.name or 'this method'} trains a few million values at most, where sharding saves almost "
                "nothing and costs an all-gather per block: use distributed = 'ddp' (the default)")

    def after_shard(self) -> None:
        """Called once after FSDP replaced the trained weights by sharded ones (full-model methods: the EMA)."""
        return None

    def load_weights(self, path: str | Path, *, strict: bool = True) -> list[str]:
        raise UserError(f"the {self.name} method cannot load a saved file onto a model")

    has_strength: bool = False   # set_strength takes any W (A1111's <lora:name:W>, <hypernet:name:W>); else only 1

    def set_strength(self, weight: float) -> None:
        if weight != 1.0:
            raise UserError(f"{self.name} files have no strength setting: use weight 1 when comparing them")

    # ---- class-level facts the registry derives from ----------------------------------------------------
    @classmethod
    def estimate_parameters(cls, settings: Any, family: str, model_m: dict[str, float]) -> float:
        """Rough number of trained parameters for `settings` (this method's section) on a `family` model whose
        UNet / text encoder(s) have `model_m["unet"]` / `model_m["text"]` million parameters (train/estimate.py;
        public model sizes, ±30 %, or a model file's own counts, with `model_m["attn_scale"]` its transformer
        layers' size against the stock model's). Pure arithmetic: no model, no torch."""
        return 0.0

    @classmethod
    def check_run(cls, cfg: Any) -> None:
        """Cross-field checks of a whole run's settings when this method is chosen (may fix derived values)."""
        return None
