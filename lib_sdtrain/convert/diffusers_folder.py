"""A diffusers model folder ↔ an A1111 single-file checkpoint, for SD1, SD2 and SDXL (base), offline.

**Folder → file.** The folder's `unet/`, `vae/`, `text_encoder/` (and `text_encoder_2/`) weights
(`.safetensors`, sharded or not, fp16 variants, or `.bin` through the restricted unpickler) are checked
against the networks their `config.json` describes (built on the meta device), renamed to the LDM/SGM keys
by the loader's own golden-checked tables (`models.checkpoint.ldm_state_dict`) and written atomically,
verified, never over an existing file. The family comes from `model_index.json` and the configs (or
`--family`); v-prediction from `scheduler/scheduler_config.json` (`prediction_type`).
A stock diffusers SD2 text encoder has 23 layers and no `text_projection`, while the single-file
OpenCLIP model has 24 layers and the projection; A1111 stops at the penultimate layer and never projects
for SD2, so the missing tensors are written as zeros (and said so in the metadata) only so that the file
loads.

**File → folder.** `models.checkpoint.load_checkpoint` builds the diffusers/transformers modules, which
are written with their own `save_pretrained`, plus `tokenizer/` (CLIP's `vocab.json` / `merges.txt` from the
BPE data the tokenizer module reads, no download), `scheduler/` and `model_index.json`, so
`StableDiffusionPipeline` / `StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)`
loads it. For SD2 the text encoder is saved as diffusers has it (`CLIPTextModel`, 23 layers). Whatever the
folder cannot hold (SD2's last text layer and projection, schedule buffers, EMA weights, the file's
metadata and per-tensor dtypes) goes into `training_lab_extras.safetensors` beside `model_index.json`,
which diffusers ignores and folder → file reads back, so file → folder → file gives the same keys, values
and dtypes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from ..events import Events
    from .output import ConvertResult

EXTRAS_NAME = "training_lab_extras.safetensors"
MODEL_INDEX = "model_index.json"
WEIGHT_FILES = {  # component -> (diffusers/transformers weight file stems, in order of preference)
    "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
    "text_encoder": "model", "text_encoder_2": "model",
}
PIPELINES = {"StableDiffusionPipeline": ("sd1", "sd2"), "StableDiffusionXLPipeline": ("sdxl",)}
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", "hidden_act", "projection_dim", "layer_norm_eps", "eos_token_id",
              "bos_token_id", "pad_token_id")
_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1}


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / MODEL_INDEX).is_file() or (path / "unet" / "config.json").is_file())


# what `file_to_folder` writes into its folder aside before renaming it into place
FOLDER_PARTS = frozenset({"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
                          MODEL_INDEX, EXTRAS_NAME})


def is_partial_folder(path: str | Path) -> bool:
    """Whether `path` holds nothing but what `file_to_folder` writes (a folder it was writing when it was
    stopped): only then may a cleaner remove it."""
    path = Path(path)
    try:
        return path.is_dir() and not path.is_symlink() and all(
            p.name in FOLDER_PARTS and not p.is_symlink() for p in path.iterdir())
    except OSError:
        return False


# ---- reading a folder ----------------------------------------------------------------------------------
def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path.parent.name}/{path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def json_table_or_empty(text: str) -> dict[str, str]:
    """Our extras' `lab.source_metadata` (a JSON table of text values); {} when damaged."""
    from ..formats.safetensors_io import json_table

    table = json_table(text) or {}
    return {str(k): v for k, v in table.items() if isinstance(v, str)}


def _load_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        from ..formats.safetensors_io import read_safetensors

        return read_safetensors(path)[0]
    from ..formats.safe_pickle import load_state_dict

    return load_state_dict(path)


def read_component_weights(folder: Path) -> tuple[dict[str, Any], list[Path]]:
    """The state dict of one component folder (single file, fp16 variant, sharded index, or pickled .bin)."""
    stem = WEIGHT_FILES.get(folder.name, "diffusion_pytorch_model")
    stems = [stem] + [s for s in ("diffusion_pytorch_model", "model") if s != stem]
    for s in stems:
        for variant in ("", ".fp16"):
            for ext in (".safetensors", ".bin"):
                single = folder / f"{s}{variant}{ext}"
                index = folder / f"{s}{variant}{ext}.index.json"
                if single.is_file():
                    return _load_file(single), [single]
                if index.is_file():
                    shards = sorted(set((_json(index).get("weight_map") or {}).values()))
                    if not shards:
                        raise UserError(f"{index} lists no weight files")
                    sd: dict[str, Any] = {}
                    files = []
                    for shard in shards:
                        if "/" in shard or "\\" in shard or shard.startswith("."):
                            raise UserError(f"{index}: shard name {shard!r} points outside the folder")
                        sd.update(_load_file(folder / shard))
                        files.append(folder / shard)
                    return sd, files
    raise UserError(f"{folder.parent.name}/{folder.name}: no weights ({stem}.safetensors or .bin)")


def _clean_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    from transformers import CLIPTextConfig

    defaults = CLIPTextConfig().to_dict()
    return {k: cfg.get(k, defaults.get(k)) for k in _TEXT_KEYS}


def _folder_family(folder: Path, index: dict[str, Any], unet_cfg: dict[str, Any], text_cfg: dict[str, Any] | None,
                   hint: str | None) -> str:
    cls = index.get("_class_name")
    if cls and cls not in PIPELINES:
        raise UserError(f"{folder.name}: a {cls} folder; only StableDiffusionPipeline (SD1/SD2) and "
                        "StableDiffusionXLPipeline (SDXL base) folders are converted")
    has_te2 = (folder / "text_encoder_2").is_dir()
    if has_te2 and not (folder / "text_encoder").is_dir():
        raise UserError(f"{folder.name}: SDXL refiner folders (text_encoder_2 only) are not supported")
    if hint:
        return hint
    if cls == "StableDiffusionXLPipeline" or has_te2 or unet_cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_cfg.get("cross_attention_dim") == 1024 or (text_cfg or {}).get("hidden_act") == "gelu":
        return "sd2"
    return "sd1"


class _Weights:
    """A state dict standing in for a module where only `state_dict()` is read (`ldm_state_dict`)."""

    def __init__(self, sd: dict[str, Any]) -> None:
        self._sd = sd

    def state_dict(self) -> dict[str, Any]:
        return dict(self._sd)


def _check_fits(module: Any, sd: dict[str, Any], what: str) -> None:
    """The folder's tensors have exactly the names and shapes of the network its config describes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        raise UserError(f"{what} weights do not fit its config.json: {len(missing)} missing (e.g. {missing[:2]}), "
                        f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong)} of another shape "
                        f"(e.g. {wrong[:2]})")


def _fix_old_vae_names(sd: dict[str, Any]) -> dict[str, Any]:
    """diffusers < 0.14 VAE attention names (query/key/value/proj_attn) → to_q/to_k/to_v/to_out.0."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if len(parts) >= 2 and "attentions" in parts and parts[-2] in _OLD_VAE_ATTN:
            parts[-2] = _OLD_VAE_ATTN[parts[-2]]
            key = ".".join(parts)
        out[key] = value
    return out


def _read_extras(folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
    path = folder / EXTRAS_NAME
    if not path.is_file():
        return {}, {}
    from ..formats.safetensors_io import read_safetensors

    tensors, meta = read_safetensors(path)
    return tensors, meta or {"lab.family": ""}


def _from_config(build, folder: Path, component: str):
    """`build()` (a network from a config.json, on the meta device), with a config value of the wrong kind (a text
    where a list of widths belongs, a missing field) refused by name instead of diffusers' or transformers' error."""
    try:
        return build()
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise UserError(f"{folder.name}: {component}/config.json describes no network that can be built: "
                        f"{str(e)[:300]}") from None


def folder_state_dict(folder: str | Path, *, family: str | None = None, prediction: str | None = None
                      ) -> tuple[dict[str, Any], dict[str, str], Any, list[str]]:
    """(single-file tensors, metadata, Architecture, notes) for a diffusers folder; nothing is written."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..models import detect, ldm_text
    from ..models.checkpoint import Architecture, ldm_state_dict

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    index = _json(folder / MODEL_INDEX) if (folder / MODEL_INDEX).is_file() else {}
    extras, extras_meta = _read_extras(folder)
    unet_cfg = _clean_config(_json(folder / "unet" / "config.json"))
    text_cfgs = [_json(folder / c / "config.json") for c in ("text_encoder", "text_encoder_2") if (folder / c).is_dir()]
    family = _folder_family(folder, index, unet_cfg, text_cfgs[0] if text_cfgs else None,
                            family or extras_meta.get("lab.family"))
    if unet_cfg.get("in_channels", 4) != 4:
        raise UserError(f"{folder.name}: a UNet with {unet_cfg.get('in_channels')} input channels (inpainting or "
                        "instruct model); only standard 4-channel models are converted")
    if len(text_cfgs) != len(ldm_text.PREFIXES[family]):
        raise UserError(f"{folder.name}: a {family} folder needs {len(ldm_text.PREFIXES[family])} text encoder(s), "
                        f"found {len(text_cfgs)}")
    vae_cfg = _clean_config(_json(folder / "vae" / "config.json"))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _json(sched_path) if sched_path.is_file() else {}
    pred = prediction or extras_meta.get("lab.prediction") or (
        "v" if sched.get("prediction_type") == "v_prediction" else "eps")

    notes: list[str] = []
    with init_empty_weights(include_buffers=False):
        unet_meta = _from_config(lambda: UNet2DConditionModel.from_config(unet_cfg), folder, "unet")
        vae_meta = _from_config(lambda: AutoencoderKL.from_config(vae_cfg), folder, "vae")
    unet_sd, _ = read_component_weights(folder / "unet")
    _check_fits(unet_meta, unet_sd, "UNet")
    vae_sd = _fix_old_vae_names(read_component_weights(folder / "vae")[0])
    _check_fits(vae_meta, vae_sd, "VAE")
    text_sds, text_arch = [], []
    for i, (name, cfg) in enumerate(zip(("text_encoder", "text_encoder_2"), text_cfgs)):
        sd = {k: v for k, v in read_component_weights(folder / name)[0].items() if not k.endswith("position_ids")}
        tcfg = _text_config(cfg)
        with_proj = "text_projection.weight" in sd
        with init_empty_weights(include_buffers=False):
            cls = CLIPTextModelWithProjection if with_proj else CLIPTextModel
            _check_fits(_from_config(lambda: cls(CLIPTextConfig(**tcfg)), folder, name), sd, name.replace("_", " "))
        text_sds.append(sd)
        text_arch.append(tcfg)
    arch = Architecture(family=family, prediction=pred, unet=unet_cfg, vae=vae_cfg, text=text_arch,
                        latent_scale=float(vae_cfg.get("scaling_factor", 0.18215)))
    tensors = ldm_state_dict(arch, _Weights(unet_sd), _Weights(vae_sd), [_Weights(s) for s in text_sds])

    if extras_meta:   # written by file → folder: put back exactly what the folder could not hold
        from ..formats.safetensors_io import json_table

        tensors.update(extras)
        try:
            absent = json.loads(extras_meta.get("lab.absent", "[]"))
        except (ValueError, RecursionError):
            absent = None
        dtypes = json_table(extras_meta.get("lab.dtypes", "{}"))
        if not isinstance(absent, list) or dtypes is None:
            raise UserError(f"{EXTRAS_NAME}: its lab.absent / lab.dtypes metadata is damaged")
        for key in absent:
            if isinstance(key, str):
                tensors.pop(key, None)
        for key, name in dtypes.items():
            dtype = getattr(torch, name, None) if isinstance(name, str) else None
            if not isinstance(dtype, torch.dtype):
                raise UserError(f"{EXTRAS_NAME}: unknown dtype {str(name)[:20]!r} in lab.dtypes")
            if key in tensors:
                tensors[key] = tensors[key].to(dtype)
    elif family == "sd2":
        notes += _pad_sd2_text(tensors, text_arch[0], text_sds[0])
        arch.text[0] = {**text_arch[0], "num_hidden_layers": text_arch[0]["num_hidden_layers"] + 1}
    meta = json_table_or_empty(extras_meta.get("lab.source_metadata", "{}"))
    meta.setdefault(detect.ARCH_KEY, arch.to_json())
    meta["modelspec.prediction_type"] = "v" if pred == "v" else "epsilon"
    if family == "sdxl" and pred == "v" and "v_pred" not in tensors:
        notes.append("SDXL v-prediction: A1111 needs a .yaml beside the file (or a v_pred key) to sample it right")
    return tensors, meta, arch, notes


def _pad_sd2_text(tensors: dict[str, Any], tcfg: dict[str, Any], sd: dict[str, Any]) -> list[str]:
    """Add the OpenCLIP layer and projection a stock diffusers SD2 text encoder lacks (zeros; never used)."""
    import torch

    prefix = "cond_stage_model.model."
    notes = []
    hidden, layers = tcfg["hidden_size"], tcfg["num_hidden_layers"]
    dtype = next(iter(sd.values())).dtype
    if prefix + "text_projection" not in tensors:
        tensors[prefix + "text_projection"] = torch.zeros(hidden, hidden, dtype=dtype)
        notes.append("text_projection added as zeros (SD2 never projects its text features)")
    if f"{prefix}transformer.resblocks.{layers}.ln_1.weight" not in tensors:
        block = f"{prefix}transformer.resblocks.{layers}."
        inner = tcfg["intermediate_size"]
        shapes = {"ln_1.weight": (hidden,), "ln_1.bias": (hidden,), "attn.in_proj_weight": (3 * hidden, hidden),
                  "attn.in_proj_bias": (3 * hidden,), "attn.out_proj.weight": (hidden, hidden),
                  "attn.out_proj.bias": (hidden,), "ln_2.weight": (hidden,), "ln_2.bias": (hidden,),
                  "mlp.c_fc.weight": (inner, hidden), "mlp.c_fc.bias": (inner,),
                  "mlp.c_proj.weight": (hidden, inner), "mlp.c_proj.bias": (hidden,)}
        for k, shape in shapes.items():
            tensors[block + k] = torch.zeros(shape, dtype=dtype)
        notes.append(f"text encoder layer {layers + 1} added as zeros (diffusers drops SD2's last OpenCLIP layer; "
                     "A1111 stops at the penultimate one, so it is never run, but the file must have it)")
    return notes


def folder_to_file(folder: str | Path, out_path: str | Path, *, family: str | None = None,
                   prediction: str | None = None, dtype: str | None = None, overwrite: bool = False,
                   events: Events | None = None) -> ConvertResult:
    """Write the diffusers folder as a single-file checkpoint (atomic, verified; refuses to overwrite)."""
    from ..events import Events as _Events
    from ..formats import hashes
    from .output import ConvertConfig, ConvertResult, a1111_hashes, prepare_tensors, write_verified

    events = events or _Events()
    folder, out_path = Path(folder), Path(out_path)
    if out_path.exists() and not overwrite:
        raise UserError(f"{out_path.name} already exists (use --overwrite to replace it)")
    events.status(f"{folder.name}: reading the diffusers folder")
    tensors, meta, arch, notes = folder_state_dict(folder, family=family, prediction=prediction)
    ready, counts = prepare_tensors(tensors.items(), ConvertConfig(dtype=dtype).dtype)
    index = folder / MODEL_INDEX
    meta.update({
        "converted_by": f"Training Lab {__version__} convert",
        "converted_kind": "checkpoint",
        "converted_from": folder.name,
        "converted_from_sha256": hashes.sha256_file(index) if index.is_file() else "",
        "converted_from_format": "diffusers folder",
        "converted_dtype": dtype or "unchanged",
        "converted_dropped": json.dumps({}),
    })
    if notes:
        meta["converted_notes"] = json.dumps(notes)
    events.status(f"{folder.name}: writing {out_path.name}")
    write_verified(out_path, ready, meta, overwrite=overwrite)
    result = ConvertResult(folder, "converted", "checkpoint", out_path,
                           message=f"{arch.family}{' v-prediction' if arch.prediction == 'v' else ''}, "
                                   f"{len(ready)} tensors", hashes=a1111_hashes(out_path, "checkpoint"),
                           warnings=list(notes))
    if counts["overflow"]:
        result.warnings.append(f"{counts['overflow']} tensors overflowed to inf when cast to fp16")
    events.saved(str(out_path), file_kind="checkpoint", **result.hashes)
    return result


# ---- writing a folder ----------------------------------------------------------------------------------
def _vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token → id table and merges in rank order, from the BPE file the tokenizer module reads."""
    from ..models.tokenizer import ClipTokenizer

    vocab = ClipTokenizer()._vocab    # the shared, cached vocabulary (no public accessor)
    return dict(vocab.encoder), sorted(vocab.ranks, key=vocab.ranks.__getitem__)


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """A transformers `CLIPTokenizer` folder: vocab.json, merges.txt, tokenizer_config.json, special tokens."""
    encoder, merges = _vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _scheduler(family: str, prediction: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    pred = "v_prediction" if prediction == "v" else "epsilon"
    if family == "sd1":
        return PNDMScheduler(**_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, prediction_type=pred)
    if family == "sd2":
        return DDIMScheduler(**_SCHEDULE, clip_sample=False, set_alpha_to_one=False, prediction_type=pred)
    return EulerDiscreteScheduler(**_SCHEDULE, timestep_spacing="leading", prediction_type=pred)


def _sd2_text_model(encoder: Any, cfg: dict[str, Any]):
    """SD2's text encoder as diffusers ships it: `CLIPTextModel` without the last layer and the projection."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.checkpoint import assign_state

    layers = cfg["num_hidden_layers"] - 1
    with init_empty_weights(include_buffers=False):
        model = CLIPTextModel(CLIPTextConfig(**{**cfg, "num_hidden_layers": layers}))
    drop = f"text_model.encoder.layers.{layers}."
    sd = {k: v for k, v in encoder.state_dict().items()
          if not k.startswith(drop) and k != "text_projection.weight" and not k.endswith("position_ids")}
    assign_state(model, sd, "SD2 text encoder")   # fills position_ids where transformers < 4.31 keeps them
    return model.eval()


def _folder_extras(loaded: Any, encoders: list[Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """What the folder's modules do not reproduce bit for bit: tensors, absent keys and per-key dtypes."""
    import torch

    from ..models.checkpoint import ldm_state_dict

    source = ldm_state_dict(loaded.arch, loaded.unet, loaded.vae, loaded.text_encoders, loaded.extras)
    keys = set(loaded.dtypes) or set(source)
    back = ldm_state_dict(loaded.arch, loaded.unet, loaded.vae, encoders)
    extras, dtypes = {}, {}
    for key in keys:
        want = source[key].to(loaded.dtypes.get(key, source[key].dtype))
        got = back.get(key)
        if got is None or got.shape != want.shape or not torch.equal(got.to(want.dtype), want):
            extras[key] = want.detach().clone()
        elif got.dtype != want.dtype:
            dtypes[key] = str(want.dtype).replace("torch.", "")
    absent = sorted(set(back) - keys)
    return extras, {"lab.absent": json.dumps(absent), "lab.dtypes": json.dumps(dtypes, sort_keys=True)}


def file_to_folder(path: str | Path, out_dir: str | Path, *, prediction: str | None = None, overwrite: bool = False,
                   events: Events | None = None) -> ConvertResult:
    """Write a single-file checkpoint as a diffusers folder `out_dir` (built beside it, then renamed in place)."""
    from ..events import Events as _Events
    from ..formats import hashes
    from ..formats.safetensors_io import write_safetensors
    from ..models import ldm_text
    from ..models.checkpoint import load_checkpoint
    from .output import ConvertResult

    events = events or _Events()
    path, out_dir = Path(path), Path(out_dir)
    if out_dir.exists() and not (overwrite and is_diffusers_folder(out_dir)):
        raise UserError(f"{out_dir} already exists" + (" (use --overwrite to replace it)" if is_diffusers_folder(out_dir)
                                                        else " and is not a diffusers folder"))
    events.status(f"{path.name}: loading")
    sha = hashes.sha256_file(path)
    loaded = load_checkpoint(path, prediction=prediction)
    arch = loaded.arch
    encoders = list(loaded.text_encoders)
    if arch.family == "sd2":
        encoders[0] = _sd2_text_model(encoders[0], arch.text[0])
    extras, extras_meta = _folder_extras(loaded, encoders)
    extras_meta.update({
        "lab.family": arch.family, "lab.prediction": arch.prediction,
        "lab.source_metadata": json.dumps(loaded.metadata, sort_keys=True),
        "converted_by": f"Training Lab {__version__} convert", "converted_from": path.name,
        "converted_from_sha256": sha, "lab.note": "tensors of the single-file checkpoint that the diffusers "
        "folder cannot hold; read back by Training Lab's folder → single-file conversion",
    })

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        events.status(f"{path.name}: writing unet")
        loaded.unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        events.status(f"{path.name}: writing vae")
        loaded.vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
        index: dict[str, Any] = {
            "_class_name": "StableDiffusionXLPipeline" if arch.family == "sdxl" else "StableDiffusionPipeline",
            "_diffusers_version": _diffusers_version(),
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "feature_extractor": [None, None],
        }
        for i, enc in enumerate(encoders):
            name = "text_encoder" if i == 0 else "text_encoder_2"
            events.status(f"{path.name}: writing {name}")
            enc.save_pretrained(str(tmp / name), safe_serialization=True)
            tok = "tokenizer" if i == 0 else "tokenizer_2"
            write_tokenizer(tmp / tok, "!" if ldm_text.is_openclip(arch.family, i) else "<|endoftext|>")
            index[name] = ["transformers", type(enc).__name__]
            index[tok] = ["transformers", "CLIPTokenizer"]
        scheduler = _scheduler(arch.family, arch.prediction)
        scheduler.save_pretrained(str(tmp / "scheduler"))
        index["scheduler"] = ["diffusers", type(scheduler).__name__]
        if arch.family == "sdxl":
            index.update(image_encoder=[None, None], force_zeros_for_empty_prompt=True)
        else:
            index.update(safety_checker=[None, None], requires_safety_checker=False)
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True), encoding="utf-8")
        write_safetensors(tmp / EXTRAS_NAME, extras, extras_meta)
        if out_dir.exists():       # overwrite: only ever a diffusers folder (checked above)
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    kept = _summarise(sorted(extras))
    message = f"{arch.family}{' v-prediction' if arch.prediction == 'v' else ''}, nothing dropped"
    if kept:
        message += f"; kept in {EXTRAS_NAME}: " + ", ".join(f"{k} ({n})" for k, n in sorted(kept.items()))
    unet_file = out_dir / "unet" / "diffusion_pytorch_model.safetensors"
    digest = hashes.sha256_file(unet_file)
    result = ConvertResult(path, "converted", "diffusers", out_dir, message=message,
                           hashes={"sha256": sha, "shorthash": sha[:10], "unet_sha256": digest})
    events.saved(str(out_dir), file_kind="diffusers", **result.hashes)
    return result


def _summarise(keys: list[str]) -> dict[str, int]:
    """Counts of kept keys by their first two name parts (e.g. {'model_ema': 686, 'alphas_cumprod': 1})."""
    out: dict[str, int] = {}
    for key in keys:
        head = ".".join(key.split(".")[:2]) if key.count(".") >= 2 else key
        out[head] = out.get(head, 0) + 1
    return out


def _diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)
