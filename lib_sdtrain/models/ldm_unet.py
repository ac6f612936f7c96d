"""The UNet in LDM/SGM checkpoint layout (`model.diffusion_model.*`) versus diffusers' UNet2DConditionModel.

Two jobs: derive a diffusers config from the checkpoint's tensor shapes (so any width loads, not only the
stock ones), and map every parameter name between the layouts. The block arithmetic follows the LDM
`UNetModel` construction: each resolution level has `L` res blocks (+ a transformer where the level has
attention) and, except the last level, a downsampler; the decoder side has `L + 1` blocks per level.
Facts that shapes cannot tell (attention heads, upcasting) come from a hint dict: our own metadata, the
A1111 `.yaml` beside the file, or the family's stock rule (SD1: 8 heads; SD2/SDXL: 64 channels per head).
"""

from __future__ import annotations

import re
from typing import Any

from .keymap import PrefixMap

PREFIX = "model.diffusion_model."

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _count(keys: set[str], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {m.group(1) for k in keys if (m := rx.match(k))}
    return len(found)


def unet_config_from_ldm(shapes: dict[str, tuple[int, ...]], family: str, hints: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """diffusers `UNet2DConditionModel` config for the UNet whose LDM key → shape table is `shapes`.

    `shapes` holds keys without the `model.diffusion_model.` prefix.
    """
    hints = hints or {}
    keys = set(shapes)
    model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
    out_channels = shapes["out.2.weight"][0]
    down_ops = sorted(int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    layers = down_ops[0] - 1 if down_ops else _count(keys, r"input_blocks\.(\d+)\.0\.in_layers") 
    levels = len(down_ops) + 1
    channels, attn_levels, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        channels.append(shapes[f"input_blocks.{first}.0.out_layers.3.weight"][0])
        has_attn = any(k.startswith(f"input_blocks.{first}.1.") for k in keys)
        attn_levels.append(has_attn)
        depths.append(_count(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.") if has_attn else 0)
    mid_depth = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    context_dim = next(s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight"))
    linear_proj = len(next(s for k, s in shapes.items() if k.endswith(".proj_in.weight"))) == 2

    heads = hints.get("num_heads")
    head_channels = hints.get("num_head_channels")
    if heads is None and head_channels is None:
        if family == "sd1":
            heads = 8
        else:
            head_channels = 64
    if "attention_head_dim" in hints:  # our own metadata carries the exact diffusers value
        given = hints["attention_head_dim"]
        head_list = list(given) if isinstance(given, (list, tuple)) else [int(given)] * levels
    elif heads is not None and heads != -1:
        head_list = [int(heads)] * levels
    else:
        head_list = [max(1, c // int(head_channels)) for c in channels]

    cfg: dict[str, Any] = {
        "sample_size": int(hints.get("sample_size", {"sd1": 64, "sd2": 96, "sdxl": 128}.get(family, 64))),
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": context_dim,
        "attention_head_dim": head_list,
        "use_linear_projection": linear_proj,
        "transformer_layers_per_block": [max(d, 1) for d in depths],
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "upcast_attention": bool(hints.get("upcast_attention", False)),
    }
    if mid_depth and mid_depth != cfg["transformer_layers_per_block"][-1]:
        cfg["transformer_layers_per_block"][-1] = mid_depth
    if "label_emb.0.0.weight" in keys:  # SDXL: pooled text + size/crop embeddings
        time_dim = int(hints.get("addition_time_embed_dim", 256))
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=shapes["label_emb.0.0.weight"][1],
        )
    return cfg


def unet_prefix_map(cfg: dict[str, Any]) -> PrefixMap:
    """diffusers module prefixes (A) ↔ LDM module prefixes (B, relative to `model.diffusion_model.`)."""
    m = PrefixMap()
    layers = cfg["layers_per_block"]
    levels = len(cfg["block_out_channels"])
    has_attn = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]

    m.add("conv_in", "input_blocks.0.0")
    m.add("time_embedding.linear_1", "time_embed.0")
    m.add("time_embedding.linear_2", "time_embed.2")
    if cfg.get("addition_embed_type") == "text_time":
        m.add("add_embedding.linear_1", "label_emb.0.0")
        m.add("add_embedding.linear_2", "label_emb.0.2")
    for i in range(levels):
        for j in range(layers):
            block = 1 + i * (layers + 1) + j
            m.add(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{block}.0", _RESNET)
            if has_attn[i]:
                m.add(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{block}.1")
        if i < levels - 1:
            m.add(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (layers + 1)}.0.op")
    m.add("mid_block.resnets.0", "middle_block.0", _RESNET)
    m.add("mid_block.attentions.0", "middle_block.1")
    m.add("mid_block.resnets.1", "middle_block.2", _RESNET)
    up_attn = list(reversed(has_attn))
    for i in range(levels):
        for j in range(layers + 1):
            block = i * (layers + 1) + j
            m.add(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0", _RESNET)
            if up_attn[i]:
                m.add(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{block}.1")
        if i < levels - 1:
            last = i * (layers + 1) + layers
            m.add(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{last}.{2 if up_attn[i] else 1}.conv")
    m.add("conv_norm_out", "out.0")
    m.add("conv_out", "out.2")
    return m
