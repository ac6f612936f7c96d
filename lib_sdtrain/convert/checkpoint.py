"""Model checkpoints (`.ckpt` / `.pt` / `.pth` / `.bin` state dicts) -> `.safetensors`.

What is kept: every tensor of the (unwrapped) state dict under its original key. What is dropped, and
recorded in `converted_dropped`: the EMA weights (`model_ema.*`, unless `keep_ema`), everything beside
the state dict (optimizer states, lr schedulers, lightning callbacks, hyper-parameters) and non-tensor
entries inside it. Plain scalars beside the state dict (`global_step`, `epoch`, lightning's version) are
kept as `source_<name>` metadata strings. Keys are not renamed: A1111 applies its own old-key fixes when
it loads, and a bit-exact copy is what a converter owes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from ..errors import UserError
from ..events import Events
from ..formats.archive import TorchArchive
from .output import ConvertConfig, ConvertResult, conversion_metadata, prepare_tensors, scalar_text, write_verified
from ..formats.safe_pickle import EMA_PREFIX, find_state_dict, load_tensor
from ..formats.unpickler import LazyTensor, StorageRef


# Scalars beside the state dict kept as metadata (a lightning file has a handful; the cap bounds the header).
MAX_SOURCE_SCALARS = 100


def looks_like(root: Any, path: Path | None = None) -> bool:
    """Anything with at least one tensor in its state dict (the fallback kind: checked last; any `path`)."""
    try:
        sd = find_state_dict(root)
    except UserError:
        return False
    return any(isinstance(v, LazyTensor) for v in sd.values())


def convert(archive: TorchArchive, out_path: Path, cfg: ConvertConfig, source_sha256: str,
            events: Events | None = None) -> ConvertResult:
    """Write the checkpoint in `archive` to `out_path` (verified). Raises UserError when there is nothing
    to write; the caller has already checked the output name."""
    source = archive.path
    root = archive.root
    sd = find_state_dict(root)
    lazy: dict[str, LazyTensor] = {}
    dropped: dict[str, Any] = {}
    ema = 0
    skipped_entries: list[str] = []
    for key, value in sd.items():
        if isinstance(value, LazyTensor) and isinstance(key, str):
            if key.startswith(EMA_PREFIX) and not cfg.keep_ema:
                ema += 1
            else:
                lazy[key] = value
        else:
            skipped_entries.append(f"{str(key)[:80]} ({type(value).__name__})")
    if not lazy:
        raise UserError(f"{source.name}: no tensors to convert" + (" (only EMA weights; try --keep-ema)" if ema else ""))

    extra: dict[str, str] = {}
    beside: list[str] = []
    if sd is not root and isinstance(root, dict):
        for key, value in root.items():
            if key == "state_dict":
                continue
            text = scalar_text(value)
            if text is not None and isinstance(key, str) and len(extra) < MAX_SOURCE_SCALARS:
                extra[f"source_{key[:80]}"] = text
            else:
                beside.append(str(key)[:80])
    if ema:
        dropped["ema_tensors"] = ema
    if beside:
        dropped["beside_state_dict"] = sorted(beside)
    if skipped_entries:
        dropped["non_tensor_entries"] = skipped_entries[:50] + ([f"... {len(skipped_entries) - 50} more"]
                                                                if len(skipped_entries) > 50 else [])

    ready, counts = prepare_tensors(_stream(source, archive, lazy, events or Events()), cfg.dtype)
    if counts["shared_copies"]:
        dropped["shared_storage_copies"] = counts["shared_copies"]  # not dropped, but no longer shared
    metadata = {**extra, **conversion_metadata("checkpoint", source, source_sha256, archive.layout, cfg, dropped)}
    write_verified(out_path, ready, metadata, overwrite=cfg.overwrite)
    result = ConvertResult(source, "converted", "checkpoint", out_path, dropped=dropped)
    result.message = f"{len(ready)} tensors" + (f", dropped {ema} EMA tensors" if ema else "") \
        + (f", dropped {', '.join(sorted(beside))}" if beside else "")
    if counts["overflow"]:
        result.warnings.append(f"{counts['overflow']} tensors overflowed to inf when cast to fp16")
    return result


def _stream(source: Path, archive: TorchArchive, lazy: dict[str, LazyTensor], events: Events) -> Iterator[tuple[str, Any]]:
    """Load the kept tensors one by one and forget each source storage once its last tensor was handed
    on, so with a cast the full-precision bytes are freed as the copy grows."""
    users = Counter(t.source.key for t in lazy.values() if isinstance(t.source, StorageRef))
    every = max(1, len(lazy) // 100)
    for i, (key, t) in enumerate(lazy.items()):
        if i % every == 0:
            events.progress(i, len(lazy), file=source.name, phase="tensors")
        value = load_tensor(source, t)
        t.unload()
        yield key, value
        del value
        if isinstance(t.source, StorageRef):
            users[t.source.key] -= 1
            if not users[t.source.key]:
                archive.forget(t.source.key)
