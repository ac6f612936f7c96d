"""modules.devices (CPU, float32: as `--no-half` on a machine without CUDA)."""

import contextlib

import torch

cpu = torch.device("cpu")
device = device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False
gc_calls = 0


def cond_cast_unet(x):
    return x.to(dtype_unet) if unet_needs_upcast else x


def cond_cast_float(x):
    return x.float() if unet_needs_upcast else x


def autocast(disable=False):
    if disable or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda")


def torch_gc():
    global gc_calls
    gc_calls += 1
