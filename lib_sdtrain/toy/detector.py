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

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: [B, 3, 64, 64] in [-1, 1] -> {head: logits [B, n_labels]}."""
        logits = self.heads(self.mlp(self.features(x)))
        out, start = {}, 0
        for name, labels in HEADS.items():
            out[name] = logits[:, start:start + len(labels)]
            start += len(labels)
        return out


# ---- pictures <-> tensors ---------------------------------------------------------------------------
def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL pictures -> [B, 3, 64, 64] float in [-1, 1] (resized with a box filter when larger)."""
    arrays = []
    for img in images:
        if not isinstance(img, Image.Image):
            raise UserError(f"expected a PIL picture, got {type(img).__name__}")
        img = img.convert("RGB")
        if img.size != (INPUT_SIZE, INPUT_SIZE):
            img = img.resize((INPUT_SIZE, INPUT_SIZE), Image.BOX if min(img.size) >= INPUT_SIZE else Image.BILINEAR)
        arrays.append(np.asarray(img, dtype=np.uint8))
    if not arrays:
        return torch.zeros(0, 3, INPUT_SIZE, INPUT_SIZE)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


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


# ---- the detector -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detection:
    """What the detector sees in one picture. `*_conf` are softmax probabilities of the named label.

    `shape` is "none" when no shape is visible; colour, size and position are then guesses with low
    confidence. `subject` and `style` are the probabilities that the concept is present (the subject's
    heart, the zkz stripes); `has_subject` / `has_style` threshold them at 0.5, so an unsure "heart"
    (the most likely of several shapes, below 0.5) does not count as the subject.
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


class Detector:
    """A loaded detector network (CPU, eval mode). Use `Detector.load()` for the shipped weights."""

    def __init__(self, net: DetectorNet, metadata: dict[str, str] | None = None) -> None:
        self.net = net.eval()
        self.metadata = dict(metadata or {})

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
            best = {k: int(p[i].argmax()) for k, p in probs.items()}
            named = {k: HEADS[k][j] for k, j in best.items()}
            conf = {f"{k}_conf": float(probs[k][i, j]) for k, j in best.items()}
            out.append(Detection(
                shape=named["shape"], shape_conf=conf["shape_conf"],
                colour=named["colour"], colour_conf=conf["colour_conf"],
                background=named["background"], background_conf=conf["background_conf"],
                size=named["size"], size_conf=conf["size_conf"],
                position=named["position"], position_conf=conf["position_conf"],
                subject=float(probs["shape"][i, heart]), style=float(probs["style"][i, striped]),
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
