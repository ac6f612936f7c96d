"""Class (regularization) pictures rendered by the host's own sampler, resumably.

(Beside `sampling`, not in `data/`: it drives a Host, and the data layer knows no host.)

Prior preservation needs many generic pictures of the class ("a photo of a dog") made by the model being
trained, usually 20-100× the instance pictures (training guide, "Regularization"). Each picture's file name is
derived from its seed and from everything that changes the picture (prompt, negative prompt, size, steps,
sampler, CFG scale), so running again skips what is already there: an interrupted run resumes, and asking for
more pictures renders only the new seeds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError
from .sample_settings import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_PICTURE_SIDE, MAX_SEED, \
    SAMPLING, canonical_sampler

# the most class pictures one set takes (Dreambooth's num_class_images allows as many)
MAX_CLASS_PICTURES = 100_000

if TYPE_CHECKING:
    from .events import Events, StopToken
    from .hosts import Host, ModelParts


@dataclass
class ClassGenResult:
    paths: list[Path] = field(default_factory=list)     # every picture of the set that exists now, in seed order
    generated: int = 0
    skipped: int = 0                                    # already present
    stopped: bool = False
    left_out: int = 0                                   # cut short by the host's skip control: not saved

    def to_dict(self) -> dict[str, Any]:
        return {"paths": [str(p) for p in self.paths], "generated": self.generated, "skipped": self.skipped,
                "stopped": self.stopped, "left_out": self.left_out}


def class_image_name(prompt: str, seed: int, *, negative: str = "", width: int = 512, height: int = 512,
                     steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER,
                     cfg_scale: float = DEFAULT_CFG_SCALE) -> str:
    """`class-<8 hex of the settings>-<seed>.png`: the same settings and seed always give the same name (a sampler
    counts by our name: A1111's "Euler" names the pictures as "euler" does)."""
    key = "\x00".join([prompt, negative, f"{width}x{height}", str(steps), canonical_sampler(sampler),
                       repr(float(cfg_scale))])
    return f"class-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:8]}-{seed}.png"


def generate_class_images(host: Host, parts: ModelParts, prompt: str, count: int, out_dir: str | Path,
                          seed: int = 0, width: int = 512, height: int = 512, steps: int = DEFAULT_STEPS,
                          sampler: str = DEFAULT_SAMPLER, events: Events | None = None,
                          stop: StopToken | None = None, *, negative: str = "",
                          cfg_scale: float = DEFAULT_CFG_SCALE, batch_size: int = 1,
                          write_captions: bool = True) -> ClassGenResult:
    """Render `count` class pictures with seeds `seed`, `seed+1`, ... into `out_dir`, skipping existing ones.

    Args:
        host, parts: the host whose `sample(parts, [SampleRequest, ...], stop)` renders the pictures.
        prompt: the class prompt, e.g. "a photo of a dog".
        count: how many pictures the set should have.
        out_dir: the regularization folder (created if missing), e.g. "reg/1_dog".
        seed: the first seed; picture i uses seed + i.
        events: progress ("progress" events with job="classgen") and status lines.
        stop: checked before every batch; a stopped run keeps what it saved and can be resumed. With it, a
            picture the host's skip control cut short (A1111's Skip; None from `host.sample`) is not saved:
            the set is one short (`left_out`), and the next call draws it.
        batch_size: pictures per `host.sample` call.
        write_captions: also write the prompt as a `.txt` sidecar beside each picture.
    Returns:
        a `ClassGenResult`.
    """
    from .formats.files import atomic_write, atomic_write_text, make_folder
    from .hosts import SampleRequest

    if not prompt.strip():
        raise UserError("the class prompt is empty (e.g. 'a photo of a dog')")
    check = getattr(host, "check_sampler", None)   # a sampler the host has none of: refused before any picture
    sampler = canonical_sampler(check(sampler) if callable(check) else sampler)
    if not 0 <= count <= MAX_CLASS_PICTURES:
        raise UserError(f"the number of class pictures must be from 0 to {MAX_CLASS_PICTURES}, not {count}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"class pictures need a fixed seed from 0 to {MAX_SEED} so that their names can be resumed, "
                        f"not {seed}")
    if width % 8 or height % 8 or min(width, height) < 64 or max(width, height) > MAX_PICTURE_SIDE:
        raise UserError(f"class picture size {width}×{height} must be multiples of 8, from 64 to {MAX_PICTURE_SIDE}")
    # the ranges every other sampling box has: 10**20 steps went to torch.linspace (a traceback), a CFG scale of
    # 1e300 drew pictures of NaN
    steps_f, cfg_f = SAMPLING["steps"], SAMPLING["cfg_scale"]
    if not steps_f.minimum <= steps <= steps_f.maximum:
        raise UserError(f"the class pictures' steps must be from {steps_f.minimum} to {steps_f.maximum}, not {steps}")
    if batch_size < 1:
        raise UserError(f"the batch size must be at least 1, not {batch_size}")
    if not cfg_f.minimum <= cfg_scale <= cfg_f.maximum:      # also refuses NaN
        raise UserError(f"the class pictures' CFG scale must be from {cfg_f.minimum:g} to {cfg_f.maximum:g}, "
                        f"not {cfg_scale}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder")
    make_folder(out)

    names = [(seed + i, out / class_image_name(prompt, seed + i, negative=negative, width=width, height=height,
                                               steps=steps, sampler=sampler, cfg_scale=cfg_scale))
             for i in range(count)]
    todo = [(s, p) for s, p in names if not p.is_file()]
    result = ClassGenResult(skipped=count - len(todo))
    if events:
        events.status(f"class pictures: {result.skipped} of {count} already in {out}, rendering {len(todo)}")
        events.progress(result.skipped, count, job="classgen")
    done = result.skipped
    for start in range(0, len(todo), batch_size):
        if stop is not None and stop.requested:
            result.stopped = True
            if events:
                events.status(f"class pictures: stopped after {done} of {count} ({stop.reason})")
            break
        chunk = todo[start:start + batch_size]
        requests = [SampleRequest(prompt=prompt, negative=negative, seed=s, steps=steps, cfg_scale=cfg_scale,
                                  width=width, height=height, sampler=sampler) for s, _ in chunk]
        images = host.sample(parts, requests, stop)
        if len(images) != len(chunk):
            if stop is not None and stop.requested:   # a host may return early when stopped
                result.stopped = True
            elif len(images) < len(chunk):
                raise RuntimeError(f"host {getattr(host, 'name', host)!r} returned {len(images)} pictures for "
                                   f"{len(chunk)} requests")
        for (s, path), img in zip(chunk, images):
            if img is None:                               # skipped in the host: half-drawn, not a class picture
                result.left_out += 1
                if events:
                    events.status(f"class pictures: seed {s} was skipped, not saved (the next run draws it)")
                continue
            img = img if img.mode in ("RGB", "L") else img.convert("RGB")
            atomic_write(path, lambda tmp, img=img: img.save(tmp, format="PNG"))
            if write_captions:
                atomic_write_text(path.with_suffix(".txt"), prompt.strip() + "\n")
            result.generated += 1
            done += 1
            if events:
                events.progress(done, count, job="classgen", path=str(path))
        if result.stopped:
            break
    result.paths = [p for _, p in names if p.is_file()]
    return result
