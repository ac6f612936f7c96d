"""UiContext: what every tab gets from whoever builds the UI (the A1111 script or the standalone app).

Tabs never find the host, the job manager or the other tabs themselves; they read them from here. The A1111
entry (`scripts/training_lab.py`) builds one with the WebUI host; `python -m lib_sdtrain app` builds one with
the standalone host (see `commands.app.standalone_context`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..jobs import JobManager


@dataclass
class UiContext:
    host_factory: Callable[[], Any]                 # () -> Host, one per job or per action
    jobs: JobManager
    in_webui: bool = False                          # True inside A1111/Forge (gradio 3.41.2 / 4.40)
    default_model: str = ""                         # shown in the model box; "" = the host's current model
    # Hooks set by the builder; None hides the button that would call them.
    open_compare: Callable[[str], Any] | None = None        # (run_dir) -> None: switch to Compare, pre-filled
    open_dataset: Callable[[str], Any] | None = None        # (folder) -> None
    config_dir: Path | None = None                  # where Save/Load config looks first ("" = run folders)
    extras: dict[str, Any] = field(default_factory=dict)   # anything a tab wants to share with another
    # Filled by the tabs while building, so that tabs can wire into each other (e.g. Monitor's job box).
    components: dict[str, Any] = field(default_factory=dict)
    # Called once every tab is built (wiring that needs components of a later tab).
    after_build: list[Callable[[], Any]] = field(default_factory=list)

    def host(self) -> Any:
        return self.host_factory()


def host_sampler_names(ctx: Any) -> list[str]:
    """Every sampler the host draws control and class pictures with, as its UI names them (`sampler_names`;
    A1111: its visible samplers), else ours (standalone)."""
    from ..sample_settings import SAMPLERS

    try:
        names = getattr(ctx.host(), "sampler_names", None)
        listed = list(names()) if callable(names) else []
    except Exception:  # noqa: BLE001 - no host yet: our names still work
        listed = []
    return listed or list(SAMPLERS)


def host_sampler_spelling(names: list[str], value: Any) -> Any:
    """`value` as `names` spell it: our name of one of our samplers, or a host's name in another case ("euler"
    → "Euler", "dpm++ 2m" → "DPM++ 2M" in A1111's list); any other value unchanged."""
    from ..sample_settings import canonical_sampler

    if not isinstance(value, str):
        return value
    ours, key = canonical_sampler(value), value.strip().lower()
    return next((n for n in names if n.lower() == key), None) \
        or next((n for n in names if canonical_sampler(n) == ours), value)
