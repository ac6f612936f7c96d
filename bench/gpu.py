"""GPU benchmark: full-size SD1.5 and SDXL LoRA training, ours vs. a plain diffusers + peft loop, one command.

    bash bench/gpu.sh            # = .venv/bin/python bench/gpu.py [--budget-s 450] [--steps 14] [--rounds 2]
                                 #   [--cases sd15-lora-b8,sdxl-lora-b1,sdxl-lora-b4,sd15-dreambooth-b1]
                                 #   [--out-dir bench/results] [--peak-tflops N]

Writes bench/results/gpu-<GPU name>.json and prints a table. On a machine without a CUDA GPU it prints that it
needs one and exits 0 (nothing is measured on the CPU: the figures would say nothing about GPU training).

Cases (random weights of the stock architectures, built on the GPU, so nothing is downloaded or read from disk):

| case | model | pictures | batch | what trains |
|---|---|---|---|---|
| sd15-lora-b8 | SD1.5 (UNet 860 M) | 512² | 8 | LoRA rank 32 / alpha 32 on the UNet's attention + MLP, bf16 |
| sdxl-lora-b1 | SDXL (UNet 2.57 B) | 1024² | 1 | the same, cached latents and cached text-encoder outputs |
| sdxl-lora-b4 | SDXL | 1024² | 4 | the same |
| sd15-dreambooth-b1 | SD1.5 | 512² | 1 | the whole UNet (fp32 master weights), gradient checkpointing, 8-bit AdamW |
| sd15-finetune-ddp-x2 | SD1.5 | 512² | 1 per GPU | full fine-tune, fp32 AdamW, gradient checkpointing, 2 GPUs, DDP |
| sd15-finetune-fsdp-x2 | SD1.5 | 512² | 1 per GPU | the same, `distributed = "fsdp"` (all of it sharded) |

The two `-x2` cases run ours only, under torchrun with 2 processes (one per GPU; skipped, and listed as skipped,
on a machine with fewer GPUs); peak VRAM is rank 0's, img/s counts both GPUs' pictures. Their difference is what
FSDP saves per GPU.

Both loops use the same modules, targets, rank, AdamW (lr 1e-4), bf16 autocast over bf16 base weights with fp32
adapters, latents encoded once by the VAE (SDXL: the VAE in fp32) and, for SDXL, text-encoder outputs computed
once with the text encoders then dropped from the GPU. SD1.5 runs its frozen CLIP text encoder every step in both.

- **ours**: `lib_sdtrain.train.loop.train` as users run it, timed from its progress events after the warm-up steps.
- **reference**: diffusers' `train_text_to_image_lora.py` core written out: `peft.inject_adapter_in_model` on the
  same module paths, MSE on ε, AdamW, bf16 autocast.

Each run is its own process (peak VRAM belongs to that run alone); runs are interleaved (reference, ours, ours,
reference, ...) and the fastest round of each counts. Peak VRAM: `torch.cuda.max_memory_allocated` over the whole
process (`peak_vram_gb`, what the GPU must hold) and from the first training step on (`train_peak_vram_gb`).

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one whole training step of the reference loop at the
case's shapes (text encoder when it runs, UNet forward and backward with the adapters; matrix multiplications,
convolutions and attention, 2 FLOPs per multiply-add; the backward pass of frozen weights computes only input
gradients, and the counter counts what runs). Model FLOPs utilisation = FLOPs per step × steps/s ÷ the GPU's
dense bf16 peak (vendor data sheet figure, table PEAK_BF16_TFLOPS; `--peak-tflops` for other GPUs). The same
count is used for ours (the same model maths).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES: dict[str, dict[str, Any]] = {
    "sd15-lora-b8": {"arch": "sd15", "resolution": 512, "batch": 8, "method": "lora", "rank": 32,
                     "text_cache": "off", "reference": True},
    "sdxl-lora-b1": {"arch": "sdxl", "resolution": 1024, "batch": 1, "method": "lora", "rank": 32,
                     "text_cache": "on", "reference": True},
    "sdxl-lora-b4": {"arch": "sdxl", "resolution": 1024, "batch": 4, "method": "lora", "rank": 32,
                     "text_cache": "on", "reference": True},
    "sd15-dreambooth-b1": {"arch": "sd15", "resolution": 512, "batch": 1, "method": "dreambooth",
                           "gradient_checkpointing": True, "optimizer": "adamw8bit", "text_cache": "off",
                           "learning_rate": 2e-6, "reference": False},
    # several GPUs (ours only, skipped on a machine with fewer): per-GPU memory of DDP against FSDP
    "sd15-finetune-ddp-x2": {"arch": "sd15", "resolution": 512, "batch": 1, "method": "finetune", "processes": 2,
                             "distributed": "ddp", "gradient_checkpointing": True, "optimizer": "adamw",
                             "text_cache": "off", "learning_rate": 2e-6, "reference": False},
    "sd15-finetune-fsdp-x2": {"arch": "sd15", "resolution": 512, "batch": 1, "method": "finetune", "processes": 2,
                              "distributed": "fsdp", "gradient_checkpointing": True, "optimizer": "adamw",
                              "text_cache": "off", "learning_rate": 2e-6, "reference": False},
}
# first guess of one run's wall time (s) on a current data-centre GPU, replaced by the measured time of the
# case's first run; used only to keep the whole benchmark inside its budget
GUESS_S = {"sd15": 45.0, "sdxl": 75.0}

# dense (no sparsity) bf16 tensor throughput, TFLOP/s, from the vendors' data sheets; matched in this order
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.4), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.05), ("L40", 181.05), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 6000 Ada", 364.25), ("RTX A6000", 154.8), ("RTX 4090", 165.2), ("RTX 4080", 97.5),
    ("RTX 3090", 71.0),
]


def peak_tflops(gpu_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in gpu_name.lower():
            return value
    return None


def gpu_slug(gpu_name: str) -> str:
    """The GPU's name as a file-name part: letters, digits and dots, the rest one '-'."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-") or "unknown"


def result_path(out_dir: str | Path, gpu_name: str) -> Path:
    return Path(out_dir) / f"gpu-{gpu_slug(gpu_name)}.json"


# ---- pieces shared by both loops --------------------------------------------------------------------------
def make_pictures(folder: Path, count: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    sub = folder / "data" / "1_zwx thing"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        arr = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
        a, b = sorted(rng.integers(0, size, 2))
        arr[a:b + 1, a:b + 1] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(sub / f"{i:03d}.png")
        (sub / f"{i:03d}.txt").write_text(f"zwx thing, picture {i}, a coloured square on a plain background")
    return folder / "data"


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of what `fn` runs (matmul / conv / attention; 2 per multiply-add), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device, out: dict) -> None:
    import resource

    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device.type == "cuda":
        import torch

        train_peak = torch.cuda.max_memory_allocated(device) / 2**30   # since the reset at the first step
        out["peak_vram_gb"] = max(out.get("peak_vram_gb_whole", 0.0), train_peak)
        out["train_peak_vram_gb"] = train_peak
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _rate(times: list[float], warmup: int, batch: int) -> dict:
    timed = times[warmup:]
    if len(timed) < 2:
        raise RuntimeError(f"too few timed steps ({len(timed)}); raise --steps")
    sps = (len(timed) - 1) / (timed[-1] - timed[0])
    return {"steps_per_s": sps, "images_per_s": sps * batch, "timed_steps": len(timed) - 1}


# ---- a host lending random-weight models --------------------------------------------------------------------
class RandomHost:
    """A standalone host whose `load()` lends a random-weight model of `arch` (the `model` argument is ignored)."""

    name = "random"

    def __init__(self, arch: Any, *, device: Any = "cpu", dtype: Any = None, output_root: str | Path = "outputs",
                 seed: int = 0) -> None:
        import torch

        from lib_sdtrain.hosts.standalone import StandaloneHost

        self.arch, self.dtype, self.seed = arch, dtype or torch.float32, seed
        self._files = StandaloneHost(device=device, dtype="fp32", output_root=output_root)
        self.device = self._files.device

    def load(self, model: str | None = None):
        from lib_sdtrain.hosts import ModelInfo
        from lib_sdtrain.hosts.standalone import StandaloneParts
        from lib_sdtrain.testing.fullsize import build_random

        loaded = build_random(self.arch, self.device, self.dtype, self.seed)
        return StandaloneParts(loaded, ModelInfo(name=f"random-{self.arch.family}"))

    def native_resolution(self, model: str | None = None) -> tuple[int, str]:
        return int(self.arch.unet["sample_size"]) * 8, f"random {self.arch.family} model"

    def release(self, parts: Any) -> None:
        self._files.release(parts)

    def sample(self, parts: Any, requests: list, stop: Any = None) -> list:
        return self._files.sample(parts, requests, stop)

    def output_dir(self, kind: str) -> Path:
        return self._files.output_dir(kind)

    def refresh(self, kind: str) -> None:
        return None


# ---- ours -------------------------------------------------------------------------------------------------
def run_ours(a: dict) -> dict:
    """`train.loop.train` on a random-weight model of `a["arch"]` (see the module docstring)."""
    import torch

    from lib_sdtrain.events import Events
    from lib_sdtrain.testing.fullsize import architecture
    from lib_sdtrain.train.loop import train
    from lib_sdtrain.train.settings import TrainSettings

    processes = int(a.get("processes", 1))
    device = torch.device(a["device"])
    if processes > 1 and device.type == "cuda":    # under torchrun: the GPU of this process's local rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    work = Path(a["work"]) / f"ours-{a.get('run_tag') or os.getpid()}"   # several processes: one folder
    notes: list[str] = []
    optimizer = a.get("optimizer", "adamw")
    if optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            optimizer = "adafactor"
            notes.append("bitsandbytes is not installed: Adafactor instead of 8-bit AdamW")
    times: list[float] = []
    whole: dict = {}

    def on_event(e):
        if e.kind == "progress" and e.data.get("phase") != "cache":
            _sync(device)
            times.append(time.perf_counter())
        elif e.kind == "status" and e.data.get("text", "").startswith("training ") and device.type == "cuda":
            whole["peak_vram_gb_whole"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        elif e.kind == "warning":
            notes.append(e.data.get("text", ""))

    settings: dict[str, Any] = {
        "method": a["method"], "data": a["data"], "output": str(work / "out"), "name": "bench", "overwrite": True,
        "resolution": a["resolution"], "min_bucket": 64, "max_bucket": max(64, a["resolution"]),
        "batch_size": a["batch"], "epochs": 100_000, "max_steps": a["steps"], "learning_rate": a.get("learning_rate", 1e-4),
        "optimizer": optimizer, "save_every_n_epochs": 0, "save_state": False, "tensorboard": False,
        "stop_on_divergence": False, "mixed_precision": a["precision"],
        "gradient_checkpointing": bool(a.get("gradient_checkpointing")),
        "cache_text_encoder_outputs": a.get("text_cache", "auto"), "distributed": a.get("distributed", "ddp"),
    }
    if a["method"] == "lora":
        settings["lora"] = {"network_dim": a["rank"], "network_alpha": a["rank"], "train_text_encoder": False}
    cfg = TrainSettings.from_dict(settings)
    host = RandomHost(architecture(a["arch"]), device=device, dtype=_dtype(a["precision"]),
                      output_root=work / "host")
    result = train(cfg, host, Events(on_event))
    _sync(device)
    if int(os.environ.get("RANK", "0")) != 0:   # several processes: rank 0 times the steps and reports
        return {"steps": result.steps}
    out = {**_rate(times, a["warmup"], a["batch"] * processes), "steps": result.steps, "optimizer": optimizer,
           "final_loss": result.losses[-1] if result.losses else None, "notes": [n for n in notes if n]}
    out.update(whole)
    _memory(device, out)
    out.pop("peak_vram_gb_whole", None)
    return out


# ---- the plain diffusers + peft reference -------------------------------------------------------------------
def run_reference(a: dict) -> dict:
    """The plain loop (see the module docstring); also counts one step's FLOPs when `a["count_flops"]`."""
    import numpy as np
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from PIL import Image

    from lib_sdtrain.methods.lora import LoraSettings, select_targets
    from lib_sdtrain.models.schedule import alphas_cumprod
    from lib_sdtrain.models.tokenizer import make_tokenizers
    from lib_sdtrain.testing.fullsize import architecture, build_random

    device = torch.device(a["device"])
    arch = architecture(a["arch"])
    dtype = _dtype(a["precision"])
    loaded = build_random(arch, device, dtype)
    unet, vae, encoders = loaded.unet, loaded.vae, loaded.text_encoders
    sdxl = arch.family == "sdxl"
    for enc in encoders:                      # what diffusers' scripts get from transformers on a GPU
        enc.config._attn_implementation = "sdpa" if device.type == "cuda" else "eager"
    if sdxl:
        vae.to(torch.float32)                 # diffusers' SDXL script: the VAE in fp32 unless a fixed VAE is given

    # the same module paths as ours: select_targets over a view of the modules
    class _View:
        family, module_naming = arch.family, "diffusers"

    view = _View()
    view.unet, view.text_encoders = unet, encoders
    paths = [t.path for t in select_targets(view, LoraSettings(network_dim=a["rank"], train_text_encoder=False))
             if t.component == "unet"]
    inject_adapter_in_model(LoraConfig(r=a["rank"], lora_alpha=a["rank"], target_modules=paths), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:                           # diffusers' cast_training_params: adapters in fp32
        p.data = p.data.float()
        p.requires_grad_(True)
    unet.train()

    files = sorted(Path(a["data"]).rglob("*.png"))
    captions = [f.with_suffix(".txt").read_text() for f in files]
    toks = make_tokenizers(arch.family, None)

    def ids_for(tok, text):
        body = tok.encode(text)[:75]
        return ([tok.start_id] + body + [tok.end_id] + [tok.pad_id] * 75)[:77]

    res = a["resolution"]
    with torch.no_grad():
        latents_all = []
        for f in files:                         # latents encoded once (one picture at a time, like a cache)
            px = torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((res, res)), dtype="float32")
                                  / 127.5 - 1).permute(2, 0, 1)[None].to(device, next(vae.parameters()).dtype)
            latents_all.append(vae.encode(px).latent_dist.mean.float() * arch.latent_scale)
        latents_all = torch.cat(latents_all)

        def encode_text(idx):
            outs, pooled = [], None
            for enc, tok in zip(encoders, toks):
                ids = torch.tensor([ids_for(tok, captions[i]) for i in idx], device=device)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    o = enc(ids, output_hidden_states=True)
                outs.append(o.hidden_states[-2] if sdxl else o.last_hidden_state)
                pooled = getattr(o, "text_embeds", None)
            return torch.cat(outs, dim=-1), pooled

        if sdxl:                                # text-encoder outputs cached, encoders leave the GPU
            ctx_all, pooled_all = encode_text(list(range(len(files))))
            for enc in encoders:
                enc.to("cpu")
            del encoders
            if device.type == "cuda":
                torch.cuda.empty_cache()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    ac = alphas_cumprod().to(device)
    gen = torch.Generator("cpu").manual_seed(0)
    batch = a["batch"]
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * batch, device=device, dtype=dtype)

    def step() -> float:
        idx = torch.randint(0, len(files), (batch,), generator=gen)
        latents = latents_all[idx.to(latents_all.device)]
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        s = ac[t].sqrt().view(-1, 1, 1, 1)
        noisy = s * latents + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            if sdxl:
                context, kw = ctx_all[idx], {"added_cond_kwargs": {"text_embeds": pooled_all[idx],
                                                                    "time_ids": time_ids}}
            else:
                with torch.no_grad():
                    context, _ = encode_text(idx.tolist())
                kw = {}
            pred = unet(noisy.to(dtype), t, encoder_hidden_states=context.to(dtype), **kw).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    out: dict[str, Any] = {}
    step()                                       # warm-up outside the counter (allocator, kernels)
    if a.get("count_flops"):
        out["flops_per_step"] = count_flops(step)
    _sync(device)
    if device.type == "cuda":
        out["peak_vram_gb_whole"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(a["steps"]):
        loss = step()
        _sync(device)
        times.append(time.perf_counter())
    out.update(_rate(times, a["warmup"], batch))
    out["final_loss"] = loss
    _memory(device, out)
    out.pop("peak_vram_gb_whole", None)
    return out


# ---- orchestration --------------------------------------------------------------------------------------------
def plan_runs(cases: list[str], rounds: int) -> list[tuple[str, str]]:
    """(case, loop) in the order they run: round by round over the cases (so a budget that runs out drops later
    rounds, not whole cases); within a case the rounds alternate reference-ours / ours-reference. Cases without
    a reference run once."""
    order = []
    for r in range(rounds):
        for case in cases:
            if not CASES[case]["reference"]:
                order += [(case, "ours")] if r == 0 else []
                continue
            loops = ["reference", "ours"]
            order += [(case, loop) for loop in (loops if r % 2 == 0 else loops[::-1])]
    return order


def run_all(cases: list[str], rounds: int, budget_s: float, runner: Callable[[str, str, bool], dict],
            clock: Callable[[], float] = time.monotonic, gpus: int | None = None) -> dict[str, dict]:
    """Run the plan with `runner(case, loop, count_flops) -> result`, skipping runs that would pass the budget
    and (when `gpus` is given) runs that need more GPUs than there are."""
    start = clock()
    took: dict[str, float] = {}
    out: dict[str, dict] = {c: {"ours": [], "reference": [], "skipped": [], "errors": []} for c in cases}
    counted: set[str] = set()
    for case, loop in plan_runs(cases, rounds):
        need = int(CASES[case].get("processes", 1))
        if gpus is not None and need > gpus:
            out[case]["skipped"].append(f"{loop}: needs {need} GPUs, this machine has {gpus}")
            continue
        expected = took.get(case, GUESS_S.get(CASES[case]["arch"], 60.0))
        if clock() - start + expected > budget_s:
            out[case]["skipped"].append(f"{loop}: would pass the {budget_s:.0f} s budget")
            continue
        t0 = clock()
        want_flops = loop == "reference" and case not in counted
        try:
            result = runner(case, loop, want_flops)
        except Exception as e:  # noqa: BLE001 - one failed run is reported, the others still run
            out[case]["errors"].append(f"{loop}: {str(e)[-1500:]}")
            continue
        finally:
            took[case] = max(took.get(case, 0.0), clock() - t0)
        if "flops_per_step" in result:
            counted.add(case)
        out[case][loop].append(result)
    return out


def summarise(runs: dict[str, dict], peak: float | None, overrides: dict | None = None) -> dict[str, dict]:
    """Best round per loop, ours ÷ reference, MFU (see the module docstring)."""
    table = {}
    for case, r in runs.items():
        used = {**CASES[case], **(overrides or {})}
        row: dict[str, Any] = {"settings": {k: v for k, v in used.items() if k != "reference"},
                               "rounds": {"ours": r["ours"], "reference": r["reference"]},
                               "skipped": r["skipped"], "errors": r["errors"]}
        flops = next((x["flops_per_step"] for x in r["reference"] if "flops_per_step" in x), None)
        for loop in ("ours", "reference"):
            if r[loop]:
                best = dict(max(r[loop], key=lambda x: x["images_per_s"]))
                if flops and peak:
                    best["mfu"] = flops * best["steps_per_s"] / (peak * 1e12)
                row[loop] = best
        if flops:
            row["flops_per_step"] = flops
            row["flops_per_image"] = flops / used["batch"]
        if "ours" in row and "reference" in row:
            row["ratio_ours_over_reference"] = {
                k: row["ours"][k] / row["reference"][k] for k in ("images_per_s", "peak_vram_gb", "train_peak_vram_gb")
                if row["ours"].get(k) and row["reference"].get(k)}
        table[case] = row
    return table


def write_results(path: Path, gpu: dict, args: dict, table: dict, wall_s: float) -> Path:
    report = {"gpu": gpu, "arguments": args, "wall_s": wall_s, "cases": table,
              "how": {"flops": "torch.utils.flop_counter.FlopCounterMode over one training step of the reference "
                               "loop (2 FLOPs per multiply-add; matmul, convolution, attention)",
                      "mfu": "flops_per_step × steps/s ÷ dense bf16 peak of the GPU",
                      "peak_vram_gb": "torch.cuda.max_memory_allocated over the whole process",
                      "train_peak_vram_gb": "the same from the first training step on",
                      "best": "the round with the most images/s counts; every round is listed"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def print_table(table: dict) -> None:
    print(f"{'case':22} {'loop':10} {'img/s':>8} {'peak GB':>8} {'train GB':>9} {'MFU':>6}")
    for case, row in table.items():
        for loop in ("reference", "ours"):
            r = row.get(loop)
            if not r:
                continue
            mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "     -"
            print(f"{case:22} {loop:10} {r['images_per_s']:8.2f} {r.get('peak_vram_gb', 0):8.2f} "
                  f"{r.get('train_peak_vram_gb', 0):9.2f} {mfu:>6}")
        ratio = row.get("ratio_ours_over_reference")
        if ratio:
            print(f"{'':22} {'ours/ref':10} {ratio.get('images_per_s', 0):8.2f} {ratio.get('peak_vram_gb', 0):8.2f}"
                  f" {ratio.get('train_peak_vram_gb', 0):9.2f}")
        for line in row["skipped"] + row["errors"]:
            print(f"{'':22} {line.splitlines()[-1] if line else ''}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=14, help="steps per run; the first --warmup are not timed")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting runs after this (8 min limit)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="run the whole flow on the CPU with tiny models (checks the script; figures meaningless)")
    ap.add_argument("--_run", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--_args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._run:
        a = json.loads(args._args)
        result = (run_ours if args._run == "ours" else run_reference)(a)
        if int(os.environ.get("RANK", "0")) == 0:    # several processes: rank 0 reports
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    import torch

    dry = args.dry_run_cpu
    if not torch.cuda.is_available() and not dry:
        print("bench/gpu.py needs a CUDA GPU and this machine has none: nothing measured, no file written "
              "(the figures are only meaningful on a GPU).")
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.steps < args.warmup + 3:
        raise SystemExit("--steps must be at least --warmup + 3")
    if dry:
        name, total = "CPU dry run", 0.0
    else:
        props = torch.cuda.get_device_properties(0)
        name, total = props.name, props.total_memory / 2**30
    gpu = {"name": name, "total_gb": total, "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "cpus": os.cpu_count()}
    peak = args.peak_tflops or peak_tflops(name)
    gpu["peak_bf16_tflops"] = peak
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = {}
        shrink = {"resolution": 64, "batch": 2, "rank": 4} if dry else {}
        for res in sorted({shrink.get("resolution", CASES[c]["resolution"]) for c in cases}):
            data[res] = str(make_pictures(work / f"px{res}", 8, res))

        def runner(case: str, loop: str, count: bool) -> dict:
            c = {**CASES[case], **shrink}
            if dry:
                c["arch"] = {"sd15": "tiny-sd1", "sdxl": "tiny-sdxl"}[c["arch"]]
            a = {**{k: v for k, v in c.items() if k != "reference"}, "data": data[c["resolution"]],
                 "work": str(work), "device": "cpu" if dry else "cuda", "steps": args.steps, "warmup": args.warmup,
                 "precision": "no" if dry else args.precision, "count_flops": count}
            launch = [sys.executable]
            if int(c.get("processes", 1)) > 1:   # one process per GPU (gloo on the CPU in a dry run)
                import socket

                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(c["processes"]), "--master_addr",
                           "127.0.0.1", "--master_port", str(port)]
                a["run_tag"] = f"{case}-{loop}-{port}"
            done = subprocess.run([*launch, __file__, "--_run", loop, "--_args", json.dumps(a)],
                                  capture_output=True, text=True, timeout=max(60.0, args.budget_s),
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                      x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)}, check=False)
            line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not line:
                raise RuntimeError(f"exit {done.returncode}: {done.stderr[-1500:]}")
            result = json.loads(line[-1][7:])
            print(f"  {case} {loop}: {result['images_per_s']:.2f} img/s, peak {result.get('peak_vram_gb', 0):.2f} GB",
                  flush=True)
            return result

        runs = run_all(cases, args.rounds, args.budget_s, runner,
                       gpus=None if dry else torch.cuda.device_count())
    table = summarise(runs, peak, {**shrink, "device": "cpu", "precision": "no"} if dry else None)
    out = write_results(result_path(args.out_dir, name), gpu, {k: v for k, v in vars(args).items()
                                                                      if not k.startswith("_")},
                        table, time.monotonic() - t0)
    print_table(table)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
