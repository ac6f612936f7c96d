"""The Convert tab: safe conversions of files from the host's model folders, with hashes and what was dropped.

What it converts (`convert.report.route` decides per input unless a target is chosen): pickled
`.ckpt/.pt/.pth/.bin` → `.safetensors` (restricted unpickler, verified), diffusers/PEFT LoRAs → kohya LoRAs,
diffusers folders → single-file checkpoints, and single-file checkpoints → diffusers folders.
Outputs go to the folder given, else by kind: LoRAs to the host's LoRA folder, single files to its checkpoint
folder, diffusers folders beside their source, `.safetensors` copies of pickles beside the pickle (so the
host lists them). Nothing is replaced unless "Replace existing outputs" is ticked; inputs never are.

The handlers below are plain functions of plain values (no gradio, no tensors; the conversions run in
`lib_sdtrain.convert`); `build(ctx)` only wires widgets to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError

HOST_KINDS = ("checkpoint", "lora", "embedding", "hypernetwork")
TARGET_CHOICES = [("automatic (by input)", "auto"), ("pickle → .safetensors", "safetensors"),
                  ("diffusers/PEFT LoRA → kohya LoRA", "kohya"), ("diffusers folder → single file", "single-file"),
                  ("single file → diffusers folder", "diffusers")]
FAMILY_CHOICES = ["auto", "sd1", "sd2", "sdxl"]
DTYPE_CHOICES = ["keep", "fp16", "bf16", "fp32"]
COLUMNS = ["input", "status", "kind", "output", "A1111 short hash", "sha256", "details"]
REFRESH_KIND = {"checkpoint": "checkpoint", "diffusers": "checkpoint", "lora": "lora", "embedding": "embedding",
                "hypernetwork": "hypernetwork"}


# ---- plain handlers ---------------------------------------------------------------------------------
def host_folders(ctx: Any) -> dict[str, str]:
    """kind → folder of the host's model folders that exist (empty when the host cannot say)."""
    out: dict[str, str] = {}
    try:
        host = ctx.host()
    except Exception:  # noqa: BLE001 - no host yet (e.g. no model chosen): the folder box still works
        return out
    for kind in HOST_KINDS:
        try:
            folder = Path(host.output_dir(kind))
        except Exception:  # noqa: BLE001 - a host without that kind of folder
            continue
        if folder.is_dir():
            out[kind] = str(folder)
    return out


def folder_choices(ctx: Any) -> list[str]:
    return list(dict.fromkeys(host_folders(ctx).values()))


def file_choices(folder: str | None) -> list[str]:
    """Model files and diffusers folders under `folder` (recursively), as paths."""
    from ..convert.report import list_model_files

    if not folder or not str(folder).strip():
        return []
    return list_model_files([str(folder).strip()])


def file_options(folder: str | None) -> list[tuple[str, str]]:
    """(label, path) for the file picker: `file_choices` with control characters escaped in the labels (a newline
    in a name showed raw), the exact paths as values (`data.scan.shown_choices`)."""
    from ..data.scan import shown_choices

    return shown_choices(file_choices(folder))


def chosen_files(options: list[tuple[str, str]] | None, chosen: list[str] | str | None) -> list[str]:
    """The exact paths of what the file picker returned (gradio 3 returns the labels; a typed path is itself)."""
    from . import compat

    if chosen is None:
        return []
    items = [chosen] if isinstance(chosen, str) else list(chosen)
    return [str(compat.chosen(options or [], c)) for c in items]


def parse_alpha(text: Any) -> float | None:
    if text is None or str(text).strip() == "":
        return None
    from ..convert.lora import check_lora_alpha

    try:
        value = float(str(text).strip())
    except ValueError:
        raise UserError(f"LoRA alpha {text!r} is not a number") from None
    return check_lora_alpha(value)


def output_folder(ctx: Any, path: str, target: str, chosen: str | None) -> Path:
    """Where the output of `path` goes: the chosen folder, else by kind (see the module docstring)."""
    if chosen and str(chosen).strip():
        return Path(str(chosen).strip()).expanduser()
    folders = host_folders(ctx)
    source = Path(path)
    if target == "kohya" and "lora" in folders:
        return Path(folders["lora"])
    if target == "single-file" and "checkpoint" in folders:
        return Path(folders["checkpoint"])
    if target == "safetensors" and source.is_dir():
        return source             # a folder of pickles: each copy beside its pickle
    return source.parent


def run_conversion(ctx: Any, files: list[str] | str | None, target: str = "auto", out_dir: str | None = None,
                   dtype: str = "keep", overwrite: bool = False, keep_ema: bool = False, family: str = "auto",
                   lora_alpha: Any = None, events: Any = None) -> tuple[str, list[list[str]]]:
    """Convert the chosen inputs; returns (summary markdown, table rows). Refusals are rows, not errors."""
    from ..convert.output import ConvertConfig
    from ..convert.report import convert_inputs, result_rows, result_text, route

    if isinstance(files, str):
        files = [files] if files.strip() else []
    files = [str(f) for f in (files or []) if str(f).strip()]
    if not files:
        raise UserError("choose at least one file or folder to convert")
    cfg = ConvertConfig(dtype=None if dtype in (None, "", "keep") else dtype, overwrite=bool(overwrite),
                        keep_ema=bool(keep_ema))
    cfg.validate()
    alpha = parse_alpha(lora_alpha)
    to = None if target in (None, "", "auto") else target
    fam = None if family in (None, "", "auto") else family
    results = []
    for path in files:
        where = output_folder(ctx, path, route(path, to), out_dir)
        results += convert_inputs([path], where, cfg, to=to, family=fam, lora_alpha=alpha, events=events)
    refresh_host(ctx, results)
    return summary_markdown(results, result_text(results)), result_rows(results)


def refresh_host(ctx: Any, results: list[Any]) -> None:
    """Tell the host about new files so its lists (A1111's Lora / checkpoint lists) show them."""
    kinds = {REFRESH_KIND.get(r.kind) for r in results if r.status == "converted"} - {None}
    if not kinds:
        return
    try:
        host = ctx.host()
        for kind in sorted(kinds):
            host.refresh(kind)
    except Exception:  # noqa: BLE001 - a missing refresh only delays the listing
        pass


def summary_markdown(results: list[Any], counts: str) -> str:
    """Counts, then per result: output, hashes, what was dropped, warnings and refusals."""
    from ..data.scan import shown

    lines = [f"**{counts}**"]
    for r in results:      # names shown escaped: a newline in one would end the list item
        if r.status == "refused":
            lines.append(f"- ❌ `{shown(r.source.name)}`: {shown(r.message)}")
            continue
        lines.append(f"- ✅ `{shown(r.source.name)}` → `{shown(r.output)}` "
                     f"({r.kind}{', ' + shown(r.message) if r.message else ''})")
        h = r.hashes
        if h:
            extra = f", model hash `{h['model_hash']}`" if "model_hash" in h else ""
            extra += f", addnet hash `{h['addnet_hash']}`" if "addnet_hash" in h else ""
            lines.append(f"  - A1111 short hash `{h.get('shorthash', '')}`{extra}, sha256 `{h.get('sha256', '')}`")
        if r.dropped:
            lines.append("  - dropped: " + ", ".join(f"{k}: {v}" for k, v in sorted(r.dropped.items())))
        for w in r.warnings:
            lines.append(f"  - ⚠️ {w}")
    return "\n".join(lines)


# ---- widgets ----------------------------------------------------------------------------------------
def build(ctx: Any) -> None:
    """The tab's widgets (inside the gr.Tab that ui/tabs.py opened)."""
    import gradio as gr

    from . import compat

    folders = folder_choices(ctx)
    with gr.Row():
        with gr.Column(scale=2):
            folder = gr.Dropdown(label="Folder to pick from (the host's model folders, or type one)",
                                 choices=folders, value=folders[0] if folders else None, allow_custom_value=True,
                                 elem_id="training_lab_convert_folder")
            first = file_options(folders[0]) if folders else []
            files = gr.Dropdown(label="Files / diffusers folders", choices=compat.labelled(first), value=[],
                                multiselect=True, elem_id="training_lab_convert_files",
                                # gradio 3.41.2 refuses custom values in a multiselect dropdown
                                **({} if compat.GRADIO3 else {"allow_custom_value": True}))
            refresh = gr.Button("Refresh list")
            target = gr.Dropdown(label="Conversion", choices=compat.choices(TARGET_CHOICES), value="auto")
            out_dir = gr.Textbox(label="Output folder (empty = by kind: LoRA folder, checkpoint folder, or beside "
                                       "the input)", value="")
            with gr.Row():
                dtype = gr.Dropdown(label="Precision", choices=DTYPE_CHOICES, value="keep")
                family = gr.Dropdown(label="Model family (LoRAs of unusual size, folders)", choices=FAMILY_CHOICES,
                                     value="auto")
                alpha = gr.Textbox(label="LoRA alpha (empty = from the file/config)", value="")
            with gr.Row():
                overwrite = gr.Checkbox(label="Replace existing outputs", value=False)
                keep_ema = gr.Checkbox(label="Keep EMA weights", value=False)
            go = gr.Button("Convert", variant="primary", elem_id="training_lab_convert_go")
        with gr.Column(scale=3):
            summary = gr.Markdown("*Pick files and press Convert. Pickled files are read without running any "
                                  "code in them.*")
            table = compat.dataframe(COLUMNS)

    files_state = gr.State(first)    # the picker's (label, exact path) pairs

    def on_folder(path):
        options = file_options(path)
        return compat.update(choices=compat.labelled(options), value=[]), options

    def on_refresh(path):
        options = file_options(path)
        return compat.update(choices=folder_choices(ctx)), compat.update(choices=compat.labelled(options)), options

    def on_go(chosen, options, tgt, out, dt, ow, ema, fam, al):
        try:
            return run_conversion(ctx, chosen_files(options, chosen), tgt, out, dt, ow, ema, fam, al)
        except UserError as err:
            return f"**{err}**", []

    folder.change(on_folder, inputs=[folder], outputs=[files, files_state])
    refresh.click(on_refresh, inputs=[folder], outputs=[folder, files, files_state])
    go.click(on_go, inputs=[files, files_state, target, out_dir, dtype, overwrite, keep_ema, family, alpha],
             outputs=[summary, table])
    ctx.components["convert.files"] = files
