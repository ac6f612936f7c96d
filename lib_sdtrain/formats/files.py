"""Writing files without ever leaving a truncated one or replacing what the user did not ask us to.

Every output goes through `atomic_write_*`: the data is written to a temporary file in the same folder,
flushed to disk, then renamed over the target in one step (`os.replace` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import DiskError, UserError

# errors of the disk or the folder, not of our code: they become one line for the user
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EROFS: "the file system is read-only", errno.ENOTDIR: "a part of the path is a file, not a folder",
                errno.EISDIR: "a folder is in the way", errno.EEXIST: "a file is in the way of a folder", errno.ENAMETOOLONG: "the file name is too long",
                errno.EFBIG: "the file is too large for this file system", errno.EIO: "input/output error",
                errno.ENOENT: "the folder does not exist"}
_RUST_OS_ERROR = re.compile(r"os error (\d+)")   # safetensors' own write errors: "... (os error 28)"


def disk_error_reason(e: BaseException) -> str | None:
    """A short reason for a disk/permission failure (OSError, or safetensors' SafetensorError wrapping one);
    None for anything else."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = _RUST_OS_ERROR.search(str(e))
        code = int(m.group(1)) if m else None
    if code in _DISK_ERRNOS:
        return f"{_DISK_ERRNOS[code]} (errno {code})"
    return None


def disk_error(e: BaseException, path: str | Path, what: str = "write") -> DiskError | None:
    """A one-line DiskError (a UserError) for a disk/permission failure while writing `path`, else None."""
    reason = disk_error_reason(e)
    return DiskError(f"cannot {what} {path}: {reason}") if reason else None


def make_folder(path: str | Path) -> Path:
    """`mkdir -p path`; a disk or permission failure (a read-only place, a file in the way) as a one-line
    DiskError instead of a PermissionError traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        err = disk_error(e, path, "create the folder")
        if err is None:
            raise
        raise err from None
    return path


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_read_only(path: str | Path) -> bool:
    """Whether an existing file has its owner's write permission off (`chmod u-w`; Windows' read-only attribute):
    the user's word that it must not change. Read from the mode bits, because a rename over it needs only the
    folder writable, and a process running as root may write any file. False for a file that is not there."""
    try:
        return not os.stat(path).st_mode & stat.S_IWUSR
    except OSError:
        return False


def refuse_read_only(path: Path) -> None:
    """DiskError for a target the user made read-only (an atomic replace would swap it all the same)."""
    if is_read_only(path):
        raise DiskError(f"cannot write {path}: it is read-only, so it is not replaced (nothing was written); make "
                        "it writable to replace it, or choose another name")


def atomic_write(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call `write(tmp_path)` and then move the finished file to `path`.

    With `overwrite=False` an existing `path` raises UserError instead of being replaced; a read-only one is never
    replaced (DiskError).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise UserError(f"{path} already exists; choose another name or allow overwriting")
    refuse_read_only(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise (disk_error(e, path) or e) from None
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp_path, 0o666 & ~umask)   # mkstemp makes 0600 files; outputs get the usual permissions
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~umask)   # again: some writers (safetensors' save_file) replace the file
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if not overwrite and path.exists():  # appeared while we were writing
            raise UserError(f"{path} already exists; choose another name or allow overwriting")
        refuse_read_only(path)               # made read-only while we were writing
        os.replace(tmp_path, path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a full disk / lost permission becomes one line; the rest stays a bug
        friendly = disk_error(e, path)
        if friendly is None:
            raise
        raise friendly from None
    finally:
        try:
            if tmp_path.exists():   # a partial file is never left behind
                tmp_path.unlink()
        except OSError:
            pass
    fsync_dir(path.parent)
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


# ---- leftovers of interrupted writes -----------------------------------------------------------------------
# The temporary names this module (mkstemp) and folders written aside (mkdtemp) use: "." + the target's name +
# "." + 8 characters of tempfile's alphabet + ".tmp". Nothing else of ours, and rarely anything of the user's,
# looks like this; the cleaners below still remove a match only when its target is one the caller will write.
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def temp_target(name: str) -> str | None:
    """The target a temporary name stands for (".x.safetensors.ab12cd34.tmp" -> "x.safetensors"), else None."""
    m = TEMP_NAME.match(name)
    return m["target"] if m else None


def remove_stale_temps(folder: str | Path, is_ours: Callable[[str], bool], *, recursive: bool = False,
                       folder_is_ours: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove the temporary files an interrupted `atomic_write` left in `folder` for targets `is_ours(target)`
    accepts (in sub-folders too with `recursive`); a temporary *folder* (a folder written aside, then renamed)
    only when `folder_is_ours(path)` also recognises its content. Returns what was removed; never raises."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed: list[Path] = []
    try:
        found = sorted(folder.rglob(".*.tmp")) if recursive else sorted(folder.glob(".*.tmp"))
    except OSError:
        return []
    for p in found:
        target = temp_target(p.name)
        if target is None or not is_ours(target):
            continue
        try:
            if p.is_symlink():
                continue
            if p.is_file():
                p.unlink()
                removed.append(p)
            elif p.is_dir() and folder_is_ours is not None and folder_is_ours(p):
                shutil.rmtree(p)
                removed.append(p)
        except OSError:
            pass
    return removed
