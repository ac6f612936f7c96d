"""Euler and DDIM samplers with classifier-free guidance, for control pictures and class images.

Both samplers take one `denoise(x, sigma) -> x0` callable, in the spirit of k-diffusion's shared sampler
signature. `Denoiser` adapts a `ModelParts` to it: the discrete SD schedule becomes a continuous σ(t) as in
k-diffusion's `DiscreteSchedule` (Karras et al. 2022, eps- and v-parameterisation preconditioning), and the
conditional and unconditional halves run as one batch. Everything is seeded: the same seed gives the same
picture on the CPU.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import UserError
from .hosts import ModelParts, SampleRequest, SizeConditioning, TextConditioning
from .models.schedule import zero_terminal_snr as rescale_zero_terminal_snr   # the parameter below has its name
from .sample_settings import MAX_PICTURE_SIDE, check_sampler



class Denoiser:
    """x0 prediction from noisy latents at noise level σ, with classifier-free guidance."""

    def __init__(self, parts: ModelParts, cond: TextConditioning, uncond: TextConditioning, cfg_scale: float,
                 sizes: list[SizeConditioning] | None = None, *, zero_terminal_snr: bool = False) -> None:
        self.parts, self.cond, self.uncond, self.cfg_scale, self.sizes = parts, cond, uncond, cfg_scale, sizes
        ac = parts.alphas_cumprod.double().cpu()
        if zero_terminal_snr:   # the schedule a zero_terminal_snr run trained on (its last step almost pure noise)
            ac = rescale_zero_terminal_snr(ac)
        self.sigmas = ((1 - ac) / ac).sqrt()              # [1000] ascending in t
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of σ by linear interpolation of log σ (k-diffusion DiscreteSchedule)."""
        log_sigma = sigma.double().log().cpu()
        dists = log_sigma[:, None] - self.log_sigmas[None, :]
        low = dists.ge(0).cumsum(dim=1).argmax(dim=1).clamp(max=len(self.sigmas) - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * high

    def schedule(self, steps: int) -> torch.Tensor:
        """σ for `steps` evenly spaced timesteps from 999 to 0, then 0 (A1111's default for Euler)."""
        t = torch.linspace(len(self.sigmas) - 1, 0, steps, dtype=torch.float64)
        low, frac = t.floor().long(), t.frac()
        high = (low + 1).clamp(max=len(self.sigmas) - 1)
        log_sigma = (1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[high]
        return torch.cat([log_sigma.exp(), torch.zeros(1, dtype=torch.float64)])

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        b = x.shape[0]
        s = torch.full((2 * b,), float(sigma), dtype=torch.float64)
        c_in = 1.0 / (s ** 2 + 1).sqrt()
        t = self.sigma_to_t(s)
        x_in = torch.cat([x, x]) * c_in.to(x.dtype)[:, None, None, None].to(x.device)
        context = _cat_cond(self.cond, self.uncond, x_in)
        sizes = self.sizes * 2 if self.sizes else None
        out = self.parts.predict(x_in, t.to(x.device, torch.float32), context, sizes).to(x.dtype)
        s4 = s.to(x.dtype).to(x.device)[:, None, None, None]
        xx = torch.cat([x, x])
        if self.parts.prediction == "v":
            denoised = xx / (s4 ** 2 + 1) - out * s4 / (s4 ** 2 + 1).sqrt()
        else:
            denoised = xx - out * s4
        cond, uncond = denoised[:b], denoised[b:]
        return uncond + (cond - uncond) * self.cfg_scale


def _cat_cond(cond: TextConditioning, uncond: TextConditioning, like: torch.Tensor) -> TextConditioning:
    c, u = cond.context, uncond.context
    if c.shape[1] != u.shape[1]:  # different chunk counts: repeat the shorter one's chunks, as A1111 does
        n = max(c.shape[1], u.shape[1])
        c = _pad_chunks(c, n)
        u = _pad_chunks(u, n)
    pooled = None
    if cond.pooled is not None:
        pooled = torch.cat([cond.pooled, uncond.pooled])
    return TextConditioning(torch.cat([c, u]).to(like.device), pooled.to(like.device) if pooled is not None else None)


def _pad_chunks(context: torch.Tensor, length: int) -> torch.Tensor:
    reps = -(-length // context.shape[1])
    return context.repeat(1, reps, 1)[:, :length]


def sample_euler(denoise: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                 callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        d = (x - denoised) / sigma
        x = x + d * (nxt - sigma)
        if callback:
            callback(i)
    return x


def sample_ddim(denoise: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Deterministic DDIM (η = 0; Song et al. 2021) written in σ-space: x_σ = x0 + σ·ε.

    In this parameterisation the DDIM update is x' = x0 + σ'·ε̂ with ε̂ = (x − x0)/σ, which equals the
    alpha-space update √ᾱ'·x0 + √(1−ᾱ')·ε̂ after rescaling by √ᾱ.
    """
    for i in range(len(sigmas) - 1):
        sigma, nxt = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        eps = (x - denoised) / sigma
        x = denoised + eps * nxt
        if callback:
            callback(i)
    return x


def ddim_sigmas(denoiser: Denoiser, steps: int) -> torch.Tensor:
    """σ at A1111/CompVis DDIM's "uniform" timesteps (every 1000/steps, offset by 1), then 0."""
    stride = max(1, len(denoiser.sigmas) // steps)
    t = torch.arange(0, len(denoiser.sigmas), stride)[:steps] + 1
    t = t.clamp(max=len(denoiser.sigmas) - 1).flip(0)
    return torch.cat([denoiser.sigmas[t], torch.zeros(1, dtype=torch.float64)])


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Seeded CPU noise (the same on every machine), as A1111 does with its CPU RNG source."""
    g = torch.Generator("cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randn(shape, generator=g, dtype=torch.float32)


@torch.no_grad()
def render(parts: ModelParts, requests: list[SampleRequest], *, progress: Callable[[int, int], None] | None = None,
           stop=None) -> list:
    """Render each request to a PIL image (one at a time: requests may differ in size and steps)."""
    from PIL import Image

    images = []
    for n, req in enumerate(requests):
        if stop is not None and stop.requested:
            break
        sampler = check_sampler(req.sampler)     # ours, also from A1111's name ("Euler", "DDIM")
        if req.width % 8 or req.height % 8 or min(req.width, req.height) < 8:
            raise UserError(f"picture size {req.width}x{req.height} must be a positive multiple of 8")
        if max(req.width, req.height) > MAX_PICTURE_SIDE:
            raise UserError(f"picture size {req.width}x{req.height} is over the {MAX_PICTURE_SIDE} px a side "
                            "that Training Lab draws")
        if req.steps < 1:
            raise UserError("steps must be at least 1")
        if not 0 <= req.cfg_scale < float("inf"):       # NaN or inf would draw a picture of NaN (black)
            raise UserError(f"the guidance (CFG) scale must be a finite number of 0 or more, not {req.cfg_scale}")
        cond = parts.encode_text([req.prompt])
        uncond = parts.encode_text([req.negative])
        sizes = [SizeConditioning((req.height, req.width))] if parts.family == "sdxl" else None
        denoiser = Denoiser(parts, cond, uncond, req.cfg_scale, sizes, zero_terminal_snr=req.zero_terminal_snr)
        sigmas = denoiser.schedule(req.steps) if sampler == "euler" else ddim_sigmas(denoiser, req.steps)
        noise = initial_noise(req.seed, (1, parts.latent_channels, req.height // 8, req.width // 8))
        x = noise.to(parts.device) * float(sigmas[0])
        step_cb = (lambda i, n=n: progress(n * req.steps + i + 1, len(requests) * req.steps)) if progress else None
        fn = sample_euler if sampler == "euler" else sample_ddim
        latents = fn(denoiser, x, sigmas, step_cb)
        pixels = parts.decode_latents(latents.to(parts.dtype)).float().clamp(-1, 1)
        arr = ((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        images.append(Image.fromarray(arr))
    return images
