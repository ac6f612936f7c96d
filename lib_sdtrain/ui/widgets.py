"""Widgets generated from setting declarations, and the way back from widget values to settings.

One `setting(...)` field (config.py) becomes one widget: its label from the name, `help` as the info line,
`choices` → Dropdown, bool → Checkbox, a number with a short range → Slider, other numbers → Number, an
optional number → Textbox (empty = the default it names), lists → a Textbox with one item per line (prompts
contain commas) or, for lists of numbers, comma-separated. `advanced` settings go into a closed accordion.
Method sections (`[lora]`, `[embedding]`, ...) are found with `ConfigBase.sections()`, so a method added to
TrainSettings gets its widgets without a change here.

Going back, `values_to_dict` turns the widget values into the nested settings dict and `settings_from_values`
validates it through `TrainSettings.from_dict`, whose UserError names the setting; `describe_error` puts the
widget's label in front so the user can find it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Iterable

import gradio as gr

from ..config import ConfigBase, SettingInfo
from ..errors import UserError

GROUP_TITLES = {
    "run": "Model, data and output", "data": "Data and captions", "steps": "Steps and batches",
    "optim": "Optimizer and learning rate", "speed": "Speed and memory", "save": "Saving and resuming",
    "monitor": "Control pictures and monitoring", "network": "Network",
}
OPEN_GROUPS = {"run", "steps", "network"}
MAX_SLIDER_STEPS = 200


@dataclass
class FieldWidget:
    """A generated widget and the setting it edits (`key` is dotted for sections: `lora.network_dim`)."""

    key: str
    info: SettingInfo
    component: Any

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0] if "." in self.key else ""


def label_for(info: SettingInfo) -> str:
    text = info.name.replace("_", " ")
    for short, long in (("lr", "LR"), ("ema", "EMA"), ("snr", "SNR"), ("cfg", "CFG"), ("vae", "VAE")):
        text = " ".join(long if w == short else w for w in text.split())
    return text[:1].upper() + text[1:]


def _list_item_type(info: SettingInfo) -> Any:
    args = typing.get_args(info.base_type)
    return args[0] if args else str


def is_list(info: SettingInfo) -> bool:
    return typing.get_origin(info.base_type) is list


def widget_kind(info: SettingInfo) -> str:
    """'dropdown' | 'checkbox' | 'slider' | 'number' | 'text' | 'lines' | 'list' (which widget a setting gets)."""
    base = info.base_type
    if info.choices:
        return "dropdown"
    if base is bool:
        return "checkbox"
    if is_list(info):
        return "lines" if _list_item_type(info) is str else "list"
    if base in (int, float) and not info.optional:
        if info.minimum is not None and info.maximum is not None:
            step = info.step or (1 if base is int else 0.01)
            if (info.maximum - info.minimum) / step <= MAX_SLIDER_STEPS:
                return "slider"
        return "number"
    return "text"


def to_widget_value(info: SettingInfo, value: Any) -> Any:
    """A setting value as its widget shows it."""
    kind = widget_kind(info)
    if kind == "lines":
        return "\n".join(str(v) for v in (value or []))
    if kind == "list":
        return ", ".join(str(v) for v in (value or []))
    if kind == "text":
        return "" if value is None else str(value)
    return value


def from_widget_value(info: SettingInfo, value: Any) -> Any:
    """A widget value as plain settings data (validation happens in `from_dict`)."""
    kind = widget_kind(info)
    if kind == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if kind == "list":
        return [v.strip() for v in str(value or "").replace("\n", ",").split(",") if v.strip()]
    if kind == "text":
        text = "" if value is None else str(value).strip()
        if info.optional and text == "":
            return None
        return text
    if kind in ("number", "slider") and info.base_type is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def info_text(info: SettingInfo) -> str:
    text = info.help
    kind = widget_kind(info)
    if kind == "lines":
        text += " (one per line)"
    elif kind == "list":
        text += " (comma-separated)"
    return text


_UNSET = object()


def make_widget(info: SettingInfo, key: str, prefix: str = "training_lab", value: Any = _UNSET,
                suggestions: list[str] | None = None, choices: list[Any] | None = None, label: str = "") -> Any:
    """One gradio component for one setting (only the common subset of gradio 3.41.2 … 5.x is used).
    `value` replaces the setting's default as the initial value; `suggestions` turn a text setting into a
    drop-down of those values that still accepts any text; `choices` replace a drop-down's choices with other
    names the setting accepts (the host's names of our samplers); `label` replaces the setting's own label."""
    kind = widget_kind(info)
    common = {"label": label or label_for(info), "info": info_text(info),
              "elem_id": f"{prefix}_{key.replace('.', '_')}",
              "value": to_widget_value(info, info.default if value is _UNSET else value)}
    if suggestions is not None and info.base_type is str:
        choices = list(dict.fromkeys([common["value"], *suggestions]))
        return gr.Dropdown(choices=choices, allow_custom_value=True, **common)
    if kind == "dropdown":
        shown = info.choices if choices is None else choices
        return gr.Dropdown(choices=[str(c) if info.base_type is str else c for c in shown], **common)
    if kind == "checkbox":
        return gr.Checkbox(**common)
    if kind == "slider":
        step = info.step or (1 if info.base_type is int else 0.01)
        return gr.Slider(minimum=info.minimum, maximum=info.maximum, step=step, **common)
    if kind == "number":
        kw: dict[str, Any] = {"precision": 0 if info.base_type is int else None}
        if info.minimum is not None:
            kw["minimum"] = info.minimum
        if info.maximum is not None:
            kw["maximum"] = info.maximum
        return gr.Number(**kw, **common)
    if kind == "lines":
        return gr.Textbox(lines=3, max_lines=12, **common)
    placeholder = "empty = default" if info.optional else ""
    return gr.Textbox(lines=1, max_lines=1, placeholder=placeholder, **common)


def grouped(infos: Iterable[SettingInfo]) -> dict[str, list[SettingInfo]]:
    out: dict[str, list[SettingInfo]] = {}
    for info in infos:
        out.setdefault(info.group or "other", []).append(info)
    return out


def build_fields(cls: type[ConfigBase], *, section: str = "", prefix: str = "training_lab", per_row: int = 3,
                 skip: Iterable[str] = (), titles: dict[str, str] | None = None,
                 values: dict[str, Any] | None = None,
                 suggestions: dict[str, list[str]] | None = None,
                 labels: dict[str, str] | None = None) -> list[FieldWidget]:
    """Widgets for every setting of `cls` (not its sections), one accordion per group, advanced ones in a
    closed "more" accordion inside it; `values` (setting name → value) replace defaults as initial values;
    `suggestions` (setting name → values) make text settings drop-downs that accept any text; `labels` (setting
    name → label) replace settings' own labels. Call inside a Blocks/Column context."""
    titles = {**GROUP_TITLES, **(titles or {})}
    skip = set(skip)
    out: list[FieldWidget] = []
    for group, infos in grouped(s for s in cls.settings() if s.name not in skip).items():
        title = titles.get(group, group.replace("_", " ").capitalize())
        if section:
            title = f"{section}: {title}"
        with gr.Accordion(title, open=group in OPEN_GROUPS,
                          elem_id=f"{prefix}_group_{section + '_' if section else ''}{group}"):
            basic = [i for i in infos if not i.advanced]
            advanced = [i for i in infos if i.advanced]
            out += _rows(basic, section, prefix, per_row, values or {}, suggestions or {}, labels or {})
            if advanced:
                with gr.Accordion("More", open=False):
                    out += _rows(advanced, section, prefix, per_row, values or {}, suggestions or {}, labels or {})
    return out


def _rows(infos: list[SettingInfo], section: str, prefix: str, per_row: int,
          values: dict[str, Any], suggestions: dict[str, list[str]] | None = None,
          labels: dict[str, str] | None = None) -> list[FieldWidget]:
    suggestions, labels = suggestions or {}, labels or {}
    out = []
    # wide widgets (multi-line text) get a row of their own
    narrow = [i for i in infos if widget_kind(i) != "lines"]
    wide = [i for i in infos if widget_kind(i) == "lines"]
    for start in range(0, len(narrow), per_row):
        with gr.Row():
            for info in narrow[start:start + per_row]:
                key = f"{section}.{info.name}" if section else info.name
                out.append(FieldWidget(key, info, make_widget(info, key, prefix, values.get(info.name, _UNSET),
                                                              suggestions.get(info.name),
                                                              label=labels.get(info.name, ""))))
    for info in wide:
        key = f"{section}.{info.name}" if section else info.name
        out.append(FieldWidget(key, info, make_widget(info, key, prefix, values.get(info.name, _UNSET),
                                                      label=labels.get(info.name, ""))))
    return out


# ---- values ↔ settings -------------------------------------------------------------------------------
def values_to_dict(fields: list[FieldWidget], values: Iterable[Any]) -> dict[str, Any]:
    """Widget values (same order as `fields`) → nested settings dict (`{"lora": {...}}` for sections)."""
    data: dict[str, Any] = {}
    for f, value in zip(fields, values):
        plain = from_widget_value(f.info, value)
        if f.section:
            data.setdefault(f.section, {})[f.info.name] = plain
        else:
            data[f.info.name] = plain
    return data


def dict_to_values(fields: list[FieldWidget], data: dict[str, Any], *, keep: list[Any] | None = None) -> list[Any]:
    """A settings dict → widget values, in `fields` order. Settings missing from `data` take `keep[i]` (the
    current value) when given, else the default."""
    out = []
    for i, f in enumerate(fields):
        table = data.get(f.section, {}) if f.section else data
        if isinstance(table, dict) and f.info.name in table:
            out.append(to_widget_value(f.info, table[f.info.name]))
        elif keep is not None:
            out.append(keep[i])
        else:
            out.append(to_widget_value(f.info, f.info.default))
    return out


def describe_error(fields: list[FieldWidget], error: Exception) -> str:
    """The error message with the widget's label in front when it names a setting."""
    text = str(error)
    head = text.split(":", 1)[0].strip().strip("'")
    for f in fields:
        if head == f.key or head == f.info.name:
            return f"{label_for(f.info)} ({f.key}): {text.split(':', 1)[1].strip()}"
    return text


def settings_from_values(cls: type[ConfigBase], fields: list[FieldWidget], values: Iterable[Any],
                         extra: dict[str, Any] | None = None) -> Any:
    """Widget values → validated settings object. UserError messages name the widget's label."""
    data = values_to_dict(fields, values)
    for key, value in (extra or {}).items():
        data[key] = value
    try:
        return cls.from_dict(data)
    except UserError as e:
        raise UserError(describe_error(fields, e)) from None
