"""Axes for A1111's built-in X/Y/Z plot: a run's saved epochs and strengths as plot axes.

Plain logic (no `modules` import): `scripts/training_lab_xyz.py` wraps each `AxisSpec` in xyz_grid's own
`AxisOption(label, type, apply, format_value, confirm, cost, choices)` (a1111-host.md §6). Every apply
function edits the per-cell copy of the processing object `p` the way A1111's own axes do:

- LoRA epoch: puts `<lora:STEM:W>` in `p.prompt` (builtin Lora resolves STEM = the file stem, §5). A tag of
  the same run already in the prompt is replaced (its weight kept); otherwise the tag is appended.
- LoRA weight: sets W of the LoRA chosen on the epoch axis; without one, of the prompt's LoRAs that belong
  to runs with saved epochs (other LoRAs never change). Either axis may be applied first: the weight is
  remembered on `p` for the epoch axis.
- Embedding step: the embedding's token is its file stem; the run's token in the prompts is replaced by the
  chosen save's stem (appended to the prompt if absent).
- Hypernetwork epoch: like LoRA with `<hypernet:STEM:W>`.
- Checkpoint epoch (Dreambooth / fine-tune): `p.override_settings["sd_model_checkpoint"]`, as A1111's
  Checkpoint name axis does; cost 1.0 so it is the outer loop (a model load per value).
Labels say which run, epoch and step a value is (from the file name and its `ss_epoch`/`ss_steps`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..methods import KIND_SUFFIXES
from .runs import SavedFile, describe_file, group_saved_files, parse_save_name

LABEL_PREFIX = "Training Lab: "
AXIS_LABELS = {
    "lora": LABEL_PREFIX + "LoRA epoch",
    "lora_weight": LABEL_PREFIX + "LoRA weight",
    "embedding": LABEL_PREFIX + "embedding step",
    "hypernetwork": LABEL_PREFIX + "hypernetwork epoch",
    "checkpoint": LABEL_PREFIX + "checkpoint epoch",
}
# attributes kept on the per-cell `p` so the two LoRA axes work in either order
LORA_ATTR, WEIGHT_ATTR = "training_lab_lora", "training_lab_lora_weight"

_TAG = re.compile(r"<(?P<kind>[A-Za-z_]\w*):(?P<name>[^:>]+)(?P<args>(?::[^>]*)?)>")


@dataclass
class AxisSpec:
    """What xyz_grid's AxisOption needs, with our functions."""

    key: str
    label: str
    type: type
    apply: Callable[[Any, Any, list], None]
    format_value: Callable[[Any, Any, Any], str]
    choices: Callable[[], list[str]] | None = None
    confirm: Callable[[Any, list], None] | None = None
    cost: float = 0.0


# ---- prompt editing -------------------------------------------------------------------------------
def _family(stem: str) -> str:
    return parse_save_name(stem)[0]  # type: ignore[index]


def _fmt(weight: float) -> str:
    return f"{float(weight):g}"


def set_network(prompt: str, stem: str, weight: float | None = None, tag: str = "lora") -> str:
    """`prompt` with `<tag:stem:weight>`: a tag of the same run (same name before -000N / -stepN) is replaced,
    keeping its weight when `weight` is None; else the tag is appended (weight 1 when None)."""
    family = _family(stem)
    kinds = ("lora", "lyco") if tag == "lora" else (tag,)
    done = False

    def swap(m: re.Match) -> str:
        nonlocal done
        if done or m.group("kind") not in kinds or _family(m.group("name")) != family:
            return m.group(0)
        done = True
        args = m.group("args")
        if weight is not None:
            rest = args.split(":")[2:] if args else []        # keep a separate UNet/dyn multiplier if there
            args = ":" + ":".join([_fmt(weight), *rest])
        return f"<{tag}:{stem}{args}>"

    out = _TAG.sub(swap, prompt or "")
    if not done:
        # A space, not ", ": A1111 takes the tag out of the prompt and leaves the text around it, so a comma would
        # stay and be a token of its own; "prompt <lora:…>" conditions exactly as "prompt" does, the cell then
        # matches the control picture of the same prompt and seed (checked in A1111 v1.10.1, session 10).
        sep = " " if out.strip() else ""
        out = f"{out.rstrip()}{sep}<{tag}:{stem}:{_fmt(1.0 if weight is None else weight)}>"
    return out


def set_network_weight(prompt: str, weight: float, stem: str | None = None, tag: str = "lora") -> str:
    """Set the weight of `<tag:stem…>` (or of every `<tag:…>` when `stem` is None). Named args like
    `unet=` are kept; a positional UNet multiplier is kept too (only the first, TE/main, one changes)."""
    kinds = ("lora", "lyco") if tag == "lora" else (tag,)

    def swap(m: re.Match) -> str:
        if m.group("kind") not in kinds or (stem is not None and m.group("name") != stem):
            return m.group(0)
        parts = m.group("args").split(":")[1:] if m.group("args") else []
        positional = [a for a in parts if "=" not in a]
        named = [a for a in parts if "=" in a]
        positional = [_fmt(weight), *positional[1:]]
        return f"<{m.group('kind')}:{m.group('name')}:" + ":".join(positional + named) + ">"

    return _TAG.sub(swap, prompt or "")


def set_embedding(prompt: str, stem: str, append: bool = True) -> str:
    """Replace the run's embedding token (any save of it: NAME, NAME-000002, NAME-step00000500) by `stem`."""
    family = re.escape(_family(stem))
    pattern = re.compile(rf"(?<![\w-]){family}(?:-\d{{6}}|-step\d{{6,}})?(?![\w-])")
    out, n = pattern.subn(stem, prompt or "")
    if not n and append:
        out = f"{out.rstrip()}{', ' if out.strip() else ''}{stem}"
    return out


# ---- files and labels -----------------------------------------------------------------------------
class SaveIndex:
    """Saved files of one kind in a folder, re-read when the folder changes (for choices and labels)."""

    def __init__(self, folder: Callable[[], str | Path | None], suffixes: tuple[str, ...]) -> None:
        self.folder, self.suffixes = folder, suffixes
        self._stamp: Any = None
        self._groups: dict[str, list[SavedFile]] = {}

    def groups(self) -> dict[str, list[SavedFile]]:
        folder = self.folder()
        if not folder:
            return {}
        path = Path(folder)
        try:
            stamp = (str(path), path.stat().st_mtime_ns)
        except OSError:
            return {}
        if stamp != self._stamp:
            self._groups, self._stamp = group_saved_files(path, self.suffixes), stamp
        return self._groups

    def choices(self) -> list[str]:
        return [f.stem for files in self.groups().values() for f in files]

    def find(self, stem: str) -> SavedFile | None:
        for f in self.groups().get(_family(stem), []):
            if f.stem == stem:
                return f
        folder = self.folder()
        if folder:
            for suffix in self.suffixes:
                p = Path(folder) / f"{stem}{suffix}"
                if p.is_file():
                    return describe_file(p)
        return None

    def label(self, stem: str) -> str:
        """e.g. "my-lora · epoch 2 · step 120"; the stem alone for files we do not know."""
        f = self.find(str(stem))
        return f"{f.name} · {f.label}" if f is not None else str(stem)


# ---- the axes -------------------------------------------------------------------------------------
def make_axes(folder_of: Callable[[str], str | Path | None],
              resolve_checkpoint: Callable[[str], str] | None = None) -> list[AxisSpec]:
    """The five Training Lab axes.

    Args:
        folder_of: kind ("lora", "embedding", "hypernetwork", "checkpoint") → the folder A1111 reads them from.
        resolve_checkpoint: checkpoint stem → the name A1111's `sd_model_checkpoint` takes; raises for unknown.
    """
    index = {kind: SaveIndex(lambda kind=kind: folder_of(kind), KIND_SUFFIXES[kind])
             for kind in KIND_SUFFIXES}
    resolve = resolve_checkpoint or (lambda name: name)

    def labeller(kind: str):
        return lambda p, opt, x: index[kind].label(x)

    def apply_lora(p: Any, x: str, xs: list) -> None:
        p.prompt = set_network(p.prompt, x, getattr(p, WEIGHT_ATTR, None), "lora")
        setattr(p, LORA_ATTR, x)

    def apply_lora_weight(p: Any, x: float, xs: list) -> None:
        setattr(p, WEIGHT_ATTR, float(x))
        chosen = getattr(p, LORA_ATTR, None)
        if chosen is not None:
            p.prompt = set_network_weight(p.prompt, float(x), chosen, "lora")
            return
        # no epoch axis applied (yet): the prompt's LoRAs of runs with saved epochs; others never change
        runs = set(index["lora"].groups())
        ours = [m.group("name") for m in _TAG.finditer(p.prompt or "")
                if m.group("kind") in ("lora", "lyco") and _family(m.group("name")) in runs]
        for name in dict.fromkeys(ours):
            p.prompt = set_network_weight(p.prompt, float(x), name, "lora")

    def apply_embedding(p: Any, x: str, xs: list) -> None:
        p.prompt = set_embedding(p.prompt, x)
        if getattr(p, "negative_prompt", None):
            p.negative_prompt = set_embedding(p.negative_prompt, x, append=False)

    def apply_hypernetwork(p: Any, x: str, xs: list) -> None:
        p.prompt = set_network(p.prompt, x, None, "hypernet")

    def apply_checkpoint(p: Any, x: str, xs: list) -> None:
        p.override_settings["sd_model_checkpoint"] = resolve(x)

    def refuse_empty(kind: str, xs: list) -> None:
        # xyz_grid splits the typed values at commas and keeps empty ones ("a, b," gives "a", "b", ""): an empty
        # name failed with an AssertionError, and A1111's closest checkpoint match takes "" for any checkpoint
        if any(not str(x).strip() for x in xs):
            raise RuntimeError(f"Training Lab: an empty {kind} value in the list (a comma too many?): remove it")

    def confirm_checkpoints(p: Any, xs: list) -> None:
        refuse_empty("checkpoint", xs)
        for x in xs:
            resolve(x)   # raises for an unknown checkpoint, before any picture is made

    def confirm_known(kind: str):
        def confirm(p: Any, xs: list) -> None:
            refuse_empty(kind, xs)
            unknown = [x for x in xs if index[kind].find(str(x)) is None]
            if unknown:
                folder = folder_of(kind)
                where = f"in {folder}" if folder else "(A1111 names no folder for them: is its built-in extension on?)"
                raise RuntimeError(f"Training Lab: no {kind} file named {', '.join(map(str, unknown))} {where}")
        return confirm

    def confirm_weights(p: Any, xs: list) -> None:
        bad = [x for x in xs if not math.isfinite(float(x))]
        if bad:   # <lora:name:nan> draws black pictures without a word
            raise RuntimeError(f"Training Lab: LoRA weight {', '.join(map(str, bad))} is not a number; give finite "
                               "weights such as 0.5, 1")

    return [
        AxisSpec("lora", AXIS_LABELS["lora"], str, apply_lora, labeller("lora"), index["lora"].choices,
                 confirm_known("lora")),
        AxisSpec("lora_weight", AXIS_LABELS["lora_weight"], float, apply_lora_weight,
                 lambda p, opt, x: f"weight {_fmt(x)}", confirm=confirm_weights),
        AxisSpec("embedding", AXIS_LABELS["embedding"], str, apply_embedding, labeller("embedding"),
                 index["embedding"].choices, confirm_known("embedding")),
        AxisSpec("hypernetwork", AXIS_LABELS["hypernetwork"], str, apply_hypernetwork, labeller("hypernetwork"),
                 index["hypernetwork"].choices, confirm_known("hypernetwork")),
        AxisSpec("checkpoint", AXIS_LABELS["checkpoint"], str, apply_checkpoint, labeller("checkpoint"),
                 index["checkpoint"].choices, confirm_checkpoints, cost=1.0),
    ]


def add_axes(xyz_module: Any, specs: list[AxisSpec]) -> list[Any]:
    """Append `specs` to xyz_grid's `axis_options` as its own AxisOption objects; labels already there are
    skipped (Reload UI re-runs the callback). Returns the options added."""
    option_cls = getattr(xyz_module, "AxisOption")
    options = getattr(xyz_module, "axis_options")
    present = {getattr(o, "label", None) for o in options}
    added = []
    for s in specs:
        if s.label in present:
            continue
        opt = option_cls(s.label, s.type, s.apply, format_value=s.format_value, confirm=s.confirm, cost=s.cost,
                         choices=s.choices)
        options.append(opt)
        added.append(opt)
    return added
