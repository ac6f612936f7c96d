"""Hypernetwork `.pt` files: scanned with the safe loader and reported, never converted.

A1111 lists hypernetworks with `**/*.pt` only (a1111-host.md §4), so a `.safetensors` copy would simply be
invisible to it; the useful service is the scan itself (the file loaded without any forbidden global) and
a description of what it holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..formats.archive import TorchArchive
from .output import ConvertResult
from ..formats.unpickler import LazyTensor

REASON = "A1111 lists hypernetworks only as .pt files, so it stays .pt (a .safetensors copy would be invisible to it)"


def looks_like(root: Any, path: Path | None = None) -> bool:
    """A1111's layout: int keys (context widths) -> (k, v) pairs of layer state dicts, plus settings."""
    if not isinstance(root, dict):
        return False
    sizes = [k for k in root if type(k) is int]
    pairs = sizes and all(isinstance(root[k], (tuple, list)) and all(isinstance(s, dict) for s in root[k])
                          for k in sizes)
    return bool(pairs) or {"layer_structure", "activation_func"} <= set(root)


def describe(root: dict) -> str:
    sizes = sorted(k for k in root if type(k) is int)
    tensors = sum(1 for k in sizes for sd in root[k] for v in sd.values() if isinstance(v, LazyTensor))
    structure = root.get("layer_structure")
    parts = [f"sizes {', '.join(map(str, sizes)) or 'none'}"]
    if isinstance(structure, (list, tuple)):
        parts.append(f"layer structure {', '.join(f'{x:g}' if isinstance(x, float) else str(x) for x in structure)}")
    for key, label in (("activation_func", "activation"), ("step", "step")):
        if isinstance(root.get(key), (str, int)) and not isinstance(root.get(key), bool):
            parts.append(f"{label} {root[key]}")
    parts.append(f"{tensors} tensors")
    return "; ".join(parts)


def convert(archive: TorchArchive, *_: Any) -> ConvertResult:
    """Refuse with a description: the file was read safely, but converting it would hide it from A1111."""
    return ConvertResult(archive.path, "refused", "hypernetwork",
                         message=f"hypernetwork ({describe(archive.root)}), scanned safely; not converted: {REASON}")
