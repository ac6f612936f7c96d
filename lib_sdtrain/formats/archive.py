"""The two container layouts `torch.save` writes, read without `torch.load`.

- **zip** (torch >= 1.6): `<prefix>/data.pkl` (the pickled object), `<prefix>/data/<key>` (one member per
  storage, raw little-endian bytes), plus `version`, `byteorder`, `.data/serialization_id` and, from newer
  torch (2.13 writes them), `.format_version` and `.storage_alignment`. Every member must use one prefix
  and one of those names (A1111's `check_zip_filenames` rule, widened by the two new names); path tricks
  (`..`, absolute paths, backslashes, drive letters), duplicates, a second `data.pkl`, encryption and
  unusual compression are refused before anything is parsed. TorchScript archives (`code/`,
  `constants.pkl`) fall under "unexpected member".
- **legacy** (`_use_new_zipfile_serialization=False`, torch < 1.6): five pickles in a row (magic number,
  protocol version 1001, sys info, the object, the list of storage keys) followed, for each key in that
  list, by an int64 element count and the storage's raw bytes.

Both hand the object pickle to `unpickler.run_pickle`; storages are only indexed while parsing, and read
when a `LazyTensor` is loaded. The old tar layout (torch < 0.4) is refused.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from .unpickler import LazyTensor, ModuleStub, PickleCorrupt, PickleRefused, StorageRef, StorageType, run_pickle, show

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# data.pkl holds structure only (a few MB even for SDXL with optimizer states); bigger means abuse.
MAX_PICKLE_BYTES = 512 << 20
# A deflated member may not claim to expand more than this (torch writes stored members; see _check_info).
MAX_DEFLATE_RATIO = 64

_FIXED_MEMBERS = {"data.pkl", "version", ".data/version", "byteorder", ".data/serialization_id",
                  ".format_version", ".storage_alignment"}
_STORAGE_MEMBER = re.compile(r"^data/([0-9]{1,12})$")


class TorchArchive:
    """An opened torch file: `root` is the unpickled object with `LazyTensor` leaves.

    Use as a context manager; tensors can be loaded until it is closed. `layout` is "zip" or "legacy".
    """

    layout = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root: Any = None
        self.big_endian = False
        self._declared: dict[str, tuple[Any, int]] = {}     # storage key -> (dtype, numel) from the pickle
        self._raw: dict[str, Any] = {}                      # storage key -> uint8 tensor (read once)
        self._closed = False

    # ---- storage references from the pickle ------------------------------------------------------------
    def _persistent_load(self, pid: tuple) -> StorageRef:
        raise NotImplementedError

    def _declare(self, key: Any, storage_type: Any, location: Any, numel: Any) -> StorageRef:
        if not isinstance(storage_type, StorageType):
            raise PickleRefused("persistent id without a storage type")
        if not isinstance(key, str) or not isinstance(location, str) or type(numel) is not int or numel < 0:
            raise PickleRefused("malformed storage reference")
        seen = self._declared.setdefault(key, (storage_type.dtype, numel))
        if seen != (storage_type.dtype, numel):
            raise PickleRefused(f"storage {key} is declared twice with different types or sizes")
        return StorageRef(key, storage_type.dtype, numel, location)

    # ---- reading tensor bytes ------------------------------------------------------------------------
    def _read_bytes(self, key: str, nbytes: int) -> bytearray:
        raise NotImplementedError

    def read_storage(self, ref: StorageRef):
        """The whole root storage of `ref` as a 1-D tensor of its dtype (cached; shared by all views)."""
        import torch

        if self._closed:
            raise PickleCorrupt(f"{self.path.name} is closed")
        if ref.key not in self._raw:
            dtype, numel = self._declared[ref.key]
            item = torch.empty((), dtype=dtype).element_size()
            buf = self._read_bytes(ref.key, numel * item)
            raw = torch.frombuffer(buf, dtype=torch.uint8) if len(buf) else torch.empty(0, dtype=torch.uint8)
            if self.big_endian and item > 1:  # stored big-endian: reverse each element's bytes
                raw = raw.view(-1, item).flip(1).reshape(-1).clone()
            self._raw[ref.key] = raw.view(dtype) if len(raw) else torch.empty(0, dtype=dtype)
        return self._raw[ref.key]

    def forget(self, key: str) -> None:
        """Release the cached bytes of storage `key` (tensors already loaded keep their memory)."""
        self._raw.pop(key, None)

    def tensors(self) -> list[LazyTensor]:
        """Every LazyTensor reachable from `root` (each once)."""
        out: list[LazyTensor] = []
        seen: set[int] = set()
        todo = [self.root]
        while todo:
            obj = todo.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, LazyTensor):
                out.append(obj)
            elif isinstance(obj, dict):
                todo.extend(obj.values())
            elif isinstance(obj, (list, tuple, set, frozenset)):
                todo.extend(obj)
            elif isinstance(obj, ModuleStub):
                todo.extend(obj.state.values())
        return out

    def _attach(self) -> None:
        for t in self.tensors():
            t.reader = self.read_storage

    def close(self) -> None:
        self._closed = True
        self._raw.clear()

    def __enter__(self) -> TorchArchive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ZipArchive(TorchArchive):
    layout = "zip"

    def __init__(self, path: Path, fh: BinaryIO, size: int) -> None:
        super().__init__(path)
        self._fh = fh
        self._zip = zipfile.ZipFile(fh)
        self._size = size
        self.prefix, self._members = self._check_members()
        order = self._read_small("byteorder", default=b"little")
        if order not in (b"little", b"big"):
            raise PickleCorrupt(f"unknown byte order {show(order)}")
        self.big_endian = order == b"big"
        data = self._read_member(self._members["data.pkl"], MAX_PICKLE_BYTES)
        stream = io.BytesIO(bytes(data))
        self.root = run_pickle(stream, self._persistent_load)
        if stream.tell() != len(data):
            raise PickleCorrupt(f"{len(data) - stream.tell()} unexpected bytes after the pickle in data.pkl")
        for key, (dtype, numel) in self._declared.items():
            info = self._members.get(f"data/{key}")
            if info is None:
                raise PickleCorrupt(f"storage data/{key} is missing from the archive")
            import torch

            if info.file_size != numel * torch.empty((), dtype=dtype).element_size():
                raise PickleCorrupt(f"storage data/{key} has {info.file_size} bytes, the pickle expects "
                                    f"{numel} x {dtype}")
        self._attach()

    def _check_members(self) -> tuple[str, dict[str, zipfile.ZipInfo]]:
        prefixes: set[str] = set()
        members: dict[str, zipfile.ZipInfo] = {}
        for info in self._zip.infolist():
            name = info.filename
            _check_member_name(name)
            prefix, _, rest = name.partition("/")
            prefixes.add(prefix)
            if len(prefixes) > 1:
                raise PickleRefused(f"zip members come from more than one archive prefix ({', '.join(sorted(prefixes))})")
            if rest not in _FIXED_MEMBERS and not _STORAGE_MEMBER.match(rest):
                raise PickleRefused(f"unexpected zip member {show(name)} (not part of a torch.save archive)")
            if rest in members:
                what = "two data.pkl members" if rest == "data.pkl" else f"duplicate zip member {show(name)}"
                raise PickleRefused(what)
            self._check_info(info)
            members[rest] = info
        if "data.pkl" not in members:
            raise PickleRefused("no data.pkl in the zip archive (not a torch.save file)")
        return prefixes.pop(), members

    def _check_info(self, info: zipfile.ZipInfo) -> None:
        if info.flag_bits & 0x1:
            raise PickleRefused(f"zip member {show(info.filename)} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise PickleCorrupt(f"zip member {show(info.filename)} has inconsistent sizes")
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            if info.file_size > MAX_DEFLATE_RATIO * info.compress_size + (1 << 16):
                raise PickleRefused(f"zip member {show(info.filename)} claims an implausible compression ratio")
        else:
            raise PickleRefused(f"zip member {show(info.filename)} uses an unsupported compression method")
        if info.header_offset + info.compress_size > self._size:
            raise PickleCorrupt(f"zip member {show(info.filename)} runs past the end of the file")

    def _read_small(self, rest: str, default: bytes) -> bytes:
        info = self._members.get(rest)
        return bytes(self._read_member(info, 64)).strip() if info is not None else default

    def _read_member(self, info: zipfile.ZipInfo, limit: int) -> bytearray:
        if info.file_size > limit:
            raise PickleRefused(f"zip member {show(info.filename)} is too large ({info.file_size} bytes)")
        buf = bytearray(info.file_size)
        view = memoryview(buf)
        with self._zip.open(info) as f:   # zipfile checks the CRC when the member is read to its end
            got = 0
            while got < len(buf):
                n = f.readinto(view[got:])
                if not n:
                    raise PickleCorrupt(f"zip member {show(info.filename)} is truncated")
                got += n
            if f.read(1):
                raise PickleCorrupt(f"zip member {show(info.filename)} is longer than declared")
        return buf

    def _persistent_load(self, pid: tuple) -> StorageRef:
        # ('storage', storage_type, key, location, numel)
        if len(pid) != 5 or pid[0] != "storage":
            raise PickleRefused(f"unknown persistent id kind {show(pid[0])}" if pid else "empty persistent id")
        return self._declare(pid[2], pid[1], pid[3], pid[4])

    def _read_bytes(self, key: str, nbytes: int) -> bytearray:
        return self._read_member(self._members[f"data/{key}"], nbytes)

    def close(self) -> None:
        super().close()
        self._zip.close()
        self._fh.close()


class LegacyArchive(TorchArchive):
    layout = "legacy"

    def __init__(self, path: Path, fh: BinaryIO, size: int) -> None:
        super().__init__(path)
        self._fh = fh
        reader = _Bounded(fh, size)
        if run_pickle(reader) != LEGACY_MAGIC:
            raise PickleCorrupt("not a torch file (bad magic number)")
        if run_pickle(reader) != LEGACY_PROTOCOL:
            raise PickleCorrupt("unsupported legacy torch protocol version")
        info = run_pickle(reader)
        if not isinstance(info, dict) or info.get("little_endian") is not True:
            raise PickleRefused("legacy torch files from big-endian machines are not supported")
        self._views: dict[str, tuple[str, int, int]] = {}
        self.root = run_pickle(reader, self._persistent_load)
        keys = run_pickle(reader)
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
            raise PickleCorrupt("malformed storage key list")
        self._offsets: dict[str, int] = {}
        import torch

        pos = fh.tell()
        for key in keys:
            if key not in self._declared:
                raise PickleCorrupt(f"storage {key} is listed but never used")
            dtype, numel = self._declared[key]
            fh.seek(pos)
            head = fh.read(8)
            if len(head) != 8:
                raise PickleCorrupt("file ends inside the storage data")
            (count,) = struct.unpack("<q", head)
            if count != numel:
                raise PickleCorrupt(f"storage {key} holds {count} elements, the pickle expects {numel}")
            self._offsets[key] = pos + 8
            pos += 8 + numel * torch.empty((), dtype=dtype).element_size()
            if pos > size:
                raise PickleCorrupt("file ends inside the storage data")
        missing = set(self._declared) - set(self._offsets)
        if missing:
            raise PickleCorrupt(f"no data for storage {sorted(missing)[0]}")
        if pos != size:
            raise PickleCorrupt(f"{size - pos} unexpected bytes after the storage data")
        self._attach()

    def _persistent_load(self, pid: tuple) -> StorageRef:
        # ('storage', storage_type, root_key, location, numel, view_metadata)
        if len(pid) != 6 or pid[0] != "storage":
            kind = pid[0] if pid else ""
            raise PickleRefused("pickled nn.Module source (persistent id 'module') is not allowed" if kind == "module"
                                else f"unknown persistent id kind {show(kind)}")
        _, storage_type, key, location, numel, view = pid
        ref = self._declare(key, storage_type, location, numel)
        if view is None:
            return ref
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and all(type(v) is int and v >= 0 for v in view[1:])):
            raise PickleRefused("malformed storage view")
        _, offset, view_size = view
        if offset + view_size > ref.numel:
            raise PickleRefused("storage view runs past its storage")
        return StorageRef(ref.key, ref.dtype, view_size, ref.location, offset)

    def _read_bytes(self, key: str, nbytes: int) -> bytearray:
        buf = bytearray(nbytes)
        self._fh.seek(self._offsets[key])
        if self._fh.readinto(buf) != nbytes:
            raise PickleCorrupt("file ends inside the storage data")
        return buf

    def close(self) -> None:
        super().close()
        self._fh.close()


class _Bounded(io.RawIOBase):
    """A read-only view of an open file that never asks it for more bytes than the file has, so a pickle
    declaring a 2**60-byte string fails cleanly instead of trying to allocate it."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        super().__init__()
        self._fh, self._size = fh, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._size - self._fh.tell())
        return self._fh.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        left = max(0, self._size - self._fh.tell())
        return self._fh.readline(min(left, 1 << 16) if limit is None or limit < 0 else min(limit, left))

    def tell(self) -> int:
        return self._fh.tell()


def _check_member_name(name: str) -> None:
    """Refuse zip member names that could point outside an archive (we never extract, but they are a
    sign of a crafted file) or that torch itself would never write."""
    bad = (
        not name or "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name)
        or name.endswith("/")
        or any(part in ("", ".", "..") for part in name.split("/"))
    )
    if bad:
        raise PickleRefused(f"zip member name {show(name)} is not allowed (path tricks or a directory entry)")
    if "/" not in name:
        raise PickleRefused(f"zip member {show(name)} is outside the archive prefix")


def open_archive(path: Path) -> TorchArchive:
    """Open and parse `path` (zip or legacy torch format). Raises PickleRefused / PickleCorrupt."""
    fh = open(path, "rb")
    try:
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(0)
        head = fh.read(512)
        fh.seek(0)
        if head[:4] == b"PK\x03\x04":
            return ZipArchive(path, fh, size)
        if head[:4] in (b"PK\x05\x06", b"PK\x07\x08"):
            raise PickleCorrupt("empty or spanned zip archive")
        if len(head) >= 262 and head[257:262] == b"ustar":
            raise PickleRefused("the tar-based torch format (torch < 0.4) is not supported")
        if len(head) >= 10 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
            raise PickleRefused("this is a .safetensors file, not a pickle; nothing to convert")
        if head[:1] == b"\x80":
            return LegacyArchive(path, fh, size)
        # Not a shape torch writes; still run the first pickle through the interpreter so that a bare
        # protocol-0 pickle with a payload is reported by the global it names, not just as "unknown".
        # (torch.save with pickle_protocol < 2 writes such legacy files, and they load.)
        try:
            return LegacyArchive(path, fh, size)
        except PickleRefused:
            raise
        except Exception:  # noqa: BLE001 - any other failure: it simply is not a torch file
            raise PickleCorrupt("not a torch file (neither a zip archive nor a legacy torch pickle)") from None
    except BaseException:
        fh.close()
        raise
