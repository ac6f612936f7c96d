"""Stand-in for `ldm.modules.diffusionmodules.util` (the parts A1111's model classes use), written for tests:
the fp32 GroupNorm, zero-initialised modules, the sinusoidal timestep embedding (cos half first) and ldm's
reentrant gradient checkpoint, whose backward asks autograd for gradients of the inputs AND of every listed
parameter, frozen ones included — the behaviour a1111-host.md §3 warns about."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def normalization(channels):
    return GroupNorm32(32, channels)


def zero_module(module):
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * torch.exp(-math.log(max_period) * exponents)[None, :]
    out = torch.cat((angles.cos(), angles.sin()), dim=1)
    return out if dim % 2 == 0 else torch.nn.functional.pad(out, (0, 1))


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, n_inputs, *tensors):
        ctx.fn, ctx.n_inputs = fn, n_inputs
        ctx.saved = tensors
        with torch.no_grad():
            return fn(*tensors[:n_inputs])

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(True) for t in ctx.saved[:ctx.n_inputs]]
        params = list(ctx.saved[ctx.n_inputs:])
        with torch.enable_grad():
            outputs = ctx.fn(*[t.view_as(t) for t in inputs])
        found = torch.autograd.grad(outputs, inputs + params, grads, allow_unused=True)
        ctx.saved = ctx.fn = None
        return (None, None, *found)


def checkpoint(func, inputs, params, flag):
    if not flag:
        return func(*inputs)
    return _Recompute.apply(func, len(inputs), *inputs, *params)


CheckpointFunction = _Recompute
