"""A plain diffusers + peft LoRA loop, written apart from `train.loop`: the quality bench's reference row.

It trains the same task as our loop (same dataset folder, same UNet modules, rank, alpha, AdamW settings,
learning rate, batch, steps, gradient clipping and class pictures) but shares none of the loop's code: no
bucketing, no latent cache module, no A1111 prompt conditioning, no noise helpers. What it does is the core
of diffusers' text-to-image LoRA example written out plainly:

- every picture is read with PIL and encoded once with the VAE (`latent_dist.mean` x scale factor);
- the kohya folder name `N_name` gives a picture N copies per epoch; class (regularization) pictures are
  cycled to as many as the instance copies and weighted by `prior_loss_weight`, as kohya and our loop do;
- `peft.inject_adapter_in_model(LoraConfig(r, lora_alpha, target_modules))` puts LoRA on the UNet;
- captions go through the CLIP text model directly (`last_hidden_state`, padded with the end token as
  diffusers' CLIP tokenizer pads), the text encoder frozen;
- noise by `diffusers.DDPMScheduler.add_noise` on the model's own beta schedule, uniform timesteps,
  MSE on epsilon, `torch.optim.AdamW`, `clip_grad_norm_`, and `diffusers.optimization.get_scheduler` for the
  learning-rate schedule (constant, linear or cosine, with warmup), as the example does; with
  `min_snr_gamma` each picture's loss is weighted min(SNR, gamma) / SNR by `diffusers.training_utils.compute_snr`,
  as the example's `--snr_gamma` does.

The only project pieces it uses are the loaded model parts (weights), the tokenizer (turning text into ids)
and `methods.lora.select_targets` (the list of module names, so both loops train the same layers).
Snapshots of the LoRA weights are kept in memory at the save steps; `ReferenceRun.apply(step)` puts one on
the model for measuring and `remove()` restores the original UNet.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError

_REPEATS = re.compile(r"^(\d+)_")
# our schedule names -> diffusers' (`get_scheduler`); "constant" with warmup is diffusers' constant_with_warmup
_SCHEDULES = {"constant": "constant", "linear": "linear", "cosine": "cosine"}


@dataclass
class ReferenceRun:
    parts: Any
    unet: torch.nn.Module               # a copy of the base UNet with LoRA layers injected
    original: torch.nn.Module
    snapshots: dict[int, dict[str, torch.Tensor]]
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)     # the learning rate of each step

    @property
    def save_steps(self) -> list[int]:
        return sorted(self.snapshots)

    def apply(self, step: int) -> None:
        """Put the LoRA weights saved at `step` on the model (parts.unet becomes the adapted copy)."""
        state = self.snapshots[step]
        with torch.no_grad():
            for name, p in self.unet.named_parameters():
                if name in state:
                    p.copy_(state[name])
        self.unet.eval()
        self.parts.unet = self.unet

    def remove(self) -> None:
        self.parts.unet = self.original


def _pictures(folder: Path) -> list[tuple[Path, str, int]]:
    """(picture, caption, repeats) under a kohya-style folder: `N_name/xxx.png` + `xxx.txt`."""
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = _REPEATS.match(sub.name)
        repeats = int(m.group(1)) if m else 1
        for pic in sorted(sub.glob("*.png")):
            cap = pic.with_suffix(".txt")
            out.append((pic, cap.read_text(encoding="utf-8").strip() if cap.is_file() else "", repeats))
    return out


def _encode(parts: Any, files: list[Path], size: int) -> torch.Tensor:
    from PIL import Image

    vae, device = parts.vae, parts.device
    lat = []
    with torch.no_grad():
        for start in range(0, len(files), 32):
            px = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC),
                                      dtype=np.float32) / 127.5 - 1 for f in files[start:start + 32]])
            x = torch.from_numpy(px).permute(0, 3, 1, 2).to(device, parts.dtype)
            lat.append(vae.encode(x).latent_dist.mean.float() * parts.latent_scale)
    return torch.cat(lat)


def _noise_schedule(alphas_cumprod: torch.Tensor) -> Any:
    """diffusers' DDPMScheduler on the model's own beta schedule (recovered from its cumulative alphas)."""
    from diffusers import DDPMScheduler

    ac = alphas_cumprod
    betas = 1 - ac / torch.cat([torch.ones(1), ac[:-1]])
    return DDPMScheduler(num_train_timesteps=len(ac), trained_betas=betas.double().numpy())


def _lr_schedule(cfg: Any, opt: torch.optim.Optimizer) -> Any:
    """diffusers' `get_scheduler` for the settings' schedule ("constant" with warmup: constant_with_warmup)."""
    from diffusers.optimization import get_scheduler

    name = _SCHEDULES.get(cfg.lr_scheduler, cfg.lr_scheduler)
    if name == "constant" and cfg.lr_warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, opt, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps)


def _snr_weighted(per: torch.Tensor, sched: Any, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-picture epsilon losses weighted min(SNR, gamma) / SNR, as diffusers' text-to-image example does
    (`compute_snr`); unchanged when gamma is 0."""
    if not gamma:
        return per
    from diffusers.training_utils import compute_snr

    snr = compute_snr(sched, t).to(per.device)
    return per * torch.clamp(snr, max=gamma) / snr


def _ids(tok: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    rows = []
    for c in captions:
        body = tok.encode(c)[:75]
        ids = [tok.start_id, *body, tok.end_id]
        rows.append(ids + [tok.end_id] * (77 - len(ids)))
    return torch.tensor(rows, device=device)


def train_reference_lora(cfg: Any, parts: Any, *, save_steps: list[int], events: Any = None,
                         stop: Any = None) -> ReferenceRun:
    """Train LoRA as `cfg` (TrainSettings, method lora) says on `parts` (left unchanged); see the module text."""
    from peft import LoraConfig, inject_adapter_in_model

    from ..methods.lora import LoraSettings, select_targets

    if cfg.method != "lora":
        raise UserError("the reference loop trains LoRA only")
    if cfg.lora.network_type != "lora" or cfg.lora.train_text_encoder or not cfg.lora.train_unet:
        raise UserError("the reference loop trains plain LoRA on the UNet only (network_type lora, "
                        "train_text_encoder off)")
    if cfg.lr_scheduler not in _SCHEDULES or cfg.grad_accum != 1 \
            or cfg.noise_offset or cfg.caption_dropout or cfg.optimizer != "adamw" \
            or cfg.min_timestep != 0 or cfg.max_timestep != 1000 \
            or (cfg.lr_scheduler == "cosine" and cfg.lr_cycles != 1.0):
        raise UserError("the reference loop knows a constant, linear or cosine (one half-wave) learning rate "
                        "with warmup, min-SNR weighting, AdamW and every timestep, with no accumulation, noise offset "
                        "or caption dropout only")
    device = parts.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator("cpu").manual_seed(cfg.seed + 1)

    # ---- data: instance copies per epoch, class pictures cycled to the same count -----------------------
    inst = _pictures(Path(cfg.data))
    if not inst:
        raise UserError(f"no pictures under {cfg.data}")
    reg = _pictures(Path(cfg.reg_data)) if cfg.reg_data else []
    files = [p for p, _, _ in inst + reg]
    captions = [c for _, c, _ in inst + reg]
    latents = _encode(parts, files, cfg.resolution)
    epoch_items = [i for i, (_, _, r) in enumerate(inst) for _ in range(r)]
    reg_items = [len(inst) + (k % len(reg)) for k in range(len(epoch_items))] if reg else []
    pool = np.array(epoch_items + reg_items)
    is_reg = np.array([False] * len(epoch_items) + [True] * len(reg_items))

    # ---- the network ------------------------------------------------------------------------------------
    lset = LoraSettings(network_dim=cfg.lora.network_dim, network_alpha=cfg.lora.network_alpha,
                        targets=cfg.lora.targets, train_text_encoder=False)
    paths = [t.path for t in select_targets(parts, lset) if t.component == "unet"]
    alpha = cfg.lora.network_alpha or cfg.lora.network_dim
    unet = copy.deepcopy(parts.unet)
    unet.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=cfg.lora.network_dim, lora_alpha=alpha, target_modules=paths,
                                       lora_dropout=cfg.lora.dropout), unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    text = parts.text_encoders[0]
    tok = parts.tokenizers[0]
    sched = _noise_schedule(parts.alphas_cumprod)
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr or cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_sched = _lr_schedule(cfg, opt)
    run = ReferenceRun(parts, unet, parts.unet, {})
    unet.train()
    order = np.array([], dtype=np.int64)
    for step in range(1, cfg.max_steps + 1):
        if stop is not None and getattr(stop, "requested", False):
            break
        if len(order) < cfg.batch_size:   # a new epoch: shuffle the instance copies and class pictures
            order = np.concatenate([order, torch.randperm(len(pool), generator=gen).numpy()])
        pick, order = order[:cfg.batch_size], order[cfg.batch_size:]
        idx = pool[pick]
        x0 = latents[idx].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = sched.add_noise(x0, noise, t).float()
        with torch.no_grad():
            context = text(_ids(tok, [captions[i] for i in idx], device)).last_hidden_state
        pred = unet(noisy, t.to(device), encoder_hidden_states=context).sample
        per = torch.nn.functional.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        per = _snr_weighted(per, sched, t, cfg.min_snr_gamma)
        w = torch.where(torch.from_numpy(is_reg[pick]).to(device), cfg.prior_loss_weight, 1.0)
        loss = (per * w).mean()
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        run.lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        run.losses.append(float(loss.detach()))
        run.steps = step
        if events is not None:
            events.progress(step, cfg.max_steps, loss=run.losses[-1], phase="reference")
        if step in save_steps:
            run.snapshots[step] = {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}
    unet.eval()
    if not run.snapshots:
        raise UserError("the reference run stopped before its first save")
    return run
