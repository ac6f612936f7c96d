"""A trained single-file checkpoint → a diffusers pipeline folder, offline.

The folder is what `StableDiffusionPipeline.from_pretrained` / `StableDiffusionXLPipeline.from_pretrained`
read: `model_index.json`, `unet/`, `vae/`, `text_encoder/` (+ `text_encoder_2/`), `tokenizer/`
(+ `tokenizer_2/`), `scheduler/`. Networks come from the checkpoint's own tensors (built like the standalone
loader builds them) and are written with `save_pretrained` as safetensors; the tokenizer files are written from
the CLIP vocabulary the model already uses; the scheduler is the stock SD one (scaled-linear betas
0.00085 → 0.012, eps or v). Nothing is downloaded.

Layout facts of diffusers' own SD2 conversion: the text encoder is a `CLIPTextModel` with the OpenCLIP model's
last layer removed (SD2 conditions on the penultimate layer, which diffusers realises by dropping the last
one) and no projection. SDXL's second encoder keeps all layers and its projection (pooled output).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import UserError

PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sdxl": "StableDiffusionXLPipeline"}


def _write_tokenizer(folder: Path, tokenizer: Any, pad_token: str) -> None:
    """vocab.json + merges.txt + configs of transformers' CLIPTokenizer from one of our CLIP tokenizers."""
    vocab = tokenizer._vocab
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab.encoder, ensure_ascii=False), encoding="utf-8")
    merges = sorted(vocab.ranks, key=vocab.ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), encoding="utf-8")
    config = {**specials, "model_max_length": 77, "do_lower_case": True, "errors": "replace",
              "tokenizer_class": "CLIPTokenizer", "clean_up_tokenization_spaces": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def _sd2_text_encoder(encoder: Any) -> Any:
    """diffusers' SD2 text encoder: the same weights without the last layer and without the projection."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = encoder.config.to_dict()
    last = cfg["num_hidden_layers"] - 1
    cfg["num_hidden_layers"] = last
    cfg["architectures"] = ["CLIPTextModel"]
    config = CLIPTextConfig(**{k: v for k, v in cfg.items() if k not in ("transformers_version", "model_type")})
    model = CLIPTextModel(config)
    state = {k: v for k, v in encoder.state_dict().items()
             if not k.startswith(("text_projection", f"text_model.encoder.layers.{last}."))}
    model.load_state_dict(state, strict=False)   # position_ids may or may not be a persistent buffer
    missing = [k for k in model.state_dict() if k not in state and not k.endswith("position_ids")]
    if missing:
        raise RuntimeError(f"SD2 text encoder export: weights missing for {missing[:3]}")
    return model.to(next(encoder.parameters()).dtype)


def export_diffusers(tensors: dict[str, Any], metadata: dict[str, str], folder: str | Path, parts: Any) -> Path:
    """Write the checkpoint `tensors` (A1111 LDM keys) as a diffusers folder at `folder` (or a free name beside).

    Args:
        tensors: the saved checkpoint's tensors (CPU).
        metadata: its metadata (architecture hints: `lab.architecture`, `modelspec.prediction_type`).
        folder: the wanted folder; an existing one is never replaced (`folder-1`, ... is used instead).
        parts: the model's parts, for the family and its CLIP tokenizers.
    Returns:
        the folder written.
    """
    import diffusers
    from diffusers import EulerDiscreteScheduler

    from ..formats.files import unused_path
    from ..models.checkpoint import architecture_from_state_dict, load_from_state_dict
    from ..models.detect import read_metadata_hints
    from ..models.tokenizer import make_tokenizers

    arch = architecture_from_state_dict(tensors, read_metadata_hints(metadata))
    loaded = load_from_state_dict(tensors, arch)
    family = arch.family
    target = unused_path(Path(folder))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="." + target.name + ".", dir=target.parent))
    try:
        loaded.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        loaded.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        encoders = list(loaded.text_encoders)
        if family == "sd2":
            encoders[0] = _sd2_text_encoder(encoders[0])
        names = ["text_encoder", "text_encoder_2"][:len(encoders)]
        for name, enc in zip(names, encoders):
            enc.save_pretrained(tmp / name, safe_serialization=True)
        tokenizers = [t for t in getattr(parts, "tokenizers", []) if hasattr(t, "_vocab")]
        if len(tokenizers) != len(encoders):
            tokenizers = make_tokenizers(family)
        pads = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[family]
        for i, (tok, pad) in enumerate(zip(tokenizers, pads)):
            _write_tokenizer(tmp / ("tokenizer" if i == 0 else "tokenizer_2"), tok, pad)
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="v_prediction" if arch.prediction == "v" else "epsilon", steps_offset=1,
            timestep_spacing="leading")
        scheduler.save_pretrained(tmp / "scheduler")
        index: dict[str, Any] = {
            "_class_name": PIPELINES[family], "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        }
        if family == "sdxl":
            index.update({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                          "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True})
        else:
            index.update({"safety_checker": [None, None], "feature_extractor": [None, None],
                          "requires_safety_checker": False})
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        (tmp / "training_lab.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
        if target.exists():
            raise UserError(f"{target} appeared while exporting; nothing was replaced")
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
