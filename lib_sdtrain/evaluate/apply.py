"""Putting one saved file of a run onto the base model, at a chosen strength, and taking it off again.

- LoRA family (and any method whose class offers `load_weights`): the method is attached once with the run's
  settings, each saved file is loaded into the adapters (`TrainingMethod.load_weights`), and the strength
  (A1111's `<lora:name:W>`) scales the factor that carries the update linearly. `close()` detaches: the
  host's model is exactly as before.
- Embeddings and hypernetworks: the same, loading each file (A1111's .pt or our .safetensors) into the
  attached method through its training state; a hypernetwork's strength is its multiplier.
- Checkpoints (Dreambooth / fine-tune): each file is a whole model, loaded through the host.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import UserError
from .runs import RunInfo, SavedFile

# The adapter tensor that carries each algorithm's update linearly (training_state leaf names, lora.py):
# LoRA ΔW = B·A·scale, LoHa ΔW = (w1a·w1b)⊙(w2a·w2b)·scale, LoKr ΔW = w1 ⊗ w2. Scaling one factor by W
# scales ΔW by W, as A1111's multiplier does.
LINEAR_LEAVES = ("lora_B.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")


def _lora_settings_from_metadata(meta: dict[str, str]):
    """LoraSettings for a kohya file without our run config (another trainer's file): from `ss_network_*`."""
    from ..methods.lora import LoraSettings

    if "lab.network" in meta:
        try:
            data = json.loads(meta["lab.network"])
            data.pop("version", None)
            return LoraSettings.from_dict(data)
        except (ValueError, UserError):
            pass
    try:
        args = json.loads(meta.get("ss_network_args") or "{}") or {}
    except ValueError:
        args = {}
    algo = args.get("algo", "lora")
    kind = {"lora": "locon" if "conv_dim" in args else "lora", "locon": "locon", "loha": "loha",
            "lokr": "lokr"}.get(algo)
    if kind is None:
        raise UserError(f"LoRA files of algorithm {algo!r} cannot be compared here")
    dim = int(float(meta.get("ss_network_dim") or 4))
    alpha = float(meta.get("ss_network_alpha") or dim)
    return LoraSettings(network_type=kind, network_dim=dim, network_alpha=alpha, targets="full",
                        conv_dim=int(float(args["conv_dim"])) if "conv_dim" in args else None,
                        conv_alpha=float(args["conv_alpha"]) if "conv_alpha" in args else None,
                        lokr_factor=int(args.get("factor", -1)))


def embedding_state(path) -> dict[str, Any]:
    """An embedding file (.safetensors `emb_params` / `clip_l`+`clip_g`, or A1111's .pt) as the embedding
    method's training state (`vectors.<i>`, one per text encoder)."""
    from pathlib import Path

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from ..formats.safetensors_io import read_safetensors

        tensors, _ = read_safetensors(path)
    else:
        from ..formats.safe_pickle import load_checkpoint

        obj = load_checkpoint(path)
        tensors = dict(obj.get("string_to_param") or {}) or obj
        if "*" in tensors:
            tensors = {"emb_params": tensors["*"]}
    if "emb_params" in tensors:
        return {"vectors.0": tensors["emb_params"]}
    if "clip_l" in tensors and "clip_g" in tensors:
        return {"vectors.0": tensors["clip_l"], "vectors.1": tensors["clip_g"]}
    raise UserError(f"{path.name} is not an embedding file")


def hypernetwork_state(path) -> dict[str, Any]:
    """An A1111 hypernetwork .pt (`{width: [k_state, v_state], ...}`) as the method's training state."""
    from ..formats.safe_pickle import load_checkpoint

    obj = load_checkpoint(path)
    out = {}
    for width, pair in obj.items():
        if isinstance(width, int) and isinstance(pair, (list, tuple)) and len(pair) == 2:
            for kv, state in zip("kv", pair):
                out.update({f"{width}.{kv}.{n}": v for n, v in state.items()})
    if not out:
        raise UserError(f"{path} is not a hypernetwork file")
    return out


class AdapterApplier:
    """Loads a run's adapter files (LoRA family, or another method with `load_weights`) onto `parts`."""

    def __init__(self, run: RunInfo, parts: Any) -> None:
        self.run, self.parts = run, parts
        self.method: Any = None
        self.strict = True
        self.current: SavedFile | None = None
        self.loaded: dict[str, Any] = {}
        self.weight = 1.0

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

        name = self.run.method
        if self.method is None:
            self.method = self._make_method(file)
            torch.manual_seed(0)
            self.method.attach(self.parts)
            for module in (self.parts.unet, *self.parts.text_encoders):
                module.eval()   # sampling: no dropout
        if self.current is None or self.current.path != file.path:
            if hasattr(self.method, "load_weights"):
                self.method.load_weights(file.path, strict=self.strict)
            elif name == "embedding":
                self.method.load_training_state(embedding_state(file.path))
            elif name == "hypernetwork":
                self.method.load_training_state(hypernetwork_state(file.path))
            else:
                raise UserError(f"the {name} method cannot load saved files; compare needs it")
            self.loaded = self.method.training_state() if hasattr(self.method, "training_state") else {}
            self.current, self.weight = file, 1.0
        if name == "hypernetwork":   # A1111's <hypernet:name:m>: the method's own multiplier
            self.method.set_multiplier(weight)
            self.weight = weight
        if weight != self.weight and name == "embedding":
            raise UserError("an embedding has no strength: use weight 1 when comparing embedding saves")
        if weight != self.weight:
            if not self.loaded:
                raise UserError(f"the {self.run.method} method has no strength setting; use weight 1")
            scaled = {k: (v * weight if k.split(".", 1)[1] in LINEAR_LEAVES else v) for k, v in self.loaded.items()}
            self.method.load_training_state(scaled)
            self.weight = weight
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
    """The applier for a run's kind of files."""
    if run.kind == "checkpoint":
        return CheckpointApplier(host, parts)
    return AdapterApplier(run, parts)
