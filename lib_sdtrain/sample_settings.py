"""The sampling settings, declared once: sampler names, steps, CFG scale and seed with their defaults and ranges.

Every place that draws pictures (control pictures of a run, class pictures, compare grids, `sample`, the toy
measurements, the host's `SampleRequest`) declares its fields with `sampling_setting(...)`, so the CLI flags,
the UI widgets (built from the setting: `ui.widgets`), the saved configs and the validation share one list of
samplers and one range per setting. A field may change the default and the help text; it keeps the range and
the choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import setting

SAMPLERS: tuple[str, ...] = ("euler", "ddim")   # what sampling.py implements (the WebUI host maps them to its own)


@dataclass(frozen=True)
class SamplingField:
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None


SAMPLING: dict[str, SamplingField] = {
    "steps": SamplingField(20, "sampling steps", minimum=1, maximum=150, step=1),
    "cfg_scale": SamplingField(7.0, "classifier-free guidance scale", minimum=0.0, maximum=30.0, step=0.5),
    "sampler": SamplingField("euler", "sampler", choices=SAMPLERS),
    "seed": SamplingField(0, "random seed; the same seed gives the same picture", minimum=0),
}

DEFAULT_STEPS: int = SAMPLING["steps"].default
DEFAULT_CFG_SCALE: float = SAMPLING["cfg_scale"].default
DEFAULT_SAMPLER: str = SAMPLING["sampler"].default


def sampling_setting(what: str, default: Any = None, help: str | None = None, *, any_host_sampler: bool = False,
                     **kw: Any) -> Any:
    """A `config.setting` for one sampling setting ("steps", "cfg_scale", "sampler", "seed") with the shared
    range and choices; `default`, `help` and `setting`'s other keywords (group, flag, advanced) may differ.

    `any_host_sampler`: the sampler is checked by the host when it draws, not here, so that inside the WebUI
    any of A1111's sampler names works (the standalone host still accepts only `SAMPLERS`); widgets then offer
    `SAMPLERS` and accept other names.
    """
    f = SAMPLING[what]
    choices = None if any_host_sampler else f.choices
    text = f.help if help is None else help
    if any_host_sampler:
        text += f" ({' or '.join(SAMPLERS)}; inside the WebUI also any of its sampler names)"
    return setting(f.default if default is None else default, text, choices=choices, minimum=f.minimum,
                   maximum=f.maximum, step=f.step, **kw)


def check_sampler(name: str) -> str:
    """`name` if it is a sampler we implement; UserError otherwise."""
    if name not in SAMPLERS:
        from .errors import UserError

        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return name
