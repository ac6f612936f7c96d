"""The Stable Diffusion noise schedule and the LDM buffers derived from it.

All SD1/SD2/SDXL checkpoints train on the same "scaled linear" schedule: β from 0.00085 to 0.012 over 1000
steps, linear in √β (LDM `register_schedule`, SGM `LegacyDDPMDiscretization`). The 12 buffers below are what
an LDM checkpoint stores beside the weights; the saver writes them when a model did not come from a file.
"""

from __future__ import annotations

import numpy as np
import torch

LINEAR_START, LINEAR_END, TIMESTEPS = 0.00085, 0.012, 1000


def betas_scaled_linear(n: int = TIMESTEPS) -> np.ndarray:
    return np.linspace(LINEAR_START ** 0.5, LINEAR_END ** 0.5, n, dtype=np.float64) ** 2


def alphas_cumprod(n: int = TIMESTEPS) -> torch.Tensor:
    """ᾱ_t for t = 0..n-1 as float32 [n] (what LDM stores as `alphas_cumprod`)."""
    return torch.tensor(np.cumprod(1.0 - betas_scaled_linear(n), axis=0), dtype=torch.float32)


def ldm_schedule_buffers(betas: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """The 12 DDPM buffers of an LDM `LatentDiffusion` (v_posterior = 0), float32 as LDM stores them."""
    betas = betas_scaled_linear() if betas is None else np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def sgm_sigmas(ac: torch.Tensor | None = None) -> torch.Tensor:
    """SGM's `denoiser.sigmas` buffer: σ_t = √((1 − ᾱ_t) / ᾱ_t), ascending in t."""
    ac64 = np.cumprod(1.0 - betas_scaled_linear(), axis=0) if ac is None else ac.double().numpy()
    return torch.tensor(((1 - ac64) / ac64) ** 0.5, dtype=torch.float32)


# The last ᾱ after the rescale, instead of 0: the floor A1111's "Zero Terminal SNR" noise schedule and kohya's
# zero_terminal_snr both use, so SNR-based weights stay finite and training meets sampling at the same value.
ZERO_TERMINAL_FLOOR = 4.8973451890853435e-08


def zero_terminal_snr(ac: torch.Tensor) -> torch.Tensor:
    """ᾱ rescaled so that the last step is pure noise (Lin et al. 2024, "Common diffusion noise schedules and
    sample steps are flawed", Algorithm 1): √ᾱ is shifted and stretched linearly so its first value stays and its
    last becomes 0 (then the floor above). For v-prediction models, sampled with the same schedule."""
    root = ac.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = ((root - last) * first / (first - last)) ** 2
    rescaled[-1] = ZERO_TERMINAL_FLOOR
    return rescaled.to(ac.dtype)
