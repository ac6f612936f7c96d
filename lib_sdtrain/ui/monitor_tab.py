"""The Monitor tab: a running (or finished) job, refreshed about once a second.

Shows the progress bar with steps/s and ETA, the loss chart (raw loss and its moving average, saves and
control rounds marked), control pictures A (prompts with the concept: should change) and B (class prompts
without the trigger: should stay) side by side for a chosen round, warnings, saved files, the run folder and
its TensorBoard folder, and a "Compare epochs" button.

Polling goes through `compat.poll` (gr.Timer from gradio 4; in A1111's 3.41.2 a hidden button, POLL_ID, that a
script started by the page's load clicks once a second). Each tick calls
`MonitorTab.poll`, which returns "no change" for the parts whose data did not change, so the galleries and
the chart are not re-sent every second. The chart is a small inline SVG (same in every gradio version, no
plotting library).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import UserError
from ..jobs import ACTIVE
from . import compat
from .context import UiContext

PREFIX = "training_lab_monitor"
POLL_ID = f"{PREFIX}_tick"      # gradio 3: the hidden button the page clicks once a second (compat.poll)
LATEST = "latest"


# ---- rendering (pure functions of status data) ----------------------------------------------------------
def _nice(value: float) -> str:
    return f"{value:.3g}"


def loss_chart_svg(losses: list[list[Any]], saved_steps: list[int] | None = None,
                   sample_steps: list[int] | None = None, width: int = 720, height: int = 240,
                   validation: list[list[Any]] | None = None) -> str:
    """An SVG line chart of (step, loss, ema) rows: raw loss thin, EMA thick; saves and control rounds as
    vertical marks; (step, loss) validation measurements as blue points joined by a line. Returns "" for no
    data."""
    pts = [(int(r[0]), float(r[1]), None if r[2] is None else float(r[2])) for r in losses
           if r and r[1] is not None and math.isfinite(float(r[1]))]
    if not pts:
        return ""
    held = [(int(r[0]), float(r[1])) for r in validation or [] if r and math.isfinite(float(r[1]))]
    left, right, top, bottom = 56, 12, 12, 28
    w, h = width - left - right, height - top - bottom
    steps = [p[0] for p in pts]
    values = [p[1] for p in pts] + [p[2] for p in pts if p[2] is not None and math.isfinite(p[2])] + \
        [v for _, v in held]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5 * abs(y0 or 1), y1 + 0.5 * abs(y1 or 1)
    pad = 0.05 * (y1 - y0)
    # a loss of 0 or more never reads below zero: the padding stops at the floor ("-0.00682" under losses)
    y0, y1 = (max(y0 - pad, 0.0) if y0 >= 0 else y0 - pad), y1 + pad

    def sx(step: float) -> float:
        return left + (step - x0) / (x1 - x0) * w

    def sy(value: float) -> float:
        return top + (1 - (value - y0) / (y1 - y0)) * h

    def line(series: list[tuple[float, float]]) -> str:
        return " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in series)

    raw = [(p[0], p[1]) for p in pts]
    ema = [(p[0], p[2]) for p in pts if p[2] is not None and math.isfinite(p[2])]
    parts = [f'<svg class="training-lab-chart" viewBox="0 0 {width} {height}" width="100%" '
             f'preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg" role="img" '
             f'aria-label="loss by step">',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="tl-plot" fill="none" '
             f'stroke="currentColor" stroke-opacity="0.25"/>']
    for frac in (0.0, 0.5, 1.0):
        value = y0 + frac * (y1 - y0)
        y = sy(value)
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="currentColor" '
                     f'stroke-opacity="0.1"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
                     f'fill="currentColor">{_nice(value)}</text>')
    for step in sorted({x0, (x0 + x1) // 2, x1}):
        parts.append(f'<text x="{sx(step):.1f}" y="{height - 8}" text-anchor="middle" font-size="11" '
                     f'fill="currentColor">{step}</text>')
    for step in sample_steps or []:
        if x0 <= step <= x1:
            parts.append(f'<line class="tl-sample" x1="{sx(step):.1f}" x2="{sx(step):.1f}" y1="{top}" '
                         f'y2="{top + h}" stroke="#8a6bd1" stroke-opacity="0.35" stroke-dasharray="3,3"/>')
    for step in saved_steps or []:
        if x0 <= step <= x1:
            parts.append(f'<line class="tl-save" x1="{sx(step):.1f}" x2="{sx(step):.1f}" y1="{top}" '
                         f'y2="{top + h}" stroke="#2e9c5a" stroke-opacity="0.6"><title>saved at step {step}'
                         f'</title></line>')
    parts.append(f'<polyline class="tl-loss" points="{line(raw)}" fill="none" stroke="#f08a24" '
                 f'stroke-opacity="0.45" stroke-width="1"/>')
    if ema:
        parts.append(f'<polyline class="tl-ema" points="{line(ema)}" fill="none" stroke="#f08a24" '
                     f'stroke-width="2.2"/>')
    held = [(s, v) for s, v in held if x0 <= s <= x1]
    if held:
        parts.append(f'<polyline class="tl-validation" points="{line(held)}" fill="none" stroke="#2f7fd6" '
                     f'stroke-width="1.6"/>')
        parts += [f'<circle class="tl-validation-point" cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="#2f7fd6">'
                  f'<title>validation loss {_nice(v)} at step {s}</title></circle>' for s, v in held]
    last = pts[-1]
    parts.append(f'<text x="{left + 6}" y="{top + 14}" font-size="12" fill="currentColor">loss '
                 f'{_nice(last[1])}' + (f' · smoothed {_nice(last[2])}' if last[2] is not None else "") +
                 (f' · validation {_nice(held[-1][1])}' if held else "") + f' · step {last[0]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def progress_html(status: dict[str, Any]) -> str:
    frac = max(0.0, min(1.0, float(status.get("fraction") or 0.0)))
    state = status.get("state", "")
    if status.get("cache", {}).get("total") and not status.get("total"):
        c = status["cache"]
        frac = c["done"] / max(1, c["total"])
    return (f'<div class="training-lab-progress tl-{html.escape(state)}" data-fraction="{frac:.4f}">'
            f'<div class="training-lab-progress-bar" style="width:{100 * frac:.1f}%"></div>'
            f'<div class="training-lab-progress-text">{html.escape(status.get("progress_text", ""))}</div></div>')


def rounds_of(status: dict[str, Any]) -> list[int]:
    """Steps at which control pictures were rendered, newest first."""
    return sorted({s["step"] for s in status.get("samples", [])}, reverse=True)


def gallery_items(status: dict[str, Any], label: str, step: int | None) -> list[tuple[str, str]]:
    """(path, caption) for set `label` at round `step` (None = the latest round)."""
    rounds = rounds_of(status)
    if not rounds:
        return []
    step = rounds[0] if step is None else step
    prompts = status.get("prompts", {}).get(label, [])
    out = []
    for s in status.get("samples", []):
        if s["label"] == label and s["step"] == step:
            # the request index of each picture (a picture the host skipped leaves a gap in a round)
            for i, path in zip(s.get("indices") or range(len(s["paths"])), s["paths"]):
                if Path(path).is_file():
                    prompt = prompts[i] if i < len(prompts) else f"#{i}"
                    out.append((path, f"step {step}: {prompt}"))
    return out


def bleeding_text(status: dict[str, Any]) -> str:
    changes = [(s["step"], s["change"]) for s in status.get("samples", [])
               if s["label"] == "B" and s.get("change") is not None]
    prompts = status.get("prompts", {})
    if not changes and "prompts" in status and not (prompts.get("A") or prompts.get("B")):
        return ("*This run has no control prompts (Train → Control pictures and monitoring), so no pictures "
                "are rendered.*")
    if not changes:
        return ""
    step, change = changes[-1]
    return (f"Set B mean pixel change since the start: **{change:.3f}** at step {step} "
            "(0 = identical; a steady rise means the concept bleeds into the class)")


def saved_markdown(status: dict[str, Any], limit: int = 8) -> str:
    if not status.get("saved"):
        return "*No files saved yet.*"
    rows = ["| file | step | epoch |", "|---|---|---|"]
    saved = list(reversed(status["saved"]))          # newest first
    shown, rest = saved[:limit], len(saved) - limit
    for s in shown:
        name = f"`{html.escape(Path(s['path']).name)}`" + (" (final)" if s.get("final") else "")
        rows.append(f"| {name} | {s.get('step') or ''} | {s.get('epoch') or ''} |")
    if rest > 0:
        rows.append(f"| … and {rest} earlier | | |")
    return "\n".join(rows)


def warnings_markdown(status: dict[str, Any]) -> str:
    lines = [f"- ⚠ {html.escape(w)}" for w in status.get("warnings", [])]
    if status.get("error"):
        lines.insert(0, f"- **error:** {html.escape(status['error'])}")
    return "\n".join(lines)


class MonitorTab:
    """Handlers of the Monitor tab (plain values in, plain values or gradio updates out)."""

    OUTPUTS = ("jobs", "progress", "chart", "rounds", "gallery_a", "gallery_b", "bleeding", "warnings", "saved",
               "run_dir", "tensorboard", "log", "sig")

    def __init__(self, ctx: UiContext) -> None:
        self.ctx = ctx

    def job_choices(self) -> list[str]:
        return [j["id"] for j in reversed(self.ctx.jobs.list_jobs())]

    def resolve(self, job_id: str | None) -> str | None:
        if job_id:
            return job_id
        return self.ctx.jobs.latest_id()

    def status(self, job_id: str | None) -> dict[str, Any] | None:
        job_id = self.resolve(job_id)
        if not job_id:
            return None
        try:
            st = self.ctx.jobs.status(job_id, since=10 ** 12)   # no events: the snapshot has all we show
        except UserError:
            return None
        cfg = self.ctx.jobs.job(job_id).settings
        st["prompts"] = {"A": list(getattr(cfg, "sample_prompts", [])), "B": list(getattr(cfg, "control_prompts", []))}
        return st

    def snapshot(self, job_id: str | None, round_choice: str = LATEST) -> dict[str, Any]:
        """Everything the tab shows, as plain values."""
        st = self.status(job_id)
        if st is None:
            return {"job": "", "state": "", "progress": progress_html({"progress_text": "No training job yet."}),
                    "chart": "", "rounds": [LATEST], "gallery_a": [], "gallery_b": [], "bleeding": "",
                    "warnings": "", "saved": "", "run_dir": "", "tensorboard": "", "log": "", "losses": 0}
        rounds = rounds_of(st)
        step = None if round_choice in (None, "", LATEST) else int(str(round_choice).split()[-1])
        if step is not None and step not in rounds:
            step = None
        tb = st["tensorboard_dir"]
        return {
            "job": st["id"], "state": st["state"], "progress": progress_html(st),
            "chart": loss_chart_svg(st["losses"], [s["step"] for s in st["saved"] if s.get("step")], rounds,
                                    validation=st.get("validation")),
            "rounds": [LATEST] + [f"step {r}" for r in rounds],
            "round_step": rounds[0] if step is None and rounds else step,
            "gallery_a": gallery_items(st, "A", step), "gallery_b": gallery_items(st, "B", step),
            "bleeding": bleeding_text(st), "warnings": warnings_markdown(st), "saved": saved_markdown(st),
            "run_dir": st["run_dir"],
            "tensorboard": f"tensorboard --logdir \"{tb}\"" if tb and Path(tb).is_dir() else
            (tb + " (not written yet)" if tb else ""),
            "log": "\n".join(st["log"][-40:]), "losses": len(st["losses"]),
            "validation": len(st.get("validation") or []), "samples": len(st["samples"]), "saves": len(st["saved"]),
        }

    def poll(self, job_id: str | None, round_choice: str, sig: dict[str, Any] | None) -> list[Any]:
        """One refresh: values for OUTPUTS, with `compat.update()` (no change) where nothing moved."""
        sig = dict(sig or {})
        keep = compat.update()
        jobs = list(reversed(self.ctx.jobs.list_jobs()))
        choices = [j["id"] for j in jobs]
        followed = self._follow(job_id, jobs, sig)
        if followed:   # the shown job has ended and a new one was started (from any tab or the API): show that
            job_id, round_choice = followed, LATEST
        snap = self.snapshot(job_id, round_choice)
        new_sig = {"choices": choices, "queued": [j["id"] for j in jobs if j["state"] == "queued"],
                   "job": snap["job"], "losses": snap["losses"],
                   "validation": snap.get("validation", 0),
                   "samples": snap.get("samples", 0), "round": round_choice, "saves": snap.get("saves", 0),
                   "state": snap["state"], "warnings": snap["warnings"]}
        same_job = sig.get("job") == snap["job"]
        chart_same = same_job and sig.get("losses") == new_sig["losses"] and sig.get("saves") == new_sig["saves"] \
            and sig.get("validation") == new_sig["validation"] \
            and sig.get("samples") == new_sig["samples"]
        pictures_same = same_job and sig.get("samples") == new_sig["samples"] and sig.get("round") == round_choice
        if followed:
            jobs_update = compat.update(choices=choices, value=followed)
        elif sig.get("choices") == choices and same_job:
            jobs_update = keep
        elif job_id:
            # the dropdown already names a job: send the new list only. Writing `job_id` back would undo a
            # change made while this poll ran (a Start on the Train tab selects the new job; a poll that read
            # the old value then answered with it, and the Monitor stayed on the finished job).
            jobs_update = compat.update(choices=choices)
        else:
            jobs_update = compat.update(choices=choices, value=snap["job"] or None)
        return [
            jobs_update,
            snap["progress"],
            keep if chart_same else snap["chart"],
            keep if pictures_same else compat.update(choices=snap["rounds"]),
            keep if pictures_same else snap["gallery_a"],
            keep if pictures_same else snap["gallery_b"],
            snap["bleeding"],
            keep if same_job and sig.get("warnings") == snap["warnings"] and sig.get("state") == snap["state"]
            else snap["warnings"],
            keep if chart_same and sig.get("state") == snap["state"] else snap["saved"],
            snap["run_dir"],
            snap["tensorboard"],
            snap["log"],
            new_sig,
        ]

    @staticmethod
    def _follow(job_id: str | None, jobs: list[dict[str, Any]], sig: dict[str, Any]) -> str | None:
        """The job the Monitor should move to when the chosen job has ended: the newest job that appeared since
        the last poll and is queued or running, or one that was waiting in the queue then and runs now (it was
        started while the shown one ran); else None. A job the user picks while another runs stays shown (the
        running one was already listed and running), and so does a finished one when nothing new has started."""
        if not job_id or "choices" not in sig:
            return None
        shown = next((j for j in jobs if j["id"] == job_id), None)
        if shown is None or shown["state"] in ACTIVE:
            return None
        known, waited = set(sig["choices"] or ()), set(sig.get("queued") or ())
        return next((j["id"] for j in jobs if (j["id"] not in known and j["state"] in ACTIVE)
                     or (j["id"] in waited and j["state"] == "running")), None)

    def stop(self, job_id: str | None) -> str:
        job_id = self.resolve(job_id)
        if not job_id:
            return "No job to stop."
        from .train_tab import stop_text

        return stop_text(self.ctx, job_id)

    def run_dir(self, job_id: str | None) -> str:
        st = self.status(job_id)
        if st is None or not st["run_dir"]:
            raise UserError("no run folder yet: start a training job first")
        return st["run_dir"]

    def compare(self, job_id: str | None) -> list[Any]:
        """"Compare epochs": hand the job's run folder to the Compare tab. Returns [message, *updates] where the
        updates are what `ctx.open_compare(run_dir)` returns for `ctx.components["compare.open_outputs"]`
        (the Compare tab's protocol); a plain `open_compare` hook (no outputs registered) is just called."""
        outputs = self.ctx.components.get("compare.open_outputs") or []
        try:
            run = self.run_dir(job_id)
        except UserError as e:
            return [str(e)] + [compat.update() for _ in outputs]
        if self.ctx.open_compare is None:
            return [f"Run folder: {run} (the Compare tab is not available)"] + [compat.update() for _ in outputs]
        result = self.ctx.open_compare(run)
        updates = list(result) if outputs and result is not None else []
        updates += [compat.update() for _ in range(len(outputs) - len(updates))]
        return [f"Comparing the saves of **{run}** in the Compare tab."] + updates[:len(outputs)]


def build(ctx: UiContext) -> MonitorTab:
    tab = MonitorTab(ctx)
    first = tab.snapshot(None)
    with gr.Row(elem_id=f"{PREFIX}_top"):
        job = compat.not_saved(gr.Dropdown(choices=tab.job_choices(), value=first["job"] or None, label="Job",
                                           allow_custom_value=True, elem_id=f"{PREFIX}_job"))
        stop_btn = gr.Button("Stop", elem_id=f"{PREFIX}_stop")
        compare_btn = gr.Button("Compare epochs", elem_id=f"{PREFIX}_compare")
    progress = gr.HTML(first["progress"], elem_id=f"{PREFIX}_progress")
    message = gr.Markdown("", elem_id=f"{PREFIX}_message")
    chart = gr.HTML(first["chart"], elem_id=f"{PREFIX}_chart")
    with gr.Row():
        round_box = compat.not_saved(gr.Dropdown(choices=first["rounds"], value=LATEST,
                                                 label="Control pictures of round", elem_id=f"{PREFIX}_round"))
        bleeding = gr.Markdown(first["bleeding"], elem_id=f"{PREFIX}_bleeding")
    with gr.Row(equal_height=False, elem_id=f"{PREFIX}_pictures"):
        gallery_a = compat.gallery("A: prompts with the concept (should change)", columns=3,
                                   elem_id=f"{PREFIX}_gallery_a")
        gallery_b = compat.gallery("B: class prompts, no trigger (should stay)", columns=3,
                                   elem_id=f"{PREFIX}_gallery_b")
    warnings = gr.Markdown(first["warnings"], elem_id=f"{PREFIX}_warnings")
    with gr.Row():
        with gr.Column():
            saved = gr.Markdown(first["saved"], elem_id=f"{PREFIX}_saved")
        with gr.Column():
            run_dir = compat.not_saved(gr.Textbox(label="Run folder (config.toml, loss.csv, samples/, state/)",
                                                  interactive=False, value=first["run_dir"], max_lines=1,
                                                  elem_id=f"{PREFIX}_run_dir"))
            tensorboard = compat.not_saved(gr.Textbox(label="TensorBoard", interactive=False,
                                                      value=first["tensorboard"], max_lines=1,
                                                      elem_id=f"{PREFIX}_tensorboard"))
    with gr.Accordion("Log", open=False):
        log = compat.not_saved(gr.Textbox(label="Status and warnings", lines=10, interactive=False,
                                          elem_id=f"{PREFIX}_log"))
    sig = gr.State({})
    outputs = [job, progress, chart, round_box, gallery_a, gallery_b, bleeding, warnings, saved, run_dir,
               tensorboard, log, sig]
    ctx.components.update({"monitor.tab": tab, "monitor.job": job})

    compat.poll(tab.poll, inputs=[job, round_box, sig], outputs=outputs, every=1.0,
                demo=ctx.components.get("blocks"), elem_id=POLL_ID)
    round_box.change(tab.poll, inputs=[job, round_box, sig], outputs=outputs, show_progress="hidden")
    job.change(lambda j, r: tab.poll(j, r, {}), inputs=[job, round_box], outputs=outputs, show_progress="hidden")
    stop_btn.click(tab.stop, inputs=[job], outputs=[message])

    started = ctx.components.get("train.job_id")
    if started is not None:   # a job started on the Train tab becomes the one shown here
        started.change(lambda j: compat.update(choices=tab.job_choices(), value=j or None) if j else compat.update(),
                       inputs=[started], outputs=[job])

    def wire_compare() -> None:   # after every tab is built: the Compare tab registers its outputs then
        outputs = list(ctx.components.get("compare.open_outputs") or [])
        compare_btn.click(tab.compare, inputs=[job], outputs=[message] + outputs)

    ctx.after_build.append(wire_compare)
    return tab
