"""Timesteps, noise, targets and loss weights for diffusion training (DDPM, Ho et al. 2020).

Shapes: latents x0 [B, C, h, w]; timesteps t [B] int64 in 0..999; ᾱ = alphas_cumprod [1000] float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..models.schedule import ZERO_TERMINAL_FLOOR, zero_terminal_snr  # noqa: F401 - the loop's names


def sample_timesteps(batch: int, generator: torch.Generator, num: int = 1000, low: int = 0,
                     high: int | None = None) -> torch.Tensor:
    """Uniform integer timesteps [B] in [low, high) (high None: `num`), drawn with a CPU generator so runs are
    reproducible on any device. The full range draws exactly what it drew before the range existed."""
    high = num if high is None else high
    if not 0 <= low < high <= num:
        raise ValueError(f"timestep range [{low}, {high}) is not inside [0, {num})")
    return torch.randint(low, high, (batch,), generator=generator)


def make_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0, *,
               random_strength: bool = False, adaptive: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, plus an optional per-channel offset ("noise offset", Guttenberg 2023).

    kohya's two refinements of the offset: `random_strength` draws the step's offset uniformly from [0, offset)
    (`noise_offset_random_strength`), and `adaptive` adds adaptive x |the latent's mean| per picture and channel,
    floored at 0 (`adaptive_noise_scale`: pictures far from mid-grey get more offset). With both off the draws
    are exactly the plain offset's."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset:
        strength: float | torch.Tensor = offset
        if random_strength:
            strength = offset * torch.rand(1, generator=generator, dtype=torch.float32)
        if adaptive:
            mean = latents.detach().float().mean(dim=(2, 3), keepdim=True).abs().cpu()
            strength = (strength + adaptive * mean).clamp_min(0.0)
        noise = noise + strength * torch.randn((*latents.shape[:2], 1, 1), generator=generator, dtype=torch.float32)
    return noise.to(latents.device, latents.dtype)


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float
                  ) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise, kohya's `multires_noise_iterations` / `_discount`: to Gaussian noise
    [B, C, h, w] add `iterations` levels of Gaussian noise, level i (from 0) drawn at about 1/r^i of the size (r
    uniform in [2, 4) per level; level 0 at full size), upsampled bilinearly and scaled by discount^i, stopping
    after a level with a side of 1; then rescale to unit standard deviation over the batch. The low-frequency
    noise teaches the model large changes of light and colour."""
    out = noise.float().clone()
    b, c, h, w = out.shape
    for i in range(iterations):
        r = 2 + 2 * float(torch.rand((), generator=generator))
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn((b, c, hn, wn), generator=generator, dtype=torch.float32).to(out.device)
        out = out + torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


def perturb(noise: torch.Tensor, generator: torch.Generator, gamma: float, *, random_strength: bool = False
            ) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, kohya's `ip_noise_gamma`): the noise that goes INTO the noisy
    latent, ε + γ·ξ with fresh ξ; the target stays ε, so the model learns to undo slightly wrong inputs.
    `random_strength` draws the step's γ uniformly from [0, gamma) (`ip_noise_gamma_random_strength`)."""
    if random_strength:
        gamma = float(gamma * torch.rand(1, generator=generator, dtype=torch.float32))
    extra = torch.randn(noise.shape, generator=generator, dtype=torch.float32).to(noise.device)
    return (noise.float() + gamma * extra).to(noise.dtype)


def _gather(ac: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return ac.to(like.device)[t.to(like.device)].float().reshape(-1, *[1] * (like.dim() - 1))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """q(x_t | x0) = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
    a = _gather(ac, t, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor, prediction: str) -> torch.Tensor:
    """What the UNet should output: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022)."""
    if prediction == "eps":
        return noise.float()
    a = _gather(ac, t, x0)
    return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()


# zero_terminal_snr and its floor live with the schedule (models.schedule): the sampler draws on them too.


def fit_masks(masks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Loss masks [B, 1, h, w] (masked_loss) as float32 on `like`'s device, resized by area to its latent grid
    when they differ."""
    masks = masks.to(like.device, torch.float32)
    if masks.shape[-2:] != like.shape[-2:]:
        masks = torch.nn.functional.interpolate(masks, size=like.shape[-2:], mode="area")
    return masks


def step_elementwise(cfg: Any, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, ac: torch.Tensor,
                     masks: torch.Tensor | None = None) -> torch.Tensor:
    """The element-wise loss of a step as the run's settings define it: `cfg.loss_type` with its scheduled Huber
    threshold, times the loss masks (`fit_masks`). The training step and the validation loss both use it."""
    from .settings import HUBER_LOSSES

    delta = huber_thresholds(t, ac, cfg.huber_c, cfg.huber_schedule, cfg.huber_scale) \
        if cfg.loss_type in HUBER_LOSSES else None
    elementwise = elementwise_loss(pred, target, cfg.loss_type, delta)
    return elementwise if masks is None else elementwise * fit_masks(masks, elementwise)


def min_snr_weights(t: torch.Tensor, ac: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023); returns float32 [B]. SNR = ᾱ/(1−ᾱ).

    For ε-prediction the weight is min(SNR, γ)/SNR; for v-prediction min(SNR, γ)/(SNR + 1).
    """
    a = ac.to(t.device)[t].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v" else clipped / snr


def huber_thresholds(t: torch.Tensor, ac: torch.Tensor, c: float, schedule: str, scale: float = 1.0
                     ) -> torch.Tensor:
    """The pseudo-Huber threshold δ per sample [B] (scheduled pseudo-Huber loss, Khrapov & Popov 2024), with
    kohya's schedules: "constant" c·scale; "exponential" scale·c^(t/T), from `scale` at t = 0 down to c·scale
    at t = T; "snr" c + (1 − c)/(1 + σ_t)², σ_t = √((1 − ᾱ_t)/ᾱ_t): near 1 (almost L2) on nearly clean
    latents, near c (almost L1) on the noisiest ones. `scale` is not used by "snr", as in kohya."""
    if schedule == "constant":
        return torch.full(t.shape, c * scale, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        return scale * torch.exp(math.log(c) * t.float() / len(ac))
    if schedule == "snr":
        a = ac.to(t.device)[t].float()
        sigma = ((1 - a) / a).sqrt()
        return c + (1 - c) / (1 + sigma) ** 2
    raise ValueError(f"unknown Huber schedule {schedule!r} (settings.HUBER_SCHEDULES)")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     delta: torch.Tensor | None = None) -> torch.Tensor:
    """The loss per element, float32, shape of `pred`. "l2": (p − y)²; "l1": |p − y|; "huber": the pseudo-Huber
    2δ(√((p − y)² + δ²) − δ), which is ≈ (p − y)² for small errors and ≈ 2δ|p − y| for large ones; "smooth_l1":
    2(√((p − y)² + δ²) − δ), the same curve divided by δ (kohya's names). `delta` [B] for the last two."""
    d = pred.float() - target.float()
    if loss_type == "l2":
        return d * d
    if loss_type == "l1":
        return d.abs()
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown loss type {loss_type!r} (settings.LOSS_TYPES)")
    if delta is None:
        raise ValueError(f"loss type {loss_type!r} needs a threshold per sample")
    dl = delta.float().to(d.device).reshape(-1, *[1] * (d.dim() - 1))
    sq = d * d
    smooth = 2 * sq / (torch.sqrt(sq + dl * dl) + dl)   # = 2(√(d² + δ²) − δ), without the cancellation
    return smooth * dl if loss_type == "huber" else smooth


def debiased_weights(t: torch.Tensor, ac: torch.Tensor, prediction: str) -> torch.Tensor:
    """Debiased estimation loss weights (Yu et al. 2024, kohya's `debiased_estimation_loss`), float32 [B]: for
    ε-prediction 1/√SNR, for v-prediction 1/(SNR + 1), with SNR capped at 1000 (it is near infinite at t = 0)."""
    a = ac.to(t.device)[t].float()
    snr = torch.clamp(a / (1 - a), max=1000.0)
    return 1 / (snr + 1) if prediction == "v" else 1 / snr.sqrt()
