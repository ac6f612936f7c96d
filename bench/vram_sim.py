"""Simulated peak memory of full-size LoRA training steps, on the CPU, with no GPU and no real arithmetic.

    .venv/bin/python bench/vram_sim.py [--cases sd15-512-b1,...] [--steps 2] [--out bench/results/vram_sim.json]

Builds the stock SD1.5 / SDXL UNet (random weights never materialise: torch's FakeTensorMode gives every tensor
its shape, dtype and size but no storage), adds LoRA rank 32 / alpha 32 with peft on the module paths our LoRA
targets (`methods.lora.select_targets`, kohya's attention + MLP set), and runs `--steps` training steps: bf16
base weights, fp32 adapters, bf16 autocast, scaled-dot-product attention, MSE, backward, AdamW. A dispatch mode
adds up the bytes of every tensor storage alive after each operation and keeps the peak.

What it counts: tensor storages (weights, adapter weights, gradients, AdamW moments, activations saved for the
backward pass, temporaries). What it leaves out, so a GPU needs more than this: the CUDA context (≈ 0.5 GB),
the caching allocator's fragmentation and rounding, cuDNN / cuBLAS workspaces, the text encoder(s) and the VAE
(the rows below cache latents and, for SDXL, text-encoder outputs; SD1.5's frozen CLIP-L adds ≈ 0.25 GB of bf16
weights and little activation memory), and any difference between the CPU attention kernel used here and the
CUDA one (both are fused kernels that keep O(tokens) per head for the backward pass, not the full matrix).

It also prints `train.estimate.estimate_vram` for the same settings, restricted to the same terms (UNet weights,
trained weights + optimizer state, activations; no text encoder, VAE, context or fragmentation), so the
estimate shown to users before training can be checked against a count of what the step really allocates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GB = 2 ** 30
# name: (architecture, resolution, batch, gradient checkpointing)
CASES: dict[str, tuple[str, int, int, bool]] = {
    "sd15-512-b1": ("sd15", 512, 1, False),
    "sd15-512-b8": ("sd15", 512, 8, False),
    "sd15-512-b8-gc": ("sd15", 512, 8, True),
    "sdxl-1024-b1": ("sdxl", 1024, 1, False),
    "sdxl-1024-b1-gc": ("sdxl", 1024, 1, True),
    "sdxl-1024-b4": ("sdxl", 1024, 4, False),
    "sdxl-1024-b4-gc": ("sdxl", 1024, 4, True),
}


class PeakBytes(TorchDispatchMode):
    """A dispatch mode that tracks the bytes of the live tensor storages and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        n = int(st.nbytes())
        self.live[key] = n
        self.now += n
        self.peak = max(self.peak, self.now)

        def gone(key: int = key, n: int = n) -> None:
            if self.live.pop(key, None) is not None:
                self.now -= n

        weakref.finalize(st, gone)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def simulate(arch_name: str, resolution: int, batch: int, checkpointing: bool, steps: int = 2,
             rank: int = 32) -> dict[str, Any]:
    """Peak tensor bytes of `steps` LoRA training steps (see the module docstring)."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lib_sdtrain.methods.lora import LoraSettings, select_targets
    from lib_sdtrain.models.checkpoint import build_modules
    from lib_sdtrain.testing.fullsize import architecture

    arch = architecture(arch_name)
    unet, _vae, encoders = build_modules(arch, empty=True)          # meta device: nothing allocated
    unet.requires_grad_(False)

    class _View:
        family, module_naming = arch.family, "diffusers"

    view = _View()
    view.unet, view.text_encoders = unet, encoders
    paths = [t.path for t in select_targets(view, LoraSettings(network_dim=rank, train_text_encoder=False))
             if t.component == "unet"]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=paths), unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        for mod in unet.modules():                                   # every tensor becomes a fake one
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = torch.nn.Parameter(
                        torch.empty(p.shape, dtype=torch.float32 if p.requires_grad else torch.bfloat16),
                        requires_grad=p.requires_grad)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        mode = PeakBytes()
        for t in [*unet.parameters(), *unet.buffers()]:
            mode.add(t)
        weights = mode.now
        lat = resolution // 8
        with mode:
            for _ in range(steps):
                x = torch.randn(batch, 4, lat, lat)
                t = torch.randint(0, 1000, (batch,))
                ctx = torch.randn(batch, 77, arch.unet["cross_attention_dim"])
                kw: dict[str, Any] = {}
                if arch.family == "sdxl":
                    kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280),
                                               "time_ids": torch.randn(batch, 6)}
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = unet(x.bfloat16(), t, encoder_hidden_states=ctx.bfloat16(), **kw).sample
                loss = torch.nn.functional.mse_loss(out.float(), x)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                del x, t, ctx, out, loss, kw
        trained = sum(p.numel() for p in params)
    return {"peak_gb": mode.peak / GB, "weights_gb": weights / GB, "after_gb": mode.now / GB,
            "trained_parameters": trained, "unet_parameters": sum(p.numel() for p in unet.parameters()) - trained,
            "lora_modules": len(paths)}


def estimate_same_terms(arch_name: str, resolution: int, batch: int, checkpointing: bool, rank: int = 32) -> dict:
    """`estimate_vram` for the same run, restricted to the terms the simulation counts (see the docstring)."""
    from lib_sdtrain.train.estimate import FAMILY, estimate_vram
    from lib_sdtrain.train.settings import TrainSettings

    family = {"sd15": "sd1", "sdxl": "sdxl"}[arch_name]
    cfg = TrainSettings.from_dict({"resolution": resolution, "batch_size": batch, "mixed_precision": "bf16",
                                   "gradient_checkpointing": checkpointing, "optimizer": "adamw",
                                   "lora": {"network_dim": rank, "network_alpha": rank, "train_text_encoder": False}})
    e = estimate_vram(cfg, family, model_dtype="bf16")
    unet_weights = FAMILY[family]["unet"] * 1e6 * 2 / GB
    return {"unet_weights_gb": unet_weights, "trained_optimizer_gb": e.parts["trained+optimizer"],
            "activations_gb": e.parts["activations"],
            "same_terms_gb": unet_weights + e.parts["trained+optimizer"] + e.parts["activations"],
            "total_gb_shown": e.total_gb}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=2, help="training steps (the second one holds AdamW's moments)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vram_sim.json"))
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    rows = {}
    print(f"{'case':18} {'simulated GB':>12} {'estimate GB':>11} {'est/sim':>7} {'act sim':>7} {'act est':>7} {'s':>5}")
    for name in names:
        arch, res, batch, gc = CASES[name]
        t0 = time.perf_counter()
        sim = simulate(arch, res, batch, gc, steps=args.steps)
        est = estimate_same_terms(arch, res, batch, gc)
        act_sim = sim["peak_gb"] - sim["after_gb"]
        rows[name] = {"architecture": arch, "resolution": res, "batch": batch, "gradient_checkpointing": gc,
                      "simulated": sim, "simulated_activation_gb": act_sim, "estimate": est,
                      "estimate_over_simulated": est["same_terms_gb"] / sim["peak_gb"],
                      "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:18} {sim['peak_gb']:12.2f} {est['same_terms_gb']:11.2f} "
              f"{est['same_terms_gb'] / sim['peak_gb']:7.2f} {act_sim:7.2f} {est['activations_gb']:7.2f} "
              f"{rows[name]['seconds']:5.1f}", flush=True)
    report = {"torch": torch.__version__, "steps": args.steps, "rank": 32, "precision": "bf16 autocast, bf16 base "
              "weights, fp32 LoRA, AdamW", "how": __doc__.split("\n\n", 2)[2].strip(), "cases": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
