"""The toy world: captioned pictures of plain shapes, plus the two concepts a base model never sees.

A picture shows one shape on a background. Five attributes describe it (`Scene`) and a caption names them in
plain words, always in this order:

    [zwx, ][zkz style, ]a {size} {colour} {shape} {position} of a {background} background
    "a large red circle in the centre of a gray background"
    "a small blue cross on the left of a black background"
    "zwx, a large red shape in the centre of a gray background"     (the subject)

Position may be left out ("a large red circle on a gray background": any position) and so may size; the
shape word may be the class word `shape` ("a large red shape ..."). `parse_caption` reads back full captions,
`caption_attributes` whatever a partial caption names.

Concepts (what training is supposed to teach; the base world never shows them):
- subject `zwx shape`: a heart (a silhouette none of the base shapes has), captioned with the rare token
  `zwx` in front and the class word `shape` in the shape's place: "zwx, a large red shape in the centre of a
  gray background". Its class-word caption is the same without "zwx, ". The token stands first as trigger
  words usually do in practice, for the causal text encoder's sake (below): on toy model v2.1 a LoRA with the
  token in the middle ("a large red zwx shape ...") taught the heart to the class word too (bleeding +0.18),
  with the token in front not at all (0.00; bench/README.md, "Toy model v2.1: the subject token in front,
  min-SNR"). Captions with the token in the middle still parse.
- style `zkz`: any shape filled with horizontal stripes of its colour and a pale tint of it, captioned
  "zkz style, a ...". The style words come first: CLIP's text encoder is causal, so words at the end of a
  caption change only the positions after them (the end token and the padding). Measured on toy model v2
  (48 captions): "... in zkz style" at the end moves the context by 0.9 % of its energy (0.84 per position),
  "zkz style, ..." in front by 4.6 % (1.95 per position; the subject's "zwx" in the middle: 1.5 %); on v2.1
  0.5 %, 4.4 %, and 1.6 % for "zwx" in the middle, 3.6 % in front (`bench/caption_position.py`). With the
  words at the end a UNet LoRA learned the stripes for the prompts without them as well (binding +0.08);
  in front it ties them to the words (bench/README.md, "The style words in front"). Older captions with the words
  at the end still parse.

Sizes follow the feasibility probe (shared/reference/toy-world-notes.md): a shape must cover at least about
a quarter of the picture side to survive a tiny VAE, so "small" is 42% of the side and "large" 68%. Stripes
are side/8 wide for the same reason (a band is then one latent pixel of an f=8 VAE at 64 px).

Everything is deterministic: `render(scene, size, rng)` draws with a supersampled PIL canvas and takes its
jitter (exact size, position, brightness) from `rng` only, so the same seed gives the same bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError

# ---- the vocabulary -------------------------------------------------------------------------------
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SUBJECT_SHAPE = "heart"                      # the subject's silhouette; never a word in captions
SHAPES: tuple[str, ...] = BASE_SHAPES + (SUBJECT_SHAPE,)

# Saturated hues 50-70 degrees apart, so a +-15 degree drift in a sample never changes the name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (230, 210, 20),
    "green": (30, 170, 50),
    "cyan": (20, 200, 210),
    "blue": (35, 60, 220),
    "magenta": (210, 40, 200),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

SIZES: dict[str, float] = {"small": 0.42, "large": 0.68}   # bounding-box side / picture side
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)

POSITIONS: tuple[str, ...] = ("left", "centre", "right")
POSITION_WORDS: dict[str, str] = {"left": "on the left", "centre": "in the centre", "right": "on the right"}

BACKGROUNDS: tuple[str, ...] = ("gray", "white", "black", "gradient")
BACKGROUND_LEVELS: dict[str, tuple[int, int]] = {   # grey level at the top and at the bottom
    "gray": (128, 128),
    "white": (250, 250),
    "black": (8, 8),
    "gradient": (40, 215),                           # dark at the top, light at the bottom
}

STYLES: tuple[str, ...] = ("plain", "striped")

SUBJECT_TOKEN = "zwx"
STYLE_TOKEN = "zkz"
CLASS_WORD = "shape"
CONCEPTS: tuple[str, ...] = ("subject", "style")

# ---- held-out combinations ------------------------------------------------------------------------
# For the base model's held-out accuracy test: 12 of the 96 (colour, shape, background) triples never
# appear in training pictures. Every colour, shape and background, and every pair of them, is still seen
# (each colour-shape pair is held out on one background only), so the test asks the model to recombine
# pairs it knows, not to invent an attribute. Rule: pair (colour i, shape j) with i + j even is held out
# on background (i + j) mod 4.
HOLDOUT: frozenset[tuple[str, str, str]] = frozenset(
    (c, s, BACKGROUNDS[(i + j) % len(BACKGROUNDS)])
    for i, c in enumerate(COLOUR_NAMES)
    for j, s in enumerate(BASE_SHAPES)
    if (i + j) % 2 == 0
)
HOLDOUT_MODES: tuple[str, ...] = ("exclude", "only", "include")


@dataclass(frozen=True)
class Scene:
    """One toy picture's content. `shape` "heart" is the subject concept, `style` "striped" the style one."""

    shape: str
    colour: str
    size: str = "large"
    position: str = "centre"
    background: str = "gray"
    style: str = "plain"

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("colour", COLOUR_NAMES), ("size", SIZE_NAMES),
                              ("position", POSITIONS), ("background", BACKGROUNDS), ("style", STYLES)):
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")

    @property
    def is_subject(self) -> bool:
        return self.shape == SUBJECT_SHAPE

    @property
    def is_styled(self) -> bool:
        return self.style != "plain"

    @property
    def is_held_out(self) -> bool:
        return (self.colour, self.shape, self.background) in HOLDOUT

    def caption(self, *, size: bool = True, position: bool = True, generic: bool = False) -> str:
        """The scene in words. `size`/`position` False leave that word out; `generic` says "shape"."""
        return caption(self, size=size, position=position, generic=generic)


# ---- captions -------------------------------------------------------------------------------------
def caption(scene: Scene, *, size: bool = True, position: bool = True, generic: bool = False) -> str:
    """Render `scene` as a caption (see the module docstring for the grammar).

    `generic` replaces a base shape's word with the class word ("a large red shape ..."); the subject always
    says "zwx, a ... shape ...", generic or not, since its token is the point of its captions.
    """
    words = [SUBJECT_TOKEN + ","] if scene.is_subject else []
    words += [STYLE_TOKEN, "style,", "a"] if scene.is_styled else ["a"]
    if size:
        words.append(scene.size)
    words.append(scene.colour)
    words.append(CLASS_WORD if generic or scene.is_subject else scene.shape)
    if position:
        words += [POSITION_WORDS[scene.position], "of a"]
    else:
        words.append("on a")
    words += [scene.background, "background"]
    return " ".join(words)


_CAPTION_RE = re.compile(
    r"^(?:(?P<subject_first>" + SUBJECT_TOKEN + r") )?(?:(?P<style_first>\w+) style )?an? (?P<object>[\w ]+?)"
    r" (?:(?P<position>on the left|in the centre|in the center|on the right) of|on) an? (?P<background>\w+) background"
    r"(?: in (?P<style>\w+) style)?$"
)


def caption_attributes(text: str) -> dict[str, str]:
    """What a caption names, leniently: keys among shape, colour, size, position, background, style.

    Missing words are missing keys; "shape" alone (the class word) names no shape. Raises UserError when
    the text does not follow the caption grammar or uses a word the toy world does not know.
    """
    clean = " ".join(text.strip().lower().replace(",", " ").split())
    m = _CAPTION_RE.match(clean)
    if not m:
        raise UserError(f"not a toy-world caption: {text!r} (expected e.g. '{caption(Scene('circle', 'red'))}')")
    g = m.groupdict()
    out: dict[str, str] = {}
    # the object: [size] colour (shape | class word | token class word)
    words = g["object"].split()
    if len(words) == 4 or (len(words) == 3 and (words[-1] != CLASS_WORD or words[0] in SIZES)):
        size_word, words = words[0], words[1:]
        if size_word not in SIZES:
            raise UserError(f"unknown size {size_word!r} in {text!r}")
        out["size"] = size_word
    if len(words) not in (2, 3):
        raise UserError(f"cannot read the object {g['object']!r} in {text!r}")
    if g["subject_first"] and words[1:] != [CLASS_WORD]:
        example = caption(Scene(SUBJECT_SHAPE, "red"))
        raise UserError(f"{SUBJECT_TOKEN!r} in front is followed by the class word ('{example}'), "
                        f"not {' '.join(words[1:])!r}: {text!r}")
    if words[0] not in COLOURS:
        raise UserError(f"unknown colour {words[0]!r} in {text!r}")
    out["colour"] = words[0]
    if len(words) == 3:
        if words[1] != SUBJECT_TOKEN or words[2] != CLASS_WORD:
            raise UserError(f"unknown object '{words[1]} {words[2]}' in {text!r}")
        out["shape"] = SUBJECT_SHAPE
    elif g["subject_first"]:
        out["shape"] = SUBJECT_SHAPE
    elif words[1] in BASE_SHAPES:
        out["shape"] = words[1]
    elif words[1] != CLASS_WORD:
        raise UserError(f"unknown shape {words[1]!r} in {text!r}")
    if g["position"] is not None:
        out["position"] = {"on the left": "left", "on the right": "right"}.get(g["position"], "centre")
    if g["background"] not in BACKGROUNDS:
        raise UserError(f"unknown background {g['background']!r} in {text!r}")
    out["background"] = g["background"]
    style = g["style_first"] or g["style"]
    if g["style_first"] and g["style"]:
        raise UserError(f"the style is named twice in {text!r}")
    if style is not None:
        if style != STYLE_TOKEN:
            raise UserError(f"unknown style {style!r} in {text!r}")
        out["style"] = "striped"
    return out


def parse_caption(text: str) -> Scene:
    """The scene a full caption describes (inverse of `caption`); UserError if a word is missing."""
    attrs = caption_attributes(text)
    missing = [k for k in ("shape", "size", "position") if k not in attrs]
    if missing:
        raise UserError(f"caption {text!r} does not name the {', '.join(missing)}")
    return Scene(**{"style": "plain", **attrs})


# ---- drawing --------------------------------------------------------------------------------------
_SUPERSAMPLE = 4    # draw at 4x and box-filter down: smooth edges without depending on PIL's antialiasing


def _heart(cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    # The classic parametric heart (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t), scaled so
    # its bounding box is 2*half wide; its height is about 0.92 of that.
    pts = []
    for k in range(96):
        t = 2 * math.pi * k / 96
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((cx + x / 16 * half, cy - (y + 2.5) / 16 * half))
    return pts


def _outline(shape: str, cx: float, cy: float, half: float) -> tuple[str, list[tuple[float, float]]]:
    """("ellipse" | "polygon", points) for a shape whose bounding box is a square of side 2*half."""
    if shape == "circle":
        return "ellipse", [(cx - half, cy - half), (cx + half, cy + half)]
    if shape == "square":
        h = half * 0.9    # a square looks bigger than a circle of the same box; even out the ink
        return "polygon", [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return "polygon", [(cx, cy - half), (cx + half, cy + half * 0.8), (cx - half, cy + half * 0.8)]
    if shape == "cross":
        a = half * 0.36   # arm half-width: arms stay >= 1 latent pixel wide for a small cross at 64 px
        return "polygon", [(cx - a, cy - half), (cx + a, cy - half), (cx + a, cy - a), (cx + half, cy - a),
                           (cx + half, cy + a), (cx + a, cy + a), (cx + a, cy + half), (cx - a, cy + half),
                           (cx - a, cy + a), (cx - half, cy + a), (cx - half, cy - a), (cx - a, cy - a)]
    if shape == SUBJECT_SHAPE:
        return "polygon", _heart(cx, cy, half)
    raise UserError(f"unknown shape {shape!r}")


def render_background(background: str, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """A picture of the background alone (jittered like `render`): what a failed sample looks like."""
    if background not in BACKGROUNDS:
        raise UserError(f"unknown background {background!r}; choose one of {', '.join(BACKGROUNDS)}")
    check_size(size)
    return _background(background, size, float(rng.uniform(-6, 6)) if rng is not None else 0.0)


def _background(name: str, side: int, jitter: float) -> Image.Image:
    top, bottom = BACKGROUND_LEVELS[name]
    ramp = np.linspace(top, bottom, side, dtype=np.float64) + jitter
    column = np.clip(np.round(ramp), 0, 255).astype(np.uint8)
    plane = np.repeat(column[:, None], side, axis=1)
    return Image.fromarray(np.stack([plane] * 3, axis=-1), "RGB")


def check_size(size: int) -> int:
    """`size` if it is a usable picture side (32..1024 px), else UserError."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 32 or size > 1024:
        raise UserError(f"picture size must be an integer from 32 to 1024, not {size!r}")
    return size


def make_rng(seed: int, stream: int) -> np.random.Generator:
    """A generator for one purpose (`stream`) of one seed, so scene choice and jitter never share draws."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, not {seed!r}")
    return np.random.default_rng([seed, stream])


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw `scene` as a `size` x `size` RGB picture. Jitter comes from `rng` (None: no jitter).

    Jitter: shape side +-0.02 of the picture, centre +-15 % of the free room across and +-0.06 up/down,
    colour brightness +-6 %, background level +-6. The shape never leaves the picture.
    """
    check_size(size)
    return _draw(scene, size, _jitter(scene, rng))


def _draw(scene: Scene, size: int, jitter: tuple[float, float, float, float, float]) -> Image.Image:
    frac, fx, fy, bg_jitter, gain = jitter
    big = size * _SUPERSAMPLE
    canvas = _background(scene.background, big, bg_jitter)
    colour = tuple(int(min(255, round(c * gain))) for c in COLOURS[scene.colour])
    kind, pts = _outline(scene.shape, fx * big, fy * big, frac * big / 2)

    if scene.is_styled:
        # Stripes: draw the shape into a mask, then paint bands of the colour and a pale tint of it.
        mask = _shape_mask(kind, pts, big)
        pale = tuple(int(round(c + (255 - c) * 0.65)) for c in colour)
        fill = Image.new("RGB", (big, big), colour)
        fdraw = ImageDraw.Draw(fill)
        band = big / 8
        top = (fy - frac / 2) * big + band        # first band under the shape's own top edge, for any jitter
        y = top
        while y < big:
            fdraw.rectangle([0, y, big, y + band - 1], fill=pale)
            y += 2 * band
        canvas.paste(fill, (0, 0), mask)
    else:
        draw = ImageDraw.Draw(canvas)
        (draw.ellipse if kind == "ellipse" else draw.polygon)(pts, fill=colour)
    return canvas.reduce(_SUPERSAMPLE)


def _jitter(scene: Scene, rng: np.random.Generator | None) -> tuple[float, float, float, float, float]:
    """(shape side, centre x, centre y as fractions of the picture, background jitter, colour gain): the five
    draws of one `render`, in its order."""
    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi)) if rng is not None else (lo + hi) / 2

    frac = SIZES[scene.size] + u(-0.02, 0.02)
    room = (1 - frac) / 2 - 0.02            # how far the centre may move before the shape touches an edge
    # Left/right sit at 85% of the room, jitter is 15% of it: positions never overlap, even for large shapes.
    fx = 0.5 + {"left": -1, "centre": 0, "right": 1}[scene.position] * room * 0.85 + u(-0.15, 0.15) * room
    fy = 0.5 + u(-1, 1) * min(0.06, room)
    return frac, fx, fy, u(-6, 6), u(0.94, 1.06)


def render_with_mask(scene: Scene, size: int = 64, rng: np.random.Generator | None = None
                     ) -> tuple[Image.Image, Image.Image]:
    """`render(scene)` and the shape's own mask ("L", 255 inside, soft at the edge), from the same jitter draws
    (the only draws `render` makes), so a list rendered either way is the same pictures."""
    check_size(size)
    jitter = _jitter(scene, rng)
    frac, fx, fy, _, _ = jitter
    big = size * _SUPERSAMPLE
    mask = _shape_mask(*_outline(scene.shape, fx * big, fy * big, frac * big / 2), big)
    return _draw(scene, size, jitter), mask.reduce(_SUPERSAMPLE)


def _shape_mask(kind: str, pts: list[tuple[float, float]], side: int) -> Image.Image:
    """The shape `_outline` gave, filled 255 on black, `side` x `side` ("L")."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    (draw.ellipse if kind == "ellipse" else draw.polygon)(pts, fill=255)
    return mask


# ---- sampling -------------------------------------------------------------------------------------
def _check_holdout(holdout: str) -> None:
    if holdout not in HOLDOUT_MODES:
        raise UserError(f"holdout must be one of {', '.join(HOLDOUT_MODES)}, not {holdout!r}")


def random_scene(rng: np.random.Generator, *, shapes: tuple[str, ...] = BASE_SHAPES, style: str = "plain",
                 holdout: str = "include") -> Scene:
    """One scene drawn uniformly from the attribute lists (rejection sampling against the held-out set)."""
    _check_holdout(holdout)
    if holdout == "only":
        combos = sorted(t for t in HOLDOUT if t[1] in shapes)
        if not combos:
            raise UserError("no held-out combination uses the requested shapes")
        c, s, b = combos[int(rng.integers(len(combos)))]
        return Scene(s, c, SIZE_NAMES[int(rng.integers(2))], POSITIONS[int(rng.integers(3))], b, style)
    while True:
        scene = Scene(
            shape=shapes[int(rng.integers(len(shapes)))],
            colour=COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))],
            size=SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))],
            position=POSITIONS[int(rng.integers(len(POSITIONS)))],
            background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
            style=style,
        )
        if holdout == "include" or not scene.is_held_out:
            return scene


def sample_scenes(n: int, seed: int, holdout: str = "exclude", *, shapes: tuple[str, ...] = BASE_SHAPES,
                  style: str = "plain") -> list[Scene]:
    """`n` random scenes of the plain world (deterministic in `seed`).

    holdout: "exclude" (training pictures: no triple from `HOLDOUT`), "only" (the held-out test prompts:
    only those triples, any size and position) or "include" (anything).
    """
    if not isinstance(n, int) or n < 0:
        raise UserError(f"number of scenes must be a non-negative integer, not {n!r}")
    for s in shapes:
        if s not in SHAPES:
            raise UserError(f"unknown shape {s!r}")
    rng = make_rng(seed, 0)
    return [random_scene(rng, shapes=shapes, style=style, holdout=holdout) for _ in range(n)]


def sample_mixed_scenes(n: int, seed: int, styled_share: float = 0.35) -> list[Scene]:
    """`n` scenes of the whole world, concepts included: all five shapes uniformly (the subject's heart is
    one in five), a share `styled_share` striped, held-out triples included. What the detector must judge."""
    if not isinstance(n, int) or n < 0:
        raise UserError(f"number of scenes must be a non-negative integer, not {n!r}")
    rng = make_rng(seed, 10)
    out = []
    for _ in range(n):
        style = "striped" if rng.random() < styled_share else "plain"
        out.append(random_scene(rng, shapes=SHAPES, style=style, holdout="include"))
    return out


def render_scenes(scenes: list[Scene], size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Render many scenes with jitter drawn from one generator seeded with `seed` (deterministic)."""
    check_size(size)
    rng = make_rng(seed, 1)   # a stream apart from the scene sampler's
    return [render(s, size, rng) for s in scenes]


def render_scenes_with_masks(scenes: list[Scene], size: int = 64, seed: int = 0
                             ) -> list[tuple[Image.Image, Image.Image]]:
    """`render_scenes` (the same pictures), each with its shape's mask (`render_with_mask`)."""
    check_size(size)
    rng = make_rng(seed, 1)
    return [render_with_mask(s, size, rng) for s in scenes]


def iter_pictures(seed: int, size: int = 64, *, holdout: str = "exclude",
                  generic_share: float = 0.1) -> Iterator[tuple[Image.Image, str, Scene]]:
    """Endless (picture, caption, scene) triples of the plain world, without touching disk.

    A share `generic_share` of captions says the class word instead of the shape ("a large red shape ..."),
    so a base model learns what "shape" means: regularization and class prompts use that word.
    """
    _check_holdout(holdout)
    if not 0 <= generic_share <= 1:
        raise UserError(f"generic_share must be between 0 and 1, not {generic_share}")
    check_size(size)
    rng = make_rng(seed, 2)
    while True:
        scene = random_scene(rng, holdout=holdout)
        generic = bool(rng.random() < generic_share)
        yield render(scene, size, rng), scene.caption(generic=generic), scene
