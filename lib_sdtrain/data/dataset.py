"""Pictures → training tensors: bucketed resize and crop, per-sample captions, mirroring, and the latent cache.

The cache holds the VAE's mean latent of each (picture content, bucket, crop) for one model, in memory and
optionally on disk, keyed by a hash of the file's bytes, so an edited picture is never served stale.

With `flip` on (kohya's `flip_aug`), each time a picture is used it is mirrored left-right with probability 1/2,
drawn from (seed, epoch, step, position, picture) so a resumed run makes the same draws; with `swap_sides` the
mirrored picture's caption says right for left and left for right. The cache then holds
the latent of the mirrored picture too, encoded from its pixels (a VAE is not exactly mirror-symmetric, so
mirroring the latent instead would train on something the VAE never makes). SDXL's crop offset is mirrored with
the picture: the left offset becomes the one cut from the mirrored picture's left.

With `masked` on (A1111's "use PNG alpha channel as loss weight", kohya's `masked_loss` with alpha masks), each
picture with transparency also gives a loss mask: its alpha, fitted like the pixels and averaged over each latent
cell. The alpha is then a weight, not transparency: a pixel keeps its stored colour wherever its alpha is above 0
(as A1111 and kohya read it, so a background at weight 0.2 still shows its own colours), and only pixels of alpha
0, whose weight is 0 and whose stored colour means nothing, are put on white. Without `masked`, a transparent
picture is put on white everywhere. The masks are small (one value per latent cell); they are kept in memory and
beside the latents in the disk cache. Opaque pictures weigh 1 everywhere. A picture with a mask file (OneTrainer's
"-masklabel" sidecar or kohya's mask folder, `data.masks`) takes its weights from that file instead.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import BucketAssignment, BucketPlan, SizeConditioning
from .captions import CaptionOptions, process_caption, swap_sides
from .scan import ImageRecord, has_transparency
from .templates import PromptTemplate
from .thumbnail import eight_bit_grey

LATENT_FACTOR = 8   # pixels per latent cell in every SD family (the VAE's downscale)


def load_picture(path: Path, a: BucketAssignment, *, mirrored: bool = False) -> torch.Tensor:
    """RGB pixels [3, H, W] in [-1, 1] at the bucket size: resize to cover, then crop as assigned (and mirror
    left-right after the crop when `mirrored`)."""
    return load_picture_and_mask(path, a, mirrored=mirrored)[0]


def load_picture_and_mask(path: Path, a: BucketAssignment, *, mirrored: bool = False, mask: bool = False,
                          mask_file: Path | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixels, loss mask). Transparent pictures are put on white. With `mask`, a picture with transparency
    also gives its alpha channel, resized, cropped and mirrored with the pixels and averaged over each
    latent cell: [1, H/8, W/8] in [0, 1]; an opaque picture gives None (weight 1 everywhere). The alpha is
    then a weight: pixels keep their colour where it is above 0 and are white only where it is 0. A
    `mask_file` (data.masks) gives the weights instead; the picture's transparency is then put on white."""
    with Image.open(path) as im:
        im = eight_bit_grey(ImageOps.exif_transpose(im))   # a 16-bit grey picture is scaled, not clipped to white
        alpha = None
        if mask and mask_file is not None:
            from .masks import read_mask

            alpha = read_mask(mask_file, im.size)
            mask = False                           # the picture's own alpha is transparency again
        if has_transparency(im.mode, im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGB", im.size, (255, 255, 255))
            if mask:
                alpha = im.getchannel("A")
                bg.paste(im.convert("RGB"), (0, 0), alpha.point(lambda v: 255 if v else 0))
                im = bg
            else:
                im = Image.alpha_composite(bg.convert("RGBA"), im)
        im = im.convert("RGB")
        w, h = a.bucket
        box = (a.crop_left, a.crop_top, a.crop_left + w, a.crop_top + h)

        def fit(layer: Image.Image) -> Image.Image:
            if layer.size != tuple(a.resized):
                # the crop of the resized picture, resampled from the matching region of the original: the same
                # pixels (within rounding), without making the whole resized picture first, which for a very thin
                # picture (64 x 1,000,000 px, under the bomb limit) stretched to cover its bucket took gigabytes
                sx, sy = layer.size[0] / a.resized[0], layer.size[1] / a.resized[1]
                region = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
                layer = layer.resize((w, h), Image.Resampling.LANCZOS, box=region)
            else:
                layer = layer.crop(box)
            return layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else layer

        arr = np.asarray(fit(im), dtype=np.float32)
        weights = None
        if alpha is not None and (mask_file is not None or alpha.getextrema() != (255, 255)):
            cells = torch.from_numpy(np.asarray(fit(alpha), dtype=np.float32) / 255.0)[None, None]
            size = (max(1, h // LATENT_FACTOR), max(1, w // LATENT_FACTOR))
            weights = torch.nn.functional.interpolate(cells, size=size, mode="area")[0]
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0, weights


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


class TrainData:
    """Records + bucket plan + caption options; yields pixels/latents and captions per index."""

    def __init__(self, records: list[ImageRecord], plan: BucketPlan, captions: CaptionOptions, *, seed: int,
                 max_steps: int = 0, template: PromptTemplate | None = None, name: str = "",
                 flip: bool = False, masked: bool = False, swap_sides: bool = False) -> None:
        self.records, self.plan, self.captions, self.seed, self.max_steps = records, plan, captions, seed, max_steps
        self.template, self.name = template, name     # A1111 prompt template: [name] → name, [filewords] → caption
        self.flip = flip
        self.swap_sides = swap_sides                        # a mirrored picture's caption swaps left and right
        self.cache: dict[int, torch.Tensor] = {}
        self.mirror_cache: dict[int, torch.Tensor] = {}   # with `flip`: the mirrored pictures' latents
        self.masked = masked                               # the alpha channel weights the loss
        self.masks: dict[tuple[int, bool], torch.Tensor | None] = {}   # (picture, mirrored) → latent-size mask

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, i: int, epoch: int, step: int, *, mirrored: bool = False) -> str:
        rng = random.Random(f"caption:{self.seed}:{epoch}:{step}:{i}")
        text = process_caption(self.records[i].caption, self.captions, rng, epoch=epoch, step=step,
                               max_train_steps=self.max_steps)
        if mirrored and self.swap_sides:
            text = swap_sides(text)
        if self.template is None:
            return text
        return self.template.prompt(random.Random(f"template:{self.seed}:{epoch}:{step}:{i}"), self.name, text)

    def mirrored(self, i: int, epoch: int, step: int, position: int) -> bool:
        """Whether picture `i`, at `position` in the batch of (epoch, step), is used mirrored (flip on: 1/2)."""
        if not self.flip:
            return False
        return random.Random(f"flip:{self.seed}:{epoch}:{step}:{position}:{i}").random() < 0.5

    def pixels(self, i: int, *, mirrored: bool = False) -> torch.Tensor:
        pixels, weights = load_picture_and_mask(self.records[i].path, self.plan.assignments[i], mirrored=mirrored,
                                                mask=self.masked, mask_file=self.records[i].mask)
        if self.masked:
            self.masks[(i, mirrored)] = weights
        return pixels

    def mask(self, i: int, *, mirrored: bool = False) -> torch.Tensor:
        """The loss weights [1, H/8, W/8] of picture `i` (masked on): its alpha, or ones for an opaque picture."""
        if (i, mirrored) not in self.masks:
            self.pixels(i, mirrored=mirrored)
        weights = self.masks[(i, mirrored)]
        if weights is not None:
            return weights
        w, h = self.plan.assignments[i].bucket
        return torch.ones(1, max(1, h // LATENT_FACTOR), max(1, w // LATENT_FACTOR))

    def size_conditioning(self, i: int, *, mirrored: bool = False) -> SizeConditioning:
        """SDXL's sizes for picture `i`; mirrored, the crop's left offset is the one on the mirrored side."""
        a = self.plan.assignments[i]
        sizes = a.size_conditioning()
        if not mirrored:
            return sizes
        right = a.resized[0] - a.crop_left - a.bucket[0]
        return replace(sizes, crop_top_left=(a.crop_top, right))

    def cache_key(self, i: int, model_id: str, *, mirrored: bool = False) -> str:
        a = self.plan.assignments[i]
        text = f"{file_digest(self.records[i].path)}:{a.bucket}:{a.resized}:{a.crop_left}:{a.crop_top}:{model_id}"
        if mirrored:
            text += ":mirrored"
        if self.masked and self.records[i].mask is not None:
            text += f":mask={file_digest(self.records[i].mask)}"   # the cache file keeps the mask: an edit is new
        elif self.masked and self.records[i].transparent:
            text += ":alpha-as-weight"    # the pixels differ: colours kept under partial alpha, not put on white
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    @torch.no_grad()
    def build_cache(self, encode, model_id: str, disk_dir: Path | None = None, progress=None, stop=None) -> None:
        """Encode every picture once. `encode(pixels [B,3,H,W]) -> latents`; disk files are safetensors."""
        from safetensors.torch import load_file, save_file

        from ..formats.files import atomic_write

        for n, i in enumerate(range(len(self.records))):
            if stop is not None and stop.requested:
                return
            for mirrored in ((False, True) if self.flip else (False,)):
                cache = self.mirror_cache if mirrored else self.cache
                key = self.cache_key(i, model_id, mirrored=mirrored) if disk_dir else ""
                path = disk_dir / f"{key}.safetensors" if disk_dir else None
                if path is not None and path.is_file():
                    try:
                        stored = load_file(str(path))
                        cache[i] = stored["latents"]
                        if self.masked:
                            if "mask" in stored:
                                self.masks[(i, mirrored)] = stored["mask"]
                            else:                 # a file written by a run without masked_loss: read the picture
                                self.mask(i, mirrored=mirrored)
                        continue
                    except Exception:  # noqa: BLE001 - a broken cache file is rebuilt
                        pass
                latents = encode(self.pixels(i, mirrored=mirrored)[None])[0].float().cpu()
                cache[i] = latents
                if path is not None:
                    tensors = {"latents": latents.contiguous()}
                    if self.masked:
                        tensors["mask"] = self.mask(i, mirrored=mirrored).contiguous()
                    atomic_write(path, lambda p, t=tensors: save_file(t, str(p)))
            if progress:
                progress(n + 1, len(self.records))

    def batch(self, indices: list[int], epoch: int, step: int, *, use_cache: bool) -> dict[str, Any]:
        """Tensors for one batch (all from one bucket)."""
        flips = [self.mirrored(i, epoch, step, j) for j, i in enumerate(indices)]
        out: dict[str, Any] = {
            "captions": [self.caption(i, epoch, step, mirrored=f) for i, f in zip(indices, flips)],
            "is_reg": torch.tensor([self.records[i].is_regularization for i in indices]),
            "sizes": [self.size_conditioning(i, mirrored=f) for i, f in zip(indices, flips)],
            "mirrored": flips,
        }
        if use_cache:
            out["latents"] = torch.stack([(self.mirror_cache if f else self.cache)[i] for i, f in zip(indices, flips)])
        else:
            out["pixels"] = torch.stack([self.pixels(i, mirrored=f) for i, f in zip(indices, flips)])
        if self.masked:
            out["masks"] = torch.stack([self.mask(i, mirrored=f) for i, f in zip(indices, flips)])
        return out
