"""The VAE in LDM checkpoint layout (`first_stage_model.*`) versus diffusers' AutoencoderKL.

The decoder's levels are numbered in opposite directions (LDM `up.0` is the last, full-resolution level;
diffusers `up_blocks.0` the first), and the mid-block attention is 1×1 convolutions in LDM but Linear layers
in diffusers, so those weights are reshaped [C, C, 1, 1] ↔ [C, C].
"""

from __future__ import annotations

import re
from typing import Any

from .keymap import PrefixMap

PREFIX = "first_stage_model."

_RESNET = {"conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
ATTN_LINEAR = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def vae_config_from_ldm(shapes: dict[str, tuple[int, ...]], family: str, hints: dict[str, Any] | None = None
                        ) -> dict[str, Any]:
    """diffusers `AutoencoderKL` config from LDM key → shape (keys without `first_stage_model.`)."""
    hints = hints or {}
    keys = set(shapes)
    levels = len({m.group(1) for k in keys if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    layers = len({m.group(1) for k in keys if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    channels = [shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)]
    latent = shapes["decoder.conv_in.weight"][1]
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent,
        "norm_num_groups": 32,
        "sample_size": int(hints.get("vae_sample_size", 512)),
        "scaling_factor": float(hints.get("scale_factor", {"sdxl": 0.13025}.get(family, 0.18215))),
    }


def vae_prefix_map(cfg: dict[str, Any]) -> PrefixMap:
    """diffusers prefixes (A) ↔ LDM prefixes (B, relative to `first_stage_model.`)."""
    m = PrefixMap()
    levels = len(cfg["block_out_channels"])
    layers = cfg["layers_per_block"]
    for part in ("encoder", "decoder"):
        m.add(f"{part}.conv_in", f"{part}.conv_in")
        m.add(f"{part}.conv_out", f"{part}.conv_out")
        m.add(f"{part}.conv_norm_out", f"{part}.norm_out")
        m.add(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _RESNET)
        m.add(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _RESNET)
        m.add(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _ATTN)
    for i in range(levels):
        for j in range(layers):
            m.add(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _RESNET)
        if i < levels - 1:
            m.add(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        ldm_level = levels - 1 - i
        for j in range(layers + 1):
            m.add(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_level}.block.{j}", _RESNET)
        if i < levels - 1:
            m.add(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_level}.upsample.conv")
    m.add("quant_conv", "quant_conv")
    m.add("post_quant_conv", "post_quant_conv")
    return m
