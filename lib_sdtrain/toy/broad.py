"""A broad family of synthetic pictures for training the toy VAE, well beyond the captioned toy world.

A real SD VAE was trained on all kinds of pictures, so it keeps whatever a fine-tune later asks for. The toy
VAE only keeps what it saw: trained on the toy world alone it turns thin lines, outlines and textures into
blur. These pictures are uncaptioned and used for the VAE only (the UNet and text encoder learn the toy world).

Families (`FAMILIES`, drawn in equal shares by `iter_broad_pictures`):

- world       the plain toy world (`world.render`, base shapes, any attribute combination)
- silhouettes filled shapes beyond the world: regular polygons (3-8 sides), stars, diamonds, ellipses,
              crescents, rings, arrows, rounded boxes, random polygons; one to three per picture
- outlines    the same shapes drawn as outlines, 1-6 px lines (at 64 px)
- lines       straight lines, polylines and arcs of 1-6 px
- textures    stripes at any angle, checks, dots, grids, filling the picture or a shape
- scatter     many small objects (2-6 px dots and marks up to a quarter of the side)

Colours are the world palette (a third of the time) or anything else: dark, light, greyish, off-palette hues.
Backgrounds are flat, two-colour gradients at any angle, or a texture.

Held out on purpose (`HELD_OUT`), the honest test of "unseen": no picture here shows the subject's heart
silhouette. With `bands_held_out` (the v2 decoder's pictures) no texture inside a shape runs within 20 degrees
of horizontal either, so the zkz style (horizontal bands inside a shape) is never drawn. The v2.1 decoder
(bundled since session 8; lib_sdtrain/toy/data/README.md) was trained with `bands_held_out=False`: stripes inside
shapes at every angle, half the time in a colour and a pale tint of it, as any real picture collection has them;
the heart stays held out. The round-trip ceiling on a held-out concept measures how well the VAE keeps what it
never saw.

Deterministic: everything is drawn from the generator passed in.
"""

from __future__ import annotations

import colorsys
import math
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError
from . import world

FAMILIES: tuple[str, ...] = ("world", "silhouettes", "outlines", "lines", "textures", "scatter")
HELD_OUT: tuple[str, ...] = ("heart silhouette (the subject zwx)", "horizontal bands inside a shape (the style zkz)")
SILHOUETTES: tuple[str, ...] = ("polygon", "star", "diamond", "ellipse", "crescent", "ring", "arrow", "roundbox",
                                "random", "circle", "square", "triangle", "cross")
_SS = 4   # supersampling factor


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """The world palette a third of the time, else any colour: dark, light, grey-ish or off-palette."""
    r = float(rng.random())
    if r < 0.33:
        c = world.COLOURS[world.COLOUR_NAMES[int(rng.integers(len(world.COLOUR_NAMES)))]]
        g = float(rng.uniform(0.85, 1.1))
        return tuple(int(min(255, round(v * g))) for v in c)
    h = float(rng.random())
    if r < 0.5:       # dark
        s, v = float(rng.uniform(0, 1)), float(rng.uniform(0.0, 0.3))
    elif r < 0.67:    # light / pastel
        s, v = float(rng.uniform(0, 0.4)), float(rng.uniform(0.8, 1.0))
    else:             # anything
        s, v = float(rng.uniform(0, 1)), float(rng.uniform(0.2, 1.0))
    return tuple(int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v))


def _contrasting(rng: np.random.Generator, other: tuple[int, int, int]) -> tuple[int, int, int]:
    for _ in range(20):
        c = random_colour(rng)
        if sum(abs(a - b) for a, b in zip(c, other)) > 90:
            return c
    return tuple(255 - v for v in other)


def _silhouette(kind: str, cx: float, cy: float, half: float, rng: np.random.Generator
                ) -> tuple[str, list]:
    """("ellipse" | "polygon" | "ring" | "crescent", geometry) of one shape of bounding half-side `half`."""
    rot = float(rng.uniform(0, 2 * math.pi))
    if kind in ("circle", "square", "triangle", "cross"):
        return world._outline(kind, cx, cy, half)
    if kind == "polygon":
        n = int(rng.integers(3, 9))
        return "polygon", [(cx + half * math.cos(rot + 2 * math.pi * k / n),
                            cy + half * math.sin(rot + 2 * math.pi * k / n)) for k in range(n)]
    if kind == "star":
        n, inner = int(rng.integers(4, 9)), float(rng.uniform(0.35, 0.6))
        pts = []
        for k in range(2 * n):
            r = half if k % 2 == 0 else half * inner
            a = rot + math.pi * k / n
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return "polygon", pts
    if kind == "diamond":
        w = half * float(rng.uniform(0.5, 1.0))
        return "polygon", [(cx, cy - half), (cx + w, cy), (cx, cy + half), (cx - w, cy)]
    if kind == "ellipse":
        w, h = half * float(rng.uniform(0.4, 1.0)), half * float(rng.uniform(0.4, 1.0))
        return "ellipse", [(cx - w, cy - h), (cx + w, cy + h)]
    if kind == "crescent":
        off = half * float(rng.uniform(0.3, 0.7))
        a = rot
        return "crescent", [(cx, cy, half), (cx + off * math.cos(a), cy + off * math.sin(a), half * 0.9)]
    if kind == "ring":
        return "ring", [(cx, cy, half), (cx, cy, half * float(rng.uniform(0.35, 0.75)))]
    if kind == "arrow":
        s = half
        base = [(-s, -0.3 * s), (0.1 * s, -0.3 * s), (0.1 * s, -0.8 * s), (s, 0), (0.1 * s, 0.8 * s),
                (0.1 * s, 0.3 * s), (-s, 0.3 * s)]
        c, si = math.cos(rot), math.sin(rot)
        return "polygon", [(cx + x * c - y * si, cy + x * si + y * c) for x, y in base]
    if kind == "roundbox":
        w, h = half * float(rng.uniform(0.5, 1.0)), half * float(rng.uniform(0.5, 1.0))
        return "roundbox", [(cx - w, cy - h, cx + w, cy + h), min(w, h) * float(rng.uniform(0.2, 0.6))]
    if kind == "random":
        n = int(rng.integers(5, 10))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = rng.uniform(0.4, 1.0, n) * half
        return "polygon", [(cx + float(r) * math.cos(float(a)), cy + float(r) * math.sin(float(a)))
                           for a, r in zip(angles, radii)]
    raise UserError(f"unknown silhouette {kind!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, geom: tuple[str, list], fill=None, outline=None, width: int = 0,
                bg=None) -> None:
    kind, g = geom
    if kind == "polygon":
        if fill is not None:
            draw.polygon(g, fill=fill)
        if outline is not None:
            draw.line(g + [g[0]], fill=outline, width=width, joint="curve")
    elif kind == "ellipse":
        draw.ellipse(g, fill=fill, outline=outline, width=width if outline is not None else 0)
    elif kind == "roundbox":
        draw.rounded_rectangle(g[0], radius=g[1], fill=fill, outline=outline,
                               width=width if outline is not None else 0)
    elif kind in ("ring", "crescent"):
        (x0, y0, r0), (x1, y1, r1) = g
        if fill is not None:
            draw.ellipse([x0 - r0, y0 - r0, x0 + r0, y0 + r0], fill=fill)
            draw.ellipse([x1 - r1, y1 - r1, x1 + r1, y1 + r1], fill=bg)
        if outline is not None:
            draw.ellipse([x0 - r0, y0 - r0, x0 + r0, y0 + r0], outline=outline, width=width)
            draw.ellipse([x1 - r1, y1 - r1, x1 + r1, y1 + r1], outline=outline, width=width)


def _background(rng: np.random.Generator, big: int) -> tuple[Image.Image, tuple[int, int, int]]:
    """A flat, gradient or (a fifth of the time) textured background; also returns its mean-ish colour."""
    r = float(rng.random())
    a = random_colour(rng)
    if r < 0.45:
        return Image.new("RGB", (big, big), a), a
    if r < 0.8:
        b = random_colour(rng)
        ang = float(rng.uniform(0, 2 * math.pi))
        ys, xs = np.mgrid[0:big, 0:big] / big - 0.5
        t = np.clip(xs * math.cos(ang) + ys * math.sin(ang) + 0.5, 0, 1)[..., None]
        arr = np.asarray(a, np.float64) * (1 - t) + np.asarray(b, np.float64) * t
        return Image.fromarray(np.round(arr).astype(np.uint8)), tuple(int((x + y) / 2) for x, y in zip(a, b))
    return _texture(rng, big, a, _contrasting(rng, a), horizontal_ok=True), a


TEXTURES: tuple[str, ...] = ("stripes", "checks", "dots", "grid")


def _texture(rng: np.random.Generator, big: int, a, b, *, horizontal_ok: bool, kind: str | None = None
             ) -> Image.Image:
    """Stripes (any angle; not near-horizontal unless `horizontal_ok`), checks, dots or a grid of a and b; `kind`
    None draws which from `rng`."""
    if kind is None:
        kind = TEXTURES[int(rng.integers(4))]
    ys, xs = np.mgrid[0:big, 0:big].astype(np.float64) / _SS
    period = float(rng.uniform(3, 16))              # in final pixels
    if kind == "stripes":
        if horizontal_ok:
            ang = float(rng.uniform(0, math.pi))
        else:
            # u grows along `ang`, so bands run across it: ang near 90 degrees gives horizontal bands
            ang = float(rng.uniform(math.radians(-70), math.radians(70)))
        u = xs * math.cos(ang) + ys * math.sin(ang)
        duty = float(rng.uniform(0.25, 0.75))
        m = (u / period) % 1.0 < duty
    elif kind == "checks":
        ang = float(rng.uniform(0, math.pi / 2))
        u = xs * math.cos(ang) + ys * math.sin(ang)
        v = -xs * math.sin(ang) + ys * math.cos(ang)
        m = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    elif kind == "dots":
        rad = period * float(rng.uniform(0.15, 0.4))
        ox, oy = float(rng.uniform(0, period)), float(rng.uniform(0, period))
        du = (xs + ox) % period - period / 2
        dv = (ys + oy) % period - period / 2
        m = du ** 2 + dv ** 2 < rad ** 2
    else:
        w = float(rng.uniform(0.8, 3))
        m = ((xs % period) < w) | ((ys % period) < w)
    arr = np.where(m[..., None], np.asarray(b, np.uint8), np.asarray(a, np.uint8))
    return Image.fromarray(arr.astype(np.uint8))


def textured_scene(scene: world.Scene, size: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """`scene` (a plain base shape) with its shape filled by a texture of its colour and a pale tint or a dark
    shade of it, and the texture's word: slanted stripes (never within 20 degrees of horizontal, so never the zkz
    style's bands), checks, dots or a grid. The pretraining trial `textured_share` captions such pictures
    "a large red checked circle ...", so that a base UNet learns to draw textures inside shapes, as real base
    models can, while the zkz style stays unseen."""
    picture, mask = world.render_with_mask(scene, size, rng)
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    a = world.COLOURS[scene.colour]
    b = _pale(a, rng) if rng.random() < 0.5 else tuple(round(v * float(rng.uniform(0.3, 0.55))) for v in a)
    fill = _texture(rng, size * _SS, a, b, horizontal_ok=False, kind=kind).reduce(_SS)
    picture.paste(fill, (0, 0), mask)
    return picture, TEXTURE_WORDS[kind]


TEXTURE_WORDS = {"stripes": "slanted", "checks": "checked", "dots": "dotted", "grid": "gridded"}


def _pale(c: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """A pale tint of `c` (mixed 55-80 % towards white), as the zkz style pairs a colour with."""
    t = float(rng.uniform(0.55, 0.8))
    return tuple(int(round(v + (255 - v) * t)) for v in c)


def render_broad(family: str, size: int = 64, rng: np.random.Generator | None = None, *,
                 bands_held_out: bool = True) -> Image.Image:
    """One picture of `family` (see `FAMILIES`), `size` x `size` RGB.

    `bands_held_out`: no texture inside a shape runs near horizontal (the v2 decoder's pictures); False lets
    them run at every angle and pairs a colour with its pale tint half the time (v2.1)."""
    world.check_size(size)
    rng = rng if rng is not None else np.random.default_rng(0)
    if family == "world":
        return world.render(world.random_scene(rng), size, rng)
    if family not in FAMILIES:
        raise UserError(f"unknown picture family {family!r}; choose one of {', '.join(FAMILIES)}")
    big = size * _SS
    canvas, bg = _background(rng, big)
    draw = ImageDraw.Draw(canvas)

    def place(lo: float, hi: float) -> tuple[float, float, float]:
        half = float(rng.uniform(lo, hi)) * big / 2
        cx = float(rng.uniform(half * 0.6, big - half * 0.6))
        cy = float(rng.uniform(half * 0.6, big - half * 0.6))
        return cx, cy, half

    def kind() -> str:
        return SILHOUETTES[int(rng.integers(len(SILHOUETTES)))]

    if family == "silhouettes":
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, half = place(0.12, 0.9)
            _draw_shape(draw, _silhouette(kind(), cx, cy, half, rng), fill=_contrasting(rng, bg), bg=bg)
    elif family == "outlines":
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, half = place(0.2, 0.9)
            width = int(rng.integers(1, 7)) * _SS
            fill = _contrasting(rng, bg) if rng.random() < 0.3 else None
            _draw_shape(draw, _silhouette(kind(), cx, cy, half, rng), fill=fill, outline=_contrasting(rng, bg),
                        width=width, bg=bg)
    elif family == "lines":
        for _ in range(int(rng.integers(1, 6))):
            colour, width = _contrasting(rng, bg), int(rng.integers(1, 7)) * _SS
            r = float(rng.random())
            if r < 0.5:
                pts = [tuple(float(v) for v in rng.uniform(0, big, 2)) for _ in range(int(rng.integers(2, 5)))]
                draw.line(pts, fill=colour, width=width, joint="curve")
            else:
                cx, cy, half = place(0.2, 1.0)
                a0 = float(rng.uniform(0, 360))
                draw.arc([cx - half, cy - half, cx + half, cy + half], a0, a0 + float(rng.uniform(60, 300)),
                         fill=colour, width=width)
    elif family == "textures":
        a, b = random_colour(rng), None
        b = _contrasting(rng, a)
        if rng.random() < 0.4:
            canvas = _texture(rng, big, a, b, horizontal_ok=True)
        else:
            cx, cy, half = place(0.3, 0.95)
            mask = Image.new("L", (big, big), 0)
            _draw_shape(ImageDraw.Draw(mask), _silhouette(kind(), cx, cy, half, rng), fill=255, bg=0)
            if not bands_held_out and rng.random() < 0.5:
                b = _pale(a, rng)
            canvas.paste(_texture(rng, big, a, b, horizontal_ok=not bands_held_out), (0, 0), mask)
    else:  # scatter
        for _ in range(int(rng.integers(3, 16))):
            cx, cy, half = place(0.04, 0.25)
            _draw_shape(draw, _silhouette(kind(), cx, cy, half, rng), fill=_contrasting(rng, bg), bg=bg)
    return canvas.reduce(_SS)


def iter_broad_pictures(seed: int = 0, size: int = 64, families: tuple[str, ...] = FAMILIES, *,
                        bands_held_out: bool = True) -> Iterator[Image.Image]:
    """Endless VAE training pictures, each family of `families` equally likely (a family named twice is drawn
    twice as often); deterministic in `seed`. `bands_held_out`: see `render_broad`."""
    for f in families:
        if f not in FAMILIES:
            raise UserError(f"unknown picture family {f!r}; choose from {', '.join(FAMILIES)}")
    world.check_size(size)
    rng = world.make_rng(seed, 30)
    while True:
        yield render_broad(families[int(rng.integers(len(families)))], size, rng, bands_held_out=bands_held_out)
