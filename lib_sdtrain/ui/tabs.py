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
    scope_repeated_labels(tabs)
    return tabs


# What A1111 keeps a widget's saved default under (modules/ui_loadsave.py, in our words): "<tab id>/<label>/<field>"
# (a button without a label: its text), with no part for sub-tabs, rows or accordions, and "customscript/<source>/"
# in front when the component has a `custom_script_source`. The first widget of a key is the one Settings →
# Defaults edits; every later one is given the value the first saved, minimum, maximum and step included.
_KEYED = (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown, gr.Button)


def scope_repeated_labels(root: Any) -> list[tuple[str, str]]:
    """Give each widget whose label an earlier widget of the page already has (Sampler, Steps, CFG scale, Batch
    size, Stop ... on several sub-tabs) its sub-tab path as `custom_script_source`, the one part of A1111's
    ui-config key besides the label: every widget then keeps its own default there, and what the page shows is
    unchanged. The first widget of a label keeps its key, so a default saved for it before stays with it.
    Returns (label, scope) for each widget scoped; other hosts ignore the attribute."""
    taken: set[tuple[str | None, str]] = set()
    scoped: list[tuple[str, str]] = []

    def walk(block: Any, where: tuple[str, ...]) -> None:
        if isinstance(block, gr.Tab):
            where = (*where, str(block.label))
        children = getattr(block, "children", None)
        if children is not None:
            for child in children:
                walk(child, where)
            return
        if not isinstance(block, _KEYED) or getattr(block, "do_not_save_to_config", False):
            return
        name = getattr(block, "label", None)
        if name is None and isinstance(block, gr.Button):
            name = getattr(block, "value", None)
        if name is None:
            return
        key = (getattr(block, "custom_script_source", None), str(name))
        if key in taken:
            base = "training_lab/" + "/".join(where)
            scope, n = base, 1
            while (scope, str(name)) in taken:   # the same label twice in one sub-tab
                n += 1
                scope = f"{base}#{n}"
            block.custom_script_source = scope
            key = (scope, str(name))
            scoped.append((str(name), scope))
        taken.add(key)

    walk(root, ())
    return scoped


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
