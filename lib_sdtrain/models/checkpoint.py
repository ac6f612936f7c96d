"""Single-file SD1 / SD2 / SDXL checkpoints ↔ diffusers and transformers modules, fully offline.

`load_checkpoint(path)` reads an A1111-style `.safetensors` (or, through the safe unpickler, a `.ckpt`),
detects the family, derives each network's config from the tensor shapes plus hints (metadata, `.yaml`),
builds the modules with empty weights and assigns the file's tensors to them. Every tensor the modules do not
hold (schedule buffers, `position_ids`, `logit_scale`, EMA copies, ...) is kept in `extras`, and each key's
dtype is remembered, so `save_checkpoint` writes back the same keys, shapes and dtypes: an unchanged model
round-trips tensor for tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..formats.names import unsupported_model_file
from . import detect, ldm_text, ldm_unet, ldm_vae
from .schedule import ldm_schedule_buffers, sgm_sigmas

LATENT_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
POSITION_IDS = {"sd1": ["cond_stage_model.transformer.text_model.embeddings.position_ids"],
                "sdxl": ["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]}


@dataclass
class Architecture:
    """Everything needed to build the networks of a checkpoint (saved as `lab.architecture` metadata)."""

    family: str
    prediction: str = "eps"
    unet: dict[str, Any] = field(default_factory=dict)     # diffusers UNet2DConditionModel config
    vae: dict[str, Any] = field(default_factory=dict)      # diffusers AutoencoderKL config
    text: list[dict[str, Any]] = field(default_factory=list)  # transformers CLIPTextConfig kwargs per encoder
    latent_scale: float = 0.18215

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        from ..formats.safetensors_io import json_table

        data = json_table(text)
        try:
            return cls(**data) if data is not None else None
        except TypeError:
            data = None
        finally:
            if data is None:
                raise UserError("the file's architecture metadata (lab.architecture) is not understood")


@dataclass
class LoadedCheckpoint:
    arch: Architecture
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)   # where facts the weights cannot tell came from (`info`)


# ---- reading ---------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a checkpoint file. Pickled formats only through the safe loader."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from ..formats.safetensors_io import read_safetensors

        return read_safetensors(path)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            from ..formats.safe_pickle import load_state_dict
        except ImportError:
            raise UserError(f"{path.name}: pickled checkpoints are read only through the safe converter; "
                            "convert it to .safetensors first") from None
        return load_state_dict(path), {}
    raise unsupported_model_file(path)


def _shapes(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}


def architecture_from_state_dict(sd: dict[str, torch.Tensor], hints: dict[str, Any] | None = None) -> Architecture:
    """Family, prediction type and network configs from tensor shapes, refined by `hints`. Only the keys and the
    values' `.shape` are read, so header entries (a safetensors `TensorEntry`, a pickle's `LazyTensor`) do too."""
    hints = dict(hints or {})
    family = detect.detect_family(sd)
    if hints.get("family") not in (None, family):
        raise UserError(f"metadata says {hints['family']} but the weights are {family}")
    unet_shapes = _shapes(sd, ldm_unet.PREFIX)
    if unet_shapes["input_blocks.0.0.weight"][1] != 4:
        raise UserError(f"UNet with {unet_shapes['input_blocks.0.0.weight'][1]} input channels (inpainting or "
                        "instruct model): only standard 4-channel models can be trained")
    vae_shapes = _shapes(sd, ldm_vae.PREFIX)
    if "decoder.conv_in.weight" not in vae_shapes or "encoder.conv_in.weight" not in vae_shapes:
        raise UserError("the checkpoint has no VAE (first_stage_model.* weights): training needs one; use a file "
                        "with its VAE baked in")
    unet_hints = detect.unet_hints(hints)
    vae_hints = {**hints, **{k: v for k, v in hints.get("vae", {}).items() if k in ("sample_size",)}}
    if "scaling_factor" in hints.get("vae", {}):
        vae_hints.setdefault("scale_factor", hints["vae"]["scaling_factor"])
    text_hints = hints.get("text") or []
    text = []
    what = "UNet"
    try:   # a damaged file lacks a tensor the shapes are read from: name it instead of a KeyError
        for i, prefix in enumerate(ldm_text.PREFIXES[family]):
            what = f"text encoder {i + 1}"
            openclip = ldm_text.is_openclip(family, i)
            th = text_hints[i] if i < len(text_hints) else {}
            text.append(ldm_text.text_config_from_ldm(_shapes(sd, prefix), openclip, th))
        what = "UNet"
        if family == "sdxl" and "addition_time_embed_dim" not in unet_hints:
            unet_hints["addition_time_embed_dim"] = _sdxl_time_embed_dim(unet_shapes, text[1]["projection_dim"])
        unet = ldm_unet.unet_config_from_ldm(unet_shapes, family, unet_hints)
        what = "VAE"
        vae = ldm_vae.vae_config_from_ldm(vae_shapes, family, vae_hints)
    except (KeyError, StopIteration, IndexError) as e:
        detail = f": no {e.args[0]}" if isinstance(e, KeyError) and e.args else ""
        raise UserError(f"{what} weights are incomplete, the architecture cannot be read from them{detail}") from None
    prediction = hints.get("prediction") or ("v" if "v_pred" in sd else "eps")
    return Architecture(
        family=family,
        prediction=prediction,
        unet=unet,
        vae=vae,
        text=text,
        latent_scale=float(hints.get("latent_scale", hints.get("scale_factor", LATENT_SCALE[family]))),
    )


def _sdxl_time_embed_dim(unet_shapes: dict[str, tuple[int, ...]], pooled: int) -> int:
    """Width of each of SDXL's six size/crop embeddings: the UNet's `label_emb` takes the second text encoder's
    pooled output (`pooled` wide) and the six together (stock: 2816 = 1280 + 6 × 256)."""
    label_in = unet_shapes["label_emb.0.0.weight"][1]
    rest = label_in - pooled
    if rest <= 0 or rest % 6:
        raise UserError(f"SDXL UNet's size conditioning takes {label_in} inputs, which does not fit text encoder "
                        f"2's {pooled}-wide pooled output plus six size/crop embeddings")
    return rest // 6


def build_modules(arch: Architecture, *, empty: bool = True) -> tuple[torch.nn.Module, torch.nn.Module, list]:
    """The UNet, VAE and text encoders for `arch`; with `empty`, parameters live on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def make():
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
        encoders = []
        for i, cfg in enumerate(arch.text):
            config = CLIPTextConfig(**cfg)
            # torch 2.13's CPU scaled-dot-product attention returns NaN for some batch sizes (4, 5, 64 ...) with
            # CLIP's causal mask; the eager attention is exact and costs little at 77 tokens.
            config._attn_implementation = "eager"
            cls = CLIPTextModelWithProjection if ldm_text.is_openclip(arch.family, i) else CLIPTextModel
            encoders.append(cls(config))
        return unet, vae, encoders

    if empty:
        with init_empty_weights(include_buffers=False):
            return make()
    return make()


TEXT_PARTS = ("text_encoder", "text_encoder_2")


def key_parts(keys, arch: Architecture) -> dict[str, str]:
    """Which network each checkpoint key loads into: "unet", "vae", "text_encoder", "text_encoder_2", or ""
    (an extra tensor the modules do not hold). UserError for a UNet key the detected layout has no place for.
    Keys alone decide, so a file's header tells what `_split` does with its tensors."""
    unet_map, vae_map = ldm_unet.unet_prefix_map(arch.unet), ldm_vae.vae_prefix_map(arch.vae)
    text_prefixes = ldm_text.PREFIXES[arch.family]
    parts, unknown_unet = {}, []
    for key in keys:
        part = ""
        if key.startswith(ldm_unet.PREFIX):
            if unet_map.b_to_a(key[len(ldm_unet.PREFIX):]):
                part = "unet"
            else:   # a UNet weight the detected layout has no place for: the file is not the model we would build
                unknown_unet.append(key)
        elif key.startswith(ldm_vae.PREFIX) and vae_map.b_to_a(key[len(ldm_vae.PREFIX):]):
            part = "vae"
        else:
            i = next((n for n, p in enumerate(text_prefixes) if key.startswith(p)), None)
            weight = i is not None and not key.endswith("position_ids") and (
                not ldm_text.is_openclip(arch.family, i) or ldm_text.openclip_is_weight(key[len(text_prefixes[i]):]))
            part = TEXT_PARTS[i] if weight else ""
        parts[key] = part
    if unknown_unet:
        raise UserError(f"UNet weights do not fit the detected architecture: {len(unknown_unet)} unexpected "
                        f"(e.g. {unknown_unet[:2]})")
    return parts


def build_unet(arch: Architecture, *, empty: bool = True) -> torch.nn.Module:
    """The UNet alone (what SD2's prediction test runs); with `empty`, its parameters live on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    if empty:
        with init_empty_weights(include_buffers=False):
            return UNet2DConditionModel(**arch.unet)
    return UNet2DConditionModel(**arch.unet)


def _split(sd: dict[str, torch.Tensor], arch: Architecture):
    """Checkpoint tensors → (unet, vae, [text...]) state dicts in module layout, and the leftovers."""
    unet_map, vae_map = ldm_unet.unet_prefix_map(arch.unet), ldm_vae.vae_prefix_map(arch.vae)
    unet_sd, vae_sd, extras = {}, {}, {}
    text_prefixes = ldm_text.PREFIXES[arch.family]
    text_raw: list[dict[str, torch.Tensor]] = [{} for _ in text_prefixes]
    for key, part in key_parts(sd, arch).items():
        value = sd[key]
        if part == "unet":
            unet_sd[unet_map.b_to_a(key[len(ldm_unet.PREFIX):])] = value
        elif part == "vae":
            name = vae_map.b_to_a(key[len(ldm_vae.PREFIX):])
            if ldm_vae.ATTN_LINEAR.match(name) and value.dim() == 4:
                value = value.reshape(value.shape[0], value.shape[1])
            vae_sd[name] = value
        elif (i := next((n for n, p in enumerate(text_prefixes) if key.startswith(p)), None)) is not None \
                and not key.endswith("position_ids"):   # with an OpenCLIP encoder's leftovers: openclip_to_hf's
            text_raw[i][key[len(text_prefixes[i]):]] = value
        else:
            extras[key] = value
    text_sds = []
    for i, raw in enumerate(text_raw):
        if ldm_text.is_openclip(arch.family, i):
            hf, rest = ldm_text.openclip_to_hf(raw)
            extras.update({text_prefixes[i] + k: v for k, v in rest.items()})
            text_sds.append(hf)
        else:
            text_sds.append(raw)
    return unet_sd, vae_sd, text_sds, extras


def assign_state(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load `sd` into `module` (built empty), strictly and by assignment; UserError when the keys do not fit."""
    own = module.state_dict()
    expected = set(own)
    # transformers < 4.31 (A1111 v1.10 pins 4.30.2) saves CLIP's position_ids as a persistent buffer; `_split` sets
    # the file's copy aside (some checkpoints carry damaged ones), so the module's own 0..76 stands in for it
    sd = {**{k: own[k] for k in expected - set(sd) if k.endswith("position_ids") and own[k].device.type != "meta"},
          **sd}
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise UserError(f"{what} weights do not fit the detected architecture: "
                        f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                        f"(e.g. {unexpected[:2]})")
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise UserError(f"{what} weights do not fit the detected architecture: {str(e).splitlines()[0]}") from None


def load_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    prediction: str | None = None) -> LoadedCheckpoint:
    """Load a single-file checkpoint into diffusers/transformers modules (eval mode, no grad)."""
    path = Path(path)
    sd, metadata = read_state_dict(path)
    hints = _Hints(path, metadata, prediction)
    arch = architecture_from_state_dict(sd, hints.all)
    loaded = load_from_state_dict(sd, arch, dtype=dtype, device=device)
    loaded.metadata, loaded.path = metadata, path
    if hints.needs_sd2_test(arch):
        arch.prediction = probe_v_prediction(loaded.unet)
    loaded.sources = hints.sources(arch, "v_pred" in sd)
    return loaded


class _Hints:
    """The facts the weights cannot tell, from a `.yaml` beside the file, its metadata and the caller, and what
    `info` says each came from."""

    def __init__(self, path: Path, metadata: dict[str, str], prediction: str | None) -> None:
        self.yaml, self.meta, self.metadata, self.given = (detect.read_yaml_hints(path),
                                                           detect.read_metadata_hints(metadata), metadata, prediction)
        self.all = {**self.yaml, **self.meta}
        if prediction:
            self.all["prediction"] = prediction

    def needs_sd2_test(self, arch: Architecture) -> bool:
        """SD2 with nothing saying its prediction type: A1111 runs the UNet once to tell (`probe_v_prediction`)."""
        return arch.family == "sd2" and "prediction" not in self.all

    def sources(self, arch: Architecture, v_pred_key: bool) -> dict[str, str]:
        if self.given:
            said = "given (override)"
        elif "prediction" in self.meta:
            from ..formats.safetensors_io import json_table

            ours = "prediction" in (json_table(self.metadata.get(detect.ARCH_KEY)) or {})
            said = f"the file's {'lab.architecture' if ours else 'modelspec.prediction_type'} metadata"
        elif "prediction" in self.yaml:
            said = f"{Path(self.yaml.get('source', '')).name} beside the file"
        elif arch.family == "sd2":
            said = "A1111's SD2 test on the weights (the output at t = 999 on a flat input)"
        else:
            said = "the file's v_pred key" if v_pred_key else f"{arch.family.upper()}'s default"
        return {"prediction": said, "heads": ldm_unet.heads_source(arch.family, detect.unet_hints(self.all))}


# ---- describing a checkpoint from its header ---------------------------------------------------------------------
# safetensors dtype codes → torch dtype names, for the floating ones (what `info` lists)
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass
class CheckpointHeader:
    """What a checkpoint is, read from its header (tensor names, shapes, dtypes, metadata) without its weights:
    the architecture `load_checkpoint` would build, each network's parameter count, the floating dtypes, the
    extra tensors and where the facts the weights cannot tell came from (`sources`)."""

    path: Path
    arch: Architecture
    parameters: dict[str, int]                # "unet", "vae", "text_encoder"[, "text_encoder_2"] → count
    dtypes: list[str]                         # floating dtypes of the tensors, sorted torch names
    extras: int                               # tensors no network holds (schedule buffers, EMA copies ...)
    sources: dict[str, str] = field(default_factory=dict)


def _tensor_entries(path: Path) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """({key: entry with .shape}, {key: floating dtype name}, metadata) of the tensors `read_state_dict` would
    return, from the .safetensors header or the pickled structure (no tensor bytes read)."""
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from ..formats.safetensors_io import read_header

        header = read_header(path)
        floats = {k: FLOAT_DTYPES[e.dtype] for k, e in header.tensors.items() if e.dtype in FLOAT_DTYPES}
        return header.tensors, floats, header.metadata
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        from ..formats.safe_pickle import EMA_PREFIX, find_state_dict, open_checkpoint
        from ..formats.unpickler import LazyTensor

        with open_checkpoint(path) as archive:
            try:
                sd = find_state_dict(archive.root)
            except UserError as e:
                raise UserError(f"{path.name}: {e}") from None
            entries = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, LazyTensor)
                       and not k.startswith(EMA_PREFIX)}     # as `load_state_dict` leaves them out
        if not entries:
            raise UserError(f"{path.name}: no tensors found in its state dict")
        floats = {k: str(v.dtype).replace("torch.", "") for k, v in entries.items() if v.dtype.is_floating_point}
        return entries, floats, {}
    raise unsupported_model_file(path)


def _read_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors named `keys` and no others (safetensors by name; a pickled file through the safe unpickler)."""
    if path.suffix.lower() == ".safetensors":
        from ..formats.safetensors_io import read_safetensors

        return read_safetensors(path, keys)[0]
    from ..formats.safe_pickle import find_state_dict, load_tensor, open_checkpoint

    with open_checkpoint(path) as archive:
        sd = find_state_dict(archive.root)
        return {k: load_tensor(path, sd[k]) for k in keys}


def read_checkpoint_header(path: str | Path, prediction: str | None = None,
                           tested: str | None = None) -> CheckpointHeader:
    """Describe a single-file checkpoint from its header, as `load_checkpoint` would see it, without building its
    modules or reading its weights; the same UserErrors for a file that is not a usable checkpoint.

    The one fact that needs weights: an SD2 file with nothing saying its prediction type (metadata, a .yaml,
    `prediction`) gets A1111's test, which runs the UNet once, so that UNet alone is built and its weights read;
    `tested` is that test's answer when the caller has it already (it loaded the model), so it is not run twice.
    Unlike `load_checkpoint`, a tensor missing inside a block or of the wrong shape is not noticed here (the
    modules are not built to compare against)."""
    path = Path(path)
    entries, floats, metadata = _tensor_entries(path)
    hints = _Hints(path, metadata, prediction)
    arch = architecture_from_state_dict(entries, hints.all)
    parts = key_parts(entries, arch)
    parameters = {"unet": 0, "vae": 0, **{name: 0 for name in TEXT_PARTS[:len(arch.text)]}}
    for key, part in parts.items():
        if part:
            parameters[part] += math.prod(entries[key].shape)
    if hints.needs_sd2_test(arch):
        if tested is not None:                     # the caller ran A1111's test on the model it loaded
            arch.prediction = tested
        else:
            unet_map = ldm_unet.unet_prefix_map(arch.unet)
            weights = _read_tensors(path, [k for k, p in parts.items() if p == "unet"])
            unet = build_unet(arch)
            assign_state(unet, {unet_map.b_to_a(k[len(ldm_unet.PREFIX):]): v for k, v in weights.items()}, "UNet")
            arch.prediction = probe_v_prediction(unet.requires_grad_(False).eval())
            del unet, weights
    return CheckpointHeader(path, arch, parameters, sorted(set(floats.values())),
                            extras=sum(1 for p in parts.values() if not p),
                            sources=hints.sources(arch, "v_pred" in entries))


def load_from_state_dict(sd: dict[str, torch.Tensor], arch: Architecture, *, dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu") -> LoadedCheckpoint:
    dtypes = {k: v.dtype for k, v in sd.items()}
    unet_sd, vae_sd, text_sds, extras = _split(sd, arch)
    unet, vae, encoders = build_modules(arch)
    assign_state(unet, unet_sd, "UNet")
    assign_state(vae, vae_sd, "VAE")
    for i, (enc, tsd) in enumerate(zip(encoders, text_sds)):
        assign_state(enc, tsd, f"text encoder {i + 1}")
    for m in (unet, vae, *encoders):
        m.requires_grad_(False).eval()
        m.to(device=device, dtype=dtype) if dtype is not None else m.to(device=device)
    return LoadedCheckpoint(arch, unet, vae, encoders, extras, dtypes)


@torch.no_grad()
def probe_v_prediction(unet: torch.nn.Module) -> str:
    """A1111's test for SD2 768-v models: at t = 999 a v-model's output on a flat input lies far below it.

    Mirrors `sd_models_config.is_using_v_parameterization_for_sd2` (constant 0.5 latents and context).
    """
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    ctx = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=ctx).sample
    return "v" if (out - x).float().mean().item() < -1 else "eps"


# ---- writing ---------------------------------------------------------------------------------------
def ldm_state_dict(arch: Architecture, unet: torch.nn.Module, vae: torch.nn.Module, text_encoders: list,
                   extras: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The modules' weights under single-file LDM keys, with the buffers a stock checkpoint carries."""
    extras = dict(extras or {})
    out: dict[str, torch.Tensor] = {}
    unet_map, vae_map = ldm_unet.unet_prefix_map(arch.unet), ldm_vae.vae_prefix_map(arch.vae)
    for key, value in unet.state_dict().items():
        name = unet_map.a_to_b(key)
        if name is None:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[ldm_unet.PREFIX + name] = value
    for key, value in vae.state_dict().items():
        name = vae_map.a_to_b(key)
        if name is None:
            raise KeyError(f"no LDM name for VAE key {key}")
        if ldm_vae.ATTN_LINEAR.match(key):
            value = value.reshape(*value.shape, 1, 1)
        out[ldm_vae.PREFIX + name] = value
    for i, (prefix, enc) in enumerate(zip(ldm_text.PREFIXES[arch.family], text_encoders)):
        sd = {k: v for k, v in enc.state_dict().items() if not k.endswith("position_ids")}
        if ldm_text.is_openclip(arch.family, i):
            sd = ldm_text.hf_to_openclip(sd)
            extras.setdefault(prefix + "logit_scale", torch.tensor(4.6052, dtype=torch.float32))  # ln(100)
        out.update({prefix + k: v for k, v in sd.items()})
    for key in POSITION_IDS.get(arch.family, []):
        positions = arch.text[0]["max_position_embeddings"]
        extras.setdefault(key, torch.arange(positions, dtype=torch.int64)[None])
    if arch.family == "sdxl":
        extras.setdefault("denoiser.sigmas", sgm_sigmas())
    else:
        for k, v in ldm_schedule_buffers().items():
            extras.setdefault(k, v)
    for key, value in extras.items():
        out.setdefault(key, value)
    return out


_SCHEDULE_KEYS = set(ldm_schedule_buffers()) | {"denoiser.sigmas", "v_pred", "ztsnr"}


def _is_stock_extra(key: str, family: str) -> bool:
    """Extras a stock checkpoint carries (schedule buffers, text-encoder leftovers), unlike EMA copies."""
    return key in _SCHEDULE_KEYS or key.startswith(tuple(ldm_text.PREFIXES[family]))


def save_checkpoint(path: str | Path, loaded: LoadedCheckpoint, *, dtype: torch.dtype | None = None,
                    metadata: dict[str, str] | None = None, include_extras: bool = True,
                    overwrite: bool = False) -> Path:
    """Write `loaded` as a single-file `.safetensors` in A1111's layout (atomic; refuses to overwrite).

    Each tensor keeps the dtype it had in the source file unless `dtype` casts all floating tensors.
    `include_extras=False` drops unknown extras (EMA copies, ...), keeping the stock buffers.
    """
    from safetensors.torch import save_file

    from ..formats.files import atomic_write

    extras = loaded.extras if include_extras else {
        k: v for k, v in loaded.extras.items() if _is_stock_extra(k, loaded.arch.family)}
    sd = ldm_state_dict(loaded.arch, loaded.unet, loaded.vae, loaded.text_encoders, extras)
    tensors = {}
    seen: set[int] = set()
    for key, value in sd.items():
        value = value.detach().to("cpu")
        want = loaded.dtypes.get(key, value.dtype)
        if dtype is not None and value.is_floating_point():
            want = dtype
        value = value.to(want).contiguous()
        if value.data_ptr() in seen and value.numel():
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[key] = value
    meta = {**{k: v for k, v in loaded.metadata.items() if k != detect.ARCH_KEY}, **(metadata or {})}
    meta[detect.ARCH_KEY] = loaded.arch.to_json()
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta), overwrite=overwrite)
