"""Dataset size guidance and the steps/epochs arithmetic.

The usual sizes (training guide, "Dataset size" and "Regularization"):

- one subject (a person, an object, a pet): 5-20 instance pictures;
- a style: 50-200 pictures;
- full fine-tuning: thousands of pictures, with every concept in it getting about what a single concept would
  (20-50 pictures at least);
- regularization (class) pictures: 20-100 times the instance pictures.

The step arithmetic is kohya's (anchors.md §3 "Repeats and steps"): samples per epoch = Σ pictures × repeats,
doubled when regularization pictures are present (they are cycled until they match the instance samples); an
optimizer step consumes batch × gradient-accumulation samples. With buckets, a batch never mixes buckets, so
each bucket rounds up on its own and an epoch can hold a few more batches than the plain formula says.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import UserError

if TYPE_CHECKING:
    from .scan import ImageRecord


@dataclass(frozen=True)
class SizeRange:
    low: int
    high: int | None
    what: str


# kind → usual instance-picture count, per concept for "finetune" (the whole set should reach thousands).
SIZE_RANGES: dict[str, SizeRange] = {
    "subject": SizeRange(5, 20, "one subject (a person, a pet, an object)"),
    "style": SizeRange(50, 200, "a style"),
    "finetune": SizeRange(20, 50, "each concept of a full fine-tune"),
}
FINETUNE_TOTAL = 1000          # "thousands of pictures": below this a full fine-tune is really a multi-concept LoRA
CLASS_RATIO = (20, 100)        # regularization pictures per instance picture


@dataclass
class Advice:
    level: str      # "ok" | "warning"
    text: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def size_advice(instance: int, regularization: int = 0, *, kind: str = "subject",
                per_concept: dict[str, int] | None = None, uses_regularization: bool | None = None) -> list[Advice]:
    """Compare picture counts with the usual ranges; a warning for each count outside them.

    Args:
        instance: usable instance pictures (without repeats).
        regularization: usable regularization pictures.
        kind: "subject", "style" or "finetune".
        per_concept: instance pictures per concept (folder), for fine-tunes and multi-concept sets.
        uses_regularization: whether the method will use class pictures (None = only if some are present).
    """
    if kind not in SIZE_RANGES:
        raise UserError(f"unknown dataset kind {kind!r}; use one of {', '.join(SIZE_RANGES)}")
    rng = SIZE_RANGES[kind]
    out: list[Advice] = []
    if kind == "finetune":
        if instance < FINETUNE_TOTAL:
            out.append(Advice("warning", f"{instance} pictures for a full fine-tune: it usually takes thousands; "
                                         f"with this few, a LoRA or DreamBooth run on the concepts fits better"))
        else:
            out.append(Advice("ok", f"{instance} pictures: enough for a full fine-tune"))
        for concept, n in sorted((per_concept or {}).items()):
            if n < rng.low:
                out.append(Advice("warning", f"concept '{concept}' has {n} pictures; give each concept at least "
                                             f"{rng.low}-{rng.high}, as if it were trained alone"))
    else:
        if instance < rng.low:
            out.append(Advice("warning", f"{instance} instance pictures is few for {rng.what} (usually "
                                         f"{rng.low}-{rng.high}): the model will copy them rather than generalise; "
                                         f"add varied pictures"))
        elif rng.high is not None and instance > rng.high:
            out.append(Advice("warning", f"{instance} instance pictures is more than usual for {rng.what} "
                                         f"({rng.low}-{rng.high}): each epoch takes longer; keep the best and "
                                         f"most varied pictures, and use fewer repeats"))
        else:
            out.append(Advice("ok", f"{instance} instance pictures: within the usual {rng.low}-{rng.high} for {rng.what}"))
        if per_concept and len(per_concept) > 1:
            for concept, n in sorted(per_concept.items()):
                if n < rng.low:
                    out.append(Advice("warning", f"concept '{concept}' has only {n} pictures (usually "
                                                 f"{rng.low}-{rng.high} per concept)"))
    use_reg = uses_regularization if uses_regularization is not None else regularization > 0
    if use_reg and instance > 0:
        lo, hi = CLASS_RATIO
        ratio = regularization / instance
        if regularization == 0:
            out.append(Advice("warning", f"no regularization (class) pictures; usually {lo}-{hi}× the instance "
                                         f"pictures ({lo * instance}-{hi * instance}) keep the concept from "
                                         f"bleeding into its class; `dataset classgen` can render them"))
        elif ratio < lo:
            out.append(Advice("warning", f"{regularization} class pictures is {ratio:.1f}× the instance pictures; "
                                         f"usually {lo}-{hi}× ({lo * instance}-{hi * instance}). Too few lets the "
                                         f"concept bleed into its class"))
        elif ratio > hi:
            out.append(Advice("warning", f"{regularization} class pictures is {ratio:.0f}× the instance pictures; "
                                         f"beyond {hi}× most are never shown (kohya cycles only as many as the "
                                         f"instance samples per epoch)"))
        else:
            out.append(Advice("ok", f"{regularization} class pictures ({ratio:.0f}× the instance pictures): within "
                                    f"the usual {lo}-{hi}×"))
    return out


@dataclass
class StepPlan:
    """How long a run is, from the dataset and the batch settings."""

    samples_per_epoch: int          # Σ pictures × repeats (× 2 with regularization)
    batch_size: int
    accumulation: int
    epochs: int
    batches_per_epoch: int          # with buckets: Σ ceil(bucket samples / batch)
    steps_per_epoch: int            # optimizer steps: ceil(batches / accumulation)
    total_steps: int
    regularization_factor: int = 1
    hints: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nearby_divisible(samples: int, per_step: int, repeats: int, pictures: int, factor: int) -> list[str]:
    """A repeat count near `repeats`, and a smaller batch × accumulation, that divide the epoch evenly."""
    from .scan import MAX_REPEATS  # a folder's repeat count above it is refused

    ideas = []
    if pictures > 0 and repeats > 0:
        # the repeat counts that divide evenly are the multiples of `unit`: the nearest ones, not a walk over
        # repeats ± per_step (3.8 s and a list of 2·10^7 at batch 10^7, so minutes and tens of GB at 10^9; 10^24 was
        # an OverflowError)
        unit = per_step // math.gcd(per_step, pictures * factor)
        below = repeats // unit * unit
        near = [r for r in (below - unit, below, below + unit, below + 2 * unit)
                if 1 <= r <= MAX_REPEATS and r != repeats and abs(r - repeats) <= per_step]
        if near:
            ideas.append(f"{min(near, key=lambda r: (abs(r - repeats), r))} repeats")
    # the largest divisor of samples from 2 to per_step - 1, from the divisor pairs up to √samples
    divisors = {d for i in range(1, math.isqrt(samples) + 1) if samples % i == 0 for d in (i, samples // i)}
    fitting = [d for d in divisors if 1 < d < per_step]
    if fitting:
        ideas.append(f"batch × accumulation = {max(fitting)}")
    return ideas


def plan_steps(pictures_x_repeats: int, *, batch_size: int = 1, accumulation: int = 1, epochs: int = 1,
               regularization: bool = False, bucket_counts: Sequence[int] | None = None,
               pictures: int = 0, repeats: int = 0) -> StepPlan:
    """Steps for a run: pictures × repeats ÷ (batch × accumulation) × epochs, rounded up per epoch.

    Args:
        pictures_x_repeats: Σ instance pictures × their repeats.
        regularization: class pictures are used (kohya doubles the samples: each instance sample is paired
            with a class sample).
        bucket_counts: samples per bucket (with repeats, including class samples), to count the batches a
            bucketed epoch really has; without it the plain formula is used.
        pictures, repeats: for the hint, when one folder's pictures and repeats are known.
    """
    if batch_size < 1 or accumulation < 1 or epochs < 1:
        raise UserError("batch size, gradient accumulation and epochs must all be at least 1")
    if pictures_x_repeats < 0:
        raise UserError("the number of samples cannot be negative")
    factor = 2 if regularization else 1
    samples = pictures_x_repeats * factor
    if bucket_counts is not None:
        batches = sum(math.ceil(n / batch_size) for n in bucket_counts if n > 0)
    else:
        batches = math.ceil(samples / batch_size)
    steps = math.ceil(batches / accumulation)
    per_step = batch_size * accumulation
    hints = []
    if samples and samples % per_step:
        ideas = _nearby_divisible(samples, per_step, repeats, pictures, factor)
        hints.append(
            f"{samples} samples per epoch is not a multiple of batch × accumulation = {per_step}: the last step of "
            f"every epoch gets only {samples % per_step} sample{'s' if samples % per_step > 1 else ''}. Settings "
            f"that divide evenly make every step the same size" + ("; for example " + " or ".join(ideas)
                                                                   if ideas else "") + ".")
    if bucket_counts is not None and batches > math.ceil(samples / batch_size):
        hints.append(f"buckets add {batches - math.ceil(samples / batch_size)} partial batches per epoch "
                     f"(a batch never mixes picture shapes)")
    return StepPlan(samples, batch_size, accumulation, epochs, batches, steps, steps * epochs, factor, hints)


def dataset_guidance(records: Sequence[ImageRecord], *, kind: str = "subject", batch_size: int = 1,
                     accumulation: int = 1, epochs: int = 1, bucket_counts: Sequence[int] | None = None,
                     uses_regularization: bool | None = None) -> dict[str, Any]:
    """Size advice and the step plan for scanned records (usable pictures only)."""
    inst = [r for r in records if r.usable and not r.is_regularization]
    reg = [r for r in records if r.usable and r.is_regularization]
    per_concept: dict[str, int] = {}
    for r in inst:
        per_concept[r.concept] = per_concept.get(r.concept, 0) + 1
    advice = size_advice(len(inst), len(reg), kind=kind, per_concept=per_concept,
                         uses_regularization=uses_regularization)
    repeats = {r.repeats for r in inst}
    plan = plan_steps(sum(r.repeats for r in inst), batch_size=batch_size, accumulation=accumulation,
                      epochs=epochs, regularization=bool(reg) if uses_regularization is None else uses_regularization,
                      bucket_counts=bucket_counts, pictures=len(inst),
                      repeats=repeats.pop() if len(repeats) == 1 else 0)
    return {"kind": kind, "instance": len(inst), "regularization": len(reg), "per_concept": per_concept,
            "advice": [a.to_dict() for a in advice], "steps": plan.to_dict()}
