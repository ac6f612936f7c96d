"""A1111 wiring: Training Lab's axes in the built-in X/Y/Z plot script (the logic is lib_sdtrain/evaluate/xyz.py).

Axes: "Training Lab: LoRA epoch", "… LoRA weight", "… embedding step", "… hypernetwork epoch", "… checkpoint
epoch". They are appended to xyz_grid's module-level `axis_options` before the UI is built (its Script.ui()
copies that list), found the way a1111-host.md §6 describes: the `scripts.scripts_data` entry whose script
class comes from the module "xyz_grid.py". Nothing here may stop A1111 from starting: without the X/Y/Z
script, or with one of another shape, the axes are simply not added (one line on stderr says why).
"""

from __future__ import annotations

import sys

import lib_sdtrain  # noqa: F401  (imported while the extension root is on sys.path; see style.md §3)
from lib_sdtrain.evaluate import xyz as lab_xyz
from modules import script_callbacks, scripts


def _xyz_module():
    for data in getattr(scripts, "scripts_data", []):
        cls = getattr(data, "script_class", None)
        if getattr(cls, "__module__", "") == "xyz_grid.py" and hasattr(getattr(data, "module", None), "AxisOption"):
            return data.module
    return None


def _folder(kind: str):
    """Where A1111 reads files of `kind` (a1111-host.md §8)."""
    from modules import shared

    opts = shared.cmd_opts
    if kind == "lora":
        return getattr(opts, "lora_dir", None)
    if kind == "embedding":
        return getattr(opts, "embeddings_dir", None)
    if kind == "hypernetwork":
        return getattr(opts, "hypernetwork_dir", None)
    if kind == "checkpoint":
        if getattr(opts, "ckpt_dir", None):
            return opts.ckpt_dir
        from modules import sd_models

        return getattr(sd_models, "model_path", None)
    return None


def _resolve_checkpoint(name: str) -> str:
    """A1111's checkpoint name for a file stem; a new file needs the list refreshed first (§6)."""
    from modules import sd_models

    info = sd_models.get_closet_checkpoint_match(name)
    if info is None:
        sd_models.list_models()
        info = sd_models.get_closet_checkpoint_match(name)
    if info is None:
        raise RuntimeError(f"Unknown checkpoint: {name}")
    return info.name


def add_training_lab_axes() -> None:
    try:
        module = _xyz_module()
        if module is None:
            return
        lab_xyz.add_axes(module, lab_xyz.make_axes(_folder, _resolve_checkpoint))
    except Exception as e:  # noqa: BLE001 - an optional feature must never break A1111's startup
        print(f"Training Lab: X/Y/Z plot axes not added: {type(e).__name__}: {e}", file=sys.stderr)


script_callbacks.on_before_ui(add_training_lab_axes)
add_training_lab_axes()   # xyz_grid.py (webui's own scripts/) is already loaded when extensions load
