"""Pretrain the bundled toy SD1 model from scratch, budgeted by wall-clock time per stage.

Stages (each stops at its time budget, so a slow shared machine does fewer steps, not a longer run):

1. VAE: diffusers `AutoencoderKL` (f = 8, 4 latent channels) on random crops of toy pictures, concept
   pictures included (`datasets.iter_autoencoder_pictures`), MSE + a tiny KL term, with a cosine learning-
   rate decay over the budget (the feasibility probe: without decay the VAE bounces and blurs small shapes).
2. Latent cache: a fixed set of captioned plain-world pictures (held-out triples excluded) encoded once;
   the latent scale factor is 1 / std of the latents, as SD's 0.18215 was chosen.
3. Text encoder: a CLIP text transformer with the standard 49,408-token vocabulary and 77 positions, random
   and frozen (the probe: enough to tell the toy world's few words apart). Every caption is encoded once,
   through the same A1111-exact prompt path the trainers use (`models.conditioning.PromptEncoder`).
4. UNet: SD1 topology at small widths (cross-attention on the first three levels, eps prediction, SD1's
   scaled-linear schedule), AdamW with warm-up and cosine decay over the budget, 10 % caption dropout (so
   classifier-free guidance works), min-SNR loss weighting and an EMA copy, which is what gets saved.

The result is one fp16 `.safetensors` in A1111's LDM layout (`models.checkpoint.save_checkpoint`) carrying
the training config, steps, timings and measured held-out accuracy in its metadata, plus the LDM `.yaml`
beside it. Everything is seeded; CUDA is used when present.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..events import Events, StopToken
from . import world
from .datasets import iter_autoencoder_pictures

TEXT_VERSION_SUFFIX = ".tokenizer"   # the text-encoder folder beside an installed model: <stem>.tokenizer


@dataclass
class PretrainConfig:
    """All knobs of a pretraining run (saved as `lab.pretrain_config` metadata)."""

    seed: int = 1234
    size: int = 64                      # picture side in pixels (latents are size/8)
    # stage budgets in minutes of wall time
    vae_minutes: float = 12.0
    unet_minutes: float = 36.0
    # VAE
    vae_widths: tuple[int, ...] = (32, 64, 64, 64)
    vae_pool: int = 6000                # rendered pictures the crops come from
    vae_crop: int = 32
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_lr_end: float = 2e-5
    vae_kl: float = 1e-6
    # decoder polish (after the UNet): the decoder alone, on the frozen encoder's latents
    decoder_minutes: float = 0.0
    decoder_lr: float = 2e-4
    decoder_lr_end: float = 1e-5
    # latent cache
    latent_pictures: int = 8000
    # text encoder
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 2
    # UNet
    unet_widths: tuple[int, ...] = (32, 64, 64, 64)
    unet_layers: int = 2
    head_channels: int = 8
    unet_batch: int = 64
    unet_lr: float = 8e-4
    unet_lr_end_ratio: float = 0.1
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    drop_position: float = 0.2          # share of captions without the position words
    drop_size: float = 0.1              # share of captions without the size word
    min_snr_gamma: float = 5.0          # 0 = plain MSE
    ema_decay: float = 0.996
    # evaluation after training
    eval_samples: int = 200
    eval_steps: int = 20
    eval_cfg: float = 6.0
    eval_sampler: str = "ddim"
    # CPU threads (0 = torch's default). On a busy shared machine 1 thread is several times faster than 2:
    # OpenMP's threads wait for each other whenever one of them is descheduled.
    threads: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class PretrainResult:
    path: Path
    yaml_path: Path
    steps: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    latent_scale: float = 0.0
    vae_psnr: float = 0.0


# ---- architecture -------------------------------------------------------------------------------------
def toy_architecture(cfg: PretrainConfig, latent_scale: float = 0.18215):
    """The toy model's `Architecture` (SD1 topology: attention on every level but the last)."""
    from ..models.checkpoint import Architecture
    from ..models.ldm_text import CLIP_TEXT_BASE as TEXT

    levels = len(cfg.unet_widths)
    if any(w % 32 for w in cfg.unet_widths + cfg.vae_widths):
        raise UserError("network widths must be multiples of 32 (LDM uses 32 normalization groups)")
    latent = cfg.size // 8
    unet = {
        "sample_size": latent, "in_channels": 4, "out_channels": 4, "norm_num_groups": 32,
        "flip_sin_to_cos": True, "freq_shift": 0, "upcast_attention": False,
        "down_block_types": ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
        "block_out_channels": list(cfg.unet_widths), "layers_per_block": cfg.unet_layers,
        "cross_attention_dim": cfg.text_hidden,
        "attention_head_dim": [max(1, w // cfg.head_channels) for w in cfg.unet_widths],
        "use_linear_projection": False, "transformer_layers_per_block": [1] * levels,
    }
    vae = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * len(cfg.vae_widths),
           "up_block_types": ["UpDecoderBlock2D"] * len(cfg.vae_widths),
           "block_out_channels": list(cfg.vae_widths), "layers_per_block": 1, "latent_channels": 4,
           "norm_num_groups": 32, "sample_size": cfg.size, "scaling_factor": float(latent_scale)}
    text = [{**TEXT, "hidden_size": cfg.text_hidden, "intermediate_size": 4 * cfg.text_hidden,
             "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
             "hidden_act": "quick_gelu", "projection_dim": cfg.text_hidden}]
    return Architecture(family="sd1", prediction="eps", unet=unet, vae=vae, text=text,
                        latent_scale=float(latent_scale))


# ---- helpers -------------------------------------------------------------------------------------------
def _to_pixels(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()          # uint8 [N, 3, H, W]


def _cosine(frac: float, start: float, end: float) -> float:
    frac = min(max(frac, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))


class _Clock:
    def __init__(self, minutes: float) -> None:
        self.start = time.monotonic()
        self.budget = max(0.0, minutes * 60)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def frac(self) -> float:
        return self.elapsed / self.budget if self.budget else 1.0

    @property
    def done(self) -> bool:
        return self.elapsed >= self.budget


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.float().clamp(-1, 1), b.float()).item()
    return 10 * math.log10(4 / max(mse, 1e-12))


@torch.no_grad()
def settle_text_encoder(text: torch.nn.Module, seed: int) -> None:
    """Give the frozen random text encoder's layer norms trained-looking values.

    Fresh layer norms are exactly (weight 1, bias 0), so every output vector has mean 0 and the mean of a
    whole context is 0 up to rounding. A1111's prompt emphasis ("Original") rescales by
    mean(z) / mean(weighted z): near zero over near zero, which gives NaN or wild factors. Jittering the
    norms and shifting the final bias keeps the context mean well away from 0, as in a trained CLIP.
    """
    g = torch.Generator().manual_seed(seed + 11)
    for mod in text.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.weight.add_(0.1 * torch.randn(mod.weight.shape, generator=g))
            mod.bias.add_(0.1 * torch.randn(mod.bias.shape, generator=g))
    final = text.text_model.final_layer_norm
    final.bias.add_(0.25)


# ---- stage 1: VAE --------------------------------------------------------------------------------------
def train_vae(vae: torch.nn.Module, cfg: PretrainConfig, device: torch.device, events: Events,
              stop: StopToken) -> tuple[int, float]:
    """Train `vae` in place for `cfg.vae_minutes`; returns (steps, PSNR on full held-out pictures)."""
    it = iter_autoencoder_pictures(cfg.seed, cfg.size)
    pool = _to_pixels([next(it) for _ in range(cfg.vae_pool)])
    check = _to_pixels([next(it) for _ in range(64)]).float().div(127.5).sub(1).to(device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train().requires_grad_(True)
    clock, step, crop = _Clock(cfg.vae_minutes), 0, min(cfg.vae_crop, cfg.size)
    ema_loss = None
    while not clock.done and not stop.requested:
        lr = _cosine(clock.frac, cfg.vae_lr, cfg.vae_lr_end)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(pool), (cfg.vae_batch,), generator=gen)
        ox, oy = (torch.randint(cfg.size - crop + 1, (2,), generator=gen).tolist()
                  if crop < cfg.size else (0, 0))
        x = pool[idx][:, :, oy:oy + crop, ox:ox + crop].float().div(127.5).sub(1).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            events.emit("warning", text=f"non-finite VAE loss at step {step}; batch skipped")
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 50 == 0:
            events.emit("loss", stage="vae", step=step, loss=ema_loss, lr=lr)
            events.progress(int(clock.elapsed), int(clock.budget), stage="vae", steps_done=step, loss=ema_loss)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        rec = vae.decode(vae.encode(check).latent_dist.mode()).sample
    return step, _psnr(rec, check)


def polish_decoder(vae: torch.nn.Module, cfg: PretrainConfig, device: torch.device, events: Events,
                   stop: StopToken, minutes: float | None = None) -> tuple[int, float]:
    """Train only the VAE's decoder for `minutes` (default `cfg.decoder_minutes`); returns (steps, PSNR).

    The encoder is frozen, so the latent space the UNet learned stays exactly the same: this sharpens
    what the model draws without touching the UNet (as SD's fine-tuned "ft-MSE" VAE decoder did). The decoder
    learns from posterior samples, which is what the UNet's outputs resemble.
    """
    minutes = cfg.decoder_minutes if minutes is None else minutes
    it = iter_autoencoder_pictures(cfg.seed + 5, cfg.size)
    pool = _to_pixels([next(it) for _ in range(cfg.vae_pool)])
    check = _to_pixels([next(it) for _ in range(64)]).float().div(127.5).sub(1).to(device)
    gen = torch.Generator().manual_seed(cfg.seed + 6)
    vae.requires_grad_(False).eval()
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for prm in trained:
        prm.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(trained, lr=cfg.decoder_lr, weight_decay=0.0)
    clock, step, crop, ema_loss = _Clock(minutes), 0, min(cfg.vae_crop, cfg.size), None
    while not clock.done and not stop.requested:
        lr = _cosine(clock.frac, cfg.decoder_lr, cfg.decoder_lr_end)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(pool), (cfg.vae_batch,), generator=gen)
        ox, oy = (torch.randint(cfg.size - crop + 1, (2,), generator=gen).tolist()
                  if crop < cfg.size else (0, 0))
        x = pool[idx][:, :, oy:oy + crop, ox:ox + crop].float().div(127.5).sub(1).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            events.emit("warning", text=f"non-finite decoder loss at step {step}; batch skipped")
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 50 == 0:
            events.emit("loss", stage="decoder", step=step, loss=ema_loss, lr=lr)
            events.progress(int(clock.elapsed), int(clock.budget), stage="decoder", steps_done=step, loss=ema_loss)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        rec = vae.decode(vae.encode(check).latent_dist.mode()).sample
    return step, _psnr(rec, check)


# ---- stage 2/3: latents and captions --------------------------------------------------------------------
def _caption(scene: world.Scene, generic_caption: str, rng: np.random.Generator, cfg: PretrainConfig) -> str:
    generic = world.CLASS_WORD in generic_caption.split()[1:4] and not scene.is_subject
    return scene.caption(size=bool(rng.random() >= cfg.drop_size), position=bool(rng.random() >= cfg.drop_position),
                         generic=generic)


@torch.no_grad()
def cache_latents(vae: torch.nn.Module, cfg: PretrainConfig, device: torch.device, events: Events,
                  stop: StopToken) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(posterior means, posterior stds, captions) of `cfg.latent_pictures` plain-world pictures."""
    it = world.iter_pictures(cfg.seed + 7, cfg.size, holdout="exclude")
    rng = world.make_rng(cfg.seed, 20)
    means, stds, captions = [], [], []
    batch = 250
    for start in range(0, cfg.latent_pictures, batch):
        if stop.requested:
            raise UserError("pretraining stopped")
        items = [next(it) for _ in range(min(batch, cfg.latent_pictures - start))]
        x = _to_pixels([im for im, _, _ in items]).float().div(127.5).sub(1).to(device)
        post = vae.encode(x).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
        captions += [_caption(scene, text, rng, cfg) for _, text, scene in items]
        events.progress(start + len(items), cfg.latent_pictures, stage="latents")
    return torch.cat(means), torch.cat(stds), captions


@torch.no_grad()
def encode_captions(prompt_encoder, captions: list[str], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(contexts of the unique captions [U, 77, D], index of each caption into them [N])."""
    unique = sorted(set(captions) | {""})
    index = {c: i for i, c in enumerate(unique)}
    parts = [prompt_encoder(unique[s:s + batch]).context.float().cpu() for s in range(0, len(unique), batch)]
    contexts = torch.cat(parts)
    if not torch.isfinite(contexts).all():
        raise UserError("the text encoder returned non-finite values; check the attention implementation")
    return contexts, torch.tensor([index[c] for c in captions], dtype=torch.long)


# ---- stage 4: UNet -------------------------------------------------------------------------------------
def train_unet(unet: torch.nn.Module, means: torch.Tensor, stds: torch.Tensor, scale: float,
               contexts: torch.Tensor, caption_index: torch.Tensor, uncond_index: int, cfg: PretrainConfig,
               device: torch.device, events: Events, stop: StopToken) -> tuple[torch.nn.Module, int, float]:
    """Train `unet` for `cfg.unet_minutes`; returns (EMA copy, steps, final smoothed loss)."""
    import copy

    from ..models.schedule import alphas_cumprod

    ac = alphas_cumprod().float().to(device)
    snr = ac / (1 - ac)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.train().requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    means, stds = means.to(device), stds.to(device)
    contexts, caption_index = contexts.to(device), caption_index.to(device)
    clock, step, ema_loss = _Clock(cfg.unet_minutes), 0, float("nan")
    while not clock.done and not stop.requested:
        lr = cfg.unet_lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        lr *= _cosine(clock.frac, 1.0, cfg.unet_lr_end_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(means), (cfg.unet_batch,), generator=gen).to(device)
        eps_z = torch.randn(means[idx].shape, generator=gen).to(device)
        z = (means[idx] + stds[idx] * eps_z) * scale
        cap = caption_index[idx]
        drop = (torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout).to(device)
        cap = torch.where(drop, torch.full_like(cap, uncond_index), cap)
        ctx = contexts[cap]
        t = torch.randint(0, len(ac), (cfg.unet_batch,), generator=gen).to(device)
        noise = torch.randn(z.shape, generator=gen).to(device)
        a = ac[t].sqrt()[:, None, None, None]
        s = (1 - ac[t]).sqrt()[:, None, None, None]
        pred = unet(a * z + s * noise, t, encoder_hidden_states=ctx).sample
        per = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:
            per = per * (snr[t].clamp(max=cfg.min_snr_gamma) / snr[t])
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):        # never let one bad batch poison the weights and the EMA
            events.emit("warning", text=f"non-finite UNet loss at step {step}; batch skipped")
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p.detach(), 1 - decay)
        ema_loss = loss.item() if math.isnan(ema_loss) else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 25 == 0:
            events.emit("loss", stage="unet", step=step, loss=ema_loss, lr=lr)
            events.progress(int(clock.elapsed), int(clock.budget), stage="unet", steps_done=step, loss=ema_loss)
    unet.eval().requires_grad_(False)
    return ema, step, ema_loss


# ---- the whole run -------------------------------------------------------------------------------------
def pretrain(out: str | Path, cfg: PretrainConfig | None = None, *, events: Events | None = None,
             stop: StopToken | None = None, device: str | torch.device | None = None,
             overwrite: bool = False) -> PretrainResult:
    """Run all stages and write `out` (.safetensors) plus `out.with_suffix('.yaml')`."""
    from ..hosts.standalone import default_device
    from ..models.checkpoint import LoadedCheckpoint, build_modules
    from ..models.conditioning import PromptEncoder
    from ..models.tokenizer import make_tokenizers

    cfg = cfg or PretrainConfig()
    events = events or Events()
    stop = stop or StopToken()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"the output must be a .safetensors file, not {out.name}")
    yaml_path = out.with_suffix(".yaml")
    if not overwrite and (out.exists() or yaml_path.exists()):
        raise UserError(f"{out} or its .yaml already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device else default_device()
    world.check_size(cfg.size)
    if cfg.size % 8:
        raise UserError("picture size must be a multiple of 8")
    if cfg.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    t_all = time.monotonic()
    res = PretrainResult(out, yaml_path)

    arch = toy_architecture(cfg)
    unet, vae, encoders = build_modules(arch, empty=False)
    settle_text_encoder(encoders[0], cfg.seed)
    vae.to(device)

    events.status(f"VAE: training for {cfg.vae_minutes:g} min on {device}")
    t0 = time.monotonic()
    res.steps["vae"], res.vae_psnr = train_vae(vae, cfg, device, events, stop)
    res.seconds["vae"] = time.monotonic() - t0
    events.status(f"VAE: {res.steps['vae']} steps, held-out PSNR {res.vae_psnr:.2f} dB")
    if stop.requested:
        raise UserError("pretraining stopped")

    t0 = time.monotonic()
    events.status(f"latents: encoding {cfg.latent_pictures} pictures")
    means, stds, captions = cache_latents(vae, cfg, device, events, stop)
    sample = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(cfg.seed + 3))
    res.latent_scale = float(1.0 / sample.std())
    arch.latent_scale = res.latent_scale
    arch.vae["scaling_factor"] = res.latent_scale
    vae.register_to_config(scaling_factor=res.latent_scale)
    res.seconds["latents"] = time.monotonic() - t0
    events.status(f"latents: std {float(sample.std()):.3f} -> scale factor {res.latent_scale:.4f}")

    t0 = time.monotonic()
    text = encoders[0].to(device).eval().requires_grad_(False)
    prompt_encoder = PromptEncoder("sd1", make_tokenizers("sd1"), [text])
    contexts, caption_index = encode_captions(prompt_encoder, captions)
    uncond_index = int(caption_index.new_tensor(0))   # "" sorts first among the unique captions
    res.seconds["captions"] = time.monotonic() - t0
    events.status(f"text: {len(contexts) - 1} distinct captions encoded")

    unet.to(device)
    events.status(f"UNet: training for {cfg.unet_minutes:g} min")
    t0 = time.monotonic()
    ema, res.steps["unet"], final_loss = train_unet(unet, means, stds, res.latent_scale, contexts, caption_index,
                                                    uncond_index, cfg, device, events, stop)
    res.seconds["unet"] = time.monotonic() - t0
    events.status(f"UNet: {res.steps['unet']} steps, loss {final_loss:.4f}")
    if stop.requested:
        raise UserError("pretraining stopped")

    if cfg.decoder_minutes > 0:
        events.status(f"decoder: polishing for {cfg.decoder_minutes:g} min (encoder frozen)")
        t0 = time.monotonic()
        res.steps["decoder"], res.vae_psnr = polish_decoder(vae, cfg, device, events, stop)
        res.seconds["decoder"] = time.monotonic() - t0
        events.status(f"decoder: {res.steps['decoder']} steps, held-out PSNR {res.vae_psnr:.2f} dB")
        if stop.requested:
            raise UserError("pretraining stopped")

    loaded = LoadedCheckpoint(arch, ema.cpu(), vae.cpu(), [text.cpu()])
    meta = {
        "lab.note": "Training Lab toy model: SD1 topology at toy widths, pretrained from scratch on the toy world",
        "lab.pretrain_config": cfg.to_json(),
        "lab.pretrain_steps": json.dumps(res.steps),
        "lab.pretrain_seconds": json.dumps({k: round(v, 1) for k, v in res.seconds.items()}),
        "lab.vae_psnr": f"{res.vae_psnr:.2f}",
        "lab.unet_final_loss": f"{final_loss:.5f}",
        "lab.device": str(device),
        "lab.torch": torch.__version__,
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.title": out.stem,
        "modelspec.prediction_type": "epsilon",
        "modelspec.resolution": f"{cfg.size}x{cfg.size}",
    }
    res.accuracy, eval_seconds = save_evaluated(out, loaded, meta, cfg, device=device, events=events, stop=stop,
                                                overwrite=overwrite)
    res.seconds["evaluate"] = eval_seconds
    res.seconds["total"] = time.monotonic() - t_all
    events.emit("saved", path=str(out), accuracy=res.accuracy)
    return res


def save_evaluated(out: Path, loaded, meta: dict[str, str], cfg: PretrainConfig, *, device: torch.device,
                   events: Events, stop: StopToken, overwrite: bool) -> tuple[dict[str, float], float]:
    """Save fp16, measure the held-out accuracy of exactly those weights, save again with the figures in the
    metadata, and write the LDM yaml beside the file. Returns (accuracy, evaluation seconds)."""
    from ..formats.files import atomic_write_text
    from ..hosts.standalone import StandaloneHost
    from ..models.checkpoint import save_checkpoint
    from .evaluate import evaluate_parts
    from .ldm_config import ldm_yaml

    tmp = out.with_name(out.stem + ".unevaluated.safetensors")
    save_checkpoint(tmp, loaded, dtype=torch.float16, metadata=meta, include_extras=False, overwrite=True)
    try:
        events.status(f"evaluating on {cfg.eval_samples} held-out prompts")
        t0 = time.monotonic()
        parts = StandaloneHost(device=device, dtype="fp32").load(tmp)
        accuracy = evaluate_parts(parts, n=cfg.eval_samples, steps=cfg.eval_steps, cfg_scale=cfg.eval_cfg,
                                  sampler=cfg.eval_sampler, stop=stop)
        accuracy["protocol"] = f"{cfg.eval_sampler} {cfg.eval_steps} steps CFG {cfg.eval_cfg:g}"
        seconds = time.monotonic() - t0
    finally:
        tmp.unlink(missing_ok=True)
    meta = {**meta, "lab.accuracy": json.dumps(accuracy)}
    save_checkpoint(out, loaded, dtype=torch.float16, metadata=meta, include_extras=False, overwrite=overwrite)
    atomic_write_text(out.with_suffix(".yaml"), ldm_yaml(loaded.arch, out.stem + TEXT_VERSION_SUFFIX),
                      overwrite=overwrite)
    events.status(f"held-out accuracy: colour {accuracy['colour']:.3f}, shape {accuracy['shape']:.3f}, "
                  f"background {accuracy['background']:.3f}")
    return accuracy, seconds


def _open_saved(model: Path, out: Path, cfg: PretrainConfig | None, device: str | torch.device | None,
                overwrite: bool):
    """A later stage on a saved toy model: check `out`, load `model` in fp32, and take its pretraining settings
    from its metadata unless `cfg` is given. Returns (device, loaded, metadata, cfg)."""
    from ..hosts.standalone import default_device
    from ..models.checkpoint import load_checkpoint

    if out.suffix != ".safetensors":
        raise UserError(f"the output must be a .safetensors file, not {out.name}")
    if not overwrite and (out.exists() or out.with_suffix(".yaml").exists()):
        raise UserError(f"{out} or its .yaml already exists; choose another --out or pass --overwrite")
    device = torch.device(device) if device else default_device()
    loaded = load_checkpoint(model, dtype=torch.float32, device=device)
    meta = dict(loaded.metadata)
    if cfg is None:
        known = PretrainConfig.__dataclass_fields__
        saved = json.loads(meta.get("lab.pretrain_config", "{}"))
        cfg = PretrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k in known})
    if cfg.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    return device, loaded, meta, cfg


def polish(model: str | Path, out: str | Path, minutes: float, cfg: PretrainConfig | None = None, *,
           events: Events | None = None, stop: StopToken | None = None, device: str | torch.device | None = None,
           overwrite: bool = False) -> PretrainResult:
    """The decoder-polish stage on an already saved toy model: `model` in, `out` (+ .yaml) re-evaluated."""
    events, stop = events or Events(), stop or StopToken()
    model, out = Path(model), Path(out)
    device, loaded, meta, cfg = _open_saved(model, out, cfg, device, overwrite)
    torch.manual_seed(cfg.seed + 9)
    res = PretrainResult(out, out.with_suffix(".yaml"), steps=json.loads(meta.get("lab.pretrain_steps", "{}")),
                         latent_scale=loaded.arch.latent_scale)
    events.status(f"decoder: polishing for {minutes:g} min (encoder frozen)")
    t0 = time.monotonic()
    res.steps["decoder"], res.vae_psnr = polish_decoder(loaded.vae, cfg, device, events, stop, minutes)
    res.seconds["decoder"] = time.monotonic() - t0
    events.status(f"decoder: {res.steps['decoder']} steps, held-out PSNR {res.vae_psnr:.2f} dB")
    if stop.requested:
        raise UserError("polishing stopped")
    seconds = {**json.loads(meta.get("lab.pretrain_seconds", "{}")), "decoder": round(res.seconds["decoder"], 1)}
    meta.update({"lab.pretrain_steps": json.dumps(res.steps), "lab.pretrain_seconds": json.dumps(seconds),
                 "lab.vae_psnr": f"{res.vae_psnr:.2f}", "lab.decoder_polish": json.dumps(
                     {"minutes": minutes, "steps": res.steps["decoder"], "lr": [cfg.decoder_lr, cfg.decoder_lr_end],
                      "source": model.name})})
    for m in (loaded.unet, loaded.vae, *loaded.text_encoders):
        m.cpu()
    res.accuracy, res.seconds["evaluate"] = save_evaluated(out, loaded, meta, cfg, device=device, events=events,
                                                           stop=stop, overwrite=overwrite)
    events.emit("saved", path=str(out), accuracy=res.accuracy)
    return res


def resume_unet(model: str | Path, out: str | Path, minutes: float, cfg: PretrainConfig | None = None, *,
                lr: float | None = None, events: Events | None = None, stop: StopToken | None = None,
                device: str | torch.device | None = None, overwrite: bool = False) -> PretrainResult:
    """Train the UNet of a saved toy model further (its VAE and text encoder unchanged), re-evaluate, save.

    The saved UNet is the EMA copy; training continues from it with a fresh optimizer (warm-up, cosine
    decay from `lr`, default half the pretraining rate) over a freshly encoded latent cache of the same
    pictures and captions (`cfg.seed`).
    """
    from ..models.checkpoint import LoadedCheckpoint
    from ..models.conditioning import PromptEncoder
    from ..models.tokenizer import make_tokenizers

    events, stop = events or Events(), stop or StopToken()
    model, out = Path(model), Path(out)
    device, loaded, meta, cfg = _open_saved(model, out, cfg, device, overwrite)
    torch.manual_seed(cfg.seed + 21)
    steps = json.loads(meta.get("lab.pretrain_steps", "{}"))
    res = PretrainResult(out, out.with_suffix(".yaml"), steps=steps, latent_scale=loaded.arch.latent_scale)
    t0 = time.monotonic()
    events.status(f"latents: encoding {cfg.latent_pictures} pictures")
    means, stds, captions = cache_latents(loaded.vae, cfg, device, events, stop)
    text = loaded.text_encoders[0]
    contexts, caption_index = encode_captions(PromptEncoder("sd1", make_tokenizers("sd1"), [text]), captions)
    res.seconds["latents"] = time.monotonic() - t0
    run = PretrainConfig(**{**asdict(cfg), "unet_minutes": minutes, "unet_lr": lr or cfg.unet_lr / 2,
                            "warmup_steps": 50, "seed": cfg.seed + 100})
    events.status(f"UNet: resuming for {minutes:g} min at lr {run.unet_lr:g}")
    t0 = time.monotonic()
    ema, n, final_loss = train_unet(loaded.unet, means, stds, loaded.arch.latent_scale, contexts, caption_index, 0,
                                    run, device, events, stop)
    res.seconds["unet_resume"] = time.monotonic() - t0
    if stop.requested:
        raise UserError("training stopped")
    steps["unet_resume"] = [*(steps.get("unet_resume") or []), n]     # one entry per resumed stretch
    events.status(f"UNet: {n} more steps, loss {final_loss:.4f}")
    seconds = {**json.loads(meta.get("lab.pretrain_seconds", "{}")),
               **{k: round(v, 1) for k, v in res.seconds.items()}}
    meta.update({"lab.pretrain_steps": json.dumps(steps), "lab.pretrain_seconds": json.dumps(seconds),
                 "lab.unet_final_loss": f"{final_loss:.5f}",
                 "lab.unet_resume": json.dumps({"minutes": minutes, "steps": n, "lr": run.unet_lr,
                                                "seed": run.seed, "source": model.name})})
    done = LoadedCheckpoint(loaded.arch, ema.cpu(), loaded.vae.cpu(), [text.cpu()], loaded.extras, loaded.dtypes)
    res.accuracy, res.seconds["evaluate"] = save_evaluated(out, done, meta, cfg, device=device, events=events,
                                                           stop=stop, overwrite=overwrite)
    events.emit("saved", path=str(out), accuracy=res.accuracy)
    return res
