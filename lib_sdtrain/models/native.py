"""A model file's native picture size, read from its header alone (no weights loaded).

Order of evidence:
  1. `modelspec.resolution` metadata ("WxH"; the toy model and files we write carry it),
  2. our `lab.architecture` metadata: the UNet's latent `sample_size` × the VAE's down-scaling factor,
  3. the family from the tensor names (SD1 512, SD2 768 for v-prediction / 512 for eps, SDXL 1024), where a
     UNet far narrower than any stock model (first block below 320 channels: a toy or test model with no
     metadata) counts as 64 px, the smallest bucket size.

`probe_model` also proves that the file opens and is a Stable Diffusion checkpoint, which is what the preflight
check needs before a run scans its dataset: it reads the `.safetensors` header (or walks a pickled checkpoint's
structure through the safe unpickler without reading tensor bytes).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..formats.names import unsupported_model_file
from . import detect

STOCK_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
SMALL_UNET_CHANNELS = 320     # every stock SD1/SD2/SDXL UNet starts with 320 channels
SMALL_MODEL_SIZE = 64


@dataclass
class ModelProbe:
    path: Path
    family: str
    prediction: str               # "eps" | "v" | "" (unknown until the weights are loaded: SD2 without a hint)
    native: int                   # native square size in pixels
    source: str                   # where `native` came from, for messages
    metadata: dict[str, str] = field(default_factory=dict)


def read_model_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """{key: shape} and string metadata, without reading tensor data."""
    if not path.is_file():
        raise UserError(f"model file not found: {path}" if not path.exists() else f"model path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _safetensors_header(path)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        from ..formats.safe_pickle import find_state_dict, open_checkpoint
        from ..formats.unpickler import LazyTensor

        with open_checkpoint(path) as archive:
            sd = find_state_dict(archive.root)
            shapes = {k: tuple(v.shape) for k, v in sd.items() if isinstance(k, str) and isinstance(v, LazyTensor)}
        return shapes, {}
    raise unsupported_model_file(path)


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The checked header of a .safetensors file (`formats.safetensors_io.read_header`, the one validated reader;
    no torch import): {key: shape} and the string metadata."""
    from ..formats.safetensors_io import read_header

    header = read_header(path)
    return {k: t.shape for k, t in header.tensors.items()}, header.metadata


def _spec_size(text: str) -> int | None:
    try:
        w, h = (int(v) for v in text.lower().replace(" ", "").split("x"))
    except ValueError:
        return None
    if w <= 0 or h <= 0:
        return None
    return w if w == h else max(64, int(round(math.sqrt(w * h) / 64)) * 64)


def _arch_size(raw: str) -> int | None:
    try:
        arch = json.loads(raw)
        latent = int(arch["unet"]["sample_size"])
        levels = len(arch.get("vae", {}).get("block_out_channels") or [0, 0, 0, 0])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return latent * 2 ** (levels - 1) if latent > 0 else None


def probe_model(path: str | Path) -> ModelProbe:
    """Open `path`'s header: family, prediction type and native size; UserError when it is not a usable model."""
    path = Path(path).expanduser()
    shapes, metadata = read_model_header(path)
    family = detect.detect_family(shapes)
    hints = {**detect.read_yaml_hints(path), **detect.read_metadata_hints(metadata)}
    prediction = hints.get("prediction") or ("v" if "v_pred" in shapes else ("" if family == "sd2" else "eps"))
    size = _spec_size(metadata.get("modelspec.resolution", ""))
    if size:
        return ModelProbe(path, family, prediction, size, "modelspec.resolution metadata", metadata)
    size = _arch_size(metadata.get(detect.ARCH_KEY, ""))
    if size:
        return ModelProbe(path, family, prediction, size, "lab.architecture metadata", metadata)
    channels = shapes.get(detect.UNET_IN, (0,))[0]
    if channels and channels < SMALL_UNET_CHANNELS:
        return ModelProbe(path, family, prediction, SMALL_MODEL_SIZE,
                          f"a small UNet ({channels} channels, no size in the metadata)", metadata)
    size = 512 if family == "sd2" and prediction == "eps" else STOCK_SIZE[family]
    return ModelProbe(path, family, prediction, size, f"{family} default", metadata)


def family_size(family: str, prediction: str = "") -> int:
    """The stock size of a family (A1111's loaded model: SD1 512, SD2 768-v / 512 eps, SDXL 1024)."""
    return 512 if family == "sd2" and prediction == "eps" else STOCK_SIZE.get(family, 512)


def default_buckets(resolution: int, step: int = 64) -> tuple[int, int]:
    """kohya's defaults 256..1024 at 512, scaled with the resolution: (resolution/2, resolution×2), on the
    bucket step and never below one step."""
    low = max(step, (resolution // 2) // step * step)
    high = max(resolution, -(-resolution * 2 // step) * step)
    return low, high


def default_buckets_for(width: int, height: int, step: int = 64) -> tuple[int, int]:
    """`default_buckets` for a resolution of two sides (the dataset tools' "768x512"): the smallest bucket from
    the shorter side, the largest from the longer, so the bounds hold both (256-1536 at 768x512)."""
    return default_buckets(min(width, height), step)[0], default_buckets(max(width, height), step)[1]
