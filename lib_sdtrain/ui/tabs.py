"""The Training Lab page: one Blocks with a sub-tab per job, built from a small registry.

    TABS: Dataset → Train → Monitor → Convert → Compare

Each tab is a module `lib_sdtrain.ui.<module>` with `build(ctx: UiContext) -> None`, called inside its
`gr.Tab`. A tab whose module is not there yet shows a one-line note instead (only a ModuleNotFoundError
for that exact module is caught: an import error inside a tab is a bug and is raised).

Inside A1111, `scripts/training_lab.py` calls `build(ctx)` from its `on_ui_tabs` callback and returns
`[(blocks, "Training Lab", "training_lab")]`; A1111 then adds our `style.css` and `javascript/*.js` itself.
The standalone app (`python -m lib_sdtrain app`) uses `build_app`, which adds them by hand.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import gradio as gr

from . import compat
from .context import UiContext

# (id, label, module under lib_sdtrain.ui)
TABS: list[tuple[str, str, str]] = [
    ("dataset", "Dataset", "dataset_tab"),
    ("train", "Train", "train_tab"),
    ("monitor", "Monitor", "monitor_tab"),
    ("convert", "Convert", "convert_tab"),
    ("compare", "Compare", "compare_tab"),
]

EXTENSION_ROOT = Path(__file__).resolve().parents[2]
STYLE_PATH = EXTENSION_ROOT / "style.css"
SCRIPT_PATHS = sorted((EXTENSION_ROOT / "javascript").glob("*.js")) if (EXTENSION_ROOT / "javascript").is_dir() \
    else []


def load_tab(module: str) -> Any | None:
    """The tab module, or None when that module does not exist (yet)."""
    name = f"lib_sdtrain.ui.{module}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        return None


def build_tabs(ctx: UiContext) -> Any:
    """The sub-tabs, inside an already open Blocks. Returns the `gr.Tabs`."""
    if ctx.extras.get("notice"):   # e.g. inside A1111: the extension was updated, a restart is needed
        gr.Markdown(f"**{ctx.extras['notice']}**", elem_classes=["training-lab-note"],
                    elem_id="training_lab_notice")
    with gr.Tabs(elem_id="training_lab_tabs") as tabs:
        ctx.components["tabs"] = tabs
        for tab_id, label, module in TABS:
            with gr.Tab(label, id=tab_id, elem_id=f"training_lab_tab_{tab_id}") as tab:
                ctx.components[f"tab.{tab_id}"] = tab       # tabs refresh what they show when selected
                mod = load_tab(module)
                if mod is None or not callable(getattr(mod, "build", None)):
                    gr.Markdown(f"*{label}: this part of Training Lab is not installed in this version.*",
                                elem_classes=["training-lab-note"])
                else:
                    mod.build(ctx)
    for hook in ctx.after_build:
        hook()
    return tabs


def build(ctx: UiContext) -> Any:
    """The whole Training Lab page as one `gr.Blocks` (what A1111's `on_ui_tabs` callback returns)."""
    ctx.after_build.clear()
    with gr.Blocks(analytics_enabled=False) as demo:
        ctx.components["blocks"] = demo
        build_tabs(ctx)
    return demo


def page_assets() -> tuple[str, str]:
    """(css, head html) for the standalone app; A1111 loads the same files itself."""
    css = STYLE_PATH.read_text(encoding="utf-8") if STYLE_PATH.is_file() else ""
    scripts = "".join(f"<script>\n{p.read_text(encoding='utf-8')}\n</script>" for p in SCRIPT_PATHS)
    return css, scripts


def build_app(ctx: UiContext, title: str = "Training Lab") -> tuple[Any, dict[str, Any]]:
    """The standalone page: our tabs in their own Blocks with the CSS and JS A1111 would add.

    Returns (blocks, extra `launch()` kwargs)."""
    ctx.after_build.clear()
    css, head = page_assets()
    theme = compat.offline_theme()
    with compat.blocks(title=title, css=css, head=head, theme=theme) as demo:
        ctx.components["blocks"] = demo
        gr.HTML(f"<h2 class='training-lab-title'>{title}</h2>")
        build_tabs(ctx)
    return demo, compat.launch_kwargs(css, head, theme)
