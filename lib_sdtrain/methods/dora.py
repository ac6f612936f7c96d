"""DoRA as A1111 v1.10 applies it: a LoRA plus a trained magnitude per *input* column of the weight.

A1111 v1.10.1 (`extensions-builtin/Lora/network.py`, `NetworkModule.finalize_updown` and
`apply_weight_decompose`) treats a module whose file entry has a `dora_scale` tensor like this, for the layer's
weight W (Linear [out, in], Conv2d [out, in, kh, kw]) and the module's LoRA delta ΔW = up·down·alpha/dim:

    M     = W + ΔW
    n_j   = ‖M[:, j]‖₂ over every axis except axis 1 (one norm per input column / input channel)
    W_new = M · (dora_scale / n)          (dora_scale and n shaped [1, in] or [1, in, 1, 1])
    added = (W_new − W) · multiplier      (the `<lora:name:W>` strength comes after the decomposition)

Because the norm is per input column, W_new = M · diag(d) with d = m / n, so the layer's output is
`base_layer(x ⊙ d) + s·B(A(x ⊙ d))`: an ordinary LoRA on an input rescaled per feature (Linear) or per channel
(Conv2d). The bias is not scaled (it enters once, through the base layer), and zero padding stays zero. That
is what `InputColumnDoRA` computes, on top of peft's own LoRA layers (the magnitude m is `dora_scale`, a float32
parameter initialised to the input-column norms of W, so a fresh network reproduces the base model exactly).

The norm n is computed on the current W + ΔW at every forward pass but is treated as a constant for the
gradient (as the DoRA paper's §4.3 and peft do): the forward pass is A1111's formula exactly, and no
out×in graph is kept per layer for the backward pass.

peft's own DoRA (`use_dora`, `lora_magnitude_vector`) normalises per *output* row instead (LyCORIS's
`wd_on_output=True`), which A1111 v1.10 does not apply, so it is never used here.

Where A1111 treats layers specially: OpenCLIP's `nn.MultiheadAttention` (SD2, SDXL's second encoder) gets
each of q/k/v decomposed against its own row block of `in_proj_weight` and out against `out_proj.weight`,
which is what the per-slot layers of `openclip_attention.py` train, so it matches. Not covered by any file:
A1111's "old method" Lora setting (`lora_functional`) adds only up·down and ignores `dora_scale`, and with
several networks active A1111 decomposes each one against the weight the earlier ones already changed.

Conv2d layers with groups ≠ 1 are refused: A1111's axis-1 norm then mixes the groups' channels and is no
per-channel input scale (Stable Diffusion has no such layer among the trained targets).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import UserError
from ..formats.kohya import DORA_LEAF, dora_scale_shape


def input_column_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of `weight` over every axis except axis 1: shape [in]."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def check_supported(base: nn.Module, where: str) -> None:
    """UserError for layers whose A1111 DoRA is not a per-input scale (grouped convolutions)."""
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        raise UserError(f"DoRA cannot train {where}: it is a grouped convolution (groups={base.groups}), where "
                        "A1111's per-input-column norm is not a per-channel scale. Use lora or locon")


class InputColumnDoRA:
    """Mix-in for peft's `lora.layer.Linear` / `Conv2d`: DoRA with A1111 v1.10's magnitude per input column.

    `add_magnitude(adapter)` (after peft built the LoRA) adds `dora_scale[adapter]`, shaped as A1111 reads it;
    `dora_multiplier` is A1111's strength (1 while training).
    """

    dora_multiplier: float = 1.0

    def add_magnitude(self, adapter: str, where: str = "") -> None:
        base = self.get_base_layer()
        check_supported(base, where or type(base).__name__)
        weight = base.weight.detach()
        norms = input_column_norms(weight.float()).reshape(dora_scale_shape(tuple(weight.shape)))
        self.dora_scale = nn.ParameterDict({adapter: nn.Parameter(norms.to(weight.device).clone())})
        # peft walks `adapter_layer_names` to find, move and (un)freeze adapter tensors; register ours there,
        # per instance, as peft itself does for its magnitude vector.
        self.adapter_layer_names = tuple(self.adapter_layer_names) + (DORA_LEAF,)
        self._dora_adapter = adapter
        self.dora_multiplier = 1.0

    def _merged_and_norms(self, adapter: str, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.get_base_layer().weight
        delta = self.get_delta_weight(adapter)
        dtype = dtype or torch.promote_types(weight.dtype, delta.dtype)
        merged = weight.to(dtype) + delta.to(dtype).reshape(weight.shape)
        return merged, input_column_norms(merged)

    def input_scale(self, adapter: str) -> torch.Tensor:
        """d = m / ‖W + ΔW‖ per input column, shape [in] (the norm carries no gradient)."""
        with torch.no_grad():
            _, norms = self._merged_and_norms(adapter)
        magnitude = self.dora_scale[adapter].reshape(-1)
        norms = norms.to(magnitude.dtype)
        # A column of W + ΔW that is all zero (a dead input; every column of a fresh adapter on a zero column of
        # W) contributes nothing whatever it is scaled by; 0/0 would make the whole output NaN.
        return torch.where(norms > 0, magnitude / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                           torch.zeros_like(magnitude))

    def dora_delta(self, adapter: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W_new − W (what A1111 adds at multiplier 1), computed in `dtype` (default: the promoted dtype of the
        weight and the adapter; the difference of two near-equal weights, so float64 for exact checks)."""
        merged, norms = self._merged_and_norms(adapter, dtype)
        magnitude = self.dora_scale[adapter].to(merged.dtype)
        shape = dora_scale_shape(tuple(merged.shape))
        weight = self.get_base_layer().weight.to(merged.dtype)
        return merged * (magnitude.reshape(shape) / norms.reshape(shape)) - weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter = getattr(self, "_dora_adapter", None)
        if adapter is None or self.disable_adapters or self.merged or adapter not in self.active_adapters:
            return super().forward(x, *args, **kwargs)
        scale = self.input_scale(adapter).to(x.dtype)
        if isinstance(self.get_base_layer(), nn.Conv2d):
            scale = scale.reshape(-1, 1, 1)       # channels of [N, C, H, W] or unbatched [C, H, W]
        out = super().forward(x * scale, *args, **kwargs)
        if self.dora_multiplier != 1.0:
            # A1111: W + (W_new − W)·multiplier, i.e. the base output plus the multiplied difference
            base = self.get_base_layer()(x, *args, **kwargs)
            out = base + (out - base) * self.dora_multiplier
        return out
