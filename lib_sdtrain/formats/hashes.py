"""The hashes A1111 shows and matches on (modules/hashes.py, sd_models.py, Lora's network.py).

- checkpoint: sha256 of the whole file; shorthash = first 10 hex digits; legacy "model hash" = sha256 of the
  64 KiB at offset 1 MiB, first 8 hex digits.
- LoRA .safetensors: kohya's "addnet" hash = sha256 of everything after the 8-byte length and the JSON
  header (metadata edits do not change it); shorthash = first 12 hex digits. Other files: whole-file sha256.
- embeddings: whole-file sha256 (12 hex shown); hypernetworks: whole-file sha256 (10 hex shown).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | Path, offset: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_MODEL_SHA256: dict[tuple[str, int, int], str] = {}


def model_sha256(path: str | Path) -> str:
    """sha256 of a whole model file, remembered per (resolved path, size, modification time): a base model is
    read once per process however often runs record or check it (a changed file has a new size or time and is
    read again). For integrity checks of files just written, use `sha256_file`."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _MODEL_SHA256:
        _MODEL_SHA256[key] = sha256_file(p)
    return _MODEL_SHA256[key]


def legacy_model_hash(path: str | Path) -> str:
    """A1111's old 8-digit model hash (sha256 of 0x10000 bytes at 0x100000)."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        data = fh.read(0x10000)
    return hashlib.sha256(data).hexdigest()[:8]


def safetensors_data_offset(path: str | Path) -> int:
    """Where the tensor data starts (8 + the header length), checked against the file's size; UserError for a
    file too short or a length that does not fit (the header itself is not needed: `safetensors_io.read_header`
    is the reader that checks it)."""
    from ..errors import UserError

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) != 8:
        raise UserError(f"{path.name} is too short to be a .safetensors file")
    (n,) = struct.unpack("<Q", raw)
    if n > 100_000_000 or 8 + n > size:
        raise UserError(f"{path.name} is not a readable .safetensors file: its header length {n} does not fit the file")
    return 8 + n


def addnet_hash(path: str | Path) -> str:
    """kohya/A1111 LoRA hash of a .safetensors file: sha256 of the tensor data after the header."""
    return sha256_file(path, safetensors_data_offset(path))


def addnet_hash_bytes(data: bytes) -> str:
    """The same hash for a file not yet written (used to put `sshs_model_hash` into its own metadata)."""
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def lora_hash(path: str | Path) -> str:
    path = Path(path)
    return addnet_hash(path) if path.suffix.lower() == ".safetensors" else sha256_file(path)
