"""The output side of a conversion: options, result record, verified `.safetensors` writing and hashes.

Every converter ends in `write_verified`: the tensors are made safetensors-ready (detached, contiguous,
optionally cast, storage sharing broken), written through `atomic_write` to a temporary file, read back
and compared byte for byte before the file takes its final name. A failed comparison leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .. import __version__
from ..config import ConfigBase, setting
from ..errors import UserError
from ..formats import hashes
from ..formats.files import atomic_write

# --dtype value -> torch dtype name (resolved lazily: this module must not import torch at import time)
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass
class ConvertConfig(ConfigBase):
    """How `convert` writes its outputs (the CLI flags and the Convert tab are generated from these fields)."""

    KIND = "convert"

    dtype: str | None = setting(None, "cast floating-point tensors to this precision (integer and bool "
                                      "tensors are kept); default: keep each tensor's dtype",
                                choices=list(DTYPES))
    overwrite: bool = setting(False, "replace existing output files (inputs are never replaced)")
    keep_ema: bool = setting(False, "keep the EMA copy of the weights (model_ema.*) instead of dropping it")


@dataclass
class ConvertResult:
    """What happened to one input file."""

    source: Path
    status: str                          # "converted" | "up to date" | "refused"
    kind: str = ""                       # "checkpoint" | "embedding" | "hypernetwork" | ""
    output: Path | None = None
    message: str = ""
    hashes: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status != "refused"


# ---- metadata -------------------------------------------------------------------------------------------
def conversion_metadata(kind: str, source: Path, source_sha256: str, layout: str, cfg: ConvertConfig,
                        dropped: dict[str, Any]) -> dict[str, str]:
    """The `converted_*` keys every output carries: where it came from and what was left out."""
    return {
        "converted_by": f"Training Lab {__version__} convert",
        "converted_kind": kind,
        "converted_from": source.name,
        "converted_from_sha256": source_sha256,
        "converted_from_format": f"torch {layout}",
        "converted_dtype": cfg.dtype or "unchanged",
        "converted_dropped": json.dumps(dropped, sort_keys=True),
    }


def scalar_text(value: Any) -> str | None:
    """A metadata string for a plain scalar (global_step, epoch, name...), None for anything else."""
    if isinstance(value, bool) or value is None:
        return None if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value[:1000]
    return None


# ---- tensors ready for safetensors ---------------------------------------------------------------------
def prepare_tensors(items: Iterable[tuple[str, Any]], dtype: str | None) -> tuple[dict[str, Any], dict[str, int]]:
    """Detached, contiguous tensors that safetensors accepts, cast to `dtype` ("fp16"/"bf16"/"fp32") if given.

    `items` may be a generator that loads tensors one at a time; each is cast as it arrives, so a
    full-precision source never sits in memory next to its cast copy. safetensors refuses tensors that
    share memory (tied or sliced weights; up to A1111's 0.4.2 even disjoint slices of one storage), so every
    tensor after the first in a storage group is cloned. Returns the tensors and counts: `shared_copies`,
    `cast`, `overflow` (tensors that became inf in fp16 although they were finite before).
    """
    import torch

    target = getattr(torch, DTYPES[dtype]) if dtype else None
    out: dict[str, Any] = {}
    owners: set[int] = set()
    counts = {"shared_copies": 0, "cast": 0, "overflow": 0}
    for key, t in items:
        t = t.detach()
        if target is not None and t.is_floating_point() and t.dtype != target:
            cast = t.to(target)
            counts["cast"] += 1
            if target == torch.float16 and not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(t).all()):
                counts["overflow"] += 1
            t = cast
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in owners:
                t = t.clone()
                counts["shared_copies"] += 1
            else:
                owners.add(ptr)
        out[key] = t
    return out, counts


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))  # NaN-safe


def verify_file(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Re-read `path` and compare every tensor bit for bit, plus the metadata; UserError on any difference."""
    from safetensors import safe_open

    from ..formats.safetensors_io import read_header

    read_header(path)   # what we wrote must pass the same check as any input
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(tensors):
            raise UserError(f"verification failed: {path.name} holds {len(keys)} tensors, expected {len(tensors)}")
        if dict(f.metadata() or {}) != metadata:
            raise UserError(f"verification failed: metadata of {path.name} differs")
        for key in tensors:
            if not _same_bits(f.get_tensor(key), tensors[key]):
                raise UserError(f"verification failed: tensor {key[:80]!r} differs after writing {path.name}")


def write_verified(path: Path, tensors: dict[str, Any], metadata: dict[str, str], *, overwrite: bool) -> None:
    """Write `tensors` + `metadata` to `path` atomically, verified before the file gets its name."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a dtype this safetensors version cannot store
            raise UserError(f"cannot write {path.name}: safetensors refused the tensors ({type(e).__name__}: {e})") from None
        verify_file(tmp, tensors, metadata)

    atomic_write(path, write, overwrite=overwrite)


def a1111_hashes(path: Path, kind: str) -> dict[str, str]:
    """The hashes A1111 shows for `path` as a `kind` file (a1111_defaults.json `hashes`).

    checkpoint: sha256, shorthash (10 hex) and the legacy 8-hex model hash; embedding: sha256 and its
    12-hex shorthash; hypernetwork: sha256 and 10 hex.
    """
    sha = hashes.sha256_file(path)
    if kind == "checkpoint":
        return {"sha256": sha, "shorthash": sha[:10], "model_hash": hashes.legacy_model_hash(path)}
    if kind == "embedding":
        return {"sha256": sha, "shorthash": sha[:12]}
    return {"sha256": sha, "shorthash": sha[:10]}


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of an existing .safetensors file ({} if it is not one)."""
    from ..formats.safetensors_io import read_metadata as read_checked

    try:
        return read_checked(path)
    except UserError:  # any unreadable file simply has no metadata for us
        return {}
