"""The TrainingMethod protocol: what every method (LoRA, embedding, hypernetwork, Dreambooth, fine-tune) offers.

The loop calls, in order: `attach(parts)` → parameter groups for the optimizer; then per step the model is
used through `parts` as usual (the method has changed it in place: adapters injected, vectors spliced); then
`save(path, metadata)` as often as the schedule says; and finally, always, `detach()`, which must leave the
host's model exactly as it was (weights, `requires_grad` flags, module tree, train/eval mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..hosts import ModelParts


@runtime_checkable
class TrainingMethod(Protocol):
    name: str            # "lora", "embedding", ...
    file_suffix: str     # ".safetensors" or ".pt"
    output_kind: str     # Host.output_dir kind: "lora", "embedding", "hypernetwork", "checkpoint"

    def attach(self, parts: ModelParts) -> list[dict[str, Any]]:
        """Change the model for training; return optimizer parameter groups ({"params": [...], "lr": ...}).

        Groups may carry "name" ("unet", "text_encoder", ...) so the loop can report their learning rates.
        """

    def trains_text_encoder(self) -> bool:
        """Whether text conditioning must be computed with gradients (else it may be cached)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors in the method's own file layout (e.g. kohya LoRA keys)."""

    def save(self, path: Path, metadata: dict[str, str]) -> Path:
        """Write the output file (atomically) with `metadata` merged into the method's own."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors needed to resume exactly (may equal `state_dict`)."""

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `training_state` returned (after `attach`)."""

    def detach(self) -> None:
        """Undo `attach` exactly. Safe to call twice and after a failed `attach`."""
