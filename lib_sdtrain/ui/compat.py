"""The one place that knows gradio versions apart: A1111 ships 3.41.2, Forge 4.40, the standalone app 5.x.

Everything else in `ui/` writes the common subset (deps.md §5: Blocks/Tab/Row/Column/Accordion, Textbox,
Number, Slider, Dropdown, Checkbox, Button, File, Gallery, Image, HTML, Markdown, JSON, `.click/.change/.then`,
`gr.update`) and calls these helpers for the rest. Versions are told apart by `gr.__version__`, never by
probing kwargs: 3.41.2 silently ignores unknown kwargs, so a probe would pass there and do nothing.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import gradio as gr


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


VERSION: tuple[int, ...] = _version_tuple(getattr(gr, "__version__", "0"))
GRADIO3 = VERSION < (4,)
HAS_TIMER = hasattr(gr, "Timer") and not GRADIO3


def update(**kwargs: Any) -> Any:
    """`gr.update(...)`: a property change for any component (all versions we support have it)."""
    return gr.update(**kwargs)


def js_kwargs(js: str | None) -> dict[str, Any]:
    """The client-side function argument of an event: `_js=` in 3.x, `js=` from 4.0."""
    if not js:
        return {}
    return {"_js": js} if GRADIO3 else {"js": js}


def file_kwargs(**kwargs: Any) -> dict[str, Any]:
    """`gr.File` arguments: the value is a path string (`type='filepath'`; 3.x calls that 'file')."""
    return {"type": "file" if GRADIO3 else "filepath", **kwargs}


def file_path(value: Any) -> str:
    """The local path of an uploaded file, whatever the version hands over (str, tempfile wrapper, dict)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("path") or value.get("name") or "")
    return str(getattr(value, "name", "") or getattr(value, "path", ""))


def image_kwargs(upload: bool = True, **kwargs: Any) -> dict[str, Any]:
    """`gr.Image` input sources: `source='upload'` in 3.x, `sources=['upload']` from 4.0."""
    if GRADIO3:
        return {"source": "upload", **kwargs}
    return {"sources": ["upload"] if upload else [], **kwargs}


def choices(pairs: list[tuple[str, Any]]) -> list[Any]:
    """Dropdown/Radio choices with labels. 3.41.2 shows `(label, value)` tuples as their repr, so there the
    values themselves are the choices (labels must then equal values to read well)."""
    if GRADIO3:
        return [value for _, value in pairs]
    return list(pairs)


def labelled(pairs: list[tuple[str, Any]]) -> list[Any]:
    """Dropdown choices whose labels differ from their values (a file name shown escaped, opened exactly).
    3.41.2 shows tuples as their repr, so there the labels are the choices and `chosen` maps one back to its
    value; the labels must be unique."""
    if GRADIO3:
        return [label for label, _ in pairs]
    return [tuple(p) for p in pairs]


def chosen(pairs: list[tuple[str, Any]], choice: Any) -> Any:
    """The value of what a `labelled` dropdown returned: from 4.0 the value itself, in 3.41.2 its label."""
    if not GRADIO3 or choice in (None, ""):
        return choice
    return next((value for label, value in pairs if label == choice), choice)


def choice_at(pairs: list[tuple[str, Any]], index: int) -> Any:
    """What to set a `labelled` dropdown's value to, to pick `pairs[index]`."""
    label, value = pairs[index]
    return label if GRADIO3 else value


def offline_theme() -> Any:
    """gradio's default theme with the computer's own fonts. The default names a Google font, so every page
    load asked fonts.googleapis.com for it: a request to the internet from a tool that promises none (and a
    console error offline). Only the standalone page uses it; inside A1111 the page and its theme are the
    WebUI's."""
    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    mono = ["ui-monospace", "Consolas", "monospace"]
    return gr.themes.Default(font=system, font_mono=mono)


def blocks(title: str = "Training Lab", css: str | None = None, head: str | None = None, theme: Any = None,
           **kwargs: Any) -> Any:
    """`gr.Blocks(...)` with analytics off. Page CSS, <head> HTML and the theme go to Blocks up to 5.x (5.x
    warns that this moves; the warning is silenced) and to `launch()` from 6.0 (see `launch_kwargs`)."""
    import warnings

    kw: dict[str, Any] = {"title": title, "analytics_enabled": False, **kwargs}
    if VERSION < (6,):
        if css:
            kw["css"] = css
        if head and not GRADIO3:   # 3.41.2 has no `head`; A1111 adds our javascript/ itself
            kw["head"] = head
        if theme is not None:
            kw["theme"] = theme
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*parameter in the Blocks constructor.*")
        return gr.Blocks(**kw)


def launch_kwargs(css: str | None = None, head: str | None = None, theme: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if VERSION >= (6,):
        if css:
            out["css"] = css
        if head:
            out["head"] = head
        if theme is not None:
            out["theme"] = theme
    return out


def queue(demo: Any, concurrency: int = 4) -> Any:
    """Enable the queue: `concurrency_count=` in 3.x, `default_concurrency_limit=` from 4.0."""
    if GRADIO3:
        return demo.queue(concurrency_count=concurrency)
    return demo.queue(default_concurrency_limit=concurrency)


def poll(fn: Callable[..., Any], inputs: list[Any], outputs: list[Any], every: float = 1.0,
         demo: Any = None, elem_id: str = "") -> Any:
    """Call `fn` about every `every` seconds while the page is open. Must be called inside a Blocks context.

    4.0+: `gr.Timer(every).tick(...)` (the browser ticks it; returns the Timer, whose `active` can be switched
    with `update`).
    3.x: a hidden button with `elem_id`, its event outside the queue, which a script started by the page's load
    (`demo`, the enclosing Blocks) clicks every `every` seconds. Not `Blocks.load(every=...)`: under gradio 3
    that is a loop on the server for each page ever opened, and A1111's Settings → Reload UI waited for those
    loops to end, for good (real A1111 v1.10.1, session 21). Returns the Timer or the button.
    """
    if HAS_TIMER:
        timer = gr.Timer(every)
        timer.tick(fn, inputs=inputs, outputs=outputs, show_progress="hidden")
        return timer
    if demo is None or not elem_id:
        raise ValueError("gradio 3 polls through a hidden button that the page clicks: pass the enclosing Blocks "
                         "and the button's elem_id")
    tick = gr.Button(visible=False, elem_id=elem_id)
    tick.click(fn, inputs=inputs, outputs=outputs, queue=False, show_progress="hidden")
    demo.load(None, inputs=None, outputs=None, _js=_clicker(elem_id, every))
    return tick


def _clicker(elem_id: str, every: float) -> str:
    """The browser side of gradio 3's `poll`: click the button `elem_id` every `every` seconds, once per page
    (a second load of the page's script does not start a second timer)."""
    flag = json.dumps(f"trainingLabPoll_{elem_id}")
    return ("() => { if (window[" + flag + "]) return []; window[" + flag + "] = setInterval(() => { "
            "const root = (typeof gradioApp === 'function') ? gradioApp() : "
            "((document.querySelector('gradio-app') || {}).shadowRoot || document); "
            "const b = root.querySelector(" + json.dumps("#" + elem_id) + "); if (b) b.click(); }, "
            + str(max(100, int(every * 1000))) + "); return []; }")


def gallery(label: str, columns: int = 4, height: Any = "auto", **kwargs: Any) -> Any:
    kw: dict[str, Any] = {"label": label, "columns": columns, "height": height, **kwargs}
    if not GRADIO3:
        kw.setdefault("object_fit", "contain")
    return gr.Gallery(**kw)


def not_saved(component: Any) -> Any:
    """`component`, marked as a view rather than a preference: A1111 keeps the first value of each widget in
    ui-config.json and puts it back at every start (and lists it under Settings → Defaults), which for a run
    folder, a log or a job id shown when the tab was built means a stale value after the next start. Its own
    attribute for such widgets is `do_not_save_to_config`; other hosts ignore it."""
    component.do_not_save_to_config = True
    return component


def dataframe(headers: list[str], **kwargs: Any) -> Any:
    """A read-only table (`interactive=False` in every version)."""
    kwargs.setdefault("interactive", False)
    return gr.Dataframe(headers=headers, **kwargs)


def empty_table(headers: list[str]) -> dict[str, Any]:
    """A value that empties a `dataframe` and keeps its headers in every version (gradio 3.41 turns [] into a
    table without headers)."""
    return {"headers": list(headers), "data": []}
