"""The CUDA paths, run for real on a GPU: every speed / memory technique against the run without it, and every method
in mixed precision, on the tiny test models (built in code, nothing read or downloaded).

    .venv/bin/python bench/cuda_checks.py [--only NAME,...] [--out-dir bench/results] [--cpu]

Writes bench/results/cuda-checks-<GPU name>.json and prints a table. On a machine without a CUDA GPU it prints
that it needs one and exits 0; `--cpu` runs the same flow on the CPU (checks the script; the figures then say
nothing about CUDA).

Each check trains 3 steps of a tiny LoRA (or the method named) on 2 pictures at 128 px, seed fixed, and compares
the saved tensors with those of its baseline run:

- kind `equal` (the technique must not change the maths): fp32 everywhere, TF32 off for matrix products and
  convolutions, plain SGD (lr 0.5, no clipping, the update is linear in the gradient so rounding stays
  rounding). Passes when max |a - b| <= 1e-3 x max |b| + 1e-5 (CUDA kernels differ from each other in
  summation order; the CPU tests in tests/test_train_speed.py hold the tighter 1e-4).
- kind `close` (lower precision, another optimizer): the run must finish with finite weights that moved, and the
  relative difference max |a - b| / max |b| is reported (no threshold: it says how far bf16 / fp16 / 8-bit
  AdamW land from fp32 after 3 steps).
- kind `runs` (a method under bf16 autocast over bf16 base weights): finite tensors that are not all zero and the
  file written.

`loss` is the mean of the run's step losses; `s` the run's wall time (the first run also pays CUDA's start-up).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from gpu import gpu_slug  # noqa: E402 - the GPU benchmark's file naming

SGD = {"optimizer": "sgd", "learning_rate": 0.5, "weight_decay": 0.0, "max_grad_norm": 0.0}
ADAM = {"optimizer": "adamw", "learning_rate": 1e-3, "optimizer_kernel": "foreach"}
BF16 = {"mixed_precision": "bf16", "host_dtype": "bf16"}

# name: (family, settings over the common ones, baseline name or None, kind)
CHECKS: dict[str, tuple[str, dict[str, Any], str | None, str]] = {
    "sd1-plain": ("sd1", {**SGD}, None, "base"),
    "sdxl-plain": ("sdxl", {**SGD}, None, "base"),                       # text-encoder cache on (auto, SDXL)
    "sd1-adamw-foreach": ("sd1", {**ADAM}, None, "base"),
    "attention-math": ("sd1", {**SGD, "attention": "math"}, "sd1-plain", "equal"),
    "channels-last": ("sd1", {**SGD, "channels_last": True}, "sd1-plain", "equal"),
    "gradient-checkpointing": ("sd1", {**SGD, "gradient_checkpointing": True}, "sd1-plain", "equal"),
    # not cached: every step samples the VAE's latent distribution (cached: its mean), so only close
    "latents-not-cached": ("sd1", {**SGD, "cache_latents": False}, "sd1-plain", "close"),
    "sdxl-text-cache-off": ("sdxl", {**SGD, "cache_text_encoder_outputs": "off"}, "sdxl-plain", "equal"),
    "adamw-fused": ("sd1", {**ADAM, "optimizer_kernel": "fused"}, "sd1-adamw-foreach", "equal"),
    "xformers": ("sd1", {**SGD, "attention": "xformers"}, "sd1-plain", "equal"),
    "bf16": ("sd1", {**SGD, **BF16}, "sd1-plain", "close"),
    "fp16-loss-scaling": ("sd1", {**SGD, "mixed_precision": "fp16", "host_dtype": "fp16"}, "sd1-plain", "close"),
    "sdxl-bf16": ("sdxl", {**SGD, **BF16}, "sdxl-plain", "close"),
    "sdxl-fp16-vae-auto": ("sdxl", {**SGD, "mixed_precision": "fp16", "host_dtype": "fp16"}, "sdxl-plain", "close"),
    "adamw8bit": ("sd1", {**ADAM, "optimizer": "adamw8bit", "optimizer_kernel": "auto"}, "sd1-adamw-foreach",
                  "close"),
    "adafactor": ("sd1", {**ADAM, "optimizer": "adafactor", "optimizer_kernel": "auto"}, "sd1-adamw-foreach",
                  "close"),
    "lora-bf16": ("sd1", {**ADAM, **BF16}, None, "runs"),
    # the CLI's defaults on a GPU: fp16 base weights (--dtype auto), no autocast (mixed_precision no)
    "lora-fp16-base-fp32-math": ("sd1", {**ADAM, "host_dtype": "fp16"}, None, "runs"),
    "locon-bf16": ("sd1", {**ADAM, **BF16, "lora": {"network_type": "locon"}}, None, "runs"),
    "loha-bf16": ("sd1", {**ADAM, **BF16, "lora": {"network_type": "loha"}}, None, "runs"),
    "lokr-bf16": ("sd1", {**ADAM, **BF16, "lora": {"network_type": "lokr"}}, None, "runs"),
    "lora-te-bf16": ("sd1", {**ADAM, **BF16, "lora": {"train_text_encoder": True}}, None, "runs"),
    "embedding-bf16": ("sd1", {**ADAM, **BF16, "method": "embedding", "learning_rate": 5e-3,
                                    "name": "zwx"}, None, "runs"),
    "hypernetwork-bf16": ("sd1", {**ADAM, **BF16, "method": "hypernetwork"}, None, "runs"),
    "dreambooth-bf16": ("sd1", {**ADAM, **BF16, "method": "dreambooth", "learning_rate": 1e-5}, None, "runs"),
    "finetune-bf16": ("sd1", {**ADAM, **BF16, "method": "finetune", "learning_rate": 1e-5}, None, "runs"),
    "sdxl-lora-bf16": ("sdxl", {**ADAM, **BF16}, None, "runs"),
    "sdxl-finetune-bf16-8bit": ("sdxl", {**ADAM, **BF16, "method": "finetune", "learning_rate": 1e-5,
                                         "optimizer": "adamw8bit", "optimizer_kernel": "auto",
                                         "gradient_checkpointing": True}, None, "runs"),
    # last: its first steps compile (minutes on a small CPU)
    "torch-compile": ("sd1", {**SGD, "torch_compile": True}, "sd1-plain", "equal"),
}
EQUAL_RTOL, EQUAL_ATOL = 1e-3, 1e-5


def make_data(folder: Path) -> Path:
    """Two 128 px pictures (a flat colour with a red square) captioned "zwx toy ..." in a `2_zwx toy` folder."""
    import numpy as np
    from PIL import Image

    sub = folder / "2_zwx toy"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        arr = np.zeros((128, 128, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        arr[32:96, 32:96] = (255, 0, 0)
        Image.fromarray(arr).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"zwx toy, red square, picture {i}")
    return folder


def train_once(name: str, family: str, over: dict[str, Any], world: dict[str, Path], device: str,
               work: Path) -> dict[str, Any]:
    import torch

    from lib_sdtrain.events import Events
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.train.loop import train
    from lib_sdtrain.train.settings import TrainSettings

    over = dict(over)
    host_dtype = over.pop("host_dtype", "fp32")
    method = over.pop("method", "lora")
    lora = {"network_dim": 4, "network_alpha": 4, "save_dtype": "fp32", "train_text_encoder": False,
            **over.pop("lora", {})}
    out_name = over.pop("name", name)           # an embedding's token is its name: it must be in the captions
    settings = {"method": method, "model": str(world[family]), "data": str(world["data"]),
                "output": str(work / name), "name": out_name, "resolution": 128, "min_bucket": 64, "max_bucket": 128,
                "batch_size": 2, "epochs": 1, "max_steps": 3, "save_every_n_epochs": 0, "save_state": False,
                "tensorboard": False, "stop_on_divergence": False, **over}
    if method == "lora":
        settings["lora"] = lora
    warnings: list[str] = []
    ev = Events(lambda e: warnings.append(e.data.get("text", "")) if e.kind == "warning" else None)
    t0 = time.perf_counter()
    result = train(TrainSettings.from_dict(settings),
                   StandaloneHost(device=device, dtype=host_dtype, output_root=work / "host"), ev)
    if device == "cuda":
        torch.cuda.synchronize()
    took = time.perf_counter() - t0
    if result.final is None:
        raise RuntimeError(f"no file written (stopped: {result.stopped or 'no'})")
    tensors = read_tensors(result.final)
    finite = all(bool(torch.isfinite(t.float()).all()) for t in tensors.values())
    nonzero = any(bool(t.float().abs().sum() > 0) for t in tensors.values())
    losses = [float(x) for x in result.losses]
    return {"tensors": tensors, "finite": finite, "nonzero": nonzero, "steps": result.steps, "s": round(took, 2),
            "loss": sum(losses) / len(losses) if losses else None, "file_mb": result.final.stat().st_size / 2**20,
            "warnings": [w for w in warnings if w][:5]}


def read_tensors(path: Path) -> dict[str, Any]:
    """The tensors of a saved file: .safetensors, or an A1111 .pt (hypernetwork) read with weights_only."""
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))
    found: dict[str, Any] = {}

    def walk(obj: Any, key: str) -> None:
        if isinstance(obj, torch.Tensor):
            found[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}.{i}")

    walk(torch.load(str(path), map_location="cpu", weights_only=True), "")
    return found


def compare(a: dict, b: dict) -> dict[str, Any]:
    """max |a - b| and max |b| over the tensors both hold (a key missing on either side is reported)."""
    import torch

    keys = sorted(set(a) & set(b))
    diff = max((float((a[k].float() - b[k].float()).abs().max()) for k in keys), default=float("nan"))
    scale = max((float(b[k].float().abs().max()) for k in keys), default=float("nan"))
    moved = any("lora_up" in k and bool(a[k].abs().sum() > 0) for k in keys) if any("lora_up" in k for k in keys) \
        else True
    return {"max_abs_diff": diff, "max_abs": scale, "rel_diff": diff / scale if scale else float("nan"),
            "missing_keys": len(set(a) ^ set(b)), "compared_keys": len(keys), "moved": moved}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated check names (their baselines run too)")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--cpu", action="store_true", help="run the flow on the CPU (checks the script only)")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu:
        print("bench/cuda_checks.py needs a CUDA GPU and this machine has none: nothing checked, no file written.")
        return 0
    device = "cpu" if args.cpu else "cuda"
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise SystemExit(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    wanted = []
    for n in names:                              # baselines first
        base = CHECKS[n][2]
        for x in ([base] if base else []) + [n]:
            if x not in wanted:
                wanted.append(x)
    if device == "cuda":                         # the 'equal' checks compare fp32 kernels, not TF32 ones
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = "CPU dry run"
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    report: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                              "python": platform.python_version(), "checks": {},
                              "how": __doc__.split("\n\n", 2)[2].strip()}
    runs: dict[str, dict] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = {"sd1": make_tiny_checkpoint(work / "sd1.safetensors", "sd1"),
                 "sdxl": make_tiny_checkpoint(work / "sdxl.safetensors", "sdxl"),
                 "data": make_data(work / "data")}
        for n in wanted:
            family, over, base, kind = CHECKS[n]
            row: dict[str, Any] = {"kind": kind, "family": family, "baseline": base,
                                   "settings": dict(over)}
            try:
                run = train_once(n, family, over, world, device, work)
                runs[n] = run
                row.update({k: v for k, v in run.items() if k != "tensors"})
                ok = run["finite"] and run["nonzero"] and run["steps"] == 3
                if base:
                    if base not in runs:
                        raise RuntimeError(f"its baseline {base} failed")
                    cmp = compare(run["tensors"], runs[base]["tensors"])
                    row.update(cmp)
                    ok = ok and cmp["missing_keys"] == 0 and cmp["moved"]
                    if kind == "equal":
                        ok = ok and cmp["max_abs_diff"] <= EQUAL_RTOL * cmp["max_abs"] + EQUAL_ATOL
                row["ok"] = bool(ok)
            except Exception as e:  # noqa: BLE001 - a failed check is reported; the others still run
                row["ok"] = False
                row["error"] = f"{type(e).__name__}: {e}"[-1200:]
                row["trace"] = traceback.format_exc()[-2500:]
            if device == "cuda":
                row["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.empty_cache()
            report["checks"][n] = row
            rel = row.get("rel_diff")
            print(f"{n:26} {kind:6} {'ok' if row['ok'] else 'FAIL':4} "
                  f"{'' if rel is None else f'rel {rel:.2e}':13} {row.get('s', 0):6.2f} s "
                  f"{row.get('error', '')[:150]}", flush=True)
    report["wall_s"] = time.perf_counter() - t_all
    out = Path(args.out_dir) / f"cuda-checks-{gpu_slug(gpu)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [n for n, r in report["checks"].items() if not r["ok"]]
    print(f"{len(report['checks']) - len(failed)} of {len(report['checks'])} ok"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
