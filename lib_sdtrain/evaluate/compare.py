"""Compare a run's saved epochs on the same prompts and seeds: render, score, draw one labelled grid, save.

Rows are the base model (the reference: what the prompts gave before training) and each saved file, oldest
first. Columns are every (prompt, strength, seed) combination; prompts without the trigger ("control
prompts", the run's set B) show whether the concept leaks into pictures that did not ask for it. Pictures
come from `host.sample`, so the comparison uses the host's own sampler (standalone: sampling.py; A1111:
its processing). The grid PNG carries the settings, labels and scores in its text chunk, and a JSON file
beside it holds the same plus the advice.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigBase, setting
from ..errors import UserError
from ..events import Events, StopToken
from ..hosts import SampleRequest
from ..methods import method_spec
from ..sample_settings import MAX_PICTURE_SIDE, MAX_SEED, sampling_setting
from .runs import RunInfo, SavedFile
from .score import SCORE_CHOICES, Scorer, choose_scorer


@dataclass
class CompareSettings(ConfigBase):
    """What to render for a comparison (saved with every grid)."""

    KIND = "compare"
    VERSION = 1

    prompts: list[str] = setting([], "prompts with the trigger (default: the run's sample prompts, set A)")
    control_prompts: list[str] = setting(
        [], "prompts without the trigger: the concept should not appear in them (default: the run's control "
            "prompts, set B)")
    negative: str = setting("", "negative prompt")
    seeds: list[int] = setting([1234], "seeds; every prompt is rendered with each", minimum=0, maximum=MAX_SEED)
    weights: list[float] = setting([1.0], "strengths of the LoRA (A1111's <lora:name:W>); 1 = as trained",
                                   minimum=-100.0, maximum=100.0)
    epochs: list[int] = setting([], "only these epochs (empty = every saved file)", minimum=0)
    steps: int = sampling_setting("steps")
    cfg_scale: float = sampling_setting("cfg_scale")
    sampler: str = sampling_setting("sampler")
    size: int = setting(0, "picture size in pixels; 0 = the run's sample size or training resolution", minimum=0,
                        maximum=MAX_PICTURE_SIDE, step=8)
    include_base: bool = setting(True, "add a row of the base model without the trained file (the reference)")
    score: str = setting("auto", "per-picture concept score: auto (the toy detector, on the toy model), none, "
                                 "subject or style", choices=list(SCORE_CHOICES))
    model: str = setting("", "base model; empty = the run's base model (standalone: the toy model)")


@dataclass
class Column:
    prompt: str
    control: bool
    weight: float
    seed: int

    def label(self, many_weights: bool, many_seeds: bool) -> str:
        text = self.prompt or "(empty prompt)"
        if self.control:
            text += "\n(no trigger)"
        extra = [f"weight {self.weight:g}"] if many_weights else []
        extra += [f"seed {self.seed}"] if many_seeds else []
        return text + ("\n" + " · ".join(extra) if extra else "")


@dataclass
class Row:
    label: str
    file: SavedFile | None          # None = the base model

    @property
    def epoch(self) -> int | None:
        return 0 if self.file is None else self.file.epoch

    @property
    def step(self) -> int | None:
        return 0 if self.file is None else self.file.step


@dataclass
class Comparison:
    """A rendered comparison: pictures and scores per (row, column)."""

    run: RunInfo
    settings: CompareSettings
    rows: list[Row]
    cols: list[Column]
    images: list[list[Any]]                        # [row][col] PIL pictures (None where stopped or skipped)
    scores: list[list[float | None]] | None = None
    concept: str = ""
    seconds: float = 0.0
    stopped: bool = False
    advice: list[Any] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)   # what the comparison warned of (e.g. a save left out)

    @property
    def has_base(self) -> bool:
        return bool(self.rows) and self.rows[0].file is None

    def col_labels(self) -> list[str]:
        many_w, many_s = len(set(c.weight for c in self.cols)) > 1, len(set(c.seed for c in self.cols)) > 1
        return [c.label(many_w, many_s) for c in self.cols]

    def row_labels(self) -> list[str]:
        return [r.label for r in self.rows]

    def mean_score(self, row: int, control: bool, weight: float | None = None) -> float | None:
        """Mean concept score of a row over its trigger (control=False) or control columns."""
        if self.scores is None:
            return None
        vals = [self.scores[row][c] for c, col in enumerate(self.cols)
                if col.control == control and (weight is None or col.weight == weight)
                and _finite(self.scores[row][c])]
        return sum(vals) / len(vals) if vals else None

    def summary(self) -> list[dict[str, Any]]:
        """One line per row: epoch, step, mean score with and without the trigger."""
        out = []
        for i, r in enumerate(self.rows):
            out.append({"row": r.label, "epoch": r.epoch, "step": r.step,
                        "file": str(r.file.path) if r.file else None,
                        "score_trigger": _round(self.mean_score(i, False)),
                        "score_control": _round(self.mean_score(i, True))})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run.to_dict(), "settings": {"version": self.settings.VERSION, **self.settings.to_dict()},
                "rows": self.row_labels(), "columns": self.col_labels(), "concept": self.concept,
                "scores": [[_round(s) for s in r] for r in self.scores] if self.scores else None,
                "summary": self.summary(), "seconds": round(self.seconds, 2), "stopped": self.stopped,
                "warnings": list(self.warnings), "advice": [a.to_dict() for a in self.advice]}

    def draw(self):
        """The labelled grid picture and its layout."""
        from .grid import draw_grid

        notes = None
        if self.scores is not None:
            notes = [[f"{self.concept} {s:.2f}" if s is not None else "" for s in r] for r in self.scores]
        title = (f"{self.run.name} ({self.run.method}) · {self.settings.sampler} {self.settings.steps} steps · "
                 f"CFG {self.settings.cfg_scale:g}" + (f" · score: toy {self.concept}" if self.concept else ""))
        return draw_grid(self.images, self.row_labels(), self.col_labels(), notes=notes, title=title)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _round(x: float | None) -> float | None:
    return round(float(x), 4) if _finite(x) else None    # no NaN in the JSON (strict parsers refuse it)


def resolve_settings(run: RunInfo, settings: CompareSettings) -> CompareSettings:
    """Fill the run's defaults (prompts, size) into empty settings; check what is left."""
    cfg = run.config
    changes: dict[str, Any] = {}
    if not settings.prompts and not settings.control_prompts and cfg is not None:
        changes["prompts"] = list(getattr(cfg, "sample_prompts", []) or [])
        changes["control_prompts"] = list(getattr(cfg, "control_prompts", []) or [])
    if not settings.size:
        size = (getattr(cfg, "sample_size", 0) or getattr(cfg, "resolution", 0)) if cfg is not None else 0
        changes["size"] = int(size or 512)
    out = settings.replace(**changes) if changes else settings
    if out.size % 8:
        raise UserError(f"picture size {out.size} must be a multiple of 8")
    if not out.prompts and not out.control_prompts:
        raise UserError("no prompts to compare: give prompts (the run has no sample prompts either)")
    _refuse_own_tags(run, list(out.prompts) + list(out.control_prompts))
    if not out.seeds:
        raise UserError("give at least one seed")
    if not out.weights:
        raise UserError("give at least one weight")
    if any(w != 1.0 for w in out.weights):   # refused now, not when the first save's row comes up
        spec = method_spec(run.method)
        if spec.applied_as == "checkpoint" or not getattr(spec.method_class(), "has_strength", False):
            raise UserError(f"{run.method} files have no strength setting: compare them at weight 1 (weights given: "
                            f"{', '.join(f'{w:g}' for w in out.weights)})")
    # the same seed or weight twice would draw the same column twice
    seeds, weights = list(dict.fromkeys(out.seeds)), list(dict.fromkeys(out.weights))
    if (seeds, weights) != (out.seeds, out.weights):
        out = out.replace(seeds=seeds, weights=weights)
    return out


def embedding_word(run: RunInfo) -> str:
    """The word an embedding run's saves answer to (its token, else its output name); "" for other methods."""
    if run.method != "embedding":
        return ""
    section = getattr(run.config, "embedding", None)
    return (getattr(section, "token", "") or getattr(run.config, "name", "") or run.name).strip()


def _refuse_own_tags(run: RunInfo, prompts: list[str]) -> None:
    """A prompt that names one of the run's own files by an extra-network tag (`<lora:NAME-000002:0.8>`): the
    comparison puts each save on the model itself, so inside A1111 the tag would add the file to every row, the
    base row too (which then is not the base model), and elsewhere it was dropped in silence."""
    from ..models.prompt import strip_extra_networks

    own = {run.name.lower()} | {f.path.stem.lower() for f in run.files}
    for prompt in prompts:
        for kind, args in strip_extra_networks(prompt)[1]:
            if kind.lower() in ("lora", "lyco", "hypernet") and args and args[0].strip().lower() in own:
                raise UserError(f"the prompt {prompt[:80]!r} names this run's own file (<{kind}:{args[0]}>): the "
                                "comparison puts each save on the model by itself, and with the tag the base row "
                                "would not show the base model; remove the tag")


# The largest grid drawn: A1111's default limit on grids ("Maximum image size, in megapixels"). Inside the WebUI
# the host reports the user's own setting instead (`max_grid_megapixels`).
MAX_GRID_MEGAPIXELS = 200.0


def _unreadable(files: list[SavedFile]) -> list[str]:
    """'name: why' for each .safetensors save whose header does not add up (cut short, damaged, not safetensors);
    the header check reads only the header, so it costs nothing on a large checkpoint."""
    from ..formats.safetensors_io import read_header

    out = []
    for f in files:
        if f.path.suffix.lower() != ".safetensors":
            continue
        try:
            read_header(f.path)
        except UserError as e:
            out.append(str(e))
    return out


def plan(run: RunInfo, settings: CompareSettings, *, max_megapixels: float = MAX_GRID_MEGAPIXELS
         ) -> tuple[list[Row], list[Column]]:
    """Rows (base model, then the chosen saved files) and columns of a comparison."""
    files = run.files
    if settings.epochs:
        wanted = set(settings.epochs)
        files = [f for f in files if f.epoch in wanted]
        have = sorted({f.epoch for f in run.files if f.epoch is not None})
        if not files:
            raise UserError(f"run '{run.name}' saved no file for epochs {sorted(wanted)} (saved epochs: {have})")
        missing = sorted(wanted - set(have))
        if missing:     # left out silently, the grid lacked a row asked for
            raise UserError(f"run '{run.name}' saved no file for epoch{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(map(str, missing))} (saved epochs: {have}): leave "
                            f"{'them' if len(missing) > 1 else 'it'} out of the epochs to compare")
    if not files:
        raise UserError(f"run '{run.name}' has no saved files to compare")
    damaged = _unreadable(files)
    if damaged:     # found now, not when its row is reached after minutes of rendering the rows before it
        raise UserError(f"run '{run.name}': {len(damaged)} saved file(s) cannot be read: " + "; ".join(damaged[:3])
                        + ". Move them aside, or leave them out with --epochs (the epochs to compare)")
    rows = ([Row(f"base model (no {run.method})", None)] if settings.include_base else [])
    rows += [Row(f.label, f) for f in files]
    prompts = [(p, False) for p in settings.prompts] + [(p, True) for p in settings.control_prompts]
    cols = [Column(p, control, w, s) for p, control in prompts for w in settings.weights for s in settings.seeds]
    megapixels = len(rows) * len(cols) * settings.size ** 2 / 1e6
    if megapixels > max_megapixels:     # every picture is held until the grid is drawn
        raise UserError(f"the grid would be {len(rows)} rows × {len(cols)} pictures of {settings.size} px, "
                        f"{megapixels:,.0f} megapixels (at most {max_megapixels:g}): choose fewer epochs, "
                        "prompts, seeds or weights, or a smaller size")
    return rows, cols


def trained_on_zero_terminal_snr(run: RunInfo) -> bool:
    """Whether the run trained on the zero-terminal-SNR schedule: its config says, or (files of another trainer,
    e.g. kohya's, without our config) the files' `ss_zero_terminal_snr`."""
    if run.config is not None:
        return bool(getattr(run.config, "zero_terminal_snr", False))
    return any(f.metadata.get("ss_zero_terminal_snr") == "True" for f in run.files)


def render_comparison(run: RunInfo, settings: CompareSettings, host: Any, *, events: Events | None = None,
                      stop: StopToken | None = None, scorer: Scorer | None | str = "auto") -> Comparison:
    """Render every cell of the comparison of `run` with `host` (see the module docstring).

    Args:
        scorer: a cell scorer, None for none, or "auto" to choose from `settings.score`.
    """
    from ..train.preflight import contains_word
    from .apply import NonFiniteSave, make_applier

    events, stop = events or Events(), stop or StopToken()
    settings = resolve_settings(run, settings)
    rows, cols = plan(run, settings, max_megapixels=getattr(host, "max_grid_megapixels", MAX_GRID_MEGAPIXELS))
    t0 = time.time()
    total, done = len(rows) * len(cols), 0
    events.progress(0, total, phase="compare")        # the size of the job, before the model loads
    warnings: list[str] = []
    unusable: list[str] = []    # saves that could not be put on the model (why)

    def warn(text: str) -> None:   # an event for whoever listens, and kept with the comparison (tab, API, JSON)
        warnings.append(text)
        events.warning(text)

    word = embedding_word(run)
    if word and settings.prompts and not any(contains_word(p, word) for p in settings.prompts):
        warn(f"no prompt says the embedding's word {word!r}: an embedding changes only the prompts that use it, so "
             f"every row will look like the base model's; put {word} in the prompts")
    model = settings.model or run.base_model or None
    events.status(f"loading the base model{f' {model}' if model else ''}")
    parts = host.load(model)
    concept, applier = "", None
    images: list[list[Any]] = [[None] * len(cols) for _ in rows]
    zero_snr = trained_on_zero_terminal_snr(run)   # drawn on the schedule the run trained on
    if zero_snr and getattr(parts, "prediction", "eps") != "v":
        # a noise-predicting model cannot draw from the schedule's last step (its input is the noise itself,
        # and the picture it implies divides by zero): training refuses the pairing, a file of another trainer
        # may still say it
        warn("the files say zero_terminal_snr, but the base model predicts the noise "
             f"({getattr(parts, 'prediction', 'eps')}), which cannot draw on that schedule: the pictures "
             "are drawn on the model's own schedule")
        zero_snr = False
    if zero_snr:
        events.status("the run trained with zero_terminal_snr: every picture is drawn on that schedule")

    def request(col: Column) -> SampleRequest:
        return SampleRequest(col.prompt, settings.negative, col.seed, settings.steps, settings.cfg_scale,
                             settings.size, settings.size, settings.sampler, zero_terminal_snr=zero_snr)

    try:   # from here on the model goes back to the host however this ends
        if scorer == "auto":
            concept, scorer = choose_scorer(settings.score, settings.prompts + settings.control_prompts,
                                            getattr(parts.info, "name", "") or Path(str(model or "")).stem)
        elif scorer is not None:
            concept = settings.score if settings.score not in ("auto", "none") else "concept"
        applier = make_applier(run, host, parts)
        for r, row in enumerate(rows):
            for weight in dict.fromkeys(c.weight for c in cols):
                if stop.requested:
                    break
                idx = [c for c, col in enumerate(cols) if col.weight == weight]
                if row.file is None:
                    if weight != cols[0].weight:   # the base model has no strength: reuse the first pictures
                        first = [c for c, col in enumerate(cols) if col.weight == cols[0].weight]
                        for c, src in zip(idx, first):
                            images[r][c] = images[r][src]
                        done += len(idx)
                        continue
                    events.status(row.label)
                    use = parts
                else:
                    events.status(f"{row.label}: weight {weight:g}")
                    try:
                        use = applier.apply(row.file, weight)
                    except UserError as e:   # its cells stay blank; the other saves are still drawn
                        if isinstance(e, NonFiniteSave):
                            warn(f"{e}; its row of the grid is blank")
                        else:   # another method's or model's file, cut short, gone since the run was read
                            unusable.append(str(e))
                            warn(f"{row.label} cannot be put on the model: {e}. Its row of the grid is blank; "
                                 "move the file aside, or leave its epoch out with --epochs (the epochs to compare)")
                        done += sum(1 for im in images[r] if im is None)
                        events.progress(done, total, phase="compare", row=row.label)
                        break
                pics = host.sample(use, [request(cols[c]) for c in idx], stop=stop)
                for c, im in zip(idx, pics):
                    images[r][c] = im
                done += len(idx)
                events.progress(done, total, phase="compare", row=row.label)
    finally:
        try:
            if applier is not None:
                applier.close()
        finally:
            host.release(parts)
    drawn = [r for r, row in enumerate(rows) if row.file is not None and any(im is not None for im in images[r])]
    if unusable and not drawn and not stop.requested:   # nothing of the run to show: no grid of the base alone
        raise UserError(f"none of the saves of run '{run.name}' could be put on the model ({len(unusable)} tried; "
                        f"the first: {unusable[0]}). Are they files of this run (its method and base model)?")
    scores = None
    if scorer is not None:
        flat = [(r, c) for r in range(len(rows)) for c in range(len(cols)) if images[r][c] is not None]
        values = scorer([images[r][c] for r, c in flat]) if flat else []
        scores = [[None] * len(cols) for _ in rows]
        unscored = 0
        for (r, c), v in zip(flat, values):
            scores[r][c] = float(v) if _finite(float(v)) else None
            unscored += scores[r][c] is None
        if unscored:   # a scorer that cannot read a picture: the cell stays unscored, as a picture left out
            warn(f"{unscored} of {len(values)} pictures could not be scored (the score was not a number); their "
                 "cells have no score")
    return Comparison(run, settings, rows, cols, images, scores, concept, time.time() - t0, stop.requested,
                      warnings=warnings)


def _written_by_compare(path: Path) -> bool:
    """Whether `path` is the JSON a comparison saved (settings, rows and layout), which `overwrite` may replace."""
    try:
        if path.stat().st_size > 64 * 2**20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and {"settings", "rows", "layout"} <= set(data)


def check_comparison_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse, before anything is rendered, an output the grid cannot go to: not .png, a folder, a file there
    (without `overwrite`), a JSON beside it that no comparison wrote (never replaced: it is the user's), or a
    folder that cannot be made or written.
    Returns the JSON's path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"the comparison grid is saved as .png, not {path.name} (give a name ending in .png)")
    json_path = path.with_suffix(".json")
    for p in (path, json_path):
        if p.is_dir():
            raise UserError(f"{p} is a folder; give the grid a file name ending in .png")
        if p.exists() and not overwrite:
            raise UserError(f"{p} exists; choose another name or allow overwriting")
    if json_path.exists() and not _written_by_compare(json_path):
        raise UserError(f"{json_path} is not a comparison's JSON, and the grid's JSON would replace it "
                        f"(it goes beside the grid, as <name>.json): choose another name for the grid")
    from ..train.preflight import check_writable

    check_writable(path.parent, "folder of the comparison grid")   # a folder under a file, or read-only
    return json_path


def save_comparison(comp: Comparison, path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write the grid PNG (settings, labels, scores and advice in its `lab.compare` text chunk) and the same
    as JSON beside it (`<name>.json`). Never replaces a file unless `overwrite`, nor ever a JSON that is not a
    comparison's."""
    from PIL.PngImagePlugin import PngInfo

    from ..formats.files import atomic_write, atomic_write_text

    path = Path(path)
    json_path = check_comparison_output(path, overwrite=overwrite)
    grid, layout = comp.draw()
    data = comp.to_dict()
    data["layout"] = layout.to_dict()
    text = json.dumps(data, ensure_ascii=False, indent=1)
    info = PngInfo()
    info.add_text("lab.compare", text)
    info.add_text("parameters", f"Training Lab comparison of {comp.run.name}: " + ", ".join(comp.row_labels()))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG", pnginfo=info), overwrite=overwrite)
    atomic_write_text(json_path, text + "\n", overwrite=overwrite)
    return path, json_path


def default_output(run: RunInfo, host: Any) -> Path:
    """A free file name in the host's comparison folder: `<name>-compare-YYYYmmdd-HHMMSS.png`."""
    from ..formats.files import unused_path

    try:
        folder = Path(host.output_dir("compare"))
    except (ValueError, KeyError):
        folder = (run.run_dir or Path(".")) / "compare"
    return unused_path(folder / f"{run.name}-compare-{time.strftime('%Y%m%d-%H%M%S')}.png")
