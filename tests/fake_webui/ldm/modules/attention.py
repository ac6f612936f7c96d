"""Stand-in for `ldm.modules.attention` (class and parameter names as in the Stability ldm code, so state-dict
keys and A1111 layer names match; written for tests): CrossAttention, FeedForward, BasicTransformerBlock,
SpatialTransformer."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .diffusionmodules.util import checkpoint, zero_module


class GEGLU(nn.Module):
    """One projection to twice the width; the second half, through GELU, gates the first."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate) * value


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=True, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim))

    def forward(self, x):
        return self.net(x)


class CrossAttention(nn.Module):
    """q from x; k, v from the context (x itself for self-attention); out = to_out(merged heads)."""

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        width, source = heads * dim_head, context_dim or query_dim
        self.heads, self.scale = heads, 1.0 / math.sqrt(dim_head)
        for name, fan_in in (("to_q", query_dim), ("to_k", source), ("to_v", source)):
            setattr(self, name, nn.Linear(fan_in, width, bias=False))
        self.to_out = nn.Sequential(nn.Linear(width, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, mask=None):
        """The plain forward (replaced by `sd_hijack` while an optimisation is applied)."""
        source = x if context is None else context
        n = x.shape[0]

        def heads_first(t):
            return t.reshape(n, t.shape[1], self.heads, -1).permute(0, 2, 1, 3)

        q, k, v = heads_first(self.to_q(x)), heads_first(self.to_k(source)), heads_first(self.to_v(source))
        mixed = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1) @ v
        return self.to_out(mixed.permute(0, 2, 1, 3).reshape(n, x.shape[1], -1))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward, each pre-normed and residual."""

    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, gated_ff=True, checkpoint=True,
                 disable_self_attn=False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        first_context = context_dim if disable_self_attn else None
        self.attn1 = CrossAttention(dim, first_context, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        for i in (1, 2, 3):
            setattr(self, f"norm{i}", nn.LayerNorm(dim))
        self.checkpoint = checkpoint

    def forward(self, x, context=None):
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x, context=None):
        h = x + self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
        h = h + self.attn2(self.norm2(h), context=context)
        return h + self.ff(self.norm3(h))


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None,
                 disable_self_attn=False, use_linear=False, use_checkpoint=True):
        super().__init__()
        if context_dim is not None and not isinstance(context_dim, list):
            context_dim = [context_dim] * depth
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner_dim) if use_linear else \
            nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim[d],
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth)])
        self.proj_out = zero_module(nn.Linear(in_channels, inner_dim) if use_linear else
                                    nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))
        self.use_linear = use_linear

    def forward(self, x, context=None):
        contexts = context if isinstance(context, list) else [context]
        batch, channels, height, width = x.shape
        h = self.norm(x)
        h = h if self.use_linear else self.proj_in(h)
        tokens = h.flatten(2).transpose(1, 2)                       # [batch, height·width, features]
        tokens = self.proj_in(tokens) if self.use_linear else tokens
        for index, block in enumerate(self.transformer_blocks):
            tokens = block(tokens, context=contexts[index] if index < len(contexts) else contexts[0])
        tokens = self.proj_out(tokens) if self.use_linear else tokens
        h = tokens.transpose(1, 2).reshape(batch, -1, height, width)
        h = h if self.use_linear else self.proj_out(h)
        return h + x
