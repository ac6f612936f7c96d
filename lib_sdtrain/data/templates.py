"""Prompt templates, as A1111's embedding and hypernetwork trainers use them.

A1111 builds each training picture's prompt from a template file (its `textual_inversion_templates` folder):
a random line of the file, with `[name]` replaced by the embedding's word (a hypernetwork's name) and
`[filewords]` by the picture's caption (its sidecar text, or words from its file name). A folder without any
captions therefore trains with a template such as "subject": every prompt names the new word.

Built-in templates (texts written for this project; A1111's own files are offered by the host when the tab
runs inside A1111): `subject`, `subject_filewords`, `style`, `style_filewords`. A template setting is one of
those names or the path of a `.txt` file with one prompt per line (empty lines are skipped).
Caption options (shuffle, tag dropout, prefix/suffix, caption dropout ...) act on the `[filewords]` text only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

NAME, FILEWORDS = "[name]", "[filewords]"
MAX_TEMPLATE_BYTES = 1 << 20

_SUBJECT = (
    "a picture of [name]",
    "a clear picture of [name]",
    "an image showing [name]",
    "[name], seen up close",
    "[name] in the middle of the frame",
    "a small [name]",
    "a large [name]",
    "one [name]",
    "a bright picture of [name]",
    "a dark picture of [name]",
    "a simple picture of [name]",
    "a detailed picture of [name]",
    "a drawing of [name]",
    "a render of [name]",
    "[name] on a plain background",
    "a snapshot of [name]",
)
_STYLE = (
    "a picture in the style of [name]",
    "an image made in [name] style",
    "artwork, [name] style",
    "a drawing in the manner of [name]",
    "a scene drawn in [name] style",
    "an illustration in the style of [name]",
    "a small picture in [name] style",
    "a large picture in [name] style",
    "a bright picture in [name] style",
    "a dark picture in [name] style",
    "a simple design in [name] style",
    "a detailed design in [name] style",
)

BUILTIN: dict[str, tuple[str, ...]] = {
    "subject": _SUBJECT,
    "subject_filewords": tuple(f"{line}, {FILEWORDS}" for line in _SUBJECT),
    "style": _STYLE,
    "style_filewords": tuple(f"{line}, {FILEWORDS}" for line in _STYLE),
}
BUILTIN_HELP = {
    "subject": "the new word names a thing; captions are not used",
    "subject_filewords": "the new word names a thing; each picture's caption is added",
    "style": "the new word names a style; captions are not used",
    "style_filewords": "the new word names a style; each picture's caption is added",
}


@dataclass(frozen=True)
class PromptTemplate:
    """A template's lines and where they came from."""

    source: str                  # a built-in name or the file's path
    lines: tuple[str, ...]

    @property
    def uses_name(self) -> bool:
        return any(NAME in line for line in self.lines)

    @property
    def uses_filewords(self) -> bool:
        return any(FILEWORDS in line for line in self.lines)

    def prompt(self, rng: random.Random, name: str, filewords: str) -> str:
        """One prompt: a random line with [name] and [filewords] filled in (A1111's `create_text`)."""
        text = rng.choice(self.lines).replace(FILEWORDS, filewords).replace(NAME, name)
        return text.strip().rstrip(",").strip()

    def prompts(self, name: str, captions: list[str]) -> list[str]:
        """Every prompt the template can give for these captions (for checks such as 'the token appears')."""
        out = []
        for line in self.lines:
            line = line.replace(NAME, name)
            out += [line.replace(FILEWORDS, c) for c in captions] if FILEWORDS in line and captions else [line]
        return out


def load_template(spec: str) -> PromptTemplate | None:
    """The template a setting names: "" → None, a built-in name, or a `.txt` file (UserError if unusable)."""
    spec = (spec or "").strip()
    if not spec:
        return None
    if spec in BUILTIN:
        return PromptTemplate(spec, BUILTIN[spec])
    path = Path(spec).expanduser()
    if not path.suffix and not path.exists():
        raise UserError(f"prompt template {spec!r} is neither a built-in template ({', '.join(BUILTIN)}) nor a "
                        "template file")
    if not path.is_file():
        raise UserError(f"prompt template file not found: {path}")
    try:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise UserError(f"prompt template {path} is larger than 1 MB; a template holds one prompt per line")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt template {path} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read prompt template {path}: {e.strerror or e}") from None
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        raise UserError(f"prompt template {path} has no lines; write one prompt per line, with [name] where the "
                        "new word goes and [filewords] where the caption goes")
    return PromptTemplate(str(path), lines)


def template_files(folder: str | Path) -> list[Path]:
    """The `.txt` template files of a folder (A1111's `textual_inversion_templates`), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".txt"),
                  key=lambda p: p.name.lower())
