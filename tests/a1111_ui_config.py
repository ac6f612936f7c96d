"""The keys A1111 1.10 stores a tab's widgets under in ui-config.json (modules/ui_loadsave.py), in our words, for
tests under any gradio version. No pytest: tests/test_ui_gradio3.py's script imports it too.

A tab is registered as "<tab id>": each widget with a label is "<tab id>/<label>", a button without one
"<tab id>/<its text>", a `gr.Tabs` with an element id "<tab id>/Tabs@<id>"; sub-tabs, rows and accordions add
nothing. Each field A1111 tracks gets "<that>/<field>" (value; minimum, maximum and step of a slider; visible of
a visible widget or button), with "customscript/<custom_script_source>/" in front when the component has one,
and none for a component marked `do_not_save_to_config`. On a first start the first component of a key writes
its field into the config and every later one is given the config's value.
"""

from __future__ import annotations


def ui_config_keys(block, path="training_lab"):
    """[(key, component, field)] in the order A1111 registers them."""
    import gradio as gr

    valued = (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Number, gr.Dropdown)
    out = []

    def fields(key_base, x):
        names = []
        if type(x) in (*valued, gr.Button) and getattr(x, "visible", True):
            names.append("visible")
        if type(x) is gr.Slider:
            names += ["value", "minimum", "maximum", "step"]
        elif type(x) in valued:
            names.append("value")
        elif isinstance(x, gr.Tabs):
            names.append("selected")
        for name in names:
            if getattr(x, "do_not_save_to_config", False):
                continue
            key = f"{key_base}/{name}"
            source = getattr(x, "custom_script_source", None)
            out.append((f"customscript/{source}/{key}" if source is not None else key, x, name))

    def walk(x):
        if hasattr(x, "children"):
            if isinstance(x, gr.Tabs) and x.elem_id is not None:
                fields(f"{path}/Tabs@{x.elem_id}", x)
            for child in x.children:
                walk(child)
        elif getattr(x, "label", None) is not None:
            fields(f"{path}/{x.label}", x)
        elif isinstance(x, gr.Button) and getattr(x, "value", None) is not None:
            fields(f"{path}/{x.value}", x)

    walk(block)
    return out


def repeated_keys(block, path="training_lab"):
    """{key: [elem_id or label of each component]} for every key more than one component produces."""
    seen = {}
    for key, comp, _ in ui_config_keys(block, path):
        seen.setdefault(key, []).append(comp.elem_id or getattr(comp, "label", None) or getattr(comp, "value", None))
    return {key: comps for key, comps in seen.items() if len(comps) > 1}
