"""modules.hypernetworks.hypernetwork: the hypernetwork list, loading, and the plain attention forward.

As A1111 v1.10.1: `load_hypernetworks(names, multipliers)` fills `shared.loaded_hypernetworks` (in place);
every attention forward runs the context through each loaded hypernetwork's (k, v) modules of the context's
width (`apply_hypernetworks`) before `self.to_k` / `self.to_v`; the plain forward (what `undo_optimizations`
installs, the one training uses) also records the modules on the layer (`layer.hyper_k` / `layer.hyper_v`),
which makes them submodules of the UNet. Files are read with A1111's rules (tests/a1111_ti_hn.py).
"""

import glob
import os

import torch

from modules import devices, shared


def list_hypernetworks(path):
    res = {}
    for filename in sorted(glob.iglob(os.path.join(path or "", "**/*.pt"), recursive=True)):
        res[os.path.splitext(os.path.basename(filename))[0]] = filename
    return res


class Hypernetwork:
    filename = None
    name = None

    def __init__(self, name=None):
        self.name = name
        self.layers = {}
        self.step = 0

    def set_multiplier(self, multiplier):
        for layers in self.layers.values():
            for layer in layers:
                layer.multiplier = multiplier
        return self

    def eval(self):
        for layers in self.layers.values():
            for layer in layers:
                layer.eval()
                for param in layer.parameters():
                    param.requires_grad = False

    def load(self, filename):
        from modules.textual_inversion.textual_inversion import _a1111

        a1111 = _a1111()
        self.filename = filename
        if self.name is None:
            self.name = os.path.splitext(os.path.basename(filename))[0]
        data = a1111.a1111_load(filename)
        self.layers = a1111.a1111_hypernetwork_layers(data)
        for pair in self.layers.values():
            for m in pair:
                m.to(devices.device)
        self.step = data.get("step", 0)
        self.name = data.get("name", self.name)
        self.eval()


def load_hypernetwork(name):
    path = shared.hypernetworks.get(name, None)
    if path is None:
        return None
    hypernetwork = Hypernetwork()
    hypernetwork.load(path)
    return hypernetwork


def load_hypernetworks(names, multipliers=None):
    already_loaded = {}
    for hypernetwork in shared.loaded_hypernetworks:
        if hypernetwork.name in names:
            already_loaded[hypernetwork.name] = hypernetwork
    shared.loaded_hypernetworks.clear()
    for i, name in enumerate(names):
        hypernetwork = already_loaded.get(name, None)
        if hypernetwork is None:
            hypernetwork = load_hypernetwork(name)
        if hypernetwork is None:
            continue
        hypernetwork.set_multiplier(multipliers[i] if multipliers else 1.0)
        shared.loaded_hypernetworks.append(hypernetwork)


def apply_single_hypernetwork(hypernetwork, context_k, context_v, layer=None):
    hypernetwork_layers = (hypernetwork.layers if hypernetwork is not None else {}).get(context_k.shape[2], None)
    if hypernetwork_layers is None:
        return context_k, context_v
    if layer is not None:
        layer.hyper_k = hypernetwork_layers[0]
        layer.hyper_v = hypernetwork_layers[1]
    context_k = devices.cond_cast_unet(hypernetwork_layers[0](devices.cond_cast_float(context_k)))
    context_v = devices.cond_cast_unet(hypernetwork_layers[1](devices.cond_cast_float(context_v)))
    return context_k, context_v


def apply_hypernetworks(hypernetworks, context, layer=None):
    context_k = context
    context_v = context
    for hypernetwork in hypernetworks:
        context_k, context_v = apply_single_hypernetwork(hypernetwork, context_k, context_v, layer)
    return context_k, context_v


def attention_CrossAttention_forward(self, x, context=None, mask=None, **kwargs):
    h = self.heads
    q = self.to_q(x)
    context = x if context is None else context
    context_k, context_v = apply_hypernetworks(shared.loaded_hypernetworks, context, self)
    k = self.to_k(context_k)
    v = self.to_v(context_v)
    b = q.shape[0]
    q, k, v = (t.reshape(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * self.scale
    attn = sim.softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, v)
    out = out.transpose(1, 2).reshape(b, -1, h * out.shape[-1])
    return self.to_out(out)
