""".safetensors files with string metadata: atomic writes, read-back, and kohya's precomputed hashes.

- `write_safetensors`: tensors + `{str: str}` metadata, written through `files.atomic_write` (never a truncated
  file). Tensors are moved to the CPU, made contiguous and de-aliased (safetensors refuses shared storage).
- `read_safetensors` / `read_metadata`: the tensors and/or the `__metadata__` table, bad files → `UserError`.
- `kohya_hashes`: the two hashes sd-scripts stores in a LoRA's own metadata (`networks/lora.py save_weights` →
  `train_util.precalculate_safetensors_hashes`), computed on the file *as serialized with only the `ss_*`
  metadata*:
    * `sshs_model_hash` = the "addnet" hash: sha256 of everything after the 8-byte length and the JSON header,
      i.e. of the tensor bytes only. A1111's Lora extension and Additional Networks use it as the LoRA's hash,
      and the value equals `hashes.addnet_hash()` of the final file, since adding metadata changes only the
      header.
    * `sshs_legacy_hash` = sha256 of the 64 KiB at offset 1 MiB of that ss_-only serialization, first 8 hex
      digits (the old Additional Networks hash; it depends on the header, hence the ss_-only rule).
  `write_safetensors(..., add_kohya_hashes=True)` computes both and puts them INTO the written file's metadata.

Works with safetensors 0.4.2 (A1111's pin) through 0.8: only `safetensors.torch.save`/`safe_open` are used.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..errors import UserError
from .files import atomic_write_bytes
from .hashes import addnet_hash_bytes

if TYPE_CHECKING:
    import torch

# sd-scripts' `addnet_hash_legacy`: the old hash reads 0x10000 bytes at 0x100000 (like A1111's legacy model hash).
_LEGACY_OFFSET, _LEGACY_SIZE = 0x100000, 0x10000


def check_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """`metadata` as a plain dict after checking every key and value is a str (safetensors' rule).

    A non-str value is a programming error in the caller (safetensors would raise a cryptic `TypeError ...
    cannot be converted to 'PyString'`), so it raises `TypeError` naming the key.
    """
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be str; not str: {', '.join(map(str, bad[:5]))}")
    return dict(metadata)  # type: ignore[arg-type]


def prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors with no two sharing memory (what `safetensors.torch.save` accepts)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel() and value.data_ptr() in seen:  # views of one storage would be refused
            value = value.clone()
        if value.numel():
            seen.add(value.data_ptr())
        out[key] = value
    return out


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a .safetensors file holding `tensors` (already prepared) and `metadata`."""
    from safetensors.torch import save

    return save(dict(tensors), metadata=dict(metadata) if metadata else None)


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) exactly as sd-scripts computes them before saving a network.

    Only the `ss_*` entries of `metadata` take part (sd-scripts: user metadata may change later, training
    metadata may not). `tensors` must already be in the dtype that will be written.
    """
    return _hashes_of_prepared(prepare_tensors(tensors), check_metadata(metadata))


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      *, overwrite: bool = True, add_kohya_hashes: bool = False) -> Path:
    """Write `tensors` with `metadata` (all str) to `path` atomically and return the path.

    With `add_kohya_hashes`, `sshs_model_hash` and `sshs_legacy_hash` are computed (see the module docstring) and
    written into the file's own metadata, replacing any given values.
    """
    meta = check_metadata(metadata)
    prepared = prepare_tensors(tensors)
    if add_kohya_hashes:
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = _hashes_of_prepared(prepared, meta)
    data = serialize(prepared, meta)
    return atomic_write_bytes(path, data, overwrite=overwrite)


def _hashes_of_prepared(prepared: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[str, str]:
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    data = serialize(prepared, ss_only)
    legacy = hashlib.sha256(data[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_SIZE]).hexdigest()[:8]
    return addnet_hash_bytes(data), legacy


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` table of a .safetensors file, read from the header only (no tensor data)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:  # the format caps headers at 100 MB
                raise ValueError("header too large")
            header = json.loads(fh.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path.name} is not a readable .safetensors file: {e}") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise UserError(f"{path.name}: its metadata is not a table")
    return {str(k): str(v) for k, v in meta.items()}


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the metadata of a .safetensors file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError has no stable import path across 0.4 → 0.8
        raise UserError(f"{path.name} is not a readable .safetensors file: {e}") from None
    return tensors, metadata
