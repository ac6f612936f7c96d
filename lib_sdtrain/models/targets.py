"""Which modules of a loaded model kohya's rule trains, and their kohya names (`find_targets`).

The rule and the names are the file format's (`formats/kohya.py` explains both); this module walks the host's
live modules (diffusers, or A1111's LDM/SGM) and applies them. It lives with the models because naming an LDM
UNet module the kohya way needs the UNet's diffusers layout (`ldm_unet.unet_prefix_map`).
"""

from __future__ import annotations

import re
from typing import Any, Collection

from ..errors import UserError
from ..formats.kohya import (_OPENCLIP_BLOCK, _TEXT_LAYER, _UNET_ROOT_PREFIXES, GROUPS, MHA_SLOTS, PREFIX_UNET,
                             TEXT_PARENTS, UNET_ATTN_PARENTS, UNET_CONV_PARENTS, Target, openclip_kohya_names,
                             text_name)


def _strip_unet_root(path: str) -> str:
    for p in _UNET_ROOT_PREFIXES:
        if path.startswith(p):
            return path[len(p):]
    return path


_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_A1111_RULES = [  # A1111 v1.10 `lora.convert_diffusers_name_to_compvis`, UNet part, on '_'-joined diffusers paths
    (re.compile(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"),
     lambda b, kind, i, rest: f"input_blocks_{1 + 3 * b + i}_{1 if kind == 'attentions' else 0}_"
                              f"{_A1111_RESNET.get(rest, rest) if kind == 'resnets' else rest}"),
    (re.compile(r"mid_block_(attentions|resnets)_(\d+)_(.+)"),
     lambda kind, i, rest: f"middle_block_{1 if kind == 'attentions' else 2 * i}_"
                           f"{_A1111_RESNET.get(rest, rest) if kind == 'resnets' else rest}"),
    (re.compile(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"),
     lambda b, kind, i, rest: f"output_blocks_{3 * b + i}_{1 if kind == 'attentions' else 0}_"
                              f"{_A1111_RESNET.get(rest, rest) if kind == 'resnets' else rest}"),
    (re.compile(r"down_blocks_(\d+)_downsamplers_0_conv"), lambda b: f"input_blocks_{3 + 3 * b}_0_op"),
    (re.compile(r"up_blocks_(\d+)_upsamplers_0_conv"), lambda b: f"output_blocks_{2 + 3 * b}_{2 if b > 0 else 1}_conv"),
]


def a1111_unet_module(kohya_path: str) -> str:
    """Where A1111 v1.10 puts an SD1/SD2 kohya UNet name (given as its diffusers path): the LDM module path with
    '_' for '.', by A1111's fixed arithmetic, which assumes the stock layout (two res blocks per level, an
    upsampler after an attention block on every level but the lowest). Names it has no rule for come back as is."""
    name = kohya_path.replace(".", "_")
    for rx, build in _A1111_RULES:
        if m := rx.fullmatch(name):
            return build(*(int(g) if g.isdigit() else g for g in m.groups()))
    return name


_A1111_PLACED = re.compile(r"(down_blocks|up_blocks)\.\d+\.(attentions|resnets|downsamplers|upsamplers)\.|"
                           r"mid_block\.(attentions|resnets)\.")


def a1111_misplaced_module(cfg: dict[str, Any], conv: bool = True) -> tuple[str, str, str] | None:
    """For an SD1/SD2 UNet's diffusers config: the first module kohya would name whose name A1111's stock
    arithmetic (`a1111_unet_module`) turns into another LDM module, as (kohya path, A1111's LDM path, its real
    LDM path, both '_'-joined); None when every one lands right. Without `conv` only attention modules count
    (what a LoRA without LoCon trains). Needs no torch: the preflight asks before any model is loaded."""
    from .ldm_unet import unet_prefix_map

    for a, b, inner in unet_prefix_map(cfg).rules:
        if not _A1111_PLACED.match(a + ".") or (not conv and ".attentions." not in a):
            continue
        leaves = ([(f"{a}.{k}", f"{b}.{v}") for k, v in inner.items()] if inner
                  else [(f"{a}.proj_in", f"{b}.proj_in")] if ".attentions." in a else [(a, b)])
        for kohya, ldm in leaves:
            placed, real = a1111_unet_module(kohya), ldm.replace(".", "_")
            if placed != real:
                return kohya, placed, real
    return None


def stock_layout_refusal(family: str, kohya: str, placed: str, real: str) -> UserError:
    """The refusal of a LoRA-family run on an SD1/SD2 UNet whose layout A1111 would misplace layers of."""
    return UserError(f"this {family.upper()} UNet's layout is not the stock one (e.g. other than 2 res blocks per "
                     f"level), and A1111 places LoRA layers by the stock layout: {kohya!r} would go to {placed!r} "
                     f"instead of {real!r}; LoRA-family files that train its UNet cannot be made for this model")


class UnetNamer:
    """Module path inside the host's UNet → kohya name, for the host's naming and the family's kohya style.

    kohya style: SD1/SD2 diffusers paths, SDXL SGM paths. diffusers UNets carry their config; for A1111's LDM
    UNet the diffusers config is derived from its parameter shapes (`unet_config_from_ldm`).
    """

    def __init__(self, family: str, module_naming: str, unet: Any) -> None:
        from .ldm_unet import unet_config_from_ldm, unet_prefix_map

        self.family, self.naming = family, module_naming
        self._map = None
        self._to_ldm = False
        if module_naming == "diffusers" and family == "sdxl":
            self._map, self._to_ldm = unet_prefix_map(dict(unet.config)), True
        elif module_naming == "ldm" and family != "sdxl":
            shapes = {_strip_unet_root(k): tuple(v.shape) for k, v in unet.state_dict().items()}
            self._map = unet_prefix_map(unet_config_from_ldm(shapes, family))
        elif module_naming not in ("diffusers", "ldm"):
            raise ValueError(f"unknown module naming {module_naming!r}")
        # SD1/SD2 names are diffusers paths, which A1111 turns back into LDM paths by the stock layout's arithmetic:
        # on another layout (e.g. 1 or 3 res blocks per level) its layers would land on the wrong modules or none
        # (a module tree without a diffusers config, such as the small stand-ins of tests, is named as before)
        config = getattr(unet, "config", None)
        self._ldm = None if family == "sdxl" else (self._map if module_naming == "ldm"
                                                    else unet_prefix_map(dict(config)) if config is not None else None)

    def kohya_path(self, path: str) -> str:
        """The dotted path kohya names (diffusers style for SD1/SD2, SGM style for SDXL)."""
        path = _strip_unet_root(path) if self.naming == "ldm" else path
        if self._map is None:
            return path
        out = self._map.a_to_b(path) if self._to_ldm else self._map.b_to_a(path)
        if out is None:
            raise UserError(f"cannot name UNet module {path!r} for a kohya file (unexpected UNet layout)")
        return out

    def __call__(self, path: str) -> str:
        kohya = self.kohya_path(path)
        if self._ldm is not None:
            ldm = _strip_unet_root(path) if self.naming == "ldm" else self._ldm.a_to_b(path)
            a1111 = a1111_unet_module(kohya)
            if ldm is not None and a1111 != ldm.replace(".", "_"):
                raise stock_layout_refusal(self.family, kohya, a1111, ldm.replace(".", "_"))
        return f"{PREFIX_UNET}_{kohya.replace('.', '_')}"


def _openclip_targets(encoder: Any, index: int, count: int, family: str) -> list[Target]:
    """Targets in an OpenCLIP text tower: per block q, k, v, out of `attn`, then `mlp.c_fc`, `mlp.c_proj`.

    SD2 (A1111 conditions on the penultimate block) skips the last block, as on the standalone host.
    """
    import torch.nn as nn

    found = []
    for path, module in encoder.named_modules():
        m = _OPENCLIP_BLOCK.search(path)
        if not m or m.group(2) == "attn.out_proj" or "visual" in path[:m.start()].split("."):
            continue        # out_proj comes with its attn; an image tower (LDM/SGM delete it) is not text
        layer, tail = int(m.group(1)), m.group(2)
        if tail == "attn":
            if not isinstance(module, nn.MultiheadAttention) or module.in_proj_weight is None:
                raise UserError(f"OpenCLIP text module {path!r} is not the MultiheadAttention with stacked q/k/v "
                                f"that open_clip builds ({type(module).__name__}; unexpected text encoder layout)")
        elif not isinstance(module, nn.Linear):
            raise UserError(f"OpenCLIP text module {path!r} is a {type(module).__name__}, not a Linear layer")
        found.append((layer, tail, path, module))
    last = max((f[0] for f in found), default=None) if family == "sd2" else None
    out: list[Target] = []
    for layer, tail, path, module in found:
        if layer == last:
            continue
        names = openclip_kohya_names(path, index, count)
        if tail != "attn":
            out.append(_target(names[0], "text_encoder", index, path, "te_attn_mlp", module))
            continue
        rows, cols = tuple(module.in_proj_weight.shape)
        for name, slot in zip(names, MHA_SLOTS):
            out.append(Target(name=name, component="text_encoder", index=index, path=path, group="te_attn_mlp",
                              kind="linear", weight_shape=(rows // 3, cols), mha_slot=slot))
        proj = module.out_proj
        out.append(Target(name=openclip_kohya_names(f"{path}.out_proj", index, count)[0], component="text_encoder",
                          index=index, path=f"{path}.out_proj", group="te_attn_mlp", kind="linear",
                          weight_shape=tuple(proj.weight.shape), mha_slot="out"))
    return out


def _children(parent: Any) -> list[tuple[str, Any]]:
    """Linear/Conv2d modules below `parent` (kohya walks `parent.named_modules()`)."""
    import torch.nn as nn

    return [(n, m) for n, m in parent.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))]


def _walk(root: Any, parents: Collection[str]) -> list[tuple[str, str, Any]]:
    """(parent class, full path, module) for every target child under parents of the given classes, deduplicated."""
    out, seen = [], set()
    for name, module in root.named_modules():
        cls = type(module).__name__
        if cls not in parents:
            continue
        for child_name, child in _children(module):
            path = f"{name}.{child_name}" if name else child_name
            if path not in seen:
                seen.add(path)
                out.append((cls, path, child))
    return out


def _target(name: str, component: str, index: int, path: str, group: str, module: Any) -> Target:
    import torch.nn as nn

    conv = isinstance(module, nn.Conv2d)
    return Target(name=name, component=component, index=index, path=path, group=group,
                  kind="conv" if conv else "linear", weight_shape=tuple(module.weight.shape),
                  kernel_size=tuple(module.kernel_size) if conv else (1, 1))


def find_targets(parts: Any, groups: Collection[str]) -> list[Target]:
    """The modules kohya's rule selects in `parts` for the golden `groups`, with their kohya names.

    `parts` needs `family`, `module_naming`, `unet` and `text_encoders` (a `ModelParts`, or anything shaped
    like one, e.g. full-size modules on the meta device). Order: UNet first, then each text encoder, each in
    `named_modules()` order. Raises `UserError` for layouts it cannot name.
    """
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown target groups {sorted(unknown)}")
    family, naming = parts.family, getattr(parts, "module_naming", "diffusers")
    out: list[Target] = []
    if "unet_attn" in groups or "unet_conv" in groups:
        namer = UnetNamer(family, naming, parts.unet)
        wanted = (UNET_ATTN_PARENTS if "unet_attn" in groups else ()) + (
            UNET_CONV_PARENTS if "unet_conv" in groups else ())
        for cls, path, module in _walk(parts.unet, wanted):
            group = "unet_attn" if cls in UNET_ATTN_PARENTS else "unet_conv"
            out.append(_target(namer(path), "unet", 0, path, group, module))
    if "te_attn_mlp" in groups:
        count = len(parts.text_encoders)
        for i, encoder in enumerate(parts.text_encoders):
            found = _walk(encoder, TEXT_PARENTS)
            if not found:
                openclip = _openclip_targets(encoder, i, count, family)
                if not openclip:
                    raise UserError(f"text encoder {i + 1} has no CLIP attention/MLP layers to train")
                out += openclip
                continue
            last = None
            if family == "sd2":
                # A1111 conditions SD2 on the penultimate layer: the last layer never affects the output, and
                # kohya's (23-layer) SD2 text model has no such layer, so it is never a target.
                last = max(int(m.group(1)) for _, p, _ in found if (m := _TEXT_LAYER.search(p)))
            for _, path, module in found:
                m = _TEXT_LAYER.search(path)
                if last is not None and m and int(m.group(1)) == last:
                    continue
                out.append(_target(text_name(path, i, count), "text_encoder", i, path, "te_attn_mlp", module))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"two modules map to the same kohya name: {dup[:3]}")
    return out


# ---- tensors: layouts, import --------------------------------------------------------------------------
