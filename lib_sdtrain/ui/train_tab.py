"""The Train tab: every training setting as a generated widget, presets, config files, the steps arithmetic,
a memory estimate, and Start / Stop.

Layout (A1111's txt2img look: settings on the left, the summary and the buttons on the right):
    [method] [preset ▾] [Apply]                                  | Start  Stop
    Model, data and output / Data and captions / Steps ... (one  | steps / epochs / repeats arithmetic
    accordion per setting group, advanced ones under "More")     | ≈ GPU memory
    <method> settings (only the selected method's section)       | status of the last action
    Config file: path [Load] [Save] [replace] / upload           |
The handlers are methods of `TrainTab` taking and returning plain values, so tests call them without a
browser; `build(ctx)` only wires them to the widgets.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import gradio as gr

from ..config import config_to_text, load_config, save_config
from ..errors import UserError
from ..train.settings import TrainSettings
from . import compat
from .context import UiContext, host_sampler_names, host_sampler_spelling
from .presets import PRESETS
from .widgets import FieldWidget, build_fields, dict_to_values, label_for, make_widget, settings_from_values

PREFIX = "training_lab_train"
MB = 1024 ** 2
PLAN_KEYS = {"data", "reg_data", "caption_ext", "batch_size", "grad_accum", "epochs", "max_steps", "resolution",
             "enable_buckets", "min_bucket", "max_bucket", "bucket_no_upscale", "seed"}
ESTIMATE_KEYS = {"model", "method", "resolution", "batch_size", "mixed_precision", "gradient_checkpointing",
                 "optimizer", "cache_latents"}
TYPED_KEYS = {"model", "data", "reg_data", "caption_ext", "output", "name", "resume"}   # update on blur/submit


def method_names() -> list[str]:
    for s in TrainSettings.settings():
        if s.name == "method":
            return list(s.choices or [])
    return []


class ScanCache:
    """The last few dataset scans, keyed by the folders and their modification times (scans read every
    picture's header; the arithmetic is redone on every setting change)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()

    @staticmethod
    def _stamp(folder: str) -> tuple:
        p = Path(folder).expanduser()
        if not folder or not p.is_dir():
            return (folder, None)
        stamps = [p.stat().st_mtime_ns]
        for child in sorted(p.iterdir()):
            if child.is_dir():
                stamps.append(child.stat().st_mtime_ns)
        return (str(p.resolve()), tuple(stamps))

    def scan(self, data: str, reg_data: str, caption_ext: str) -> Any:
        from ..data.scan import scan_dataset

        key = (self._stamp(data), self._stamp(reg_data), caption_ext)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        report = scan_dataset(data, reg_path=reg_data or None, caption_ext=caption_ext)
        self._items[key] = report
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return report


class TrainTab:
    """Handlers of the Train tab over its generated fields (plain values in, plain values out)."""

    def __init__(self, ctx: UiContext, fields: list[FieldWidget], samplers: list[str] | None = None) -> None:
        self.ctx = ctx
        self.fields = fields
        self.scans = ScanCache()
        self.samplers = list(samplers or [])   # the control pictures' drop-down: the host's sampler names

    def _as_listed(self, values: list[Any]) -> list[Any]:
        """The control pictures' sampler as its drop-down lists it: a config or preset says "euler" (ours, as
        configs store it) or "dpm++ 2m", the drop-down shows A1111's "Euler" / "DPM++ 2M" (it showed "euler", no
        entry marked; real A1111 v1.10.1, session 22). Stored again as ours."""
        for i, f in enumerate(self.fields):
            if f.info.name == "sample_sampler" and not f.section and self.samplers:
                values[i] = host_sampler_spelling(self.samplers, values[i])
        return values

    # ---- settings -------------------------------------------------------------------------------------
    def settings(self, values: list[Any]) -> TrainSettings:
        """Widget values → validated TrainSettings (UserError names the widget)."""
        return settings_from_values(TrainSettings, self.fields, values)

    def value(self, values: list[Any], key: str) -> Any:
        for f, v in zip(self.fields, values):
            if f.key == key:
                return v
        raise KeyError(key)

    def section_visibility(self, method: str) -> list[bool]:
        """Which method sections show for `method` (sections that are not methods always show)."""
        names = method_names()
        return [name == method or name not in names for name in TrainSettings.sections()]

    # ---- live arithmetic and estimate -----------------------------------------------------------------
    def plan_text(self, values: list[Any]) -> str:
        """The steps / epochs / repeats arithmetic for the current settings and dataset (Markdown)."""
        from ..train.estimate import run_plan

        try:
            cfg = self.settings(values)
        except UserError as e:
            return f"**Settings problem:** {e}"
        if not cfg.data:
            return "Choose a dataset folder to see the steps arithmetic."
        try:
            cfg, source = self.with_model_defaults(cfg)
        except UserError as e:
            return f"**Model problem:** {e}"
        try:
            report = self.scans.scan(cfg.data, cfg.reg_data, cfg.caption_ext)
            plan = run_plan(cfg, report)
        except UserError as e:
            return f"**Dataset problem:** {e}"
        lines = [f"**{plan['total_steps']} steps** · {plan['steps_per_epoch']} per epoch · "
                 f"{plan['epochs']} epochs · effective batch {plan['effective_batch']}", "", plan["text"],
                 f"\nResolution {cfg.resolution} px, buckets {cfg.min_bucket}–{cfg.max_bucket} px ({source})."]
        if plan.get("reg_images"):
            lines.append(f"\n{plan['reg_images']} regularization pictures are cycled to balance the instance "
                         "samples.")
        if plan.get("validation_images"):
            lines.append(f"\n{plan['validation_images']} instance pictures are held out for the validation loss "
                         "(not trained on).")
        if plan.get("buckets"):
            lines.append("\nBuckets: " + ", ".join(f"{k} ({n})" for k, n in plan["buckets"].items()))
        if plan.get("hint"):
            lines.append(f"\n*{plan['hint']}*")
        left_out = sum(1 for r in report.records if not r.usable)   # a picture with two errors is one picture
        if left_out:
            lines.append(f"\n{left_out} of {len(report.records)} pictures will be skipped (see the Dataset tab).")
        return "\n".join(lines)

    def with_model_defaults(self, cfg: TrainSettings) -> tuple[TrainSettings, str]:
        """Resolution and bucket bounds left at 0 filled in from the model, as the run will fill them."""
        from ..train.preflight import native_size, with_model_defaults

        if cfg.resolution and cfg.min_bucket and cfg.max_bucket:
            return cfg, "as set"
        native, source = native_size(cfg, self.ctx.host())
        return with_model_defaults(cfg, native), ("model: " + source) if not cfg.resolution else "as set"

    def estimate_text(self, values: list[Any], family: str = "auto") -> str:
        from ..train.estimate import estimate_vram, family_of_file, model_sizes

        try:
            cfg = self.settings(values)
        except UserError as e:
            return f"**Settings problem:** {e}"
        guessed = ""
        if family in ("", "auto"):
            found = family_of_file(cfg.model) if cfg.model else None
            hook = self.ctx.extras.get("model_family")
            if found is None and hook is not None and not cfg.model:
                try:
                    found = hook()
                except Exception:  # noqa: BLE001 - the estimate is a hint; never fail the tab for it
                    found = None
            if found is None:
                found = "sdxl" if cfg.resolution >= 1024 else "sd1"
                guessed = " (family guessed from the resolution)"
            family = found
        # the model file's own sizes and block layout (a distilled SDXL is not stock SDXL), where its header reads
        sizes = model_sizes(cfg.model, family) if cfg.model and Path(cfg.model).is_file() else None
        if not cfg.resolution:
            try:
                cfg, _ = self.with_model_defaults(cfg)     # 0 = the model's native size, as the run fills it in
            except UserError:
                pass
        est = estimate_vram(cfg, family, sizes=sizes)
        small = ""
        if sizes is None and cfg.model and Path(cfg.model).is_file() and Path(cfg.model).stat().st_size < 500 * MB:
            small = f" (for a full-size {family} model; this small model file needs far less)"
        elif sizes is not None:
            small = " (sizes read from the model file)"
        return f"**GPU memory:** {est.text.replace(chr(10), '  ' + chr(10))}{guessed}{small}"

    # ---- jobs -----------------------------------------------------------------------------------------
    def start(self, values: list[Any]) -> tuple[str, str]:
        """Validate and queue a run. Returns (message, job id or "")."""
        resume = str(self.value(values, "resume") or "").strip()
        own = resume and not str(self.value(values, "data") or "").strip()
        try:
            if own:   # only the run folder given: the run's own settings, as {"resume": RUN} in the API
                job_id = self.ctx.jobs.start({"resume": resume})
            else:
                cfg = self.settings(values)
                job_id = self.ctx.jobs.start(cfg)
        except UserError as e:
            return f"**Not started:** {e}", ""
        st = self.ctx.jobs.status(job_id)
        running = self.ctx.jobs.running()
        if st["state"] == "running" or (st["queue_position"] <= 1 and running is None):
            where = "started"
        else:
            where = st["phase"] or st["state"]
        note = (f" (resuming {resume} with the settings it was trained with; the form's other values are not "
                "used)") if own else ""
        return f"Job **{job_id}** {where}{note}. Follow it in the Monitor tab.", job_id

    def stop(self, job_id: str) -> str:
        job_id = job_id or (self.ctx.jobs.running().id if self.ctx.jobs.running() else "")
        if not job_id:
            return "No job is running."
        return stop_text(self.ctx, job_id)

    # ---- presets and config files ---------------------------------------------------------------------
    def preset_values(self, name: str, values: list[Any]) -> list[Any]:
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}")
        data = _resolve_toy(PRESETS[name])
        return self._as_listed(dict_to_values(self.fields, data, keep=list(values)))

    def load_config_values(self, path: str, values: list[Any]) -> tuple[list[Any], str]:
        """A TOML/JSON config → widget values (settings missing from the file take their defaults)."""
        path = (path or "").strip()
        if not path:
            raise UserError("give the path of a .toml or .json config file")
        cfg = load_config(TrainSettings, Path(path).expanduser())
        return self._as_listed(dict_to_values(self.fields, cfg.to_dict())), f"Loaded {path}."

    def save_config_file(self, path: str, replace: bool, values: list[Any]) -> str:
        path = (path or "").strip()
        if not path:
            raise UserError("give a path ending in .toml or .json to save the settings to")
        target = Path(path).expanduser()
        if target.exists() and not replace:
            raise UserError(f"{target} exists; tick 'replace' to overwrite it")
        cfg = self.settings(values)
        save_config(cfg, target)
        return f"Saved {target}."

    def toml_text(self, values: list[Any]) -> str:
        try:
            cfg = self.settings(values)
        except UserError as e:
            return f"# settings problem: {e}"
        return config_to_text(cfg)


def stop_text(ctx: UiContext, job_id: str) -> str:
    """Ask `job_id` to stop; the answer both tabs' Stop buttons show."""
    try:
        state = ctx.jobs.stop(job_id)
        steps_taken = ctx.jobs.status(job_id)["step"] if state == "running" else 0
    except UserError as e:
        return str(e)
    if state != "running":
        return f"Job {job_id}: {state}"
    if steps_taken:
        return f"Job {job_id}: stopping after the current step; a resumable state is kept"
    return f"Job {job_id}: stopping before its first step"


def template_choices(ctx: UiContext) -> list[str]:
    """Prompt templates the tab offers: none, the built-in ones, and the host's template files (inside A1111 its
    textual_inversion_templates folder, as A1111's Train tab lists them)."""
    from ..data.templates import BUILTIN, template_files

    folder = None
    try:
        host = ctx.host()
        folder = host.prompt_template_dir() if hasattr(host, "prompt_template_dir") else None
    except Exception:  # noqa: BLE001 - the list is a convenience; a path can always be typed
        folder = None
    return ["", *BUILTIN, *(str(p) for p in (template_files(folder) if folder else []))]


# what each method's load_weights reads: LoRA only kohya .safetensors (formats.kohya.import_kohya), embeddings
# .safetensors or a torch pickle, hypernetworks A1111's .pt
START_SUFFIXES = {"lora": (".safetensors",), "embedding": (".safetensors", ".pt", ".bin"), "hypernetwork": (".pt",)}
MAX_START_CHOICES = 300


def start_choices(ctx: UiContext, method: str = "") -> list[str]:
    """Files `start_from` offers for `method`: the host's files of that kind (LoRA, embedding or hypernetwork;
    inside A1111 its own folders), or of all three when no method is named, newest first, at most
    MAX_START_CHOICES; none for the methods that cannot start from a file. Any path can still be typed."""
    found: list[Path] = []
    kinds = {method: START_SUFFIXES[method]} if method in START_SUFFIXES else {} if method else START_SUFFIXES
    try:
        host = ctx.host()
        for kind, suffixes in kinds.items():
            folder = host.output_dir(kind)
            if folder.is_dir():
                found += [p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()]
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    except Exception:  # noqa: BLE001 - the list is a convenience; a path can always be typed
        return [""]
    return ["", *(str(p) for p in found[:MAX_START_CHOICES])]


def _resolve_toy(data: dict[str, Any]) -> dict[str, Any]:
    if data.get("model") != "@toy":
        return data
    from ..toy import bundled_model

    try:
        return {**data, "model": str(bundled_model())}
    except UserError:   # no bundled toy model in this install: keep the model the user has chosen
        return {k: v for k, v in data.items() if k != "model"}


def _safe(fn):
    """Turn a UserError into its message in the status box (gradio would show a generic error)."""
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as e:
            return f"**{e}**"
    return wrapper


def _shared_labels() -> set[str]:
    """Labels that more than one method section (or a section and the main settings) would show. A1111 keeps a
    widget's value in ui-config.json under its label alone (`training_lab/<label>/value`) and gives a saved value
    to every widget of that label: LoRA's "Train text encoder" (on) turned the fine-tune's (off by default) on
    in A1111 from its first start. Such section settings get the section's name in their label."""
    from collections import Counter

    counts: Counter[str] = Counter(label_for(i) for i in TrainSettings.settings())
    for cls in TrainSettings.sections().values():
        counts.update({label_for(i) for i in cls.settings()})
    return {label for label, n in counts.items() if n > 1}


def build(ctx: UiContext) -> TrainTab:
    """Build the Train tab inside the current gr.Tab; returns the handler object (tests use it)."""
    methods = method_names()
    method_info = next(s for s in TrainSettings.settings() if s.name == "method")
    fields: list[FieldWidget] = []
    with gr.Row(elem_id=f"{PREFIX}_row", equal_height=False):
        with gr.Column(scale=3, elem_id=f"{PREFIX}_settings"):
            with gr.Row():
                method = make_widget(method_info, "method", PREFIX)
                fields.append(FieldWidget("method", method_info, method))
                preset = gr.Dropdown(choices=list(PRESETS), value=None, label="Preset",
                                     info="fills in a starting point; keeps your dataset and output name",
                                     elem_id=f"{PREFIX}_preset")
                apply_preset = gr.Button("Apply preset", elem_id=f"{PREFIX}_apply_preset")
            samplers = host_sampler_names(ctx)   # inside A1111: every sampler of its txt2img, by its names
            sampler_info = next(s for s in TrainSettings.settings() if s.name == "sample_sampler")
            first = {"sample_sampler": host_sampler_spelling(samplers, str(sampler_info.default))}
            if ctx.default_model:
                first["model"] = ctx.default_model
            fields += build_fields(TrainSettings, prefix=PREFIX, skip={"method"}, values=first,
                                   suggestions={"prompt_template": template_choices(ctx),
                                                "start_from": start_choices(ctx, str(method_info.default)),
                                                "sample_sampler": samplers})
            section_boxes = []
            shared_labels = _shared_labels()
            for name, cls in TrainSettings.sections().items():
                visible = name == method_info.default or name not in methods
                with gr.Column(visible=visible, elem_id=f"{PREFIX}_section_{name}") as box:
                    own = {i.name: f"{label_for(i)} ({name})" for i in cls.settings() if label_for(i) in shared_labels}
                    fields += build_fields(cls, section=name, prefix=PREFIX, labels=own)
                section_boxes.append(box)
            with gr.Accordion("Config file", open=False, elem_id=f"{PREFIX}_config"):
                with gr.Row():
                    config_path = gr.Textbox(label="Config file (.toml or .json)", max_lines=1,
                                             elem_id=f"{PREFIX}_config_path",
                                             placeholder="e.g. /path/to/run.toml")
                    replace = gr.Checkbox(label="replace an existing file", value=False,
                                          elem_id=f"{PREFIX}_config_replace")
                with gr.Row():
                    load_btn = gr.Button("Load", elem_id=f"{PREFIX}_config_load")
                    save_btn = gr.Button("Save", elem_id=f"{PREFIX}_config_save")
                    toml_btn = gr.Button("Show as TOML", elem_id=f"{PREFIX}_config_show")
                upload = gr.File(label="or upload a config", file_types=[".toml", ".json"],
                                 elem_id=f"{PREFIX}_config_upload", **compat.file_kwargs())
                toml_box = compat.not_saved(gr.Textbox(label="Settings as TOML (python -m lib_sdtrain train --config FILE)",
                                                       lines=8, interactive=False, elem_id=f"{PREFIX}_toml"))
        with gr.Column(scale=1, min_width=320, elem_id=f"{PREFIX}_summary"):
            with gr.Row():
                start_btn = gr.Button("Start training", variant="primary", elem_id=f"{PREFIX}_start")
                stop_btn = gr.Button("Stop", elem_id=f"{PREFIX}_stop")
            message = gr.Markdown("", elem_id=f"{PREFIX}_message")
            job_id = compat.not_saved(gr.Textbox(label="Job", interactive=False, max_lines=1, elem_id=f"{PREFIX}_job"))
            plan = gr.Markdown("Choose a dataset folder to see the steps arithmetic.", elem_id=f"{PREFIX}_plan")
            refresh = gr.Button("Rescan dataset", size="sm", elem_id=f"{PREFIX}_rescan")
            family = gr.Dropdown(choices=["auto", "sd1", "sd2", "sdxl"], value="auto", label="Estimate for",
                                 info="model family for the memory estimate (auto: read from the model file)",
                                 elem_id=f"{PREFIX}_family")
            estimate = gr.Markdown("", elem_id=f"{PREFIX}_estimate")

    tab = TrainTab(ctx, fields, samplers)
    components = [f.component for f in fields]
    ctx.components.update({"train.tab": tab, "train.job_id": job_id, "train.fields": fields})

    def summary(*values):
        return tab.plan_text(list(values[:-1])), tab.estimate_text(list(values[:-1]), values[-1])

    start_from = next(f.component for f in fields if f.key == "start_from")

    def on_method(value):
        # the start_from list is read again: the files of the chosen method, as they are now
        return [*(compat.update(visible=v) for v in tab.section_visibility(value)),
                compat.update(choices=start_choices(ctx, value))]

    method.change(on_method, inputs=[method], outputs=[*section_boxes, start_from], queue=False)
    for f in fields:
        if f.key in PLAN_KEYS or f.key in ESTIMATE_KEYS or f.section:
            events = ("blur", "submit") if f.key in TYPED_KEYS else ("change",)
            for name in events:
                getattr(f.component, name)(summary, inputs=components + [family], outputs=[plan, estimate],
                                           show_progress="hidden")
    family.change(summary, inputs=components + [family], outputs=[plan, estimate], show_progress="hidden")

    def rescan(*values):
        tab.scans = ScanCache()
        return summary(*values)

    refresh.click(rescan, inputs=components + [family], outputs=[plan, estimate])

    def on_preset(name, *values):
        if not name:
            return [*values, "Choose a preset first."]
        return [*tab.preset_values(name, list(values)), f"Applied preset **{name}**."]

    apply_preset.click(on_preset, inputs=[preset] + components, outputs=components + [message]).then(
        summary, inputs=components + [family], outputs=[plan, estimate])

    def on_load(path, *values):
        try:
            new, text = tab.load_config_values(path, list(values))
            return [*new, text]
        except UserError as e:
            return [*values, f"**Not loaded:** {e}"]

    load_btn.click(on_load, inputs=[config_path] + components, outputs=components + [message]).then(
        summary, inputs=components + [family], outputs=[plan, estimate])

    def on_upload(file, *values):
        path = compat.file_path(file)
        if not path:
            return [*values, ""]
        return on_load(path, *values)

    upload.upload(on_upload, inputs=[upload] + components, outputs=components + [message])

    save_btn.click(_safe(lambda path, rep, *values: tab.save_config_file(path, rep, list(values))),
                   inputs=[config_path, replace] + components, outputs=[message])
    toml_btn.click(lambda *values: tab.toml_text(list(values)), inputs=components, outputs=[toml_box])

    tabs = ctx.components.get("tabs")

    def on_start(*values):
        text, new_id = tab.start(list(values))
        switch = compat.update(selected="monitor") if new_id else compat.update()
        return text, new_id, switch

    start_outputs = [message, job_id] + ([tabs] if tabs is not None else [])
    start_btn.click(on_start if tabs is not None else (lambda *v: on_start(*v)[:2]), inputs=components,
                    outputs=start_outputs)
    stop_btn.click(tab.stop, inputs=[job_id], outputs=[message])
    return tab
