"""Builders shared by the test_convert_* files (no tests here): torch-like zip and legacy files assembled by
hand, and pickles that try to create a sentinel file when loaded by an unrestricted unpickler."""

from __future__ import annotations

import io
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# ---- containers ---------------------------------------------------------------------------------------
def write_zip(path: Path, members: dict[str, bytes], *, compress: int = zipfile.ZIP_STORED) -> Path:
    """A zip with exactly these member names and bytes (names are not checked: that is the point)."""
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def torch_zip_members(data_pkl: bytes, storages: dict[str, bytes] | None = None, prefix: str = "archive") -> dict[str, bytes]:
    members = {f"{prefix}/data.pkl": data_pkl, f"{prefix}/byteorder": b"little"}
    for key, raw in (storages or {}).items():
        members[f"{prefix}/data/{key}"] = raw
    members[f"{prefix}/version"] = b"3\n"
    return members


def zip_members_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def legacy_bytes(obj_pickle: bytes, storages: list[tuple[str, int, bytes]], *, magic_pickle: bytes | None = None,
                 sys_info: bytes | None = None, keys_pickle: bytes | None = None) -> bytes:
    """torch's legacy stream: magic, protocol, sys info, object, storage keys, then (numel, bytes) per key."""
    out = io.BytesIO()
    out.write(magic_pickle if magic_pickle is not None else pickle.dumps(LEGACY_MAGIC, protocol=2))
    out.write(pickle.dumps(1001, protocol=2))
    out.write(sys_info if sys_info is not None else pickle.dumps(
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2))
    out.write(obj_pickle)
    out.write(keys_pickle if keys_pickle is not None else pickle.dumps([k for k, _, _ in storages], protocol=2))
    for _, numel, raw in storages:
        out.write(struct.pack("<q", numel))
        out.write(raw)
    return out.getvalue()


# ---- pickles that reference torch storages the way torch.save does ---------------------------------------
class FakeStorage:
    """Stands for a storage in a hand-written pickle: persistent id ('storage', type, key, 'cpu', numel[, view])."""

    def __init__(self, key: str, storage_type: type, numel: int, view: tuple | None = None, legacy: bool = False):
        self.key, self.type, self.numel, self.view, self.legacy = key, storage_type, numel, view, legacy


class TensorLike:
    """Pickles as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`."""

    def __init__(self, storage: FakeStorage, offset: int, size: tuple, stride: tuple, hooks=None):
        self.args = (storage, offset, size, stride, False, hooks if hooks is not None else __import__("collections").OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            if obj.legacy:
                return ("storage", obj.type, obj.key, "cpu", obj.numel, obj.view)
            return ("storage", obj.type, obj.key, "cpu", obj.numel)
        return None


def dumps_with_storages(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


# ---- payloads -------------------------------------------------------------------------------------------
def _touch_code(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').write('pwned')"


class Reduce:
    """An object whose pickle calls `func(*args)` on load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payload_objects(sentinel: Path) -> dict[str, object]:
    """Objects whose pickles create `sentinel` when loaded by plain pickle (via __reduce__)."""
    import builtins
    import os
    import posix
    import subprocess

    code = _touch_code(sentinel)
    cmd = [sys.executable, "-c", code]
    return {
        "os_system": Reduce(os.system, f"{sys.executable} -c \"{code}\""),
        "posix_system": Reduce(posix.system, f"{sys.executable} -c \"{code}\""),
        "builtins_eval": Reduce(builtins.eval, code),
        "builtins_exec": Reduce(builtins.exec, code),
        "subprocess_check_output": Reduce(subprocess.check_output, cmd),
        "subprocess_popen": Reduce(subprocess.Popen, cmd),
    }


def _text(s: str) -> bytes:
    return s.encode("utf-8")


def raw_payloads(sentinel: Path) -> dict[str, bytes]:
    """Hand-written pickles (each creates `sentinel` under plain pickle.loads) covering opcode variants."""
    code = _touch_code(sentinel)
    shell = f"{sys.executable} -c \"{code}\""
    b = {}
    # GLOBAL by its documented module name (plain pickling would write posix.system)
    b["global_os_system"] = b"cos\nsystem\n(" + b"V" + _text(shell) + b"\ntR."
    # INST: builds os.system(args) without REDUCE
    b["inst_os_system"] = b"(V" + _text(shell) + b"\nios\nsystem\n."
    # OBJ: class from the stack, args after the mark
    b["obj_builtins_exec"] = b"(cbuiltins\nexec\nV" + _text(code) + b"\no."
    # STACK_GLOBAL with names fetched back from the memo (defeats scanners that look at adjacent strings)
    b["stack_global_memo"] = (b"\x80\x04" + b"\x8c\x08builtins\x940" + b"\x8c\x04eval\x940" + b"h\x00h\x01\x93"
                              + b"X" + struct.pack("<I", len(code)) + _text(code) + b"\x85R.")
    # getattr(__import__('os'), 'system')(shell): the classic chained gadget
    b["getattr_import_chain"] = (b"\x80\x02c__builtin__\ngetattr\nc__builtin__\n__import__\nX\x02\x00\x00\x00os\x85R"
                                 + b"X\x06\x00\x00\x00system\x86R" + b"X" + struct.pack("<I", len(shell)) + _text(shell) + b"\x85R.")
    # protocol-4 STACK_GLOBAL for builtins.exec written by the pickler itself
    b["stack_global_exec_p4"] = pickle.dumps(Reduce(__import__("builtins").exec, code), protocol=4)
    return b


def payload_variants(sentinel: Path) -> dict[str, bytes]:
    """Every payload as a complete pickle: the objects at protocols 0, 2 and 5, plus the raw ones, plus
    payloads hidden deep inside an otherwise ordinary state dict (inside a dict inside a list)."""
    out = {}
    for name, obj in payload_objects(sentinel).items():
        for proto in (0, 2, 5):
            out[f"{name}_p{proto}"] = pickle.dumps(obj, protocol=proto)
        out[f"{name}_nested"] = pickle.dumps({"state_dict": {"w": [1, {"x": obj}]}, "epoch": 1}, protocol=2)
    out.update(raw_payloads(sentinel))
    return out
