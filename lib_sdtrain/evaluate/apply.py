"""Putting one saved file of a run onto the base model, at a chosen strength, and taking it off again.

How a method's files go back on a model is its registry entry's `applied_as` (methods/__init__.py):
- "adapter" (LoRA family, embeddings, hypernetworks): the method is attached once with the run's settings,
  each saved file is loaded into it (`load_weights`: kohya files, A1111's embedding/hypernetwork .pt or our
  .safetensors), and `set_strength(W)` applies it at A1111's `<lora:name:W>` / `<hypernet:name:W>` (a method
  without a strength refuses W ≠ 1). `close()` detaches: the host's model is exactly as before.
- "checkpoint" (Dreambooth / fine-tune): each file is a whole model, loaded through the host.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from ..methods import method_spec
from .runs import RunInfo, SavedFile


def _lora_settings_from_metadata(meta: dict[str, str]):
    """LoraSettings for a kohya file without our run config (another trainer's file): from `ss_network_*`."""
    from ..formats.safetensors_io import json_table
    from ..methods.lora import LoraSettings

    data = json_table(meta.get("lab.network"))
    if data is not None:
        data.pop("version", None)
        try:
            return LoraSettings.from_dict(data)
        except (ValueError, TypeError, KeyError, AttributeError, UserError):
            pass
    args = json_table(meta.get("ss_network_args")) or {}
    algo = args.get("algo", "lora")
    kind = {"lora": "locon" if "conv_dim" in args else "lora", "locon": "locon", "loha": "loha",
            "lokr": "lokr"}.get(algo) if isinstance(algo, str) else None
    if kind is None:
        raise UserError(f"LoRA files of algorithm {str(algo)[:40]!r} cannot be compared here")
    if str(args.get("dora_wd", "")).lower() == "true":     # LyCORIS DoRA
        if str(args.get("wd_on_output", "")).lower() == "true":
            raise UserError("this DoRA file keeps its magnitude per output row (wd_on_output), which A1111 v1.10 "
                            "does not apply; it cannot be compared here")
        if kind not in ("lora", "locon"):
            raise UserError(f"DoRA on {kind} cannot be compared here (only DoRA on LoRA/LoCon)")
        kind = "dora"
    try:
        dim = int(float(meta.get("ss_network_dim") or 4))
        alpha = float(meta.get("ss_network_alpha") or dim)
        return LoraSettings(network_type=kind, network_dim=dim, network_alpha=alpha, targets="full",
                            conv_dim=int(float(args["conv_dim"])) if "conv_dim" in args else None,
                            conv_alpha=float(args["conv_alpha"]) if "conv_alpha" in args else None,
                            lokr_factor=int(args.get("factor", -1)))
    except (ValueError, TypeError, OverflowError):
        raise UserError("the file's ss_network_* metadata is not understood (network size or alpha)") from None


class NonFiniteSave(UserError):
    """A saved file whose weights hold NaN or inf: nothing can be drawn with it."""


class AdapterApplier:
    """Loads a run's adapter files (methods applied as "adapter") onto `parts`."""

    def __init__(self, run: RunInfo, parts: Any) -> None:
        self.run, self.parts = run, parts
        self.method: Any = None
        self.strict = True
        self.current: SavedFile | None = None

    def _make_method(self, first: SavedFile):
        from ..methods import create_method

        if self.run.config is not None:
            return create_method(self.run.config)
        if self.run.method != "lora":
            raise UserError(f"comparing {self.run.method} files needs their run folder (config.toml) or the "
                            "run settings in the file's metadata")
        from ..methods.lora import LoraMethod

        self.strict = "lab.network" in first.metadata
        return LoraMethod(_lora_settings_from_metadata(first.metadata))

    def apply(self, file: SavedFile, weight: float = 1.0) -> Any:
        """The model with `file` applied at strength `weight` (the same `parts`, changed in place)."""
        import torch

        if self.method is None:
            self.method = self._make_method(file)
            torch.manual_seed(0)
            self.method.attach(self.parts)
            for module in (self.parts.unet, *self.parts.text_encoders):
                module.eval()   # sampling: no dropout
        if self.current is None or self.current.path != file.path:
            from ..train.state import nonfinite

            self.current = None
            self.method.load_weights(file.path, strict=self.strict)
            bad = nonfinite(self.method.training_state())
            if bad:   # a diverged save: its pictures would be noise or black
                raise NonFiniteSave(f"{file.path.name} holds weights that are not finite (NaN or inf, e.g. in "
                                    f"{bad[0]}): the run had diverged by that save, so it is left out")
            self.current = file
        self.method.set_strength(weight)
        return self.parts

    def close(self) -> None:
        if self.method is not None:
            self.method.detach()
            self.method = None


class CheckpointApplier:
    """Each saved file is a whole model: loaded through the host, the previous one released."""

    def __init__(self, host: Any, parts: Any) -> None:
        self.host, self.base, self.parts = host, parts, parts

    def apply(self, file: SavedFile, weight: float = 1.0) -> Any:
        if weight != 1.0:
            raise UserError("a checkpoint has no strength: use weight 1 when comparing Dreambooth / fine-tune "
                            "epochs")
        if self.parts is not self.base:
            self.host.release(self.parts)
        self.parts = self.host.load(str(file.path))
        return self.parts

    def close(self) -> None:
        if self.parts is not self.base:
            self.host.release(self.parts)
            self.parts = self.base


def make_applier(run: RunInfo, host: Any, parts: Any):
    """The applier for how a run's files go back on a model (its method's registry entry)."""
    if method_spec(run.method).applied_as == "checkpoint":
        return CheckpointApplier(host, parts)
    return AdapterApplier(run, parts)
