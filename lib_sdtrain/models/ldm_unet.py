"""The UNet in LDM/SGM checkpoint layout (`model.diffusion_model.*`) versus diffusers' UNet2DConditionModel.

Two jobs: derive a diffusers config from the checkpoint's tensor shapes (so any width loads, not only the
stock ones), and map every parameter name between the layouts. The block arithmetic follows the LDM
`UNetModel` construction: each resolution level has `L` res blocks (+ a transformer where the level has
attention) and, except the last level, a downsampler; the decoder side has `L + 1` blocks per level. Which
blocks have a transformer, and how deep each is, is read block by block from the keys (distilled SDXL models
such as SSD-1B and Segmind Vega differ from the stock depths and drop the middle block's attention).
Facts that shapes cannot tell (attention heads, upcasting) come from a hint dict: our own metadata, the
A1111 `.yaml` beside the file, or the family's stock rule (SD1: 8 heads; SD2/SDXL: 64 channels per head).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import UserError
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


def _attention_depth(keys: set[str], block: str) -> int | None:
    """Transformer blocks in `<block>.1` (a SpatialTransformer), 0 for one without any, None for no attention.

    In an output block `.1` may instead be the upsampler (`.1.conv`), which is not attention."""
    head = f"{block}.1."
    if not any(k.startswith(head) and not k.startswith(head + "conv.") for k in keys):
        return None
    return _count(keys, rf"{re.escape(head)}transformer_blocks\.(\d+)\.")


def _level_depths(keys: set[str], side: str, blocks: list[int], where: str) -> int | list[int] | None:
    """Transformer depth of one resolution level from its blocks' keys: None without attention, one int when
    every block has the same depth, else the depth of each block (diffusers accepts both). A level where only
    some blocks have attention has no diffusers equivalent and is refused, naming the blocks."""
    depths = [_attention_depth(keys, f"{side}.{b}") for b in blocks]
    if all(d is None for d in depths):
        return None
    if any(d is None for d in depths):
        with_attn = [f"{side}.{b}" for b, d in zip(blocks, depths) if d is not None]
        without = [f"{side}.{b}" for b, d in zip(blocks, depths) if d is None]
        raise UserError(f"UNet layout not supported: on the {where}, {', '.join(with_attn)} have attention but "
                        f"{', '.join(without)} have none (every block of a level must have it, or none)")
    if 0 in depths:
        b = blocks[depths.index(0)]
        raise UserError(f"UNet weights are incomplete: {side}.{b}.1 has attention weights but no transformer blocks")
    return depths[0] if len(set(depths)) == 1 else depths


def head_rule(family: str, hints: dict[str, Any]) -> tuple[str, int]:
    """("heads", n): n heads in every attention layer, or ("channels", n): n channels per head. As LDM's `UNetModel`
    reads its yaml: `num_head_channels` (unless -1) wins over `num_heads`; with neither, the family's stock rule,
    which is also what A1111 uses for a checkpoint without a yaml (its stock config for the family)."""
    channels, heads = hints.get("num_head_channels"), hints.get("num_heads")
    if channels not in (None, -1):
        return "channels", _whole(channels, "num_head_channels", hints)
    if heads not in (None, -1):
        return "heads", _whole(heads, "num_heads", hints)
    return ("heads", 8) if family == "sd1" else ("channels", 64)


def _given_by(hints: dict[str, Any]) -> str:
    return Path(str(hints["source"])).name if hints.get("source") else "the model's metadata"


def _whole(value: Any, key: str, hints: dict[str, Any]) -> int:
    """A head count or width from a .yaml or metadata (the user's input): a positive whole number, else UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise UserError(f"{_given_by(hints)}: {key} is {value!r}, not a positive whole number")
    return int(value)


def assumed_heads(family: str, hints: dict[str, Any]) -> str | None:
    """A sentence naming the stock head rule assumed for `family`'s UNet when nothing (our metadata, a `.yaml`
    beside the file) gives its heads; None when something does. Weight shapes cannot tell head counts."""
    given = ("attention_head_dim" in hints or hints.get("num_head_channels") not in (None, -1)
             or hints.get("num_heads") not in (None, -1))
    if given:
        return None
    rule, value = head_rule(family, {})
    what = f"{value} heads per attention layer" if rule == "heads" else f"{value} channels per head"
    return f"attention heads assumed by {family.upper()}'s stock rule, {what} (no .yaml or metadata gives them)"


def unet_config_from_ldm(shapes: dict[str, tuple[int, ...]], family: str, hints: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """diffusers `UNet2DConditionModel` config for the UNet whose LDM key → shape table is `shapes`.

    `shapes` holds keys without the `model.diffusion_model.` prefix. Which blocks have attention and how many
    transformer blocks each holds are read block by block, down side, up side and middle separately, so
    distilled UNets (SSD-1B, Segmind Vega: fewer transformer blocks in some blocks, no attention in the middle
    block) get their own config rather than the stock one.
    """
    hints = hints or {}
    keys = set(shapes)
    in_channels = shapes["input_blocks.0.0.weight"][1]
    out_channels = shapes["out.2.weight"][0]
    down_ops = sorted(int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    layers = down_ops[0] - 1 if down_ops else _count(keys, r"input_blocks\.(\d+)\.0\.in_layers")
    levels = len(down_ops) + 1
    for level, op in enumerate(down_ops):
        if op != (level + 1) * (layers + 1):
            raise UserError(f"UNet layout not supported: level {level} has {op - level * (layers + 1) - 1} res "
                            f"blocks, level 0 has {layers} (every level must have the same number)")
    last = max(int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k)))
    if last != levels * (layers + 1) - 1:
        raise UserError(f"UNet layout not supported: level {levels - 1} has {last - (levels - 1) * (layers + 1)} res "
                        f"blocks, level 0 has {layers} (every level must have the same number)")
    channels, down_depths, up_depths = [], [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        channels.append(shapes[f"input_blocks.{first}.0.out_layers.3.weight"][0])
        down_depths.append(_level_depths(keys, "input_blocks", list(range(first, first + layers)),
                                          f"down side's level {level}"))
        first = level * (layers + 1)       # up side: diffusers order, the lowest resolution first
        up_depths.append(_level_depths(keys, "output_blocks", list(range(first, first + layers + 1)),
                                        f"up side's level {levels - 1 - level}"))
    context_dim = next(s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight"))
    linear_proj = len(next(s for k, s in shapes.items() if k.endswith(".proj_in.weight"))) == 2
    if "attention_head_dim" in hints:  # our own metadata carries the exact diffusers value
        given = hints["attention_head_dim"]
        head_list = list(given) if isinstance(given, (list, tuple)) else [given] * levels
        if len(head_list) != levels:
            raise UserError(f"{_given_by(hints)}: attention_head_dim has {len(head_list)} entries for {levels} levels")
        head_list = [_whole(h, "attention_head_dim", hints) for h in head_list]
    else:
        rule, value = head_rule(family, hints)
        head_list = [value] * levels if rule == "heads" else [max(1, c // value) for c in channels]
    attention = [bool(d) or bool(up_depths[levels - 1 - i]) for i, d in enumerate(down_depths)]
    attention[-1] = attention[-1] or any(k.startswith("middle_block.1.transformer_blocks.") for k in keys)
    for level, (width, heads, used) in enumerate(zip(channels, head_list, attention)):
        if used and width % heads:
            given = _given_by(hints) if any(k in hints for k in ("attention_head_dim", "num_heads",
                                                                 "num_head_channels")) else "the stock rule"
            raise UserError(f"attention heads from {given}: {heads} heads do not divide level {level}'s width "
                            f"{width}; this UNet's weights cannot be of a model with those heads"
                            + ("" if given != "the stock rule" else " (give them in a .yaml beside the file: "
                               "num_heads or num_head_channels)"))

    cfg: dict[str, Any] = {
        "sample_size": int(hints.get("sample_size", {"sd1": 64, "sd2": 96, "sdxl": 128}.get(family, 64))),
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depths],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": context_dim,
        "attention_head_dim": head_list,
        "use_linear_projection": linear_proj,
        "transformer_layers_per_block": [d or 1 for d in down_depths],
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "upcast_attention": bool(hints.get("upcast_attention", False)),
    }
    _middle_block(cfg, keys)
    # diffusers builds the up side from the down side's depths reversed unless told otherwise
    depths = cfg["transformer_layers_per_block"]
    if any(isinstance(d, list) for d in depths) or any(
            up is not None and up != depths[levels - 1 - i] for i, up in enumerate(up_depths)):
        cfg["reverse_transformer_layers_per_block"] = [
            [up] * (layers + 1) if isinstance(up, int) else up or [1] * (layers + 1) for up in up_depths]
    if "label_emb.0.0.weight" in keys:  # SDXL: pooled text + size/crop embeddings
        time_dim = int(hints.get("addition_time_embed_dim", 256))
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=shapes["label_emb.0.0.weight"][1],
        )
    return cfg


def _middle_block(cfg: dict[str, Any], keys: set[str]) -> None:
    """The middle block's type and depth into `cfg`: stock (res, transformer, res), a single res block
    (SSD-1B, Segmind Vega), or none (KOALA-700M).

    diffusers takes the middle transformer's depth from the last level's entry of `transformer_layers_per_block`
    (its first block's, for a per-block list), so where that level has attention the two must agree."""
    if not any(k.startswith("middle_block.") for k in keys):
        cfg["mid_block_type"] = None
        return
    depth = _attention_depth(keys, "middle_block")
    if depth is None:
        if any(k.startswith("middle_block.2.") for k in keys):
            raise UserError("UNet layout not supported: the middle block has two res blocks but no attention")
        cfg["mid_block_type"] = "UNetMidBlock2D"      # diffusers builds it as one res block
        return
    if not depth:
        raise UserError("UNet weights are incomplete: middle_block.1 has attention weights but no transformer blocks")
    depths = cfg["transformer_layers_per_block"]
    if not cfg["down_block_types"][-1].startswith("CrossAttn"):
        depths[-1] = depth          # the last level has no attention: its entry is free for the middle block
        return
    last = depths[-1][0] if isinstance(depths[-1], list) else depths[-1]
    if last != depth:
        raise UserError(f"UNet layout not supported: the middle block has {depth} transformer block(s) and the "
                        f"last down level's first block {last} (diffusers builds both from one number)")


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
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid is not None:
        m.add("mid_block.resnets.0", "middle_block.0", _RESNET)
    if mid == "UNetMidBlock2DCrossAttn":
        m.add("mid_block.attentions.0", "middle_block.1")
        m.add("mid_block.resnets.1", "middle_block.2", _RESNET)
    up_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
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


# ---- the layout in words: `info`, and the memory estimate's arithmetic ------------------------------------------
def unet_layout(cfg: dict[str, Any]) -> dict[str, Any]:
    """The block layout of the UNet a diffusers config builds, in LDM terms:

    - `widths`: channels per resolution level; `res_blocks`: res blocks per level on the down side (the up side
      has one more);
    - `down` / `up`: per level, the transformer depth of each block (0: no attention), down side in
      `input_blocks` order, up side in `output_blocks` order (the lowest resolution first);
    - `middle`: {"res_blocks": 2, "depth": N} stock, {"res_blocks": 1, "depth": 0} one res block (SSD-1B, Vega),
      {"res_blocks": 0, "depth": 0} no middle block (KOALA).
    """
    layers = int(cfg["layers_per_block"])
    levels = len(cfg["block_out_channels"])
    depths = cfg.get("transformer_layers_per_block", 1)
    depths = [depths] * levels if isinstance(depths, int) else list(depths)

    def blocks(depth: int | list[int], count: int, attention: bool) -> list[int]:
        if not attention:
            return [0] * count
        return [int(d) for d in depth] if isinstance(depth, (list, tuple)) else [int(depth)] * count

    down = [blocks(d, layers, t.startswith("CrossAttn")) for d, t in zip(depths, cfg["down_block_types"])]
    reverse = cfg.get("reverse_transformer_layers_per_block") or list(reversed(depths))
    up = [blocks(d, layers + 1, t.startswith("CrossAttn")) for d, t in zip(reverse, cfg["up_block_types"])]
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid is None:
        middle = {"res_blocks": 0, "depth": 0}
    elif mid == "UNetMidBlock2D":
        middle = {"res_blocks": 1, "depth": 0}
    else:
        last = depths[-1]
        middle = {"res_blocks": 2, "depth": int(last[0] if isinstance(last, (list, tuple)) else last)}
    return {"widths": list(cfg["block_out_channels"]), "res_blocks": layers, "down": down, "up": up, "middle": middle}


_SD_LAYOUT = {"widths": [320, 640, 1280, 1280], "res_blocks": 2, "down": [[1, 1], [1, 1], [1, 1], [0, 0]],
              "up": [[0, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], "middle": {"res_blocks": 2, "depth": 1}}
# the released models' layouts (SD1.x, SD2.x, SDXL base), as `unet_layout` gives them
STOCK_LAYOUTS: dict[str, dict[str, Any]] = {
    "sd1": _SD_LAYOUT,
    "sd2": _SD_LAYOUT,
    "sdxl": {"widths": [320, 640, 1280], "res_blocks": 2, "down": [[0, 0], [2, 2], [10, 10]],
             "up": [[10, 10, 10], [2, 2, 2], [0, 0, 0]], "middle": {"res_blocks": 2, "depth": 10}},
}
STOCK_CONTEXT = {"sd1": 768, "sd2": 1024, "sdxl": 2048}   # cross-attention (text) width of the stock models


def layout_differences(layout: dict[str, Any], family: str) -> list[str]:
    """The keys of `layout` (see `unet_layout`) where it differs from `family`'s stock layout."""
    stock = STOCK_LAYOUTS[family]
    return [k for k in stock if layout.get(k) != stock[k]]


def middle_text(middle: dict[str, int]) -> str:
    """The middle block in words."""
    if middle["depth"]:
        return f"res, {middle['depth']} transformer block(s), res"
    return {0: "none", 1: "one res block, no attention"}.get(middle["res_blocks"], "res blocks, no attention")


def heads_source(family: str, hints: dict[str, Any]) -> str:
    """Where the attention head counts of `unet_config_from_ldm(shapes, family, hints)` come from, in words (the
    same order it reads them in: our metadata, then a .yaml's `num_head_channels` or `num_heads`, then the stock
    rule)."""
    if "attention_head_dim" in hints:
        return "the file's lab.architecture metadata"
    rule, value = head_rule(family, hints)
    yaml = Path(str(hints.get("source", ""))).name or "the .yaml"
    if hints.get("num_head_channels") not in (None, -1):
        return f"{yaml} beside the file (num_head_channels {value})"
    if hints.get("num_heads") not in (None, -1):
        return f"{yaml} beside the file (num_heads {value})"
    what = f"{value} heads per layer" if rule == "heads" else f"{value} channels per head"
    return f"{family.upper()}'s stock rule, {what} (assumed: no .yaml or metadata gives them)"


# rough activation bytes a block keeps for the backward pass, per token and channel, relative to each other: a res
# block ≈ 6 tensors of its width (norms, activations, convolutions), a transformer block ≈ 24 (norms, q/k/v and
# outputs of two attentions, the 8× GEGLU feed-forward)
_RES_UNITS, _TRANSFORMER_UNITS = 6, 24


def activation_units(layout: dict[str, Any]) -> float:
    """A number proportional to the activations the UNet of `layout` saves in training at any picture size: Σ over
    blocks of its tokens (¼ per level down) × width × (res block + its transformer blocks). Only its ratio to
    another layout's means anything (the memory estimate scales a family's measured figure by it)."""
    widths, levels = layout["widths"], len(layout["widths"])
    total = 0.0
    for level, blocks in enumerate(layout["down"]):
        total += 4.0 ** -level * widths[level] * sum(_RES_UNITS + _TRANSFORMER_UNITS * d for d in blocks)
    for i, blocks in enumerate(layout["up"]):     # lowest resolution first
        level = levels - 1 - i
        total += 4.0 ** -level * widths[level] * sum(_RES_UNITS + _TRANSFORMER_UNITS * d for d in blocks)
    middle = layout["middle"]
    total += 4.0 ** -(levels - 1) * widths[-1] * (_RES_UNITS * middle["res_blocks"]
                                                   + _TRANSFORMER_UNITS * middle["depth"])
    return total


def attention_rank_units(layout: dict[str, Any], context: int) -> float:
    """Σ (in + out features) over the Linear layers of every transformer block (what a LoRA adds per rank unit on
    kohya's attn_mlp targets): per block 8c (self-attention) + 6c + 2·context (cross-attention) + 14c (GEGLU
    feed-forward), plus 4c for each transformer's proj_in / proj_out."""
    widths, levels = layout["widths"], len(layout["widths"])
    total = 0.0

    def add(width: int, depth: int) -> float:
        return (28 * width + 2 * context) * depth + (4 * width if depth else 0)

    for level, blocks in enumerate(layout["down"]):
        total += sum(add(widths[level], d) for d in blocks)
    for i, blocks in enumerate(layout["up"]):
        total += sum(add(widths[levels - 1 - i], d) for d in blocks)
    return total + add(widths[-1], layout["middle"]["depth"])
