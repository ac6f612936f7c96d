"""The toy detector: what a toy picture shows, robust to the blur, noise and colour drift of diffusion samples.

One small CNN (about 0.2 M parameters, shipped as fp16 safetensors in `toy/data/detector.safetensors`)
with six softmax heads over the world's attribute lists: shape (the four base shapes, the subject's heart,
and "none" for a picture with no shape in it: a failed sample), colour, background, size, position and
style (plain / striped). Concept presence is read from it: subject = P(shape is the heart), style =
P(striped). It is trained by `tools/train_detector.py` on endless generator pictures degraded on the fly
(blur, noise, down-up scaling, JPEG, hue/brightness drift, small shifts, rotations, scalings and warps), plus
empty pictures and ellipse blobs that must not read as a concept, and (v2) on decoded pictures of the toy
model: VAE round trips and the model's own drawings (SDEdit of generator pictures). A decoded picture keeps
its shape label only when its outline still fits that shape better than any other (otherwise "one of" the
shapes that fit), and its stripes label only when the stripes survive, so a blurry heart-shaped blob counts
as a heart and a blob that lost its notch does not. Measured accuracies (per class, on decoded pictures too)
are in that script's docstring and in the file's metadata (`Detector.metadata`); the agreement with pictures
labelled by eye is in `tests/data/toy_eye/` (`tools/eye_check.py`).

The style reading (v3) is the CNN's P(striped) gated by a measured property of what a person calls
stripes: horizontal bands inside the shape (`band_features`: the rows of the shape alternate in colour at
the zkz band period, and each row is nearly uniform). The CNN alone also called checked, blotchy and
two-tone pictures striped (on pictures labelled by eye it said "stripes" 80 times where a person saw 25);
the gate's thresholds are stored in the weights file's metadata (`style_bands`), so a file without them
reads the CNN alone, as before.

A CNN rather than geometric rules: rules for shape (corner counts, compactness) break first on exactly the
blobby samples a tiny model makes, and a CNN trained on degraded pictures degrades gracefully.

Pictures of any size are resized to 64x64 first (the CNN's input), so 128-px samples work unchanged.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from ..errors import UserError
from . import world
from .world import Scene

WEIGHTS_PATH = Path(__file__).resolve().parent / "data" / "detector.safetensors"
INPUT_SIZE = 64

NO_SHAPE = "none"    # the shape head's answer for an empty picture (a sample that failed to draw anything)

# head name -> labels; the order of heads and labels is the order of the network's logits
HEADS: dict[str, tuple[str, ...]] = {
    "shape": world.SHAPES + (NO_SHAPE,),
    "colour": world.COLOUR_NAMES,
    "background": world.BACKGROUNDS,
    "size": world.SIZE_NAMES,
    "position": world.POSITIONS,
    "style": world.STYLES,
}
CONCEPT_THRESHOLD = 0.5
BAND_FEATURES: tuple[str, ...] = ("amp", "ratio", "gain")
BAND_PERIODS: tuple[float, ...] = (12.0, 14.0, 16.0, 18.0, 20.0)   # px at 64 px; zkz bands are 8 px (period 16)
MIN_ROWS = 12         # a shape fewer rows tall (after erosion) shows no bands to measure
MASK_FLOOR, MASK_SHARE = 30.0, 0.4   # shape pixels: colour distance from the background above max(floor, share x its 98th percentile)
# The shipped gate (chosen on 184 pictures labelled by eye and on generator pictures; see tools/train_detector.py)
DEFAULT_BAND_GATE: dict[str, float] = {"min_amp": 20.0, "min_ratio": 1.2, "min_gain": 0.7}


class DetectorNet(nn.Module):
    """Conv stack 64 -> 32 -> 16 -> 8 px, a 4x4 pooled map (keeps where things are), a small MLP, heads.

    The first convolution already has stride 2: the finest detail the world has (a stripe, a small cross's
    arm) is 8 px wide at 64 px, and full-resolution channels would triple the training time on a CPU.
    """

    def __init__(self, width: int = 32, hidden: int = 96) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w // 2, 2),          # [B, w/2, 32, 32]
            *block(w // 2, w, 1),          # [B, w, 32, 32]
            *block(w, w * 2, 2),           # [B, 2w, 16, 16]
            *block(w * 2, w * 2, 2),       # [B, 2w, 8, 8]
            *block(w * 2, w * 2, 1),
            nn.AdaptiveAvgPool2d(4),       # [B, 2w, 4, 4]
        )
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(w * 2 * 16, hidden), nn.ReLU(inplace=True))
        self.heads = nn.Linear(hidden, sum(len(v) for v in HEADS.values()))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, 64, 64] in [-1, 1] -> the hidden layer the heads read, [B, hidden]."""
        return self.mlp(self.features(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: [B, 3, 64, 64] in [-1, 1] -> {head: logits [B, n_labels]}."""
        return self.split(self.heads(self.hidden(x)))

    @staticmethod
    def split(logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The heads' logits, side by side in HEADS' order, as {head: [B, n_labels]}."""
        out, start = {}, 0
        for name, labels in HEADS.items():
            out[name] = logits[:, start:start + len(labels)]
            start += len(labels)
        return out


# ---- pictures <-> tensors ---------------------------------------------------------------------------
def to_tensor(images: Sequence[Image.Image], resize: bool = True) -> torch.Tensor:
    """PIL pictures -> [B, 3, 64, 64] float in [-1, 1] (resized with a box filter when larger); `resize` False:
    [B, 3, H, W] at the pictures' own (common) size, e.g. for a VAE."""
    arrays = []
    for img in images:
        if not isinstance(img, Image.Image):
            raise UserError(f"expected a PIL picture, got {type(img).__name__}")
        img = img.convert("RGB")
        if resize and img.size != (INPUT_SIZE, INPUT_SIZE):
            img = img.resize((INPUT_SIZE, INPUT_SIZE), Image.BOX if min(img.size) >= INPUT_SIZE else Image.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.uint8))
    if not arrays:
        return torch.zeros(0, 3, INPUT_SIZE, INPUT_SIZE)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def at_input_size(images: Sequence[Image.Image]) -> list[Image.Image]:
    """The pictures as the detector reads them: 64 px, a larger picture averaged down (BOX filter). The band
    gate measures periods in 64-px pixels, so a larger picture must come down before `Detector.detect`."""
    return [im if im.size == (INPUT_SIZE, INPUT_SIZE) else im.convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.BOX)
            for im in images]


# ---- degradations (for tests and the accuracy table) -------------------------------------------------
DEGRADATIONS: tuple[str, ...] = ("clean", "blur1", "blur2", "noise05", "noise10", "downup2", "jpeg30", "drift",
                                 "warp", "mixed", "blur3", "noise20", "downup4", "severe")


def smooth_warp(x: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """Move pixels by a smooth displacement: x [B, C, H, W], field [B, 2, h, w] in pixels (upsampled)."""
    b, _, h, w = x.shape
    disp = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)      # [B, 2, H, W]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([xs, ys], -1)[None].expand(b, h, w, 2)
    grid = base + disp.permute(0, 2, 3, 1) * torch.tensor([2 / w, 2 / h])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def degrade(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A fixed degradation of a clean picture, standing in for a tiny diffusion model's sample.

    blur1/2/3: Gaussian blur radius 1/2/3 (at 64 px); noise05/10/20: Gaussian noise sigma 0.05/0.1/0.2 (of
    the 0..1 range); downup2/4: down- and upscale by 2/4 (bilinear); jpeg30: JPEG quality 30; drift: hue
    +-12 degrees, brightness x0.85..1.15, saturation x0.75..1.1; warp: a smooth random displacement of up
    to about 3 px (wobbly outlines, as a tiny model draws them); mixed: drift, blur 1 and noise 0.05 at
    once; severe: drift, blur 2, noise 0.1 and JPEG 30 at once. blur3, noise20, downup4 and severe are
    harsher than the detector's training augmentation and show how it fails.
    """
    img = img.convert("RGB")
    if kind == "clean":
        return img
    if kind in ("blur1", "blur2", "blur3"):
        return img.filter(ImageFilter.GaussianBlur(int(kind[-1])))
    if kind in ("noise05", "noise10", "noise20"):
        sigma = int(kind[-2:]) / 100
        a = np.asarray(img, dtype=np.float64) / 255 + rng.normal(0, sigma, (img.height, img.width, 3))
        return Image.fromarray(np.clip(np.round(a * 255), 0, 255).astype(np.uint8))
    if kind in ("downup2", "downup4"):
        w, h = img.size
        f = int(kind[-1])
        return img.resize((w // f, h // f), Image.BILINEAR).resize((w, h), Image.BILINEAR)
    if kind == "jpeg30":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=30)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "drift":
        hsv = np.asarray(img.convert("HSV"), dtype=np.float64)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-12, 12) * 256 / 360) % 256
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.75, 1.1), 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.85, 1.15), 0, 255)
        return Image.fromarray(np.round(hsv).astype(np.uint8), "HSV").convert("RGB")
    if kind == "warp":
        x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 255
        field = torch.from_numpy(rng.normal(0, 1.5, (1, 2, 4, 4)).astype(np.float32))        # pixels
        y = smooth_warp(x, field)
        return Image.fromarray((y[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if kind == "mixed":
        return degrade(degrade(degrade(img, "drift", rng), "blur1", rng), "noise05", rng)
    if kind == "severe":
        for step in ("drift", "blur2", "noise10", "jpeg30"):
            img = degrade(img, step, rng)
        return img
    raise UserError(f"unknown degradation {kind!r}; choose one of {', '.join(DEGRADATIONS)}")


# ---- horizontal bands: a measured property of the zkz style ----------------------------------------
def _span_fill(mask: np.ndarray, axis: int) -> np.ndarray:
    """Fill each row (axis 1) or column (axis 0) of `mask` from its first to its last set pixel."""
    m = mask if axis == 1 else mask.T
    n = m.shape[1]
    has = m.any(1)
    first = np.where(has, m.argmax(1), n)
    last = np.where(has, n - 1 - m[:, ::-1].argmax(1), -1)
    idx = np.arange(n)[None]
    out = (idx >= first[:, None]) & (idx <= last[:, None])
    return out if axis == 1 else out.T


def band_features(image: Image.Image) -> dict[str, float]:
    """How strongly the shape in `image` shows horizontal bands, measured on its pixels (no learning).

    The picture (64 px, box blur 1 against pixel noise) is split into background and shape: the background
    is a plane per colour channel fitted to the outer 3-px ring (flat or gradient), the shape is every pixel
    far from it (> max(30, 0.4 x the 98th percentile of the distances)), filled along rows and columns so
    pale bands near the background colour stay inside, then eroded by one pixel. The shape's pixels are
    projected on their main colour axis; per row (>= 3 pixels) the mean m_y and the variance within the row.
    The row means are fitted by a quadratic trend (shading, a two-tone shape) plus one sinusoid of period
    12-20 px (the zkz bands are 8 px: period 16); the best period gives

    - amp: the sinusoid's amplitude (colour units 0-255),
    - ratio: amp / (the mean within-row standard deviation + 5): bands across rows, not texture within them
      (checks, dots, vertical stripes and blotches vary within rows),
    - gain: the share of the row means' variance left by the trend that the sinusoid explains.

    All three are 0 when there is no shape (fewer than 30 pixels or `MIN_ROWS` rows).
    """
    zero = {k: 0.0 for k in BAND_FEATURES}
    img = image.convert("RGB")
    if img.size != (INPUT_SIZE, INPUT_SIZE):
        img = img.resize((INPUT_SIZE, INPUT_SIZE), Image.BOX if min(img.size) >= INPUT_SIZE else Image.BILINEAR)
    a = np.asarray(img.filter(ImageFilter.BoxBlur(1)), dtype=np.float64)
    n = INPUT_SIZE
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1.0)
    ring = np.zeros((n, n), bool)
    ring[:3] = ring[-3:] = True
    ring[:, :3] = ring[:, -3:] = True
    design = np.stack([np.ones((n, n)), yy, xx], -1)
    coef = np.linalg.lstsq(design[ring], a[ring], rcond=None)[0]
    dist = np.linalg.norm(a - design @ coef, axis=-1)
    raw = dist > max(MASK_FLOOR, MASK_SHARE * float(np.percentile(dist, 98)))
    full = _span_fill(raw, 1) | _span_fill(raw, 0)
    m = full.copy()
    m[1:] &= full[:-1]
    m[:-1] &= full[1:]
    m[:, 1:] &= full[:, :-1]
    m[:, :-1] &= full[:, 1:]
    if m.sum() < 30:
        return zero
    px = a[m]
    centre = px.mean(0)
    axis = np.linalg.svd(px - centre, full_matrices=False)[2][0]
    v = (a - centre) @ axis
    counts = m.sum(1)
    rows = np.nonzero(counts >= 3)[0]
    if len(rows) < MIN_ROWS:
        return zero
    means = np.array([v[y][m[y]].mean() for y in rows])
    within = np.array([v[y][m[y]].var() for y in rows])
    ys = rows.astype(np.float64)
    yc = (ys - ys.mean()) / (n / 2)
    trend = np.stack([np.ones_like(yc), yc, yc ** 2], 1)
    resid0 = means - trend @ np.linalg.lstsq(trend, means, rcond=None)[0]
    ss0 = float((resid0 ** 2).sum()) + 1e-9
    amp, gain = 0.0, 0.0
    for period in BAND_PERIODS:
        x = np.concatenate([trend, np.stack([np.cos(2 * np.pi * ys / period), np.sin(2 * np.pi * ys / period)], 1)], 1)
        c = np.linalg.lstsq(x, means, rcond=None)[0]
        a_p = float(np.hypot(c[3], c[4]))
        if a_p > amp:
            amp, gain = a_p, 1 - float(((means - x @ c) ** 2).sum()) / ss0
    return {"amp": amp, "ratio": amp / (float(np.sqrt(within.mean())) + 5.0), "gain": gain}


def bands_pass(features: dict[str, float], gate: dict[str, float]) -> bool:
    """True when every band feature reaches its minimum in `gate` ({"min_amp", "min_ratio", "min_gain"})."""
    return all(features[k] >= float(gate[f"min_{k}"]) for k in BAND_FEATURES)


# ---- the detector -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detection:
    """What the detector sees in one picture. `*_conf` are softmax probabilities of the named label.

    `shape` is "none" when no shape is visible; colour, size and position are then guesses with low
    confidence. `subject` and `style` are the probabilities that the concept is present (the subject's
    heart, the zkz stripes); `has_subject` / `has_style` threshold them at 0.5, so an unsure "heart"
    (the most likely of several shapes, below 0.5) does not count as the subject. With a band gate
    (`Detector.style_bands`), `style` is the CNN's P(striped) (`style_head`), set to 0 where the CNN says
    striped but the picture's rows show no horizontal bands (`bands` False: the gate vetoed it); without a
    gate, `style` = `style_head` and `bands` stays True.
    """

    shape: str
    shape_conf: float
    colour: str
    colour_conf: float
    background: str
    background_conf: float
    size: str
    size_conf: float
    position: str
    position_conf: float
    subject: float
    style: float
    style_head: float = 0.0
    bands: bool = True

    @property
    def has_subject(self) -> bool:
        return self.subject >= CONCEPT_THRESHOLD

    @property
    def has_style(self) -> bool:
        return self.style >= CONCEPT_THRESHOLD

    @property
    def has_shape(self) -> bool:
        return self.shape != NO_SHAPE

    def scene(self) -> Scene:
        """The detected scene (style thresholded); UserError for an empty picture."""
        if not self.has_shape:
            raise UserError("no shape detected in this picture")
        return Scene(self.shape, self.colour, self.size, self.position, self.background,
                     "striped" if self.has_style else "plain")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "has_shape": self.has_shape, "has_subject": self.has_subject,
                "has_style": self.has_style}


def parse_band_gate(text: str | None) -> dict[str, float] | None:
    """The band gate of a weights file's `style_bands` metadata (JSON {"min_amp", "min_ratio", "min_gain"}),
    or None when the file has none. UserError when it is there but malformed."""
    if text is None or text == "":
        return None
    try:
        gate = json.loads(text)
    except (ValueError, RecursionError):
        raise UserError("its style_bands metadata is not valid JSON") from None
    keys = {f"min_{k}" for k in BAND_FEATURES}
    if not isinstance(gate, dict) or not keys <= set(gate):
        raise UserError(f"its style_bands metadata must name {', '.join(sorted(keys))}")
    out = {}
    for k in sorted(keys):
        v = gate[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise UserError(f"its style_bands metadata has a non-number {k}: {v!r}")
        out[k] = float(v)
    return out


class Detector:
    """A loaded detector network (CPU, eval mode). Use `Detector.load()` for the shipped weights."""

    def __init__(self, net: DetectorNet, metadata: dict[str, str] | None = None) -> None:
        self.net = net.eval()
        self.metadata = dict(metadata or {})
        self.style_bands = parse_band_gate(self.metadata.get("style_bands"))

    @classmethod
    def load(cls, path: str | Path | None = None) -> Detector:
        """Load weights from `path` (default: the shipped `toy/data/detector.safetensors`)."""
        from ..formats.safetensors_io import read_safetensors

        path = Path(path) if path is not None else WEIGHTS_PATH
        if not path.is_file():
            raise UserError(f"detector weights not found: {path} (train them with tools/train_detector.py)")
        tensors, meta = read_safetensors(path)
        state = {k: v.float() for k, v in tensors.items()}
        try:
            arch = json.loads(meta.get("arch", "{}"))
            labels = json.loads(meta.get("heads", "{}"))
        except (ValueError, RecursionError):
            raise UserError(f"{path}: its detector metadata is not valid JSON") from None
        if not isinstance(arch, dict) or not isinstance(labels, dict):
            raise UserError(f"{path}: its detector metadata is not a table")
        if labels and labels != {k: list(v) for k, v in HEADS.items()}:
            raise UserError(f"{path} was trained for other labels than this toy world has")
        try:
            parse_band_gate(meta.get("style_bands"))
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        try:
            net = DetectorNet(**arch)
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{path}: its detector architecture metadata does not fit: {e}") from None
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"{path} does not fit the detector network: {e}") from None
        return cls(net, meta)

    @torch.no_grad()
    def probabilities(self, images: Sequence[Image.Image], batch_size: int = 256) -> dict[str, torch.Tensor]:
        """{head: [N, n_labels] softmax probabilities} for `images`."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
        for start in range(0, len(images), batch_size):
            out = self.net(to_tensor(images[start:start + batch_size]))
            for k, v in out.items():
                parts[k].append(v.softmax(-1))
        return {k: torch.cat(v) if v else torch.zeros(0, len(HEADS[k])) for k, v in parts.items()}

    def detect(self, images: Sequence[Image.Image]) -> list[Detection]:
        """One `Detection` per picture."""
        probs = self.probabilities(images)
        heart = HEADS["shape"].index(world.SUBJECT_SHAPE)
        striped = world.STYLES.index("striped")
        out = []
        for i in range(len(images)):
            head = float(probs["style"][i, striped])
            seen = True
            if self.style_bands is not None and head >= CONCEPT_THRESHOLD:
                seen = bands_pass(band_features(images[i]), self.style_bands)
            best = {k: int(p[i].argmax()) for k, p in probs.items()}
            named = {k: HEADS[k][j] for k, j in best.items()}
            conf = {f"{k}_conf": float(probs[k][i, j]) for k, j in best.items()}
            out.append(Detection(
                shape=named["shape"], shape_conf=conf["shape_conf"],
                colour=named["colour"], colour_conf=conf["colour_conf"],
                background=named["background"], background_conf=conf["background_conf"],
                size=named["size"], size_conf=conf["size_conf"],
                position=named["position"], position_conf=conf["position_conf"],
                subject=float(probs["shape"][i, heart]), style=head if seen else 0.0,
                style_head=head, bands=seen,
            ))
        return out


# ---- scoring helpers --------------------------------------------------------------------------------
_DEFAULT: Detector | None = None


def default_detector() -> Detector:
    """The shipped detector, loaded once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Detector.load()
    return _DEFAULT


def _check_pairs(images: Sequence[Image.Image], scenes: Sequence[Scene]) -> None:
    if len(images) != len(scenes):
        raise UserError(f"{len(images)} pictures but {len(scenes)} scenes")
    if not images:
        raise UserError("no pictures to score")


def attribute_accuracy(images: Sequence[Image.Image], scenes: Sequence[Scene], attribute: str,
                       detector: Detector | None = None) -> float:
    """Share of pictures whose detected `attribute` (shape, colour, ...) equals the scene's."""
    if attribute not in HEADS:
        raise UserError(f"unknown attribute {attribute!r}; choose one of {', '.join(HEADS)}")
    _check_pairs(images, scenes)
    found = (detector or default_detector()).detect(images)
    if attribute == "style":
        hits = [d.has_style == s.is_styled for d, s in zip(found, scenes)]
    else:
        hits = [getattr(d, attribute) == getattr(s, attribute) for d, s in zip(found, scenes)]
    return sum(hits) / len(hits)


def colour_accuracy(images: Sequence[Image.Image], scenes: Sequence[Scene], detector: Detector | None = None) -> float:
    """Share of pictures whose colour the detector names as the scene's colour."""
    return attribute_accuracy(images, scenes, "colour", detector)


def shape_accuracy(images: Sequence[Image.Image], scenes: Sequence[Scene], detector: Detector | None = None) -> float:
    """Share of pictures whose shape the detector names as the scene's shape (the subject counts as heart;
    an empty picture counts as a miss)."""
    return attribute_accuracy(images, scenes, "shape", detector)


def background_accuracy(images: Sequence[Image.Image], scenes: Sequence[Scene],
                        detector: Detector | None = None) -> float:
    """Share of pictures whose background the detector names as the scene's background."""
    return attribute_accuracy(images, scenes, "background", detector)


def concept_share(images: Sequence[Image.Image], concept: str, detector: Detector | None = None) -> float:
    """Share of pictures in which the concept ("subject" / "zwx" or "style" / "zkz") is detected.

    On pictures prompted with the token this is the concept's success rate; on pictures prompted without
    it (plain world prompts) it is the bleeding rate.
    """
    names = {"subject": "subject", world.SUBJECT_TOKEN: "subject", "style": "style", world.STYLE_TOKEN: "style"}
    key = names.get(concept)
    if key is None:
        raise UserError(f"unknown concept {concept!r}; choose subject ({world.SUBJECT_TOKEN}) "
                        f"or style ({world.STYLE_TOKEN})")
    if not images:
        raise UserError("no pictures to score")
    found = (detector or default_detector()).detect(images)
    return sum(d.has_subject if key == "subject" else d.has_style for d in found) / len(found)
