""".safetensors files with string metadata: atomic writes, read-back, and kohya's precomputed hashes.

- `write_safetensors`: tensors + `{str: str}` metadata, written through `files.atomic_write` (never a truncated
  file). Tensors are moved to the CPU, made contiguous and de-aliased (safetensors refuses shared storage).
- `read_header`: the ONE validated reader of a `.safetensors` header (type, nesting, sizes, offsets, dtypes,
  shape × item size = byte span, no overlap or gap); every entry point that reads a user's file goes through it.
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
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ..errors import UserError
from .files import atomic_write_bytes, disk_error_reason
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


# ---- the one validated header reader ------------------------------------------------------------------------
# Every entry point that opens a user's .safetensors file reads its header here first, so a hostile or broken
# header (not JSON, deep nesting, a list or null instead of a table, sizes or offsets that do not add up,
# overlapping tensors, an unknown dtype) is one clear UserError, never a traceback (RecursionError,
# AttributeError, a Rust panic) and never a huge allocation.
MAX_HEADER_BYTES = 100_000_000          # the format's own limit
MAX_DIMS = 64
DTYPE_SIZES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int              # byte offsets in the data section (after the 8-byte length and the header)
    end: int


@dataclass
class SafetensorsHeader:
    path: Path
    header_size: int
    file_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


class _Bad(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Bad(f"the key {k[:60]!r} appears twice")
        out[k] = v
    return out


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(raw: bytes, data_size: int) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """(metadata, tensors) of a header's JSON bytes, checked against a data section of `data_size` bytes.
    Raises ValueError with the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("the header is not UTF-8 text") from None
    if not text.lstrip().startswith("{"):
        raise _Bad("the header is not a JSON table")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _Bad("the header is nested too deeply") from None
    except _Bad:
        raise
    except ValueError as e:
        raise _Bad(f"the header is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise _Bad("the header is not a JSON table")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Bad("its __metadata__ is not a table of text values")
    entries: list[TensorEntry] = []
    for name, info in header.items():
        where = f"tensor {name[:60]!r}"
        if not isinstance(info, dict):
            raise _Bad(f"{where}: its entry is not a table")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _Bad(f"{where}: unsupported dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_int(d) and d >= 0 for d in shape):
            raise _Bad(f"{where}: its shape is not a list of at most {MAX_DIMS} non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(o) for o in offsets) \
                or not 0 <= offsets[0] <= offsets[1] <= data_size:
            raise _Bad(f"{where}: its data offsets are not two increasing integers within the file")
        count = 1
        for d in shape:
            count *= d
        if count * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
            raise _Bad(f"{where}: shape {shape[:8]} of {dtype} does not fill its {offsets[1] - offsets[0]} bytes")
        entries.append(TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1]))
    pos = 0
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start != pos:
            raise _Bad(f"tensor {e.name[:60]!r}: its bytes {'overlap another' if e.start < pos else 'leave a gap'}")
        pos = e.end
    if pos != data_size:
        raise _Bad(f"the tensors cover {pos} of the {data_size} data bytes")
    return dict(meta), {e.name: e for e in entries}


def read_header(path: str | Path) -> SafetensorsHeader:
    """The checked header of a .safetensors file (reads only the header); UserError for anything wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            raw = fh.read(8)
            if len(raw) != 8:
                raise _Bad("the file is too short")
            (n,) = struct.unpack("<Q", raw)
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise _Bad(f"its header length {n} does not fit the file ({size} bytes)")
            body = fh.read(n)
            if len(body) != n:
                raise _Bad("the file is shorter than its header")
        meta, tensors = parse_header(body, size - 8 - n)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a .safetensors file") from None
    except (OSError, ValueError, MemoryError) as e:
        raise UserError(f"{path.name} is not a readable .safetensors file: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
    return SafetensorsHeader(path, n, size, meta, tensors)


def json_table(text: str | None) -> dict | None:
    """A metadata value holding a JSON table (`lab.config`, `ss_network_args` ...) as a dict; None when it is
    missing, not JSON, nested too deeply, or not a table. Metadata is the user's input like the rest of a file."""
    if not text or not isinstance(text, str) or not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` table of a .safetensors file, read from the checked header only (no tensor data)."""
    return read_header(path).metadata


def read_safetensors(path: str | Path, keys: list[str] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (or those named in `keys`) on the CPU, and the metadata, after checking the header."""
    header = read_header(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(header.tensors) if keys is None else [k for k in keys if k in header.tensors]
            tensors = {k: f.get_tensor(k) for k in names}
    except Exception as e:  # SafetensorError has no stable import path across 0.4 → 0.8
        reason = disk_error_reason(e)
        raise UserError(f"{Path(path).name} is not a readable .safetensors file: {reason or e}") from None
    return tensors, header.metadata
