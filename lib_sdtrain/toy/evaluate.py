"""How well a model draws the toy world: held-out prompts, sampled in batches, scored by the shipped detector.

`sample_batch` renders many prompts at once with the project's own Euler / DDIM sampler (the same noise per
seed as `sampling.render`, one picture at a time, would give), so scoring 200 prompts costs a few batched
UNet calls per step instead of 200 separate runs. `evaluate_parts` is the base-model accuracy gate: prompts
from `world.sample_scenes(holdout="only")` (colour-shape-background triples no training picture shows),
20 DDIM steps, classifier-free guidance 6 (the feasibility probe's protocol), and the share of samples whose colour, shape, background, size and
position the detector names as prompted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError
from ..hosts import ModelParts
from ..sample_settings import check_sampler
from . import world
from .detector import Detector, default_detector

DEFAULT_EVAL_SEED = 2024
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "background", "size", "position")


class _Stopped(Exception):
    """Raised between sampling steps when the stop token is requested; `sample_batch` returns what it has."""


@torch.no_grad()
def sample_batch(parts: ModelParts, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20,
                 cfg_scale: float = 7.0, size: int = 64, negative: str = "", sampler: str = "euler",
                 batch_size: int = 50, stop: Any = None) -> list:
    """One PIL picture per (prompt, seed), `batch_size` at a time; deterministic on the CPU. `stop` (a token with
    `requested`) ends it between sampling steps, returning the pictures of the batches already finished."""
    from PIL import Image

    from ..sampling import Denoiser, ddim_sigmas, initial_noise, sample_ddim, sample_euler

    if len(prompts) != len(seeds):
        raise UserError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sampler = check_sampler(sampler)
    if size % 8 or size < 8:
        raise UserError(f"picture size {size} must be a positive multiple of 8")
    if steps < 1:
        raise UserError("steps must be at least 1")

    def check(_step: int) -> None:      # between sampling steps: a stop need not wait for the whole batch
        if stop.requested:
            raise _Stopped

    images: list = []
    for start in range(0, len(prompts), batch_size):
        if stop is not None and stop.requested:
            break
        chunk = list(prompts[start:start + batch_size])
        cond = parts.encode_text(chunk)
        uncond = parts.encode_text([negative] * len(chunk))
        denoiser = Denoiser(parts, cond, uncond, cfg_scale)
        sigmas = denoiser.schedule(steps) if sampler == "euler" else ddim_sigmas(denoiser, steps)
        noise = torch.cat([initial_noise(s, (1, parts.latent_channels, size // 8, size // 8))
                           for s in seeds[start:start + batch_size]])
        x = noise.to(parts.device) * float(sigmas[0])
        try:
            latents = (sample_euler if sampler == "euler" else sample_ddim)(
                denoiser, x, sigmas, callback=check if stop is not None else None)
        except _Stopped:
            break
        pixels = parts.decode_latents(latents.to(parts.dtype)).float().clamp(-1, 1)
        arr = ((pixels.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        images += [Image.fromarray(a) for a in arr]
    return images


def score(images: Sequence, scenes: Sequence[world.Scene], detector: Detector | None = None) -> dict[str, float]:
    """Share of pictures whose detected attribute equals the scene's, per attribute, plus shape per size."""
    if len(images) != len(scenes) or not images:
        raise UserError(f"{len(images)} pictures for {len(scenes)} scenes")
    found = (detector or default_detector()).detect(list(images))
    out = {a: sum(getattr(d, a) == getattr(s, a) for d, s in zip(found, scenes)) / len(scenes) for a in ATTRIBUTES}
    for size in world.SIZE_NAMES:
        pairs = [(d, s) for d, s in zip(found, scenes) if s.size == size]
        if pairs:
            out[f"shape_{size}"] = sum(d.shape == s.shape for d, s in pairs) / len(pairs)
    out["empty"] = sum(not d.has_shape for d in found) / len(found)
    return out


def heldout_prompts(n: int = 200, seed: int = DEFAULT_EVAL_SEED) -> tuple[list[world.Scene], list[str], list[int]]:
    """The gate's test set: `n` held-out scenes, their full captions and one sampling seed each."""
    scenes = world.sample_scenes(n, seed, holdout="only")
    return scenes, [s.caption() for s in scenes], [seed * 1000 + i for i in range(n)]


def evaluate_parts(parts: ModelParts, *, n: int = 200, seed: int = DEFAULT_EVAL_SEED, steps: int = 20,
                   cfg_scale: float = 6.0, size: int = 64, sampler: str = "ddim", holdout: str = "only",
                   detector: Detector | None = None, stop: Any = None, grid: str | Path | None = None
                   ) -> dict[str, float]:
    """Accuracy of a loaded model on `n` toy prompts (held-out triples by default); see the module text.

    `grid`: also write the first 64 samples as one PNG there (refuses to overwrite a file).
    """
    if n < 1:
        raise UserError("the evaluation needs at least one prompt")
    if holdout == "only":
        scenes, prompts, seeds = heldout_prompts(n, seed)
    else:
        scenes = world.sample_scenes(n, seed, holdout=holdout)
        prompts, seeds = [s.caption() for s in scenes], [seed * 1000 + i for i in range(n)]
    images = sample_batch(parts, prompts, seeds, steps=steps, cfg_scale=cfg_scale, size=size, sampler=sampler,
                          stop=stop)
    if len(images) < n:
        raise UserError("evaluation stopped")
    from .detector import at_input_size

    result = score(at_input_size(images), scenes, detector)
    result["samples"] = n
    if grid is not None:
        save_grid(images[:64], grid, columns=8)
    return result


GATE = {"colour": 0.80, "shape": 0.70}


def passes_gate(accuracy: dict[str, float]) -> bool:
    """The base model's bar: colour >= 80 % and shape >= 70 % on held-out prompts."""
    return all(accuracy.get(k, 0.0) >= v for k, v in GATE.items())


def make_grid(images: Sequence, columns: int = 8, pad: int = 2, rows_labels: Sequence[str] | None = None):
    """Pictures side by side, `columns` per row, on a dark background; optional text label left of each row."""
    from PIL import Image, ImageDraw

    if not images:
        raise UserError("no pictures for the grid")
    w, h = images[0].size
    rows = -(-len(images) // columns)
    label_w = 0
    if rows_labels:
        label_w = 8 + 6 * max(len(t) for t in rows_labels)
    grid = Image.new("RGB", (label_w + columns * (w + pad) + pad, rows * (h + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(img.convert("RGB").resize((w, h)), (label_w + pad + c * (w + pad), pad + r * (h + pad)))
    for r, text in enumerate(rows_labels or []):
        draw.text((4, pad + r * (h + pad) + h // 2 - 5), text, fill=(230, 230, 230))
    return grid


def check_grid_path(path: str | Path, *, overwrite: bool = False, flag: str = "--grid",
                    overwrite_flag: str | None = None) -> Path:
    """Refuse, before any sampling, a grid path the PNG cannot go to: a name not ending in .png (the grid is always
    PNG, and a .txt or .jpg holding PNG bytes misleads every program that opens it), a folder, or an existing file
    without `overwrite` (the message names `overwrite_flag` when the command has one)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; give {flag} a file name ending in .png")
    if path.suffix.lower() != ".png":
        raise UserError(f"the grid is saved as PNG, not as {path.name}: give {flag} a name ending in .png")
    if path.exists() and not overwrite:
        fix = f"pass {overwrite_flag} to replace it" if overwrite_flag else "this command never replaces a file"
        raise UserError(f"{path} already exists; {fix}, or give {flag} another name")
    return path


def save_grid(images: Sequence, path: str | Path, columns: int = 8, rows_labels: Sequence[str] | None = None,
              overwrite: bool = False) -> Path:
    """`make_grid` written atomically as PNG."""
    from ..formats.files import atomic_write

    check_grid_path(path, overwrite=overwrite, flag="the grid")
    grid = make_grid(images, columns, rows_labels=rows_labels)
    return atomic_write(Path(path), lambda p: grid.save(p, format="PNG"), overwrite=overwrite)


# ---- the VAE's round-trip ceiling -------------------------------------------------------------------------
def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a share `hits`/`n` (sensible at 0 and 1, unlike the normal one)."""
    if n <= 0:
        raise UserError("an interval needs at least one sample")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


CEILING_FAMILIES: tuple[str, ...] = ("subject", "subject_small", "style", "world_shape", "world_colour",
                                     "world_shape_small")


def ceiling_scenes(family: str, n: int, seed: int = 77) -> list[world.Scene]:
    """The clean scenes a ceiling family is measured on (all colours, sizes, positions and backgrounds)."""
    if family in ("subject", "subject_small"):
        scenes = world.sample_scenes(n, seed, holdout="include", shapes=(world.SUBJECT_SHAPE,))
        if family == "subject_small":
            scenes = [world.Scene(s.shape, s.colour, "small", s.position, s.background) for s in scenes]
        return scenes
    if family == "style":
        return world.sample_scenes(n, seed, holdout="include", style="striped")
    if family in ("world_shape", "world_colour"):
        return world.sample_scenes(n, seed, holdout="include")
    if family == "world_shape_small":
        return [world.Scene(s.shape, s.colour, "small", s.position, s.background)
                for s in world.sample_scenes(n, seed, holdout="include")]
    raise UserError(f"unknown ceiling family {family!r}; choose one of {', '.join(CEILING_FAMILIES)}")


@torch.no_grad()
def roundtrip(vae: torch.nn.Module, images: Sequence, batch_size: int = 100) -> list:
    """Pictures after the VAE's encode -> decode (posterior mean), as the UNet's best case would decode them."""
    from PIL import Image

    from .detector import to_tensor

    out = []
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size], resize=False)
        rec = vae.decode(vae.encode(x.to(device, dtype)).latent_dist.mode()).sample.float().clamp(-1, 1)
        arr = ((rec.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        out += [Image.fromarray(a) for a in arr]
    return out


def ceiling_table(vae: torch.nn.Module | None, n: int = 200, seed: int = 77, size: int = 64,
                  families: Sequence[str] = CEILING_FAMILIES, detector: Detector | None = None) -> dict[str, dict]:
    """Per family: {"share", "low", "high", "n"}: the detector's hit rate on round-tripped clean pictures.

    subject*: P(heart) >= 0.5; style: P(striped) >= 0.5; world_shape / world_colour: the detected shape / colour
    is the drawn one. `vae` None scores the clean pictures themselves (the detector's own ceiling).
    """
    det = detector or default_detector()
    table = {}
    for k, fam in enumerate(families):
        scenes = ceiling_scenes(fam, n, seed + k)
        images = world.render_scenes(scenes, size, seed + 100 + k)
        if vae is not None:
            images = roundtrip(vae, images)
        found = det.detect(images)
        if fam.startswith("subject"):
            hits = sum(d.has_subject for d in found)
        elif fam == "style":
            hits = sum(d.has_style for d in found)
        elif fam == "world_colour":
            hits = sum(d.colour == s.colour for d, s in zip(found, scenes))
        else:
            hits = sum(d.shape == s.shape for d, s in zip(found, scenes))
        low, high = wilson_interval(hits, len(scenes))
        table[fam] = {"share": hits / len(scenes), "low": low, "high": high, "n": len(scenes)}
    return table
