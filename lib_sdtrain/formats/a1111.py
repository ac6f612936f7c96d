"""A1111 v1.10's own file layouts for embeddings and hypernetworks, and a `.pt` writer its safe loader accepts.

Layouts (a1111-host.md §4; the samples in tests/data/golden/a1111_formats were written by A1111's own code):
  - embedding `.pt` (`Embedding.save`): {"string_to_token": {"*": 265}, "string_to_param": {"*": [n, D]},
    "name", "step", "sd_checkpoint" (10-hex checkpoint shorthash or None), "sd_checkpoint_name"};
  - SDXL embedding (`.pt` or `.safetensors`): exactly {"clip_l": [n, 768], "clip_g": [n, 1280]}; A1111 turns
    every value of such a dict into a vector, so nothing else may be in it;
  - SD1/SD2 embedding `.safetensors`: one tensor, "emb_params" [n, D] (kohya's name; A1111 takes any
    single-tensor file);
  - hypernetwork `.pt` (`Hypernetwork.save`): int keys (attention input widths) → a tuple of two state dicts
    (k, v) of `HypernetworkModule.linear` (`linear.<i>.weight|bias`), then step, name, layer_structure,
    activation_func, is_layer_norm, weight_initialization, sd_checkpoint, sd_checkpoint_name,
    activate_output, use_dropout, dropout_structure, last_layer_dropout, optional_info.

Why our own `.pt` writer: `torch.save` of torch ≥ 2.5 adds `.format_version` and `.storage_alignment` zip
members, and A1111 v1.10.1's `safe.check_zip_filenames` accepts only
`<dir>/(data/<n>|version|byteorder|.data/serialization_id|data.pkl)` (modules/safe.py): it logs an error
and returns None for such a file, so the embedding or hypernetwork silently does not load. `write_torch_pt`
writes what torch 2.1 (A1111's pin) writes, minus optional records: `<dir>/data.pkl` (pickle protocol 2;
tensors as `torch._utils._rebuild_tensor_v2` over persistent-id storages `('storage', torch.FloatStorage,
'<key>', 'cpu', numel)`), `<dir>/data/<key>` (raw little-endian storage bytes, 64-byte aligned like torch's
writer) and `<dir>/version` (`3`). `byteorder` is left out (torch then assumes little-endian) so that even
A1111 releases before 1.7, whose check did not allow it, accept the file. The only globals in the pickle are
`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and `torch.<X>Storage`, all on A1111's list.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import sys
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .files import atomic_write_bytes

if TYPE_CHECKING:
    import torch

# A1111's constants (textual_inversion.Embedding.save; hypernetwork.HypernetworkModule)
TI_STRING_TO_TOKEN = {"*": 265}
HYPERNETWORK_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid")
HYPERNETWORK_WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")
HYPERNETWORK_INFO_KEYS = ("step", "name", "layer_structure", "activation_func", "is_layer_norm",
                          "weight_initialization", "sd_checkpoint", "sd_checkpoint_name", "activate_output",
                          "use_dropout", "dropout_structure", "last_layer_dropout", "optional_info")
SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")

TORCH_ZIP_VERSION = b"3\n"     # torch's kProducedFileFormatVersion since 1.6
_ALIGN = 64                     # torch's writer aligns record data to 64 bytes (its extra field "FB")
_STORAGE_NAMES = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
                  "float64": "DoubleStorage", "int64": "LongStorage", "int32": "IntStorage", "uint8": "ByteStorage"}


# ---- embeddings ---------------------------------------------------------------------------------------
def embedding_pt_layout(vectors: torch.Tensor, *, name: str, step: int | None = 0, sd_checkpoint: str | None = None,
                        sd_checkpoint_name: str | None = None, requires_grad: bool = True) -> dict[str, Any]:
    """The dict `Embedding.save()` pickles for an SD1/SD2 embedding (vectors [n, D], float32 CPU copy).

    `requires_grad=True` is what A1111's training save path writes (its vector is the trained leaf).
    """
    vec = _vectors(vectors, "embedding")
    return {
        "string_to_token": dict(TI_STRING_TO_TOKEN),
        "string_to_param": {"*": vec.requires_grad_(requires_grad)},
        "name": str(name),
        "step": None if step is None else int(step),
        "sd_checkpoint": sd_checkpoint or None,
        "sd_checkpoint_name": sd_checkpoint_name or None,
    }


def embedding_sdxl_layout(clip_l: torch.Tensor, clip_g: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"clip_l": [n, 768], "clip_g": [n, 1280]}: the SDXL form A1111 reads from `.pt` and `.safetensors`."""
    vl, vg = _vectors(clip_l, "clip_l"), _vectors(clip_g, "clip_g")
    if vl.shape[0] != vg.shape[0]:
        raise ValueError(f"clip_l has {vl.shape[0]} vectors, clip_g {vg.shape[0]}")
    return {"clip_l": vl, "clip_g": vg}


def embedding_safetensors_layout(vectors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One vector tensor per text encoder → `{"emb_params": …}` (SD1/SD2) or `{"clip_l", "clip_g"}` (SDXL)."""
    if len(vectors) == 1:
        return {"emb_params": _vectors(vectors[0], "emb_params")}
    if len(vectors) == 2:
        return embedding_sdxl_layout(*vectors)
    raise ValueError(f"an embedding has one vector tensor per text encoder (1 or 2), got {len(vectors)}")


def _vectors(t: torch.Tensor, what: str) -> torch.Tensor:
    import torch

    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"{what}: expected a [vectors, width] float tensor, got {getattr(t, 'shape', type(t))}")
    return t.detach().to("cpu", torch.float32).contiguous().clone()


# ---- hypernetworks -------------------------------------------------------------------------------------
# Bounds on a hypernetwork's layer structure that A1111 does not check. A factor below 0.01 gives a layer of no
# units on SD's narrowest (320-wide) attention. A factor far above the usual 1-4 ("1, 1e9, 1"), or thousands of
# layers, gives a network too big for any memory. NaN or inf crash later.
LAYER_FACTOR_RANGE = (0.01, 32.0)
MAX_LAYERS = 32


def parse_layer_structure(text: str | Sequence[float]) -> list[float]:
    """"1, 2, 1" → [1.0, 2.0, 1.0] as A1111's create_hypernetwork parses it; must start and end with 1."""
    try:
        values = [float(x.strip()) for x in text.split(",")] if isinstance(text, str) else [float(x) for x in text]
    except ValueError:
        raise UserError(f"hypernetwork layer structure {text!r} is not a comma-separated list of numbers") from None
    if len(values) < 2 or values[0] != 1 or values[-1] != 1:
        raise UserError(f"hypernetwork layer structure {text!r} must start and end with 1 (e.g. 1, 2, 1)")
    if any(v <= 0 for v in values):
        raise UserError(f"hypernetwork layer structure {text!r}: every factor must be positive")
    if not all(LAYER_FACTOR_RANGE[0] <= v <= LAYER_FACTOR_RANGE[1] for v in values):   # also NaN and inf
        raise UserError(f"hypernetwork layer structure {text!r}: every factor must be a number from "
                        f"{LAYER_FACTOR_RANGE[0]} to {LAYER_FACTOR_RANGE[1]:g}")
    if len(values) > MAX_LAYERS + 1:
        raise UserError(f"hypernetwork layer structure {text!r} has {len(values) - 1} layers; at most {MAX_LAYERS}")
    return values


def parse_dropout_structure(text: str, layer_structure: Sequence[float], use_dropout: bool,
                            last_layer_dropout: bool) -> list[float] | list[int]:
    """The `dropout_structure` A1111 stores: one probability per layer_structure entry.

    Off → `[0] * len(structure)` (ints, as create_hypernetwork writes). On with a text → its floats
    (create_hypernetwork). On with an empty text → A1111's `parse_dropout_structure`: 0, then 0.3 for every
    hidden layer but the last, then 0.3 or 0 for the last hidden layer (`last_layer_dropout`), then 0.
    """
    n = len(layer_structure)
    if not use_dropout:
        return [0] * n
    if text and text.strip():
        try:
            values = [float(x.strip()) for x in text.split(",")]
        except ValueError:
            raise UserError(f"hypernetwork dropout structure {text!r} is not a comma-separated list of numbers") \
                from None
    else:
        values = [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0] if n >= 3 else [0.0] * n
    if len(values) != n:
        raise UserError(f"hypernetwork dropout structure {text!r} needs {n} values, one per layer structure entry")
    if values[0] != 0 or values[-1] != 0:
        raise UserError(f"hypernetwork dropout structure {text!r} must start and end with 0")
    if any(not 0 <= v < 1 for v in values):
        raise UserError(f"hypernetwork dropout structure {text!r}: every value must be in [0, 1)")
    return values


def read_hypernetwork(data: Any, name: str) -> tuple[dict[str, Any], dict[int, tuple[dict, dict]]]:
    """(structure, {width: (k state, v state)}) of a loaded hypernetwork file (`safe_pickle.load_checkpoint`),
    checked as A1111's `Hypernetwork.load` needs it: a dict whose int keys hold the (k, v) pair of layer state
    dicts of tensors, and whose layer_structure (default [1, 2, 1]), activation_func (default linear),
    is_layer_norm and activate_output have their types. `structure` holds those four settings. UserError naming
    the file `name` otherwise."""
    import torch

    if not isinstance(data, dict):
        raise UserError(f"{name}: not a hypernetwork (its top level is {type(data).__name__}, not a dict)")
    raw = data.get("layer_structure")
    if raw is None:
        raw = [1, 2, 1]
    if not isinstance(raw, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                     for x in raw):
        raise UserError(f"{name}: its layer_structure {str(raw)[:60]!r} is not a list of numbers")
    try:
        layers = parse_layer_structure(raw)
    except UserError as e:
        raise UserError(f"{name}: {e}") from None
    activation = data.get("activation_func") or "linear"
    if not isinstance(activation, str):
        raise UserError(f"{name}: its activation_func {str(activation)[:60]!r} is not a name")
    flags = {k: data.get(k, default) for k, default in (("is_layer_norm", False), ("activate_output", True))}
    if not all(isinstance(v, (bool, int)) for v in flags.values()):
        raise UserError(f"{name}: is_layer_norm and activate_output must be true or false")
    pairs: dict[int, tuple[dict, dict]] = {}
    for width in sorted(k for k in data if type(k) is int):
        pair = data[width]
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
                isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
                for sd in pair)):
            raise UserError(f"{name}: width {width} does not hold the (k, v) pair of layer states A1111 writes")
        pairs[width] = (pair[0], pair[1])
    structure = {"layer_structure": layers, "activation_func": activation,
                 "is_layer_norm": bool(flags["is_layer_norm"]), "activate_output": bool(flags["activate_output"])}
    return structure, pairs


def hypernetwork_layout(modules: Mapping[int, tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]], *,
                        name: str, step: int, layer_structure: Sequence[float], activation_func: str,
                        is_layer_norm: bool, weight_initialization: str, sd_checkpoint: str | None,
                        sd_checkpoint_name: str | None, activate_output: bool, use_dropout: bool,
                        dropout_structure: Sequence[float], optional_info: str | None = None) -> dict[Any, Any]:
    """The dict `Hypernetwork.save()` pickles, in its key order. State dicts are copied to float32 CPU.

    `last_layer_dropout` is derived as A1111 does on save: `dropout_structure[-2] != 0`.
    """
    import torch

    out: dict[Any, Any] = {}
    for width, (k_state, v_state) in modules.items():
        if type(width) is not int:
            raise ValueError(f"hypernetwork sizes are int keys, got {width!r}")
        out[width] = tuple(_state_copy(sd, torch) for sd in (k_state, v_state))
    out.update({
        "step": int(step),
        "name": str(name),
        "layer_structure": [float(x) for x in layer_structure],
        "activation_func": str(activation_func),
        "is_layer_norm": bool(is_layer_norm),
        "weight_initialization": str(weight_initialization),
        "sd_checkpoint": sd_checkpoint or None,
        "sd_checkpoint_name": sd_checkpoint_name or None,
        "activate_output": bool(activate_output),
        "use_dropout": bool(use_dropout),
        "dropout_structure": list(dropout_structure),
        "last_layer_dropout": bool(dropout_structure[-2] != 0) if len(dropout_structure) >= 2 else False,
        "optional_info": optional_info or None,
    })
    return out


def _state_copy(state: Mapping[str, Any], torch: Any) -> OrderedDict:
    """A state dict as `Module.state_dict()` returns it: OrderedDict with its `_metadata` (kept when present)."""
    out: OrderedDict = OrderedDict((k, v.detach().to("cpu", torch.float32).contiguous().clone())
                                   for k, v in state.items())
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict((k, dict(v)) for k, v in meta.items())  # type: ignore[attr-defined]
    return out


# ---- the .pt writer --------------------------------------------------------------------------------------
class _Storage:
    """One tensor's bytes, pickled by reference as torch does (the persistent id names a zip record)."""

    __slots__ = ("data", "key", "numel", "storage_type")

    def __init__(self, key: str, storage_type: Any, numel: int, data: bytes) -> None:
        self.key, self.storage_type, self.numel, self.data = key, storage_type, numel, data


class _TorchPickler(pickle.Pickler):
    """pickle protocol 2 with torch.save's tensor reduction; every tensor gets its own storage record."""

    def __init__(self, fh: io.BytesIO) -> None:
        super().__init__(fh, protocol=2)
        self.storages: list[_Storage] = []

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        import torch

        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        t = obj.detach().to("cpu").contiguous()
        dtype = str(t.dtype).replace("torch.", "")
        if dtype not in _STORAGE_NAMES:
            raise UserError(f"cannot write a {t.dtype} tensor to an A1111 .pt file (its loader allows only "
                            f"{', '.join(sorted(_STORAGE_NAMES))})")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        storage = _Storage(str(len(self.storages)), getattr(torch, _STORAGE_NAMES[dtype]), t.numel(), raw)
        self.storages.append(storage)
        stride = tuple(t.stride())
        # torch: _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks)
        return (torch._utils._rebuild_tensor_v2,
                (storage, 0, tuple(int(s) for s in t.shape), stride, bool(obj.requires_grad), OrderedDict()))


def _check_plain(obj: Any, depth: int = 0) -> None:
    """Only what A1111's restricted unpickler can rebuild: dict/OrderedDict/list/tuple/str/int/float/bool/None
    and tensors. Anything else (a torch.Size, a numpy value, a set, a custom class) is refused up front."""
    import torch

    if depth > 50:
        raise ValueError("structure nests too deeply for a .pt file")
    if obj is None or type(obj) in (str, int, float, bool):
        return
    if isinstance(obj, torch.Tensor):
        return
    if type(obj) in (list, tuple):
        for v in obj:
            _check_plain(v, depth + 1)
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise ValueError(f"dict key {k!r} ({type(k).__name__}) cannot go into an A1111 .pt file")
            _check_plain(v, depth + 1)
        for v in vars(obj).values() if type(obj) is OrderedDict else ():
            _check_plain(v, depth + 1)   # a state dict's `_metadata`
        return
    raise ValueError(f"{type(obj).__module__}.{type(obj).__qualname__} cannot go into an A1111 .pt file")


def _archive_name(path: Path) -> str:
    """torch names the archive folder after the file's stem; keep it to plain characters."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem).strip(".")
    return name or "archive"


def torch_pt_bytes(obj: Any, archive_name: str = "archive") -> bytes:
    """`obj` serialized as a torch zip file (see the module docstring), as bytes."""
    if sys.byteorder != "little":
        raise UserError("writing .pt files needs a little-endian machine")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", archive_name):
        raise ValueError(f"archive name {archive_name!r} must be plain characters")
    _check_plain(obj)
    buf = io.BytesIO()
    pickler = _TorchPickler(buf)
    pickler.dump(obj)
    records = [(f"{archive_name}/data.pkl", buf.getvalue())]
    records += [(f"{archive_name}/data/{s.key}", s.data) for s in pickler.storages]
    records.append((f"{archive_name}/version", TORCH_ZIP_VERSION))
    return _zip_stored(records)


def write_torch_pt(path: str | Path, obj: Any, *, overwrite: bool = True) -> Path:
    """Write `obj` (plain containers + tensors) as a `.pt` file that A1111 v1.10's safe loader, `torch.load`
    (also `weights_only=True`) and our own safe unpickler read. Atomic; returns the path."""
    path = Path(path)
    return atomic_write_bytes(path, torch_pt_bytes(obj, _archive_name(path)), overwrite=overwrite)


def _zip_stored(records: list[tuple[str, bytes]]) -> bytes:
    """A plain zip (no compression, no data descriptors, fixed 1980-01-01 time) with 64-byte aligned data."""
    out = bytearray()
    central = bytearray()
    dos_time, dos_date = 0, (0 << 9) | (1 << 5) | 1
    for name, data in records:
        raw = name.encode("utf-8")
        flags = 0 if name.isascii() else 0x800
        crc = zlib.crc32(data) & 0xFFFFFFFF
        offset = len(out)
        if offset + len(data) + 1024 >= 0xFFFFFFFF or len(records) >= 0xFFFF:
            raise UserError("the .pt file would be larger than 4 GiB, which this writer does not support")
        pad = (-(offset + 30 + len(raw) + 4)) % _ALIGN
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, 0, dos_time, dos_date, crc, len(data), len(data),
                           len(raw), len(extra))
        out += raw + extra
        out += data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, 0, dos_time, dos_date, crc,
                               len(data), len(data), len(raw), 0, 0, 0, 0, 0, offset)
        central += raw
    cd_offset = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central), cd_offset, 0)
    return bytes(out)
