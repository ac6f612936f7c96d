"""The steps / epochs / repeats arithmetic of a run, from the dataset alone (no model): used by the loop, the
memory estimate and the UI's live arithmetic."""

from __future__ import annotations

import math

from ..errors import UserError
from .settings import TrainSettings


def step_plan(images: int, repeats_total: int, batches_per_epoch: int, cfg: TrainSettings, world: int = 1, *,
              classes: tuple[int, int] | None = None) -> dict:
    """The steps / epochs / repeats arithmetic shown before a run starts.

    `classes` = (class pictures, class samples per epoch) with prior preservation: the class pictures are
    cycled to balance the instance samples (see `effective_repeats`), so the text splits the samples into
    instance pictures × repeats and class samples instead of multiplying all pictures by "repeats"."""
    per_step = cfg.grad_accum * world
    steps_per_epoch = math.ceil(batches_per_epoch / per_step)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    effective = cfg.batch_size * cfg.grad_accum * world
    plan = {
        "images": images,
        "samples_per_epoch": repeats_total,
        "batches_per_epoch": batches_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "epochs": math.ceil(total / steps_per_epoch) if steps_per_epoch else 0,
        "total_steps": total,
        "effective_batch": effective,
        "text": (f"{_samples_text(images, repeats_total, classes)} ÷ (batch {cfg.batch_size} × "
                 f"accumulation {cfg.grad_accum}{f' × {world} GPUs' if world > 1 else ''}) = {steps_per_epoch} steps "
                 f"per epoch; " + (
                     # max_steps sets the length whether it is shorter or longer than the epochs would be
                     f"max_steps {cfg.max_steps} = {cfg.max_steps / steps_per_epoch:.3g} epochs (in place of "
                     f"{cfg.epochs} epochs)" if cfg.max_steps and steps_per_epoch else
                     f"× {cfg.epochs} epochs = {steps_per_epoch * cfg.epochs} steps")),
    }
    if repeats_total % effective:
        plan["hint"] = (f"{repeats_total} samples per epoch is not a multiple of the effective batch {effective}: "
                        "the last batch of an epoch is smaller")
    return plan


def _samples_text(images: int, repeats_total: int, classes: tuple[int, int] | None) -> str:
    """"N pictures × repeats = S samples per epoch", or with class pictures "N instance pictures × repeats = I
    samples + C class samples (of M class pictures) = S samples per epoch"."""
    if not classes or not classes[0]:
        return f"{images} pictures × repeats = {repeats_total} samples per epoch"
    class_pictures, class_samples = classes
    return (f"{images - class_pictures} instance pictures × repeats = {repeats_total - class_samples} samples + "
            f"{class_samples} class samples (of {class_pictures} class pictures) = {repeats_total} samples per "
            "epoch")


def plan_data(cfg: TrainSettings, records: list, world: int = 1):
    """Buckets, the bucketed batch sampler and the step arithmetic for usable records (no model needed).

    Returns (BucketPlan, BucketBatchSampler, step_plan dict). Used by the loop and by the UI's live arithmetic.
    """
    from ..data.buckets import BucketBatchSampler, plan_buckets
    from ..data.scan import effective_repeats

    if not [r for r in records if not r.is_regularization]:
        raise UserError(f"no usable training pictures in {cfg.data}")
    # class pictures are cycled to balance the instance samples, as kohya does (effective_repeats)
    repeats = effective_repeats(records)
    plan = plan_buckets([(r.width, r.height) for r in records], repeats,
                        resolution=cfg.resolution, min_size=cfg.min_bucket, max_size=cfg.max_bucket,
                        no_upscale=cfg.bucket_no_upscale, enable=cfg.enable_buckets)
    sampler = BucketBatchSampler.from_plan(plan, cfg.batch_size, seed=cfg.seed)
    reg = [n for r, n in zip(records, repeats) if r.is_regularization]
    return plan, sampler, step_plan(len(records), sum(plan.repeats), len(sampler), cfg, world,
                                    classes=(len(reg), sum(reg)) if reg else None)
