"""A1111 v1.10.1's built-in Lora arithmetic, re-implemented for tests (no A1111 needed).

Written from reading `extensions-builtin/Lora/` (network.py `NetworkModule.calc_scale/finalize_updown`,
network_lora.py, network_hada.py, network_lokr.py, lyco_helpers.py, networks.py `network_apply_weights`)
and the golden data, not copied. What a file does to one base weight W (Linear [out, in] or Conv2d
[out, in, kh, kw]):

    W' = W + updown · scale · multiplier,   scale = `scale` tensor, else alpha / dim if both, else 1

  - LoRA/LoCon: updown = (up as [out, r]) @ (down as [r, in·kh·kw]), reshaped to W; dim = down.shape[0].
  - LoHa: updown = (w1a @ w1b) ⊙ (w2a @ w2b) with the b factors flattened; dim = w1b.shape[0].
  - LoKr: w1 = lokr_w1 or w1a @ w1b; w2 = lokr_w2 or w2a @ w2b; updown = kron(w1, w2) (w1 given two unit
    dims when w2 is 4-D), reshaped to W. dim comes from w1b, then w2b; with neither, dim is None → scale 1.
    The stored upstream source reads the factors as `self.dim = self.w1b.shape[0] if self.w1b else ...`:
    Python truthiness of a tensor, which raises for tensors of more than one element. `lokr_truthiness=True`
    (the default) reproduces that, so a factored LoKr file "fails to load" here as it would there.
  - DoRA (`dora_scale` beside any of the above; network.py `apply_weight_decompose`, run after the scale and
    before the multiplier): M = W + updown·scale; n = L2 norm of M over every axis except axis 1, kept as
    [1, in(, 1, 1)]; the delta becomes M · dora_scale / n − W (dora_scale broadcast as stored, unreshaped), and
    the multiplier multiplies that.
  - multiplier: the TE multiplier when 'transformer' occurs in the first 20 characters of A1111's layer name
    (`a1111_module` in the golden data), else the UNet multiplier.
A key's module name is everything before its first dot; a name A1111 cannot match is an unmatched key.
"""

from __future__ import annotations

import torch

MODULE_TYPES = ("lora", "hada", "lokr")   # A1111 tries module types in this order (ia3, full, ... omitted)


def split_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, leaf = key.partition(".")
        leaf = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}.get(leaf, leaf)
        out.setdefault(name, {})[leaf] = value
    return out


def module_type(w: dict[str, torch.Tensor]) -> str:
    if "lora_up.weight" in w and "lora_down.weight" in w:
        return "lora"
    if all(k in w for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return "hada"
    one = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
    two = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
    if one and two:
        return "lokr"
    raise ValueError(f"A1111 would not recognise a module with keys {sorted(w)}")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _scale(w: dict[str, torch.Tensor], dim: int | None) -> float:
    if "scale" in w:
        return float(w["scale"].item())
    if dim is not None and "alpha" in w:
        return float(w["alpha"].item()) / dim
    return 1.0


def _present(t: torch.Tensor | None, truthiness: bool) -> bool:
    if t is None:
        return False
    return bool(t) if truthiness else True   # bool(t) raises for more than one element, as upstream does


def updown(w: dict[str, torch.Tensor], orig: torch.Tensor, *, lokr_truthiness: bool = True) -> torch.Tensor:
    """The scaled delta (multiplier 1) A1111 adds to `orig` for one module's tensors."""
    kind = module_type(w)
    w = {k: v.to(torch.float64) for k, v in w.items()}
    if kind == "lora":
        down, up = w["lora_down.weight"], w["lora_up.weight"]
        if orig.dim() == 4 and down.dim() == 2:   # a Linear-shaped down on a conv: A1111 makes it 1×1
            down = down.reshape(*down.shape, 1, 1)
        shape = [up.shape[0], down.shape[1]] + (list(down.shape[2:]) if down.dim() == 4 else [])
        delta = (_flat(up) @ _flat(down)).reshape(shape)
        dim = down.shape[0]
    elif kind == "hada":
        if "hada_t1" in w or "hada_t2" in w:
            raise NotImplementedError("Tucker LoHa")
        shape = [w["hada_w1_a"].shape[0], w["hada_w1_b"].shape[1]] + (
            list(w["hada_w1_b"].shape[2:]) if w["hada_w1_b"].dim() == 4 else [])
        one = (_flat(w["hada_w1_a"]) @ _flat(w["hada_w1_b"])).reshape(shape)
        two = (_flat(w["hada_w2_a"]) @ _flat(w["hada_w2_b"])).reshape(shape)
        delta, dim = one * two, w["hada_w1_b"].shape[0]
    else:
        if "lokr_t2" in w:
            raise NotImplementedError("Tucker LoKr")
        dim = None
        if _present(w.get("lokr_w1_b"), lokr_truthiness):
            dim = w["lokr_w1_b"].shape[0]
        if _present(w.get("lokr_w2_b"), lokr_truthiness):
            dim = w["lokr_w2_b"].shape[0]
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        shape = list(orig.shape) if orig.dim() == 4 else [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
        delta = torch.kron(w1, w2.contiguous()).reshape(shape)
    if delta.numel() == orig.numel():
        delta = delta.reshape(orig.shape)
    if delta.shape != orig.shape:
        raise ValueError(f"delta {tuple(delta.shape)} does not fit weight {tuple(orig.shape)}")
    delta = delta * _scale(w, dim)
    if "dora_scale" in w:
        delta = weight_decompose(delta, orig, w["dora_scale"])
    return delta


def weight_decompose(delta: torch.Tensor, orig: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """A1111's DoRA step: the delta that turns `orig` into (orig + delta) · dora_scale / column norm (float64)."""
    orig = orig.to(torch.float64)
    merged = orig + delta
    axes = [a for a in range(merged.dim()) if a != 1]
    norm = merged.square().sum(dim=axes, keepdim=True).sqrt()       # [1, in] or [1, in, 1, 1]
    new = merged * (dora_scale.to(torch.float64) / norm)
    if new.shape != orig.shape:
        raise ValueError(f"dora_scale {tuple(dora_scale.shape)} does not broadcast onto weight {tuple(orig.shape)}")
    return new - orig


def multiplier_for(a1111_name: str, te: float = 1.0, unet: float = 1.0) -> float:
    return te if "transformer" in a1111_name[:20] else unet


def apply_network(weights: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], weight_key: dict[str, str],
                  multipliers: dict[str, float] | None = None, *, lokr_truthiness: bool = True,
                  out_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """New weights after merging a network file, and the module names that matched nothing.

    `weights`: base weights by key; `weight_key`: network module name → key in `weights` (the host's name
    map, or the golden `ldm_weight_key`); `multipliers`: optional multiplier per module name (default 1).
    A1111 stores the result in the weight's own dtype (the default); `out_dtype=torch.float64` keeps the
    exact sum, so that a comparison sees the algebra and not the final rounding.
    """
    out = dict(weights)
    unmatched = []
    for name, w in split_modules(tensors).items():
        key = weight_key.get(name)
        if key is None or key not in weights:
            unmatched.append(name)
            continue
        orig = weights[key]
        m = (multipliers or {}).get(name, 1.0)
        out[key] = (orig.to(torch.float64) + updown(w, orig, lokr_truthiness=lokr_truthiness) * m).to(
            out_dtype or orig.dtype)
    return out, unmatched
