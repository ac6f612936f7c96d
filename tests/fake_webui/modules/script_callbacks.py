"""modules.script_callbacks: registration at import time, called by the WebUI at the matching moment."""

from collections import defaultdict, namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map = defaultdict(list)


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def add_callback(callbacks, fun, *, name=None, category="unknown"):
    callbacks.append(ScriptCallback("fake", fun, name or getattr(fun, "__name__", "?")))


def _call(category, *args):
    return [c.callback(*args) for c in callback_map[category]]


def on_app_started(callback, *, name=None):
    add_callback(callback_map["callbacks_app_started"], callback, name=name)


def on_before_reload(callback, *, name=None):
    add_callback(callback_map["callbacks_on_reload"], callback, name=name)


def on_model_loaded(callback, *, name=None):
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name)


def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name)


def on_ui_train_tabs(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_train_tabs"], callback, name=name)


def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name)


def on_before_ui(callback, *, name=None):
    add_callback(callback_map["callbacks_before_ui"], callback, name=name)


def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name)


def app_started_callback(demo, app):
    _call("callbacks_app_started", demo, app)


def app_reload_callback():
    _call("callbacks_on_reload")


def model_loaded_callback(sd_model):
    _call("callbacks_model_loaded", sd_model)


def ui_tabs_callback():
    res = []
    for r in _call("callbacks_ui_tabs"):
        res += r or []
    return res


def ui_settings_callback():
    _call("callbacks_ui_settings")


def before_ui_callback():
    _call("callbacks_before_ui")


def script_unloaded_callback():
    _call("callbacks_script_unloaded")
