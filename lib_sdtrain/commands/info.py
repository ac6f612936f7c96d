"""Show what a model file is: family, prediction type, parameter counts, hashes and architecture.

A checkpoint is described as the tool sees it: its family and prediction type (and where the type was read
from: our metadata, modelspec metadata, a .yaml beside it, A1111's SD2 test, or the family's default), its native
size and where that came from, its UNet layout (one line for the family's stock layout; otherwise widths, res
blocks per level, transformer depth of each block on the down and up sides and the middle block, against the
stock ones), its attention heads and where they came from (our metadata, the .yaml, or the stock rule, assumed),
the LoRA targets A1111 places right on it, and whether training it is supported or what is refused and why.

A kohya / LyCORIS network file (LoRA, LoCon, LoHa, LoKr, DoRA) is described as a network instead, the way the
kohya GUI's "Verify LoRA" is used: its module types and parts, ranks and alphas, what its metadata says it was
trained on and for how long, the size of each module's change (the largest, the median) and whether any weight
is not finite. Only the .safetensors header and tensors are read; nothing is executed.

An A1111 embedding (`.pt`, `.bin` or `.safetensors`) is described by its vectors: how many, their widths and the
model family those widths belong to, the word that calls it in a prompt (A1111 uses the file name), its steps and
the checkpoint it was trained on, and the vectors' sizes. A hypernetwork `.pt` by its widths, layer structure,
activation, norm and dropout, steps, checkpoint and parameter count. Pickled files are read through the safe
unpickler, which refuses anything but tensors and plain data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="single-file checkpoint (.safetensors; .ckpt through the safe loader), a "
                                      "kohya / LyCORIS network file (.safetensors), or an A1111 embedding or "
                                      "hypernetwork (.pt / .bin / .safetensors)")
    parser.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--no-hash", action="store_true", help="skip hashing the file (fast for big models)")
    parser.add_argument("--check", action="store_true",
                        help="checkpoints: also load every weight as training would, to find a damaged file (a "
                             "missing or misshapen tensor); without it the description comes from the header alone")


NETWORK_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def is_network_file(path: str) -> bool:
    """Whether a .safetensors file is a kohya-layout network (its tensor names), from the header alone."""
    from ..formats.safetensors_io import read_header

    if not str(path).lower().endswith(".safetensors") or not Path(path).is_file():
        return False
    names = read_header(path).tensors
    return bool(names) and all(n.startswith(NETWORK_PREFIXES) for n in names)


def describe_network(path: str) -> dict:
    """The network file's modules, ranks, training record and change sizes (see the module docstring)."""
    import torch

    from ..formats import kohya
    from ..formats.safetensors_io import json_table

    net = kohya.import_kohya(path)
    meta = net.metadata
    parts: dict[str, int] = {}
    ranks, alphas, norms, bad, conv = set(), set(), [], [], 0
    for name, w in net.modules.items():
        part = "unet" if name.startswith("lora_unet_") else name.split("_")[1]   # te, te1, te2
        parts[part] = parts.get(part, 0) + 1
        if any(not torch.isfinite(t).all() for t in w.values()):
            bad.append(name)
            continue
        algo = kohya.module_algorithm(w)
        if algo == "lora":
            down, up = w["lora_down.weight"], w["lora_up.weight"]
            ranks.add(down.shape[0])
            conv += down.dim() == 4
            size = float((up.flatten(1) @ down.flatten(1)).norm())
        elif algo == "loha":
            ranks.add(w["hada_w1_b"].shape[0])
            size = float(((w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])).norm())
        else:
            w1, w2 = kohya.lokr_full_factors(w)
            size = float(w1.norm() * w2.norm())           # the Kronecker product's norm, without building it
        if "alpha" in w:
            alphas.add(float(w["alpha"]))
        norms.append((size * abs(kohya.module_scale(w)), name))
    norms.sort(reverse=True)
    tags = {}
    for counts in (json_table(meta.get("ss_tag_frequency")) or {}).values():
        if isinstance(counts, dict):
            for tag, n in counts.items():
                if isinstance(n, (int, float)):
                    tags[str(tag)] = tags.get(str(tag), 0) + n
    top = sorted(tags.items(), key=lambda kv: -kv[1])[:8]
    algos = sorted(net.algorithms())
    return {
        "file": str(path),
        "kind": "network (" + ", ".join(algos) + (", DoRA magnitudes" if any(
            "dora_scale" in w for w in net.modules.values()) else "") + ")",
        "modules": parts,
        "conv_modules": conv,
        "ranks": sorted(ranks),
        "alphas": sorted(alphas),
        "change_largest": [f"{n:.4g} {name}" for n, name in norms[:3]],
        "change_median": f"{norms[len(norms) // 2][0]:.4g}" if norms else "",
        "not_finite": bad,
        "base_model": meta.get("ss_sd_model_name") or meta.get("ss_base_model_version") or "",
        "trained": ", ".join(f"{k[3:]} {meta[k]}" for k in ("ss_steps", "ss_epoch", "ss_learning_rate",
                                                             "ss_num_train_images", "ss_network_module")
                             if meta.get(k)),
        "top_tags": ", ".join(f"{t} ({n})" for t, n in top),
        "output_name": meta.get("ss_output_name", ""),
        "model_hash": meta.get("sshs_model_hash", ""),
    }


EMBEDDING_WIDTHS = {(768,): "SD1", (1024,): "SD2", (768, 1280): "SDXL"}   # vector width(s) → the family


def pickled_kind(path: str) -> str:
    """"embedding", "hypernetwork" or "" (a checkpoint or anything else) for a .pt / .bin file, from its pickled
    structure alone (no tensor is read); a .ckpt or .safetensors file gives ""."""
    from ..formats.safe_pickle import open_checkpoint

    if Path(path).suffix.lower() not in (".pt", ".bin") or not Path(path).is_file():
        return ""
    with open_checkpoint(path) as archive:
        root = archive.root
    if not isinstance(root, dict):
        return ""
    if "string_to_param" in root or {"clip_l", "clip_g"} <= set(root) or (len(root) == 1 and "state_dict" not in root):
        return "embedding"
    if "layer_structure" in root and any(type(k) is int for k in root):
        return "hypernetwork"
    return ""


def is_embedding_safetensors(path: str) -> bool:
    """A .safetensors embedding, from its header: clip_l and clip_g (SDXL; A1111 uses only those) or one tensor
    (`emb_params`, as A1111 and kohya write it; A1111 reads any single tensor, of one vector or a [vectors, width]
    matrix)."""
    from ..formats.safetensors_io import read_header

    if not str(path).lower().endswith(".safetensors") or not Path(path).is_file():
        return False
    tensors = read_header(path).tensors
    return {"clip_l", "clip_g"} <= set(tensors) or len(tensors) == 1   # (the reader refuses other shapes, saying so)


def describe_embedding(path: str) -> dict:
    """An embedding file's vectors and record (see the module docstring)."""
    import torch

    from ..methods.embedding import embedding_vectors

    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        from ..formats.safetensors_io import read_safetensors

        data, meta = read_safetensors(p)
    else:
        from ..formats.safe_pickle import load_checkpoint

        data, meta = load_checkpoint(p), {}
    vectors = embedding_vectors(data, p.name)
    widths = tuple(v.shape[1] for v in vectors)
    bad = [f"vectors {i}" for i, v in enumerate(vectors) if not torch.isfinite(v).all()]
    norms = [f"{float(n):.4g}" for v in vectors for n in v.norm(dim=1)] if not bad else []
    step = data.get("step") if isinstance(data.get("step"), int) else meta.get("ss_steps", "")
    return {
        "file": str(p),
        "kind": "embedding (textual inversion)",
        "prompt_word": p.stem,
        "vectors": vectors[0].shape[0],
        "widths": list(widths),
        "family": EMBEDDING_WIDTHS.get(widths, "unknown (no SD family has these widths)"),
        "vector_norms": norms,
        "not_finite": bad,
        "steps": "" if step is None else str(step),
        "base_model": str(data.get("sd_checkpoint_name") or meta.get("ss_sd_model_name") or ""),
        "base_hash": str(data.get("sd_checkpoint") or meta.get("sshs_model_hash") or ""),
    }


def describe_hypernetwork(path: str) -> dict:
    """A hypernetwork file's structure and record (see the module docstring)."""
    import torch

    from ..formats.a1111 import read_hypernetwork
    from ..formats.safe_pickle import load_checkpoint

    p = Path(path)
    data = load_checkpoint(p)
    structure, pairs = read_hypernetwork(data, p.name)
    params, bad = 0, []
    for width, pair in pairs.items():
        for kv, sd in zip("kv", pair):
            for name, t in sd.items():
                params += t.numel()
                if t.is_floating_point() and not torch.isfinite(t).all():
                    bad.append(f"{width}.{kv}.{name}")
    dropout = data.get("dropout_structure") if data.get("use_dropout") else None
    return {
        "file": str(p),
        "kind": "hypernetwork",
        "name": str(data.get("name") or p.stem),
        "widths": list(pairs),
        "layer_structure": structure["layer_structure"],
        "activation": structure["activation_func"],
        "layer_norm": structure["is_layer_norm"],
        "dropout": list(dropout) if isinstance(dropout, (list, tuple)) and dropout else "none",
        "parameters": params,
        "not_finite": bad,
        "steps": str(data.get("step", "")),
        "base_model": str(data.get("sd_checkpoint_name") or ""),
        "base_hash": str(data.get("sd_checkpoint") or ""),
    }


def describe(model: str, prediction: str | None = None, with_hash: bool = True, check: bool = False) -> dict:
    """A checkpoint as the tool sees it, from its header alone (`models.checkpoint.read_checkpoint_header`):
    no module is built and no weight read, except the UNet of an SD2 file that nothing says the prediction type
    of (A1111's test runs it). The hashes stream the file. `check`: also load the whole model as training does
    first, so a damaged file (a tensor missing or misshapen inside a block) is refused with the loader's reason,
    which the header alone does not show."""
    from ..hosts import ModelInfo
    from ..models.checkpoint import load_checkpoint, read_checkpoint_header
    from ..models.native import probe_model

    tested = None
    if check:   # raises UserError naming what is damaged; the loaded modules are dropped at once
        tested = load_checkpoint(model, prediction=prediction, device="cpu").arch.prediction
    # the prediction the load found: an SD2 file without a hint is then not tested a second time
    header = read_checkpoint_header(model, prediction=prediction, tested=tested)
    arch = header.arch
    params = header.parameters
    info = ModelInfo(name=str(header.path.stem), path=str(header.path))
    if with_hash:
        info.fill_hashes()
    probe = probe_model(header.path)          # what sampling and training take as the native size
    layout, heads = unet_description(arch.family, arch.unet)
    return {
        "file": str(header.path),
        "family": FAMILY_NAMES[arch.family] + (f" {arch.prediction}" if arch.family == "sd2" else ""),
        "prediction": arch.prediction,
        "prediction_from": header.sources.get("prediction", ""),
        "native_size": probe.native,
        "native_size_from": probe.source,
        "latent_scale": arch.latent_scale,
        "parameters": params,
        "parameters_total": sum(params.values()),
        "dtypes": header.dtypes,
        "extra_tensors": header.extras,
        "unet_layout": layout,
        "attention_heads": heads,
        "attention_heads_from": header.sources.get("heads", ""),
        "context_dim": arch.unet["cross_attention_dim"],
        "text_layers": [t["num_hidden_layers"] for t in arch.text],
        **training_support(arch.family, arch.unet),
        "sha256": info.sha256,
        "shorthash": info.shorthash,
        "legacy_hash": info.legacy_hash,
    }


FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
LORA_TARGETS = ("attn", "attn_mlp", "full")


def unet_description(family: str, cfg: dict) -> tuple[dict, str]:
    """(the UNet's layout, with `stock`: whether it is the family's stock one and `differs`: what is not; its
    attention heads per level in words, '-' for a level without attention)."""
    from ..models import ldm_unet

    layout = ldm_unet.unet_layout(cfg)
    differs = ldm_unet.layout_differences(layout, family)
    levels = len(layout["widths"])
    attention = [any(layout["down"][i]) or any(layout["up"][levels - 1 - i]) for i in range(levels)]
    attention[-1] = attention[-1] or bool(layout["middle"]["depth"])
    given = cfg["attention_head_dim"]
    per_level = list(given) if isinstance(given, (list, tuple)) else [given] * levels
    shown = [str(h) if a else "-" for h, a in zip(per_level, attention)]
    heads = f"{shown[0]} per layer" if len(set(shown)) == 1 else f"{', '.join(shown)} per level"
    return {"stock": not differs, "differs": differs, **layout}, heads


def training_support(family: str, cfg: dict) -> dict:
    """`lora_targets`: the LoRA targets whose UNet layers A1111 v1.10 puts where they were trained; `training`:
    "supported", or what is refused and why (the refusal the run itself gives)."""
    from ..models.targets import a1111_misplaced_module, stock_layout_refusal

    if family == "sdxl":        # SDXL kohya names are the UNet's own SGM paths: A1111 finds them on any layout
        return {"lora_targets": list(LORA_TARGETS), "training": "supported"}
    attn, conv = a1111_misplaced_module(cfg, conv=False), a1111_misplaced_module(cfg, conv=True)
    targets = [] if attn else ["attn", "attn_mlp"] + ([] if conv else ["full"])
    if not conv:
        return {"lora_targets": targets, "training": "supported"}
    refused = "LoRA-family runs that train the UNet" if attn else "LoRA-family runs with targets = full or LoCon"
    return {"lora_targets": targets,
            "training": f"{refused} are refused: {stock_layout_refusal(family, *(attn or conv))}. Other methods "
                        "(text-encoder-only LoRA, embeddings, hypernetworks, DreamBooth, fine-tuning) are supported"}


def _layout_text(layout: dict, family: str) -> list[str]:
    """The UNet layout for the table: one line for a stock layout, else its parts against the stock ones."""
    from ..models.ldm_unet import STOCK_LAYOUTS, middle_text

    name = FAMILY_NAMES[family]
    stock = STOCK_LAYOUTS[family]

    def widths(w: list[int]) -> str:
        return ", ".join(map(str, w))

    def depths(levels: list[list[int]]) -> str:
        return " | ".join(" ".join(map(str, blocks)) for blocks in levels)

    if layout["stock"]:
        return [f"stock {name} layout"]
    if layout["differs"] == ["widths"]:
        return [f"stock {name} blocks at other widths: {widths(layout['widths'])} (stock {widths(stock['widths'])})"]
    parts = {"widths": (widths(layout["widths"]), widths(stock["widths"])),
             "res_blocks": (f"{layout['res_blocks']} per level", f"{stock['res_blocks']}"),
             "down": (depths(layout["down"]), depths(stock["down"])),
             "up": (depths(layout["up"]) + " (output_blocks order)", depths(stock["up"])),
             "middle": (middle_text(layout["middle"]), middle_text(stock["middle"]))}
    labels = {"widths": "widths", "res_blocks": "res blocks", "down": "down depths", "up": "up depths",
              "middle": "middle block"}
    lines = [f"not the stock {name} layout (depths: transformer blocks in each block, levels split by |)"]
    for key, (mine, theirs) in parts.items():
        lines.append(f"  {labels[key]:<13} {mine}" + (f"   (stock {theirs})" if key in layout["differs"] else ""))
    return lines


def describe_any(path: str, prediction: str | None = None, with_hash: bool = True,
                 check: bool = False) -> tuple[dict, bool]:
    """(description, whether it is an add-on file: network, embedding or hypernetwork) of any file `info` reads."""
    if is_network_file(path):
        return describe_network(path), True
    kind = "embedding" if is_embedding_safetensors(path) else pickled_kind(path)
    if kind == "embedding":
        return describe_embedding(path), True
    if kind == "hypernetwork":
        return describe_hypernetwork(path), True
    return describe(path, prediction, with_hash, check), False


def run(args: argparse.Namespace) -> int:
    from ..data.scan import shown
    from ..errors import UserError

    if Path(args.model).is_dir():
        raise UserError(f"{shown(args.model)} is a folder; info describes one file: a checkpoint (.safetensors, "
                        ".ckpt), a LoRA / LyCORIS network (.safetensors), or an A1111 embedding or hypernetwork "
                        "(.pt / .bin / .safetensors). A diffusers folder can be made one checkpoint with "
                        "`convert FOLDER --to single-file --output DIR`")
    d, network = describe_any(args.model, args.prediction, not args.no_hash, getattr(args, "check", False))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    width = max(len(k) for k in d)
    family = {v: k for k, v in FAMILY_NAMES.items()}.get(str(d.get("family", "")).split(" ")[0])
    for key, value in d.items():
        if network:
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items())
            elif isinstance(value, list):
                value = "; ".join(map(str, value)) if value else "none"
            if key == "not_finite" and value != "none":
                value = f"WARNING: {value}"
        elif key == "unet_layout" and family:
            first, *rest = _layout_text(value, family)
            print(f"{key:<{width}}  {first}")
            for line in rest:
                print(f"{'':<{width}}  {line}")
            continue
        elif key == "lora_targets":
            value = ", ".join(value) if value else "none A1111 places right on the UNet (text encoder only)"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in value.items())
        elif key == "parameters_total":
            value = f"{value / 1e6:.2f}M"
        elif key in ("sha256", "shorthash", "legacy_hash") and not value:
            value = "not computed (--no-hash)"
        # escaped: the file name and a downloaded file's metadata (base model, output name, tags) are not ours, and
        # a terminal takes their escape sequences as commands (clear the screen, set the title or the clipboard)
        print(f"{key:<{width}}  {shown(value)}")
    return 0
