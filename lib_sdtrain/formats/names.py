"""File names the user chooses (output names, embedding tokens, run names): one check for every entry point.

A name becomes a file in a folder the user owns (models/Lora, embeddings/ ...) and a folder under runs/, so it
must be a single path component every common file system accepts: no control characters (newline, NUL ...),
no path separators or characters Windows refuses, not "." or "..", no leading dot (a hidden file the WebUI
does not list), no trailing dot or space (Windows drops them), not a reserved DOS device name, and at most
`MAX_NAME_BYTES` bytes of UTF-8 so that `NAME-step00000120.safetensors` and our temporary files still fit
in the usual 255-byte limit.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from ..errors import UserError

MAX_NAME_BYTES = 150
FORBIDDEN_CHARS = '/\\:*?"<>|'
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


# Unicode's explicit text-direction marks, embeddings, overrides and isolates. Other format characters (the zero-width
# joiners of emoji and of Persian or Indic names) are kept.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def name_problem(name: object) -> str | None:
    """Why `name` cannot be used as a file name, or None when it can."""
    if not isinstance(name, str):
        return "it is not text"
    if not name or not name.strip():
        return "it is empty"
    for c in name:
        if c == "\x00":
            return "it contains a NUL byte"
        if unicodedata.category(c) in ("Cc", "Cs") or c in "\u2028\u2029":
            return f"it contains the control character {c!r}"
        if c in BIDI_CONTROLS:   # "x\u202egnp.exe" shows as "xexe.png": a name that lies about itself
            return f"it contains the text-direction control {c!r}, which makes a file name display other than it is"
        if c in FORBIDDEN_CHARS:
            return f"it contains {c!r} (path separators and {FORBIDDEN_CHARS} are not allowed)"
    if name in (".", ".."):
        return "it is a folder reference"
    if name.startswith("."):
        return "it starts with a dot (a hidden file)"
    if name[-1] in ". " or name[0] == " ":
        return "it starts or ends with a space, or ends with a dot"
    if name.split(".")[0].lower() in _RESERVED:
        return "it is a reserved device name on Windows"
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        return f"it is {size} bytes long (at most {MAX_NAME_BYTES} bytes of UTF-8)"
    return None


MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")   # model files (convert lists them too)


def unsupported_model_file(path: Path) -> UserError:
    """The one refusal of a model file whose extension no loader reads."""
    return UserError(f"{path.name}: unsupported model file type (expected {', '.join(MODEL_SUFFIXES[:-1])} or "
                     f"{MODEL_SUFFIXES[-1]})")


def drop_model_suffix(name: object) -> object:
    """"x.safetensors" -> "x": the file extension is added when a file is written, so a name typed with one
    would otherwise give "x.safetensors.safetensors". Anything else comes back unchanged (checked later)."""
    if isinstance(name, str):
        for suffix in MODEL_SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                return name[:-len(suffix)]
    return name


def check_name(name: object, what: str = "output name") -> str:
    """`name` unchanged when it is a valid file name; else UserError with the reason, e.g.
    "output name 'a\\nb' cannot be used: it contains the control character '\\n'"."""
    problem = name_problem(name)
    if problem:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:57]) + "..."
        raise UserError(f"{what} {shown} cannot be used: {problem}")
    return name  # type: ignore[return-value]
