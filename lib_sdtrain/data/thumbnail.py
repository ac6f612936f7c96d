"""The 64×64 thumbnail `scan` makes of every picture, and what is measured from it once, during the scan.

- `Fingerprint` (`fingerprint_from_small`): the perceptual hashes and colour structure `dedupe` compares (its
  docstring explains the method: pHash of 10 views, dHash, low-frequency RGB DCT).
- `PictureStats` (`stats_from_small`): border colour, brightness and colourfulness, for `features`.
- `eight_bit_grey`: 16-bit, 32-bit and float grey scaled to 8 bits, as training, the thumbnail and the masks
  read them (PIL's own conversion clips them at 255).

Kept apart from `dedupe`, `features` and `scan` so that all three can use it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

THUMB = 64           # thumbnail side the hashes (and features' colour statistics) are computed from
CROP = 0.065         # share cut off for the cropped views
LOW = 8              # low-frequency block per channel for the colour correlation


@dataclass(frozen=True, eq=False)
class Fingerprint:
    """What dedupe needs of one picture (picklable; ~4 KB)."""

    bits: tuple[int, ...]     # dHash, then pHash of the full view and of the 9 cropped views
    colour: np.ndarray        # float16 [10, 3·(LOW²−1)]: unit-norm low-frequency RGB DCT (no DC) per view

    @property
    def dhash(self) -> int:
        return self.bits[0]

    @property
    def phash(self) -> int:
        return self.bits[1]


def _box_weights(n_out: int, lo: float, hi: float, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights of a box filter resampling the span [lo, hi) of n_in pixels (fractional edges)."""
    m = np.zeros((n_out, n_in))
    scale = (hi - lo) / n_out
    for o in range(n_out):
        a, b = lo + o * scale, lo + (o + 1) * scale
        for i in range(int(np.floor(a)), min(n_in, int(np.ceil(b)))):
            m[o, i] = max(0.0, min(b, i + 1) - max(a, i))
    return m / m.sum(axis=1, keepdims=True)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m  # orthonormal DCT-II: D = M @ X @ M.T


def _views() -> tuple[np.ndarray, np.ndarray]:
    """Left [10, 8, 64] and right [10, 64, 8] matrices: crop-and-resize to 32×32 folded with the DCT, low corner.

    `left[v] @ channel @ right[v]` is the 8×8 lowest-frequency block of view v's 32×32 DCT.
    """
    c = THUMB * CROP
    # Spans along one axis: whole, cut at the end, cut at the start, cut at both ends (half each).
    span = {"all": (0.0, THUMB), "head": (0.0, THUMB - c), "tail": (c, THUMB), "mid": (c / 2, THUMB - c / 2)}
    layout = [("all", "all"), ("mid", "mid"), ("head", "all"), ("tail", "all"), ("all", "head"), ("all", "tail"),
              ("head", "head"), ("head", "tail"), ("tail", "head"), ("tail", "tail")]
    dct = _dct_matrix(32)[:LOW]                                               # [8, 32]
    left = np.stack([dct @ _box_weights(32, *span[rows], THUMB) for rows, _ in layout])
    right = np.stack([_box_weights(32, *span[cols], THUMB).T @ dct.T for _, cols in layout])
    return left, right


_LEFT, _RIGHT = _views()
_LEFT_ALL = _LEFT.reshape(-1, THUMB)                          # [80, 64]: all views' rows, one matmul
_RIGHT_ALL = _RIGHT.transpose(1, 0, 2).reshape(THUMB, -1)     # [64, 80]
_NV = len(_LEFT)
_ROWS8 = _box_weights(8, 0.0, THUMB, THUMB)         # [8, 64]  dHash rows
_COLS9 = _box_weights(9, 0.0, THUMB, THUMB).T       # [64, 9]  dHash columns
_GREY = np.array([0.299, 0.587, 0.114])


def is_deep_grey(mode: str) -> bool:
    """16-bit or 32-bit integer grey, or float grey: modes whose values PIL's own conversion to "L" or "RGB" clips
    at 255 instead of scaling (a 16-bit mid-grey of 32768 becomes white)."""
    return mode.startswith("I;16") or mode in ("I", "F")


def eight_bit_grey(im: Image.Image) -> Image.Image:
    """A deep-grey picture (`is_deep_grey`) as 8-bit "L", scaled from its own range: 16-bit (and 32-bit integer
    grey holding values above 255, as older Pillow opens 16-bit PNGs) from 0-65535, float grey from 0-1 when it
    stays within it; any other picture is returned as it is."""
    if not is_deep_grey(im.mode):
        return im
    from PIL import Image

    arr = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        top = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
    else:
        top = 65535.0 if im.mode.startswith("I;16") or (arr.size and arr.max() > 255) else 255.0
    return Image.fromarray(np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8), "L")


def small_rgb(im: Image.Image, size: int = THUMB) -> np.ndarray:
    """A size×size RGB thumbnail as uint8 [size, size, 3], box-filtered (the aspect ratio is not kept)."""
    from PIL import Image

    im = eight_bit_grey(im)          # 16-bit grey scaled as training reads it (PIL's conversion clips it to white)
    if im.mode not in ("RGB", "L", "RGBA", "LA"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode in ("PA", "RGBa", "La") else "RGB")
    small = im.resize((size, size), Image.Resampling.BOX, reducing_gap=3.0)
    return np.asarray(small.convert("RGB"), dtype=np.uint8)


def fingerprint_from_small(small: np.ndarray) -> Fingerprint:
    """Hashes and colour structure from a 64×64 `small_rgb` thumbnail."""
    if small.shape[:2] != (THUMB, THUMB):
        raise ValueError(f"expected a {THUMB}×{THUMB} thumbnail, got {small.shape}")
    rgb = small.astype(np.float64)
    grey = rgb @ _GREY                                                        # [64, 64]
    g98 = _ROWS8 @ grey @ _COLS9                                              # [8, 9]
    planes = np.concatenate([grey[None], rgb.transpose(2, 0, 1)])             # [4, 64, 64]: grey, R, G, B
    # Every view of every plane in two matmuls; view v is the diagonal block (v, v) of the result.
    full = (_LEFT_ALL @ planes @ _RIGHT_ALL).reshape(4, _NV, LOW, _NV, LOW)    # [4, 10, 8, 10, 8]
    idx = np.arange(_NV)
    low = full[:, idx, :, idx, :]                                             # [10 views, 4, 8, 8]
    flat = low.reshape(_NV, 4, LOW * LOW)
    srt = np.sort(flat[:, 0], axis=1)
    med = (srt[:, 31:32] + srt[:, 32:33]) / 2                                 # median of the 64 coefficients
    bits = np.concatenate([(g98[:, 1:] > g98[:, :-1]).reshape(1, 64), flat[:, 0] > med])   # [11, 64]
    words = np.packbits(bits, axis=1).view(">u8").reshape(-1)                # 64 bits per word, first bit = MSB
    colour = flat[:, 1:, 1:].reshape(_NV, -1)                                 # RGB without DC: [10, 189]
    colour = colour / (np.linalg.norm(colour, axis=1, keepdims=True) + 1e-9)
    return Fingerprint(tuple(int(w) for w in words), colour.astype(np.float16))


def picture_fingerprint(im: Image.Image) -> Fingerprint:
    """`fingerprint_from_small` of a PIL image."""
    return fingerprint_from_small(small_rgb(im))


@dataclass(frozen=True)
class PictureStats:
    """Colour statistics of one picture, from its 64×64 thumbnail."""

    mean_rgb: tuple[int, int, int]
    border_rgb: tuple[int, int, int]     # mean of the outer ring of the thumbnail (10 % of each side)
    border_uniform: bool                 # the border is close to one flat colour (std < 20)
    luma: float                          # 0..1, Rec. 601
    saturation: float                    # 0..1, mean chroma (max − min) / mean max over pixels


def stats_from_small(small: np.ndarray) -> PictureStats:
    """Statistics from a `dedupe.small_rgb` thumbnail (uint8 [S, S, 3], S = 64)."""
    px = small.astype(np.float32)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    e = max(1, round(px.shape[0] * 0.1))
    border = np.concatenate([px[:e].reshape(-1, 3), px[-e:].reshape(-1, 3),
                             px[e:-e, :e].reshape(-1, 3), px[e:-e, -e:].reshape(-1, 3)]).T   # [3, N]
    luma = float((0.299 * r + 0.587 * g + 0.114 * b).mean() / 255.0)
    hi = np.maximum(np.maximum(r, g), b)
    # HSV-style saturation of the whole picture (chroma relative to value), so a dark picture is not "grey"
    sat = float((hi - np.minimum(np.minimum(r, g), b)).mean() / max(float(hi.mean()), 1.0))
    return PictureStats(
        mean_rgb=(int(round(float(r.mean()))), int(round(float(g.mean()))), int(round(float(b.mean())))),
        border_rgb=tuple(int(round(float(v))) for v in border.mean(axis=1)),   # type: ignore[arg-type]
        border_uniform=bool(border.std(axis=1).max() < 20.0),
        luma=luma,
        saturation=sat,
    )


def picture_stats(im: Image.Image) -> PictureStats:
    return stats_from_small(small_rgb(im))
