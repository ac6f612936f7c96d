"""Our LoRA loop vs. the reference loop's arithmetic fed with OUR random streams: do the loops differ in anything
but their random draws?

`bench/quality.py --rows lora,reference` trains the same task with both loops, but each draws its own data order,
noise and timesteps, so one training seed of each is one draw from two run-to-run distributions (see
`bench/seeds.py` for the spread over seeds). This script takes the randomness out: it trains the LoRA subject
task with `train.loop.train` (the quality bench's settings, fp32 save), then repeats the reference loop's steps
(`toy.reference`: latents by `vae.encode(...).latent_dist.mean` x scale, `peft.inject_adapter_in_model`, the
CLIP text model called directly, MSE on epsilon, min-SNR weighting by `diffusers.training_utils.compute_snr`,
class pictures weighted by the prior loss weight, AdamW, `clip_grad_norm_`, diffusers' `get_scheduler`) with our
loop's batches (`BucketBatchSampler`), noise and timesteps (the per-batch CPU generator), and our initial adapter
weights. If the two loops compute the same thing, the per-step losses and
the final LoRA deltas agree up to float rounding. Adam amplifies rounding where a gradient is at noise level (it
divides by the gradient's own size): the self-attention of the UNet's middle block sees a single latent position
on the 64 px toy model, so its q / k get no real gradient, and on a tiny random model many gradients are that
small; the per-step losses are the robust figure, the per-module deltas the sharper one on a trained model.

    .venv/bin/python bench/same_streams.py [--steps 40] [--model PATH] [--set KEY=VALUE ...] [--threads 1]
        [--out bench/results/same_streams.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def reference_on_our_streams(cfg: Any, parts: Any, steps: int, init: dict[str, tuple]) -> tuple[dict, list[float]]:
    """The reference loop's step (toy.reference) on our loop's batches, noise, timesteps and initial weights.
    Returns ({module path: LoRA delta (scaled)}, per-step losses)."""
    import numpy as np
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from lib_sdtrain.data.scan import scan_dataset
    from lib_sdtrain.toy import reference as R
    from lib_sdtrain.train.plan import plan_data

    records = scan_dataset(cfg.data, reg_path=cfg.reg_data or None, caption_ext=cfg.caption_ext).usable
    _, sampler, _ = plan_data(cfg, records)
    latents = R._encode(parts, [r.path for r in records], cfg.resolution)
    captions = [r.path.with_suffix(".txt").read_text(encoding="utf-8").strip() for r in records]
    is_reg = np.array([r.is_regularization for r in records])
    unet = copy.deepcopy(parts.unet)
    unet.requires_grad_(False)
    alpha = cfg.lora.network_alpha or cfg.lora.network_dim
    inject_adapter_in_model(LoraConfig(r=cfg.lora.network_dim, lora_alpha=alpha, target_modules=sorted(init),
                                       lora_dropout=cfg.lora.dropout), unet)
    mods = dict(unet.named_modules())
    with torch.no_grad():
        for path, (a, b) in init.items():
            mods[path].lora_A["default"].weight.copy_(a)
            mods[path].lora_B["default"].weight.copy_(b)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr or cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_sched = R._lr_schedule(cfg, opt)            # the reference loop's schedule and min-SNR weighting
    text, tok, ac = parts.text_encoders[0], parts.tokenizers[0], parts.alphas_cumprod
    ddpm = R._noise_schedule(ac)
    unet.train()
    losses, per_epoch = [], len(sampler)
    for batch_no in range(steps):
        epoch, k = divmod(batch_no, per_epoch)
        idx = sampler.batches(epoch)[k]
        gen = torch.Generator("cpu").manual_seed(cfg.seed * 1_000_003 + batch_no)   # our loop's per-batch stream
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        a = ac[t].view(-1, 1, 1, 1).float()
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.no_grad():
            context = text(R._ids(tok, [captions[i] for i in idx], parts.device)).last_hidden_state
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        per = torch.nn.functional.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        per = R._snr_weighted(per, ddpm, t, cfg.min_snr_gamma)
        w = torch.where(torch.from_numpy(is_reg[idx]), cfg.prior_loss_weight, 1.0)
        loss = (per * w).mean()
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    deltas = {}
    with torch.no_grad():
        for path in init:
            m = mods[path]
            b, a = m.lora_B["default"].weight, m.lora_A["default"].weight
            deltas[path] = (b.flatten(1) @ a.flatten(1)) * m.scaling["default"]
    return deltas, losses


def compare(settings: Any, work: Path, steps: int) -> dict[str, Any]:
    """Train `settings` (a QualitySettings, method lora) for `steps` with our loop and the reference arithmetic on
    our streams; returns the comparison (JSON-ready)."""
    import numpy as np
    import torch

    from lib_sdtrain.events import Events, StopToken
    from lib_sdtrain.hosts.standalone import StandaloneHost, default_model
    from lib_sdtrain.methods import create_method
    from lib_sdtrain.toy.quality import make_dataset, train_settings
    from lib_sdtrain.train.loop import train

    settings.overrides = {**settings.overrides, "max_steps": steps, "lora.save_dtype": "fp32", "tensorboard": False}
    settings.curve = 1
    model = Path(settings.model) if settings.model else default_model()
    data, reg = make_dataset(work / "data", settings)
    cfg = train_settings(settings, data, reg, model, work / "out")
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=work / "outputs")
    t0 = time.monotonic()
    result = train(cfg, host, Events(), StopToken())
    t_ours = time.monotonic() - t0
    if result.final is None:
        raise RuntimeError(f"our loop did not finish ({result.stopped})")
    parts = host.load(model)
    torch.manual_seed(cfg.seed)                  # the loop seeds this way before attaching: the same start
    method = create_method(cfg)
    method.attach(parts)
    init = {a.target.path: (a.layer.lora_A["default"].weight.detach().clone(),
                            a.layer.lora_B["default"].weight.detach().clone())
            for a in method._layers.values() if a.target.component == "unet"}
    method.detach()
    method = create_method(cfg)
    method.attach(parts)
    method.load_weights(result.final)
    ours = {method._layers[name].target.path: d for name, d in method.delta_weights().items()}
    method.detach()
    t0 = time.monotonic()
    ref, ref_losses = reference_on_our_streams(cfg, parts, steps, init)
    t_ref = time.monotonic() - t0
    rel, moved = [], 0
    for path, d in ref.items():
        o = ours[path].reshape(d.shape)
        if float(d.norm()) == 0.0 and float(o.norm()) == 0.0:
            continue   # no gradient ever reached it (e.g. self-attention q/k over a single latent position)
        moved += 1
        rel.append(float((o - d).norm() / d.norm().clamp_min(1e-12)))

    loss_diff = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(result.losses, ref_losses)]
    return {
        "steps": steps, "modules": len(ref), "modules_compared": moved,
        "delta_relative_difference": {"median": float(np.median(rel)), "p90": float(np.percentile(rel, 90)),
                                      "max": float(max(rel))},
        "loss_relative_difference": {"first_step": loss_diff[0], "median": float(np.median(loss_diff)),
                                     "max": float(max(loss_diff))},
        "losses": {"ours": [round(x, 6) for x in result.losses], "reference_on_our_streams":
                   [round(x, 6) for x in ref_losses]},
        "seconds": {"ours": round(t_ours, 1), "reference": round(t_ref, 1)},
        "settings": {"learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size, "rank": cfg.lora.network_dim,
                     "alpha": cfg.lora.network_alpha, "targets": cfg.lora.targets, "prior_loss_weight":
                     cfg.prior_loss_weight, "seed": cfg.seed, "model": str(model)},
    }


def main(argv: list[str] | None = None) -> int:
    from lib_sdtrain.toy.quality import QualitySettings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", default="")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="training setting (TrainSettings field or section.field)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/same_streams.json")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)     # numbers, true / false
        except ValueError:
            overrides[key] = value
    settings = QualitySettings(method="lora", concept="subject", model=args.model, overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = compare(settings, Path(tmp), args.steps)
    d, lo = out["delta_relative_difference"], out["loss_relative_difference"]
    print(f"{args.steps} steps, {out['modules_compared']} of {out['modules']} modules: LoRA deltas ours vs reference "
          f"on our streams differ by median {d['median']:.2e}, p90 {d['p90']:.2e}, max {d['max']:.2e} (relative); "
          f"per-step loss: first {lo['first_step']:.1e}, median {lo['median']:.1e}, max {lo['max']:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
