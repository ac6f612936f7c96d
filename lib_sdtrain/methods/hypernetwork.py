"""Hypernetworks as A1111 v1.10 trains, saves and applies them (modules/hypernetworks/hypernetwork.py).

A hypernetwork is a pair of small MLPs (k, v) per attention input width. In every attention layer of the
UNet, self-attention (`attn1`, whose key/value input is the hidden state itself) and cross-attention
(`attn2`, the text context) alike, A1111 looks up the pair for the width of the key/value input and feeds
`to_k` with `k(context)` and `to_v` with `v(context)`, where each module is residual:
`x + linear(x) * multiplier` (`HypernetworkModule.forward`; the multiplier, `<hypernet:name:m>`, applies only
in eval mode, training uses 1). A1111's default sizes 768, 320, 640, 1280 for SD1 are exactly its context
width and its three self-attention widths; by default we train every width the model has (`sizes`).

`HypernetworkModule.linear` is rebuilt exactly (same Sequential indices, so the same `linear.<i>.*` keys):
per layer_structure step a Linear(dim·a → dim·b), then the activation unless it is "linear" or this is the
last Linear and `activate_output` is off, then a LayerNorm if asked, then a Dropout where dropout_structure
[i+1] > 0. Initialisation: A1111's branches, including its quirk that LayerNorm weights are drawn from
N(0, 0.01) under every scheme. "swish" is Hardswish in A1111, and stays so.

In the model, each attention's `to_k` / `to_v` is replaced by a small wrapper holding the original Linear
and the shared module (registered submodules, so block-level gradient checkpointing sees them);
`detach` puts the original Linear objects back. The modules run in train mode (dropout on, multiplier 1)
while gradients are recorded and in eval mode otherwise (control pictures), as A1111 switches them around
its previews. The file is A1111's `.pt` dict (formats/a1111.py); `optional_info` carries the training
metadata as JSON text (A1111 prints it as the hypernetwork's info). Resuming uses the loop's state folder.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..config import ConfigBase, setting
from ..errors import UserError
from ..formats.a1111 import HYPERNETWORK_WEIGHT_INITS
from .base import MethodBase

if TYPE_CHECKING:
    import torch

    from ..hosts import ModelParts

# A1111's named activations, then the argument-free element-wise classes of torch.nn.modules.activation that
# its lookup also accepts (lower-cased class names). GLU, the softmax family, Threshold and
# MultiheadAttention are left out: they change the width or need arguments, so A1111 fails on them too.
ACTIVATIONS: dict[str, str] = {
    "linear": "Identity", "relu": "ReLU", "leakyrelu": "LeakyReLU", "elu": "ELU", "swish": "Hardswish",
    "tanh": "Tanh", "sigmoid": "Sigmoid", "celu": "CELU", "gelu": "GELU", "hardshrink": "Hardshrink",
    "hardsigmoid": "Hardsigmoid", "hardswish": "Hardswish", "hardtanh": "Hardtanh", "logsigmoid": "LogSigmoid",
    "mish": "Mish", "prelu": "PReLU", "relu6": "ReLU6", "rrelu": "RReLU", "selu": "SELU", "silu": "SiLU",
    "softplus": "Softplus", "softshrink": "Softshrink", "softsign": "Softsign", "tanhshrink": "Tanhshrink",
}


@dataclass
class HypernetworkSettings(ConfigBase):
    """Settings of a hypernetwork (the `[hypernetwork]` section of a training config); A1111's create options."""

    KIND = "hypernetwork"
    VERSION = 1

    layer_structure: str = setting(
        "1, 2, 1", "width factors of each MLP, starting and ending with 1 (A1111's 'Layer structure'): "
        "1, 2, 1 = one hidden layer twice as wide", group="hypernetwork")
    activation: str = setting(
        "linear", "activation after each hidden layer (A1111's list; 'swish' is Hardswish there)",
        choices=list(ACTIVATIONS), group="hypernetwork")
    weight_init: str = setting(
        "Normal", "initialisation of the layers (A1111's choices; Normal = N(0, 0.01), biases 0)",
        choices=list(HYPERNETWORK_WEIGHT_INITS), group="hypernetwork")
    layer_norm: bool = setting(False, "add a LayerNorm after each layer", group="hypernetwork")
    activate_output: bool = setting(False, "also apply the activation after the last layer", group="hypernetwork",
                                    advanced=True)
    use_dropout: bool = setting(False, "dropout after hidden layers while training", group="hypernetwork")
    dropout_structure: str = setting(
        "", "dropout probability per layer_structure entry, starting and ending with 0 (e.g. 0, 0.1, 0); empty "
        "= A1111's default 0.3 on hidden layers (the last one only with last_layer_dropout)", group="hypernetwork",
        advanced=True)
    last_layer_dropout: bool = setting(
        False, "with an empty dropout_structure: also drop out after the last hidden layer",
        group="hypernetwork", advanced=True)
    sizes: str = setting(
        "", "attention input widths to train, comma-separated (A1111's 'Modules', e.g. 768 = SD1's text "
        "context only); empty = every width of the model (SD1: 768, 320, 640, 1280)", group="hypernetwork")

    def validate(self) -> None:
        super().validate()
        from ..formats.a1111 import parse_dropout_structure, parse_layer_structure

        structure = parse_layer_structure(self.layer_structure)
        parse_dropout_structure(self.dropout_structure, structure, self.use_dropout, self.last_layer_dropout)
        self.size_list()

    def structure(self) -> list[float]:
        from ..formats.a1111 import parse_layer_structure

        return parse_layer_structure(self.layer_structure)

    def dropouts(self) -> list[float] | list[int]:
        from ..formats.a1111 import parse_dropout_structure

        return parse_dropout_structure(self.dropout_structure, self.structure(), self.use_dropout,
                                       self.last_layer_dropout)

    def size_list(self) -> list[int]:
        try:
            sizes = [int(x) for x in self.sizes.replace(" ", "").split(",") if x]
        except ValueError:
            raise UserError(f"hypernetwork sizes {self.sizes!r} must be whole numbers, e.g. 768, 320") from None
        if any(s <= 0 for s in sizes) or len(set(sizes)) != len(sizes):
            raise UserError(f"hypernetwork sizes {self.sizes!r} must be distinct positive widths")
        return sizes


@functools.cache
def _classes() -> tuple[type, type]:
    """(HypernetworkModule, HyperProjection), defined on first use so that settings import without torch."""
    import torch
    from torch import nn
    from torch.nn.init import (
        kaiming_normal_,
        kaiming_uniform_,
        normal_,
        xavier_normal_,
        xavier_uniform_,
        zeros_,
    )

    class HypernetworkModule(nn.Module):
        """A1111's HypernetworkModule: `x + linear(x) * multiplier` (multiplier only in eval mode)."""

        def __init__(self, dim: int, layer_structure: list[float], activation_func: str, weight_init: str,
                     add_layer_norm: bool, activate_output: bool, dropout_structure: list[float]) -> None:
            super().__init__()
            self.multiplier = 1.0
            layers: list[nn.Module] = []
            last = len(layer_structure) - 2
            for i in range(len(layer_structure) - 1):
                layers.append(nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
                if activation_func != "linear" and not (i >= last and not activate_output):
                    layers.append(getattr(nn, ACTIVATIONS[activation_func])())
                if add_layer_norm:
                    layers.append(nn.LayerNorm(int(dim * layer_structure[i + 1])))
                if dropout_structure[i + 1] > 0:
                    layers.append(nn.Dropout(p=dropout_structure[i + 1]))
            self.linear = nn.Sequential(*layers)
            # Initial values as A1111 draws them (same calls in the same order, so the same random numbers):
            # LayerNorms always, and Linears under "Normal", get N(0, 0.01) weights and a std-0 normal draw for
            # the bias; the other schemes fill the weight and zero the bias (unknown names: Kaiming normal).
            gain = {"nonlinearity": "leaky_relu" if activation_func == "leakyrelu" else "relu"}
            fill = {"XavierUniform": xavier_uniform_, "XavierNormal": xavier_normal_,
                    "KaimingUniform": lambda t: kaiming_uniform_(t, **gain)}
            for layer in (m for m in self.linear if type(m) in (nn.Linear, nn.LayerNorm)):
                weight, bias = layer.weight.data, layer.bias.data
                if type(layer) is nn.LayerNorm or weight_init == "Normal":
                    normal_(weight, mean=0.0, std=0.01)
                    normal_(bias, mean=0.0, std=0)
                else:
                    fill.get(weight_init, lambda t: kaiming_normal_(t, **gain))(weight)
                    zeros_(bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.linear(x) * (self.multiplier if not self.training else 1)

    class HyperProjection(nn.Module):
        """An attention's to_k / to_v with the hypernetwork module in front: `base(hyper(x))`."""

        def __init__(self, base: nn.Linear, hyper: nn.Module) -> None:
            super().__init__()
            self.base = base
            self.hyper = hyper

        # some attention code reads the projection's shape or weights
        @property
        def weight(self) -> torch.Tensor:
            return self.base.weight

        @property
        def bias(self) -> torch.Tensor | None:
            return self.base.bias

        @property
        def in_features(self) -> int:
            return self.base.in_features

        @property
        def out_features(self) -> int:
            return self.base.out_features

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            training = torch.is_grad_enabled()
            if self.hyper.training != training:   # A1111: train() while training, eval() for previews
                self.hyper.train(training)
            h = self.hyper(x.float())             # float32 modules on any model dtype, as A1111 keeps them
            return self.base(h.to(x.dtype), *args, **kwargs)

    return HypernetworkModule, HyperProjection


def attention_projections(unet: Any) -> list[tuple[str, Any]]:
    """(name, attention module) of every attn1/attn2 with Linear to_k/to_v: diffusers' `Attention` and the
    LDM/SGM `CrossAttention` both name them so."""
    from torch import nn

    out = []
    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[-1] in ("attn1", "attn2") and isinstance(getattr(module, "to_k", None), nn.Linear) \
                and isinstance(getattr(module, "to_v", None), nn.Linear):
            out.append((name, module))
    return out


def model_sizes(unet: Any) -> list[int]:
    """The model's attention key/value input widths, A1111's UI order: cross-attention widths first."""
    attns = attention_projections(unet)
    cross = sorted({m.to_k.in_features for n, m in attns if n.endswith("attn2")})
    rest = sorted({m.to_k.in_features for _, m in attns} - set(cross))
    return cross + rest


# Trained-parameter estimate (train/estimate.py): A1111's default 1-2-1 structure over every cross-attention
# width, in millions, per family.
PARAMS_M = {"sd1": 21, "sd2": 30, "sdxl": 60}


class HypernetworkMethod(MethodBase):
    """The TrainingMethod of hypernetworks (see the module docstring)."""

    name = "hypernetwork"
    has_strength = True
    file_suffix = ".pt"            # A1111 lists hypernetworks as **/*.pt only
    output_kind = "hypernetwork"

    def __init__(self, settings: HypernetworkSettings | None = None) -> None:
        self.settings = settings if settings is not None else HypernetworkSettings()
        self.settings.validate()
        self.modules: dict[int, tuple[Any, Any]] = {}
        self._wrapped: list[tuple[Any, str, Any, Any]] = []   # (attention, "to_k"|"to_v", original, wrapper)
        self._frozen: list[tuple[Any, dict[str, bool]]] = []
        self._parts: Any = None

    # ---- attach / detach ------------------------------------------------------------------------------
    def attach(self, parts: ModelParts, unet_lr: float | None = None, text_encoder_lr: float | None = None
               ) -> list[dict[str, Any]]:
        """Build the k/v modules per width (A1111's creation order and init), wrap to_k/to_v, freeze the rest."""
        if self._parts is not None:
            raise RuntimeError("HypernetworkMethod.attach called twice without detach")
        s = self.settings
        attns = attention_projections(parts.unet)
        available = model_sizes(parts.unet)
        if not attns:
            raise UserError("hypernetwork: the UNet has no attention layers with to_k/to_v")
        sizes = s.size_list() or available
        missing = [w for w in sizes if w not in available]
        if missing:
            raise UserError(f"hypernetwork: no attention layer of this model has width {missing[0]} "
                            f"(its widths: {', '.join(map(str, available))})")
        self._parts = parts
        try:
            module_cls, wrapper_cls = _classes()
            structure, dropouts = s.structure(), s.dropouts()
            device = next(parts.unet.parameters()).device
            for width in sizes:   # k then v for each size, as Hypernetwork.__init__ builds them
                pair = tuple(module_cls(width, structure, s.activation, s.weight_init, s.layer_norm,
                                        s.activate_output, dropouts) for _ in range(2))
                self.modules[width] = tuple(m.to(device).train() for m in pair)
            for root in [parts.unet, *parts.text_encoders]:
                self._frozen.append((root, {n: p.requires_grad for n, p in root.named_parameters()}))
                root.requires_grad_(False)
            for _, attn in attns:
                pair = self.modules.get(attn.to_k.in_features)
                if pair is None:
                    continue
                for child, hyper in (("to_k", pair[0]), ("to_v", pair[1])):
                    base = getattr(attn, child)
                    wrapper = wrapper_cls(base, hyper)
                    setattr(attn, child, wrapper)
                    self._wrapped.append((attn, child, base, wrapper))
        except BaseException:
            self.detach()
            raise
        params = self.parameters()
        for p in params:
            p.requires_grad_(True)
        group: dict[str, Any] = {"name": "unet", "params": params}
        if unet_lr is not None:
            group["lr"] = unet_lr
        return [group]

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for pair in self.modules.values() for m in pair for p in m.parameters()]

    def trains_text_encoder(self) -> bool:
        return False

    def detach(self) -> None:
        """Put every original to_k/to_v back and restore requires_grad; the model is then as before attach."""
        for attn, child, base, wrapper in reversed(self._wrapped):
            if getattr(attn, child, None) is wrapper:
                setattr(attn, child, base)
        self._wrapped.clear()
        for root, flags in self._frozen:
            for n, p in root.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])
        self._frozen.clear()
        self.modules = {}
        self._parts = None

    def set_multiplier(self, value: float) -> None:
        """A1111's strength (`<hypernet:name:m>`): scales the residual in eval mode."""
        for pair in self.modules.values():
            for m in pair:
                m.multiplier = float(value)

    def set_strength(self, weight: float) -> None:
        self.set_multiplier(weight)

    @classmethod
    def estimate_parameters(cls, settings: HypernetworkSettings, family: str, model_m: dict[str, float]) -> float:
        return PARAMS_M[family] * 1e6

    # ---- tensors ------------------------------------------------------------------------------------
    def _require_attached(self) -> None:
        if not self.modules:
            raise RuntimeError("HypernetworkMethod: attach() first")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat view of the file's tensors: `<width>.<k|v>.linear.<i>.<weight|bias>` (float32, CPU)."""
        self._require_attached()
        return {f"{w}.{kv}.{k}": v.detach().to("cpu").float().clone()
                for w, pair in self.modules.items() for kv, m in zip("kv", pair) for k, v in m.state_dict().items()}

    def layout(self, *, name: str, step: int, optional_info: str | None = None) -> dict[Any, Any]:
        """The dict A1111's `Hypernetwork.save()` writes, for this network."""
        from ..formats.a1111 import hypernetwork_layout

        self._require_attached()
        s, info = self.settings, getattr(self._parts, "info", None)
        return hypernetwork_layout(
            {w: (k.state_dict(), v.state_dict()) for w, (k, v) in self.modules.items()},
            name=name, step=step, layer_structure=s.structure(), activation_func=s.activation,
            is_layer_norm=s.layer_norm, weight_initialization=s.weight_init,
            sd_checkpoint=info.shorthash if info is not None and info.sha256 else None,
            sd_checkpoint_name=(info.name or None) if info is not None else None,
            activate_output=s.activate_output, use_dropout=s.use_dropout, dropout_structure=s.dropouts(),
            optional_info=optional_info)

    def metadata(self, extra: dict[str, Any] | None = None) -> dict[str, str]:
        """What goes into `optional_info` (as JSON): the run's keys plus ours."""
        s, parts = self.settings, self._parts
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items() if v is not None}
        meta.update({"lab.method": "hypernetwork",
                     "lab.hypernetwork": json.dumps({"version": s.VERSION, **s.to_dict()}),
                     "lab.sizes": ",".join(map(str, self.modules)), "lab.family": parts.family,
                     "lab.implementation": f"training-lab/{__version__}"})
        return meta

    def save(self, path: Path, metadata: dict[str, str], *, run_info: dict[str, Any] | None = None) -> Path:
        """Write A1111's `.pt` atomically. `name` is the run's output name (A1111's trainer writes the base
        name into every intermediate file too), `step` the optimizer steps done."""
        from ..formats.a1111 import write_torch_pt

        self._require_attached()
        path = Path(path)
        merged = {**(run_info or {}), **(metadata or {})}
        try:
            step = int(merged.get("ss_steps", 0))
        except (TypeError, ValueError):
            step = 0
        name = str(merged.get("ss_output_name") or path.stem)
        info = json.dumps(self.metadata(merged), sort_keys=True)
        return write_torch_pt(path, self.layout(name=name, step=step, optional_info=info))

    def load_weights(self, path: str | Path, *, strict: bool = True) -> list[str]:
        """Load a hypernetwork `.pt` (ours or A1111's) into the attached modules, through the safe unpickler.

        Its structure (layer_structure, activation, layer norm, dropout, activate_output) must be this
        network's, and its widths this network's sizes (`strict`: all of them). Returns the widths of this
        network the file did not have.
        """
        import torch

        from ..formats.a1111 import read_hypernetwork
        from ..formats.safe_pickle import load_checkpoint

        self._require_attached()
        path = Path(path)
        if path.suffix.lower() == ".safetensors":
            raise UserError(f"{path.name}: a hypernetwork is an A1111 .pt file (A1111 lists no other), not a "
                            ".safetensors file (a LoRA, embedding or model?)")
        data = load_checkpoint(path, expect=lambda root: None if any(type(k) is int for k in root) else
                               "not a hypernetwork (no layers by attention width: a model checkpoint or an embedding?)")
        theirs, pairs = read_hypernetwork(data, path.name)
        s = self.settings
        mine = {"layer_structure": s.structure(), "activation_func": s.activation, "is_layer_norm": s.layer_norm,
                "activate_output": s.activate_output}
        differ = [k for k in mine if mine[k] != theirs[k]]
        if differ:
            raise UserError(f"{path.name}: its {differ[0]} is {theirs[differ[0]]!r}, this network's "
                            f"{mine[differ[0]]!r}; set the same hypernetwork settings to load it")
        sizes = list(pairs)
        unknown, absent = sorted(set(sizes) - set(self.modules)), sorted(set(self.modules) - set(sizes))
        if unknown or (strict and absent):
            raise UserError(f"{path.name}: sizes {sizes} do not fit this network's {list(self.modules)}")
        with torch.no_grad():
            for width in sizes:
                for m, state in zip(self.modules[width], pairs[width]):
                    try:
                        m.load_state_dict({k: v.float() for k, v in state.items()})
                    except RuntimeError as e:
                        raise UserError(f"{path.name}: width {width} does not fit: {str(e).splitlines()[0]}") \
                            from None
        return [str(w) for w in absent]

    def training_state(self) -> dict[str, torch.Tensor]:
        self._require_attached()
        return {f"{w}.{kv}.{n}": p.detach().to("cpu").clone()
                for w, pair in self.modules.items() for kv, m in zip("kv", pair) for n, p in m.named_parameters()}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        self._require_attached()
        params = {f"{w}.{kv}.{n}": p
                  for w, pair in self.modules.items() for kv, m in zip("kv", pair) for n, p in m.named_parameters()}
        bad = sorted(set(params) ^ set(state)) + [k for k in params if k in state
                                                   and tuple(state[k].shape) != tuple(params[k].shape)]
        if bad:
            raise UserError("the saved hypernetwork state does not fit this network (were its settings changed?): "
                            f"e.g. {bad[:2]}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(p.device, p.dtype))
