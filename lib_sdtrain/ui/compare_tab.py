"""The Compare tab: a run's saved epochs side by side on the same prompts and seeds, with scores and advice.

The handlers are plain functions of plain values, testable without gradio; `build(ctx)` only wires widgets.
Every comparison is saved at once (grid PNG + JSON with its settings, scores and advice) in the host's
`compare` folder. While one runs, the tab's status line follows its events (`CompareProgress`): waiting for
the host (A1111's queue), "comparing, picture k/n", then done or stopped.

Opening from another tab (the Monitor's "Compare epochs" button): `build` sets
    ctx.open_compare(run_dir) -> list of gr.update values, for the components in
    ctx.components["compare.open_outputs"]  (the page's Tabs, then this tab's form fields)
and `ctx.extras["compare.wire_open"](button, run_dir_component)` wires a button to it in one call. Both
exist only after this tab is built, so a tab built earlier wires from a `ctx.after_build` hook.
"""

from __future__ import annotations

import html
import json
import threading
from pathlib import Path
from typing import Any

from ..errors import UserError

TAB_ID = "compare"          # ui/tabs.py TABS id of this tab
_STOP: dict[str, Any] = {}  # the running comparison's StopToken, for the Stop button
_LOCK = threading.Lock()


# ---- plain handlers ---------------------------------------------------------------------------------
def parse_lines(text: str | None) -> list[str]:
    """One prompt per line (prompts contain commas, so lines are the separator)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def parse_numbers(text: str | None, kind: type = float) -> list:
    """"1, 2 3" → [1, 2, 3]; a clear error for anything else."""
    out = []
    for token in (text or "").replace(",", " ").split():
        try:
            out.append(kind(token))
        except ValueError:
            raise UserError(f"{token!r} is not a {'whole ' if kind is int else ''}number") from None
    return out


def runs_root(ctx: Any) -> Path:
    return Path(ctx.host().output_dir("runs"))


def run_choices(ctx: Any) -> list[str]:
    """Run folders of this host that have saved files to compare, newest first."""
    from ..evaluate.runs import discover_run, list_runs

    try:
        runs = list_runs(runs_root(ctx))
    except (OSError, ValueError):
        return []
    out = []
    for path in runs:
        try:
            if discover_run(path, ctx.host()).files:
                out.append(str(path))
        except (UserError, OSError, ValueError):
            continue            # a broken or half-written run folder is not offered
    return out


def run_options(ctx: Any, also: str | None = None) -> list[tuple[str, str]]:
    """(label, run folder) for the run picker: `run_choices` (plus `also`, a run handed over from another tab) with
    control characters escaped in the labels (a newline in a name showed raw), the exact paths as values."""
    from ..data.scan import shown_choices

    runs = run_choices(ctx)
    if also and also not in runs:
        runs.append(also)
    return shown_choices(runs)


def describe_run(ctx: Any, run_dir: str) -> str:
    """Markdown: the run's method and its saved files with epoch and step."""
    from ..evaluate.runs import discover_run

    if not run_dir:
        return "*Choose a run.*"
    try:
        run = discover_run(run_dir, ctx.host())
    except UserError as e:
        return f"**{e}**"
    from ..data.scan import shown

    lines = [f"**{shown(run.name)}** ({run.method}), {len(run.files)} saved file(s) in `{shown(run.files_dir)}`:"]
    lines += [f"- `{shown(f.path.name)}`: {f.label}" for f in run.files]
    return "\n".join(lines)


def form_defaults(ctx: Any, run_dir: str) -> dict[str, Any]:
    """Form values for a run: its control prompts (set A / set B) and picture size, for pre-filling."""
    from ..evaluate.runs import discover_run

    out: dict[str, Any] = {"run_dir": run_dir, "info": describe_run(ctx, run_dir)}
    try:
        cfg = discover_run(run_dir, ctx.host()).config
    except UserError:
        return out
    if cfg is not None:
        out["prompts"] = "\n".join(cfg.sample_prompts)
        out["control_prompts"] = "\n".join(cfg.control_prompts)
        out["size"] = int(cfg.sample_size or cfg.resolution)
        out["seeds"] = str(cfg.sample_seed)
    return out


def sampler_choices(ctx: Any) -> list[str]:
    """The sampler drop-down's names: our samplers as the host's own UI names them where the host says
    (`sampler_label`; A1111: "Euler", "DDIM", which the sampler setting takes and stores as ours), else ours
    (standalone)."""
    from ..sample_settings import SAMPLERS

    try:
        label = getattr(ctx.host(), "sampler_label", None)
    except Exception:  # noqa: BLE001 - no host yet: our names still work
        label = None
    return [str(label(s)) if callable(label) else s for s in SAMPLERS]


def settings_from_form(prompts: str, control_prompts: str, negative: str, seeds: str, weights: str, epochs: str,
                       steps: float, cfg_scale: float, sampler: str, size: float, include_base: bool, score: str,
                       model: str = ""):
    from ..evaluate.compare import CompareSettings

    return CompareSettings.from_dict({
        "prompts": parse_lines(prompts), "control_prompts": parse_lines(control_prompts),
        "negative": negative or "", "seeds": parse_numbers(seeds, int) or [1234],
        "weights": parse_numbers(weights, float) or [1.0], "epochs": parse_numbers(epochs, int),
        "steps": int(steps), "cfg_scale": float(cfg_scale), "sampler": sampler, "size": int(size or 0),
        "include_base": bool(include_base), "score": score, "model": model or "",
    })


def advice_markdown(comp: Any) -> str:
    if not comp.advice:
        return "*No advice: nothing stood out in the measurements.*"
    titles = {"bleeding": "Concept bleeding", "overtraining": "Over-training", "feature": "Recurring feature",
              "choice": "Which epoch"}
    return "\n\n".join(f"**{titles.get(a.kind, a.kind)}.** {a.message}" for a in comp.advice)


def summary_rows(comp: Any) -> list[list[Any]]:
    """Table rows: row label, epoch, step, mean score with / without the trigger."""
    def fmt(x: Any) -> str:
        return "" if x is None else f"{x:.3f}"
    return [[s["row"], "" if s["epoch"] is None else s["epoch"], "" if s["step"] is None else s["step"],
             fmt(s["score_trigger"]), fmt(s["score_control"])] for s in comp.summary()]


def run_compare(ctx: Any, run_dir: str, settings: Any, *, advice: bool = True, progress: Any = None,
                out: str | Path | None = None, listener: Any = None) -> dict[str, Any]:
    """Render, score, advise and save one comparison. Returns {"image", "rows", "advice", "path", "json",
    "comparison", "stopped"}; raises UserError for bad input. `listener` (e.g. a `CompareProgress`) gets the
    job's events.

    The rendering runs as one of the host's jobs (`host.job_context`, kind "compare"): inside A1111 under its
    queue lock, shown by its progress display and stopped by its Interrupt button as by this tab's Stop (the
    pictures drawn so far make a partial grid, saved with "stopped": true). Stopped while it still waited for
    the host (A1111's queue), nothing is drawn or saved: "image" and "comparison" are None, "stopped" True."""
    from ..evaluate.advice import advise, dataset_inputs
    from ..evaluate.compare import (
        check_comparison_output,
        default_output,
        render_comparison,
        save_comparison,
    )
    from ..evaluate.runs import discover_run
    from ..events import Events, StoppedBeforeStart, StopToken
    from ..hosts import host_job

    if not run_dir:
        raise UserError("choose a run to compare")
    if out:   # a grid that cannot be saved there (its folder included) is refused now, not after minutes of drawing
        check_comparison_output(out)
    host = ctx.host()
    run = discover_run(run_dir, host)
    stop = StopToken()
    with _LOCK:
        if _STOP.get("token") is not None:
            raise UserError("a comparison is already running")
        _STOP["token"] = stop
    events = Events()
    if listener is not None:
        events.subscribe(listener)
    if progress is not None:
        events.subscribe(lambda e: progress(e.data["step"], e.data["total"]) if e.kind == "progress" else None)
    try:
        with host_job(host, "compare", events, stop):
            comp = render_comparison(run, settings, host, events=events, stop=stop)
    except StoppedBeforeStart:
        return {"image": None, "rows": [], "advice": "", "path": "", "json": "", "comparison": None,
                "stopped": True}
    finally:
        with _LOCK:
            _STOP.pop("token", None)
    if advice:
        comp.advice = advise(comp, loss=run.loss, **dataset_inputs(run))
    path, json_path = save_comparison(comp, out or default_output(run, host))
    grid, _ = comp.draw()
    return {"image": grid, "rows": summary_rows(comp), "advice": advice_markdown(comp), "path": str(path),
            "json": str(json_path), "comparison": comp, "stopped": bool(comp.stopped)}


class CompareProgress:
    """The tab's status line for one comparison, following the job's events (an `Events` listener): waiting
    for the host (A1111's queue), "comparing, picture k/n" with what is being drawn, then done or stopped
    (`finish`). Thread-safe: the job emits on its thread, the page reads `text()` on another."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.status, self.done, self.total, self.started = "starting", 0, 0, False
        self.ended = ""                      # the last line, once the comparison has ended
        self.warnings: list[str] = []        # the comparison's warnings (e.g. a save left out), under the line

    def __call__(self, event: Any) -> None:
        d = event.data
        with self._lock:
            if event.kind == "progress" and d.get("phase") == "compare":
                self.done, self.total, self.started = int(d.get("step", 0) or 0), int(d.get("total", 0) or 0), True
            elif event.kind == "status":
                self.status = str(d.get("text", ""))
            elif event.kind == "warning":
                self.warnings.append(str(d.get("text", "")))

    def finish(self, result: dict[str, Any] | None = None) -> None:
        """The comparison ended with `result` (run_compare's; None or no comparison: stopped before it began)."""
        with self._lock:
            if result is None or result.get("comparison") is None:
                self.ended = "stopped while waiting for its turn: nothing drawn, no grid"
            else:
                drawn = sum(im is not None for row in result["comparison"].images for im in row)
                total = self.total or drawn
                self.ended = (f"stopped: {drawn} of {total} pictures drawn, the partial grid is saved"
                              if result.get("stopped") else f"done: {drawn} of {total} pictures, grid saved")

    def text(self) -> str:
        with self._lock:
            if self.ended:
                line = self.ended
            elif not self.started:            # waiting for the host, or not yet planned
                line = self.status
            else:
                line = f"comparing, picture {self.done}/{self.total}"
                line = f"{line} - {self.status}" if self.status else line
            # the warnings stay under the line to the end: a save left out is named, not only a blank row
            return "\n\n".join([line, *(f"⚠ {html.escape(w)}" for w in self.warnings)])


def compare_updates(ctx: Any, run_dir: str, settings: Any, *, every: float = 0.5, **kwargs: Any):
    """Run one comparison (`run_compare`, given `kwargs`) on a worker thread and yield (None, status line)
    every `every` seconds while it runs, then (run_compare's result, the last line) at the end; an error of
    the comparison is raised here. The tab's Compare button streams this (a gradio generator: 3.x and 4.x
    alike, as the Dataset tab's class pictures)."""
    watch = CompareProgress()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = run_compare(ctx, run_dir, settings, listener=watch, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the page's thread below
            box["error"] = e

    worker = threading.Thread(target=work, name="training-lab-compare", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(every)
        if worker.is_alive():
            yield None, watch.text()
    error = box.get("error")
    if error is not None:
        raise error
    watch.finish(box["result"])
    yield box["result"], watch.text()


def stop_compare() -> str:
    token = _STOP.get("token")
    if token is None:
        return "nothing is running"
    token.request("stopped by the user")
    return "stopping after the current pictures"


def load_saved(path: str) -> dict[str, Any]:
    """The settings a saved grid was made with (from its JSON, or the PNG's `lab.compare` text)."""
    p = Path(path)
    if p.suffix.lower() == ".png":
        from PIL import Image

        with Image.open(p) as im:
            text = im.info.get("lab.compare")
        if not text:
            raise UserError(f"{p.name} is not a Training Lab comparison grid")
    else:
        text = p.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise UserError(f"{p.name}: its comparison data is not valid JSON") from None


# ---- widgets ----------------------------------------------------------------------------------------
FORM_FIELDS = ("run_dir", "prompts", "control_prompts", "seeds", "size")


def build(ctx: Any) -> None:
    """The tab's widgets (inside the gr.Tab that ui/tabs.py opened)."""
    import gradio as gr

    from . import compat
    from ..evaluate.compare import CompareSettings
    from ..evaluate.score import SCORE_CHOICES
    from ..sample_settings import SAMPLERS
    from .widgets import make_widget

    declared = {s.name: s for s in CompareSettings.settings()}   # ranges and choices as CompareSettings has them

    with gr.Row():
        with gr.Column(scale=2):
            first = run_options(ctx)
            run_dir = gr.Dropdown(label="Run folder", choices=compat.labelled(first), value=None,
                                  allow_custom_value=True, elem_id="training_lab_compare_run")
            runs_state = gr.State(first)      # the picker's (label, exact run folder) pairs
            refresh = gr.Button("Refresh runs", elem_id="training_lab_compare_refresh")
            info = gr.Markdown("*Choose a run.*")
            prompts = gr.Textbox(label="Prompts with the trigger (one per line)", lines=3)
            control_prompts = gr.Textbox(label="Prompts without the trigger (bleeding check; one per line)", lines=2)
            negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row():
                seeds = gr.Textbox(label="Seeds", value="1234")
                weights = gr.Textbox(label="LoRA weights", value="1")
                epochs = gr.Textbox(label="Epochs (empty = all)", value="")
            with gr.Row():
                steps = make_widget(declared["steps"], "compare.steps")
                cfg_scale = make_widget(declared["cfg_scale"], "compare.cfg_scale")
            with gr.Row():
                names = sampler_choices(ctx)   # as the host shows them: the same samplers, its own names
                sampler = make_widget(declared["sampler"], "compare.sampler", choices=names,
                                      value=names[SAMPLERS.index(declared["sampler"].default)])
                size = gr.Number(label="Size (0 = the run's)", value=0, precision=0)
                score = gr.Dropdown(label="Concept score", choices=list(SCORE_CHOICES), value="auto")
            include_base = gr.Checkbox(label="Base model row", value=True)
            with gr.Row():
                go = gr.Button("Compare epochs", variant="primary")
                stop = gr.Button("Stop")
            status = gr.Markdown("", elem_id="training_lab_compare_status")
        with gr.Column(scale=3):
            grid = gr.Image(label="Comparison", type="pil", interactive=False)
            table = compat.dataframe(["row", "epoch", "step", "score (trigger)", "score (no trigger)"])
            advice = gr.Markdown()
            saved = compat.not_saved(gr.Textbox(label="Saved", interactive=False))

    def on_refresh():
        options = run_options(ctx)
        return compat.update(choices=compat.labelled(options)), options

    def on_run(choice, options):
        path = compat.chosen(options or [], choice)
        values = form_defaults(ctx, path or "")
        return (values["info"], values.get("prompts", compat.update()), values.get("control_prompts", compat.update()),
                values.get("seeds", compat.update()), values.get("size", compat.update()))

    def on_go(choice, options, p, c, n, s, w, e, st, cs, sa, sz, base, sc):
        # a generator: the status line follows the job (waiting, picture k/n) until the grid comes
        path = compat.chosen(options or [], choice)
        try:
            settings = settings_from_form(p, c, n, s, w, e, st, cs, sa, sz, base, sc)   # model: the run's
        except UserError as err:
            yield None, [], f"**{err}**", "", f"**{err}**"
            return
        keep = [compat.update() for _ in range(4)]
        try:
            for res, line in compare_updates(ctx, path, settings):
                if res is None:
                    yield (*keep, line)
                else:                                       # no path: stopped before it began, no grid
                    saved_text = f"{res['path']}\n{res['json']}" if res["path"] else ""
                    yield res["image"], res["rows"], res["advice"], saved_text, line
        except UserError as err:
            yield None, [], f"**{err}**", "", f"**{err}**"

    refresh.click(on_refresh, inputs=[], outputs=[run_dir, runs_state])
    own_tab = ctx.components.get(f"tab.{TAB_ID}")
    if own_tab is not None and hasattr(own_tab, "select"):   # new runs appear when the tab is opened
        own_tab.select(on_refresh, inputs=[], outputs=[run_dir, runs_state])
    run_dir.change(on_run, inputs=[run_dir, runs_state], outputs=[info, prompts, control_prompts, seeds, size])
    go.click(on_go, inputs=[run_dir, runs_state, prompts, control_prompts, negative, seeds, weights, epochs, steps,
                            cfg_scale, sampler, size, include_base, score], outputs=[grid, table, advice, saved, status])
    stop.click(lambda: stop_compare(), inputs=[], outputs=[status])

    # ---- opening from another tab --------------------------------------------------------------------
    tabs = ctx.components.get("tabs")
    open_outputs = ([tabs] if tabs is not None else []) + [run_dir, info, prompts, control_prompts, seeds, size,
                                                            runs_state]

    def open_compare(path: str) -> list[Any]:
        values = form_defaults(ctx, str(path or ""))
        options = run_options(ctx, also=values["run_dir"])
        index = [value for _, value in options].index(values["run_dir"]) if values["run_dir"] else None
        ups = [compat.update(selected=TAB_ID)] if tabs is not None else []
        ups.append(compat.update(value=compat.choice_at(options, index) if index is not None else None,
                                 choices=compat.labelled(options)))
        ups.append(values["info"])
        ups += [values.get(k, compat.update()) for k in ("prompts", "control_prompts", "seeds", "size")]
        ups.append(options)
        return ups

    def wire_open(button: Any, run_component: Any) -> Any:
        return button.click(open_compare, inputs=[run_component], outputs=open_outputs)

    ctx.open_compare = open_compare
    ctx.components["compare.open_outputs"] = open_outputs
    ctx.components["compare.run_dir"] = run_dir
    ctx.components["compare.status"] = status
    ctx.extras["compare.wire_open"] = wire_open
