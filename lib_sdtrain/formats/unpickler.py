"""A pickle interpreter that can build tensors and plain containers, and nothing else.

Python's `pickle` runs code by design: a GLOBAL opcode imports any callable and REDUCE calls it, so a `.ckpt`
can run `os.system` the moment it is loaded. A1111 guards `torch.load` with a restricted `find_class`
(modules/safe.py, see shared/reference/a1111-host.md §11). We go one step further and never hand the data to
Python's unpickler at all: `run_pickle` walks the opcodes itself (parsed by the stdlib's
`pickletools.genops`, which only decodes, never executes) and gives each allowed global a stand-in written
here. Nothing from the file is ever imported or called:

- an allowed global resolves to a `_Global` whose stand-in validates its arguments and returns plain data,
  a `LazyTensor` (shape, dtype and where its bytes are; no data read yet) or an inert placeholder;
- every other global raises `ForbiddenGlobal` naming it, whether it arrives by GLOBAL, STACK_GLOBAL or INST;
- opcodes that torch.save never writes and that exist to build arbitrary objects (INST, OBJ, NEWOBJ_EX,
  EXT1/2/4, out-of-band buffers, text PERSID) are refused outright;
- APPEND/SETITEM/BUILD only ever touch real lists, dicts and our own placeholders, so no method of a
  foreign object can run either.

The allow-list (`allowed_globals()`) is A1111's list with two things made stricter - numpy arrays and
scalars must hold raw numeric bytes (no object arrays), and lightning's ModelCheckpoint is never imported:
it becomes an inert `InertGlobal` placeholder, because old SD checkpoints use the class only as a dict key
in `callbacks`; calling or constructing it is refused - plus what newer torch writes for ordinary tensors
(`BoolStorage` and the other dtype-only storage markers, `UntypedStorage` with `_rebuild_tensor_v3` for
float8/uint16, `torch.<dtype>`) and harmless value types (`torch.Size`, `torch.device`, `set`,
`frozenset`, `bytearray`). Sparse, quantized, nested and subclass tensors stay refused.
"""

from __future__ import annotations

import functools
import io
import pickletools
import re
import reprlib
from dataclasses import dataclass, replace
from typing import Any, Callable

from ..errors import UserError

# Highest pickle protocol we understand (Python 3.8+ writes up to 5; torch.save uses 2).
MAX_PROTOCOL = 5
# Dict keys and set items must be small and flat: a checkpoint uses str / int keys (hypernetworks) and, in
# old lightning files, a class. Deep tuples as keys could even overflow the C stack when hashed.
_KEY_TUPLE_MAX_ITEMS = 16
_KEY_TUPLE_MAX_DEPTH = 4


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_CLEAN_NAME = re.compile(r"^[A-Za-z0-9_.]{1,120}$")


def show(value: Any) -> str:
    """A short, one-line repr of untrusted data for error messages (file contents can be huge or contain
    newlines; the CLI promises one line)."""
    return _REPR.repr(value)


def _dotted(module: str, name: str) -> str:
    """'module.name' in quotes; odd names (newlines, huge) as two short reprs instead."""
    return f"'{module}.{name}'" if _CLEAN_NAME.match(module) and _CLEAN_NAME.match(name) else f"{show(module)}.{show(name)}"


class PickleRefused(UserError):
    """The pickle asks for something we do not allow (a global, an opcode, a malformed tensor)."""


class ForbiddenGlobal(PickleRefused):
    """The pickle references a global outside the allow-list."""

    def __init__(self, module: str, name: str, via: str = "GLOBAL") -> None:
        self.module, self.name, self.via = module, name, via
        super().__init__(f"forbidden global {_dotted(module, name)} (via {via}); only tensors and plain containers "
                         "may be pickled in a model file")


class PickleCorrupt(UserError):
    """The pickle is not well formed (truncated, bad opcode, stack underflow)."""


# ---- values the interpreter produces besides plain Python data -------------------------------------------
@dataclass(frozen=True)
class StorageRef:
    """A torch storage as the pickle names it: archive key, element dtype and count; `offset` (elements)
    is non-zero only for the legacy format's storage views."""

    key: str
    dtype: Any          # torch.dtype
    numel: int
    location: str
    offset: int = 0


@dataclass(eq=False)
class LazyTensor:
    """A tensor whose bytes have not been read yet: `load()` reads them through the archive.

    `source` is the StorageRef (or a `NumpyArray` for `_rebuild_device_tensor_from_numpy`); `offset`,
    `shape` and `stride` are in elements of `dtype`. Identity matters: two references to one tensor in the
    pickle give the same LazyTensor, and `load()` returns the same torch tensor for both.
    """

    source: Any
    dtype: Any
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    requires_grad: bool = False
    reader: Any = None          # set by the archive: reader(StorageRef) -> 1-D tensor of StorageRef.dtype
    _value: Any = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)

    def load(self):
        """The torch.Tensor (CPU; `requires_grad` as saved). Tensors that share a storage in the file share
        memory here too, as with torch.load."""
        if self._value is None:
            import torch

            if isinstance(self.source, NumpyArray):
                base = torch.from_numpy(self.source.to_numpy().copy()).reshape(-1)
                if base.dtype != self.dtype:
                    base = base.to(self.dtype)
                self._value = base.reshape(self.shape)
            else:
                if self.reader is None:
                    raise PickleCorrupt("tensor data is not available (archive closed)")
                base = self.reader(self.source)
                if base.dtype != self.dtype:  # _rebuild_tensor_v3: a byte storage viewed as another dtype
                    base = base.view(self.dtype)
                self._value = torch.as_strided(base, self.shape, self.stride, self.source.offset + self.offset)
            if self.requires_grad and self._value.dtype.is_floating_point:
                self._value.requires_grad_(True)
        return self._value

    def unload(self) -> None:
        """Drop the cached tensor (the archive may still cache the storage bytes; see TorchArchive.forget)."""
        self._value = None

    def __repr__(self) -> str:
        return f"LazyTensor(shape={list(self.shape)}, dtype={self.dtype})"


@dataclass(frozen=True)
class InertGlobal:
    """An allowed-but-never-called class reference (lightning's ModelCheckpoint as a `callbacks` dict key)."""

    module: str
    name: str

    def __repr__(self) -> str:
        return f"<{self.module}.{self.name} (not loaded)>"


class ModuleStub:
    """A `torch.nn.ParameterDict` (old A1111 embeddings pickle `string_to_param` as one); `build` keeps the
    pickled `__dict__`, `to_plain()` gives its `_parameters` as a plain dict."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state: dict[str, Any] = {}

    def build(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict) and state[1] is None:
            state = state[0]
        if not isinstance(state, dict):
            raise PickleRefused(f"unexpected state for {self.name}: {type(state).__name__}")
        self.state.update(state)

    def to_plain(self) -> dict:
        params = self.state.get("_parameters", {})
        if not isinstance(params, dict):
            raise PickleRefused(f"{self.name} without a parameter table")
        return dict(params)


class NumpyDType:
    """`numpy.dtype(name, align, copy)` for plain numeric kinds only (no object, void or datetime dtypes)."""

    _NAME = re.compile(r"^[biufc][0-9]{1,2}$")

    def __init__(self, name: Any, *_: Any) -> None:
        if not isinstance(name, str) or not self._NAME.match(name):
            raise PickleRefused(f"numpy dtype {show(name)} is not a plain numeric type")
        self.name = name
        self.byteorder = "="

    def build(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags) - only simple dtypes
        if not isinstance(state, tuple) or len(state) < 5 or state[1] not in ("<", ">", "|", "=") \
                or any(s is not None for s in state[2:5]):
            raise PickleRefused("numpy structured or sub-array dtypes are not allowed")
        self.byteorder = state[1]

    def to_numpy(self):
        import numpy as np

        return np.dtype(("" if self.byteorder in ("|", "=") else self.byteorder) + self.name)


class NumpyArray:
    """`numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` + BUILD; raw bytes only, never objects."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.dtype: NumpyDType | None = None
        self.fortran = False
        self.data = b""

    def build(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise PickleRefused("unexpected numpy array state")
        _, shape, dtype, fortran, data = state
        if not isinstance(dtype, NumpyDType) or not isinstance(data, (bytes, bytearray)):
            raise PickleRefused("numpy arrays must hold raw numeric data (object arrays are not allowed)")
        self.shape, self.dtype, self.fortran, self.data = _int_tuple(shape, "numpy shape"), dtype, bool(fortran), bytes(data)

    def to_numpy(self):
        import numpy as np

        if self.dtype is None:
            raise PickleRefused("numpy array without data")
        dt = self.dtype.to_numpy()
        n = 1
        for s in self.shape:
            n *= s
        if len(self.data) != n * dt.itemsize:
            raise PickleCorrupt("numpy array data does not match its shape")
        return np.frombuffer(self.data, dtype=dt).reshape(self.shape, order="F" if self.fortran else "C")


# ---- the allow-list ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Global:
    """What an allowed callable global resolves to: `call` for REDUCE, `new` for NEWOBJ; with neither it is
    a marker that can only be passed around (numpy.ndarray as `_reconstruct`'s first argument)."""

    module: str
    name: str
    call: Callable[..., Any] | None = None
    new: Callable[..., Any] | None = None


def _int(value: Any, what: str, *, low: int = 0, high: int = 1 << 48) -> int:
    if type(value) is not int or not low <= value <= high:
        raise PickleRefused(f"bad {what}: {show(value)}")
    return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise PickleRefused(f"bad {what}: {type(value).__name__}")
    return tuple(_int(v, what) for v in value)


@functools.lru_cache(maxsize=None)
def _itemsize(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


@functools.lru_cache(maxsize=None)
def _torch_dtypes() -> dict[str, Any]:
    import torch

    names = ["float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32",
             "int", "int16", "short", "int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "uint16",
             "uint32", "uint64"]  # no complex: no model file needs it (its storages are refused too)
    return {n: getattr(torch, n) for n in names if isinstance(getattr(torch, n, None), torch.dtype)}


def _storage_dtypes() -> dict[str, Any]:
    import torch

    return {
        "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
        "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
        "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
        "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
    }


@dataclass(frozen=True)
class StorageType:
    """`torch.FloatStorage` & co.: only a dtype marker inside a persistent id; never instantiated."""

    name: str
    dtype: Any


def _check_hooks(hooks: Any) -> None:
    # torch always pickles an empty OrderedDict here; real hooks would be functions (refused as globals)
    if not isinstance(hooks, dict) or hooks:
        raise PickleRefused("tensor with backward hooks")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *, dtype: Any = None,
                    requires_grad: Any = False) -> LazyTensor:
    if not isinstance(storage, StorageRef):
        raise PickleRefused(f"tensor storage is a {type(storage).__name__}, not a storage reference")
    offset = _int(offset, "storage offset")
    size, stride = _int_tuple(size, "tensor size"), _int_tuple(stride, "tensor stride")
    if len(size) != len(stride):
        raise PickleRefused("tensor size and stride differ in length")
    if type(requires_grad) is not bool:
        raise PickleRefused("bad requires_grad flag")
    dtype = storage.dtype if dtype is None else dtype
    numel = 1
    for s in size:
        numel *= s
    # Every element the view touches must lie inside the storage (counted in bytes: v3 views a byte storage).
    storage_bytes = storage.numel * _itemsize(storage.dtype)
    item = _itemsize(dtype)
    if dtype != storage.dtype:  # only _rebuild_tensor_v3 views a byte storage as another dtype
        import torch

        if storage.dtype != torch.uint8 or storage.offset:
            raise PickleRefused("tensor dtype differs from its storage dtype")
    if numel:
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if (last + 1) * item > storage_bytes:  # storage.numel counts what this (view of a) storage shows
            raise PickleRefused(f"tensor view {list(size)} at offset {offset} runs past its storage")
        # a zero-stride view can claim far more elements than it has bytes; refuse absurd expansions
        if numel * item > 16 * storage_bytes + (1 << 20):
            raise PickleRefused(f"tensor view {list(size)} expands its storage more than 16-fold")
    return LazyTensor(storage, dtype, size, stride, offset, requires_grad)


def _rebuild_tensor_v1(storage, offset, size, stride):
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_hooks(backward_hooks)
    if metadata:  # conj/neg bits and the like: not something a model file needs
        raise PickleRefused("tensor with extra metadata")
    return _rebuild_tensor(storage, offset, size, stride, requires_grad=requires_grad)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_hooks(backward_hooks)
    if metadata:
        raise PickleRefused("tensor with extra metadata")
    if dtype not in _torch_dtypes().values():
        raise PickleRefused(f"bad tensor dtype {show(dtype)}")
    return _rebuild_tensor(storage, offset, size, stride, dtype=dtype, requires_grad=requires_grad)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, LazyTensor) or type(requires_grad) is not bool:
        raise PickleRefused("bad parameter")
    _check_hooks(backward_hooks)
    return replace(data, requires_grad=requires_grad, _value=None)


def _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad):
    if not isinstance(data, NumpyArray) or dtype not in _torch_dtypes().values() or type(requires_grad) is not bool:
        raise PickleRefused("bad tensor from numpy")
    shape = data.shape
    stride, acc = [], 1
    for s in reversed(shape):
        stride.insert(0, acc)
        acc *= s
    return LazyTensor(data, dtype, shape, tuple(stride), 0, requires_grad)


def _ordered_dict(*args):
    import collections

    if not args:
        return collections.OrderedDict()
    if len(args) == 1 and isinstance(args[0], list) and all(isinstance(p, tuple) and len(p) == 2 for p in args[0]):
        out = collections.OrderedDict()
        for k, v in args[0]:
            out[_key(k)] = v
        return out
    raise PickleRefused("unexpected OrderedDict arguments")


def _torch_size(*args):
    if len(args) != 1:
        raise PickleRefused("bad torch.Size")
    return _int_tuple(args[0], "torch.Size")


def _torch_device(*args):
    if not args or len(args) > 2 or not isinstance(args[0], str) or (len(args) == 2 and type(args[1]) is not int):
        raise PickleRefused("bad torch.device")
    return args[0] if len(args) == 1 else f"{args[0]}:{args[1]}"


def _get_layout(name):
    if name != "torch.strided":  # sparse and other layouts need rebuild functions we do not allow
        raise PickleRefused(f"tensor layout {show(name)} is not allowed")
    return name


def _codecs_encode(text, encoding="utf-8", *rest):
    # protocol-2 pickles store bytes as _codecs.encode(str, 'latin1')
    if rest or not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise PickleRefused("bad _codecs.encode call")
    return text.encode(encoding)


def _set(*args):
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
        raise PickleRefused("bad set()")
    return {_key(v) for v in (args[0] if args else ())}


def _frozenset(*args):
    return frozenset(_set(*args))


def _bytearray(*args):
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, list)) and all(type(v) is int for v in args[0]):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin-1", "latin1"):
        return bytearray(args[0], args[1])
    raise PickleRefused("bad bytearray()")


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, NumpyDType) or not isinstance(data, (bytes, bytearray)):
        raise PickleRefused("numpy scalars must hold raw numeric data")
    import numpy as np

    dt = dtype.to_numpy()
    if len(data) != dt.itemsize:
        raise PickleCorrupt("numpy scalar of the wrong size")
    return np.frombuffer(bytes(data), dtype=dt)[0].item()   # a plain Python int / float / bool / complex


def _numpy_reconstruct(cls, shape, typecode):
    if not (isinstance(cls, _Global) and cls.name == "ndarray"):
        raise PickleRefused("numpy _reconstruct of something other than ndarray")
    return NumpyArray()


def _inert(module: str, name: str) -> _Global:
    return _Global(module, name)  # no call, no new: usable only as a value


def _build_allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _Global("collections", "OrderedDict", call=_ordered_dict),
        ("torch._utils", "_rebuild_tensor"): _Global("torch._utils", "_rebuild_tensor", call=_rebuild_tensor_v1),
        ("torch._utils", "_rebuild_tensor_v2"): _Global("torch._utils", "_rebuild_tensor_v2", call=_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _Global("torch._utils", "_rebuild_tensor_v3", call=_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _Global("torch._utils", "_rebuild_parameter", call=_rebuild_parameter),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"):
            _Global("torch._utils", "_rebuild_device_tensor_from_numpy", call=_rebuild_device_tensor_from_numpy),
        ("torch", "Size"): _Global("torch", "Size", call=_torch_size),
        ("torch", "device"): _Global("torch", "device", call=_torch_device),
        ("torch.serialization", "_get_layout"): _Global("torch.serialization", "_get_layout", call=_get_layout),
        ("torch.nn.modules.container", "ParameterDict"):
            _Global("torch.nn.modules.container", "ParameterDict", new=lambda *a: ModuleStub("ParameterDict")),
        ("_codecs", "encode"): _Global("_codecs", "encode", call=_codecs_encode),
        ("builtins", "set"): _Global("builtins", "set", call=_set),
        ("builtins", "frozenset"): _Global("builtins", "frozenset", call=_frozenset),
        ("builtins", "bytearray"): _Global("builtins", "bytearray", call=_bytearray),
        ("numpy", "dtype"): _Global("numpy", "dtype", call=NumpyDType),
        ("numpy", "ndarray"): _inert("numpy", "ndarray"),
        # lightning's callback class: an inert dict key in old checkpoints, never constructed
        ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"):
            InertGlobal("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
        ("pytorch_lightning.callbacks", "model_checkpoint"):
            InertGlobal("pytorch_lightning.callbacks", "model_checkpoint"),
    }
    for np_core in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1.x / 2.x module names
        allowed[(np_core, "scalar")] = _Global(np_core, "scalar", call=_numpy_scalar)
        allowed[(np_core, "_reconstruct")] = _Global(np_core, "_reconstruct", call=_numpy_reconstruct)
    for mod in ("torch", "torch.cuda"):  # old GPU saves name torch.cuda.HalfStorage; loaded on the CPU anyway
        for name, dtype in _storage_dtypes().items():
            if name != "UntypedStorage":
                allowed[(mod, name)] = StorageType(name, dtype)
    allowed[("torch", "UntypedStorage")] = StorageType("UntypedStorage", _storage_dtypes()["UntypedStorage"])
    allowed[("torch.storage", "UntypedStorage")] = allowed[("torch", "UntypedStorage")]
    for name, dtype in _torch_dtypes().items():
        allowed[("torch", name)] = dtype
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


def allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> stand-in, built on first use (it needs torch)."""
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _build_allowed()
    return _ALLOWED


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol <3 pickles use Python 2 names (`__builtin__.set`, `commands.check_output`); Python's own
    unpickler maps them to what would actually be imported, and so do we: both for the allow-list and so
    that a refusal names the real target."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def find_global(module: Any, name: Any, via: str = "GLOBAL") -> Any:
    """The stand-in for an allowed global; ForbiddenGlobal (naming it) for anything else."""
    if not isinstance(module, str) or not isinstance(name, str):
        raise PickleRefused(f"{via} with non-string names")
    module, name = _python3_name(module, name)
    try:
        return allowed_globals()[(module, name)]
    except KeyError:
        raise ForbiddenGlobal(module, name, via) from None


def _key(value: Any, depth: int = 0) -> Any:
    """`value` if it may be a dict key / set item (flat hashable data), else PickleRefused."""
    if value is None or type(value) in (str, int, float, bool, bytes, complex) or isinstance(value, InertGlobal):
        return value
    if type(value) in (tuple, frozenset) and depth < _KEY_TUPLE_MAX_DEPTH and len(value) <= _KEY_TUPLE_MAX_ITEMS:
        for v in value:
            _key(v, depth + 1)
        return value
    raise PickleRefused(f"unsupported dict key or set item of type {type(value).__name__}")


# ---- the interpreter ------------------------------------------------------------------------------------
_REFUSED_OPCODES = {
    "OBJ": "OBJ (builds an arbitrary object; torch.save never writes it)",
    "NEWOBJ_EX": "NEWOBJ_EX (builds an object with keyword arguments)",
    "EXT1": "EXT1 (copyreg extension registry)",
    "EXT2": "EXT2 (copyreg extension registry)",
    "EXT4": "EXT4 (copyreg extension registry)",
    "NEXT_BUFFER": "NEXT_BUFFER (out-of-band buffer)",
    "READONLY_BUFFER": "READONLY_BUFFER (out-of-band buffer)",
    "PERSID": "PERSID (text persistent id; torch writes BINPERSID)",
}

_MARK = object()


def run_pickle(source: bytes | io.IOBase, persistent_load: Callable[[tuple], Any] | None = None) -> Any:
    """Interpret one pickle (up to its STOP) and return the object it describes.

    `source` is the pickle's bytes or a binary file positioned at it (left just after STOP).
    `persistent_load(pid_tuple)` resolves BINPERSID; None means persistent ids are refused.
    Raises ForbiddenGlobal / PickleRefused for disallowed content, PickleCorrupt for malformed data.
    """
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list[Any]:
        nonlocal stack
        items = stack
        stack = marks.pop()
        return items

    try:
        for op, arg, pos in pickletools.genops(source):
            name = op.name
            if name in _REFUSED_OPCODES:
                raise PickleRefused(f"pickle opcode {_REFUSED_OPCODES[name]} at byte {pos} is not allowed")
            if name == "INST":
                module, _, attr = str(arg).partition(" ")
                find_global(module, attr, "INST")  # names the global if it is not allowed at all
                raise PickleRefused(f"pickle opcode INST ({_dotted(module, attr)}) at byte {pos} is not allowed")
            if name == "PROTO":
                if arg > MAX_PROTOCOL:
                    raise PickleCorrupt(f"unsupported pickle protocol {arg}")
            elif name == "FRAME":
                pass
            elif name == "STOP":
                if len(stack) != 1 or marks:
                    raise PickleCorrupt("pickle ended with an unbalanced stack")
                return stack[0]
            elif name == "MARK":
                marks.append(stack)
                stack = []
            elif name == "POP":
                if stack:
                    stack.pop()
                else:
                    pop_mark()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
            elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
                          "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
                          "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"):
                stack.append(arg)
            elif name == "BYTEARRAY8":
                stack.append(bytearray(arg))
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE", "EMPTY_SET"):
                stack.append({"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple, "EMPTY_SET": set}[name]())
            elif name == "LIST":
                items = pop_mark()  # pop first: pop_mark rebinds `stack`
                stack.append(items)
            elif name == "TUPLE":
                items = pop_mark()
                stack.append(tuple(items))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(stack) < n:
                    raise PickleCorrupt("stack underflow")
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif name == "DICT":
                items = pop_mark()
                if len(items) % 2:
                    raise PickleCorrupt("odd number of items for DICT")
                stack.append({_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})
            elif name == "FROZENSET":
                items = pop_mark()
                stack.append(frozenset(_key(v) for v in items))
            elif name == "APPEND":
                value = stack.pop()
                _target(stack, list).append(value)
            elif name == "APPENDS":
                items = pop_mark()
                _target(stack, list).extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                _target(stack, dict)[_key(key)] = value
            elif name == "SETITEMS":
                items = pop_mark()
                if len(items) % 2:
                    raise PickleCorrupt("odd number of items for SETITEMS")
                target = _target(stack, dict)
                for i in range(0, len(items), 2):
                    target[_key(items[i])] = items[i + 1]
            elif name == "ADDITEMS":
                items = pop_mark()
                target = _target(stack, set)
                for v in items:
                    target.add(_key(v))
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise PickleCorrupt(f"memo entry {arg} used before it was stored")
                stack.append(memo[arg])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if type(arg) is not int or arg < 0:
                    raise PickleCorrupt("bad memo index")
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                stack.append(find_global(module, attr, "GLOBAL"))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                stack.append(find_global(module, attr, "STACK_GLOBAL"))
            elif name == "REDUCE":
                args, func = stack.pop(), stack.pop()
                if not isinstance(func, _Global) or func.call is None:
                    raise PickleRefused(f"REDUCE calls {_describe(func)}, which may not be called")
                if type(args) is not tuple:
                    raise PickleCorrupt("REDUCE arguments are not a tuple")
                try:
                    stack.append(func.call(*args))
                except TypeError:  # wrong number of arguments for the stand-in
                    raise PickleRefused(f"bad arguments for {func.module}.{func.name}") from None
            elif name == "NEWOBJ":
                args, cls = stack.pop(), stack.pop()
                if not isinstance(cls, _Global) or cls.new is None:
                    raise PickleRefused(f"NEWOBJ builds {_describe(cls)}, which may not be constructed")
                if type(args) is not tuple:
                    raise PickleCorrupt("NEWOBJ arguments are not a tuple")
                stack.append(cls.new(*args))
            elif name == "BUILD":
                state = stack.pop()
                obj = stack[-1]
                if type(obj).__name__ == "OrderedDict" and type(obj).__module__ == "collections":
                    _check_state_dict_metadata(state)
                    continue
                if not isinstance(obj, (ModuleStub, NumpyDType, NumpyArray)):
                    raise PickleRefused(f"BUILD (set object state) on {_describe(obj)} is not allowed")
                obj.build(state)
            elif name == "BINPERSID":
                pid = stack.pop()
                if persistent_load is None:
                    raise PickleRefused("unexpected persistent id (tensor data) in this pickle")
                if type(pid) is not tuple:
                    raise PickleRefused("persistent id is not a tuple")
                stack.append(persistent_load(pid))
            else:  # every opcode of protocols 0-5 is handled above; a new one must be looked at first
                raise PickleRefused(f"pickle opcode {name} is not supported")
    except UserError:
        raise
    except RecursionError:
        raise PickleCorrupt("pickle nests too deeply") from None
    except Exception as e:  # noqa: BLE001 - any decoding failure of untrusted bytes means "corrupt"
        raise PickleCorrupt(f"malformed pickle ({type(e).__name__}: {e})") from None
    raise PickleCorrupt("pickle ended without STOP")


def _check_state_dict_metadata(state: Any) -> None:
    """`nn.Module.state_dict()` returns an OrderedDict carrying a `_metadata` attribute (per-module
    versions), which pickles as BUILD with `{'_metadata': ...}`. That is the only state we accept on an
    OrderedDict, and we drop it: loading never needs it."""
    if not isinstance(state, dict) or set(state) - {"_metadata"}:
        raise PickleRefused("BUILD (set object state) on an OrderedDict with attributes other than _metadata")


def _target(stack: list[Any], kind: type) -> Any:
    if not stack:
        raise PickleCorrupt("stack underflow")
    target = stack[-1]
    if type(target) is not kind and not (kind is dict and isinstance(target, dict) and type(target).__module__ == "collections"):
        raise PickleRefused(f"cannot add items to {_describe(target)}")
    return target


def _describe(obj: Any) -> str:
    if isinstance(obj, (_Global, InertGlobal)):
        return _dotted(obj.module, obj.name)
    return f"a {type(obj).__name__}"
