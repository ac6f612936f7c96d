"""Benchmark: how much of other style families the toy VAE keeps (the round-trip ceiling a style LoRA could reach).

    .venv/bin/python bench/style_families.py [--model PATH] [--n 200] [--sizes 64,128] [--seed 78]
        [--out bench/results/style_families.json] [--grid bench/results/style_families.png]

The toy world's style (zkz: horizontal bands of a colour and its pale tint inside the shape) keeps 0.92-0.94 of
its round trips through the bundled VAE, short of the 0.95 issue #13 asks. Would another style do better? Three
more families are drawn here on the same scenes, each changing how the shape is painted at a coarser scale than
the bands, with no word or caption involved (this measures the VAE only):

- split:  the upper half of the shape in the pale tint zkz uses (65 % towards white), the lower half in its colour;
- shaded: a vertical ramp inside the shape from 55 % towards white at its top to 40 % of its colour at its bottom;
- hollow: the shape as a thick outline (0.3 of its half-side, at least 3 px at 64 px), the background inside.

Each family is read by a measured property, not a trained detector: split and shaded by how much brighter the
shape's top third is than its bottom third (>= 40 of 255; the shape is what differs from its row's background by
more than 40, less one pixel at its edge), hollow by the share of the filled outline that is background (>= 0.05).
The stripes are read by the shipped detector (v4), as in the quality bench. Every reading is checked on the clean
pictures (it must call the family in all of them) and on the same scenes plain, clean and round-tripped (it must
call none). Prints and writes the share kept per family and size with Wilson 95 % intervals, small and large
shapes apart, and a grid (clean above round trip, one row pair per family) for the first size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
from PIL import Image, ImageFilter

from lib_sdtrain.errors import UserError
from lib_sdtrain.toy import world

FAMILIES = ("striped", "split", "shaded", "hollow")
PALE = 0.65                 # split: the pale tint's mix towards white (the zkz bands' own)
RAMP = (0.55, 0.40)         # shaded: mix towards white at the top, share of the colour at the bottom
RIM = 0.30                  # hollow: the outline's width as a share of the shape's half-side
BRIGHTER = 40.0             # split / shaded: top third minus bottom third, 0-255
HOLE = 0.05                 # hollow: background share of the filled outline
_SS = 4                     # paint at 4x and reduce, as the world does


def paint(scene: world.Scene, family: str, size: int, rng: np.random.Generator) -> Image.Image:
    """`scene` (plain) painted in `family`, with the jitter `world.render` would draw from `rng`."""
    if family == "striped":
        return world.render(world.Scene(scene.shape, scene.colour, scene.size, scene.position, scene.background,
                                        "striped"), size, rng)
    big = size * _SS
    picture, mask = world.render_with_mask(scene, big, rng)   # the same draws as render(): fractions of the side
    a = np.asarray(picture, dtype=np.float64).copy()
    m = np.asarray(mask, dtype=np.float64)[..., None] / 255.0
    rows = np.nonzero(m[..., 0].max(axis=1) > 0.5)[0]
    top, bottom = float(rows.min()), float(rows.max() + 1)
    colour = np.asarray(world.COLOURS[scene.colour], dtype=np.float64)
    inside = a[m[..., 0] > 0.99]
    if len(inside):
        colour = inside.mean(axis=0)                        # the jittered colour the world drew
    y = (np.arange(big, dtype=np.float64)[:, None] - top) / max(1.0, bottom - top)
    if family == "split":
        pale = colour + (255 - colour) * PALE
        fill = np.where((y < 0.5)[..., None], pale, colour) * np.ones((big, big, 1))
    elif family == "shaded":
        t = np.clip(y, 0, 1)[..., None]
        light, dark = colour + (255 - colour) * RAMP[0], colour * RAMP[1]
        fill = (light * (1 - t) + dark * t) * np.ones((1, big, 1))
    elif family == "hollow":
        # the background inside: each row's own level, read at the picture's left edge (no shape reaches it)
        fill = np.repeat(a[:, :1, :], big, axis=1)
        rim = max(3 * _SS, RIM * (bottom - top) / 2)
        inner = mask
        for _ in range(int(rim)):                            # erode by the rim's width, a pixel at a time
            inner = inner.filter(ImageFilter.MinFilter(3))
        m = np.asarray(inner, dtype=np.float64)[..., None] / 255.0
    else:
        raise UserError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    out = a * (1 - m) + fill * m
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8)).reduce(_SS)


def _shape(a: np.ndarray) -> np.ndarray:
    """Pixels that differ from their row's background (the median of the two columns at each edge) by > 40,
    less a one-pixel border."""
    bg = np.median(np.concatenate([a[:, :2], a[:, -2:]], axis=1), axis=1)
    m = np.abs(a - bg[:, None, :]).max(axis=2) > 40
    e = m.copy()
    e[1:] &= m[:-1]
    e[:-1] &= m[1:]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e


def brighter_top(picture: Image.Image) -> float:
    """Mean brightness of the shape's top third minus its bottom third (0 when there is no shape to read)."""
    a = np.asarray(picture.convert("RGB"), dtype=np.float64)
    e = _shape(a)
    ys = np.nonzero(e.any(axis=1))[0]
    if e.sum() < 12 or len(ys) == 0 or ys.max() - ys.min() < 3:
        return 0.0
    h = ys.max() - ys.min() + 1
    bright = a.mean(axis=2)
    top, bottom = e.copy(), e.copy()
    top[int(ys.min() + h / 3):] = False
    bottom[:int(ys.max() - h / 3) + 1] = False
    if top.sum() < 3 or bottom.sum() < 3:
        return 0.0
    return float(bright[top].mean() - bright[bottom].mean())


def hole_share(picture: Image.Image) -> float:
    """The share of the shape's filled outline that is not the shape (0 for a filled shape)."""
    a = np.asarray(picture.convert("RGB"), dtype=np.float64)
    bg = np.median(np.concatenate([a[:, :2], a[:, -2:]], axis=1), axis=1)
    m = np.abs(a - bg[:, None, :]).max(axis=2) > 40
    if m.sum() < 12:
        return 0.0
    outside = np.zeros_like(m)                    # background reachable from the picture's border
    outside[0], outside[-1], outside[:, 0], outside[:, -1] = ~m[0], ~m[-1], ~m[:, 0], ~m[:, -1]
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~m
        if (grown == outside).all():
            break
        outside = grown
    filled = ~outside
    return float((filled.sum() - m.sum()) / filled.sum())


def reads(family: str, pictures: list, detector) -> list[bool]:
    small = [p if p.size == (64, 64) else p.resize((64, 64), Image.BILINEAR) for p in pictures]
    if family == "striped":
        return [d.has_style for d in detector.detect(small)]
    if family in ("split", "shaded"):
        return [brighter_top(p) >= BRIGHTER for p in small]
    return [hole_share(p) >= HOLE for p in small]


def main(argv: list[str] | None = None) -> int:
    import torch

    from lib_sdtrain.models.checkpoint import load_checkpoint
    from lib_sdtrain.toy import bundled_model
    from lib_sdtrain.toy.detector import default_detector
    from lib_sdtrain.toy.evaluate import make_grid, roundtrip
    from lib_sdtrain.toy.stats import share

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="toy checkpoint (default: the bundled one)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--seed", type=int, default=78)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "bench/results/style_families.json"))
    p.add_argument("--grid", default=str(ROOT / "bench/results/style_families.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    model = Path(args.model) if args.model else bundled_model()
    vae = load_checkpoint(model).vae.eval()
    det = default_detector()
    scenes = world.sample_scenes(args.n, args.seed, holdout="include")
    t0 = time.monotonic()
    table: dict = {}
    rows = []
    for size in sizes:
        plain = world.render_scenes(scenes, size, args.seed)
        plain_rt = roundtrip(vae, plain)
        for family in FAMILIES:
            rng = world.make_rng(args.seed, 1)          # render_scenes' stream: the same jitter per scene
            clean = [paint(s, family, size, rng) for s in scenes]
            rt = roundtrip(vae, clean)
            kept = reads(family, rt, det)
            row = {"clean": share(reads(family, clean, det)).to_dict(), "round_trip": share(kept).to_dict()}
            for word in world.SIZE_NAMES:
                row[f"round_trip_{word}"] = share([k for k, s in zip(kept, scenes) if s.size == word]).to_dict()
            row["false_plain"] = share(reads(family, plain, det)).to_dict()
            row["false_plain_round_trip"] = share(reads(family, plain_rt, det)).to_dict()
            table.setdefault(str(size), {})[family] = row
            if size == sizes[0]:
                rows += [make_grid(clean[:16], columns=16), make_grid(rt[:16], columns=16)]

    def f(d: dict) -> str:
        return f"{d['value']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"

    print(f"round trips through {model.name}, n = {args.n} scenes per family and size ({time.monotonic() - t0:.0f} s)")
    print("| size | family | clean | round trip | small | large | false calls: plain / plain round trip |")
    print("|---|---|---|---|---|---|---|")
    for size, fams in table.items():
        for family, r in fams.items():
            print(f"| {size} | {family} | {f(r['clean'])} | **{f(r['round_trip'])}** | {r['round_trip_small']['value']:.2f} "
                  f"| {r['round_trip_large']['value']:.2f} | {r['false_plain']['value']:.3f} / "
                  f"{r['false_plain_round_trip']['value']:.3f} |")
    out = {"model": model.name, "n": args.n, "seed": args.seed, "families": list(FAMILIES), "table": table,
           "settings": {"pale": PALE, "ramp": RAMP, "rim": RIM, "brighter": BRIGHTER, "hole": HOLE}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    if rows and args.grid:
        w, h = rows[0].width, sum(r.height + 4 for r in rows)
        sheet = Image.new("RGB", (w, h), "white")
        y = 0
        for r in rows:
            sheet.paste(r, (0, y))
            y += r.height + 4
        sheet.save(args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
