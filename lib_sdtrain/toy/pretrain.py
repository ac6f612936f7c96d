"""Pretrain the bundled toy SD1 model from scratch, budgeted by wall-clock time per stage.

Stages (each stops at its time budget, so a slow shared machine does fewer steps, not a longer run):

1. VAE: diffusers `AutoencoderKL` (f = 8, 4 latent channels) on the broad picture families of `toy.broad`
   (far beyond the captioned world; the heart and the zkz bands held out), L1 + MSE + an edge (image-gradient)
   loss and a tiny KL term, crops first and whole pictures at the end, with a cosine learning-rate decay over
   the budget (the feasibility probe: without decay the VAE bounces and blurs small shapes). `pretrain_vae`
   runs this stage alone; `polish_decoder` retrains only the decoder (latent space unchanged).
2. Latent cache: a fixed set of captioned plain-world pictures (held-out triples excluded) encoded once;
   the latent scale factor is 1 / std of the latents, as SD's 0.18215 was chosen.
3. Text encoder: a CLIP text transformer with the standard 49,408-token vocabulary and 77 positions, fed the
   same 77 ids A1111's prompt path makes (`caption_ids`). With `text_train` (default) it trains jointly with
   the UNet, but only the embedding rows of words the captions use (`WorldVocabulary`): the concept tokens and
   every other word keep their initial embeddings, as rare tokens do in a real CLIP. Without it, it stays
   random and frozen and every caption is encoded once (v1).
4. UNet: SD1 topology at small widths (cross-attention on the first three levels, eps prediction, SD1's
   scaled-linear schedule), AdamW with warm-up and cosine decay over the budget, 10 % caption dropout (so
   classifier-free guidance works), min-SNR loss weighting and an EMA copy (of the text encoder too), which
   is what gets saved.

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
from . import broad, world
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
    vae_widths: tuple[int, ...] = (32, 64, 128, 128)
    vae_layers: int = 1                 # ResNet blocks per level (decoder: one more, as LDM and diffusers build it)
    # "broad": toy.broad's picture families (v2); "broad-bands": the same with bands inside shapes at every angle,
    # the toy world and textures twice as often (the v2.1 trial decoder); "world": the toy world + concepts (v1)
    vae_data: str = "broad"
    vae_pool: int = 12000               # rendered pictures the crops come from
    vae_crop: int = 32
    vae_batch: int = 32                 # batch of crops; full pictures go in half this batch
    vae_full_share: float = 0.35        # the last share of the VAE budget trains on whole pictures
    vae_lr: float = 1e-3
    vae_lr_end: float = 2e-5
    vae_kl: float = 1e-6
    vae_edge: float = 0.5               # weight of the L1 loss on image gradients (keeps edges and thin lines sharp)
    # decoder polish (after the UNet): the decoder alone, on the frozen encoder's latents
    decoder_minutes: float = 0.0
    decoder_lr: float = 2e-4
    decoder_lr_end: float = 1e-5
    # latent cache
    latent_pictures: int = 8000
    # trial (session 23): this share of the cache's base-shape pictures have their shape filled with a captioned
    # texture ("a large red checked circle ..."; toy.broad.textured_scene); 0 = the plain world only
    textured_share: float = 0.0
    # text encoder
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 2
    text_train: bool = True             # train the text encoder with the UNet (v1: random and frozen)
    text_lr_ratio: float = 0.5          # its learning rate relative to the UNet's
    captions_per_batch: int = 16        # distinct captions per UNet batch (each with batch/this pictures)
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
    snapshot_minutes: float = 0.0       # write an unevaluated intermediate file this often (0: never)
    # evaluation after training
    eval_samples: int = 200
    eval_steps: int = 20
    eval_cfg: float = 6.0
    eval_sampler: str = "ddim"
    # CPU threads (0 = torch's default). On a busy shared machine 1 thread is several times faster than 2:
    # OpenMP's threads wait for each other whenever one of them is descheduled.
    threads: int = 0

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str | Path) -> PretrainConfig:
        """The config a saved toy model was made with (its `lab.pretrain_config`; defaults where absent). Keys this
        version does not know are ignored; lists become the tuples the fields hold."""
        try:
            saved = json.loads(meta.get("lab.pretrain_config", "{}"))
        except (ValueError, RecursionError):
            raise UserError(f"{source}: its lab.pretrain_config metadata is not valid JSON") from None
        if not isinstance(saved, dict):
            raise UserError(f"{source}: its lab.pretrain_config metadata is not a table")
        known = cls.__dataclass_fields__
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k in known})

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
           "block_out_channels": list(cfg.vae_widths), "layers_per_block": cfg.vae_layers, "latent_channels": 4,
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


@torch.no_grad()
def check_emphasis_safe(text: torch.nn.Module, prompt_encoder_ids: torch.Tensor) -> None:
    """UserError when a context's mean is near zero (A1111's emphasis rescaling would divide by it)."""
    z = text(input_ids=prompt_encoder_ids[:64].to(next(text.parameters()).device)).last_hidden_state
    if not torch.isfinite(z).all():
        raise UserError("the trained text encoder returns non-finite values")
    if float(z.mean(dim=(1, 2)).abs().min()) < 1e-3:
        raise UserError("the trained text encoder gives a context with mean near 0; emphasis would be unstable")


# ---- stage 1: VAE --------------------------------------------------------------------------------------
def _vae_pictures(cfg: PretrainConfig, seed: int):
    if cfg.vae_data == "broad":
        from .broad import iter_broad_pictures

        return iter_broad_pictures(seed, cfg.size)
    if cfg.vae_data == "broad-bands":
        from .broad import FAMILIES, iter_broad_pictures

        return iter_broad_pictures(seed, cfg.size, ("world", "textures", *FAMILIES), bands_held_out=False)
    if cfg.vae_data == "world":
        return iter_autoencoder_pictures(seed, cfg.size)
    raise UserError(f"vae_data must be 'broad', 'broad-bands' or 'world', not {cfg.vae_data!r}")


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 distance of horizontal and vertical pixel differences: what plain pixel losses let blur away."""
    dxa, dxb = a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1]
    dya, dyb = a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :]
    return F.l1_loss(dxa, dxb) + F.l1_loss(dya, dyb)


def vae_loss(vae: torch.nn.Module, x: torch.Tensor, cfg: PretrainConfig) -> torch.Tensor:
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample
    loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + cfg.vae_kl * post.kl().mean()
    if cfg.vae_edge > 0:
        loss = loss + cfg.vae_edge * _grad_l1(rec, x)
    return loss


def train_vae(vae: torch.nn.Module, cfg: PretrainConfig, device: torch.device, events: Events,
              stop: StopToken) -> tuple[int, float]:
    """Train `vae` in place for `cfg.vae_minutes`; returns (steps, PSNR on full held-out pictures).

    Pictures come from `cfg.vae_data` (v2: `toy.broad`, far beyond the captioned world). The first part of the
    budget trains on random crops (4x cheaper per picture), the last `cfg.vae_full_share` on whole pictures, so
    the mid-block attention and the group norms end on the statistics of the pictures the model will see.
    Loss: L1 + 0.5 MSE + `cfg.vae_edge` x L1 of image gradients + a tiny KL; learning rate warm-up and cosine decay.
    """
    vae.train().requires_grad_(True)
    return _autoencoder_loop(vae, list(vae.parameters()), cfg, device, events, stop, minutes=cfg.vae_minutes,
                             lr=(cfg.vae_lr, cfg.vae_lr_end), warmup=100, seed=cfg.seed, stage="vae",
                             loss_fn=lambda x: vae_loss(vae, x, cfg))


def _autoencoder_loop(vae: torch.nn.Module, params: list, cfg: PretrainConfig, device: torch.device, events: Events,
                      stop: StopToken, *, minutes: float, lr: tuple[float, float], warmup: int, seed: int, stage: str,
                      loss_fn) -> tuple[int, float]:
    """The loop shared by VAE training and the decoder polish: `cfg.vae_pool` pictures of `cfg.vae_data` (from
    `seed`; 64 more held out), random crops then (the last `cfg.vae_full_share` of the time) whole pictures,
    random mirroring, AdamW on `params` with a cosine decay from lr[0] to lr[1] (after `warmup` steps of linear
    warm-up when > 0), gradients clipped to norm 1, `loss_fn(x)` on pictures in [-1, 1]. Returns (steps, PSNR of
    the held-out pictures' round trip)."""
    it = _vae_pictures(cfg, seed)
    pool = _to_pixels([next(it) for _ in range(cfg.vae_pool)])
    check = _to_pixels([next(it) for _ in range(64)]).float().div(127.5).sub(1).to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(params, lr=lr[0], weight_decay=0.0)
    clock, step, crop, ema_loss = _Clock(minutes), 0, min(cfg.vae_crop, cfg.size), None
    while not clock.done and not stop.requested:
        rate = _cosine(clock.frac, lr[0], lr[1]) * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        for g in opt.param_groups:
            g["lr"] = rate
        full = clock.frac >= 1 - cfg.vae_full_share or crop >= cfg.size
        batch = max(1, cfg.vae_batch // 2) if full else cfg.vae_batch
        x = pool[torch.randint(len(pool), (batch,), generator=gen)]
        if not full:
            ox, oy = torch.randint(cfg.size - crop + 1, (2,), generator=gen).tolist()
            x = x[:, :, oy:oy + crop, ox:ox + crop]
        if torch.rand((), generator=gen) < 0.5:        # mirror: free variety, the world has no handedness
            x = x.flip(-1)
        loss = loss_fn(x.float().div(127.5).sub(1).to(device))
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            events.emit("warning", text=f"non-finite {'VAE' if stage == 'vae' else stage} loss at step {step}; "
                                        "batch skipped")
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 50 == 0:
            events.emit("loss", stage=stage, step=step, loss=ema_loss, lr=rate)
            events.progress(int(clock.elapsed), int(clock.budget), stage=stage, steps_done=step, loss=ema_loss)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        rec = vae.decode(vae.encode(check).latent_dist.mode()).sample
    return step, _psnr(rec, check)


def build_vae(cfg: PretrainConfig) -> torch.nn.Module:
    """A fresh toy VAE of `cfg`'s architecture (seeded by the caller)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**toy_architecture(cfg).vae)


def save_vae(vae: torch.nn.Module, path: str | Path, cfg: PretrainConfig, info: dict, overwrite: bool = False) -> Path:
    """The VAE alone (diffusers names, fp32) with its config and training record in the metadata."""
    from safetensors.torch import save_file

    from ..formats.files import atomic_write

    meta = {"lab.kind": "toy-vae", "lab.pretrain_config": cfg.to_json(), "lab.vae_info": json.dumps(info)}
    state = {k: v.detach().float().cpu().contiguous() for k, v in vae.state_dict().items()}
    return atomic_write(Path(path), lambda p: save_file(state, str(p), metadata=meta), overwrite=overwrite)


def use_threads(cfg: PretrainConfig, device: torch.device) -> None:
    """The job's CPU thread count (`cfg.threads`; 0 leaves torch's own). Set for the whole process: pretraining
    is a command of its own, nothing runs after it that would want the count back."""
    if cfg.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.threads)


def load_vae(path: str | Path, cfg: PretrainConfig) -> tuple[torch.nn.Module, dict]:
    """A VAE written by `save_vae` (UserError when it does not fit `cfg`'s architecture)."""
    from ..formats.safetensors_io import json_table, read_safetensors

    path = Path(path)
    if not path.is_file():
        raise UserError(f"VAE file not found: {path}")
    state, meta = read_safetensors(path)
    if meta.get("lab.kind") != "toy-vae":
        raise UserError(f"{path} is not a toy VAE written by `toy pretrain-vae`")
    vae = build_vae(cfg)
    try:
        vae.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit the configured VAE widths: {e}") from None
    return vae.eval().requires_grad_(False), json_table(meta.get("lab.vae_info")) or {}


def pretrain_vae(out: str | Path, cfg: PretrainConfig | None = None, *, events: Events | None = None,
                 stop: StopToken | None = None, device: str | torch.device | None = None,
                 overwrite: bool = False) -> dict:
    """Stage 1 alone: train the VAE for `cfg.vae_minutes` and save it to `out` (see `save_vae`)."""
    from ..hosts.standalone import resolve_device

    cfg = cfg or PretrainConfig()
    events, stop = events or Events(), stop or StopToken()
    out = Path(out)
    if not overwrite and out.exists():
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    device = resolve_device(device)
    use_threads(cfg, device)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).to(device)
    events.status(f"VAE: training for {cfg.vae_minutes:g} min on {device} ({cfg.vae_data} pictures)")
    t0 = time.monotonic()
    steps, psnr = train_vae(vae, cfg, device, events, stop)
    info = {"steps": steps, "seconds": round(time.monotonic() - t0, 1), "psnr": round(psnr, 2), "device": str(device)}
    events.status(f"VAE: {steps} steps, held-out PSNR {psnr:.2f} dB")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_vae(vae.cpu(), out, cfg, info, overwrite=overwrite)
    return info


def polish_decoder(vae: torch.nn.Module, cfg: PretrainConfig, device: torch.device, events: Events,
                   stop: StopToken, minutes: float | None = None) -> tuple[int, float]:
    """Train only the VAE's decoder for `minutes` (default `cfg.decoder_minutes`); returns (steps, PSNR).

    The encoder is frozen, so the latent space the UNet learned stays exactly the same: this sharpens
    what the model draws without touching the UNet (as SD's fine-tuned "ft-MSE" VAE decoder did). The decoder
    learns from posterior samples, which is what the UNet's outputs resemble.
    """
    minutes = cfg.decoder_minutes if minutes is None else minutes
    vae.requires_grad_(False).eval()
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for prm in trained:
        prm.requires_grad_(True)
    vae.decoder.train()

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x)
        return loss + cfg.vae_edge * _grad_l1(rec, x) if cfg.vae_edge > 0 else loss

    return _autoencoder_loop(vae, trained, cfg, device, events, stop, minutes=minutes,
                             lr=(cfg.decoder_lr, cfg.decoder_lr_end), warmup=0, seed=cfg.seed + 5, stage="decoder",
                             loss_fn=loss_fn)


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
    tex_rng = world.make_rng(cfg.seed, 21)     # its own stream: the plain pictures and captions stay the same
    means, stds, captions = [], [], []
    batch = 250
    for start in range(0, cfg.latent_pictures, batch):
        if stop.requested:
            raise UserError("pretraining stopped")
        items = [next(it) for _ in range(min(batch, cfg.latent_pictures - start))]
        texts = [_caption(scene, text, rng, cfg) for _, text, scene in items]
        if cfg.textured_share > 0:
            for i, (_, _, scene) in enumerate(items):
                word = f" {scene.shape} "
                if scene.is_subject or scene.is_styled or word not in texts[i] or not tex_rng.random() < cfg.textured_share:
                    continue
                picture, texture = broad.textured_scene(scene, cfg.size, tex_rng)
                items[i] = (picture, texts[i], scene)
                texts[i] = texts[i].replace(word, f" {texture}{word}", 1)
        x = _to_pixels([im for im, _, _ in items]).float().div(127.5).sub(1).to(device)
        post = vae.encode(x).latent_dist
        means.append(post.mean.cpu())
        stds.append(post.std.cpu())
        captions += texts
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


# ---- stage 4: UNet (and text encoder) ----------------------------------------------------------------
class WorldVocabulary:
    """Train only the token-embedding rows of words the pretraining captions use.

    The embedding table itself is frozen; a small table of offsets for the used ids is added in a forward hook,
    so every other row (the concept tokens `zwx`, `zkz`, every word the toy world never says) keeps exactly
    its initial embedding, as rare tokens do in a real CLIP. `fold()` adds the offsets into the table.
    """

    def __init__(self, text: torch.nn.Module, ids: torch.Tensor) -> None:
        self.table = text.get_input_embeddings()
        self.ids = torch.unique(ids.flatten()).to(self.table.weight.device)
        n = self.table.weight.shape[0]
        remap = torch.full((n,), len(self.ids), dtype=torch.long, device=self.table.weight.device)
        remap[self.ids] = torch.arange(len(self.ids), device=remap.device)
        self.remap = remap
        self.offsets = torch.nn.Parameter(torch.zeros(len(self.ids), self.table.weight.shape[1],
                                                      device=self.table.weight.device))
        self.table.weight.requires_grad_(False)
        self._hook = self.table.register_forward_hook(self._add)

    def _add(self, _module, inputs, output):
        rows = self.remap[inputs[0]]
        padded = torch.cat([self.offsets, self.offsets.new_zeros(1, self.offsets.shape[1])])
        return output + padded[rows].to(output.dtype)

    @torch.no_grad()
    def fold(self, table_weight: torch.Tensor | None = None, offsets: torch.Tensor | None = None) -> None:
        """Remove the hook and add the offsets (or `offsets`) into `table_weight` (default: the live table)."""
        self._hook.remove()
        weight = self.table.weight if table_weight is None else table_weight
        weight[self.ids.to(weight.device)] += (self.offsets if offsets is None else offsets).to(weight)


def caption_ids(prompt_encoder, captions: list[str]) -> torch.Tensor:
    """The 77 token ids A1111 feeds the text encoder for each caption (one chunk each) [U, 77]."""
    rows = []
    for c in captions:
        chunks = prompt_encoder.chunks(c)[0]
        if len(chunks) != 1:
            raise UserError(f"caption longer than one 75-token chunk: {c!r}")
        rows.append(chunks[0].ids)
    return torch.tensor(rows, dtype=torch.long)


def train_unet(unet: torch.nn.Module, means: torch.Tensor, stds: torch.Tensor, scale: float,
               contexts: torch.Tensor | None, caption_index: torch.Tensor, uncond_index: int, cfg: PretrainConfig,
               device: torch.device, events: Events, stop: StopToken, *, text: torch.nn.Module | None = None,
               ids: torch.Tensor | None = None, snapshot=None) -> tuple[torch.nn.Module, int, float] | tuple:
    """Train `unet` for `cfg.unet_minutes`; returns (EMA copy, steps, final smoothed loss).

    Fixed text: `contexts` [U, 77, D] of the unique captions. Joint text training: `text` (the CLIP text model)
    and `ids` [U, 77] instead; the text encoder trains with the UNet (learning rate `cfg.text_lr_ratio` of the
    UNet's; only the token rows the captions use, see `WorldVocabulary`) and the return value gains the text
    encoder's EMA copy: (EMA UNet, steps, loss, EMA text encoder). Batches then hold `cfg.captions_per_batch`
    distinct captions with several pictures each, so the text encoder runs on few sequences per step.
    `snapshot(step, ema_unet, ema_text_or_None)`: called every `cfg.snapshot_minutes` (0: never) for intermediate
    files; the text encoder passed is a folded copy.
    """
    import copy

    from ..models.schedule import alphas_cumprod

    joint = text is not None
    ac = alphas_cumprod().float().to(device)
    snr = ac / (1 - ac)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.train().requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    groups = [{"params": params, "weight_decay": 0.01, "ratio": 1.0}]
    if joint:
        if ids is None:
            raise UserError("joint text training needs the captions' token ids")
        ids = ids.to(device)
        ema_text = copy.deepcopy(text).eval().requires_grad_(False)     # before the hook goes on
        text.train().requires_grad_(True)
        vocab = WorldVocabulary(text, ids)
        text_params = [p for p in text.parameters() if p.requires_grad]
        groups.append({"params": text_params, "weight_decay": 0.0, "ratio": cfg.text_lr_ratio})
        groups.append({"params": [vocab.offsets], "weight_decay": 0.0, "ratio": cfg.text_lr_ratio})
        ema_offsets = vocab.offsets.detach().clone()
        # pictures grouped by caption (without the empty caption), for batches of few distinct captions
        order = torch.argsort(caption_index)
        counts = torch.bincount(caption_index, minlength=len(ids))
        starts = torch.cumsum(counts, 0) - counts
        per_caption = max(1, cfg.unet_batch // max(1, cfg.captions_per_batch))
    else:
        contexts = contexts.to(device)
    opt = torch.optim.AdamW(groups, lr=cfg.unet_lr)
    all_params = [p for g in groups for p in g["params"]]
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    means, stds = means.to(device), stds.to(device)
    caption_index = caption_index.to(device)
    clock, step, ema_loss = _Clock(cfg.unet_minutes), 0, float("nan")
    next_snapshot = cfg.snapshot_minutes * 60
    while not clock.done and not stop.requested:
        lr = cfg.unet_lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        lr *= _cosine(clock.frac, 1.0, cfg.unet_lr_end_ratio)
        for g in opt.param_groups:
            g["lr"] = lr * g["ratio"]
        if joint:
            # a random picture per group (captions weighted by how many pictures they have), then more with its caption
            seeds = torch.randint(len(means), (cfg.unet_batch // per_caption,), generator=gen)
            caps = caption_index.cpu()[seeds]
            picks = torch.randint(1 << 30, (len(seeds), per_caption), generator=gen) % counts[caps][:, None]
            idx = order[(starts[caps][:, None] + picks).flatten()].to(device)
        else:
            idx = torch.randint(len(means), (cfg.unet_batch,), generator=gen).to(device)
        batch = len(idx)
        eps_z = torch.randn(means[idx].shape, generator=gen).to(device)
        z = (means[idx] + stds[idx] * eps_z) * scale
        cap = caption_index[idx]
        drop = (torch.rand(batch, generator=gen) < cfg.caption_dropout).to(device)
        cap = torch.where(drop, torch.full_like(cap, uncond_index), cap)
        if joint:
            used, inverse = torch.unique(cap, return_inverse=True)
            ctx = text(input_ids=ids[used]).last_hidden_state[inverse]
        else:
            ctx = contexts[cap]
        t = torch.randint(0, len(ac), (batch,), generator=gen).to(device)
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
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p.detach(), 1 - decay)
            if joint:
                for pe, p in zip(ema_text.parameters(), text.parameters()):
                    if p.requires_grad:
                        pe.lerp_(p.detach(), 1 - decay)
                ema_offsets.lerp_(vocab.offsets.detach(), 1 - decay)
        ema_loss = loss.item() if math.isnan(ema_loss) else 0.98 * ema_loss + 0.02 * loss.item()
        if snapshot is not None and cfg.snapshot_minutes > 0 and clock.elapsed >= next_snapshot:
            next_snapshot += cfg.snapshot_minutes * 60
            text_copy = None
            if joint:
                text_copy = copy.deepcopy(ema_text)
                text_copy.get_input_embeddings().weight[vocab.ids] += ema_offsets.to(text_copy.dtype)
            snapshot(step, ema, text_copy)
        if step % 25 == 0:
            events.emit("loss", stage="unet", step=step, loss=ema_loss, lr=lr)
            events.progress(int(clock.elapsed), int(clock.budget), stage="unet", steps_done=step, loss=ema_loss)
    unet.eval().requires_grad_(False)
    if not joint:
        return ema, step, ema_loss
    # the saved text encoder: the EMA copy with the EMA offsets folded into its (frozen, untouched) table
    vocab.fold(ema_text.get_input_embeddings().weight, ema_offsets)
    text.eval().requires_grad_(False)
    ema_text.get_input_embeddings().weight.requires_grad_(False)
    return ema, step, ema_loss, ema_text


# ---- the whole run -------------------------------------------------------------------------------------
def pretrain(out: str | Path, cfg: PretrainConfig | None = None, *, events: Events | None = None,
             stop: StopToken | None = None, device: str | torch.device | None = None,
             overwrite: bool = False, vae_path: str | Path | None = None) -> PretrainResult:
    """Run all stages and write `out` (.safetensors) plus `out.with_suffix('.yaml')`.

    `vae_path`: a VAE written by `pretrain_vae` (same `cfg.vae_widths`); the VAE stage is then skipped and its
    recorded steps, seconds and PSNR go into this model's metadata.
    """
    from ..hosts.standalone import resolve_device
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
    device = resolve_device(device)            # a device this computer lacks: refused before any folder is made
    out.parent.mkdir(parents=True, exist_ok=True)
    world.check_size(cfg.size)
    if cfg.size % 8:
        raise UserError("picture size must be a multiple of 8")
    use_threads(cfg, device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    t_all = time.monotonic()
    res = PretrainResult(out, yaml_path)

    arch = toy_architecture(cfg)
    unet, vae, encoders = build_modules(arch, empty=False)
    settle_text_encoder(encoders[0], cfg.seed)
    vae.to(device)

    vae_info: dict = {}
    if vae_path is not None:
        trained, vae_info = load_vae(vae_path, cfg)
        vae.load_state_dict(trained.state_dict())
        res.steps["vae"], res.vae_psnr = int(vae_info.get("steps", 0)), float(vae_info.get("psnr", 0.0))
        res.seconds["vae"] = float(vae_info.get("seconds", 0.0))
        vae.eval().requires_grad_(False)
        events.status(f"VAE: loaded {vae_path}")
    else:
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
    uncond_index = 0                                   # "" sorts first among the unique captions
    if cfg.text_train:
        unique = sorted(set(captions) | {""})
        where = {c: i for i, c in enumerate(unique)}
        ids = caption_ids(prompt_encoder, unique)
        caption_index = torch.tensor([where[c] for c in captions], dtype=torch.long)
        contexts = None
        events.status(f"text: {len(unique) - 1} distinct captions, {len(torch.unique(ids))} distinct token ids "
                      "(only those embedding rows train)")
    else:
        contexts, caption_index = encode_captions(prompt_encoder, captions)
        events.status(f"text: {len(contexts) - 1} distinct captions encoded")
    res.seconds["captions"] = time.monotonic() - t0

    unet.to(device)
    events.status(f"UNet{' + text encoder' if cfg.text_train else ''}: training for {cfg.unet_minutes:g} min")
    t0 = time.monotonic()
    def snapshot(step: int, ema_unet, ema_text) -> None:
        from ..formats.files import atomic_write_text
        from ..models.checkpoint import save_checkpoint
        from .ldm_config import ldm_yaml

        snap = out.with_name(f"{out.stem}.step{step}.safetensors")
        part = LoadedCheckpoint(arch, ema_unet, vae, [ema_text if ema_text is not None else text])
        save_checkpoint(snap, part, dtype=torch.float16, include_extras=False, overwrite=True, metadata={
            "lab.note": "intermediate toy model (not evaluated)", "lab.pretrain_config": cfg.to_json(),
            "lab.pretrain_steps": json.dumps({**res.steps, "unet": step})})
        atomic_write_text(snap.with_suffix(".yaml"), ldm_yaml(arch, out.stem + TEXT_VERSION_SUFFIX), overwrite=True)
        events.status(f"snapshot: {snap}")

    if cfg.text_train:
        ema, res.steps["unet"], final_loss, text = train_unet(
            unet, means, stds, res.latent_scale, None, caption_index, uncond_index, cfg, device, events, stop,
            text=text, ids=ids, snapshot=snapshot)
        check_emphasis_safe(text, prompt_encoder_ids=ids)
    else:
        ema, res.steps["unet"], final_loss = train_unet(unet, means, stds, res.latent_scale, contexts,
                                                        caption_index, uncond_index, cfg, device, events, stop)
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
        "lab.vae_info": json.dumps(vae_info),
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
                                  sampler=cfg.eval_sampler, stop=stop, size=cfg.size)
        accuracy["protocol"] = f"{cfg.eval_sampler} {cfg.eval_steps} steps CFG {cfg.eval_cfg:g}, {cfg.size} px"
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
    from ..hosts.standalone import resolve_device
    from ..models.checkpoint import load_checkpoint

    if out.suffix != ".safetensors":
        raise UserError(f"the output must be a .safetensors file, not {out.name}")
    if not overwrite and (out.exists() or out.with_suffix(".yaml").exists()):
        raise UserError(f"{out} or its .yaml already exists; choose another --out or pass --overwrite")
    device = resolve_device(device)
    loaded = load_checkpoint(model, dtype=torch.float32, device=device)
    meta = dict(loaded.metadata)
    if cfg is None:
        cfg = PretrainConfig.from_metadata(meta, model)
    use_threads(cfg, device)
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
                      "pictures": cfg.vae_data, "source": model.name})})
    for m in (loaded.unet, loaded.vae, *loaded.text_encoders):
        m.cpu()
    res.accuracy, res.seconds["evaluate"] = save_evaluated(out, loaded, meta, cfg, device=device, events=events,
                                                           stop=stop, overwrite=overwrite)
    events.emit("saved", path=str(out), accuracy=res.accuracy)
    return res


def resume_unet(model: str | Path, out: str | Path, minutes: float, cfg: PretrainConfig | None = None, *,
                lr: float | None = None, events: Events | None = None, stop: StopToken | None = None,
                device: str | torch.device | None = None, overwrite: bool = False) -> PretrainResult:
    """Train the UNet of a saved toy model further (its VAE unchanged), re-evaluate, save.

    A model pretrained with `text_train` goes on training its text encoder too (the same world rows only);
    otherwise the text encoder stays as it is.

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
    prompt_encoder = PromptEncoder("sd1", make_tokenizers("sd1"), [text])
    if cfg.text_train:      # a jointly trained model goes on training its text encoder (world rows only)
        unique = sorted(set(captions) | {""})
        where = {c: i for i, c in enumerate(unique)}
        ids = caption_ids(prompt_encoder, unique)
        caption_index = torch.tensor([where[c] for c in captions], dtype=torch.long)
        contexts = None
    else:
        contexts, caption_index = encode_captions(prompt_encoder, captions)
    res.seconds["latents"] = time.monotonic() - t0
    run = PretrainConfig(**{**asdict(cfg), "unet_minutes": minutes, "unet_lr": lr or cfg.unet_lr / 2,
                            "warmup_steps": 50, "seed": cfg.seed + 100})
    events.status(f"UNet: resuming for {minutes:g} min at lr {run.unet_lr:g}")
    t0 = time.monotonic()
    if cfg.text_train:
        ema, n, final_loss, text = train_unet(loaded.unet, means, stds, loaded.arch.latent_scale, None,
                                              caption_index, 0, run, device, events, stop, text=text, ids=ids)
        check_emphasis_safe(text, ids)
    else:
        ema, n, final_loss = train_unet(loaded.unet, means, stds, loaded.arch.latent_scale, contexts, caption_index,
                                        0, run, device, events, stop)
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


def combine(unet_from: str | Path, vae_from: str | Path, out: str | Path, cfg: PretrainConfig | None = None, *,
            events: Events | None = None, stop: StopToken | None = None, device: str | torch.device | None = None,
            overwrite: bool = False) -> PretrainResult:
    """One toy model from two that share a VAE encoder: UNet and text encoder of `unet_from`, VAE of `vae_from`.

    This is how a decoder polish and a UNet resume that ran side by side (both start from the same model, and
    the polish never changes the encoder) become one file. Refuses when the encoders differ: the UNet would then
    work in a latent space the VAE does not produce. The result is re-evaluated like every saved toy model.
    """
    from ..models.checkpoint import LoadedCheckpoint, load_checkpoint

    events, stop = events or Events(), stop or StopToken()
    unet_from, vae_from, out = Path(unet_from), Path(vae_from), Path(out)
    device, base, meta, cfg = _open_saved(unet_from, out, cfg, device, overwrite)
    other = load_checkpoint(vae_from, dtype=torch.float32, device=device)
    enc_a = {k: v for k, v in base.vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    enc_b = {k: v for k, v in other.vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    if enc_a.keys() != enc_b.keys() or any(not torch.equal(enc_a[k], enc_b[k]) for k in enc_a):
        raise UserError(f"{unet_from.name} and {vae_from.name} have different VAE encoders; they cannot be combined")
    if abs(base.arch.latent_scale - other.arch.latent_scale) > 1e-6:
        raise UserError("the two models use different latent scale factors")
    vmeta = dict(other.metadata)
    steps = {**json.loads(vmeta.get("lab.pretrain_steps", "{}")), **json.loads(meta.get("lab.pretrain_steps", "{}"))}
    seconds = {**json.loads(vmeta.get("lab.pretrain_seconds", "{}")),
               **json.loads(meta.get("lab.pretrain_seconds", "{}"))}
    for key in ("decoder",):
        if key in json.loads(vmeta.get("lab.pretrain_steps", "{}")):
            steps[key] = json.loads(vmeta["lab.pretrain_steps"])[key]
        if key in json.loads(vmeta.get("lab.pretrain_seconds", "{}")):
            seconds[key] = json.loads(vmeta["lab.pretrain_seconds"])[key]
    meta.update({"lab.pretrain_steps": json.dumps(steps), "lab.pretrain_seconds": json.dumps(seconds),
                 "lab.combined_from": json.dumps({"unet_and_text": unet_from.name, "vae": vae_from.name})})
    for key in ("lab.decoder_polish", "lab.vae_psnr"):
        if key in vmeta:
            meta[key] = vmeta[key]
    res = PretrainResult(out, out.with_suffix(".yaml"), steps=steps, latent_scale=base.arch.latent_scale)
    done = LoadedCheckpoint(base.arch, base.unet.cpu(), other.vae.cpu(), [t.cpu() for t in base.text_encoders],
                            base.extras, base.dtypes)
    res.accuracy, res.seconds["evaluate"] = save_evaluated(out, done, meta, cfg, device=device, events=events,
                                                           stop=stop, overwrite=overwrite)
    events.emit("saved", path=str(out), accuracy=res.accuracy)
    return res
