"""Aspect-ratio buckets, compatible with kohya's sd-scripts (anchors.md §3 "Bucketing").

- `make_bucket_ladder`: `model_util.make_bucket_resolutions`. max_area = W·H of the resolution; the square
  ⌊√area / step⌋·step, plus for each width from min to max (in `step`s) the height min(max, ⌊area / width / step⌋·step)
  when it is ≥ min, in both orientations. Sorted (width, height) pairs.
- `assign_bucket`: `train_util.BucketManager.select_bucket`. The bucket with the nearest aspect ratio (an exact
  size match wins), scale so the picture covers it (rounding half up), centre-crop the overflow. With
  `no_upscale`, each picture gets its own bucket: downscaled to max_area if larger, then floored to `step`.
- `bucket_info`: the `ss_bucket_info` metadata A1111 shows: buckets in sorted order, counts with repeats, and
  the mean |aspect error| without repeats.
- `BucketBatchSampler`: batches that never mix buckets, reshuffled per epoch from a seed; pure Python, so it
  works as a `torch.utils.data.DataLoader(batch_sampler=...)` without importing torch here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..errors import UserError

Size = tuple[int, int]     # (width, height), kohya's order


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL micro-conditioning for one sample, in pixels, (height, width) order as SGM uses."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None  # None: same as original_size

    def as_list(self) -> list[int]:
        target = self.target_size or self.original_size
        return [*self.original_size, *self.crop_top_left, *target]


def _as_size(resolution: int | Sequence[int]) -> Size:
    if isinstance(resolution, int):
        return resolution, resolution
    w, h = (int(v) for v in resolution)
    return w, h


def parse_resolution(text: str | int | float) -> Size:
    """A training resolution as typed: "512" (square), "768x512" or "768,512" (width first, kohya's
    `--resolution` form); a whole number such as 512.0 is taken too (a number field). Returns (width, height).

    Sides must be from 64 to MAX_PICTURE_SIDE, the range of train's resolution setting; they need not be multiples
    of 64 (the bucket ladder rounds to its step). Anything else is a UserError naming the value.
    """
    from ..sample_settings import MAX_PICTURE_SIDE

    t = str(text).strip().lower()
    parts = [p.strip() for p in (t.split("x") if "x" in t else t.split(","))]
    sides = []
    for part in parts if len(parts) <= 2 else ():
        try:
            value = float(part)
        except ValueError:
            break
        if not value.is_integer():
            break
        sides.append(int(value))
    if not sides or len(sides) != len(parts):
        raise UserError(f"resolution {text!r} must be a whole number or WxH (e.g. 512, 768x512 or 768,512)")
    if not all(64 <= side <= MAX_PICTURE_SIDE for side in sides):   # as train's resolution setting
        raise UserError(f"resolution {text!r} must be from 64 to {MAX_PICTURE_SIDE} px a side (e.g. 512 or 768x512)")
    return (sides[0], sides[0]) if len(sides) == 1 else (sides[0], sides[1])


def check_bucket_settings(resolution: int | Sequence[int], min_size: int = 256, max_size: int = 1024,
                          step: int = 64) -> tuple[int, int]:
    """Validate and round min/max like sd-scripts' `adjust_min_max_bucket_reso_by_steps`; returns (min, max).

    min is rounded down and max up to a multiple of `step`; the resolution must lie within them.
    """
    w, h = _as_size(resolution)
    if step < 8 or step % 8:
        raise UserError(f"bucket step must be a multiple of 8 (64 is usual, 32 works for SDXL), got {step}")
    if w < step or h < step:
        raise UserError(f"resolution {w}×{h} is smaller than one bucket step ({step})")
    given_min, given_max = min_size, max_size
    if min_size % step:
        min_size -= min_size % step
    if max_size % step:
        max_size += step - max_size % step

    def shown(given: int, rounded: int, how: str) -> str:
        # the side as typed, and what the rounding made of it (a typed 32 is 0 at step 64: "got 0" misled)
        return str(given) if given == rounded else f"{given}, {how} to {rounded} at bucket step {step}"

    if min_size < step:
        raise UserError(f"the smallest bucket side must be at least {step}, got "
                        f"{shown(given_min, min_size, 'rounded down')}")
    if min(w, h) < min_size:
        raise UserError(f"the smallest bucket side ({shown(given_min, min_size, 'rounded down')}) must not exceed "
                        f"the resolution ({min(w, h)})")
    if max(w, h) > max_size:
        raise UserError(f"the largest bucket side ({shown(given_max, max_size, 'rounded up')}) must be at least the "
                        f"resolution ({max(w, h)})")
    return min_size, max_size


def make_bucket_ladder(resolution: int | Sequence[int], min_size: int = 256, max_size: int = 1024,
                       step: int = 64) -> list[Size]:
    """kohya's bucket resolutions for a training resolution (512 → 17 buckets with min 256, max 1024)."""
    min_size, max_size = check_bucket_settings(resolution, min_size, max_size, step)
    w, h = _as_size(resolution)
    area = w * h
    side = int(math.sqrt(area) // step) * step
    sizes = {(side, side)}
    # a width past area // min_size leaves no height of min_size or more: the loop ends there, not at max_size
    # (--max-bucket 99999999999999999999 counted to it, for ever)
    for width in range(min_size, min(max_size, area // min_size) + 1, step):
        height = min(max_size, (area // width) // step * step)
        if height >= min_size:
            sizes.add((width, height))
            sizes.add((height, width))
    return sorted(sizes)


@dataclass(frozen=True)
class BucketAssignment:
    """Where one picture goes: resize to `resized`, then crop `bucket` out of it at (crop_left, crop_top)."""

    bucket: Size
    resized: Size
    original: Size
    crop_left: int
    crop_top: int
    ar_error: float        # bucket aspect − picture aspect (kohya's sign)

    def size_conditioning(self) -> SizeConditioning:
        """SDXL micro-conditioning: original size, crop offsets (in the resized picture) and target size.

        The crop offsets are the pixels cut from the top/left, as the SDXL paper and diffusers' SDXL scripts
        define them. kohya records something else (see `kohya_crop_ltrb`).
        """
        return SizeConditioning(original_size=(self.original[1], self.original[0]),
                                crop_top_left=(self.crop_top, self.crop_left),
                                target_size=(self.bucket[1], self.bucket[0]))


def assign_bucket(width: int, height: int, ladder: Sequence[Size], *, no_upscale: bool = False,
                  max_area: int | None = None, step: int = 64) -> BucketAssignment:
    """The bucket, resize and centre crop for a picture of `width`×`height` (kohya's `select_bucket`)."""
    if width <= 0 or height <= 0:
        raise UserError(f"picture size {width}×{height} is not valid")
    ar = width / height
    if not no_upscale:
        if not ladder:
            raise UserError("the bucket ladder is empty")
        if (width, height) in ladder:
            bucket = (width, height)
        else:
            bucket = min(ladder, key=lambda b: abs(b[0] / b[1] - ar))   # first of equal errors, like argmin
        scale = bucket[1] / height if ar > bucket[0] / bucket[1] else bucket[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        area = max_area if max_area is not None else max(w * h for w, h in ladder)

        def round_down(x: float) -> int:
            x = int(x + 0.5)
            return x - x % step

        if width * height > area:
            rw = math.sqrt(area * ar)
            rh = area / rw
            bw_w = round_down(rw)
            bh_w = round_down(bw_w / ar)
            bh_h = round_down(rh)
            bw_h = round_down(bh_h * ar)
            err_w = abs(bw_w / bh_w - ar) if bh_w else math.inf
            err_h = abs(bw_h / bh_h - ar) if bh_h else math.inf
            if err_w < err_h:
                resized = (bw_w, int(bw_w / ar + 0.5))
            else:
                resized = (int(bh_h * ar + 0.5), bh_h)
        else:
            resized = (width, height)
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        if bucket[0] == 0 or bucket[1] == 0:
            raise UserError(f"a {width}×{height} picture is too small for {step}-px buckets")
    crop_left = max(0, (resized[0] - bucket[0]) // 2)
    crop_top = max(0, (resized[1] - bucket[1]) // 2)
    return BucketAssignment(bucket, resized, (width, height), crop_left, crop_top, bucket[0] / bucket[1] - ar)


def kohya_crop_ltrb(bucket: Size, original: Size) -> tuple[float, float, float, float]:
    """sd-scripts' `BucketManager.get_crop_ltrb`, for parity with kohya-trained SDXL models.

    It fits ("contains") the picture inside the bucket and returns the margins of that fit, so for a picture
    cropped left/right it reports a top offset instead. Training Lab conditions on the real crop by default.
    """
    bucket_ar = bucket[0] / bucket[1]
    image_ar = original[0] / original[1]
    if bucket_ar > image_ar:
        rw, rh = bucket[1] * image_ar, bucket[1]
    else:
        rw, rh = bucket[0], bucket[0] / image_ar
    left, top = (bucket[0] - rw) // 2, (bucket[1] - rh) // 2
    return left, top, left + rw, top + rh


@dataclass
class BucketPlan:
    """Bucket assignments for a list of pictures, with their (effective) repeats."""

    assignments: list[BucketAssignment]
    repeats: list[int]
    ladder: list[Size]

    def counts(self) -> dict[Size, int]:
        """Pictures × repeats per used bucket, in sorted bucket order."""
        out: dict[Size, int] = {}
        for a, n in zip(self.assignments, self.repeats):
            if n > 0:
                out[a.bucket] = out.get(a.bucket, 0) + n
        return dict(sorted(out.items()))

    def mean_ar_error(self) -> float:
        errs = [abs(a.ar_error) for a, n in zip(self.assignments, self.repeats) if n > 0]
        return sum(errs) / len(errs) if errs else 0.0

    def bucket_info(self) -> dict[str, Any]:
        """kohya's `ss_bucket_info`: `{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}`.

        sd-scripts `BaseDataset.make_buckets`: buckets are the used resolutions, sorted, numbered from 0;
        counts include repeats; the aspect error is averaged over pictures without repeats. (JSON turns the
        integer keys into strings, as it does for kohya.)
        """
        return {
            "buckets": {i: {"resolution": [w, h], "count": n} for i, ((w, h), n) in enumerate(self.counts().items())},
            "mean_img_ar_error": self.mean_ar_error(),
        }

    def batch_count(self, batch_size: int) -> int:
        """Batches per epoch: buckets are never mixed, so each bucket rounds up on its own."""
        return sum(math.ceil(n / batch_size) for n in self.counts().values())


def plan_buckets(sizes: Sequence[Size], repeats: Sequence[int], *, resolution: int | Sequence[int] = 512,
                 min_size: int = 256, max_size: int = 1024, step: int = 64, no_upscale: bool = False,
                 enable: bool = True) -> BucketPlan:
    """Assign every picture. `enable=False` = one fixed bucket at the resolution (resize to cover, centre crop)."""
    if len(sizes) != len(repeats):
        raise ValueError("sizes and repeats differ in length")
    w, h = _as_size(resolution)
    if enable:
        ladder = [] if no_upscale else make_bucket_ladder((w, h), min_size, max_size, step)
        if no_upscale:
            check_bucket_settings((w, h), min_size, max_size, step)
    else:
        ladder, no_upscale = [(w, h)], False
    out = [assign_bucket(sw, sh, ladder, no_upscale=no_upscale, max_area=w * h, step=step) for sw, sh in sizes]
    return BucketPlan(out, list(repeats), ladder)


class BucketBatchSampler:
    """Index batches where every batch comes from one bucket; a new deterministic order every epoch.

    Each picture appears `repeats[i]` times per epoch (the same picture can land twice in one batch, as in
    kohya). Per epoch: every bucket's list is shuffled, cut into batches of `batch_size` (the last one may be
    short unless `drop_last`), and the batches of all buckets are shuffled together (sd-scripts shuffles its
    `buckets_indices` the same way). The order depends only on (seed, epoch).

    Use it directly as `DataLoader(dataset, batch_sampler=sampler)`; call `set_epoch(e)` before each epoch.
    """

    def __init__(self, buckets: Sequence[Size], repeats: Sequence[int], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if len(buckets) != len(repeats):
            raise ValueError("buckets and repeats differ in length")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        groups: dict[Size, list[int]] = {}
        for i, (b, n) in enumerate(zip(buckets, repeats)):
            groups.setdefault(tuple(b), []).extend([i] * max(0, int(n)))   # type: ignore[arg-type]
        self.groups = {b: idx for b, idx in sorted(groups.items()) if idx}

    @classmethod
    def from_plan(cls, plan: BucketPlan, batch_size: int, **kw: Any) -> BucketBatchSampler:
        return cls([a.bucket for a in plan.assignments], plan.repeats, batch_size, **kw)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        epoch = self.epoch if epoch is None else epoch
        rng = random.Random(f"bucket-batches:{self.seed}:{epoch}")   # str seeds hash the same in every process
        out: list[list[int]] = []
        for idx in self.groups.values():
            idx = list(idx)
            if self.shuffle:
                rng.shuffle(idx)
            for s in range(0, len(idx), self.batch_size):
                batch = idx[s:s + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    out.append(batch)
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        div = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: -(-n // self.batch_size))
        return sum(div(len(idx)) for idx in self.groups.values())
