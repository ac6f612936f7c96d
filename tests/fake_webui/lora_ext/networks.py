"""Fake of the builtin Lora extension's `networks` module (top-level name, as A1111 loads it): the live list
of loaded networks, in-place merges with CPU backups, and the restore/reset helpers a trainer must call."""

import os

import torch

from modules import shared

loaded_networks = []
available_networks = {}
list_calls = 0


class LoadedNetwork:
    def __init__(self, name, deltas):
        self.name = name
        self.deltas = deltas            # {module: delta weight}


def list_available_networks():
    global list_calls
    list_calls += 1
    available_networks.clear()
    for filename in shared.walk_files(shared.cmd_opts.lora_dir, allowed_extensions=[".pt", ".ckpt", ".safetensors"]):
        available_networks[os.path.splitext(os.path.basename(filename))[0]] = filename


def merge_for_test(name, modules, scale=0.1, seed=0):
    """What a `<lora:name:1>` generation leaves behind: deltas merged into the weights, originals backed up."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for m in modules:
            if getattr(m, "network_weights_backup", None) is None:
                m.network_weights_backup = m.weight.to("cpu", copy=True)
                m.network_bias_backup = None if m.bias is None else m.bias.to("cpu", copy=True)
            delta = torch.randn(m.weight.shape, generator=gen) * scale
            m.weight += delta.to(m.weight)
            m.network_current_names = ((name, 1.0, 1.0, None),)
            deltas[m] = delta
    loaded_networks.append(LoadedNetwork(name, deltas))


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    if names:
        raise NotImplementedError("the fake only unloads")
    loaded_networks.clear()


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    with torch.no_grad():
        if weights_backup is not None:
            restore_weights_backup(self, "weight", weights_backup)
        if bias_backup is not None:
            restore_weights_backup(self, "bias", bias_backup)


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None
