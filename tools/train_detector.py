"""Train the toy detector shipped in `lib_sdtrain/toy/data/detector.safetensors`.

    .venv/bin/python tools/train_detector.py                  # train, evaluate, write the shipped file
    .venv/bin/python tools/train_detector.py --eval-only      # evaluate the shipped file
    .venv/bin/python tools/train_detector.py --out /tmp/d.safetensors --steps 300   # a quick trial

Recipe: a pool of generator pictures (every shape including the subject's heart, 35 % striped, all colours,
sizes, positions and backgrounds, held-out triples included: the detector must judge any picture; plus 8 %
background-only pictures labelled shape "none" and `--blob-share` ellipse blobs labelled "not the subject,
plain", with uniform targets for what they do not have) is rendered once. v2 adds decoded pictures of a toy
model (`--model`): `--decoded` VAE round trips and `--sampled` drawings of the model itself (SDEdit: a
generator picture's latent noised to 30-55 % of the schedule and denoised with its caption, Euler, CFG 5).
A decoded picture keeps the source's shape label only when its outline still fits that shape better than any
other shape's outline with the same jitter (each hypothesis gets an area-matched mask of the picture's most
foreground-like pixels; margin 0.03), otherwise its label is "one of" the shapes that fit about as well, or
any shape when nothing fits; stripes stay labelled only when the brightness of the rows inside the shape still
follows the source's bands (r >= 0.5). So a blurry or dark heart-shaped blob is taught as a heart and a blob
that lost the notch is not. Each step draws a batch (30 % round trips, 15 % drawings, the rest generator
pictures) and degrades it on the fly the way a tiny diffusion model degrades its samples: small affine jitter,
hue/saturation/brightness drift, Gaussian blur, down-up scaling, smooth warps, low-frequency colour blotches,
Gaussian noise and JPEG. 15 % of a batch stays clean. AdamW with a one-cycle schedule, label smoothing 0.05,
fixed seeds.

The evaluation renders fresh pictures from other seeds and scores each head on the clean pictures and under
each fixed degradation of `detector.degrade`; concept false positives are measured on plain pictures (the
bleeding measure), on empty pictures (empty_none: called "none"; empty_concept: called a concept) and on blobs
(blob_concept: called a concept). A second table scores decoded pictures of fresh scenes per class. Both are
printed and stored in the weights file's metadata (`eval`, `eval_decoded`).

How the shipped v2 file was made (shared 2-core CPU at load 7-9, one thread, `nice -n 10`):

    # 1. from scratch on the bundled v1 model's round trips and drawings (2,021 s wall, 400 CPU-s)
    python tools/train_detector.py --out det-a.safetensors --threads 1 --blob-share 0.08 \
        --decoded 2400 --sampled 1200 --steps 1000 --eval-n 600 --eval-decoded 400
    # 2. adapted to toy model v2's decoder (v1 UNet + the v2 decoder, the "polish" stage of
    #    lib_sdtrain/toy/data/README.md; v2 ships that decoder) (1,030 s wall, 215 CPU-s)
    python tools/train_detector.py --out detector.safetensors --threads 1 --model toy-sd1-polish.safetensors \
        --init det-a.safetensors --blob-share 0.12 --decoded 1600 --sampled 800 --steps 400 --lr 2e-3 \
        --eval-n 600 --eval-decoded 400

Most of the wall time is making the decoded pictures (2,400 round trips with their labels: 429 s at that load).
The same seeds give the same weights.

Accuracy of the shipped weights, % (600 fresh generator pictures per row, 100 empty ones, 100 blobs):

| pictures | colour | shape | background | size | position | subject_tpr | subject_fpr | style_tpr | style_fpr | empty_none | empty_concept | blob_concept |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
| clean | 100 | 100 | 100 | 100 | 100 | 100 | 0 | 100 | 0 | 100 | 0 | 2 |
| each of blur1/2/3, noise05/10/20, downup2/4, jpeg30, drift, mixed | 100 | 99.7-100 | 100 | 100 | 100 | 100 | 0-0.2 | 100 | 0 | 100 | 0 | 1-3 |
| severe | 99.7 | 99.5 | 100 | 100 | 100 | 100 | 0 | 100 | 0 | 100 | 0 | 5 |

Decoded pictures of fresh scenes with the v2 decoder, % called the source's class (in brackets: among those
whose decoded outline still reads as that class, of n):

| decoded pictures | circle | square | triangle | cross | heart | striped | plain | subject_fpr | style_fpr | colour |
|---|---|---|---|---|---|---|---|---|---|---|
| VAE round trip | 100 (100 of 76) | 91 (95 of 64) | 97 (97 of 76) | 72 (100 of 45) | 99 (100 of 85) | 99 (100 of 147) | 100 | 0.0 | 0.0 | 99.8 |
| drawn by the model (SDEdit) | 100 (100 of 32) | 100 (100 of 33) | 100 (100 of 37) | 85 (100 of 29) | 2 (0 of 6) | 3 (0 of 8) | 100 | 0.0 | 0.0 | 100 |

The base model never learned hearts or stripes, so its drawings of them lose them (only 6 of 100 drawn
hearts still read as hearts by outline, and none of those is called one: the weak spot of this table; the
round-trip row shows that the detector does see decoded hearts). Step 1's detector scored the v1 decoder's
round trips: hearts 90 % (95 % of 81 readable), blobs called a concept 2-5 %.

The detector is specific to the decoder it learned: on 48 round trips of clean hearts (n = 48 each) the shipped
v1 detector saw a heart in 60 % with the v1 decoder; step 1's detector in 98 % (v1 decoder) and 90 % (v2); the
shipped v2 detector in 90 % with the v2 decoder but only 60 % with the v1 decoder (step 2 adapted it). Retrain
it (step 2 is enough) whenever the toy model's decoder changes.

Checked against pictures labelled by eye: `tools/eye_check.py` and `tests/data/toy_eye/` (agreement and
Cohen's kappa there; the test asserts a floor).

v3 (shipped in sessions 6-7): the same v2 network, plus a band gate on its style reading, written into the metadata
(`style_bands`) without retraining:

    python tools/train_detector.py --bands-only detector-v2.safetensors --out detector.safetensors

On decoded pictures the v2 style head answered "was this scene striped?", not "are stripes visible?": on 184
pictures labelled by eye (`tests/data/toy_eye/style`) it said stripes 80 times where a person saw 25
(agreement 70 % [63, 76], kappa 0.34 [0.23, 0.45]): blotchy LoRA samples, two-tone shapes, textured round trips.
`detector.band_features` measures what a person calls the zkz style (rows of the shape alternating at the
band period, each row nearly uniform), and `style` counts only where both agree. The gate's thresholds
(`DEFAULT_BAND_GATE`: amp >= 20, ratio >= 1.2, gain >= 0.7) were chosen on a small grid for the best kappa on
that sheet, subject to keeping every degraded-generator floor of tests/test_toy_detector.py (striped pictures
clean / blur2 / noise10 / downup2 / mixed / severe read as striped in 100 / 97 / 100 / 100 / 100 / 94 % of
200; plain and texture pictures 0-1 %). With it: 93 % [88, 96], kappa 0.71 [0.55, 0.85] on that sheet
(detector yes 28, person 25), and 92 % [83, 97], kappa 0.50 [-0.03, 0.85] on the first sheet (n = 64, not used to
choose the thresholds; v2 84 %, kappa 0.47). The heart head is unchanged (same weights). The gate is
stricter than the CNN on small round trips of zkz pictures but still says stripes in 23 of 24 where the
labeller saw 17 (faint bands on small shapes are where eye and measure differ most).

v4 (made in session 7, shipped since session 8 with the v2.1 model, whose decoder it belongs to; see
lib_sdtrain/toy/data/README.md): v3 adapted to the v2.1 model's decoder, with hearts missing their notch or their
point (`render_near_hearts`) as 8 % of the generator pictures, the same band gate (idle 2-core machine, one thread: round trips 49 s, drawings
59 s, training 182 s, evaluation 33 s):

    python tools/train_detector.py --out detector.safetensors --threads 1 --model toy-sd1-polish.safetensors \
        --init detector-v3.safetensors --blob-share 0.12 --near-heart-share 0.08 --decoded 1600 --sampled 800 \
        --steps 400 --lr 2e-3 --eval-n 600 --eval-decoded 400

(toy-sd1-polish.safetensors: v2's UNet with the v2.1 decoder, the polish stage of lib_sdtrain/toy/data/README.md.)
Generator pictures: 100 % on every head and degradation except warp (subject 96.7 %, shape 99.7 %) and blur3 /
downup4 / severe (shape 99.5-99.8 %); blobs called a concept 0-1 %. Decoded by the v2.1 decoder, % called the
source's class (in brackets: among those whose outline still reads as that class, of n):

| decoded pictures | circle | square | triangle | cross | heart | striped | plain | subject_fpr | style_fpr | colour |
|---|---|---|---|---|---|---|---|---|---|---|
| VAE round trip | 100 (100 of 77) | 96 (98 of 66) | 96 (96 of 76) | 76 (100 of 51) | 100 (100 of 84) | 100 (100 of 151) | 100 | 0.0 | 0.0 | 99.8 |
| drawn by the model (SDEdit) | 97 (100 of 33) | 100 (100 of 36) | 100 (100 of 37) | 82 (97 of 29) | 2 (0 of 5) | 1 (0 of 8) | 97.6 | 0.0 | 2.4 | 100 |

Against the sheets labelled by eye: see lib_sdtrain/toy/data/README.md (subject sheet heart agreement 82 % → 83 %,
kappa 0.59 → 0.61: the near hearts did not close the gap on LoRA samples; with 20 % of them and 600 steps: 80 %).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib_sdtrain.formats.files import atomic_write  # noqa: E402
from lib_sdtrain.toy import world  # noqa: E402
from lib_sdtrain.toy.detector import (  # noqa: E402
    DEFAULT_BAND_GATE, DEGRADATIONS, HEADS, NO_SHAPE, WEIGHTS_PATH, Detector, DetectorNet, degrade,
    parse_band_gate, smooth_warp,
)

STYLED_SHARE = 0.35
EMPTY_SHARE = 0.08    # background-only pictures, shape "none": a failed sample is neither a shape nor a concept
BLOB_SHARE = 0.12     # ellipses and two-ellipse blobs: not the subject, not striped, shape unknown
NEAR_HEART_SHARE = 0.0  # hearts without their notch or without their point (v4: --near-heart-share 0.08)

Label = str | tuple[str, ...] | None   # one label, any of these labels (uniform), or unknown (uniform over all)


def random_scenes(n: int, seed: int) -> list[world.Scene]:
    """Detector training/eval scenes: all five shapes uniformly, 35 % striped, everything else uniform."""
    return world.sample_mixed_scenes(n, seed, STYLED_SHARE)


def scene_labels(scene: world.Scene) -> dict[str, Label]:
    return {k: getattr(scene, k) for k in HEADS}


def render_empties(n: int, seed: int) -> tuple[list[Image.Image], list[dict[str, Label]]]:
    """Background-only pictures: shape "none", plain; colour, size and position unknown."""
    rng = np.random.default_rng([seed, 20])
    images, labels = [], []
    for _ in range(n):
        bg = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
        images.append(world.render_background(bg, 64, rng))
        labels.append({"shape": NO_SHAPE, "colour": None, "background": bg, "size": None, "position": None,
                       "style": "plain"})
    return images, labels


def render_blobs(n: int, seed: int) -> tuple[list[Image.Image], list[dict[str, Label]]]:
    """Blobs a tiny model draws: an ellipse clearly wider or taller than round, or two overlapping ones.

    Their colour and background are known; their shape is anything but the subject's heart (a uniform
    target over the base shapes and "none"), and they are plain. Without them a blurry blob, the most
    common failure of a tiny model, read as the subject about one time in eight.
    """
    rng = np.random.default_rng([seed, 22])
    not_subject = tuple(x for x in HEADS["shape"] if x != world.SUBJECT_SHAPE)
    images, labels = [], []
    for _ in range(n):
        bg = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
        colour = world.COLOUR_NAMES[int(rng.integers(len(world.COLOUR_NAMES)))]
        big = 64 * 4
        img = world.render_background(bg, big, rng)
        draw = ImageDraw.Draw(img)
        for _ in range(1 if rng.random() < 0.6 else 2):
            w = rng.uniform(0.25, 0.7) * big
            aspect = rng.uniform(1.3, 1.9) ** (1 if rng.random() < 0.5 else -1)   # never round: round is a circle
            h = min(w / aspect, 0.8 * big)
            cx, cy = rng.uniform(w / 2 + 4, big - w / 2 - 4), rng.uniform(h / 2 + 4, big - h / 2 - 4)
            draw.ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], fill=world.COLOURS[colour])
        images.append(img.reduce(4))
        labels.append({"shape": not_subject, "colour": colour, "background": bg, "size": None, "position": None,
                       "style": "plain"})
    return images, labels


def _hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Convex hull of 2-D points (monotone chain), counter-clockwise."""
    pts = sorted(set(points))

    def half(seq):
        out: list[tuple[float, float]] = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(pts), half(reversed(pts))
    return lower[:-1] + upper[:-1]


def render_near_hearts(n: int, seed: int) -> tuple[list[Image.Image], list[dict[str, Label]]]:
    """Hearts with one of the two things a person needs to call a shape a heart taken away (v4).

    Half are "shields": the heart's convex hull, so the top notch between the lobes is filled and only the
    point at the bottom is left; the other half are "bows": the heart cut level at 50-70 % of its height, so
    the lobes stay and the point is gone. On trained LoRA samples the v3 detector called such shapes hearts
    where a person did not (`tests/data/toy_eye/subject`). Colour, background and position jitter as a world
    picture; shape: anything but the heart (uniform over the other labels), plain.
    """
    rng = np.random.default_rng([seed, 23])
    not_subject = tuple(x for x in HEADS["shape"] if x != world.SUBJECT_SHAPE)
    images, labels = [], []
    big = 64 * 4
    for i in range(n):
        bg = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
        colour = world.COLOUR_NAMES[int(rng.integers(len(world.COLOUR_NAMES)))]
        img = world.render_background(bg, big, rng)
        half = float(rng.uniform(0.18, 0.38)) * big
        cx = float(rng.uniform(half + 4, big - half - 4))
        cy = float(rng.uniform(half + 4, big - half - 4))
        pts = world._heart(cx, cy, half)
        fill = tuple(int(min(255, round(v * rng.uniform(0.85, 1.1)))) for v in world.COLOURS[colour])
        shape = Image.new("L", (big, big), 0)
        if i % 2 == 0:
            ImageDraw.Draw(shape).polygon(_hull(pts), fill=255)
        else:
            ImageDraw.Draw(shape).polygon(pts, fill=255)
            top = min(y for _, y in pts)
            bottom = max(y for _, y in pts)
            cut = top + float(rng.uniform(0.5, 0.7)) * (bottom - top)
            ImageDraw.Draw(shape).rectangle([0, int(cut), big, big], fill=0)
        img.paste(Image.new("RGB", (big, big), fill), (0, 0), shape)
        images.append(img.reduce(4))
        labels.append({"shape": not_subject, "colour": colour, "background": bg, "size": None, "position": None,
                       "style": "plain"})
    return images, labels


# ---- decoded pictures: VAE round trips and model samples -------------------------------------------
ROUNDTRIP_SHARE = 0.30   # of each batch: the model's VAE encode -> decode of generator pictures
SAMPLE_SHARE = 0.15      # of each batch: the model's own drawings of generator pictures (SDEdit, see below)
MARGIN = 0.03            # a decoded shape keeps its label only if it fits its own outline this much better


def scene_outlines(scene: world.Scene, seed: int, index: int) -> dict[str, np.ndarray]:
    """{shape: foreground mask [64, 64]} of `scene` drawn as each of the five shapes with the same jitter."""
    out = {}
    for shape in world.SHAPES:
        rng = np.random.default_rng([seed, 31, index])
        alt = world.Scene(shape, scene.colour, scene.size, scene.position, scene.background, "plain")
        out[shape] = _mask(np.asarray(world.render(alt, 64, rng), dtype=np.int16), scene.background)
    return out


def _mask(arr: np.ndarray, background: str) -> np.ndarray:
    # the world's colours all differ from every background by more than 90 in some channel
    top, bottom = world.BACKGROUND_LEVELS[background]
    bg = np.linspace(top, bottom, arr.shape[0])[:, None, None]
    return np.abs(arr - bg).max(-1) > 48


def decoded_distance(decoded: np.ndarray, source_mask: np.ndarray) -> np.ndarray:
    """How far each pixel of a decoded picture is from its background (max over channels). The background is
    estimated row by row from the pixels outside the source's shape (a VAE shifts background tints, so the
    world's levels do not apply)."""
    arr = decoded.astype(np.float64)
    out_px = ~source_mask
    overall = np.median(arr[out_px], axis=0) if out_px.any() else np.median(arr.reshape(-1, 3), axis=0)
    bg = np.empty((arr.shape[0], 3))
    for y in range(arr.shape[0]):
        row = arr[y][out_px[y]]
        bg[y] = np.median(row, axis=0) if len(row) >= 4 else overall
    return np.abs(arr - bg[:, None, :]).max(-1)


def fit(dist: np.ndarray, outline: np.ndarray) -> float:
    """IoU of an outline with the same number of the decoded picture's most foreground-like pixels: each
    shape hypothesis gets a mask of its own area, so blur that grows or shrinks a shape favours none."""
    area = int(outline.sum())
    if area == 0:
        return 0.0
    cut = np.partition(dist.ravel(), -area)[-area]
    return _iou(dist >= cut, outline)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def stripes_visible(decoded: np.ndarray, source: np.ndarray, mask: np.ndarray) -> bool:
    """Do the source's stripes survive? Row means of brightness inside the shape correlate (r >= 0.5)."""
    rows = [y for y in range(mask.shape[0]) if mask[y].sum() >= 3]
    if len(rows) < 6:
        return False
    a = np.array([source[y][mask[y]].mean() for y in rows])
    b = np.array([decoded[y][mask[y]].mean() for y in rows])
    if a.std() < 1e-6 or b.std() < 1e-6:
        return False
    return float(np.corrcoef(a, b)[0, 1]) >= 0.5


def decoded_labels(scene: world.Scene, source: Image.Image, decoded: Image.Image, seed: int,
                   index: int) -> dict[str, Label]:
    """Labels a person would give a decoded picture of `scene`: the shape only if the decoded outline fits
    the scene's shape better (by MARGIN) than any other shape's outline with the same jitter (else: "one of"
    the shapes that fit about as well), striped only if the stripes survive (else unknown)."""
    outlines = scene_outlines(scene, seed, index)
    src = np.asarray(source, dtype=np.int16)
    dec = np.asarray(decoded, dtype=np.int16)
    own = _mask(src, scene.background)
    dist = decoded_distance(dec, own)
    ious = {shape: fit(dist, m) for shape, m in outlines.items()}
    found = dist >= np.partition(dist.ravel(), -int(own.sum()))[-int(own.sum())] if own.any() else own
    best = max(ious.values())
    labels = scene_labels(scene)
    if best < 0.35:
        labels["shape"] = world.SHAPES                      # some shape, but which one nobody can say
        labels["size"] = labels["position"] = None
    elif ious[scene.shape] >= best and all(ious[scene.shape] >= v + MARGIN for k, v in ious.items() if k != scene.shape):
        pass                                                # reads as its own shape
    else:
        labels["shape"] = tuple(k for k, v in ious.items() if v >= best - MARGIN)
        if len(labels["shape"]) == 1:
            labels["shape"] = labels["shape"][0]
    if scene.is_styled:
        lum = src.mean(-1)
        if not stripes_visible(dec.mean(-1), lum, own & found):
            labels["style"] = None
    return labels


def decode_pictures(parts, images: list[Image.Image], *, sample: bool, rng: np.random.Generator,
                    captions: list[str] | None = None, batch: int = 64) -> list[Image.Image]:
    """VAE round trips (`sample` False) or the model's own drawings (`sample` True: SDEdit, i.e. the picture's
    latent noised to a random 30-55 % of the schedule and denoised with its caption, Euler, CFG 5)."""
    from lib_sdtrain.sampling import Denoiser, sample_euler
    from lib_sdtrain.toy.detector import to_tensor

    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = to_tensor(images[start:start + batch]).to(parts.device, parts.dtype)
            lat = parts.encode_images(x, mode="mean").float()
            if sample:
                chunk = captions[start:start + batch]
                den = Denoiser(parts, parts.encode_text(chunk), parts.encode_text([""] * len(chunk)), 5.0)
                strength = float(rng.uniform(0.30, 0.55))
                sig = den.schedule(20)
                k = int(round((1 - strength) * 20))
                sig = sig[k:]
                noise = torch.from_numpy(rng.standard_normal(lat.shape).astype(np.float32))
                lat = sample_euler(den, lat + noise * float(sig[0]), sig)
            y = parts.decode_latents(lat.to(parts.dtype)).float().clamp(-1, 1)
            arr = ((y.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
            out += [Image.fromarray(a) for a in arr]
    return out


def sample_caption(scene: world.Scene) -> str:
    """The caption a base model understands for a scene: the heart as "shape", stripes left unsaid."""
    plain = world.Scene(scene.shape if not scene.is_subject else world.BASE_SHAPES[0], scene.colour, scene.size,
                        scene.position, scene.background)
    return plain.caption(generic=scene.is_subject)


def decoded_set(parts, n: int, seed: int, *, sample: bool) -> tuple[list[Image.Image], list[dict[str, Label]],
                                                                     list[world.Scene], list[Image.Image]]:
    """`n` decoded pictures of fresh scenes (each scene drawn with its own jitter stream [seed, 31, i], so its
    other-shape outlines can be redrawn) with person-like labels; also returns the scenes and the sources."""
    scenes = random_scenes(n, seed)
    sources = [world.render(s, 64, np.random.default_rng([seed, 31, i])) for i, s in enumerate(scenes)]
    rng = np.random.default_rng([seed, 32, int(sample)])
    decoded = decode_pictures(parts, sources, sample=sample, rng=rng,
                              captions=[sample_caption(s) for s in scenes] if sample else None)
    labels = [decoded_labels(s, src, dec, seed, i) for i, (s, src, dec) in enumerate(zip(scenes, sources, decoded))]
    return decoded, labels, scenes, sources


def load_model(path: str, vae: str = ""):
    """The model whose decoded pictures the detector learns (optionally with another VAE's weights)."""
    from lib_sdtrain.hosts.standalone import StandaloneHost

    parts = StandaloneHost(device="cpu", dtype="fp32").load(path or None)
    if vae:
        from safetensors import safe_open

        with safe_open(vae, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k).float() for k in f.keys()}
        from diffusers import AutoencoderKL

        if "config" in meta:
            cfg = json.loads(meta["config"])
        else:   # read the widths and depth off the weights (a round trip does not depend on the latent scale)
            levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks.")})
            widths = [int(state[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in levels]
            layers = len({k.split(".")[4] for k in state if k.startswith("encoder.down_blocks.0.resnets.")})
            cfg = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * len(widths),
                   "up_block_types": ["UpDecoderBlock2D"] * len(widths), "block_out_channels": widths,
                   "layers_per_block": layers, "latent_channels": int(state["quant_conv.weight"].shape[0]) // 2,
                   "norm_num_groups": 32}
        parts.vae = AutoencoderKL(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        parts.vae.load_state_dict(state)
        parts.vae.eval()
        if "scaling_factor" in meta:
            parts.latent_scale = float(meta["scaling_factor"])
    return parts


def targets(labels: list[dict[str, Label]], smoothing: float = 0.05) -> dict[str, torch.Tensor]:
    """{head: [N, n_labels] target distributions}: smoothed one-hot, uniform over a tuple, or uniform."""
    out = {}
    for head, names in HEADS.items():
        t = torch.zeros(len(labels), len(names))
        for i, row in enumerate(labels):
            value = row[head]
            if value is None:
                t[i] = 1 / len(names)
            elif isinstance(value, tuple):
                t[i, [names.index(v) for v in value]] = 1 / len(value)
            else:
                t[i] = smoothing / len(names)
                t[i, names.index(value)] += 1 - smoothing
        out[head] = t
    return out


def head_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution [B, n_labels]; a uniform target teaches "I don't know"
    (low confidence) rather than a guess."""
    return -(target * F.log_softmax(logits, -1)).sum(-1).mean()


# ---- batch augmentation ---------------------------------------------------------------------------
# YIQ: hue is the angle in the I/Q plane, so a rotation there shifts hue and a scaling changes saturation.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


def _u(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _pick(g: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def augment(x: torch.Tensor, g: torch.Generator, rng: np.random.Generator) -> torch.Tensor:
    """x: [B, 3, 64, 64] in 0..1 -> degraded copy in 0..1 (see the module docstring)."""
    b, _, h, w = x.shape
    x = x.clone()
    keep = _pick(g, b, 0.15)                       # stays clean
    act = ~keep

    # affine: rotation +-6 deg, scale +-8 %, shift +-2 px (keeps the size and position labels true)
    m = act & _pick(g, b, 0.8)
    if m.any():
        n = int(m.sum())
        ang = _u(g, n, -6, 6) * math.pi / 180
        sc = _u(g, n, 0.92, 1.08)
        tx, ty = _u(g, n, -2, 2) * 2 / w, _u(g, n, -2, 2) * 2 / h
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = torch.cos(ang) / sc, -torch.sin(ang) / sc, tx
        theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = torch.sin(ang) / sc, torch.cos(ang) / sc, ty
        grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
        x[m] = F.grid_sample(x[m], grid, padding_mode="border", align_corners=False)

    # wobbly outlines: smooth displacement up to about 3 px
    m = act & _pick(g, b, 0.3)
    if m.any():
        n = int(m.sum())
        x[m] = smooth_warp(x[m], torch.randn(n, 2, 4, 4, generator=g) * _u(g, n, 0, 1.5)[:, None, None, None])

    # colour drift: hue +-15 deg, saturation x0.65..1.2, brightness x0.8..1.15 and +-0.05, per picture
    m = act & _pick(g, b, 0.7)
    if m.any():
        n = int(m.sum())
        ang = _u(g, n, -15, 15) * math.pi / 180
        sat = _u(g, n, 0.65, 1.2)
        rot = torch.zeros(n, 3, 3)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2] = torch.cos(ang) * sat, -torch.sin(ang) * sat
        rot[:, 2, 1], rot[:, 2, 2] = torch.sin(ang) * sat, torch.cos(ang) * sat
        mat = _YIQ2RGB @ rot @ _RGB2YIQ                                   # [n, 3, 3]
        y = torch.einsum("nij,njhw->nihw", mat, x[m])
        y = y * _u(g, n, 0.8, 1.15)[:, None, None, None] + _u(g, n, -0.05, 0.05)[:, None, None, None]
        x[m] = y

    # Gaussian blur, sigma 0.3..3 px, separable, one kernel per picture (grouped convolution)
    m = act & _pick(g, b, 0.6)
    if m.any():
        n = int(m.sum())
        sig = _u(g, n, 0.3, 3.0)
        r = torch.arange(-7, 8).float()
        k = torch.exp(-(r[None] ** 2) / (2 * sig[:, None] ** 2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)          # [n*3, 15]
        y = x[m].reshape(1, n * 3, h, w)
        y = F.conv2d(F.pad(y, (7, 7, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * 3)
        y = F.conv2d(F.pad(y, (0, 0, 7, 7), mode="replicate"), k[:, None, :, None], groups=n * 3)
        x[m] = y.reshape(n, 3, h, w)

    # down-up scaling by 2 or 4 (what a weak VAE decoder does to edges)
    m = act & _pick(g, b, 0.3)
    if m.any():
        f = 2 if rng.random() < 0.6 else 4
        y = F.interpolate(x[m], scale_factor=1 / f, mode="area")
        x[m] = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)

    # low-frequency colour blotches: smooth noise, up to 0.12
    m = act & _pick(g, b, 0.4)
    if m.any():
        n = int(m.sum())
        blot = torch.randn(n, 3, 4, 4, generator=g) * _u(g, n, 0, 0.12)[:, None, None, None]
        x[m] = x[m] + F.interpolate(blot, size=(h, w), mode="bicubic", align_corners=False)

    # pixel noise, sigma up to 0.15
    m = act & _pick(g, b, 0.6)
    if m.any():
        n = int(m.sum())
        x[m] = x[m] + torch.randn(n, 3, h, w, generator=g) * _u(g, n, 0, 0.15)[:, None, None, None]

    x = x.clamp(0, 1)

    # JPEG, quality 25..90
    for i in torch.nonzero(act & _pick(g, b, 0.2)).flatten().tolist():
        arr = (x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(rng.integers(25, 91)))
        back = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255
        x[i] = torch.from_numpy(back).permute(2, 0, 1)
    return x


# ---- evaluation -----------------------------------------------------------------------------------
def evaluate(det: Detector, n: int = 1200, seed: int = 777,
             kinds: tuple[str, ...] = DEGRADATIONS) -> dict[str, dict[str, float]]:
    """{degradation: {metric: value}} on fresh pictures (seeds unused by training), plus n/6 empty ones."""
    scenes = random_scenes(n, seed)
    clean = world.render_scenes(scenes, 64, seed)
    empty_clean, _ = render_empties(n // 6, seed)
    blob_clean, _ = render_blobs(n // 6, seed)
    results: dict[str, dict[str, float]] = {}
    for kind in kinds:
        rng = np.random.default_rng([seed, 99, DEGRADATIONS.index(kind)])
        images = [degrade(im, kind, rng) for im in clean]
        found = det.detect(images)
        row = {}
        for head in ("colour", "shape", "background", "size", "position"):
            row[head] = float(np.mean([getattr(d, head) == getattr(s, head) for d, s in zip(found, scenes)]))
        subj = [d.has_subject for d, s in zip(found, scenes) if s.is_subject]
        nosubj = [d.has_subject for d, s in zip(found, scenes) if not s.is_subject]
        sty = [d.has_style for d, s in zip(found, scenes) if s.is_styled]
        nosty = [d.has_style for d, s in zip(found, scenes) if not s.is_styled]
        row["subject_tpr"], row["subject_fpr"] = float(np.mean(subj)), float(np.mean(nosubj))
        row["style_tpr"], row["style_fpr"] = float(np.mean(sty)), float(np.mean(nosty))
        empty = det.detect([degrade(im, kind, rng) for im in empty_clean])
        row["empty_none"] = float(np.mean([not d.has_shape for d in empty]))
        row["empty_concept"] = float(np.mean([d.has_subject or d.has_style for d in empty]))
        blobs = det.detect([degrade(im, kind, rng) for im in blob_clean])
        row["blob_concept"] = float(np.mean([d.has_subject or d.has_style for d in blobs]))
        results[kind] = row
    return results


def evaluate_decoded(det: Detector, parts, n: int = 600, seed: int = 778) -> dict[str, dict[str, float]]:
    """Accuracy per class on decoded pictures of fresh scenes: VAE round trips and model drawings (SDEdit).

    For each shape (and for striped / plain): `<class>` = share called that class among all decoded pictures
    of it (against the source scene), `<class>_readable` = the same among those whose decoded outline still
    reads as the source's shape (`decoded_labels` kept the label), with `<class>_n` / `<class>_readable_n`
    counts; `subject_fpr` / `style_fpr` = concept called on decoded pictures without it.
    """
    out: dict[str, dict[str, float]] = {}
    for name, is_sample in (("roundtrip", False), ("sampled", True)):
        imgs, labels, scenes, _ = decoded_set(parts, n if not is_sample else n // 2, seed, sample=is_sample)
        found = det.detect(imgs)
        row: dict[str, float] = {}
        for shape in world.SHAPES:
            idx = [i for i, s in enumerate(scenes) if s.shape == shape]
            ok = [i for i in idx if labels[i]["shape"] == shape]
            row[shape] = float(np.mean([found[i].shape == shape for i in idx])) if idx else float("nan")
            row[f"{shape}_readable"] = float(np.mean([found[i].shape == shape for i in ok])) if ok else float("nan")
            row[f"{shape}_n"], row[f"{shape}_readable_n"] = len(idx), len(ok)
        st = [i for i, s in enumerate(scenes) if s.is_styled]
        st_ok = [i for i in st if labels[i]["style"] == "striped"]
        row["striped"] = float(np.mean([found[i].has_style for i in st]))
        row["striped_readable"] = float(np.mean([found[i].has_style for i in st_ok])) if st_ok else float("nan")
        row["striped_n"], row["striped_readable_n"] = len(st), len(st_ok)
        pl = [i for i, s in enumerate(scenes) if not s.is_styled]
        row["plain"] = float(np.mean([not found[i].has_style for i in pl]))
        row["subject_fpr"] = float(np.mean([found[i].has_subject for i, s in enumerate(scenes) if not s.is_subject]))
        row["style_fpr"] = float(np.mean([found[i].has_style for i in pl]))
        row["colour"] = float(np.mean([d.colour == s.colour for d, s in zip(found, scenes)]))
        out[name] = row
    return out


def format_decoded(results: dict[str, dict[str, float]]) -> str:
    classes = list(world.SHAPES) + ["striped"]
    lines = ["| decoded pictures | " + " | ".join(classes) + " | plain | subject_fpr | style_fpr | colour |",
             "|---" * (len(classes) + 5) + "|"]
    for name, row in results.items():
        cells = [f"{100 * row[c]:.0f} ({100 * row[c + '_readable']:.0f} of {row[c + '_readable_n']})" for c in classes]
        cells += [f"{100 * row[k]:.1f}" for k in ("plain", "subject_fpr", "style_fpr", "colour")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(results: dict[str, dict[str, float]]) -> str:
    cols = ["colour", "shape", "background", "size", "position", "subject_tpr", "subject_fpr", "style_tpr", "style_fpr",
            "empty_none", "empty_concept", "blob_concept"]
    lines = ["| pictures | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for kind, row in results.items():
        lines.append(f"| {kind} | " + " | ".join(f"{100 * row[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


# ---- training -------------------------------------------------------------------------------------
def train(steps: int, batch: int, pool: int, lr: float, seed: int, width: int, hidden: int, parts=None,
          decoded: int = 0, sampled: int = 0, init: str = "") -> tuple[DetectorNet, float, float, dict]:
    """Returns the network, wall seconds, CPU seconds (user + system of this process) and pool statistics.

    With `parts` (a loaded model), `decoded` VAE round trips and `sampled` model drawings join the pool, and
    batches draw ROUNDTRIP_SHARE / SAMPLE_SHARE of their pictures from them (labels from `decoded_labels`).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0, c0 = time.time(), time.process_time()
    scenes = random_scenes(pool, seed)
    empty_images, empty_labels = render_empties(int(pool * EMPTY_SHARE), seed)
    blob_images, blob_labels = render_blobs(int(pool * BLOB_SHARE), seed)
    near_images, near_labels = render_near_hearts(int(pool * NEAR_HEART_SHARE), seed)
    images = world.render_scenes(scenes, 64, seed) + empty_images + blob_images + near_images
    labels = [scene_labels(s) for s in scenes] + empty_labels + blob_labels + near_labels
    kinds = [0] * len(images)
    stats: dict = {"clean": len(images)}
    print(f"rendered {len(images)} pictures in {time.time() - t0:.1f}s", flush=True)
    for kind, n, is_sample in ((1, decoded, False), (2, sampled, True)):
        if parts is None or n <= 0:
            continue
        t1 = time.time()
        imgs, labs, _, _ = decoded_set(parts, n, seed + 100 * kind, sample=is_sample)
        images += imgs
        labels += labs
        kinds += [kind] * len(imgs)
        name = "sampled" if is_sample else "roundtrip"
        stats[name] = len(imgs)
        stats[f"{name}_shape_kept"] = float(np.mean([isinstance(lab["shape"], str) for lab in labs]))
        stats[f"{name}_style_kept"] = float(np.mean([lab["style"] is not None for lab in labs]))
        print(f"{name}: {len(imgs)} pictures in {time.time() - t1:.0f}s; shape label kept for "
              f"{100 * stats[f'{name}_shape_kept']:.0f} %, style for {100 * stats[f'{name}_style_kept']:.0f} %",
              flush=True)
    data = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()  # uint8
    target = targets(labels)
    kinds_t = torch.tensor(kinds)
    share = {0: 1.0 - (ROUNDTRIP_SHARE if decoded and parts is not None else 0)
             - (SAMPLE_SHARE if sampled and parts is not None else 0),
             1: ROUNDTRIP_SHARE, 2: SAMPLE_SHARE}
    weights = torch.zeros(len(images))
    for k in (0, 1, 2):
        m = kinds_t == k
        if m.any():
            weights[m] = share[k] / m.sum()

    net = Detector.load(init).net.train() if init else DetectorNet(width, hidden)
    print(f"parameters: {sum(p.numel() for p in net.parameters()):,}" + (f", starting from {init}" if init else ""),
          flush=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    net.train()
    ema = None
    for step in range(steps):
        idx = torch.multinomial(weights, batch, replacement=True, generator=g)
        x = augment(data[idx].float() / 255, g, rng) * 2 - 1
        out = net(x)
        loss = sum(head_loss(out[k], target[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {ema:.3f}  {time.time() - t0:.0f}s", flush=True)
    net.eval()
    return net, time.time() - t0, time.process_time() - c0, stats


def save(net: DetectorNet, path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # fp16 halves the file; the network runs in fp32 after loading
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    atomic_write(path, lambda p: save_file(state, str(p), metadata=meta))


def add_bands(src: Path, out: Path, gate: dict[str, float] | None) -> int:
    """Write `src`'s network and metadata to `out` with the band gate `gate` (None: remove it)."""
    det = Detector.load(src)
    meta = dict(det.metadata)
    meta.pop("style_bands", None)
    if gate is not None:
        meta["style_bands"] = json.dumps(gate)
        meta["format"] = "training-lab toy detector v3 (v2 CNN + style band gate)"
    save(det.net, out, meta)
    print(f"wrote {out} (gate {gate})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="weights file to write")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--pool", type=int, default=12000, help="pictures rendered once and augmented per step")
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=1200)
    ap.add_argument("--eval-only", action="store_true", help="evaluate --out instead of training")
    ap.add_argument("--model", default="", help="model whose VAE round trips and drawings join the training "
                    "pool (default: the bundled toy model); 'none' = generator pictures only")
    ap.add_argument("--vae", default="", help="use this VAE's weights (safetensors, diffusers keys, metadata "
                    "'config') for the round trips; model drawings are then left out")
    ap.add_argument("--decoded", type=int, default=3000, help="VAE round trips in the pool")
    ap.add_argument("--sampled", type=int, default=1500, help="model drawings (SDEdit) in the pool")
    ap.add_argument("--eval-decoded", type=int, default=600, help="decoded pictures in the per-class table")
    ap.add_argument("--blob-share", type=float, default=0.12, help="share of ellipse blobs in the pool "
                    "(default 0.12)")
    ap.add_argument("--near-heart-share", type=float, default=0.0, help="share of hearts without their notch or "
                    "their point (labelled not the subject) in the pool (default 0; v4 used 0.08)")
    ap.add_argument("--init", default="", help="start from these detector weights (a shorter run adapts a "
                    "detector to another model's decoder)")
    ap.add_argument("--style-bands", default=json.dumps(DEFAULT_BAND_GATE),
                    help="the style head's band gate written into the file's metadata (JSON with min_amp, "
                    "min_ratio, min_gain; see detector.band_features), or 'none' for the CNN alone")
    ap.add_argument("--bands-only", metavar="WEIGHTS", default="",
                    help="no training: copy WEIGHTS to --out with the --style-bands gate (the CNN unchanged)")
    args = ap.parse_args(argv)
    gate = None if args.style_bands == "none" else parse_band_gate(args.style_bands)
    if args.bands_only:
        return add_bands(Path(args.bands_only), args.out, gate)
    torch.set_num_threads(args.threads)
    global BLOB_SHARE, NEAR_HEART_SHARE
    BLOB_SHARE = args.blob_share
    NEAR_HEART_SHARE = args.near_heart_share
    parts = None if args.model == "none" else load_model(args.model, args.vae)
    if args.vae:
        args.sampled = 0

    if args.eval_only:
        det = Detector.load(args.out)
        print(format_table(evaluate(det, args.eval_n)))
        if parts is not None:
            print(format_decoded(evaluate_decoded(det, parts, args.eval_decoded)))
        return 0

    net, seconds, cpu_seconds, stats = train(args.steps, args.batch, args.pool, args.lr, args.seed, args.width,
                                             args.hidden, parts, args.decoded, args.sampled, args.init)
    det = Detector(net)
    t1 = time.time()
    results = evaluate(det, args.eval_n)
    table = format_table(results)
    print(table)
    decoded = evaluate_decoded(det, parts, args.eval_decoded) if parts is not None else {}
    if decoded:
        print(format_decoded(decoded))
    print(f"training {seconds:.0f}s wall, {cpu_seconds:.0f} CPU-s; evaluation {time.time() - t1:.0f}s; "
          f"{args.threads} threads")
    model_name = "none" if parts is None else (args.model or "bundled toy model") + (f" + VAE {args.vae}" if args.vae else "")
    meta = {
        "arch": json.dumps({"width": args.width, "hidden": args.hidden}),
        "heads": json.dumps({k: list(v) for k, v in HEADS.items()}),
        "train_args": json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}),
        "train_seconds": f"{seconds:.0f}",
        "train_cpu_seconds": f"{cpu_seconds:.0f}",
        "eval": json.dumps(results),
        "eval_decoded": json.dumps(decoded),
        "pool": json.dumps(stats),
        "decoded_model": model_name,
        "format": "training-lab toy detector v2",
    }
    if gate is not None:
        meta["style_bands"] = json.dumps(gate)
    save(net, args.out, meta)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
