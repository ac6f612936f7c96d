"""Stand-in for `modules.hypernetworks.hypernetwork`: the list of files, loading by name, and how every
attention forward of A1111 v1.10.1 runs the loaded hypernetworks (a1111-host.md §4), written for these tests.

* `list_hypernetworks(folder)`: stem → path of every `**/*.pt` below the folder.
* `load_hypernetworks(names, multipliers)` refills `shared.loaded_hypernetworks` in place (objects already
  loaded under a wanted name are reused).
* Before K and V are computed, the cross-attention context goes through each loaded hypernetwork's (k, v)
  modules of the context's width (`apply_hypernetworks`). The plain attention forward (the one installed while
  optimisations are undone, which training uses) also hangs the modules it used on the attention layer as
  `hyper_k` / `hyper_v`, so they become UNet submodules — an upstream side effect the host has to clean up.
* Files are read with A1111's rules (tests/a1111_ti_hn.py).
"""

import glob
import os

import torch

from modules import devices, shared


def list_hypernetworks(path):
    found = sorted(glob.glob(os.path.join(path or "", "**", "*.pt"), recursive=True))
    return {os.path.splitext(os.path.basename(f))[0]: f for f in found}


class Hypernetwork:
    """A loaded file: `layers` maps a context width to the (k module, v module) pair for it."""

    filename = None
    name = None

    def __init__(self, name=None):
        self.name, self.layers, self.step = name, {}, 0

    def _modules(self):
        return [m for pair in self.layers.values() for m in pair]

    def set_multiplier(self, multiplier):
        for m in self._modules():
            m.multiplier = multiplier
        return self

    def eval(self):
        for m in self._modules():
            m.eval()
            m.requires_grad_(False)

    def load(self, filename):
        from modules.textual_inversion.textual_inversion import _file_rules

        rules = _file_rules()
        contents = rules.a1111_load(filename)
        self.filename = filename
        self.layers = {width: tuple(m.to(devices.device) for m in pair)
                       for width, pair in rules.a1111_hypernetwork_layers(contents).items()}
        self.step = contents.get("step", 0)
        self.name = contents.get("name", self.name or os.path.splitext(os.path.basename(filename))[0])
        self.eval()


def load_hypernetwork(name):
    path = shared.hypernetworks.get(name)
    if path is None:
        return None
    net = Hypernetwork()
    net.load(path)
    return net


def load_hypernetworks(names, multipliers=None):
    live = shared.loaded_hypernetworks
    reusable = {net.name: net for net in live if net.name in names}
    live.clear()
    for i, name in enumerate(names):
        net = reusable.get(name) or load_hypernetwork(name)
        if net is not None:
            live.append(net.set_multiplier(multipliers[i] if multipliers else 1.0))


def apply_hypernetworks(hypernetworks, context, layer=None):
    """(context for K, context for V) after every hypernetwork that has modules for this width."""
    for_k = for_v = context
    for net in hypernetworks:
        pair = (net.layers if net is not None else {}).get(for_k.shape[2])
        if pair is None:
            continue
        if layer is not None:                       # the plain forward records what it used
            layer.hyper_k, layer.hyper_v = pair
        for_k = devices.cond_cast_unet(pair[0](devices.cond_cast_float(for_k)))
        for_v = devices.cond_cast_unet(pair[1](devices.cond_cast_float(for_v)))
    return for_k, for_v


def attention_CrossAttention_forward(self, x, context=None, mask=None, **kwargs):
    """Plain (unoptimised) attention with hypernetworks: softmax(QKᵀ·scale)·V over `self.heads` heads."""
    source = x if context is None else context
    ctx_k, ctx_v = apply_hypernetworks(shared.loaded_hypernetworks, source, self)
    batch, heads = x.shape[0], self.heads

    def split(t):
        return t.reshape(batch, t.shape[1], heads, -1).permute(0, 2, 1, 3)

    q, k, v = split(self.to_q(x)), split(self.to_k(ctx_k)), split(self.to_v(ctx_v))
    weights = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
    mixed = (weights @ v).permute(0, 2, 1, 3).reshape(batch, x.shape[1], -1)
    return self.to_out(mixed)
