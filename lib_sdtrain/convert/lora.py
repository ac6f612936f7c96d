"""diffusers / PEFT LoRA files → kohya LoRA files that A1111 v1.10's built-in Lora loads.

**Inputs** (one LoRA per input; a folder may hold several component files that make up one LoRA):
  - diffusers `pytorch_lora_weights.safetensors` (`StableDiffusion(XL)Pipeline.save_lora_weights`): keys
    `unet.<module>.lora_A.weight` / `lora_B.weight` (PEFT era) or `unet.<module>.lora.down.weight` / `.up`
    (diffusers 0.21–0.24 "LoRACompatible" layers), text encoders under `text_encoder.` / `text_encoder_2.`
    with `lora_A/B` or the old `lora_linear_layer.down/up`;
  - the oldest diffusers attention-processor layout (`...attn1.processor.to_q_lora.down.weight`);
  - PEFT's own `adapter_model.safetensors` (`PeftModel.save_pretrained`): keys `base_model.model.<module>.
    lora_A.weight`, one file per model, in a folder named after the component (`unet/`, `text_encoder/`,
    `text_encoder_2/`) or on its own (the component then follows from the module names).
  `.bin` files are read through the restricted unpickler only.

**Scale.** peft and diffusers add `B @ A · lora_alpha / r` (rsLoRA: `/ √r`); A1111 adds
`up @ down · alpha / dim` with dim = the down matrix's rank. So `lora_down = A`, `lora_up = B` and
`alpha = scale · rank` reproduce the delta exactly. The scale comes from, first to last: an `<module>.alpha`
tensor in the file; the `adapter_config.json` beside the weights (`lora_alpha`, `r`, `alpha_pattern`,
`rank_pattern`, `use_rslora`, as peft 0.13.2 matches patterns); the `lora_adapter_metadata` table newer
diffusers writes into the file; else 1 (alpha = rank), which is what diffusers applies to a file without
alphas. `--lora-alpha` overrides all of them.

**Names and family.** Module paths become kohya names exactly as `formats/kohya.py` names our own LoRAs
(SD1/SD2 UNet: diffusers paths; SDXL UNet: SGM paths; text encoders: HF CLIP paths under `lora_te` /
`lora_te1` / `lora_te2`). Every name is checked against the targets kohya's rule finds in the stock model
of the family (built on the meta device, no weights), so a name A1111 would silently skip is refused. The
family is the one stock model whose module shapes fit every tensor (cross-attention width 768 / 1024 / 2048,
text width 768 / 1024 / 768+1280); a LoRA for a non-stock-size model needs `--family`, and is then checked by
names only.

DoRA (`lora_magnitude_vector`), LoRA on embeddings, LoRA biases and non-LoRA PEFT adapters are refused with
the reason (A1111 v1.10 cannot apply them as trained). peft's DoRA scales each *output row* of W + ΔW to its
magnitude; A1111 v1.10's `dora_scale` scales each *input column* (`methods/dora.py`), and a per-row rescaling
cannot be written in that form, so no kohya file reproduces such an adapter. Training Lab's own DoRA
(network_type dora) is trained in A1111's convention and saved as a kohya file directly; kohya files (ours,
with or without `dora_scale`) are not inputs here: A1111 loads them as they are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .. import __version__
from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from ..events import Events
    from .output import ConvertResult

FAMILIES = ("sd1", "sd2", "sdxl")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin",
                "adapter_model.bin")
GENERIC_STEMS = {Path(n).stem for n in WEIGHT_NAMES}
CONFIG_NAME = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"          # newer diffusers: the LoraConfig(s) as JSON in the file
PEFT_PREFIX = "base_model.model."
LORA_SUFFIXES = (".safetensors", ".bin")

# leaf (what follows the module path) -> role; tried longest first
_LEAVES = {
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "lora_down.weight": "down", "lora_up.weight": "up",
    "alpha": "alpha",
}
_ADAPTER_LEAF = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[A-Za-z0-9_-]+)\.weight$")
# the attention-processor layout: `<attn>.processor.to_q_lora.down.weight` (UNet) / `<attn>.to_q_lora...` (text)
_PROCESSOR = re.compile(r"^(?P<attn>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
_UNET_PROC = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROC = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.",
               "add_embedding.", "conv_norm_out")
_DORA_WHY = ("peft's DoRA keeps its magnitude per output row, A1111 v1.10 applies DoRA's magnitude (dora_scale) "
             "per input column, and a per-row magnitude cannot be rewritten per column, so no kohya file gives "
             "the trained model in A1111. Train DoRA here with network_type dora, which uses A1111's convention")
# refusals by key content: (substring, message)
_REFUSED = [
    ("lora_magnitude_vector", f"it is a DoRA adapter: {_DORA_WHY}"),
    ("lora_embedding_A", "it has LoRA on embedding layers, which kohya files cannot hold"),
    ("lora_embedding_B", "it has LoRA on embedding layers, which kohya files cannot hold"),
    ("hada_w1_a", "it is a LoHa adapter (only LoRA is converted)"),
    ("lokr_w1", "it is a LoKr adapter (only LoRA is converted)"),
]
_OPENCLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


# ---- the stock targets -----------------------------------------------------------------------------------
def _text(hidden: int, layers: int, heads: int, act: str, proj: int | None = None) -> dict[str, Any]:
    return {"vocab_size": 49408, "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "max_position_embeddings": 77, "hidden_act": act,
            "projection_dim": proj or hidden, "layer_norm_eps": 1e-5, "eos_token_id": 2, "bos_token_id": 0,
            "pad_token_id": 1}


def stock_architecture(family: str):
    """The released SD1.5 / SD2.x / SDXL-base network configs (what `find_targets` walks to list valid names)."""
    from ..models.checkpoint import LATENT_SCALE, Architecture

    common = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
              "flip_sin_to_cos": True, "freq_shift": 0, "upcast_attention": False}
    if family in ("sd1", "sd2"):
        unet = {**common, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                "block_out_channels": [320, 640, 1280, 1280], "transformer_layers_per_block": [1, 1, 1, 1],
                "cross_attention_dim": 768 if family == "sd1" else 1024,
                "attention_head_dim": [8] * 4 if family == "sd1" else [5, 10, 20, 20],
                "use_linear_projection": family == "sd2"}
        text = [_text(768, 12, 12, "quick_gelu")] if family == "sd1" else [_text(1024, 24, 16, "gelu", 1024)]
    elif family == "sdxl":
        unet = {**common, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
                "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816}
        text = [_text(768, 12, 12, "quick_gelu"), _text(1280, 32, 20, "gelu", 1280)]
    else:
        raise UserError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return Architecture(family=family, unet=unet, text=text, latent_scale=LATENT_SCALE[family])


@functools.lru_cache(maxsize=None)
def stock_targets(family: str) -> dict[str, tuple[int, ...]]:
    """kohya name → weight shape of every module kohya's rule adapts in the stock model (all groups)."""
    from types import SimpleNamespace

    from ..formats.kohya import GROUPS
    from ..models.checkpoint import build_modules
    from ..models.targets import find_targets

    arch = stock_architecture(family)
    unet, _, encoders = build_modules(arch)       # meta device: shapes only, nothing allocated
    parts = SimpleNamespace(family=family, module_naming="diffusers", unet=unet, text_encoders=encoders)
    return {t.name: t.weight_shape for t in find_targets(parts, GROUPS)}


@functools.lru_cache(maxsize=None)
def _sdxl_unet_map():
    from ..models.ldm_unet import unet_prefix_map

    return unet_prefix_map(stock_architecture("sdxl").unet)


def kohya_name(family: str, component: str, path: str) -> str | None:
    """The kohya module name for a diffusers/HF module path of `component`, None if it cannot have one."""
    from ..formats.kohya import PREFIX_UNET, text_prefix

    if component == "unet":
        kpath = _sdxl_unet_map().a_to_b(path) if family == "sdxl" else path
        return None if kpath is None else f"{PREFIX_UNET}_{kpath.replace('.', '_')}"
    index = COMPONENTS.index(component) - 1
    count = 2 if family == "sdxl" else 1
    if index >= count or not path.startswith("text_model."):
        return None
    return f"{text_prefix(index, count)}_{path.replace('.', '_')}"


# ---- reading ---------------------------------------------------------------------------------------------
@dataclass
class LoraModule:
    """One adapted module as found in the input."""

    component: str
    path: str
    down: Any = None
    up: Any = None
    alpha: float | None = None          # an `.alpha` tensor in the file
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraSource:
    """A diffusers/PEFT LoRA read from one or more files (one per component at most)."""

    modules: dict[tuple[str, str], LoraModule]
    files: list[Path]
    layouts: set[str]
    configs: dict[str, dict[str, Any]]      # component ("" = every component) -> peft LoraConfig dict
    name: str


def find_lora_files(path: Path) -> list[tuple[Path, str | None]]:
    """(weight file, component or None) for an input file or folder; [] if it holds no diffusers/PEFT LoRA."""
    if path.is_file():
        comp = path.parent.name if path.parent.name in COMPONENTS else None
        return [(path, comp)]
    if not path.is_dir():
        return []
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return [(path / name, None)]
    out = []
    for comp in COMPONENTS:
        for name in WEIGHT_NAMES:
            if (path / comp / name).is_file():
                out.append((path / comp / name, comp))
                break
    return out


def _read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if path.suffix.lower() == ".safetensors":
        from ..formats.safetensors_io import read_safetensors

        return read_safetensors(path)
    if path.suffix.lower() == ".bin":
        from ..formats.safe_pickle import load_state_dict

        return load_state_dict(path), {}
    raise UserError(f"{path.name}: a LoRA must be a .safetensors or .bin file")


def _read_config(folder: Path) -> dict[str, Any] | None:
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path} is not a JSON object")
    return cfg


def _metadata_configs(metadata: dict[str, str], where: str) -> dict[str, dict[str, Any]]:
    """Configs from newer diffusers' `lora_adapter_metadata`: flat (`{"r": 4, ...}`) or `{"unet.r": 4, ...}`."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        table = json.loads(raw)
    except ValueError:
        raise UserError(f"{where}: its {METADATA_KEY} metadata is not JSON") from None
    out: dict[str, dict[str, Any]] = {}
    for key, value in (table or {}).items():
        comp, dot, rest = str(key).partition(".")
        if dot and comp in COMPONENTS:
            out.setdefault(comp, {})[rest] = value
        else:
            out.setdefault("", {})[str(key)] = value
    return out


def _infer_component(path: str) -> str | None:
    if path.startswith("text_model."):
        return "text_encoder"
    if path.startswith(_UNET_ROOTS):
        return "unet"
    return None


def parse_key(key: str, component: str | None) -> tuple[str, str, str, str] | None:
    """(component, module path, role "down"|"up"|"alpha", layout) of a diffusers/PEFT LoRA key, or None."""
    rest, layout = key, "diffusers"
    if rest.startswith(PEFT_PREFIX):
        rest, layout = rest[len(PEFT_PREFIX):], "peft"
    comp = component
    head, dot, tail = rest.partition(".")
    if dot and head in COMPONENTS:
        comp, rest = head, tail
        if rest.startswith(PEFT_PREFIX):
            rest = rest[len(PEFT_PREFIX):]
    m = _PROCESSOR.match(rest)
    if m:
        attn, proj, role = m.group("attn"), m.group("proj"), m.group("role")
        comp = comp or _infer_component(attn) or "unet"
        table = _TEXT_PROC if comp.startswith("text_encoder") else _UNET_PROC
        return comp, f"{attn}.{table[proj]}", role, "diffusers attention processors"
    for leaf in sorted(_LEAVES, key=len, reverse=True):
        if rest.endswith("." + leaf):
            path = rest[:-len(leaf) - 1]
            if leaf.startswith(("lora.", "lora_linear_layer.")):
                layout = "diffusers (pre-PEFT)"
            elif leaf.startswith("lora_down"):
                layout = "dotted kohya-style keys"
            break
    else:
        m = _ADAPTER_LEAF.match(rest)
        if not m:
            return None
        path, leaf = m.group("path"), f"lora_{m.group('ab')}.weight"
    comp = comp or _infer_component(path)
    if comp is None:
        return None
    return comp, path, _LEAVES[leaf], layout


def read_lora(path: str | Path) -> LoraSource:
    """Read a diffusers/PEFT LoRA (file or folder). Unknown keys and unsupported adapters raise UserError."""
    path = Path(path)
    found = find_lora_files(path)
    if not found:
        raise UserError(f"{path.name}: no LoRA weights found (expected a .safetensors/.bin file or a folder with "
                        f"{' / '.join(WEIGHT_NAMES[:2])}, or unet/ and text_encoder/ sub-folders holding them)")
    modules: dict[tuple[str, str], LoraModule] = {}
    layouts: set[str] = set()
    configs: dict[str, dict[str, Any]] = {}
    for file, comp in found:
        tensors, metadata = _read_tensors(file)
        if not tensors:
            raise UserError(f"{file.name} holds no tensors")
        for key_part, why in _REFUSED:
            if any(key_part in k for k in tensors):
                raise UserError(f"{file.name}: cannot convert: {why}")
        if any(k.startswith(("lora_unet_", "lora_te")) for k in tensors):
            raise UserError(f"{file.name} is already a kohya LoRA (A1111 loads it as it is)")
        cfg = _read_config(file.parent)
        for c, table in _metadata_configs(metadata, file.name).items():
            configs.setdefault(comp or c, table)
        if cfg is not None:
            configs[comp or ""] = cfg
        unknown = []
        for key, value in tensors.items():
            parsed = parse_key(key, comp)
            if parsed is None:
                unknown.append(key)
                continue
            c, p, role, layout = parsed
            layouts.add(layout)
            m = modules.setdefault((c, p), LoraModule(c, p))
            m.keys.append(key)
            if role == "alpha":
                m.alpha = float(value.float().item()) if value.numel() == 1 else None
                if m.alpha is None:
                    unknown.append(key)
            else:
                if getattr(m, role) is not None:
                    raise UserError(f"{file.name}: two {role} weights for {c}.{p} (files or adapters overlap)")
                setattr(m, role, value)
        if unknown:
            raise UserError(f"{file.name}: {len(unknown)} keys are not diffusers/PEFT LoRA weights, e.g. "
                            f"{', '.join(sorted(unknown)[:4])}")
    broken = [f"{c}.{p}" for (c, p), m in modules.items() if m.down is None or m.up is None]
    if broken:
        raise UserError(f"{path.name}: modules with only half of their LoRA pair: {', '.join(sorted(broken)[:4])}")
    for m in modules.values():
        if m.up.shape[1] != m.down.shape[0] or m.up.dim() not in (2, 4) or m.down.dim() not in (2, 4):
            raise UserError(f"{path.name}: {m.component}.{m.path}: down {tuple(m.down.shape)} and up "
                            f"{tuple(m.up.shape)} do not make a LoRA pair")
    name = path.stem if path.is_file() and path.stem not in GENERIC_STEMS else (
        path.name if path.is_dir() else path.parent.name)
    return LoraSource(modules, [f for f, _ in found], layouts, configs, name or "lora")


# ---- family ----------------------------------------------------------------------------------------------
def _weight_fits(m: LoraModule, shape: tuple[int, ...]) -> bool:
    """Whether down/up fit a stock weight of `shape` (a Linear-shaped pair also fits a 1×1 conv)."""
    if m.up.shape[0] != shape[0]:
        return False
    fan_in = math.prod(shape[1:])
    return math.prod(m.down.shape[1:]) == fan_in


def _cross_attention_width(source: LoraSource) -> int | None:
    for (comp, path), m in source.modules.items():
        if comp == "unet" and path.endswith("attn2.to_k"):
            return int(math.prod(m.down.shape[1:]))
    return None


def names_for(source: LoraSource, family: str) -> tuple[dict[tuple[str, str], str], list[str]]:
    """kohya name per module for `family`, and the modules (as written in the input) it has no valid name for."""
    valid = stock_targets(family)
    names, bad = {}, []
    for key, m in source.modules.items():
        name = kohya_name(family, m.component, m.path)
        if name is None or name not in valid:
            bad.append(f"{m.component}.{m.path}")
        else:
            names[key] = name
    return names, bad


def detect_family(source: LoraSource) -> str:
    """The stock family whose module names and shapes fit every tensor of `source`, else UserError."""
    fits, named, misses = [], [], {}
    for family in FAMILIES:
        names, bad = names_for(source, family)
        if bad:
            misses[family] = bad
            continue
        named.append(family)
        valid = stock_targets(family)
        if all(_weight_fits(source.modules[k], valid[n]) for k, n in names.items()):
            fits.append(family)
    comps = {m.component for m in source.modules.values()}
    if len(fits) > 1 and "text_encoder_2" not in comps and "unet" not in comps and "sd1" in fits:
        return "sd1"   # a CLIP-L-only text-encoder LoRA fits SD1 and SDXL's first encoder; SD1 is the common case
    if len(fits) == 1:
        return fits[0]
    width = _cross_attention_width(source)
    seen = f" (cross-attention width {width})" if width else ""
    if named:
        raise UserError(f"cannot tell the model family from the tensor shapes{seen}: they fit no stock SD1 / SD2 / "
                        f"SDXL model; give the family (--family {' or '.join(named)})")
    family, bad = min(misses.items(), key=lambda kv: len(kv[1]))
    if len(bad) < len(source.modules):
        raise UserError(f"{len(bad)} modules have no place in a LoRA A1111 loads (closest: {family}), e.g. "
                        f"{', '.join(sorted(bad)[:4])}")
    raise UserError("its module names fit no SD1 / SD2 / SDXL model (not a Stable Diffusion LoRA?)")


# ---- scale -----------------------------------------------------------------------------------------------
def _pattern_value(patterns: dict[str, Any], path: str) -> Any:
    """peft's pattern rule (0.13.2: `re.match(rf".*\\.{key}$", name)`; later versions also match a whole name)."""
    for key, value in (patterns or {}).items():
        try:
            if path == key or re.match(rf".*\.{key}$", path):
                return value
        except (re.error, TypeError):
            raise UserError(f"the adapter config's pattern {key!r} is not a valid module-name pattern; fix "
                            f"{CONFIG_NAME}") from None
    return None


def _config_number(value: Any, name: str, *, rank: bool = False) -> float:
    """A number of the adapter config (`lora_alpha`, `r` or a pattern's value), refused unless finite (and, for a
    rank, a whole number of 1 or more): a text or NaN there made a traceback or a LoRA of NaN."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (rank and (number < 1 or number != int(number))):
        raise UserError(f"the adapter config's {name} is {value!r}, not {'a rank (1, 2, ...)' if rank else 'a number'}"
                        f"; fix {CONFIG_NAME} or give --lora-alpha")
    return number


def _config_patterns(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    patterns = cfg.get(name) or {}
    if not isinstance(patterns, dict):
        raise UserError(f"the adapter config's {name} is {type(patterns).__name__}, not a mapping of module names; "
                        f"fix {CONFIG_NAME}")
    return patterns


def module_scale(m: LoraModule, cfg: dict[str, Any] | None) -> tuple[float, str]:
    """The factor peft/diffusers multiply this module's `B @ A` by, and where it came from."""
    if m.alpha is not None:
        if not math.isfinite(m.alpha):
            raise UserError(f"{m.component}.{m.path}: its alpha tensor is {m.alpha}; the file is damaged (give "
                            "--lora-alpha to replace every alpha)")
        return m.alpha / m.rank, "alpha tensors in the file"
    if not cfg:
        return 1.0, "no alpha given: scale 1 (alpha = rank), as diffusers applies it"
    alpha = _pattern_value(_config_patterns(cfg, "alpha_pattern"), m.path)
    alpha = _config_number(alpha if alpha is not None else cfg.get("lora_alpha", cfg.get("r", m.rank)),
                           "lora_alpha" if alpha is None else f"alpha_pattern value for {m.path}")
    r = _pattern_value(_config_patterns(cfg, "rank_pattern"), m.path)
    r = int(_config_number(r if r is not None else cfg.get("r", m.rank),
                           "r" if r is None else f"rank_pattern value for {m.path}", rank=True))
    if r != m.rank:
        raise UserError(f"{m.component}.{m.path}: the adapter config says rank {r} but the weights have rank "
                        f"{m.rank}; the config does not belong to these weights")
    if cfg.get("use_rslora"):
        return alpha / math.sqrt(r), "adapter config (rsLoRA: lora_alpha / sqrt(r))"
    return alpha / r, "adapter config (lora_alpha / r)"


def _check_config(cfg: dict[str, Any], where: str) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UserError(f"{where}: a {peft_type} adapter; only LoRA adapters are converted")
    if cfg.get("use_dora"):
        raise UserError(f"{where}: cannot convert: it is a DoRA adapter: {_DORA_WHY}")
    if cfg.get("fan_in_fan_out"):
        raise UserError(f"{where}: fan_in_fan_out adapters (GPT-2 style Conv1D) are not Stable Diffusion LoRAs")
    if cfg.get("lora_bias"):
        raise UserError(f"{where}: LoRA with trained biases cannot be written as a kohya file")


# ---- converting ------------------------------------------------------------------------------------------
@dataclass
class KohyaLora:
    tensors: dict[str, Any]
    metadata: dict[str, str]
    family: str
    warnings: list[str]
    summary: str


def _openclip_warnings(source: LoraSource, family: str) -> list[str]:
    """A1111 applies q/k/v on OpenCLIP encoders only when q, k, v and out_proj of a layer are all present."""
    which = {"sd2": "text_encoder", "sdxl": "text_encoder_2"}.get(family)
    layers: dict[str, set[str]] = {}
    for (comp, path) in source.modules:
        m = _OPENCLIP_LAYER.match(path)
        if comp == which and m:
            layers.setdefault(m.group(1), set()).add(m.group(2))
    partial = sorted((int(n) for n, got in layers.items() if got & {"q_proj", "k_proj", "v_proj"}
                      and got != {"q_proj", "k_proj", "v_proj", "out_proj"}))
    if not partial:
        return []
    return [f"{which} layers {partial[:6]} have only some of q/k/v/out_proj: A1111 applies q, k, v on this "
            "encoder only when all four are present, so those parts will have no effect"]


# the largest alpha a float32 alpha tensor holds (A1111 reads the file's float32 `alpha`); beyond it the file says inf
MAX_LORA_ALPHA = 3.4028234663852886e38


def check_lora_alpha(value: float) -> float:
    """A LoRA alpha given by hand (--lora-alpha, the Convert tab), refused unless a positive number that the file's
    float32 `alpha` tensor holds: NaN or inf makes every module NaN or infinite in A1111, 0 switches the LoRA off
    there (kohya reads 0 as "alpha = rank" instead), a negative one turns every change round, and a value past
    float32's range was written as inf."""
    alpha = float(value)
    if not math.isfinite(alpha):
        raise UserError(f"LoRA alpha {value} is not a finite number: every module of the LoRA would be NaN or "
                        "infinite in A1111")
    if alpha <= 0:
        raise UserError(f"LoRA alpha {value} must be more than 0: A1111 scales every change by alpha / rank, so 0 "
                        "switches the LoRA off and a negative alpha turns it round (use a negative LoRA weight in "
                        "the prompt for that)")
    if alpha > MAX_LORA_ALPHA:
        raise UserError(f"LoRA alpha {value} is beyond what the file's float32 alpha holds (at most 3.4e38)")
    return alpha


def to_kohya(source: LoraSource, *, family: str | None = None, prediction: str | None = None,
             lora_alpha: float | None = None, dtype: str | None = None,
             extra_metadata: dict[str, str] | None = None) -> KohyaLora:
    """kohya tensors + metadata for `source` (see the module docstring)."""
    import torch

    from ..formats import kohya
    from .output import DTYPES

    if lora_alpha is not None:
        check_lora_alpha(lora_alpha)
    for comp, cfg in source.configs.items():
        _check_config(cfg, f"{source.name} ({comp or 'adapter'} config)")
    if family is None:
        family = detect_family(source)
    elif family not in FAMILIES:
        raise UserError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    names, bad = names_for(source, family)
    if bad:
        raise UserError(f"{source.name}: {len(bad)} modules have no place in a {family} LoRA that A1111 loads, "
                        f"e.g. {', '.join(sorted(bad)[:4])}")
    prediction = prediction or ("v" if family == "sd2" else "eps")
    target = getattr(torch, DTYPES[dtype]) if dtype else None
    tensors: dict[str, Any] = {}
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    scale_sources: set[str] = set()
    for key in sorted(names, key=lambda k: names[k]):
        m, name = source.modules[key], names[key]
        if lora_alpha is not None:
            scale, where = float(lora_alpha) / m.rank, "given on the command line (lora_alpha / rank)"
        else:
            cfg = source.configs.get(m.component) or source.configs.get("")
            scale, where = module_scale(m, cfg)
        scale_sources.add(where)
        alpha = scale * m.rank
        down, up = m.down.detach(), m.up.detach()
        if target is not None:
            down, up = down.to(target), up.to(target)
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        ranks[m.rank] += 1
        alphas[alpha] += 1
    dim, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    extra: dict[str, Any] = {"ss_output_name": source.name, "ss_training_comment":
                             f"converted from a diffusers/PEFT LoRA by Training Lab {__version__}",
                             **(extra_metadata or {})}
    if len(ranks) > 1 or len(alphas) > 1:
        extra["lab.rank_alpha"] = {"ranks": {str(k): v for k, v in sorted(ranks.items())},
                                   "alphas": {repr(k): v for k, v in sorted(alphas.items())}}
    extra["converted_lora_scale_from"] = sorted(scale_sources)
    meta = kohya.network_metadata(family=family, prediction=prediction, network_module="networks.lora",
                                  network_dim=dim, network_alpha=alpha, extra=extra,
                                  implementation_version=f"Training Lab {__version__}")
    comps = Counter(m.component for m in source.modules.values())
    summary = f"{len(names)} modules ({', '.join(f'{n} {c}' for c, n in sorted(comps.items()))}), {family}, " \
              f"rank {dim}, alpha {alpha:g}"
    warnings = _openclip_warnings(source, family)
    broken = sorted({name for key, name in names.items()
                     if not all(bool(torch.isfinite(t).all()) for t in (source.modules[key].down, source.modules[key].up))})
    if broken:   # converted as it is (a conversion changes no number), but the user should know before using it
        warnings.append(f"{len(broken)} modules hold NaN or infinite weights (e.g. {broken[0]}): the file is "
                        "damaged or its training diverged, and A1111 will draw black or noise with it")
    return KohyaLora(tensors, meta, family, warnings, summary)


def source_sha256(files: Iterable[Path]) -> str:
    """sha256 of the one input file, or of the list of `name sha256` lines for a multi-file LoRA."""
    from ..formats.hashes import sha256_file

    files = list(files)
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.parent.name}/{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def lora_hashes(path: Path) -> dict[str, str]:
    """What A1111 shows for a LoRA: the addnet hash (its first 12 hex = shorthash) and the file's sha256."""
    from ..formats.hashes import addnet_hash, sha256_file

    addnet = addnet_hash(path)
    return {"sha256": sha256_file(path), "addnet_hash": addnet, "shorthash": addnet[:12]}


def looks_like_diffusers_lora(path: str | Path) -> bool:
    """Cheap test (key names only) whether `path` is a diffusers/PEFT LoRA file or folder."""
    path = Path(path)
    found = find_lora_files(path)
    if not found:
        return False
    file = found[0][0]
    if file.suffix.lower() != ".safetensors":
        return file.name in WEIGHT_NAMES
    from ..formats.safetensors_io import read_header

    try:
        keys = list(read_header(file).tensors)
    except UserError:  # unreadable: not ours to claim
        return False
    hits = sum(parse_key(k, found[0][1]) is not None for k in keys[:200])
    return bool(keys) and hits == min(len(keys), 200)


def output_name(path: str | Path) -> str:
    """File name of the kohya output for input `path` (generic diffusers/PEFT file names use the folder's name)."""
    path = Path(path)
    if path.is_file() and path.stem not in GENERIC_STEMS:
        stem = path.stem
    elif path.is_file():
        stem = path.parent.name if path.parent.name not in COMPONENTS else path.parent.parent.name
    else:
        stem = path.name
    return f"{stem or 'lora'}.safetensors"


def convert_lora(path: str | Path, out_path: str | Path, *, family: str | None = None,
                 prediction: str | None = None, lora_alpha: float | None = None, dtype: str | None = None,
                 overwrite: bool = False, events: Events | None = None) -> ConvertResult:
    """Convert one diffusers/PEFT LoRA to a kohya `.safetensors` (verified, atomic); UserError when refused."""
    from ..events import Events as _Events
    from ..formats.safetensors_io import kohya_hashes
    from .output import ConvertResult, write_verified

    events = events or _Events()
    path, out_path = Path(path), Path(out_path)
    if out_path.exists() and not overwrite:
        raise UserError(f"{out_path.name} already exists (use --overwrite to replace it)")
    events.status(f"{path.name}: reading LoRA")
    source = read_lora(path)
    if any(out_path.resolve() == f.resolve() for f in source.files):
        raise UserError(f"{path.name}: output would replace the input")
    sha = source_sha256(source.files)
    extra = {"converted_by": f"Training Lab {__version__} convert", "converted_kind": "lora",
             "converted_from": ", ".join(f.relative_to(path).as_posix() if path.is_dir() else f.name
                                         for f in source.files),
             "converted_from_sha256": sha,
             "converted_from_format": ", ".join(sorted(source.layouts)),
             "converted_dtype": dtype or "unchanged"}
    result = to_kohya(source, family=family, prediction=prediction, lora_alpha=lora_alpha, dtype=dtype,
                      extra_metadata=extra)
    meta = dict(result.metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(result.tensors, meta)
    events.status(f"{path.name}: writing {out_path.name}")
    write_verified(out_path, result.tensors, meta, overwrite=overwrite)
    hashes = lora_hashes(out_path)
    events.saved(str(out_path), file_kind="lora", **hashes)
    return ConvertResult(path, "converted", "lora", out_path, message=result.summary, hashes=hashes,
                         warnings=result.warnings)
