"""Stand-in for `modules.options`: `OptionInfo`, `options_section` and the `Options` store behind `shared.opts`.

Kept from A1111 (a1111-host.md §2): options are read as attributes (`opts.key`, falling back to the default of
a registered option), `opts.data` is the plain dict of values, `set()` runs the option's `onchange` when the
value changes, `add_option()` registers an extension's option, the `.info()/.link()/.needs_*()` helpers chain.
"""

import json

_OWN = ("data", "data_labels", "restricted_opts", "typemap")


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 refresh=None, comment_before="", comment_after="", infotext=None, restrict_api=False,
                 category_id=None):
        self.default, self.label, self.section, self.category_id = default, label, section, category_id
        self.component, self.component_args, self.onchange, self.refresh = component, component_args, onchange, \
            refresh
        self.comment_before, self.comment_after = comment_before, comment_after
        self.infotext, self.restrict_api, self.do_not_save = infotext, restrict_api, False

    def _after(self, text):
        self.comment_after += text
        return self

    def info(self, info):
        return self._after(f"<span class='info'>({info})</span>")

    def html(self, html):
        return self._after(html)

    def needs_restart(self):
        return self._after(" <span class='info'>(requires restart)</span>")

    def needs_reload_ui(self):
        return self._after(" <span class='info'>(requires Reload UI)</span>")

    def link(self, label, url):
        self.comment_before = f"{self.comment_before}[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label, js_func):
        return self


def options_section(section_identifier, options_dict):
    """Tag every option of the dict with its section: (id, label) or (id, label, category)."""
    section, category = tuple(section_identifier[:2]), (section_identifier[2:] or (None,))[0]
    for info in options_dict.values():
        info.section = section
        if category is not None:
            info.category_id = category
    return options_dict


class Options:
    typemap = {int: float}

    def __init__(self, data_labels, restricted_opts=None):
        self.data_labels = data_labels
        self.data = {key: info.default for key, info in data_labels.items() if not info.do_not_save}
        self.restricted_opts = restricted_opts or set()

    def __getattr__(self, name):
        if name in _OWN:
            raise AttributeError(name)
        if name in self.data:
            return self.data[name]
        if name in self.data_labels:
            return self.data_labels[name].default
        return super().__getattribute__(name)

    def __setattr__(self, name, value):
        if name not in _OWN and (name in self.data or name in self.data_labels):
            self.data[name] = value
        else:
            super().__setattr__(name, value)

    def set(self, key, value, is_api=False, run_callbacks=True):
        if self.data.get(key) == value:
            return False
        self.data[key] = value
        info = self.data_labels.get(key)
        if run_callbacks and info is not None and info.onchange is not None:
            info.onchange()
        return True

    def get_default(self, key):
        info = self.data_labels.get(key)
        return info.default if info is not None else None

    def add_option(self, key, info):
        self.data_labels[key] = info
        if not info.do_not_save:
            self.data.setdefault(key, info.default)

    def save(self, filename):
        with open(filename, "w", encoding="utf8") as fh:
            json.dump(self.data, fh, indent=4)
