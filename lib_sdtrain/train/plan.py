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


def plan_record(plan_info: dict, per_step: int) -> dict[str, int]:
    """What a state records of the step arithmetic it was saved under (`resumed_total` compares it)."""
    return {"batches_per_epoch": plan_info["batches_per_epoch"], "samples_per_epoch": plan_info["samples_per_epoch"],
            "per_step": per_step, "total_steps": plan_info["total_steps"]}


def resumed_total(was: dict | None, now: dict[str, int], cfg: TrainSettings, step: int, batch_no: int
                  ) -> tuple[int, str | None]:
    """(total steps, warning or None) of a run resumed at (`step`, `batch_no`) from a state saved under the step
    arithmetic `was` (`plan_record`; None for states older than the record), now `now`.

    The state's position is a count of batches. When the pictures, repeats, batch size or accumulation changed,
    those batches are counted in the new epochs: the run goes on at another place in another epoch, and a run
    set by epochs would otherwise end after the old epochs' step count, part-way through its last epoch (or past
    it). Set by epochs, the total is therefore the state's step plus the steps that finish the new epochs; set
    by max_steps, it stays max_steps."""
    total = now["total_steps"]
    if not isinstance(was, dict) or all(was.get(k) == now[k] for k in ("batches_per_epoch", "per_step")):
        return total, None
    per_epoch, per_step = now["batches_per_epoch"], now["per_step"]
    epoch, in_epoch = divmod(batch_no, per_epoch)
    if not cfg.max_steps:
        left = 0 if epoch >= cfg.epochs else (
            math.ceil((per_epoch - in_epoch) / per_step) + (cfg.epochs - epoch - 1) * math.ceil(per_epoch / per_step))
        total = step + left
    old_epoch, old_in = divmod(batch_no, was["batches_per_epoch"])
    at = (f"{old_in} of the {was['batches_per_epoch']} batches into epoch {old_epoch + 1}" if old_in else
          f"at the end of epoch {old_epoch} (of {was['batches_per_epoch']} batches)")
    goes_on = (f"goes on at batch {in_epoch + 1} of {per_epoch} of epoch {epoch + 1}, {total} steps in all (was "
               f"{was['total_steps']}): its epochs, epoch saves and learning-rate schedule count the new epochs"
               if total > step else "is already past the new epochs' end: it ends at once, its final file the "
               "state's weights")
    return total, (
        f"the state was saved at step {step}, {at}, {was['samples_per_epoch']} samples per epoch and "
        f"{was['per_step']} batches per step; now an epoch is {now['samples_per_epoch']} samples in {per_epoch} "
        f"batches, {per_step} per step (the pictures, repeats, batch size or accumulation changed). The run "
        f"{goes_on}. To train the new epochs from their start, begin a new run from the last save instead (start_from;"
        " Dreambooth and finetune: that save as the model)")
