"""kohya/LyCORIS network files as A1111 v1.10 loads them: module names, tensor layout, metadata.

**Names.** A kohya LoRA file names each adapted module `<prefix>_<module path with '.' → '_'>` and stores its
tensors under `<name>.<leaf>`; A1111 splits a key at the first dot, so names must be dot-free.
Which modules: kohya sd-scripts' rule (`networks/lora.py` `LoRANetwork.create_modules`): every Linear or
Conv2d inside a module of class Transformer2DModel (UNet; SGM/LDM: SpatialTransformer), inside
ResnetBlock2D / Downsample2D / Upsample2D (only with conv layers, "LoCon"; SGM/LDM: ResBlock / Downsample /
Upsample), and inside CLIPAttention / CLIPMLP (text encoders). Prefixes: `lora_unet`, `lora_te` (one text
encoder) or `lora_te1` / `lora_te2` (SDXL). Module paths:
  - SD1/SD2 UNet: diffusers paths (`lora_unet_down_blocks_0_attentions_0_proj_in`);
  - SDXL UNet: SGM paths (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), which A1111 finds
    through its `lora_unet → diffusion_model` fallback;
  - text encoders: HF CLIP paths from `text_model.` on (`lora_te_text_model_encoder_layers_0_mlp_fc1`).
    A1111's OpenCLIP encoders (SD2, SDXL's second; `transformer.resblocks.N.…`) get the same HF names: `mlp.c_fc` /
    `mlp.c_proj` → `mlp_fc1` / `mlp_fc2`, and each `attn` (an `nn.MultiheadAttention` with q, k, v stacked in
    `in_proj_weight`) gives four targets `self_attn_{q,k,v,out}_proj` (`Target.mha_slot`), which A1111 resolves
    back onto the MultiheadAttention (q/k/v deltas stacked into `in_proj_weight`, applied only when all four are
    present, so they always come together). `methods/openclip_attention.py` trains them.
  The same names come out whether the host lends diffusers modules ("diffusers" naming, standalone) or
  A1111's own LDM/SGM modules ("ldm" naming): `models.targets.find_targets` walks a loaded model and names what
  it finds with the rules here (`models.ldm_unet.unet_prefix_map` converts UNet paths in either direction).
  The golden lists `tests/data/golden/*_lora_targets.tsv` are matched exactly.
  SD2 conditions on the penultimate layer of its 24-layer text tower, so its last layer is never targeted
  (kohya's SD2 text model has 23 layers; our standalone model keeps all 24 so that checkpoints round-trip).

**Layouts** (A1111 `extensions-builtin/Lora/network_lora.py`, `network_hada.py`, `network_lokr.py`; the
weight A1111 adds is `updown · scale · multiplier`, with `scale` = `alpha / dim` when both exist, else 1):
  - LoRA/LoCon: `lora_down.weight` [r, in(, kh, kw)], `lora_up.weight` [out, r(, 1, 1)], `alpha`;
    dim = r, so alpha = peft's `lora_alpha` reproduces peft's `alpha / r` exactly.
  - LoHa: `hada_w1_a` [out, r], `hada_w1_b` [r, in·kh·kw], `hada_w2_a`, `hada_w2_b`, `alpha`; dim = r.
  - LoKr: always written as two **full** matrices `lokr_w1` [o1, i1] and `lokr_w2` [o2, i2(, kh, kw)], with the
    adapter's whole scale folded into `lokr_w1` and `alpha` = the module's rank. Reasons: (1) with no `_a/_b`
    factors A1111's `dim` stays None, its scale is exactly 1 and alpha is ignored (LyCORIS's own full-matrix
    mode also applies scale 1 and saves alpha = dim); (2) the A1111 source we read tests the factors
    with `if self.w1b` (tensor truthiness), which raises for any factor with more than one element, so a
    factored LoKr file may not load at all; (3) peft 0.13.2 ignores LoKr alpha while later peft (0.21.2
    checked) applies `alpha / r` (deps.md §2), so folding the effective scale removes the version dependence. Kronecker
    factors are small (≈ √out × √in), so full matrices cost little space.
  - DoRA (network_type `dora`): the LoRA tensors plus `dora_scale`, the trained magnitude in A1111 v1.10's
    convention, one value per *input* column of the weight, shaped to broadcast against it: [1, in] for a
    Linear (also each q/k/v/out slot of OpenCLIP's attention), [1, in, 1, 1] for a Conv2d
    (`dora_scale_shape`). A1111 then adds (W_new − W)·multiplier with W_new = (W + ΔW)·dora_scale / ‖W + ΔW‖,
    the norm over every axis but 1 (`methods/dora.py`). LyCORIS's `wd_on_output` layout ([out, 1], one value
    per output row) is what A1111 v1.10 does not apply; it is never written and is refused when read.

**Metadata.** `network_metadata` writes what kohya's `train_network.py` writes that we know (`ss_*`), always
`ss_base_model_version` and `ss_v2` (A1111's SD-version filter in the Lora tab), the `modelspec.*` keys of
sd-scripts' `library/sai_model_spec.py` (ModelSpec 1.0.1), and the hashes `sshs_model_hash` /
`sshs_legacy_hash` (added at write time by `safetensors_io.write_safetensors`). Every value is a str.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import UserError

if TYPE_CHECKING:
    import torch

# ---- which modules (kohya's rule, extended to A1111's LDM/SGM class names) -------------------------------
UNET_ATTN_PARENTS = ("Transformer2DModel", "SpatialTransformer")
UNET_CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample")
TEXT_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
GROUPS = ("unet_attn", "unet_conv", "te_attn_mlp")   # the golden `group` column

PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"

# The attention projections proper (the "attn" preset): UNet self/cross attention and CLIP self-attention.
_UNET_ATTN_PROJ = re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TEXT_ATTN_PROJ = re.compile(r"(^|\.)self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TEXT_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")
_UNET_ROOT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# OpenCLIP text blocks (A1111's SD2 encoder and SDXL's second encoder) versus HF CLIP names.
_OPENCLIP_BLOCK = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.(attn|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)$")
_OPENCLIP_TO_HF = {"attn.out_proj": ["self_attn.out_proj"], "mlp.c_fc": ["mlp.fc1"], "mlp.c_proj": ["mlp.fc2"],
                   "attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}

# ---- metadata constants (sd-scripts) -------------------------------------------------------------------
# `ss_base_model_version`: `model_util.get_model_version_str_for_sd1_sd2(v2, v_parameterization)` and
# `sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0`. A1111 only tests `startswith("sdxl_")` and `ss_v2 == "True"`.
BASE_MODEL_VERSION = {("sd1", "eps"): "sd_v1", ("sd1", "v"): "sd_v1_v", ("sd2", "eps"): "sd_v2",
                      ("sd2", "v"): "sd_v2_v", ("sdxl", "eps"): "sdxl_base_v1-0", ("sdxl", "v"): "sdxl_base_v1-0"}
# ModelSpec architecture ids (`sai_model_spec.determine_architecture`) and default resolutions.
MODELSPEC_ARCH = {("sd1", "eps"): "stable-diffusion-v1", ("sd1", "v"): "stable-diffusion-v1",
                  ("sd2", "eps"): "stable-diffusion-v2-512", ("sd2", "v"): "stable-diffusion-v2-768-v",
                  ("sdxl", "eps"): "stable-diffusion-xl-v1-base", ("sdxl", "v"): "stable-diffusion-xl-v1-base"}
MODELSPEC_RESOLUTION = {("sd1", "eps"): "512x512", ("sd1", "v"): "512x512", ("sd2", "eps"): "512x512",
                        ("sd2", "v"): "768x768", ("sdxl", "eps"): "1024x1024", ("sdxl", "v"): "1024x1024"}
MODELSPEC_VERSION = "1.0.1"
IMPL_SGM = "https://github.com/Stability-AI/generative-models"   # sd-scripts writes this for SDXL LoRAs
IMPL_DIFFUSERS = "diffusers"                                      # ... and this for SD1/SD2 LoRAs
# Keys that describe the tensors themselves: a caller's metadata never overrides them.
NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                "ss_network_dropout", "ss_base_model_version", "ss_v2", "modelspec.sai_model_spec",
                "modelspec.architecture", "modelspec.implementation", "modelspec.prediction_type")


# ---- targets ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One module that gets an adapter: where it is in the host's model and what kohya calls it."""

    name: str                        # kohya module name, e.g. "lora_unet_down_blocks_0_attentions_0_proj_in"
    component: str                   # "unet" | "text_encoder"
    index: int                       # which text encoder (0 for the UNet)
    path: str                        # dotted module path inside parts.unet / parts.text_encoders[index]
    group: str                       # "unet_attn" | "unet_conv" | "te_attn_mlp"
    kind: str                        # "linear" | "conv"
    weight_shape: tuple[int, ...]
    kernel_size: tuple[int, int] = (1, 1)
    mha_slot: str = ""               # "q" | "k" | "v" | "out": a projection of an nn.MultiheadAttention (OpenCLIP)

    @property
    def mha_path(self) -> str:
        """Path of the MultiheadAttention holding this projection (`path` is it for q/k/v, its parent for out)."""
        if not self.mha_slot:
            return ""
        return self.path.rpartition(".")[0] if self.mha_slot == "out" else self.path

    @property
    def is_conv3x3(self) -> bool:
        """A spatial convolution (kohya gives these `conv_dim`/`conv_alpha`; 1×1 ones get `network_dim`)."""
        return self.kind == "conv" and tuple(self.kernel_size) != (1, 1)

    @property
    def is_attention_projection(self) -> bool:
        if self.mha_slot:
            return True
        regex = _UNET_ATTN_PROJ if self.component == "unet" else _TEXT_ATTN_PROJ
        return bool(regex.search(self.path))


def text_prefix(index: int, count: int) -> str:
    return PREFIX_TE if count == 1 else f"{PREFIX_TE}{index + 1}"


def text_kohya_path(path: str) -> str:
    """HF CLIP module path (possibly inside a wrapper, e.g. A1111's `transformer.text_model...`) from `text_model.`."""
    if path.startswith("text_model."):
        return path
    at = path.find(".text_model.")
    if at < 0:
        raise UserError(f"cannot name text-encoder module {path!r} for a kohya file (not a CLIP text model)")
    return path[at + 1:]


def text_name(path: str, index: int, count: int) -> str:
    return f"{text_prefix(index, count)}_{text_kohya_path(path).replace('.', '_')}"


def openclip_kohya_names(path: str, index: int, count: int) -> list[str]:
    """kohya names for an OpenCLIP text module (A1111's SD2 / SDXL-second encoder): the HF layer names.

    `...resblocks.N.attn` (a MultiheadAttention holding q, k, v stacked in `in_proj_weight`) gives three names,
    in q, k, v order; `attn.out_proj`, `mlp.c_fc`, `mlp.c_proj` one each.
    """
    m = _OPENCLIP_BLOCK.search(path)
    if not m:
        raise UserError(f"cannot name OpenCLIP text module {path!r} for a kohya file")
    layer, tail = m.groups()
    return [f"{text_prefix(index, count)}_text_model_encoder_layers_{layer}_{hf.replace('.', '_')}"
            for hf in _OPENCLIP_TO_HF[tail]]


MHA_SLOTS = ("q", "k", "v")   # row blocks of `in_proj_weight`, in order


def split_key(key: str) -> tuple[str, str]:
    """A1111's split of a network key: module name before the first dot, weight name after it."""
    name, _, leaf = key.partition(".")
    return name, leaf


DORA_LEAF = "dora_scale"


def dora_scale_shape(weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of A1111's `dora_scale` for a weight of `weight_shape`: 1 on every axis except the input axis 1."""
    return (1, int(weight_shape[1]), *([1] * (len(weight_shape) - 2)))


_ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}  # A1111 accepts both


def group_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`{module name: {leaf: tensor}}` from a flat kohya state dict (peft-style A/B leaves renamed)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, leaf = split_key(key)
        if not leaf:
            raise UserError(f"{key!r} is not a kohya network key (expected '<module>.<weight>')")
        out.setdefault(name, {})[_ALIASES.get(leaf, leaf)] = value
    return out


def module_algorithm(weights: Mapping[str, Any]) -> str:
    """"lora" | "loha" | "lokr" by the keys present, in A1111's order of module types; else UserError."""
    if "lora_up.weight" in weights and "lora_down.weight" in weights:
        return "lora"
    if all(k in weights for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "loha"
    has_1 = "lokr_w1" in weights or ("lokr_w1_a" in weights and "lokr_w1_b" in weights)
    has_2 = "lokr_w2" in weights or ("lokr_w2_a" in weights and "lokr_w2_b" in weights)
    if has_1 and has_2:
        return "lokr"
    raise UserError(f"unsupported network module layout (keys: {', '.join(sorted(weights))})")


def module_problem(weights: Mapping[str, torch.Tensor]) -> str | None:
    """Why a module's tensors cannot be one module of `module_algorithm`'s kind (a scale or alpha of several
    values, factors whose ranks do not meet or are 0, LoHa halves of two shapes, a LoKr factor that is no
    matrix), or None. Checked on reading, so that neither a description nor a load meets the mismatch in the
    middle of its arithmetic."""
    for key in ("alpha", "scale"):
        if key in weights and weights[key].numel() != 1:
            return f"its {key} holds {weights[key].numel()} values, not one"
    algorithm = module_algorithm(weights)
    pairs = {"lora": [("lora_up.weight", "lora_down.weight")],
             "loha": [("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")],
             "lokr": [(a, b) for a, b in (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")) if a in weights]}
    for up, down in pairs[algorithm]:
        u, d = weights[up], weights[down]
        if u.dim() < 2 or d.dim() < 2 or u.shape[1] != d.shape[0]:
            return f"{up} {tuple(u.shape)} and {down} {tuple(d.shape)} do not multiply (transposed or damaged?)"
        if d.shape[0] == 0:
            return f"{down} {tuple(d.shape)} has rank 0"
    if algorithm == "loha":
        halves = [(weights[f"hada_w{i}_a"].shape[0], *weights[f"hada_w{i}_b"].shape[1:]) for i in (1, 2)]
        if halves[0] != halves[1]:
            return f"its two Hadamard halves have other shapes ({halves[0]} and {halves[1]})"
    if algorithm == "lokr":
        for key in ("lokr_w1", "lokr_w2"):
            if key in weights and weights[key].dim() < 2:
                return f"{key} {tuple(weights[key].shape)} is not a matrix"
    return None


def module_scale(weights: Mapping[str, torch.Tensor]) -> float:
    """The scale A1111 multiplies a module's delta by: `scale`, else `alpha / dim` when both known, else 1."""
    if "scale" in weights:
        return float(weights["scale"].item())
    algo = module_algorithm(weights)
    dim = None
    if algo == "lora":
        dim = weights["lora_down.weight"].shape[0]
    elif algo == "loha":
        dim = weights["hada_w1_b"].shape[0]
    else:
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in weights:
                dim = weights[k].shape[0]
    if dim is not None and "alpha" in weights:
        return float(weights["alpha"].item()) / dim
    return 1.0


def lora_layout(down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """kohya LoRA/LoCon tensors from peft's `lora_A.weight` (down) and `lora_B.weight` (up)."""
    import torch

    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(alpha))}


def loha_layout(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                alpha: float) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa tensors (peft uses the same names and shapes; A1111's scale alpha/r equals peft's)."""
    import torch

    return {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b,
            "alpha": torch.tensor(float(alpha))}


def lokr_layout(w1: torch.Tensor, w2: torch.Tensor, scale: float, weight_shape: tuple[int, ...],
                rank: int) -> dict[str, torch.Tensor]:
    """Full-matrix LoKr tensors whose A1111 delta is exactly `scale · kron(w1, w2)` (see the module docstring).

    `w2` may be the flattened conv factor [o2, i2·kh·kw] (peft's factored form); it is written as
    [o2, i2, kh, kw] like LyCORIS. `rank` becomes `alpha` (ignored by A1111 when no factor is stored).
    """
    import torch

    w1 = w1 * scale
    if len(weight_shape) == 4:
        o2, i2 = weight_shape[0] // w1.shape[0], weight_shape[1] // w1.shape[1]
        w2 = w2.reshape(o2, i2, *weight_shape[2:])
    return {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(float(rank))}


def lokr_full_factors(weights: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2) as full matrices from any LoKr module layout (Tucker `lokr_t2` is not supported)."""
    if "lokr_t2" in weights:
        raise UserError("LoKr files with a Tucker core (lokr_t2) are not supported")
    w1 = weights["lokr_w1"] if "lokr_w1" in weights else weights["lokr_w1_a"] @ weights["lokr_w1_b"]
    if "lokr_w2" in weights:
        w2 = weights["lokr_w2"]
    else:
        w2 = weights["lokr_w2_a"] @ weights["lokr_w2_b"]
    return w1, w2


@dataclass
class KohyaNetwork:
    """A kohya/LyCORIS network file, grouped by module."""

    modules: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def algorithms(self) -> set[str]:
        return {module_algorithm(w) for w in self.modules.values()}


def import_kohya(path: str | Path) -> KohyaNetwork:
    """Read a kohya-layout .safetensors network (ours or another trainer's) for resume and conversion.

    Tensors come back as float32 on the CPU, grouped per module; every module must be LoRA, LoHa or LoKr.
    Mapping onto adapters is `methods.lora.LoraMethod.load_weights`.
    """
    from .safetensors_io import read_header, read_safetensors

    # the layout is judged from the header's names before any tensor is read: a model checkpoint given by
    # mistake would otherwise be read whole (and copied to float32) only to be refused
    names = read_header(path).tensors
    if not names:
        raise UserError(f"{Path(path).name} holds no tensors")
    try:
        for name, leaves in group_modules(dict.fromkeys(names)).items():
            module_algorithm(leaves)
    except UserError as e:
        raise UserError(f"{Path(path).name} is not a LoRA / LyCORIS network file (a model checkpoint or an "
                        f"embedding?): {e}") from None
    tensors, metadata = read_safetensors(path)
    modules = {name: {k: v.float() for k, v in w.items()} for name, w in group_modules(tensors).items()}
    for name, weights in modules.items():
        try:
            problem = module_problem(weights)     # module_algorithm's UserError for an unknown layout
        except UserError as e:
            raise UserError(f"{Path(path).name}: module {name}: {e}") from None
        if problem:
            raise UserError(f"{Path(path).name}: module {name}: {problem}")
    return KohyaNetwork(modules, metadata, Path(path))


# ---- metadata --------------------------------------------------------------------------------------------
def as_metadata_value(value: Any) -> str:
    """A metadata value as kohya writes it: JSON for dicts/lists, `str()` for the rest (`True`, `(512, 512)`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _resolution_spec(value: str | None, family: str, prediction: str) -> str:
    """ModelSpec 'WxH' from kohya's `ss_resolution` ("(512, 512)", "512", "512,768"), else the family default."""
    nums = [int(n) for n in re.findall(r"\d+", value or "")]
    if len(nums) == 1:
        nums *= 2
    if len(nums) >= 2:
        return f"{nums[0]}x{nums[1]}"
    return MODELSPEC_RESOLUTION[(family, prediction)]


def kohya_value(value: Any) -> str:
    """A setting as kohya writes it into `ss_*`: `str()` of the value, "None" for an unset (None) one."""
    return str(value)


def model_name_value(info: Any) -> str | None:
    """`ss_sd_model_name`: kohya writes the base model file's name with its extension ("v1-5.safetensors")."""
    path = str(getattr(info, "path", "") or "")
    name = Path(path).name if path else str(getattr(info, "name", "") or "")
    return name or None


def clip_skip_value(clip_skip: int | None) -> str:
    """`ss_clip_skip`: kohya writes its `--clip_skip` argument, None (the last layer) unless skipping layers."""
    return str(clip_skip) if clip_skip and int(clip_skip) > 1 else "None"


def optimizer_value(optimizer: Any) -> str:
    """`ss_optimizer` as sd-scripts writes it: the optimizer's class path, then "(k=v,...)" for the constructor
    arguments that were set (kohya: its `--optimizer_args`; here: every hyper-parameter that differs from the
    class default, e.g. `torch.optim.sgd.SGD(momentum=0.9)`), the learning rate not counted."""
    import inspect

    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__name__}"
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return name
    args = []
    for key, value in getattr(optimizer, "defaults", {}).items():
        param = params.get(key)
        if key == "lr" or param is None or param.default is inspect.Parameter.empty:
            continue
        try:
            same = bool(value == param.default)
        except Exception:  # noqa: BLE001 - a tensor or an odd value: count it as set
            same = False
        if not same:
            args.append(f"{key}={value}")
    return name + (f"({','.join(args)})" if args else "")


def network_metadata(*, family: str, prediction: str, network_module: str, network_dim: int,
                     network_alpha: float, network_args: Mapping[str, Any] | None = None,
                     network_dropout: float | None = None, extra: Mapping[str, Any] | None = None,
                     started_at: float | None = None, finished_at: float | None = None,
                     implementation_version: str = "") -> dict[str, str]:
    """All metadata of a network file except the `sshs_*` hashes (added when the file is written).

    `extra` (e.g. the loop's run info: `ss_output_name`, `ss_steps`, `ss_tag_frequency`, `lab.config`, ...) is
    merged in; dict/list values become JSON and `None` values are left out. Keys that describe the tensors
    (`NETWORK_KEYS`) always come from the arguments.
    """
    import time

    if (family, prediction) not in BASE_MODEL_VERSION:
        raise ValueError(f"unknown family/prediction {family}/{prediction}")
    now = time.time()
    finished = finished_at if finished_at is not None else now
    meta: dict[str, str] = {
        "ss_training_started_at": str(started_at if started_at is not None else finished),
        "ss_training_finished_at": str(finished),
    }
    for key, value in (extra or {}).items():
        if value is not None:
            meta[str(key)] = as_metadata_value(value)
    meta.update({
        "ss_network_module": network_module,
        "ss_network_dim": str(network_dim),
        "ss_network_alpha": str(float(network_alpha)),
        "ss_base_model_version": BASE_MODEL_VERSION[(family, prediction)],
        "ss_v2": str(family == "sd2"),
    })
    if network_args:
        meta["ss_network_args"] = json.dumps({k: as_metadata_value(v) for k, v in network_args.items()})
    meta["ss_network_dropout"] = str(network_dropout or None)     # kohya: "None" when not set
    # ModelSpec (sai_model_spec.build_metadata): MUST + the SHOULD/CAN fields we know.
    title = meta.get("modelspec.title") or meta.get("ss_output_name") or f"LoRA@{finished}"
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": MODELSPEC_ARCH[(family, prediction)] + "/lora",
        "modelspec.implementation": IMPL_SGM if family == "sdxl" else IMPL_DIFFUSERS,
        "modelspec.title": title,
        "modelspec.resolution": meta.get("modelspec.resolution")
        or _resolution_spec(meta.get("ss_resolution"), family, prediction),
        "modelspec.date": meta.get("modelspec.date")
        or datetime.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.prediction_type": "v" if prediction == "v" else "epsilon",
    }
    clip_skip = meta.get("ss_clip_skip")
    if clip_skip and clip_skip != "None":
        spec["modelspec.encoder_layer"] = clip_skip
    if implementation_version:
        spec["modelspec.implementation_version"] = implementation_version
    meta.update({k: v for k, v in spec.items() if k in NETWORK_KEYS or k not in meta})
    return meta
