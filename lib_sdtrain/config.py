"""Versioned configuration dataclasses: one field = one setting, with its help text.

A setting is declared once, with `setting(default, help, ...)`, and that one declaration becomes the CLI
flag, the UI widget's label and range, the saved TOML/JSON value and the metadata written into output files
(peft's config style plus OneTrainer's versioned migrations).

Files carry a `version`; `MIGRATIONS[kind][n]` turns a version-n dict into version n+1, so configs saved by an
older Training Lab keep loading. TOML is read with `tomllib` (3.11+) or `tomli` (3.10, A1111's Python) and
written with `tomli_w` when installed, else by a small writer for the flat tables we produce.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import UserError

T = TypeVar("T", bound="ConfigBase")

_NONE = type(None)


def setting(
    default: Any,
    help: str,
    *,
    choices: list[Any] | tuple[Any, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    step: float | None = None,
    group: str = "",
    flag: str | None = None,
    advanced: bool = False,
    normalize: Callable[[Any], Any] | None = None,
) -> Any:
    """Declare one setting. `flag` overrides the CLI flag name (default: `--field-name`). `normalize` maps an
    accepted spelling to the value stored (e.g. A1111's "DDIM" to "ddim") before the choices are checked, and
    raises UserError for a value it refuses (its message then replaces the generic one)."""
    meta = {
        "help": help,
        "choices": list(choices) if choices is not None else None,
        "minimum": minimum,
        "maximum": maximum,
        "step": step,
        "group": group,
        "flag": flag,
        "advanced": advanced,
        "normalize": normalize,
    }
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SettingInfo:
    """What the CLI and the UI need to know about one setting."""

    name: str
    type: Any            # the resolved annotation, e.g. int, float, str, bool, list[str], int | None
    default: Any
    help: str
    choices: list[Any] | None
    minimum: float | None
    maximum: float | None
    step: float | None
    group: str
    flag: str
    advanced: bool
    normalize: Callable[[Any], Any] | None = None

    @property
    def base_type(self) -> Any:
        """The annotation without `| None`."""
        return _strip_optional(self.type)[0]

    @property
    def optional(self) -> bool:
        return _strip_optional(self.type)[1]


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if args and _NONE in args and (typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None))):
        rest = [a for a in args if a is not _NONE]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return tp, False


class ConfigBase:
    """Mixin for setting dataclasses: listing, validation, dict round trip and CLI flags."""

    KIND: typing.ClassVar[str] = "config"
    VERSION: typing.ClassVar[int] = 1

    # ---- introspection -------------------------------------------------------------------------
    @classmethod
    def settings(cls) -> list[SettingInfo]:
        hints = typing.get_type_hints(cls)
        out = []
        for f in fields(cls):  # type: ignore[arg-type]
            if is_dataclass(hints[f.name]):
                continue
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            m = f.metadata
            out.append(
                SettingInfo(
                    name=f.name,
                    type=hints[f.name],
                    default=default,
                    help=m.get("help", ""),
                    choices=m.get("choices"),
                    minimum=m.get("minimum"),
                    maximum=m.get("maximum"),
                    step=m.get("step"),
                    group=m.get("group", ""),
                    flag=m.get("flag") or "--" + f.name.replace("_", "-"),
                    advanced=m.get("advanced", False),
                    normalize=m.get("normalize"),
                )
            )
        return out

    @classmethod
    def sections(cls) -> dict[str, type[ConfigBase]]:
        """Nested setting groups (fields whose type is itself a ConfigBase dataclass)."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in fields(cls) if is_dataclass(hints[f.name])}  # type: ignore[arg-type]

    # ---- dict round trip -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, ConfigBase) else _plain(value)
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
        """Build and validate from plain data; unknown keys and bad values raise `UserError`."""
        if not isinstance(data, dict):
            raise UserError(f"{where or cls.KIND}: expected a table of settings, got {type(data).__name__}")
        known = {s.name: s for s in cls.settings()}
        sections = cls.sections()
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            path = f"{where}.{key}" if where else key
            if name in sections:
                kwargs[name] = sections[name].from_dict(value, where=path)
            elif name in known:
                kwargs[name] = coerce(known[name], value, path)
            elif name == "version" and not where:
                migrate(cls, {"version": value})   # a newer or malformed version is refused, as a config file's is
                continue
            else:
                inside = [f"{path[:-len(key)]}{sec}.{name}" for sec, sub in sections.items()
                          if name in {s.name for s in sub.settings()}]     # a section's setting given at the top
                hint = inside[0] if len(inside) == 1 else _close_match(name, list(known) + list(sections))
                raise UserError(f"unknown setting '{path}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        obj = cls(**kwargs)  # type: ignore[call-arg]
        obj.validate()
        return obj

    def replace(self: T, **changes: Any) -> T:
        obj = dataclasses.replace(self, **changes)  # type: ignore[type-var]
        obj.validate()
        return obj

    def validate(self) -> None:
        """Check ranges and choices, and store the normalized form of settings that have one. Subclasses add
        cross-field checks (and call super)."""
        for s in self.settings():
            value = coerce(s, getattr(self, s.name), s.name)
            if s.normalize is not None and value != getattr(self, s.name):
                object.__setattr__(self, s.name, value)     # e.g. "DDIM" given to the constructor: "ddim"
        for name in self.sections():
            getattr(self, name).validate()


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


def _close_match(name: str, options: list[str]) -> str | None:
    import difflib

    hits = difflib.get_close_matches(name, options, n=1)
    return hits[0] if hits else None


# The longest text one setting holds (a prompt, a caption prefix, a path). Far above any real use; a 20 MB caption
# prefix sent to the API was accepted and its job then spent minutes on it, deaf to Stop, with later jobs waiting.
MAX_TEXT = 100_000

# The largest value of an integer setting that declares no maximum of its own (epochs, steps, accumulation, save and
# sample intervals, keep_tokens, ...): no run counts to a billion (3 years at 10 steps a second). JSON's 1e300 is an
# integer to Python; 1e300 epochs ran with an ETA of 10^290 hours, and an integer of 400 digits was a traceback.
MAX_COUNT = 1_000_000_000


def coerce(info: SettingInfo, value: Any, where: str) -> Any:
    """Convert `value` to the setting's type and check its range; raise UserError if it does not fit."""
    base, optional = info.base_type, info.optional
    typed = value                 # as given, for messages: a whole number stays one, 1e20 stays 1e+20
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise UserError(f"{where}: a value is required")
    try:
        if base is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    value = True
                elif low in ("0", "false", "no", "off"):
                    value = False
                else:
                    raise ValueError(value)
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            value = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            try:
                value = float(value)
            except OverflowError:        # a JSON or TOML integer past 1.8e308: a traceback before
                raise UserError(f"{where}: {_shown(value)} is not a finite number") from None
            if not math.isfinite(value):
                raise UserError(f"{where}: {value} is not a finite number")
        elif base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            value = str(value)
            if len(value) > MAX_TEXT:
                raise UserError(f"{where}: {len(value):,} characters; a setting's text is at most {MAX_TEXT:,} "
                                "(CLIP reads 75 tokens a chunk)")
        elif typing.get_origin(base) is list:
            (item,) = typing.get_args(base) or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            # each item by the rules of a single setting of its type, with the setting's range: not item(v), which
            # made None the prompt "None", True the seed 1, 1.5 the seed 1 and "nan" a weight
            one = dataclasses.replace(info, type=item, choices=None, normalize=None)
            value = [coerce(one, v, f"{where}[{i}]") for i, v in enumerate(value)]
    except (TypeError, ValueError):
        raise UserError(f"{where}: {value!r} is not a valid {getattr(base, '__name__', str(base))}") from None
    if info.normalize is not None:
        try:
            value = info.normalize(value)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    if info.choices is not None and value not in info.choices:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, info.choices))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        maximum = info.maximum
        if maximum is None and base is int:
            maximum = MAX_COUNT
        if info.minimum is not None and value < info.minimum:
            raise UserError(f"{where}: {_shown(value, typed)} is below the minimum {info.minimum}")
        if maximum is not None and value > maximum:
            raise UserError(f"{where}: {_shown(value, typed)} is above the maximum {maximum}")
    return value


MAX_SHOWN_DIGITS = 30


def _shown(value: int | float, typed: Any = None) -> str:
    """A number for a message, in the form it was given (`typed`): a whole number as one ("100000000000000000000 is
    above the maximum 150", not "1e+20"), or, past 30 digits, how long it is; a float as %g past 1e15 (1e300 given
    as a seed is '1e+300', not 301 digits), and 2000.0 from a UI number box as the setting's 2000."""
    if isinstance(typed, float) and abs(typed) >= 1e15:
        return f"{typed:.3g}"
    if isinstance(typed, int) and not isinstance(typed, bool):
        value = typed
    if isinstance(value, int):
        if abs(value) < 10 ** MAX_SHOWN_DIGITS:
            return str(value)
        digits = len(str(abs(value))) if abs(value).bit_length() < 10_000 else int(math.log10(abs(value))) + 1
        return f"a {'negative ' if value < 0 else ''}number of {digits} digits"
    return f"{value:.3g}" if abs(value) >= 1e15 else str(value)


# ---- migrations ------------------------------------------------------------------------------------
# MIGRATIONS[kind][n] upgrades a version-n dict to version n+1. Register with @migration("train", 1).
MIGRATIONS: dict[str, dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}


def migration(kind: str, from_version: int):
    def register(fn: Callable[[dict[str, Any]], dict[str, Any]]):
        MIGRATIONS.setdefault(kind, {})[from_version] = fn
        return fn

    return register


def migrate(cls: type[ConfigBase], data: dict[str, Any]) -> dict[str, Any]:
    version = data.get("version", 1)
    if not isinstance(version, int) or version < 1:
        raise UserError(f"config version {version!r} is not valid")
    if version > cls.VERSION:
        raise UserError(
            f"this {cls.KIND} config was written by a newer Training Lab (version {version}, we read up to "
            f"{cls.VERSION}); update the extension"
        )
    steps = MIGRATIONS.get(cls.KIND, {})
    data = dict(data)
    while version < cls.VERSION:
        if version not in steps:
            raise UserError(f"no migration from {cls.KIND} config version {version}")
        data = steps[version](data)
        version += 1
    data["version"] = cls.VERSION
    return data


# ---- files -----------------------------------------------------------------------------------------
def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # A1111 runs Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise UserError("reading TOML on Python 3.10 needs the 'tomli' package (pip install tomli)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"TOML syntax error: {e}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON strings are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def toml_dumps(data: dict[str, Any]) -> str:
    """TOML text for a dict of scalars, lists and one level of sub-tables; None values are left out."""
    try:
        import tomli_w

        return tomli_w.dumps(_drop_none(data))
    except ImportError:
        pass
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None)
    return "\n".join(lines) + "\n"


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    return data


def config_to_text(cfg: ConfigBase, fmt: str = "toml") -> str:
    data = {"version": cfg.VERSION, **cfg.to_dict()}
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return toml_dumps(data)


def config_from_text(cls: type[T], text: str, fmt: str = "toml") -> T:
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"JSON syntax error: {e}") from None
    else:
        data = _toml_loads(text)
    if not isinstance(data, dict):
        raise UserError("a config file must hold a table of settings")
    return cls.from_dict(migrate(cls, data))


def _fmt_for(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix == ".toml":
        return "toml"
    raise UserError(f"{path}: config files must end in .toml or .json")


def save_config(cfg: ConfigBase, path: str | Path) -> Path:
    path = Path(path)
    text = config_to_text(cfg, _fmt_for(path))
    from .formats.files import atomic_write_text

    atomic_write_text(path, text)
    return path


def load_config(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    fmt = _fmt_for(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    try:
        return config_from_text(cls, text, fmt)
    except UserError as e:
        if str(path) in str(e):
            raise
        raise UserError(f"{path}: {e}") from None


# ---- CLI flags -------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, cls: type[ConfigBase], *, section: str = "") -> None:
    """Add one flag per setting (defaults left as None so that only given flags override a file).

    Settings of nested sections keep their own flag (`--network-dim`) unless another setting already uses
    it; then the flag is prefixed with the section name (`--embedding-dropout`).
    """
    used = {s for a in parser._actions for s in a.option_strings}
    group = parser.add_argument_group(section or cls.KIND)
    for s in cls.settings():
        dest = f"{section}.{s.name}" if section else s.name
        flag = s.flag
        if flag in used:
            flag = f"--{section}-{s.name}".replace("_", "-") if section else flag
        used.add(flag)
        help_text = s.help + (f" (default: {s.default})" if s.default not in (None, "", []) else "")
        if s.choices:
            help_text += f" [{' | '.join(map(str, s.choices))}]"
        if s.base_type is bool:
            group.add_argument(flag, dest=dest, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            group.add_argument(flag, dest=dest, default=None, metavar=s.name.upper(), help=help_text)
    for name, sub in cls.sections().items():
        add_arguments(parser, sub, section=name)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user actually gave, as a nested dict ready for `merge_overrides`."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if value is None or dest.startswith("_"):
            continue
        if "." in dest:
            section, name = dest.split(".", 1)
            out.setdefault(section, {})[name] = value
        else:
            out[dest] = value
    return out


def merge_overrides(cfg: T, overrides: dict[str, Any]) -> T:
    """A new config with `overrides` applied on top of `cfg` (validated)."""
    data = cfg.to_dict()
    known = {s.name for s in cfg.settings()} | set(cfg.sections())
    for key, value in overrides.items():
        if key not in known:
            continue
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return type(cfg).from_dict(data)
