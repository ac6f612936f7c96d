"""Put the toy model into an AUTOMATIC1111 install, so the WebUI can load and train on it.

A1111 cannot guess the toy widths from the weights (it picks v1-inference.yaml for any SD1 state dict), so
the model goes in with its own LDM `.yaml` (A1111 uses `<checkpoint>.yaml` when present). That yaml's
text encoder is `FrozenCLIPEmbedder(version=<absolute folder>)`; A1111 builds it inside
`sd_disable_initialization.DisableInitialization`, which turns `CLIPTextModel.from_pretrained(folder)` into
"config only, empty state dict" (the weights come from the checkpoint), and `CLIPTokenizer.from_pretrained`
reads the tokenizer files. So the folder holds a CLIP text `config.json` plus a tokenizer (`vocab.json`,
`merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`), written from open_clip's bundled BPE
vocabulary: nothing is downloaded. Layout after installing:

    models/Stable-diffusion/toy-sd1.safetensors
    models/Stable-diffusion/toy-sd1.yaml
    models/Stable-diffusion/toy-sd1.tokenizer/{config.json, vocab.json, merges.txt, ...}

The folder name `<stem>.tokenizer` is also where the standalone host looks for a model's vocabulary.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

from ..errors import UserError
from ..formats.files import atomic_write, atomic_write_text

TEXT_FOLDER_SUFFIX = ".tokenizer"
MODELS_SUBDIR = ("models", "Stable-diffusion")
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def checkpoint_folder(webui: str | Path) -> Path:
    """A1111's checkpoint folder from its root (or the folder itself); UserError when it is neither."""
    d = Path(webui).expanduser()
    if not d.is_dir():
        raise UserError(f"{d} is not a folder; give the A1111 folder or its models/Stable-diffusion folder")
    if d.name == MODELS_SUBDIR[1]:
        return d.resolve()
    target = d.joinpath(*MODELS_SUBDIR)
    if target.is_dir():
        return target.resolve()
    if (d / "webui.py").is_file() or (d / "launch.py").is_file():
        target.mkdir(parents=True, exist_ok=True)
        return target.resolve()
    raise UserError(f"{d} does not look like an AUTOMATIC1111 folder (no webui.py and no models/Stable-diffusion)")


def read_architecture(model: Path):
    """The `Architecture` a Training Lab checkpoint records in its metadata (UserError if it has none)."""
    from ..formats.safetensors_io import read_metadata
    from ..models.checkpoint import Architecture
    from ..models.detect import ARCH_KEY

    meta = read_metadata(model)
    if ARCH_KEY not in meta:
        raise UserError(f"{model.name} carries no Training Lab architecture metadata; it is not the toy model")
    return Architecture.from_json(meta[ARCH_KEY])


def text_config_json(text: dict) -> dict:
    """A `CLIPTextConfig` dict (transformers 4.30 … 4.57 read it) for the toy text encoder."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(text["vocab_size"]),
        "hidden_size": int(text["hidden_size"]),
        "intermediate_size": int(text["intermediate_size"]),
        "projection_dim": int(text.get("projection_dim", text["hidden_size"])),
        "num_hidden_layers": int(text["num_hidden_layers"]),
        "num_attention_heads": int(text["num_attention_heads"]),
        "max_position_embeddings": int(text["max_position_embeddings"]),
        "hidden_act": text.get("hidden_act", "quick_gelu"),
        "layer_norm_eps": float(text.get("layer_norm_eps", 1e-5)),
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": int(text.get("bos_token_id", 0)),
        "eos_token_id": int(text.get("eos_token_id", 2)),
        "pad_token_id": int(text.get("pad_token_id", 1)),
        "torch_dtype": "float16",
        "training_lab": "text encoder config of the Training Lab toy model; weights are in the checkpoint",
    }


def text_folder_files(text: dict) -> dict[str, str]:
    """The CLIP text config and tokenizer files A1111's FrozenCLIPEmbedder(version=folder) reads, as
    {file name: content}; UserError (before anything is written) when the vocabulary is missing."""
    from ..models.tokenizer import _resolve_vocabulary

    vocab = _resolve_vocabulary(None)           # open_clip's bundled BPE file: no download
    if len(vocab.encoder) != int(text["vocab_size"]):
        raise UserError(f"the tokenizer has {len(vocab.encoder)} tokens but the model {text['vocab_size']}")
    merges = sorted(vocab.ranks, key=vocab.ranks.__getitem__)
    return {
        "vocab.json": json.dumps(vocab.encoder, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "CLIPTokenizer", "model_max_length": int(text["max_position_embeddings"]),
            "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
            "bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS,
        }, indent=2),
        "special_tokens_map.json": json.dumps({"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS,
                                               "pad_token": _EOS}, indent=2),
        "config.json": json.dumps(text_config_json(text), indent=2),
    }


def _written_bytes(text: str) -> bytes:
    """The bytes `atomic_write_text` leaves for `text` (Path.write_text turns "\\n" into the system's line end)."""
    return text.replace("\n", os.linesep).encode("utf-8")


def _differs(path: Path, text: str) -> bool:
    """Whether `path` exists and is not exactly what writing `text` there would leave."""
    if not path.exists():
        return False
    try:
        return not path.is_file() or path.read_bytes() != _written_bytes(text)
    except OSError:
        return True


def install_toy_model(models_dir: Path, overwrite: bool = False, model: str | Path | None = None) -> Path:
    """Copy the toy model (default: the bundled one) into A1111's models/Stable-diffusion; return its new path.

    `models_dir`: the A1111 root or its models/Stable-diffusion folder. Writes `<stem>.yaml` (full LDM config,
    text encoder folder given as an absolute path) and the `<stem>.tokenizer/` folder beside the copy.
    An identical copy already there is kept, and so are its yaml and tokenizer files where they hold what this
    install writes (left untouched, modification times too). A different file of the same name, or a yaml or
    tokenizer file that differs (edited by hand, or written for another folder or by another version), is
    replaced only with `overwrite`: without it the install is refused before anything is written.
    """
    from ..hosts.standalone import default_model
    from .ldm_config import ldm_yaml

    src = Path(model) if model is not None else default_model()
    if not src.is_file():
        raise UserError(f"model not found: {src}")
    if src.suffix != ".safetensors":
        raise UserError(f"{src.name}: only .safetensors toy models can be installed")
    arch = read_architecture(src)
    dest_dir = checkpoint_folder(models_dir)
    dest = dest_dir / src.name
    yaml_path = dest.with_suffix(".yaml")
    text_dir = dest_dir / (dest.stem + TEXT_FOLDER_SUFFIX)
    if dest.resolve() == src.resolve():
        raise UserError(f"{src} is already in {dest_dir}")
    same = dest.is_file() and filecmp.cmp(src, dest, shallow=False)
    if not overwrite and not same and (dest.exists() or yaml_path.exists() or text_dir.exists()):
        existing = next(p for p in (dest, yaml_path, text_dir) if p.exists())
        raise UserError(f"{existing} already exists and is not this toy model; pass --overwrite to replace it")
    if text_dir.exists() and not text_dir.is_dir():
        raise UserError(f"{text_dir} is a file, not a folder")
    # everything that can fail (the vocabulary needs open-clip-torch, the yaml) is made before the first write,
    # so a failure leaves no half install
    text_files = text_folder_files(arch.text[0])
    yaml_text = ldm_yaml(arch, str(text_dir.resolve()))
    planned = {yaml_path: yaml_text, **{text_dir / name: content for name, content in text_files.items()}}
    folder = next((p for p in planned if p.is_dir()), None)
    if folder is not None:
        raise UserError(f"{folder} is a folder; move it aside to install")
    # each file read once: an identical one is left as it is (its time too); one that differs is replaced only
    # with overwrite
    edited = [p for p, text in planned.items() if _differs(p, text)]
    if edited and not overwrite:
        raise UserError(f"{edited[0]} differs from the one this install writes (edited by hand, or written for "
                        "another folder or by another version); pass --overwrite to replace it, or move it "
                        "aside first")
    if not same:
        atomic_write(dest, lambda p: shutil.copyfile(src, p), overwrite=True)
    text_dir.mkdir(parents=True, exist_ok=True)
    for path, text in planned.items():
        if path in edited or not path.exists():
            atomic_write_text(path, text, overwrite=True)
    return dest
