"""Reading `.ckpt` / `.pt` / `.pth` / `.bin` files without ever executing pickled code.

This is the one door through which Training Lab reads a pickled model file (the standalone loader calls
`load_state_dict` for `.ckpt` input, the converter uses `open_checkpoint`). Nothing here calls
`torch.load`: `archive.py` checks the container (zip members or the legacy stream) and `unpickler.py`
interprets the pickle with an allow-list of tensor and container types, rebuilding tensors from the
file's own storage bytes. Whatever is refused or unreadable raises a `UserError` naming the file and the
reason (for a forbidden global: its dotted name), so the CLI prints one line and the UI one status.

Returned trees contain dicts (incl. OrderedDict), lists, tuples, sets, str/bytes/int/float/bool/None,
torch tensors (CPU, detached; `requires_grad` as saved), numpy arrays of plain numeric dtypes (rare), and
`InertGlobal` placeholders for lightning's ModelCheckpoint class.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from .archive import TorchArchive, open_archive
from .unpickler import (InertGlobal, LazyTensor, ModuleStub, NumpyArray, NumpyDType, PickleCorrupt,
                        PickleRefused)

# File types read through this module (A1111 reads the same set of pickled suffixes).
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Prefix of the EMA copy of the UNet in LDM checkpoints; A1111 ignores these keys when loading.
EMA_PREFIX = "model_ema."
# Deeper than any checkpoint (optimizer states reach ~6 levels); keeps the walk well inside the recursion limit.
MAX_DEPTH = 100

__all__ = ["PICKLE_SUFFIXES", "EMA_PREFIX", "UnsafeFileError", "CorruptFileError", "LazyTensor",
           "InertGlobal", "open_checkpoint", "materialize", "load_checkpoint", "load_state_dict",
           "find_state_dict"]


class UnsafeFileError(UserError):
    """The file asks for something we refuse to do (a forbidden global or opcode, an odd zip member)."""


class CorruptFileError(UserError):
    """The file is not a readable torch file (truncated, bad checksum, malformed pickle)."""


def _wrap(path: Path, e: BaseException) -> UserError:
    """The UserError for `e` while reading `path`: one line, file name first."""
    if isinstance(e, PickleRefused):
        cls, text = UnsafeFileError, f"refused: {e}"
    elif isinstance(e, PickleCorrupt):
        cls, text = CorruptFileError, f"cannot read: {e}"
    elif isinstance(e, UserError):
        cls, text = UserError, str(e)
    elif isinstance(e, MemoryError):
        cls, text = CorruptFileError, "cannot read: it needs more memory than is available"
    else:
        cls, text = CorruptFileError, f"cannot read: corrupt or truncated file ({type(e).__name__}: {e})"
    text = " ".join(text.splitlines())
    return cls(f"{path.name}: {text[:400]}")


def open_checkpoint(path: str | Path) -> TorchArchive:
    """Parse `path` and return the archive (a context manager) whose `.root` has `LazyTensor` leaves.

    The structure is fully checked here; tensor bytes are read only by `LazyTensor.load()` (or
    `materialize`) while the archive is open, so a converter can skip EMA or optimizer tensors for free.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        return open_archive(path)
    except UserError as e:
        raise _wrap(path, e) from None
    except Exception as e:  # noqa: BLE001 - zipfile/struct/OS errors on untrusted bytes all mean "corrupt"
        raise _wrap(path, e) from None


def load_tensor(path: Path, lazy: LazyTensor):
    """`lazy.load()` with file errors (bad CRC, truncation) turned into a UserError naming `path`."""
    try:
        return lazy.load()
    except UserError as e:
        raise _wrap(path, e) from None
    except Exception as e:  # noqa: BLE001 - see open_checkpoint
        raise _wrap(path, e) from None


def materialize(obj: Any, path: Path | None = None) -> Any:
    """A copy of `obj` with every placeholder replaced: LazyTensor -> torch.Tensor, ParameterDict stub ->
    dict, numpy stubs -> numpy values. Shared objects stay shared; cycles and absurd nesting are refused."""
    path = path or Path("file")
    done: dict[int, Any] = {}
    active: set[int] = set()

    def walk(o: Any, depth: int) -> Any:
        if o is None or isinstance(o, (str, bytes, int, float, complex, InertGlobal)):
            return o
        oid = id(o)
        if oid in done:
            return done[oid]
        if oid in active:
            raise _wrap(path, PickleRefused("the pickled structure refers to itself"))
        if depth > MAX_DEPTH:
            raise _wrap(path, PickleRefused(f"the pickled structure nests deeper than {MAX_DEPTH} levels"))
        active.add(oid)
        if isinstance(o, LazyTensor):
            out: Any = load_tensor(path, o)
        elif isinstance(o, ModuleStub):
            out = walk(o.to_plain(), depth + 1)
        elif isinstance(o, NumpyArray):
            out = o.to_numpy().copy()
        elif isinstance(o, NumpyDType):
            out = str(o.to_numpy())
        elif isinstance(o, dict):
            out = type(o)()
            for k, v in o.items():
                out[k] = walk(v, depth + 1)
        elif isinstance(o, list):
            out = [walk(v, depth + 1) for v in o]
        elif isinstance(o, tuple):
            out = tuple(walk(v, depth + 1) for v in o)
        elif isinstance(o, (set, frozenset)):
            out = type(o)(o)  # items are flat keys (checked while unpickling)
        elif isinstance(o, bytearray):
            out = bytearray(o)
        else:  # anything else was created by the interpreter on purpose; keep it (e.g. torch.dtype)
            out = o
        active.discard(oid)
        done[oid] = out
        return out

    try:
        return walk(obj, 0)
    except RecursionError:
        raise _wrap(path, PickleRefused("the pickled structure nests too deeply")) from None


def load_checkpoint(path: str | Path, expect: Callable[[dict], str | None] | None = None) -> dict:
    """The whole pickled object of a torch file, with real tensors. The top level must be a dict.

    `expect`: a check of that dict's structure (tensors not yet read, `LazyTensor`s) that returns why the file is
    not what the caller reads, or None; refused before any tensor is read, so a model checkpoint given in place
    of a small file is not loaded whole only to be refused.

    Raises UserError (UnsafeFileError / CorruptFileError) naming the file and the reason.
    """
    path = Path(path)
    with open_checkpoint(path) as archive:
        if not isinstance(archive.root, dict):
            raise UserError(f"{path.name}: expected a dict at the top level, found {type(archive.root).__name__}")
        why = expect(archive.root) if expect is not None else None
        if why:
            raise UserError(f"{path.name}: {why}")
        return materialize(archive.root, path)


def find_state_dict(root: Any) -> dict:
    """The dict holding the weights: `root["state_dict"]` when present (twice nested in some lightning
    files, as A1111's `get_state_dict_from_checkpoint` allows), else `root` itself."""
    sd = root
    for _ in range(2):
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"expected a dict of tensors, found {type(sd).__name__}")
    return sd


def load_state_dict(path: str | Path, *, keep_ema: bool = False) -> dict[str, Any]:
    """The model weights of a pickled checkpoint: `{key: tensor}` from its (unwrapped) state dict.

    Non-tensor entries and non-string keys are left out; so are `model_ema.*` tensors unless `keep_ema`
    (A1111 ignores them too, and skipping them halves the memory for "full EMA" files). Keys are returned
    unchanged (no A1111 key renames). Raises UserError when the file is refused, unreadable or holds no
    tensors.
    """
    path = Path(path)
    with open_checkpoint(path) as archive:
        try:
            sd = find_state_dict(archive.root)
        except UserError as e:
            raise UserError(f"{path.name}: {e}") from None
        out: dict[str, Any] = {}
        for key, value in sd.items():
            if not isinstance(key, str) or not isinstance(value, LazyTensor):
                continue
            if not keep_ema and key.startswith(EMA_PREFIX):
                continue
            out[key] = load_tensor(path, value)
    if not out:
        raise UserError(f"{path.name}: no tensors found in its state dict")
    return out
