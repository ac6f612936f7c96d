"""Benchmark: LoRA training speed and memory, ours vs. a plain diffusers + peft loop, side by side in one run.

    .venv/bin/python bench/speed.py [--model toy|tiny|sd15-random|PATH] [--steps 20] [--batch 1]
                                    [--resolution 64] [--rank 16] [--precision no|fp16|bf16]
                                    [--device cpu|cuda] [--out bench/results/speed.json]

Both runs train the same LoRA (the same UNet modules, rank, alpha, AdamW, learning rate, batch, resolution,
precision) on the same model and pictures, the text encoder frozen. Each run is a separate process, so the
peak memory (RSS; VRAM on CUDA) belongs to that run alone.

- **ours**: `lib_sdtrain.train.loop.train` as users run it (bucketed data, latent cache, A1111 prompt
  conditioning, loss log, monitor), timed from its own progress events after the first two steps.
- **reference**: the core of diffusers' `train_text_to_image_lora.py` written out plainly: latents encoded once,
  `peft.inject_adapter_in_model` on the same module paths, CLIP text encoder called directly, MSE on ε/v, AdamW.

Models: `toy` is the bundled toy model (falls back to `tiny` when it is absent), `tiny` the tiny SD1 test model,
`sd15-random` a full-size SD1.5 architecture with random weights (about 1.07 B parameters; written to a temporary
file first, untimed; meant for a GPU). Prints a table and writes JSON with the ratio ours ÷ reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpu import make_pictures  # noqa: E402  (bench/ is the script's folder; one picture maker for both benches)


def sd15_architecture():
    """SD1.5's stock configuration (diffusers names), for a random-weight model of the real size."""
    from lib_sdtrain.testing.fullsize import sd15_architecture as stock

    return stock()


def make_model(kind: str, folder: Path) -> Path:
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    if kind == "toy":
        from lib_sdtrain.hosts.standalone import default_model

        path = default_model()
        if path.is_file():
            return path
        print("the toy model is not built yet; using the tiny model", file=sys.stderr)
        kind = "tiny"
    if kind == "tiny":
        return make_tiny_checkpoint(folder / "tiny-sd1.safetensors", "sd1")
    if kind == "sd15-random":
        import torch

        from lib_sdtrain.models.checkpoint import LoadedCheckpoint, build_modules, save_checkpoint

        arch = sd15_architecture()
        torch.manual_seed(0)
        unet, vae, encoders = build_modules(arch, empty=False)
        return save_checkpoint(folder / "sd15-random.safetensors", LoadedCheckpoint(arch, unet, vae, encoders),
                               dtype=torch.float16, overwrite=True, metadata={"lab.note": "random SD1.5 weights"})
    path = Path(kind)
    if not path.is_file():
        raise SystemExit(f"no model file {path}")
    return path


def peak_memory(device: str) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        import torch

        out["peak_vram_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_ours(a: dict) -> dict:
    from lib_sdtrain.events import Events
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.train.loop import train
    from lib_sdtrain.train.settings import TrainSettings

    times: list[float] = []

    def on_event(e):
        if e.kind == "progress" and e.data.get("phase") != "cache":
            times.append(time.perf_counter())

    cfg = TrainSettings.from_dict({
        "model": a["model"], "data": a["data"], "output": a["work"] + "/ours", "name": "speed", "overwrite": True,
        "resolution": a["resolution"], "min_bucket": 64, "max_bucket": max(64, a["resolution"]),
        "batch_size": a["batch"], "epochs": 1000, "max_steps": a["steps"], "learning_rate": 1e-4,
        "save_every_n_epochs": 0, "save_state": False, "tensorboard": False, "mixed_precision": a["precision"],
        "lora": {"network_dim": a["rank"], "network_alpha": a["rank"], "targets": "attn",
                 "train_text_encoder": False},
    })
    host = StandaloneHost(device=a["device"], dtype="fp32", output_root=a["work"] + "/host")
    train(cfg, host, Events(on_event))
    timed = times[2:]
    sps = (len(timed) - 1) / (timed[-1] - timed[0])
    return {"steps_per_s": sps, "images_per_s": sps * a["batch"], **peak_memory(a["device"])}


def run_reference(a: dict) -> dict:
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from PIL import Image

    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.methods.lora import LoraSettings, select_targets

    device = torch.device(a["device"])
    parts = StandaloneHost(device=a["device"], dtype="fp32").load(a["model"])
    unet, vae, text = parts.unet, parts.vae, parts.text_encoders[0]
    tok = parts.tokenizers[0]
    paths = [t.path for t in select_targets(parts, LoraSettings(targets="attn", train_text_encoder=False))
             if t.component == "unet"]
    # the same modules, rank and alpha as ours (LoRA scale alpha/rank = 1)
    inject_adapter_in_model(LoraConfig(r=a["rank"], lora_alpha=a["rank"], target_modules=paths), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    unet.train()
    files = sorted(Path(a["data"]).rglob("*.png"))
    captions = [f.with_suffix(".txt").read_text() for f in files]
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(__import__("numpy").asarray(
            Image.open(f).convert("RGB").resize((a["resolution"],) * 2), dtype="float32") / 127.5 - 1).permute(2, 0, 1)
            for f in files]).to(device)
        latents_all = vae.encode(pixels).latent_dist.mean * parts.latent_scale
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    ac = parts.alphas_cumprod.to(device)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(a["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=a["precision"] == "fp16")
    gen = torch.Generator("cpu").manual_seed(0)
    times = []
    for step in range(a["steps"]):
        idx = torch.randint(0, len(files), (a["batch"],), generator=gen)
        latents = latents_all[idx]
        ids = torch.tensor([([tok.start_id] + tok.encode(captions[i])[:75] + [tok.end_id] + [tok.pad_id] * 76)[:77]
                            for i in idx.tolist()], device=device)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (a["batch"],), generator=gen).to(device)
        s = ac[t].sqrt().view(-1, 1, 1, 1)
        noisy = s * latents + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            with torch.no_grad():
                context = text(ids).last_hidden_state
            pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    timed = times[2:]
    sps = (len(timed) - 1) / (timed[-1] - timed[0])
    return {"steps_per_s": sps, "images_per_s": sps * a["batch"], **peak_memory(a["device"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved runs of each; the fastest counts")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed.json"))
    ap.add_argument("--_run", choices=["ours", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--_args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        a = json.loads(args._args)
        print("RESULT " + json.dumps((run_ours if args._run == "ours" else run_reference)(a)))
        return 0
    if args.steps < 4:
        raise SystemExit("--steps must be at least 4 (the first two steps are not timed)")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.time()
        model = make_model(args.model, work)
        data = make_pictures(work, 16, args.resolution)
        setup_s = time.time() - t0
        a = {"model": str(model), "data": str(data), "work": str(work), "steps": args.steps, "batch": args.batch,
             "resolution": args.resolution, "rank": args.rank, "precision": args.precision, "device": device}
        rounds: dict[str, list[dict]] = {"ours": [], "reference": []}
        for _ in range(args.rounds):   # interleaved, so both see the same machine load; the best round counts
            for name in ("reference", "ours"):
                done = subprocess.run([sys.executable, __file__, "--_run", name, "--_args", json.dumps(a)],
                                      capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode or not line:
                    raise SystemExit(f"{name} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
                rounds[name].append(json.loads(line[-1][7:]))
        results = {k: max(v, key=lambda r: r["steps_per_s"]) for k, v in rounds.items()}
    ours, ref = results["ours"], results["reference"]
    ratio = {k: ours[k] / ref[k] for k in ours if k in ref and ref[k]}
    report = {"settings": {k: v for k, v in a.items() if k not in ("work", "data")} | {"model": args.model},
              "ours": ours, "reference": ref, "ratio_ours_over_reference": ratio, "setup_s": setup_s,
              "rounds": rounds,
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "loadavg": os.getloadavg(), "gpu": torch.cuda.get_device_name() if device == "cuda" else None}}
    print(f"{'':12} {'steps/s':>9} {'images/s':>9} {'peak RSS MB':>12} {'peak VRAM MB':>13}")
    for name, r in (("ours", ours), ("reference", ref), ("ratio", ratio)):
        vram = r.get("peak_vram_mb")
        print(f"{name:12} {r['steps_per_s']:9.3f} {r['images_per_s']:9.3f} {r['peak_rss_mb']:12.2f} "
              f"{'' if vram is None else f'{vram:13.2f}'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    existing[f"{args.model}-{device}-{args.resolution}px-b{args.batch}-{args.precision}"] = report
    out.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
