"""A validation loss: pictures held out of training, measured at fixed noise levels and noise (kohya's
`validation_split`, OneTrainer's validation concepts).

The training loss of a step depends on the noise and the noise levels drawn for it, so it wanders even when the
model does not change, and it keeps falling while a run memorises its pictures. The validation loss is measured
on instance pictures the run never trains on, each at the same VALIDATION_LEVELS noise levels (spread evenly over
the run's timestep range) with the same noise every time. Two measurements therefore differ only because the
weights did: when it rises again after its lowest point, the saves after that point fit the training pictures
better and pictures like them worse, the plainest sign of over-training there is.

Which pictures are held out is drawn from the run's seed, per instance folder, so each concept keeps most of its
pictures and a resumed run holds out the same ones (the draw reads folder and file names only, so it survives a
moved dataset); class (regularization) pictures are never held out. The loss is the training's own element-wise
loss (loss type, masks) without its per-step weights (min-SNR, debiased), averaged over pictures and levels.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from . import noise as N

VALIDATION_LEVELS = 4      # noise levels per held-out picture
RISE = 1.05                # a rise of 5 % over the lowest measurement, measured twice in a row, is reported


def split_validation(records: list, share: float, seed: int) -> tuple[list, list]:
    """(training records, held-out records): round(share × n) of each instance folder's n pictures, drawn from
    `seed`; at least one picture of every folder stays in training."""
    if not share:
        return list(records), []
    folders: dict[Any, list] = defaultdict(list)
    for rec in records:
        if not rec.is_regularization:
            folders[rec.folder].append(rec)
    held: set[int] = set()
    for folder, recs in sorted(folders.items(), key=lambda kv: str(kv[0])):
        count = min(len(recs) - 1, round(share * len(recs)))
        if count > 0:   # drawn from names only: the same pictures wherever the dataset is moved
            rng = random.Random(f"validation:{seed}:{Path(folder).name}")
            chosen = rng.sample(sorted(recs, key=lambda r: r.path.name), count)
            held.update(id(r) for r in chosen)
    if not held:
        total = sum(len(r) for r in folders.values())
        raise UserError(f"validation_split {share:g} holds out no picture: {total} instance pictures in "
                        f"{len(folders)} folder(s) (each keeps at least one for training); raise it or add pictures")
    return [r for r in records if id(r) not in held], [r for r in records if id(r) in held]


# The settings a validation measurement depends on: which pictures are held out (split, seed), their latents
# (resolution and buckets), the noise levels and schedule, and the element-wise loss. A resumed run whose state
# differs in any of them starts a new history: its values could not be compared with the old ones.
MEASURE_SETTINGS = ("validation_split", "seed", "resolution", "enable_buckets", "min_bucket", "max_bucket",
                    "bucket_no_upscale", "min_timestep", "max_timestep", "zero_terminal_snr", "loss_type",
                    "huber_schedule", "huber_c", "huber_scale", "masked_loss", "mask_dir")


def measure_changes(was: dict[str, Any], cfg: Any) -> list[str]:
    """The MEASURE_SETTINGS in which a state's settings `was` differ from this run's `cfg`."""
    return [k for k in MEASURE_SETTINGS if was.get(k) != getattr(cfg, k)]


def validation_levels(count: int, low: int, high: int) -> list[int]:
    """`count` noise levels spread evenly over [low, high): the middles of `count` equal parts."""
    return [low + int((k + 0.5) * (high - low) / count) for k in range(count)]


class Validation:
    """The held-out pictures' latents, captions and fixed noise; `measure` gives the loss of the weights now."""

    def __init__(self, cfg: Any, parts: Any, records: list, *, template: Any = None, name: str = "") -> None:
        from ..data.buckets import plan_buckets
        from ..data.captions import CaptionOptions
        from ..data.dataset import TrainData

        self.cfg, self.parts = cfg, parts
        plan = plan_buckets([(r.width, r.height) for r in records], [1] * len(records), resolution=cfg.resolution,
                            min_size=cfg.min_bucket, max_size=cfg.max_bucket, no_upscale=cfg.bucket_no_upscale,
                            enable=cfg.enable_buckets)
        data = TrainData(records, plan, CaptionOptions(), seed=cfg.seed, template=template, name=name,
                         masked=cfg.masked_loss)
        device = parts.device
        self.items = []
        with torch.no_grad():
            for i in range(len(records)):
                latents = parts.encode_images(data.pixels(i)[None].to(device), mode="mean").float()
                gen = torch.Generator().manual_seed(cfg.seed * 100_003 + i)
                noise = torch.randn((VALIDATION_LEVELS, *latents.shape[1:]), generator=gen)
                self.items.append({
                    "latents": latents.cpu(), "noise": noise, "caption": data.caption(i, 1, 0),
                    "sizes": data.size_conditioning(i), "mask": data.mask(i) if cfg.masked_loss else None})
        self.levels = torch.tensor(validation_levels(VALIDATION_LEVELS, cfg.min_timestep,
                                                     min(cfg.max_timestep, len(parts.alphas_cumprod))))
        self.history: list[tuple[int, float]] = []
        self.warned = False

    def __len__(self) -> int:
        return len(self.items)

    def captions(self) -> list[str]:
        """The held-out pictures' captions (for the text-encoder output cache)."""
        return [item["caption"] for item in self.items]

    def due(self, step: int, epoch_done: bool, last: bool) -> bool:
        every = self.cfg.validation_every_n_steps
        return last or (step % every == 0 if every else epoch_done)

    @torch.no_grad()
    def measure(self, ac: torch.Tensor, encode: Any, amp_dtype: Any, step: int) -> float:
        """The mean held-out loss with the weights as they are; the networks run in eval mode (no dropout)."""
        cfg, parts = self.cfg, self.parts
        device = parts.device
        modules = [m for net in (parts.unet, *parts.text_encoders) for m in net.modules()]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            total = 0.0
            t = self.levels.to(device)
            for item in self.items:
                k = len(t)
                latents = item["latents"].to(device).expand(k, *item["latents"].shape[1:])
                noise = item["noise"].to(device, latents.dtype)
                noisy = N.add_noise(latents, noise, t, ac)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    cond = encode([item["caption"]] * k)
                    pred = parts.predict(noisy, t, cond, [item["sizes"]] * k if parts.family == "sdxl" else None)
                target = N.target(latents, noise, t, ac, parts.prediction)
                mask = item["mask"][None] if item["mask"] is not None else None
                total += float(N.step_elementwise(cfg, pred, target, t, ac, mask).mean())
        finally:
            for m, mode in zip(modules, modes):
                m.training = mode
        value = total / len(self.items)
        self.history.append((step, value))
        return value

    def restore(self, history: list[tuple[int, float]]) -> None:
        """Go on from a resumed run's measurements: the history, and whether its rise was already reported (so a
        resumed run does not report it again)."""
        self.history, self.warned = [], False
        for point in history:
            self.history.append(point)
            self.rise()

    def rise(self) -> str:
        """A warning, once, when the last two measurements are both RISE × above the lowest one before them."""
        if self.warned or len(self.history) < 3:
            return ""
        best_step, best = min(self.history[:-2], key=lambda sv: sv[1])
        (_, a), (step, b) = self.history[-2:]
        if a > RISE * best and b > RISE * best:
            self.warned = True
            return (f"validation loss has risen {100 * (b / best - 1):.0f} % above its lowest (step {best_step}: "
                    f"{best:.4g}; step {step}: {b:.4g}): the saves after step {best_step} may be over-trained; "
                    f"compare them with the save nearest that step")
        return ""
