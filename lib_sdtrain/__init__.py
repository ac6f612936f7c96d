"""Training Lab core: Stable Diffusion training that runs inside A1111 or on its own.

Importing the package pulls in neither torch nor gradio; submodules import what they need.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"


def source_snapshot() -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime in ns) of every .py file of the package as it is on disk now: a few milliseconds."""
    root = os.path.dirname(os.path.abspath(__file__))
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                found.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


# The package's files when it was imported. A1111's Reload UI keeps imported packages (so a training run goes on
# through it) and runs scripts/ again; after an update of the extension's folder, the reloaded tab would still run
# this code, and modules first imported later would come from the new files: `source_changed()` tells.
LOADED_SOURCE = source_snapshot()


def source_changed() -> bool:
    """True when the package's .py files on disk differ from those present when it was imported."""
    return source_snapshot() != LOADED_SOURCE
