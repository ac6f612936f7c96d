"""Tiny random SD1 / SD2-v / SDXL checkpoints in the stock single-file layout, built in seconds.

They keep each family's topology (levels, res blocks per level, which levels have attention, OpenCLIP vs HF
text-encoder layout, SDXL's pooled + size conditioning) at small widths, so module names are a subset of the
full-size ones and every test goes through the real loader and saver. The text encoders keep the full
49,408-token vocabulary and 77 positions, so the real tokenizer works with them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.checkpoint import Architecture, LoadedCheckpoint, build_modules, save_checkpoint
from ..models.ldm_text import CLIP_TEXT_BASE as TEXT


def _text(hidden: int, layers: int, act: str, proj: int | None = None) -> dict:
    return {**TEXT, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 2, "hidden_act": act, "projection_dim": proj or hidden}


# A distilled SDXL UNet in the manner of SSD-1B / Segmind Vega: blocks with fewer (or, on the up side, more)
# transformer blocks than their neighbours, down and up sides that differ, and a middle block that is a single
# res block without attention. Its module names are stock SDXL names minus the dropped blocks.
DISTILLED_SDXL_UNET = {"transformer_layers_per_block": [1, [2, 1], 1],
                       "reverse_transformer_layers_per_block": [[2, 1, 3], [1, 1, 2], [1, 1, 1]],
                       "mid_block_type": "UNetMidBlock2D"}


def tiny_architecture(family: str, prediction: str | None = None, *, layout: str = "stock") -> Architecture:
    """The tiny model of `family`; `layout="distilled"` (SDXL only) gives the UNet of `DISTILLED_SDXL_UNET`."""
    vae = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 32, 32, 32],
           "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 64,
           "scaling_factor": 0.18215 if family != "sdxl" else 0.13025}
    common = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "norm_num_groups": 32,
              "flip_sin_to_cos": True, "freq_shift": 0, "upcast_attention": False}
    if family in ("sd1", "sd2"):
        unet = {**common,
                "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                "block_out_channels": [32, 32, 64, 64], "layers_per_block": 2, "cross_attention_dim": 32,
                "attention_head_dim": [2, 2, 2, 2] if family == "sd1" else [2, 2, 4, 4],
                "use_linear_projection": family == "sd2", "transformer_layers_per_block": [1, 1, 1, 1]}
        text = [_text(32, 2, "quick_gelu" if family == "sd1" else "gelu")]
    elif family == "sdxl":
        unet = {**common,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [32, 64, 64], "layers_per_block": 2, "cross_attention_dim": 64,
                "attention_head_dim": [2, 4, 4], "use_linear_projection": True,
                "transformer_layers_per_block": [1, 2, 2], "addition_embed_type": "text_time",
                "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8}
        text = [_text(32, 2, "quick_gelu"), _text(32, 2, "gelu", proj=32)]
    else:
        raise ValueError(family)
    if layout == "distilled" and family == "sdxl":
        unet.update(DISTILLED_SDXL_UNET)
    elif layout != "stock":
        raise ValueError(f"no {layout!r} layout for {family}")
    pred = prediction or ("v" if family == "sd2" else "eps")
    return Architecture(family=family, prediction=pred, unet=unet, vae=vae, text=text,
                        latent_scale=vae["scaling_factor"])


def build_tiny(family: str, *, seed: int = 0, prediction: str | None = None, layout: str = "stock"
               ) -> LoadedCheckpoint:
    """Random tiny modules (float32, CPU). Weights are scaled so that outputs stay in a sane range."""
    arch = tiny_architecture(family, prediction, layout=layout)
    torch.manual_seed(seed)
    unet, vae, encoders = build_modules(arch, empty=False)
    with torch.no_grad():  # trained norms are never exactly (1, 0); exact ones make some means vanish
        for m in (unet, vae, *encoders):
            for mod in m.modules():
                if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and mod.weight is not None:
                    mod.weight.add_(0.1 * torch.randn_like(mod.weight))
                    mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    for m in (unet, vae, *encoders):
        m.requires_grad_(False).eval()
    return LoadedCheckpoint(arch, unet, vae, encoders)


def make_tiny_checkpoint(path: str | Path, family: str, *, seed: int = 0, prediction: str | None = None,
                         dtype: torch.dtype | None = None) -> Path:
    """Write a tiny random checkpoint of `family` to `path` (.safetensors) and return the path."""
    loaded = build_tiny(family, seed=seed, prediction=prediction)
    return save_checkpoint(path, loaded, dtype=dtype, overwrite=True,
                           metadata={"lab.note": f"tiny random {family} model for tests"})
