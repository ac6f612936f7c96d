"""Writing files without ever leaving a truncated one or replacing what the user did not ask us to.

Every output goes through `atomic_write_*`: the data is written to a temporary file in the same folder,
flushed to disk, then renamed over the target in one step (`os.replace` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import UserError


def atomic_write(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call `write(tmp_path)` and then move the finished file to `path`.

    With `overwrite=False` an existing `path` raises UserError instead of being replaced.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise UserError(f"{path} already exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)   # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~umask)   # again: some writers (safetensors' save_file) replace the file
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if not overwrite and path.exists():  # appeared while we were writing
            raise UserError(f"{path} already exists; choose another name or allow overwriting")
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), overwrite=overwrite)


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), overwrite=overwrite)


def unused_path(path: str | Path) -> Path:
    """`path` if free, else `stem-1.ext`, `stem-2.ext`, ... (never an existing file)."""
    path = Path(path)
    if not path.exists():
        return path
    for i in range(1, 100_000):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise UserError(f"no free file name next to {path}")


def safe_child(folder: str | Path, name: str) -> Path:
    """`folder/name`, refusing names that would escape `folder` (absolute paths, '..', drive letters)."""
    folder = Path(folder).resolve()
    if not name or name in (".", "..") or "\x00" in name:
        raise UserError(f"invalid output name {name!r}")
    candidate = (folder / name).resolve()
    if candidate != folder and folder not in candidate.parents:
        raise UserError(f"output name {name!r} would be written outside {folder}")
    return candidate
