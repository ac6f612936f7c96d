"""LoRA, LoCon, LoHa and LoKr training on the host's own modules, saved as kohya files A1111 v1.10 loads.

Adapters are peft 0.13.2 layers (`peft.tuners.lora/loha/lokr.layer`, the same classes peft's tuners inject)
wrapped around the host's Linear/Conv2d modules in place: no copy of the model. They are built one module at
a time instead of through `inject_adapter_in_model`, because
  - each module gets its own rank/alpha (kohya: 3×3 convolutions use `conv_dim`/`conv_alpha`), and peft's
    `rank_pattern` regexes differ between its tuners and versions and cannot address root-level names;
  - the tuner path freezes every parameter of the whole model and leaves `peft_config` on the root
    (deps.md §2); building layers directly touches nothing but the wrapped modules.
`detach()` puts every original module object back (`get_base_layer()`, never merging: merge/unmerge is not
bit-exact) and restores every `requires_grad` and train/eval flag, so the host's model is bit-identical to
before (the recipe of deps.md §2). Adapter weights are float32 whatever the model's dtype.

Which modules: kohya's rule and names (`formats/kohya.py`); presets `attn` ⊂ `attn_mlp` (kohya's default)
⊂ `full` (+ ResNet/down/upsample convolutions and the time-embedding projections, "LoCon").
A1111's OpenCLIP text encoders (SD2, SDXL's second) hold q/k/v stacked in an `nn.MultiheadAttention`: while
adapters are attached, each such module is replaced by an `AdaptedMultiheadAttention` (`openclip_attention.py`)
whose q/k/v/out slots are Linear views that get the adapters like any Linear; `detach()` puts the original
MultiheadAttention object back. The saved names and tensors are the standalone host's (HF `q_proj` ...).

Network types (file layout in `formats/kohya.py`):
  - lora   — kohya LoRA (`networks.lora`) on the preset's modules.
  - locon  — the same with the convolution blocks added (what `targets = full` does for any type).
  - loha   — LyCORIS LoHa (`lycoris.kohya`, algo loha): Hadamard product of two rank-r products.
  - lokr   — LyCORIS LoKr (`lycoris.kohya`, algo lokr): Kronecker product; trained with scale 1 and saved
             as full matrices with that scale folded in, which A1111 applies exactly (see formats/kohya.py).
  - dora   — LoRA with a trained magnitude per *input* column (`dora_scale`), in A1111 v1.10's convention
             (`methods/dora.py`): peft's LoRA layers with the input rescaled per feature/channel, which is
             exactly A1111's `apply_weight_decompose`. Saved as LyCORIS writes DoRA (`lycoris.kohya`, algo lora,
             dora_wd) with `wd_on_output=False`. peft's own DoRA (per *output* row, like LyCORIS's
             wd_on_output=True) is never used: A1111 v1.10 would apply such a file wrongly or not at all.
             With targets = full the convolutions get DoRA too (per input channel).
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..config import ConfigBase, setting
from ..errors import UserError
from .base import MethodBase, component_groups

if TYPE_CHECKING:
    import torch

    from ..formats.kohya import Target
    from ..hosts import ModelParts

@dataclass(frozen=True)
class NetworkType:
    algorithm: str          # peft tuner: "lora" | "loha" | "lokr"
    conv_blocks: bool       # always add the ResNet/down/upsample convolutions (LoCon)
    module: str             # ss_network_module as kohya/LyCORIS write it
    dora: bool = False      # a trained magnitude per input column (A1111's `dora_scale`, methods/dora.py)


NETWORK_TYPES: dict[str, NetworkType] = {
    "lora": NetworkType("lora", False, "networks.lora"),
    "locon": NetworkType("lora", True, "networks.lora"),
    "loha": NetworkType("loha", False, "lycoris.kohya"),
    "lokr": NetworkType("lokr", False, "lycoris.kohya"),
    "dora": NetworkType("lora", False, "lycoris.kohya", dora=True),
}

# preset → golden target groups (+ whether only the attention projections of those groups are kept)
TARGET_PRESETS: dict[str, tuple[tuple[str, ...], bool]] = {
    "attn": (("unet_attn", "te_attn_mlp"), True),
    "attn_mlp": (("unet_attn", "te_attn_mlp"), False),
    "full": (("unet_attn", "unet_conv", "te_attn_mlp"), False),
}

SAVE_DTYPES = ("fp16", "bf16", "fp32")
ADAPTER = "default"   # peft adapter name of every layer we build
PEFT_ROOT_ATTRS = ("peft_config", "_hf_peft_config_loaded")   # what peft/HF integrations put on a model root


@dataclass
class LoraSettings(ConfigBase):
    """Settings of the LoRA family (the `[lora]` section of a training config)."""

    KIND = "lora"
    VERSION = 1

    network_type: str = setting(
        "lora", "adapter kind: lora (kohya LoRA), locon (LoRA + the UNet's ResNet convolutions), loha (LyCORIS "
        "Hadamard), lokr (LyCORIS Kronecker), dora (LoRA + a trained magnitude per input column, the DoRA "
        "convention A1111 v1.10 applies; with targets = full also on the convolutions). All load in A1111 "
        "v1.10's built-in Lora (DoRA only with its default, not the 'old method' Lora setting)",
        choices=list(NETWORK_TYPES), group="network")
    network_dim: int = setting(
        16, "rank (dim) of each adapter on Linear and 1×1 layers; LoKr: rank of the factored Kronecker half "
        "(a dim of at least half the layer's factor size trains it as a full matrix)", minimum=1,
        maximum=100000, group="network")
    network_alpha: float = setting(
        8.0, "alpha: updates are scaled by alpha / dim. Default 8 = dim/2 (scale 0.5), the common guide value "
        "that suits learning rates around 1e-4; kohya's command-line default of 1 gives scale 1/dim and needs "
        "much larger rates. 0 = same as dim (scale 1). Not used by LoKr (trained with scale 1)",
        minimum=0.0, maximum=100000, group="network")
    conv_dim: int | None = setting(
        None, "rank on 3×3 convolutions (locon, or targets = full); empty = network_dim", minimum=1,
        maximum=100000, group="network")
    conv_alpha: float | None = setting(
        None, "alpha on 3×3 convolutions; empty = network_alpha (scaled like it when conv_dim is set)",
        minimum=0.0, maximum=100000, group="network")
    targets: str = setting(
        "attn_mlp", "which layers get adapters: attn = attention q/k/v/out only (UNet and text encoder); "
        "attn_mlp = kohya's default, every layer of the UNet's transformer blocks (incl. proj_in/out, "
        "feed-forward) and the text encoder's attention + MLP; full = attn_mlp + the UNet's ResNet, down- and "
        "upsampling convolutions and time-embedding projections", choices=list(TARGET_PRESETS), group="network")
    train_unet: bool = setting(True, "train adapters on the UNet", group="network")
    train_text_encoder: bool = setting(
        True, "also train adapters on the text encoder(s) (kohya's default; turn off for SDXL on small GPUs, "
        "or to cache text conditioning)", group="network")
    dropout: float = setting(
        0.0, "dropout while training: lora/locon drop adapter inputs, loha/lokr drop rows of the update "
        "(rank dropout); 0 = off", minimum=0.0, maximum=0.99, group="network", advanced=True)
    loraplus_lr_ratio: float = setting(
        0.0, "LoRA+: the up (B) matrices learn this many times faster than the down (A) matrices (the paper "
        "suggests 16; kohya's loraplus_lr_ratio). lora, locon and dora only; 0 or 1 = off (one rate for both)",
        minimum=0.0, maximum=1000.0, group="network", advanced=True)
    lokr_factor: int = setting(
        -1, "LoKr: size of the smaller Kronecker factor (e.g. 4, 8, 16); -1 = as square as possible",
        minimum=-1, maximum=100000, group="network", advanced=True)
    scale_weight_norms: float = setting(
        0.0, "max-norm regularisation (kohya's scale_weight_norms): after each step, a module whose update "
        "(up × down × alpha/dim) has a larger norm than this is scaled down to it, which keeps single layers from "
        "running away (1 is a common start). lora and locon only; 0 = off", minimum=0.0, group="network",
        advanced=True)
    save_dtype: str = setting(
        "fp16", "precision of the saved file (A1111 computes in its own precision when applying)",
        choices=list(SAVE_DTYPES), group="network", advanced=True)

    def validate(self) -> None:
        super().validate()
        if not (self.train_unet or self.train_text_encoder):
            raise UserError("lora: train_unet and train_text_encoder are both off; nothing would be trained")
        if self.lokr_factor == 0:
            raise UserError("lora: lokr_factor must be -1 (automatic) or a positive factor size")
        if self.scale_weight_norms and (self.network.algorithm != "lora" or self.network.dora):
            raise UserError(f"lora: scale_weight_norms works on lora and locon, not on {self.network_type}; set "
                            "it to 0")
        if self.loraplus and self.network.algorithm != "lora":
            raise UserError(f"lora: loraplus_lr_ratio works on lora, locon and dora, not on {self.network_type} "
                            "(its factors have no up and down matrices); set it to 0")

    # ---- derived values ------------------------------------------------------------------------------
    @property
    def network(self) -> NetworkType:
        return NETWORK_TYPES[self.network_type]

    @property
    def loraplus(self) -> bool:
        return self.loraplus_lr_ratio not in (0.0, 1.0)

    def groups(self) -> tuple[set[str], bool]:
        """Golden target groups this configuration trains, and whether only attention projections count."""
        groups, attn_only = TARGET_PRESETS[self.targets]
        chosen = set(groups)
        if self.network.conv_blocks:
            chosen.add("unet_conv")
        if not self.train_unet:
            chosen -= {"unet_attn", "unet_conv"}
        if not self.train_text_encoder:
            chosen.discard("te_attn_mlp")
        return chosen, attn_only

    def rank_alpha(self, target: Target) -> tuple[int, float]:
        """kohya's rule: 3×3 convolutions take conv_dim/conv_alpha, everything else network_dim/network_alpha.

        alpha 0 means "same as the rank" (kohya: `alpha = lora_dim if alpha is None or alpha == 0`).
        """
        if target.is_conv3x3:
            rank = self.conv_dim or self.network_dim
            alpha = self.conv_alpha if self.conv_alpha is not None else self.network_alpha
        else:
            rank, alpha = self.network_dim, self.network_alpha
        return rank, float(alpha or rank)

    def network_args(self) -> dict[str, str]:
        """`ss_network_args` as kohya/LyCORIS spell them (values are strings, as parsed from `key=value`)."""
        args: dict[str, str] = {}
        if self.network.module == "lycoris.kohya":
            args["algo"] = self.network.algorithm
        groups, _ = self.groups()
        if "unet_conv" in groups:
            args["conv_dim"] = str(self.conv_dim or self.network_dim)
            args["conv_alpha"] = str(float(self.conv_alpha if self.conv_alpha is not None else self.network_alpha))
        if self.network_type == "lokr":
            args["factor"] = str(self.lokr_factor)
        if self.loraplus:
            args["loraplus_lr_ratio"] = str(float(self.loraplus_lr_ratio))   # as kohya's network_args take it
        if self.network.dora:
            # LyCORIS's names; wd_on_output=False is the per-input-column layout A1111 v1.10 applies
            args["dora_wd"] = "True"
            args["wd_on_output"] = "False"
        if self.dropout and self.network.algorithm != "lora":
            args["rank_dropout"] = str(self.dropout)
        return args


def select_targets(parts: Any, settings: LoraSettings) -> list[Target]:
    """The modules `settings` trains in `parts` (kohya's rule, then the preset's filter). Used by `attach`."""
    from ..models.targets import find_targets

    groups, attn_only = settings.groups()
    targets = find_targets(parts, groups)
    if attn_only:
        targets = [t for t in targets if t.is_attention_projection]
    return targets


@functools.lru_cache(maxsize=None)
def _layer_classes() -> dict[tuple[str, str], type]:
    """peft adapter layer classes per (algorithm, "linear" | "conv"), imported on first use."""
    import torch.nn as nn
    import torch.nn.functional as F
    from peft.tuners.loha import layer as loha_layer
    from peft.tuners.lokr import layer as lokr_layer
    from peft.tuners.lora import layer as lora_layer

    class _DeltaInInputDtype:
        # LoHa/LoKr build the whole delta weight and call F.linear/F.conv2d with it. With float32 adapters on
        # an fp16/bf16 model and no autocast that call fails on mixed dtypes; casting the delta to the input's
        # dtype fixes it (gradients still reach the float32 parameters). peft's LoRA layers cast x instead.
        def _get_delta_activations(self, adapter_name, input, *args, **kwargs):
            delta = self.get_delta_weight(adapter_name).to(input.dtype)
            base = self.get_base_layer()
            if isinstance(base, nn.Conv2d):
                return F.conv2d(input, delta, stride=base.stride, padding=base.padding, dilation=base.dilation,
                                groups=base.groups)
            return F.linear(input, delta)

    class LoHaLinear(_DeltaInInputDtype, loha_layer.Linear):
        pass

    class LoHaConv2d(_DeltaInInputDtype, loha_layer.Conv2d):
        pass

    class LoKrLinear(_DeltaInInputDtype, lokr_layer.Linear):
        pass

    class LoKrConv2d(_DeltaInInputDtype, lokr_layer.Conv2d):
        pass

    from .dora import InputColumnDoRA

    class DoRALinear(InputColumnDoRA, lora_layer.Linear):
        pass

    class DoRAConv2d(InputColumnDoRA, lora_layer.Conv2d):
        pass

    return {("lora", "linear"): lora_layer.Linear, ("lora", "conv"): lora_layer.Conv2d,
            ("loha", "linear"): LoHaLinear, ("loha", "conv"): LoHaConv2d,
            ("lokr", "linear"): LoKrLinear, ("lokr", "conv"): LoKrConv2d,
            ("dora", "linear"): DoRALinear, ("dora", "conv"): DoRAConv2d}


def _adapter_items(layer: Any):
    """(container name, container, item) of our adapter in each of a peft layer's adapter containers."""
    for container_name in layer.adapter_layer_names:
        container = getattr(layer, container_name, None)
        if container is not None and ADAPTER in container:
            yield container_name, container, container[ADAPTER]


def _adapter_params(layer: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """(leaf name, parameter) of the adapter in a peft layer, e.g. ("lora_A.weight", p), ("hada_w1_a", p)."""
    import torch.nn as nn

    out = []
    for container_name, _, item in _adapter_items(layer):
        if isinstance(item, nn.Module):
            out += [(f"{container_name}.{n}", p) for n, p in item.named_parameters()]
        else:
            out.append((container_name, item))
    return out


def _loraplus_groups(groups: list[dict[str, Any]], params: dict[str, list[tuple[str, Any]]], ratio: float
                     ) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al., 2024): each component's group split in two, the up matrices (peft's `lora_B`) at
    `ratio` times the group's rate, the rest (down matrices, DoRA magnitudes) at the group's rate. A group without
    its own rate (attach called without one, e.g. to apply a file) is left whole: there is nothing to scale."""
    out = []
    for group in groups:
        pairs = params[group["name"]]
        up = [p for leaf, p in pairs if leaf.startswith("lora_B.")]
        if "lr" not in group or not up:
            out.append(group)
            continue
        up_ids = {id(p) for p in up}
        out.append({**group, "params": [p for p in group["params"] if id(p) not in up_ids]})
        out.append({**group, "name": f"{group['name']}_up", "params": up, "lr": group["lr"] * ratio})
    return out


def _adapters_to_fp32(layer: Any) -> None:
    """peft moves new adapters to the base layer's dtype; keep them float32 (fp16 updates underflow)."""
    import torch
    import torch.nn as nn

    for _, container, item in list(_adapter_items(layer)):
        if isinstance(item, nn.Module):
            item.float()
        elif item.dtype != torch.float32:
            container[ADAPTER] = nn.Parameter(item.detach().float(), requires_grad=item.requires_grad)


def _core_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A weight's shape without trailing sides of 1 beyond its first two (a 1×1 kernel's)."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _split_rank(matrix: torch.Tensor, rank: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """a [m, rank], b [rank, n] with a @ b == matrix (exact when its rank ≤ `rank`), by SVD."""
    import torch

    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    a, b = u[:, :r] * root, root[:, None] * vh[:r]
    if r < rank:  # pad to the layer's rank with zeros
        a = torch.cat([a, a.new_zeros(a.shape[0], rank - r)], dim=1)
        b = torch.cat([b, b.new_zeros(rank - r, b.shape[1])], dim=0)
    err = (a @ b - matrix.double()).norm() / matrix.double().norm().clamp_min(1e-30)
    if err > 1e-4:
        raise UserError(f"{what}: the file's LoKr factor has a higher rank than this network's dim "
                        f"({rank}); choose a larger network_dim to load it")
    return a.float(), b.float()


@dataclass
class _Attached:
    target: Target
    layer: Any               # the peft layer now in the model
    base: Any                # the original module object
    parent: Any
    child: str
    rank: int
    alpha: float


@dataclass
class _InstalledAttention:
    """An `AdaptedMultiheadAttention` put in place of the MultiheadAttention `mha` at `parent.<child>`."""

    parent: Any
    child: str
    wrapper: Any
    mha: Any


# The adapter tensor that carries each algorithm's update linearly (training_state leaf names): LoRA
# ΔW = B·A·scale, LoHa ΔW = (w1a·w1b)⊙(w2a·w2b)·scale, LoKr ΔW = w1 ⊗ w2. Scaling one factor by W scales ΔW by
# W, as A1111's multiplier does (`set_strength`).
LINEAR_LEAVES = ("lora_B.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")
# Trained-parameter estimate (train/estimate.py): LoRA adds rank × (in + out) per adapted layer; over kohya's
# attn_mlp targets that is about these millions per rank unit (UNet, text encoders); `attn` keeps ≈ 55 %, `full`
# (LoCon) ≈ 160 %, LoHa doubles it, LoKr ≈ 20 %.
PARAMS_PER_RANK_M = {"sd1": (0.42, 0.166), "sd2": (0.45, 0.44), "sdxl": (2.5, 0.90)}
TARGET_FACTOR = {"attn": 0.55, "attn_mlp": 1.0, "full": 1.6}
NETWORK_FACTOR = {"lora": 1.0, "locon": 1.6, "loha": 2.0, "lokr": 0.2, "dora": 1.0}   # DoRA: + in per layer


class LoraMethod(MethodBase):
    """The TrainingMethod of the LoRA family (see the module docstring)."""

    name = "lora"
    has_strength = True
    file_suffix = ".safetensors"
    output_kind = "lora"

    def __init__(self, settings: LoraSettings | None = None) -> None:
        self.settings = settings if settings is not None else LoraSettings()
        self.settings.validate()
        self._layers: dict[str, _Attached] = {}
        self._attention: dict[tuple[int, str], _InstalledAttention] = {}
        self._snapshots: list[tuple[Any, dict[str, bool], dict[str, bool], set[str]]] = []
        self._parts: Any = None
        self._started_at: float | None = None
        self._session_id = ""
        self._unscaled: dict[str, Any] | None = None   # the loaded file's state, while a strength ≠ 1 is applied
        self.norm_stats: tuple[int, float, float] | None = None   # scale_weight_norms: the last step's figures

    @classmethod
    def estimate_parameters(cls, settings: LoraSettings, family: str, model_m: dict[str, float]) -> float:
        s = settings
        unet_m, text_m = PARAMS_PER_RANK_M[family]
        # a model file's own sizes against the stock model's (estimate.model_sizes; 1 for the public sizes)
        unet_m, text_m = unet_m * model_m.get("attn_scale", 1.0), text_m * model_m.get("text_scale", 1.0)
        conv = (s.conv_dim or s.network_dim) / s.network_dim
        unet = unet_m * s.network_dim * TARGET_FACTOR.get(s.targets, 1.0)
        if s.targets == "full" or s.network_type == "locon":
            # the convolution share of `full` scales with conv_dim instead of network_dim
            unet = unet_m * s.network_dim * (1.0 + 0.6 * conv)
        text = text_m * s.network_dim * (0.55 if s.targets == "attn" else 1.0)
        scale = {"loha": NETWORK_FACTOR["loha"], "lokr": NETWORK_FACTOR["lokr"]}.get(s.network_type, 1.0)
        total = (unet if s.train_unet else 0.0) + (text if s.train_text_encoder else 0.0)
        return total * scale * 1e6

    def set_strength(self, weight: float) -> None:
        """A1111's `<lora:name:W>`: the loaded file's update × W, by scaling the factor that carries it linearly.

        DoRA's update is not linear in any factor; A1111 multiplies the decomposed difference W_new − W, which
        each DoRA layer does itself (`dora_multiplier`).
        """
        if self.settings.network.dora:
            self._require_attached()
            for a in self._layers.values():
                a.layer.dora_multiplier = float(weight)
            return
        if self._unscaled is None:
            if weight == 1.0:
                return
            self._unscaled = self.training_state()
        scaled = {k: (v * weight if k.split(".", 1)[1] in LINEAR_LEAVES else v) for k, v in self._unscaled.items()}
        self.load_training_state(scaled)

    # ---- planning -------------------------------------------------------------------------------------
    def plan(self, parts: Any) -> list[Target]:
        """The targets `attach` would wrap (works on meta-device models: nothing is allocated)."""
        return select_targets(parts, self.settings)

    def trains_text_encoder(self) -> bool:
        return self.settings.train_text_encoder

    # ---- attach / detach ------------------------------------------------------------------------------
    def attach(self, parts: ModelParts, *, unet_lr: float | None = None,
               text_encoder_lr: float | None = None) -> list[dict[str, Any]]:
        """Wrap the planned modules of `parts` with fresh adapters (float32, initialised as a no-op).

        Returns optimizer groups `{"name": "unet" | "text_encoder", "params": [...]}`, each with `"lr"` when
        `unet_lr` / `text_encoder_lr` is given (otherwise the loop's base rate applies). Every other parameter
        of the wrapped networks gets `requires_grad=False` until `detach()`. Uses the global torch RNG for the
        initial weights, so seed before calling for reproducible runs.
        """
        if self._layers or self._snapshots or self._attention:
            raise RuntimeError("LoraMethod.attach called twice without detach")
        targets = self.plan(parts)
        if not targets:
            raise UserError("lora: no layers to train with these settings")
        self._check_ranks(targets)
        roots = {("unet", 0): parts.unet}
        roots.update({("text_encoder", i): enc for i, enc in enumerate(parts.text_encoders)})
        used = [key for key in roots if any((t.component, t.index) == key for t in targets)]
        self._parts = parts
        self._started_at = time.time()
        self._session_id = str(random.randint(0, 2 ** 32 - 1))   # kohya: one id per run, on every save
        for key in used:
            root = roots[key]
            self._snapshots.append((root, {n: p.requires_grad for n, p in root.named_parameters()},
                                    {n: m.training for n, m in root.named_modules()}, set(vars(root))))
        try:
            classes = _layer_classes()
            for target in targets:
                self._wrap(roots[(target.component, target.index)], target, classes)
            adapter_ids = {id(p) for a in self._layers.values() for _, p in _adapter_params(a.layer)}
            for key in used:
                for p in roots[key].parameters():
                    p.requires_grad_(id(p) in adapter_ids)
        except BaseException:
            self.detach()
            raise
        params = {c: [(leaf, p) for a in self._layers.values() if a.target.component == c
                      for leaf, p in _adapter_params(a.layer)] for c in ("unet", "text_encoder")}
        groups = component_groups({c: [p for _, p in pairs] for c, pairs in params.items()}, unet_lr, text_encoder_lr)
        if self.settings.loraplus:
            groups = _loraplus_groups(groups, params, self.settings.loraplus_lr_ratio)
        return groups

    def _check_ranks(self, targets: list[Target]) -> None:
        """Refuse a rank that no trained layer can use, before any adapter takes memory.

        A LoRA, DoRA or LoHa update of a layer has at most the rank min(outputs, inputs × kernel area), whatever
        the adapter's rank; a rank above that of the widest layer (a typo such as 100000) only costs memory, and
        at that size more than any machine has. LoKr's dim means something else (a factor size) and is not
        checked.
        """
        s = self.settings
        if s.network.algorithm == "lokr":
            return
        for conv in (False, True):
            chosen = [t for t in targets if t.is_conv3x3 == conv]
            if not chosen:
                continue
            rank = s.rank_alpha(chosen[0])[0]
            widest = max(min(t.weight_shape[0], math.prod(t.weight_shape[1:])) for t in chosen)
            if rank > widest:
                name = "conv_dim" if conv and s.conv_dim else "network_dim"
                raise UserError(f"lora: {name} {rank} is more than any layer it trains can use: the widest one "
                                f"takes a rank of at most {widest} on this model (the smaller of its outputs and "
                                "inputs); a larger rank adds only memory")

    def _wrap(self, root: Any, target: Target, classes: dict[tuple[str, str], type]) -> None:
        s = self.settings
        algorithm = s.network.algorithm
        if target.mha_slot:      # a projection inside an OpenCLIP MultiheadAttention: its wrapper's slot
            parent, child = self._adapted_attention(root, target.mha_path), target.mha_slot
            base = getattr(parent, child)
        else:
            base = root.get_submodule(target.path)
            parent_path, _, child = target.path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
        rank, alpha = s.rank_alpha(target)
        cls = classes[("dora" if s.network.dora else algorithm, target.kind)]
        if algorithm == "lora":
            if s.network.dora:
                from .dora import check_supported

                check_supported(base, f"{target.name} ({target.path})")   # before peft builds anything
            layer = cls(base, ADAPTER, r=rank, lora_alpha=alpha, lora_dropout=s.dropout, init_lora_weights=True)
            if s.network.dora:
                layer.add_magnitude(ADAPTER, target.name)
        elif algorithm == "loha":
            layer = cls(base, adapter_name=ADAPTER, r=rank, alpha=alpha, rank_dropout=s.dropout,
                        module_dropout=0.0, init_weights=True, use_effective_conv2d=False)
        else:
            # alpha = r makes the scale 1 both in peft 0.13.2 (which ignores LoKr alpha) and in later peft
            # (which applies alpha / r), so training and the saved file do not depend on the peft version.
            alpha = float(rank)
            layer = cls(base, adapter_name=ADAPTER, r=rank, alpha=alpha, rank_dropout=s.dropout,
                        module_dropout=0.0, init_weights=True, use_effective_conv2d=False,
                        decompose_both=False, decompose_factor=s.lokr_factor)
        _adapters_to_fp32(layer)
        layer.train(base.training)
        setattr(parent, child, layer)
        self._layers[target.name] = _Attached(target, layer, base, parent, child, rank, alpha)

    def _adapted_attention(self, root: Any, path: str) -> Any:
        """The `AdaptedMultiheadAttention` standing in for the MultiheadAttention at `root.<path>` (put in once)."""
        key = (id(root), path)
        if key not in self._attention:
            import torch.nn as nn

            from .openclip_attention import AdaptedMultiheadAttention, check_supported

            mha = root.get_submodule(path)
            if not isinstance(mha, nn.MultiheadAttention):
                raise UserError(f"{path!r} is a {type(mha).__name__}, not a MultiheadAttention")
            check_supported(mha, path)
            parent_path, _, child = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            wrapper = AdaptedMultiheadAttention(mha)
            setattr(parent, child, wrapper)
            self._attention[key] = _InstalledAttention(parent, child, wrapper, mha)
        return self._attention[key].wrapper

    def detach(self) -> None:
        """Put back every original module and every flag; the model is then bit-identical to before attach."""
        self._unscaled = None
        for attached in reversed(list(self._layers.values())):
            current = getattr(attached.parent, attached.child, None)
            if current is attached.layer:
                setattr(attached.parent, attached.child, attached.base)
        self._layers.clear()
        for installed in reversed(list(self._attention.values())):
            if getattr(installed.parent, installed.child, None) is installed.wrapper:
                setattr(installed.parent, installed.child, installed.mha)
        self._attention.clear()
        for root, grads, modes, attrs in self._snapshots:
            for n, p in root.named_parameters():
                if n in grads:
                    p.requires_grad_(grads[n])
            for n, m in root.named_modules():
                if n in modes:
                    m.training = modes[n]
            # peft's tuner API leaves `peft_config` (and the HF integrations `_hf_peft_config_loaded`) on the
            # root; our layers do not, but if one appeared during the run it goes (others' attributes stay).
            for extra in PEFT_ROOT_ATTRS:
                if extra in vars(root) and extra not in attrs:
                    delattr(root, extra)
        self._snapshots.clear()
        self._parts = None

    def after_step(self, step: int) -> None:
        """scale_weight_norms: scale down every module whose update's norm is above the limit."""
        if self.settings.scale_weight_norms:
            self.norm_stats = self.apply_max_norm(self.settings.scale_weight_norms)

    def step_figures(self) -> dict[str, float]:
        if self.norm_stats is None:
            return {}
        scaled, mean, largest = self.norm_stats
        return {"keys_scaled": scaled, "average_key_norm": mean, "max_key_norm": largest}

    def apply_max_norm(self, limit: float) -> tuple[int, float, float]:
        """Scale each module's up and down matrices by the same √ratio so that ‖up·down·scale‖ ≤ `limit`
        (Frobenius norm of the update, convolutions flattened). Returns (modules scaled, mean norm, largest
        norm) before scaling, as kohya reports them."""
        import torch

        self._require_attached()
        scaled, norms = 0, []
        with torch.no_grad():
            for a in self._layers.values():
                down, up = a.layer.lora_A[ADAPTER].weight, a.layer.lora_B[ADAPTER].weight
                update = (up.flatten(1).float() @ down.flatten(1).float()) * float(a.layer.scaling[ADAPTER])
                norm = float(update.norm())
                norms.append(norm)
                if norm > limit:
                    root = (limit / norm) ** 0.5
                    up.mul_(root)
                    down.mul_(root)
                    scaled += 1
        return scaled, sum(norms) / max(1, len(norms)), max(norms, default=0.0)

    # ---- tensors ------------------------------------------------------------------------------------
    def _require_attached(self) -> None:
        if not self._layers:
            raise RuntimeError("LoraMethod: attach() first")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained network in kohya layout (float32, CPU): what `save` writes, before the dtype cast."""
        import torch

        from ..formats import kohya

        self._require_attached()
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, a in self._layers.items():
                layer, algorithm = a.layer, self.settings.network.algorithm
                if algorithm == "lora":
                    tensors = kohya.lora_layout(layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                                                layer.lora_alpha[ADAPTER])
                    if self.settings.network.dora:
                        tensors[kohya.DORA_LEAF] = layer.dora_scale[ADAPTER]
                elif algorithm == "loha":
                    tensors = kohya.loha_layout(layer.hada_w1_a[ADAPTER], layer.hada_w1_b[ADAPTER],
                                                layer.hada_w2_a[ADAPTER], layer.hada_w2_b[ADAPTER],
                                                layer.alpha[ADAPTER])
                else:
                    w1 = (layer.lokr_w1[ADAPTER] if ADAPTER in layer.lokr_w1
                          else layer.lokr_w1_a[ADAPTER] @ layer.lokr_w1_b[ADAPTER])
                    w2 = (layer.lokr_w2[ADAPTER] if ADAPTER in layer.lokr_w2
                          else layer.lokr_w2_a[ADAPTER] @ layer.lokr_w2_b[ADAPTER])
                    # `scaling` is alpha / r = 1 by construction (see _wrap); folded in for any peft version.
                    tensors = kohya.lokr_layout(w1, w2, layer.scaling[ADAPTER], a.target.weight_shape, a.rank)
                for leaf, value in tensors.items():
                    out[f"{name}.{leaf}"] = value.detach().to("cpu", torch.float32).clone()
        return out

    def metadata(self, extra: dict[str, Any] | None = None) -> dict[str, str]:
        """The file's metadata (all str) without the hashes: kohya `ss_*`, `modelspec.*`, `lab.*`.

        `extra` (the loop's run info, str values or plain data) is merged in; the network's own keys win.
        Filled from the model when not given: `ss_sd_model_name`, `ss_new_sd_model_hash`, `ss_sd_model_hash`,
        `ss_clip_skip`, `ss_session_id`, `ss_training_started_at` (time of attach).
        """
        from ..formats.kohya import clip_skip_value, model_name_value, network_metadata

        s, parts = self.settings, self._parts
        if parts is None:
            raise RuntimeError("LoraMethod.metadata needs an attached model")
        base: dict[str, Any] = {"ss_session_id": self._session_id,
                                "ss_clip_skip": clip_skip_value(getattr(parts, "clip_skip", 1)),
                                "lab.config": json.dumps({"method": "lora", "lora": s.to_dict()}),
                                "ss_scale_weight_norms": str(s.scale_weight_norms or None)}
        info = getattr(parts, "info", None)
        if info is not None:
            base.update({"ss_sd_model_name": model_name_value(info), "ss_new_sd_model_hash": info.sha256 or None,
                         "ss_sd_model_hash": info.legacy_hash or None})
        # LoKr files carry alpha = dim per module (scale 1, see formats/kohya.py); say the same in the header.
        alpha = float(s.network_dim) if s.network_type == "lokr" else float(s.network_alpha or s.network_dim)
        meta = network_metadata(
            family=parts.family, prediction=getattr(parts, "prediction", "eps"), network_module=s.network.module,
            network_dim=s.network_dim, network_alpha=alpha, network_args=s.network_args() or None,
            network_dropout=(s.dropout or None) if s.network.algorithm == "lora" else None, extra={**base, **(extra or {})},
            started_at=self._started_at, implementation_version=f"training-lab/{__version__}")
        meta["lab.network"] = json.dumps({"version": s.VERSION, **s.to_dict()})   # describes the tensors: ours
        return meta

    def save(self, path: Path, metadata: dict[str, str], *, run_info: dict[str, Any] | None = None) -> Path:
        """Write the kohya file atomically: tensors in `save_dtype`, metadata, and kohya's `sshs_*` hashes.

        `metadata` (str values; the loop's `ss_*` run info, `lab.config`, ...) and `run_info` (plain values,
        converted like kohya: dicts/lists → JSON, others `str()`) are merged over our defaults.
        """
        import torch

        from ..formats.safetensors_io import write_safetensors

        self._require_attached()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.settings.save_dtype]
        tensors = {k: v.to(dtype) for k, v in self.state_dict().items()}
        meta = self.metadata({**(run_info or {}), **(metadata or {})})
        return write_safetensors(path, tensors, meta, add_kohya_hashes=True)

    def training_state(self) -> dict[str, torch.Tensor]:
        """The adapter parameters exactly (peft layout), keyed `<kohya name>.<peft leaf>`."""
        self._require_attached()
        return {f"{name}.{leaf}": p.detach().to("cpu").clone()
                for name, a in self._layers.items() for leaf, p in _adapter_params(a.layer)}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        import torch

        self._require_attached()
        params = {f"{name}.{leaf}": p for name, a in self._layers.items() for leaf, p in _adapter_params(a.layer)}
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        bad = [k for k in params if k in state and tuple(state[k].shape) != tuple(params[k].shape)]
        if missing or unexpected or bad:
            raise UserError("the saved LoRA state does not fit this network (were its settings changed?): "
                            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(bad)} with another "
                            f"shape (e.g. {(missing + unexpected + bad)[:2]})")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(p.device, p.dtype))

    def load_weights(self, path: str | Path, *, strict: bool = True) -> list[str]:
        """Load a kohya-layout file (ours or another trainer's) into the attached adapters.

        Module names must be ones this network trains (`strict`: and all of them present); the algorithm must
        match. Scales are converted with A1111's rule, so the loaded adapters apply the file's delta. LoKr
        factors are re-split to this network's layout (exact when the file's factor rank fits). A DoRA network
        takes only modules with a `dora_scale` in A1111's per-input-column layout, and any other network none.
        Resets the strength to 1. Returns the names of this network's modules the file did not have (empty
        when strict).
        """
        import torch

        from ..formats import kohya

        self._require_attached()
        self._unscaled = None
        if self.settings.network.dora:
            self.set_strength(1.0)
        net = kohya.import_kohya(path)
        unknown = sorted(set(net.modules) - set(self._layers))
        absent = sorted(set(self._layers) - set(net.modules))
        if unknown or (strict and absent):
            raise UserError(f"{Path(path).name} does not fit this network: {len(unknown)} modules it does not "
                            f"have (e.g. {unknown[:2]}), {len(absent)} of its modules missing (e.g. {absent[:2]})")
        algorithm = self.settings.network.algorithm
        with torch.no_grad():
            for name, weights in net.modules.items():
                a = self._layers[name]
                found = kohya.module_algorithm(weights)
                if found != algorithm:
                    raise UserError(f"{Path(path).name}: module {name} is {found}, this network is {algorithm}")
                if (kohya.DORA_LEAF in weights) != self.settings.network.dora:
                    raise UserError(f"{Path(path).name}: module {name} "
                                    f"{'has' if kohya.DORA_LEAF in weights else 'has no'} DoRA magnitude "
                                    f"(dora_scale), this network is {self.settings.network_type}")
                ratio = kohya.module_scale(weights) / a.layer.scaling[ADAPTER]
                self._load_module(a, weights, ratio, f"{Path(path).name}: {name}")
        return absent

    def _load_module(self, a: _Attached, w: dict[str, torch.Tensor], ratio: float, what: str) -> None:
        layer, algorithm = a.layer, self.settings.network.algorithm

        def put(param: torch.nn.Parameter, value: torch.Tensor) -> None:
            # the same shape but for trailing 1×1 kernel sides (a Linear's [r, in] is a 1×1 conv's [r, in, 1, 1]);
            # the same count alone would take a transposed [in, r] matrix
            if _core_shape(value.shape) != _core_shape(param.shape):
                raise UserError(f"{what}: {tuple(value.shape)} does not fit {tuple(param.shape)} (other dim?)")
            param.copy_(value.reshape(param.shape).to(param.device, param.dtype))

        if algorithm == "lora":
            put(layer.lora_A[ADAPTER].weight, w["lora_down.weight"])
            put(layer.lora_B[ADAPTER].weight, w["lora_up.weight"] * ratio)
            if self.settings.network.dora:
                self._load_magnitude(a, w["dora_scale"], what)
        elif algorithm == "loha":
            if "hada_t1" in w or "hada_t2" in w:
                raise UserError(f"{what}: LoHa with Tucker cores (hada_t1/t2) is not supported")
            put(layer.hada_w1_a[ADAPTER], w["hada_w1_a"] * ratio)
            for leaf in ("hada_w1_b", "hada_w2_a", "hada_w2_b"):
                put(getattr(layer, leaf)[ADAPTER], w[leaf])
        else:
            from ..formats.kohya import lokr_full_factors

            w1, w2 = lokr_full_factors(w)
            w1 = w1 * ratio
            if ADAPTER in layer.lokr_w1:
                put(layer.lokr_w1[ADAPTER], w1)
            else:
                a1, b1 = _split_rank(w1, a.rank, what)
                put(layer.lokr_w1_a[ADAPTER], a1)
                put(layer.lokr_w1_b[ADAPTER], b1)
            if ADAPTER in layer.lokr_w2:
                put(layer.lokr_w2[ADAPTER], w2)
            else:
                a2, b2 = _split_rank(w2.reshape(w2.shape[0], -1), a.rank, what)
                put(layer.lokr_w2_a[ADAPTER], a2)
                put(layer.lokr_w2_b[ADAPTER], b2)

    @staticmethod
    def _load_magnitude(a: _Attached, value: torch.Tensor, what: str) -> None:
        """`dora_scale` into a DoRA layer: only A1111's per-input-column layout (or a flat [in] on a Linear)."""
        from ..formats.kohya import dora_scale_shape

        param = a.layer.dora_scale[ADAPTER]
        want = dora_scale_shape(a.target.weight_shape)
        shape = tuple(value.shape)
        flat_linear = len(want) == 2 and shape == (want[1],)       # broadcasts like [1, in] on a 2-D weight
        if shape != want and not flat_linear:
            rows = a.target.weight_shape[0]
            per_row = shape[:1] == (rows,) and value.numel() == rows
            why = ("one value per output row (LyCORIS wd_on_output=True), which A1111 v1.10 does not apply"
                   if per_row else "not A1111's per-input-column layout")
            raise UserError(f"{what}: dora_scale {shape} does not fit {want}: {why}")
        param.copy_(value.reshape(param.shape).to(param.device, param.dtype))

    # ---- introspection for tests and the converter ---------------------------------------------------
    def attached_targets(self) -> list[Target]:
        return [a.target for a in self._layers.values()]

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """peft's own delta weight per module (float32, with its scale), for checks against the saved file.

        DoRA: the decomposed W_new − W that A1111 adds at multiplier 1.
        """
        import torch

        self._require_attached()
        out = {}
        with torch.no_grad():
            for name, a in self._layers.items():
                training = a.layer.training
                a.layer.train(False)  # no rank dropout
                try:
                    if self.settings.network.dora:
                        delta = a.layer.dora_delta(ADAPTER, torch.float64).float()   # W_new − W, as A1111 adds it
                    else:
                        delta = a.layer.get_delta_weight(ADAPTER).float()
                finally:
                    a.layer.train(training)
                if self.settings.network.algorithm == "lora":
                    delta = delta.reshape(a.target.weight_shape)
                out[name] = delta.detach().cpu()
        return out
