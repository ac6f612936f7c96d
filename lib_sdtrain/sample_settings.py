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
# How A1111 shows the samplers of SAMPLERS in its sampler list (its "Euler" is plain k-diffusion Euler, not
# "Euler a"). Settings take these too, in any case, and keep our name: "DDIM" is stored as "ddim".
A1111_NAMES: dict[str, str] = {"euler": "Euler", "ddim": "DDIM"}


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
    "seed": SamplingField(0, "random seed; the same seed gives the same picture", minimum=0, maximum=2**32 - 1),
}

# The largest seed (A1111 draws its random seeds below it, kohya's are 32-bit). Runs add to their seeds (picture
# i: seed + i; a batch's noise: seed × 1,000,003 + batch), and torch's generators refuse seeds of 2**64 and more:
# a larger seed made a run fail at its first step with "Overflow when unpacking long long".
MAX_SEED: int = SAMPLING["seed"].maximum

# The largest picture side anything here draws or trains at (A1111's own sliders stop at 2048). A typo such as
# 100000 would otherwise allocate latents and attention until the machine runs out of memory.
MAX_PICTURE_SIDE: int = 4096

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

    The sampler setting takes A1111's names of our samplers too ("Euler", "DDIM", any case) and stores ours
    (`canonical_sampler`); a name it refuses gets `check_sampler`'s message, which lists what is accepted.
    """
    f = SAMPLING[what]
    choices = None if any_host_sampler else f.choices
    text = f.help if help is None else help
    normalize = None
    if what == "sampler":
        normalize = canonical_sampler if any_host_sampler else check_sampler
        text += f": {accepted_samplers()}" + ("; inside the WebUI also any of its sampler names"
                                              if any_host_sampler else "")
    return setting(f.default if default is None else default, text, choices=choices, minimum=f.minimum,
                   maximum=f.maximum, step=f.step, normalize=normalize, **kw)


def accepted_samplers() -> str:
    """The sampler names `check_sampler` accepts, in words."""
    return f"{' or '.join(SAMPLERS)} (A1111's {' and '.join(A1111_NAMES[s] for s in SAMPLERS)}; any case)"


def canonical_sampler(name: Any) -> Any:
    """Our name of one of our samplers given as ours or as A1111 shows it, in any case ("Euler" → "euler",
    "DDIM" → "ddim"); any other value unchanged (a WebUI host may know the name)."""
    if not isinstance(name, str):
        return name
    key = name.strip().lower()
    for ours in SAMPLERS:
        if key in (ours, A1111_NAMES[ours].lower()):
            return ours
    return name


def check_sampler(name: Any) -> str:
    """Our name of `name` if it is a sampler we implement (see `canonical_sampler`); UserError otherwise."""
    ours = canonical_sampler(name)
    if ours not in SAMPLERS:
        from .errors import UserError

        raise UserError(f"unknown sampler {name!r}; the samplers accepted here are {accepted_samplers()}")
    return ours
