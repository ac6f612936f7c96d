"""Test stand-in for the builtin Lora extension's top-level `networks` module, written for this project.

What it imitates (described in /work/shared/reference/a1111-host.md §5; module and attribute names are the ones
the host adapter and the tests touch, everything else is our own):

* `list_available_networks()` indexes every .safetensors/.pt/.ckpt under `cmd_opts.lora_dir` by file stem (and by
  its `ss_output_name`); `load_networks(names, te_multipliers, unet_multipliers, dyn_dims)` makes exactly those
  networks the active set (`loaded_networks`); an empty list deactivates everything. A `<lora:NAME:M>` tag in a
  generation reaches it through `modules.processing` (every registered extra-network kind is activated for each
  picture, with an empty list when the prompt has no tag of that kind).
* Importing the module patches `forward` of `torch.nn.Linear`, `Conv2d`, `MultiheadAttention`, `GroupNorm` and
  `LayerNorm` for the whole process (norm layers get backups too while a network is active, as upstream). A layer that has an A1111 layer name (`network_layer_name`, given to every module of the loaded model)
  compares, before it runs, the active set with the set whose deltas sit in its weights (`network_current_names`).
  When they differ it takes a CPU copy of its original weights the first time (`network_weights_backup`,
  `network_bias_backup`; a (in_proj_weight, out_proj.weight) pair for MultiheadAttention), copies that copy back
  into the weights, then adds every active network's delta in place. So merges survive the generation that made
  them and are undone lazily by the next forward that wants another set.
* The copy-back (`network_restore_weights_from_backup`) does NOT switch autograd off, exactly like upstream: a
  caller that runs it with grad enabled on weights that require grad gets torch's "a leaf Variable that requires
  grad is being used in an in-place operation". A1111 never freezes the model (every weight requires grad), so
  that is what happens to a trainer that undoes the merges carelessly.
* Files: kohya LoRA/LoCon (`lora_up`/`lora_down`/`alpha`) and LoHa (`hada_*`) modules, either with A1111's DoRA
  step when the module has a `dora_scale` (§ DoRA in tests/a1111_lora_math.py); a key's module part is the
  text before its first dot, renamed from kohya/diffusers style to A1111's names by the rules of §5.
"""

from __future__ import annotations

import os
import re

import torch

from modules import script_callbacks, shared

loaded_networks = []
available_networks = {}
available_network_aliases = {}
list_calls = 0                     # how often the list was rebuilt (a test checks the host's refresh)
load_calls = []                    # the name lists load_networks was called with


# ---- the list of files ---------------------------------------------------------------------------------
class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name, self.filename = name, filename
        self.metadata = _read_metadata(filename)
        self.alias = self.metadata.get("ss_output_name") or name


def _read_metadata(filename):
    if not filename.endswith(".safetensors"):
        return {}
    from modules import sd_models

    try:
        return sd_models.read_metadata_from_safetensors(filename)
    except Exception:  # noqa: BLE001 - an unreadable header lists the file without metadata, as upstream
        return {}


def list_available_networks():
    global list_calls
    list_calls += 1
    available_networks.clear()
    available_network_aliases.clear()
    folder = shared.cmd_opts.lora_dir
    os.makedirs(folder, exist_ok=True)
    for path in shared.walk_files(folder, allowed_extensions=[".pt", ".ckpt", ".safetensors"]):
        stem = os.path.splitext(os.path.basename(path))[0]
        entry = NetworkOnDisk(stem, path)
        available_networks[stem] = entry
        available_network_aliases[stem] = entry
        available_network_aliases.setdefault(entry.alias, entry)


# ---- kohya names → A1111 layer names ------------------------------------------------------------------------
_RESNET_PARTS = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _resnet_tail(tail):
    for src, dst in _RESNET_PARTS.items():
        if tail == src or tail.startswith(src + "_"):
            return dst + tail[len(src):]
    return tail


def _unet_block(kind, tail):
    return ("1_" + tail) if kind == "attentions" else ("0_" + _resnet_tail(tail))


def _rename_unet(rest):
    """`rest` = kohya name after "lora_unet_" in diffusers style → A1111 name after "diffusion_model_" (or None)."""
    fixed = {"conv_in": "input_blocks_0_0", "conv_out": "out_2"}
    if rest in fixed:
        return fixed[rest]
    m = re.fullmatch(r"time_embedding_linear_(\d+)", rest)
    if m:
        return f"time_embed_{2 * int(m.group(1)) - 2}"
    m = re.fullmatch(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", rest)
    if m:
        block, kind, i, tail = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        return f"input_blocks_{1 + 3 * block + i}_" + _unet_block(kind, tail)
    m = re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv", rest)
    if m:
        return f"input_blocks_{3 + 3 * int(m.group(1))}_0_op"
    m = re.fullmatch(r"mid_block_(attentions|resnets)_(\d+)_(.+)", rest)
    if m:
        kind, i, tail = m.group(1), int(m.group(2)), m.group(3)
        return "middle_block_" + (f"1_{tail}" if kind == "attentions" else f"{2 * i}_" + _resnet_tail(tail))
    m = re.fullmatch(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", rest)
    if m:
        block, kind, i, tail = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        return f"output_blocks_{3 * block + i}_" + _unet_block(kind, tail)
    m = re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv", rest)
    if m:
        block = int(m.group(1))
        return f"output_blocks_{2 + 3 * block}_{2 if block > 0 else 1}_conv"
    return None


def _rename_openclip(layer_tail):
    """HF CLIP layer tail ("self_attn_q_proj", "mlp_fc1", ...) → open_clip resblock tail."""
    for src, dst in (("self_attn_", "attn_"), ("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj")):
        if layer_tail.startswith(src):
            return dst + layer_tail[len(src):]
    return layer_tail


def candidate_names(module_key, is_sd2):
    """A1111 names to try, in order, for the module part of a kohya key."""
    out = []
    if module_key.startswith("lora_unet_"):
        renamed = _rename_unet(module_key[len("lora_unet_"):])
        if renamed is not None:
            out.append("diffusion_model_" + renamed)
        out.append("diffusion_model_" + module_key[len("lora_unet_"):])     # SGM-named (SDXL) files
    elif module_key.startswith("lora_te_text_model_"):
        rest = module_key[len("lora_te_text_model_"):]
        m = re.fullmatch(r"encoder_layers_(\d+)_(.+)", rest)
        if is_sd2 and m:
            out.append(f"model_transformer_resblocks_{m.group(1)}_" + _rename_openclip(m.group(2)))
        else:
            out.append("transformer_text_model_" + rest)
    elif module_key.startswith("lora_te1_text_model_"):
        rest = module_key[len("lora_te1_text_model_"):]
        out += ["0_transformer_text_model_" + rest, "transformer_text_model_" + rest]
    elif module_key.startswith("lora_te2_text_model_"):
        m = re.fullmatch(r"encoder_layers_(\d+)_(.+)", module_key[len("lora_te2_text_model_"):])
        if m:
            out.append(f"1_model_transformer_resblocks_{m.group(1)}_" + _rename_openclip(m.group(2)))
    return out


# ---- layer names on the model ---------------------------------------------------------------------------
def assign_network_names_to_compvis_modules(sd_model):
    """Give every module of the text encoder(s) and of `sd_model.model` its A1111 layer name."""
    mapping = {}

    def name_all(root, prefix):
        for path, module in root.named_modules():
            layer = prefix + path.replace(".", "_")
            mapping[layer] = module
            module.network_layer_name = layer

    if getattr(sd_model, "is_sdxl", False):
        for i, embedder in enumerate(sd_model.conditioner.embedders):
            if hasattr(embedder, "wrapped"):
                name_all(embedder.wrapped, f"{i}_")
    else:
        text = sd_model.cond_stage_model
        name_all(getattr(text, "wrapped", text), "")
    name_all(sd_model.model, "")
    sd_model.network_layer_mapping = mapping


def _resolve(module_key, sd_model):
    mapping = sd_model.network_layer_mapping
    for name in candidate_names(module_key, bool(getattr(sd_model, "is_sd2", False))):
        if name in mapping:
            return name
        m = re.fullmatch(r"(.+)_(q|k|v|out)_proj", name)
        if m and isinstance(mapping.get(m.group(1)), torch.nn.MultiheadAttention):
            return name             # filed under the projection's name; the MultiheadAttention picks it up
    return None


# ---- one network in memory -----------------------------------------------------------------------------------
class LayerDelta:
    """The tensors one file holds for one A1111 layer, and the weight change they make."""

    def __init__(self, layer, tensors):
        self.layer, self.w = layer, tensors

    def _scale(self, rank):
        if "scale" in self.w:
            return float(self.w["scale"])
        if "alpha" in self.w and rank:
            return float(self.w["alpha"]) / rank
        return 1.0

    def delta_for(self, weight, multiplier):
        w = {k: v.to(device=weight.device, dtype=torch.float32) for k, v in self.w.items()}
        shape = tuple(weight.shape)
        if "lora_up.weight" in w:
            up, down = w["lora_up.weight"], w["lora_down.weight"]
            product = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            rank = down.shape[0]
        elif "hada_w1_a" in w:
            one = w["hada_w1_a"] @ w["hada_w1_b"].reshape(w["hada_w1_b"].shape[0], -1)
            two = w["hada_w2_a"] @ w["hada_w2_b"].reshape(w["hada_w2_b"].shape[0], -1)
            product, rank = one * two, w["hada_w1_b"].shape[0]
        else:
            raise RuntimeError(f"{self.layer}: module kind not handled by the fake ({sorted(w)})")
        delta = product.reshape(shape) * self._scale(rank)
        if "dora_scale" in w:
            # A1111 v1.10: rescale W + delta per input column (norm over all axes but 1) to dora_scale, then
            # take the difference to W; the multiplier comes after
            merged = weight.float() + delta
            norm = merged.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, shape[1], *([1] * (len(shape) - 2)))
            delta = merged * (w["dora_scale"] / norm) - weight.float()
        return (delta * multiplier).to(weight.dtype)


class Network:
    def __init__(self, name, on_disk):
        self.name, self.on_disk = name, on_disk
        self.layers = {}
        self.te_multiplier = self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.unmatched = []

    def multiplier(self, layer):
        return self.te_multiplier if "transformer" in layer[:20] else self.unet_multiplier


def _read_network(name, on_disk, sd_model):
    from lib_sdtrain.formats.safetensors_io import read_safetensors

    tensors = read_safetensors(on_disk.filename)[0] if on_disk.filename.endswith(".safetensors") else \
        torch.load(on_disk.filename, map_location="cpu")
    if getattr(sd_model, "network_layer_mapping", None) is None:
        assign_network_names_to_compvis_modules(sd_model)
    grouped = {}
    for key, value in tensors.items():
        module_key, _, part = key.partition(".")
        grouped.setdefault(module_key, {})[part] = value
    net = Network(name, on_disk)
    for module_key, parts in grouped.items():
        layer = _resolve(module_key, sd_model)
        if layer is None:
            net.unmatched.append(module_key)
            continue
        net.layers[layer] = LayerDelta(layer, parts)
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    load_calls.append(list(names))
    loaded_networks.clear()
    if any(n not in available_network_aliases for n in names):
        list_available_networks()
    for i, name in enumerate(names):
        on_disk = available_network_aliases.get(name)
        if on_disk is None:
            continue                                    # upstream notes "Lora not found" and goes on
        net = _read_network(name, on_disk, shared.sd_model)
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else net.te_multiplier
        net.dyn_dim = dyn_dims[i] if dyn_dims else None
        loaded_networks.append(net)


def activate_from_prompt(tag_args):
    """The `lora` extra-network handler: `tag_args` = one argument list per `<lora:...>` tag of the prompt."""
    names = [a[0] for a in tag_args]
    te = [float(a[1]) if len(a) > 1 else 1.0 for a in tag_args]
    unet = [float(a[2]) if len(a) > 2 else t for a, t in zip(tag_args, te)]
    load_networks(names, te, unet)


# ---- merging into the weights ---------------------------------------------------------------------------
def _backup(t):
    return None if t is None else t.detach().to("cpu", copy=True)


def _copy_into(owner, attr, saved):
    if saved is None:
        setattr(owner, attr, None)
    else:
        getattr(owner, attr).copy_(saved)       # in the caller's grad mode, as upstream


def network_restore_weights_from_backup(self):
    weights = getattr(self, "network_weights_backup", None)
    bias = getattr(self, "network_bias_backup", None)
    if weights is None and bias is None:
        return
    is_mha = isinstance(self, torch.nn.MultiheadAttention)
    if weights is not None:
        if is_mha:
            _copy_into(self, "in_proj_weight", weights[0])
            _copy_into(self.out_proj, "weight", weights[1])
        else:
            _copy_into(self, "weight", weights)
    _copy_into(self.out_proj if is_mha else self, "bias", bias)


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def _wanted():
    return tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded_networks)


def network_apply_weights(self):
    layer = getattr(self, "network_layer_name", None)
    if layer is None:
        return
    wanted = _wanted()
    current = getattr(self, "network_current_names", ())
    is_mha = isinstance(self, torch.nn.MultiheadAttention)
    if wanted and getattr(self, "network_weights_backup", None) is None:
        if current:
            raise RuntimeError(f"{layer}: weights were changed but no backup exists")
        self.network_weights_backup = (_backup(self.in_proj_weight), _backup(self.out_proj.weight)) if is_mha \
            else _backup(getattr(self, "weight", None))
    if wanted and getattr(self, "network_bias_backup", None) is None:
        self.network_bias_backup = _backup(self.out_proj.bias if is_mha else getattr(self, "bias", None))
    if current == wanted:
        return
    network_restore_weights_from_backup(self)
    for net in loaded_networks:
        with torch.no_grad():
            if is_mha:
                parts = [net.layers.get(f"{layer}_{p}_proj") for p in ("q", "k", "v", "out")]
                if all(parts):
                    m = net.multiplier(layer + "_q_proj")
                    rows = self.in_proj_weight.chunk(3, 0)
                    stacked = torch.cat([d.delta_for(r, m) for d, r in zip(parts[:3], rows)])
                    self.in_proj_weight += stacked
                    self.out_proj.weight += parts[3].delta_for(self.out_proj.weight, m)
                continue
            entry = net.layers.get(layer)
            if entry is not None and getattr(self, "weight", None) is not None:
                self.weight += entry.delta_for(self.weight, net.multiplier(layer))
    self.network_current_names = wanted


# ---- the process-wide forward patch ----------------------------------------------------------------------
_PATCHED = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention, torch.nn.GroupNorm, torch.nn.LayerNorm)
_originals = {}


def _patched(cls):
    original = cls.forward

    def forward(self, *args, **kwargs):
        network_apply_weights(self)
        return original(self, *args, **kwargs)

    forward.fake_lora_patch = True
    return original, forward


def install():
    for cls in _PATCHED:
        if cls not in _originals:
            _originals[cls], cls.forward = _patched(cls)


def uninstall():
    """Put the torch classes back (the fake's `installed()` calls this when a test module is done)."""
    for cls, original in list(_originals.items()):
        cls.forward = original
        del _originals[cls]


install()
script_callbacks.on_model_loaded(assign_network_names_to_compvis_modules)
from modules import processing  # noqa: E402 - registers the `lora` extra-network kind

processing.extra_network_handlers["lora"] = activate_from_prompt
list_available_networks()
