"""Adapters on the q/k/v/out projections of an `nn.MultiheadAttention` (A1111's OpenCLIP text encoders).

open_clip keeps q, k and v stacked in `in_proj_weight` [3E, E] (+ `in_proj_bias`), and `nn.MultiheadAttention`
never calls `out_proj.forward` (its weight goes straight into the fused attention function), so adapters
wrapped around Linear modules cannot reach these four projections. kohya files treat them as four Linear layers
`…_self_attn_{q,k,v,out}_proj` (the HF CLIP names the standalone host trains), and A1111 v1.10's Lora stacks the
q/k/v deltas into `in_proj_weight` and adds the out delta to `out_proj.weight`.

`AdaptedMultiheadAttention` takes the MultiheadAttention's place in its parent while training:
  - slots `q`, `k`, `v` hold `InProjView`s: Linear modules whose weight and bias are views of the matching rows
    of `in_proj_weight` / `in_proj_bias` (no copy); slot `out` holds the module's own `out_proj`. `LoraMethod`
    replaces a slot by a peft layer wrapping it, exactly as it wraps HF CLIP's `q_proj` on the standalone host,
    so the adapter maths (LoRA input dropout, LoHa/LoKr rank dropout, dtype handling) is the same on both hosts;
  - `forward` runs the four slots and PyTorch's scaled-dot-product attention with the module's own settings:
    `batch_first`, `num_heads`, `dropout` (training only), `attn_mask` (bool or float, 2-D or 3-D; open_clip
    passes its causal mask), `key_padding_mask`, `is_causal`, `need_weights` / `average_attn_weights`, and
    unbatched inputs, with `nn.MultiheadAttention`'s semantics.
The original module stays registered as `base` and is never modified, so putting it back restores the model
exactly. Layouts open_clip never builds (`bias_k`/`bias_v`, `add_zero_attn`, separate `kdim`/`vdim`) are refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError

SLOTS = ("q", "k", "v", "out")


def check_supported(mha: nn.MultiheadAttention, where: str = "") -> None:
    """UserError unless `mha` has the layout open_clip builds (stacked q/k/v, no extra key/value biases)."""
    what = f"MultiheadAttention {where!r}" if where else "MultiheadAttention"
    if not getattr(mha, "_qkv_same_embed_dim", False) or mha.in_proj_weight is None:
        raise UserError(f"{what} has separate q/k/v weights (kdim/vdim); only open_clip's stacked layout trains")
    if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
        raise UserError(f"{what} uses bias_k/bias_v/add_zero_attn, which open_clip text encoders never do; "
                        "it cannot be trained")


class InProjView(nn.Linear):
    """A Linear view of rows `index·E … (index+1)·E` of a MultiheadAttention's `in_proj_weight` / `in_proj_bias`.

    Holds no parameters of its own (the MultiheadAttention is not registered here: it belongs to the wrapper).
    """

    def __init__(self, mha: nn.MultiheadAttention, index: int) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "_mha", mha)      # a plain reference, not a submodule
        self.index = index
        self.out_features = mha.in_proj_weight.shape[0] // 3
        self.in_features = mha.in_proj_weight.shape[1]
        self.training = mha.training

    def _rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        n = self.out_features
        return t[self.index * n:(self.index + 1) * n]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._rows(self._mha.in_proj_weight)

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._rows(self._mha.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{'qkv'[self.index]} rows of in_proj_weight, in_features={self.in_features}, " \
               f"out_features={self.out_features}"


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (True = not allowed) as an additive float mask; float masks cast to `dtype`."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class AdaptedMultiheadAttention(nn.Module):
    """Stands in for an `nn.MultiheadAttention` while its projections carry adapters (see the module docstring)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        check_supported(mha)
        super().__init__()
        self.base = mha
        self.q = InProjView(mha, 0)
        self.k = InProjView(mha, 1)
        self.v = InProjView(mha, 2)
        self.out = mha.out_proj
        self.training = mha.training

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)   # embed_dim, num_heads, batch_first, in_proj_weight, ... read-through

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        mha = self.base
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif mha.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        tgt, batch, embed = query.shape
        src, heads = key.shape[0], mha.num_heads
        head_dim = embed // heads
        q, k, v = self.q(query), self.k(key), self.v(value)

        def split(t: torch.Tensor, n: int) -> torch.Tensor:    # [n, B, E] → [B, heads, n, head_dim]
            return t.reshape(n, batch, heads, head_dim).permute(1, 2, 0, 3)

        q, k, v = split(q, tgt), split(k, src), split(v, src)
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.reshape(1, 1, tgt, src) if mask.dim() == 2 else mask.reshape(batch, heads, tgt, src)
        padding = _float_mask(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.reshape(batch, 1, 1, src)
            mask = padding if mask is None else mask + padding
        dropout_p = float(mha.dropout) if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            attn = scores.softmax(dim=-1)
            if dropout_p > 0.0:
                attn = F.dropout(attn, p=dropout_p)
            out = attn @ v
            weights = attn.mean(dim=1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = self.out(out.permute(2, 0, 1, 3).reshape(tgt, batch, embed))
        if not batched:
            return out.squeeze(1), (weights.squeeze(0) if weights is not None else None)
        if mha.batch_first:
            out = out.transpose(0, 1)
        return out, weights
