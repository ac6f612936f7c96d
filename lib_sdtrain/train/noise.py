"""Timesteps, noise, targets and loss weights for diffusion training (DDPM, Ho et al. 2020).

Shapes: latents x0 [B, C, h, w]; timesteps t [B] int64 in 0..999; ᾱ = alphas_cumprod [1000] float32.
"""

from __future__ import annotations

import torch


def sample_timesteps(batch: int, generator: torch.Generator, num: int = 1000, low: int = 0,
                     high: int | None = None) -> torch.Tensor:
    """Uniform integer timesteps [B] in [low, high) (high None: `num`), drawn with a CPU generator so runs are
    reproducible on any device. The full range draws exactly what it drew before the range existed."""
    high = num if high is None else high
    if not 0 <= low < high <= num:
        raise ValueError(f"timestep range [{low}, {high}) is not inside [0, {num})")
    return torch.randint(low, high, (batch,), generator=generator)


def make_noise(latents: torch.Tensor, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, plus an optional per-channel offset ("noise offset", Guttenberg 2023)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    if offset:
        noise = noise + offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, dtype=torch.float32)
    return noise.to(latents.device, latents.dtype)


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


def min_snr_weights(t: torch.Tensor, ac: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023); returns float32 [B]. SNR = ᾱ/(1−ᾱ).

    For ε-prediction the weight is min(SNR, γ)/SNR; for v-prediction min(SNR, γ)/(SNR + 1).
    """
    a = ac.to(t.device)[t].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v" else clipped / snr
