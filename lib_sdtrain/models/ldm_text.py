"""Text encoders in checkpoint layout versus Hugging Face CLIP text models.

- SD1 and SDXL's first encoder are stored as HF `CLIPTextModel` keys already (`...transformer.text_model.*`).
- SD2 and SDXL's second encoder are stored as OpenCLIP keys (`...model.transformer.resblocks.N.*`): the fused
  `attn.in_proj_weight` [3E, E] holds q, k, v in that order, `mlp.c_fc`/`c_proj` are fc1/fc2, and
  `text_projection` is stored transposed relative to a Linear weight. We load these into
  `CLIPTextModelWithProjection` with all layers (SD2 keeps its 24th layer, which diffusers drops, so that a
  load-then-save is exact); `logit_scale` has no module and travels as an extra tensor.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# What every SD text encoder shares with OpenAI's CLIP: the 49,408-token vocabulary, 77 positions and the
# special token ids. Small models built in code (tests, the toy model) keep these so the real tokenizer fits.
CLIP_TEXT_BASE = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
                  "eos_token_id": 2, "bos_token_id": 0, "pad_token_id": 1}

PREFIXES = {
    "sd1": ["cond_stage_model.transformer."],
    "sd2": ["cond_stage_model.model."],
    "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
}

_OPENCLIP = [  # (open_clip name relative to resblocks.N, HF name relative to encoder.layers.N)
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
]
_TOP = [
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.weight", "text_model.final_layer_norm.weight"),
    ("ln_final.bias", "text_model.final_layer_norm.bias"),
]
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")


def is_openclip(family: str, index: int) -> bool:
    return (family == "sd2" and index == 0) or (family == "sdxl" and index == 1)


def text_config_from_ldm(shapes: dict[str, tuple[int, ...]], openclip: bool, hints: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """transformers `CLIPTextConfig` kwargs from key → shape (keys relative to the encoder prefix)."""
    hints = hints or {}
    if openclip:
        vocab, hidden = shapes["token_embedding.weight"]
        positions = shapes["positional_embedding"][0]
        layers = len({m.group(1) for k in shapes if (m := _BLOCK.match(k))})
        inner = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
        proj = shapes["text_projection"][1] if "text_projection" in shapes else hidden
        act = hints.get("hidden_act", "gelu")
    else:
        vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
        positions = shapes["text_model.embeddings.position_embedding.weight"][0]
        layers = len({m.group(1) for k in shapes if (m := _LAYER.match(k))})
        inner = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        proj = hidden
        act = hints.get("hidden_act", "quick_gelu")
    heads = int(hints.get("num_attention_heads", max(1, hidden // 64)))
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": proj,
        "layer_norm_eps": 1e-5,
        # SD1's tokenizer pads with <|endoftext|>; OpenCLIP pads with 0. The HF model finds the EOS for pooling
        # by argmax over ids when eos_token_id == 2 (legacy), otherwise by the first eos id: keep the legacy rule.
        "eos_token_id": 2,
        "bos_token_id": 0,
        "pad_token_id": 1,
    }


def openclip_is_weight(key: str) -> bool:
    """Whether an OpenCLIP text key (relative) is a weight of the HF model (`openclip_to_hf` keeps it), not a
    leftover such as `logit_scale` or `attn_mask`."""
    if key in dict(_TOP) or key == "text_projection":
        return True
    m = _BLOCK.match(key)
    return bool(m) and (m.group(2) in ("attn.in_proj_weight", "attn.in_proj_bias")
                        or any(m.group(2).startswith(a + ".") for a, _ in _OPENCLIP))


def openclip_to_hf(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """OpenCLIP text keys (relative) → (HF CLIPTextModelWithProjection keys, leftovers)."""
    out, rest = {}, {}
    top = dict(_TOP)
    for key, value in sd.items():
        if not openclip_is_weight(key):
            rest[key] = value
        elif key in top:
            out[top[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif m := _BLOCK.match(key):
            n, tail = m.groups()
            base = f"text_model.encoder.layers.{n}."
            if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = tail.rsplit("_", 1)[1]
                q, k, v = value.chunk(3, dim=0)
                out[base + f"self_attn.q_proj.{kind}"] = q
                out[base + f"self_attn.k_proj.{kind}"] = k
                out[base + f"self_attn.v_proj.{kind}"] = v
                continue
            a, b = next((a, b) for a, b in _OPENCLIP if tail.startswith(a + "."))
            out[base + b + tail[len(a):]] = value
    return out, rest


def hf_to_openclip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `openclip_to_hf` (q/k/v re-stacked into `in_proj_*`, projection transposed back)."""
    out: dict[str, torch.Tensor] = {}
    top = {b: a for a, b in _TOP}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif m := _LAYER.match(key):
            n, tail = m.groups()
            base = f"transformer.resblocks.{n}."
            qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", tail)
            if qkv:
                pending.setdefault(base + f"attn.in_proj_{qkv.group(2)}", {})[qkv.group(1)] = value
                continue
            for a, b in _OPENCLIP:
                if tail.startswith(b + "."):
                    out[base + a + tail[len(b):]] = value
                    break
            else:
                raise KeyError(f"no OpenCLIP name for text-encoder key {key}")
        elif key.endswith("position_ids"):
            continue
        else:
            raise KeyError(f"no OpenCLIP name for text-encoder key {key}")
    for name, parts in pending.items():
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out
