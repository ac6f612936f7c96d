"""Dataset folder → `ImageRecord`s: which pictures, which captions, how many repeats, and what is wrong with them.

Folder conventions understood (style.md §3 `data/scan.py`; anchors.md §3 "Repeats and steps"):

- kohya's DreamBooth layout: a parent folder holding `N_class tokens` folders (`10_sks dog` = 10 repeats, class
  tokens "sks dog"; sd-scripts `config_util.generate_dreambooth_subsets_config_by_subdirs` splits the name on
  "_" and re-joins the rest with "_"). Unnumbered folders are ignored there; we do the same but say so, except
  for a few well-known container names (`img`, `reg`, `class`, ...) which we look into.
- One `N_name` folder given directly, or a flat folder of pictures (A1111's textual-inversion layout, repeats 1).
- Regularization (class) pictures: a separate folder (`reg_path`), or a `reg`/`regularization`/`class` folder
  inside the dataset.

Captions, in order: a sidecar next to the picture (`name.txt`, or another extension such as `.caption`), then,
in plain folders, the file name with A1111's rule, then the folder's class tokens (kohya's fallback).

Every picture is opened read-only and checked; nothing in the dataset is ever written, moved or deleted here.
Opening is bounded: the pixel count from the header is checked before anything is decoded, and the file is
`verify()`-ed and then re-opened to decode it fully (PIL's documented pattern: a verified image cannot be used).
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import struct
import threading
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError
from ..formats.names import BIDI_CONTROLS

# kohya's IMAGE_EXTENSIONS (train_util.py), plus formats PIL reads that users drop into datasets anyway.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".jxl")
# Files that may sit beside pictures and are not worth a mention (latent caches, kohya metadata, our own sheets).
QUIET_EXTENSIONS: tuple[str, ...] = (".txt", ".caption", ".npz", ".json", ".toml", ".ini", ".db", ".md")
# Caption extensions in common use (A1111 and kohya's default .txt; sd-scripts' own default .caption): a picture
# with one of these but not the chosen one is named, as its caption would otherwise be passed over in silence.
CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")
REMOVED_DIR = "_removed"          # where `dedupe` moves pictures when the user asks; never scanned
REG_FOLDER_NAMES = frozenset({"reg", "regs", "regularization", "regularisation", "reg_images", "regularization_images",
                              "class", "classes", "class_images", "class_data"})
INSTANCE_FOLDER_NAMES = frozenset({"img", "imgs", "image", "images", "instance", "instances", "instance_images",
                                   "train", "training", "dataset"})

# What a picture's content says it is → the extensions that agree (for the "wrong extension" check).
FORMAT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "PNG": (".png",), "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"), "WEBP": (".webp",), "BMP": (".bmp",),
    "GIF": (".gif",), "TIFF": (".tif", ".tiff"), "MPO": (".jpg", ".jpeg"), "AVIF": (".avif",), "JXL": (".jxl",),
}

# A1111 modules/textual_inversion/dataset.py: `re_numbers_at_start = re.compile(r"^[-\d]+\s*")`. Note that it
# strips digits and hyphens, then spaces: "00012-a cat" → "a cat", but "1_cat" → "_cat" (underscores stay).
A1111_NUMBERS_AT_START = re.compile(r"^[-\d]+\s*")
KOHYA_FOLDER = re.compile(r"^(\d+)_(.*)$", re.S)

EXIF_TRANSPOSED = (5, 6, 7, 8)   # EXIF orientations that swap width and height (90° turns)
HARD_MIN_SIDE = 64            # below one 64-px bucket step there is no bucket to put the picture in
DEFAULT_MIN_SIDE = 256        # kohya's default min_bucket_reso: smaller pictures get upscaled (soft results)

# Problem registry: code → severity. "error" = the picture cannot be used as it is; "warning" = usable, but it
# will be converted or may teach something unintended.
PROBLEM_SEVERITY: dict[str, str] = {
    "empty_file": "error",
    "unreadable": "error",
    "truncated": "error",
    "huge": "error",
    "too_small": "error",
    "caption_encoding": "error",
    "small": "warning",
    "alpha": "warning",
    "cmyk": "warning",
    "high_bit_depth": "warning",
    "animated": "warning",
    "wrong_extension": "warning",
    "grayscale": "warning",
    "exif_rotated": "warning",
    "empty_caption": "warning",
    "no_caption": "warning",
    "multiline_caption": "warning",
    "shared_caption": "warning",
    "long_caption": "warning",        # over the 225 tokens the text encoder reads: cut when training
    "huge_caption": "warning",        # over MAX_CAPTION_BYTES: the file is read only in part (never edited)
}


@dataclass(frozen=True)
class Problem:
    code: str          # a key of PROBLEM_SEVERITY
    message: str

    @property
    def severity(self) -> str:
        return PROBLEM_SEVERITY[self.code]

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "severity": self.severity, "message": self.message}


@dataclass
class PictureCheck:
    """What opening one file found (picklable: it travels back from worker processes)."""

    width: int = 0
    height: int = 0
    format: str = ""
    mode: str = ""
    frames: int = 1
    file_size: int = 0
    problems: list[Problem] = field(default_factory=list)
    fingerprint: Any = None                        # data.dedupe.Fingerprint
    stats: Any = None                              # data.features.PictureStats


@dataclass
class ImageRecord:
    """One picture of the dataset, as the rest of the core sees it.

    `width`/`height` are the upright size (EXIF orientation applied), as the training loader sees the picture.
    """

    path: Path
    width: int
    height: int
    caption: str                    # non-empty lines of the sidecar joined by "\n" (kohya's wildcard form)
    caption_source: str             # "sidecar" | "filename" | "folder" | "none"
    repeats: int
    concept: str                    # class tokens of the folder, else the folder's name
    folder: Path
    is_regularization: bool = False
    problems: list[Problem] = field(default_factory=list)
    format: str = ""
    mode: str = ""
    file_size: int = 0
    fingerprint: Any = None         # data.dedupe.Fingerprint (scan with fingerprint=True)
    stats: Any = None               # data.features.PictureStats (idem)
    mask: Path | None = None        # its loss mask file for masked_loss (OneTrainer's "-masklabel" sidecar, or
                                    # from a mask folder: data.masks.attach_mask_dir)

    @property
    def transparent(self) -> bool:
        """The scan found transparency in the picture (its "alpha" problem)."""
        return any(p.code == "alpha" for p in self.problems)

    @property
    def usable(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    @property
    def dir_name(self) -> str:
        """The folder's base name: kohya's key in `ss_tag_frequency` and `ss_dataset_dirs` ("10_sks dog")."""
        return self.folder.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "width": self.width, "height": self.height, "caption": self.caption,
            "caption_source": self.caption_source, "repeats": self.repeats, "concept": self.concept,
            "folder": str(self.folder), "is_regularization": self.is_regularization,
            "format": self.format, "mode": self.mode, "file_size": self.file_size,
            "problems": [p.to_dict() for p in self.problems], "mask": str(self.mask) if self.mask else "",
        }


@dataclass
class Subset:
    """One folder of pictures with its repeats and class tokens (kohya's DreamBoothSubset)."""

    folder: Path
    repeats: int
    class_tokens: str
    is_regularization: bool
    image_count: int = 0

    @property
    def concept(self) -> str:
        return self.class_tokens or self.folder.name


@dataclass
class DatasetReport:
    root: Path
    records: list[ImageRecord]
    subsets: list[Subset]
    skipped: list[tuple[Path, str]] = field(default_factory=list)   # files not taken, and why
    notes: list[str] = field(default_factory=list)                  # folder-level remarks

    @property
    def usable(self) -> list[ImageRecord]:
        return [r for r in self.records if r.usable]

    @property
    def instance(self) -> list[ImageRecord]:
        return [r for r in self.records if not r.is_regularization]

    @property
    def regularization(self) -> list[ImageRecord]:
        return [r for r in self.records if r.is_regularization]

    def name(self, path: str | Path) -> str:
        """How messages name a file of the dataset: relative to the dataset folder ("10_dog/a.png", as `dataset
        scan` lists it), so that two folders' pictures of the same file name are told apart; a file outside it (a
        --reg folder elsewhere) by its whole path. Control characters are escaped (`shown`): for display only."""
        return shown(relative_name(path, self.root))

    def skipped_summary(self) -> str:
        """One line on the pictures training leaves out ("2 of 10 pictures skipped ..."), or "" when none is."""
        left_out = [r for r in self.records if not r.usable]
        if not left_out:
            return ""
        reg = [r for r in left_out if r.is_regularization]
        of_reg = (f" ({len(reg)} of the {len(self.regularization)} regularization pictures)" if reg else "")
        return (f"{len(left_out)} of {len(self.records)} pictures skipped{of_reg}: they cannot be used as they are "
                "(each is listed above with its reason)")

    def counts(self) -> dict[str, int]:
        return {
            "pictures": len(self.records),
            "usable": len(self.usable),
            "errors": sum(1 for r in self.records if not r.usable),
            "warnings": sum(1 for r in self.records if r.usable and r.problems),
            "instance": len(self.instance),
            "regularization": len(self.regularization),
            "instance_with_repeats": sum(r.repeats for r in self.instance if r.usable),
            "mask_files": sum(1 for r in self.records if r.mask is not None),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "counts": self.counts(),
            "subsets": [{**asdict(s), "folder": str(s.folder), "concept": s.concept} for s in self.subsets],
            "records": [r.to_dict() for r in self.records],
            "skipped": [{"path": str(p), "reason": why} for p, why in self.skipped],
            "notes": list(self.notes),
        }


# Characters that would break a line of text shown to the user (a newline or carriage return in a file name ends
# the line or a table row; an escape sequence, a bidirectional control or a lone surrogate, a file name's
# undecodable byte, garbles or crashes a terminal): shown escaped, as Python's repr writes them. The same ones
# `formats.names.name_problem` refuses in a name we write: control characters, lone surrogates, the line and
# paragraph separators, and its text-direction controls (one set, `BIDI_CONTROLS`).
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
                         + "".join(sorted(BIDI_CONTROLS)) + "]")


def shown(text: str | Path) -> str:
    """`text` for one line of human-readable output (CLI tables and notes, the UI, a run's log): control
    characters escaped ("a\\nb.png" for a file name holding a newline). JSON output gives names exactly."""
    return _UNSHOWABLE.sub(lambda m: repr(m.group())[1:-1], str(text))


def shown_choices(values: Iterable[str]) -> list[tuple[str, str]]:
    """(label, value) for a picker of names: the label is the value `shown` (control characters escaped), the value
    the exact name. A label that another already is gets " (2)", " (3)", ...: gradio 3 tells choices apart by their
    labels, and a name holding a backslash and an n is shown as one holding a newline is."""
    out: list[tuple[str, str]] = []
    taken: set[str] = set()
    for value in values:
        label, n = shown(value), 1
        while label in taken:
            n += 1
            label = f"{shown(value)} ({n})"
        taken.add(label)
        out.append((label, value))
    return out


def relative_name(path: str | Path, root: str | Path) -> str:
    """`path` relative to `root` ("10_dog/a.png", with "/" as the Dataset tab writes it on every system), else
    the whole path."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ---- captions from names ---------------------------------------------------------------------------------
def filename_caption(stem: str, word_regex: str = "", join_string: str = " ") -> str:
    """A1111's caption for a picture without a sidecar (textual_inversion/dataset.py `PersonalizedBase`).

    Leading digits and hyphens plus the spaces after them are removed (`^[-\\d]+\\s*`); if the user set the
    "Filename word regex" option, the words it finds are joined with "Filename join string". A1111's defaults
    are "" (off) and " ".
    """
    text = A1111_NUMBERS_AT_START.sub("", stem)
    if word_regex:
        try:
            text = (join_string or "").join(re.findall(word_regex, text))
        except re.error as e:
            raise UserError(f"filename word regex {word_regex!r} is not valid: {e}") from None
    return text


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """`"10_sks dog"` → `(10, "sks dog")`; None for a folder without a repeat count (kohya ignores those)."""
    m = KOHYA_FOLDER.match(name)
    if not m:
        return None
    return int(m.group(1)), m.group(2)


def caption_path(image: Path, caption_ext: str = ".txt") -> Path:
    return image.with_name(image.stem + normalize_ext(caption_ext))


# Extensions a caption file may never have: writing a caption there would replace a picture or a model.
MODEL_EXTENSIONS: tuple[str, ...] = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".npz", ".npy", ".onnx",
                                     ".gguf", ".pkl", ".pickle")
FORBIDDEN_CAPTION_EXTENSIONS: frozenset[str] = frozenset(IMAGE_EXTENSIONS) | frozenset(MODEL_EXTENSIONS) | frozenset(
    e for exts in FORMAT_EXTENSIONS.values() for e in exts)


def normalize_ext(ext: str) -> str:
    """A caption extension with its dot (".txt"); UserError for one that is unusable or names a picture or model
    type (the caption editor would otherwise write text over a picture)."""
    ext = (ext or "").strip()
    bad = [c for c in ext if c in "/\\\x00" or ord(c) < 32]
    if not ext or ext in (".", "..") or bad or len(ext) > 32:
        raise UserError(f"caption extension {ext!r} is not valid (use e.g. .txt or .caption)")
    ext = ext if ext.startswith(".") else "." + ext
    if ext.lower() in FORBIDDEN_CAPTION_EXTENSIONS:
        raise UserError(f"caption extension {ext!r} is a picture or model file type: captions written with it "
                        "would replace those files (use .txt or .caption)")
    return ext


def _sidecar_candidates(image: Path, ext: str) -> list[Path]:
    # kohya also looks for the caption of the source picture of a face-crop ("name_x_y_w_h.png" → "name.txt");
    # see `read_caption` in sd-scripts train_util.py (a name with 5+ "_"-parts drops the last 4).
    out = [image.with_name(image.stem + ext)]
    parts = image.stem.split("_")
    if len(parts) >= 5:
        out.append(image.with_name("_".join(parts[:-4]) + ext))
    return out


def read_sidecar(path: Path, *, cap: bool = True) -> tuple[str, list[Problem]]:
    """Caption text of a sidecar: its non-empty lines, stripped, joined by "\\n" (kohya's wildcard form).

    kohya trains on the first line unless wildcards are on (`data.captions.process_caption` does that choice).
    `cap=False`: lines longer than the text encoder reads are kept whole (what a caption edit starts from);
    a file over MAX_CAPTION_BYTES is still read only in part, with its "huge_caption" problem.
    """
    from .caption_limit import MAX_CAPTION_BYTES, MAX_CAPTION_TOKENS, cap_caption_line

    problems: list[Problem] = []
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CAPTION_BYTES + 4)
            over_size = bool(fh.read(1)) or len(raw) > MAX_CAPTION_BYTES
    except OSError as e:
        return "", [Problem("caption_encoding", f"cannot read caption {path.name}: {e.strerror or e}")]
    # A byte-order mark says the encoding outright: UTF-16 (Windows Notepad's "Unicode") is read as such, never
    # guessed without one. The file is only read; an edit the user asks for writes it back as UTF-8.
    utf16 = raw[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
    if over_size and utf16:   # end on a whole 2-byte unit, and not on the first half of a surrogate pair
        raw = raw[:MAX_CAPTION_BYTES - MAX_CAPTION_BYTES % 2]
        last = raw[-2:] if raw[:2] == codecs.BOM_UTF16_BE else raw[-2:][::-1]
        if len(raw) > 2 and 0xD8 <= last[0] <= 0xDB:
            raw = raw[:-2]
    elif over_size:   # the read may have stopped inside a character: end at the last whole one
        raw = raw[:MAX_CAPTION_BYTES]
        for back in range(1, 4):
            if len(raw) >= back and raw[-back] & 0xC0 == 0xC0:   # a lead byte: keep it only if complete
                raw = raw[:-back] if back < (2 if raw[-back] < 0xE0 else 3 if raw[-back] < 0xF0 else 4) else raw
                break
            if len(raw) >= back and raw[-back] & 0x80 == 0:
                break
    try:
        text = raw.decode("utf-16" if utf16 else "utf-8-sig")   # a BOM would otherwise end up inside the first tag
    except UnicodeDecodeError:
        what = "valid UTF-16 text, although it starts with UTF-16's byte-order mark" if utf16 else "UTF-8 text"
        return "", [Problem("caption_encoding",
                            f"caption {path.name} is not {what} (kohya's sd-scripts stops on it); re-save it as UTF-8")]
    if "\x00" in text:   # UTF-16 without its byte-order mark decodes as UTF-8 with a NUL after every letter of ASCII
        return "", [Problem("caption_encoding",
                            f"caption {path.name} holds NUL bytes: it is UTF-16 without a byte-order mark, or binary, "
                            "not text the text encoder can read (kohya would train on the garbled letters); re-save it "
                            "as UTF-8")]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cut = []
    for i, line in enumerate(lines if cap else ()):
        capped, tokens = cap_caption_line(line)
        if tokens is not None:
            lines[i] = capped
            cut.append(tokens)
    if over_size or cut:
        size = f"over {MAX_CAPTION_BYTES // 1024} KiB" if over_size else f"over {MAX_CAPTION_TOKENS} tokens"
        problems.append(Problem("huge_caption" if over_size else "long_caption",
                                f"caption {path.name} is too long ({size}): only the first {MAX_CAPTION_TOKENS} "
                                f"tokens{' of each line' if len(lines) > 1 else ''} are used (what the text "
                                "encoder reads in 3 chunks of 75)"))
    if not lines:
        problems.append(Problem("empty_caption",
                                f"caption {path.name} is empty: the picture trains unconditioned (kohya refuses empty caption files)"))
    elif len(lines) > 1:
        problems.append(Problem("multiline_caption",
                                f"caption {path.name} has {len(lines)} lines: only the first is used unless wildcards are on"))
    return "\n".join(lines), problems


# ---- opening pictures ------------------------------------------------------------------------------------
def _png_bit_depth(path: Path) -> int | None:
    # PIL opens 16-bit RGB(A) PNGs as 8-bit "RGB"/"RGBA" and silently drops the low byte; IHDR tells the truth.
    try:
        with open(path, "rb") as fh:
            head = fh.read(26)
    except OSError:
        return None
    if len(head) >= 25 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def _tail_looks_truncated(path: Path, fmt: str) -> bool:
    # Only used when something in this process set ImageFile.LOAD_TRUNCATED_IMAGES (PIL then pads truncated
    # files with grey instead of raising). The end-marker test can flag files with data appended after the end.
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            tail = fh.read()
    except OSError:
        return False
    if fmt in ("JPEG", "MPO"):
        return b"\xff\xd9" not in tail
    if fmt == "PNG":
        return b"IEND" not in tail
    return False


@contextlib.contextmanager
def _quiet_bomb_warning():
    """Silence PIL's DecompressionBombWarning (we report such files ourselves). `warnings.catch_warnings` swaps
    process-global state, so it is only used on the main thread; elsewhere the warning is merely printed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def check_picture(path: str | Path, *, max_pixels: int | None = None, min_side: int = DEFAULT_MIN_SIDE,
                  fingerprint: bool = False) -> PictureCheck:
    """Open one picture read-only and list what is wrong with it.

    Args:
        path: the picture.
        max_pixels: refuse to decode above this many pixels (default: PIL's `Image.MAX_IMAGE_PIXELS`, the
            decompression-bomb limit, about 89 MP). The header is read first, so a bomb is never decoded.
        min_side: a shorter side below this is a warning ("small"); below 64 px it is an error.
        fingerprint: also compute perceptual hashes and colour statistics (for dedupe and features), from the
            same decode.
    Returns:
        a `PictureCheck`; `problems` holds one entry per finding, each with a severity.
    """
    from PIL import Image, ImageFile, UnidentifiedImageError

    path = Path(path)
    out = PictureCheck()
    add = lambda code, msg: out.problems.append(Problem(code, msg))  # noqa: E731
    limit = int(max_pixels if max_pixels is not None else (Image.MAX_IMAGE_PIXELS or 89_478_485))
    try:
        size = path.stat().st_size
    except OSError as e:
        add("unreadable", f"cannot read the file: {e.strerror or e}")
        return out
    out.file_size = size
    if size == 0:
        add("empty_file", "the file is empty (0 bytes)")
        return out

    try:
        with _quiet_bomb_warning():   # we apply our own limit below
            with Image.open(path) as im:   # reads the header only
                out.width, out.height = im.size
                out.format = im.format or ""
                out.mode = im.mode
                if out.width * out.height > limit:
                    add("huge", f"{out.width}×{out.height} is {out.width * out.height / 1e6:.0f} MP, above the "
                                f"{limit / 1e6:.0f} MP safety limit (decompression-bomb guard); downscale it first")
                    return out
                im.verify()  # structure and checksums (PNG CRCs); must come first, and the object is spent after
    except Image.DecompressionBombError as e:
        add("huge", f"refused by PIL's decompression-bomb guard: {e}")
        return out
    except UnidentifiedImageError:
        add("unreadable", "not a picture PIL can read")
        return out
    except (OSError, SyntaxError, ValueError, EOFError, RuntimeError, struct.error) as e:
        code = "truncated" if "truncat" in str(e).lower() else "unreadable"
        add(code, f"{'the file is cut short' if code == 'truncated' else 'damaged file'}: {e}")
        return out

    try:
        with _quiet_bomb_warning():
            with Image.open(path) as im:
                out.frames = int(getattr(im, "n_frames", 1) or 1)
                info = dict(im.info)
                try:
                    orientation = int(im.getexif().get(0x0112, 1) or 1)
                except Exception:  # noqa: BLE001 - a broken EXIF block is not worth failing the picture
                    orientation = 1
                if out.frames > 1:
                    im.seek(0)
                im.load()  # decode everything: this is where truncated JPEGs fail
                if ImageFile.LOAD_TRUNCATED_IMAGES and _tail_looks_truncated(path, out.format):
                    add("truncated", "the file is cut short (no end marker)")
                    return out
                if orientation in EXIF_TRANSPOSED:
                    # Training Lab's loader (data/dataset.py) turns pictures upright with EXIF, so buckets
                    # must be chosen from the upright size.
                    out.width, out.height = out.height, out.width
                if fingerprint:
                    from PIL import ImageOps

                    from .thumbnail import fingerprint_from_small, small_rgb, stats_from_small

                    small = small_rgb(ImageOps.exif_transpose(im) if orientation not in (0, 1) else im)
                    out.fingerprint = fingerprint_from_small(small)
                    out.stats = stats_from_small(small)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        code = "truncated" if "truncat" in str(e).lower() else "unreadable"
        add(code, f"{'the file is cut short' if code == 'truncated' else 'cannot be decoded'}: {e}")
        return out

    short = min(out.width, out.height)
    if short < HARD_MIN_SIDE:
        add("too_small", f"{out.width}×{out.height}: shorter side below {HARD_MIN_SIDE} px, too small to train on")
    elif short < min_side:
        add("small", f"{out.width}×{out.height}: shorter side below {min_side} px; it will be upscaled and look soft")

    ext = path.suffix.lower()
    expected = FORMAT_EXTENSIONS.get(out.format)
    if expected and ext not in expected:
        add("wrong_extension", f"the content is {out.format} but the name ends in {path.suffix}; "
                               f"tools that trust the extension may refuse it")

    mode = out.mode
    if has_transparency(mode, info):
        add("alpha", "has transparency: Training Lab puts it on white; with masked_loss on, the alpha weights "
                     "the loss instead (transparent parts do not train, colours are kept where alpha is above 0); "
                     "kohya (without masked_loss) and A1111 (without its alpha-as-loss-weight "
                     "option) drop the alpha channel, so transparent areas show whatever colour is stored under "
                     "them (often black)")
    if mode == "CMYK":
        add("cmyk", "CMYK colours: converted to RGB, colours may shift")
    depth = _png_bit_depth(path) if out.format == "PNG" else None
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or (depth is not None and depth > 8):
        add("high_bit_depth", f"{depth or (16 if mode.startswith('I;16') else 32)}-bit picture: reduced to 8 bits per channel")
    elif mode in ("L", "1"):
        add("grayscale", "grayscale: converted to RGB (fine for a black-and-white style)")
    if out.frames > 1:
        add("animated", f"animated ({out.frames} frames): only the first frame is used")
    if orientation not in (1, 0):
        add("exif_rotated", f"EXIF orientation {orientation}: Training Lab turns it upright, but kohya and A1111 "
                            "ignore EXIF and train it rotated or mirrored; save it upright to be safe")
    return out


def _check_many(args: tuple[list[str], int | None, int, bool]) -> list[PictureCheck]:
    paths, max_pixels, min_side, fingerprint = args
    return [check_picture(p, max_pixels=max_pixels, min_side=min_side, fingerprint=fingerprint) for p in paths]


def check_pictures(paths: list[Path], *, max_pixels: int | None = None, min_side: int = DEFAULT_MIN_SIDE,
                   fingerprint: bool = False, workers: int | None = None, progress=None) -> list[PictureCheck]:
    """`check_picture` over many files, in parallel when there are enough files to pay for it.

    `workers`: None = one per CPU (at most 8) for 256+ files, 0 or 1 = in this process. From the main thread
    (the CLI, scripts) the workers are processes; from any other thread (a UI callback inside A1111, whose
    Windows/macOS "spawn" start would re-import the web UI's main script in every worker) they are threads,
    which still overlap PIL's decoding and numpy, both of which release the GIL. Results keep the order of
    `paths`. `progress(done, total)` is called as chunks finish.
    """
    total = len(paths)
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if total >= 256 else 1
    # never more than a few per CPU: a forking pool starts all its processes at once (--workers 10**20 forked
    # until the machine ran out)
    workers = min(workers, 4 * (os.cpu_count() or 1))
    chunk = max(4, min(64, -(-total // (max(1, workers) * 4))))   # ≥ 4 chunks per worker, ≤ 64 files each
    chunks = [[str(p) for p in paths[i:i + chunk]] for i in range(0, total, chunk)]
    jobs = [(c, max_pixels, min_side, fingerprint) for c in chunks]
    results: list[PictureCheck] = []
    if workers > 1 and len(chunks) > 1:
        on_main = threading.current_thread() is threading.main_thread()
        pool_type = ProcessPoolExecutor if on_main else ThreadPoolExecutor
        try:
            with pool_type(max_workers=min(workers, len(chunks))) as pool:
                for part in pool.map(_check_many, jobs):
                    results.extend(part)
                    if progress:
                        progress(len(results), total)
            return results
        except (OSError, RuntimeError, ImportError):  # no process support here (sandbox, frozen app): go serial
            results = []
    for job in jobs:
        results.extend(_check_many(job))
        if progress:
            progress(len(results), total)
    return results


def has_transparency(mode: str, info: dict) -> bool:
    """Whether a picture of this PIL mode and info carries transparency (an alpha channel, or a palette or grey
    level marked transparent)."""
    return mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in info


# ---- folders ---------------------------------------------------------------------------------------------
# OneTrainer keeps a picture's loss mask beside it as "<stem>-masklabel.png": such a file is a mask, never a picture
MASK_LABEL = "-masklabel"


def is_mask_label(p: Path) -> bool:
    return p.stem.lower().endswith(MASK_LABEL)


def _entry_is(entry: os.DirEntry, kind: str) -> bool:
    """`entry.is_file()` / `entry.is_dir()`, False where the type cannot be read: unlike `Path.is_file`, a DirEntry
    raises for a symbolic link that points at itself or in a circle (ELOOP) or into a folder it may not read."""
    try:
        return entry.is_file() if kind == "file" else entry.is_dir()
    except OSError:
        return False


def is_picture(p: Path) -> bool:
    """A file the scan takes for a picture: a picture extension, not hidden, not a OneTrainer mask."""
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and \
        not is_mask_label(p)


def _list_folder(folder: Path) -> list[Path]:
    """The entries of a folder the dataset needs; UserError naming it when it cannot be read (no permission)."""
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise UserError(f"cannot read the folder {folder} ({e.strerror or e}): give your user permission to read "
                        "it, or move the pictures to a folder it can read") from None


def _holds_pictures(folder: Path) -> bool | None:
    """Whether a folder the dataset may not use holds pictures; None when it cannot be read (a disk's lost+found,
    Windows' System Volume Information): such a folder is passed over, not a reason to stop."""
    try:
        return any(is_picture(p) for p in folder.iterdir())
    except OSError:
        return None


# Folder names meant as "N_name" that are not one: a negative count ("-3_dog"), or a space for the "_" ("10 dog";
# a small count only, so that "2023-05 trip" or "2023 trip" are not read as 2023 repeats).
NEGATIVE_COUNT_FOLDER = re.compile(r"^(-\d+)[_\s]+(.*)$", re.DOTALL)
SPACED_COUNT_FOLDER = re.compile(r"^(\d{1,3})\s+(\S.*)$", re.DOTALL)


def _unnumbered_note(folder: Path) -> str:
    """Why a folder of pictures without a usable repeat count is not used, and what to rename it to."""
    negative, spaced = NEGATIVE_COUNT_FOLDER.match(folder.name), SPACED_COUNT_FOLDER.match(folder.name)
    if negative:
        return (f"{folder}: {negative.group(1)} repeats is no repeat count (kohya skips it too), not used; rename it "
                f"e.g. \"10_{negative.group(2)}\"")
    if spaced and int(spaced.group(1)) >= 1:
        return (f"{folder}: the repeat count must be followed by \"_\" (\"N_name\"), not used; rename it "
                f"\"{spaced.group(1)}_{spaced.group(2)}\"")
    return f"{folder}: folder without a repeat count (\"N_name\"), not used; rename it e.g. \"10_{folder.name}\""


LINKED_FOLDER_NOTE = "a link to the same pictures as"   # the scan's note on a linked folder (preflight shows it)

# More repeats than anyone trains with: an epoch holds pictures x repeats samples, listed one by one, so a typo such
# as "99999999999_name" would otherwise end in a MemoryError rather than an answer.
MAX_REPEATS = 10_000


def _check_repeats(folder: Path, repeats: int) -> None:
    if repeats > MAX_REPEATS:
        raise UserError(f"{folder}: {repeats} repeats is more than {MAX_REPEATS:,}; an epoch would list every picture "
                        f"{repeats} times. Use fewer repeats (the number before the underscore) and more epochs "
                        "or max_steps instead")


def find_subsets(path: Path, *, is_regularization: bool = False, notes: list[str] | None = None,
                 _depth: int = 0) -> list[Subset]:
    """The picture folders under `path`, with repeats and class tokens (see the module docstring)."""
    notes = notes if notes is not None else []
    parsed = parse_folder_name(path.name)
    if parsed is not None and _depth == 0:
        repeats, tokens = parsed
        if repeats < 1:
            raise UserError(f"{path}: {repeats} repeats; kohya skips folders with fewer than 1 repeat")
        _check_repeats(path, repeats)
        return [Subset(path, repeats, tokens, is_regularization)]
    listing = _list_folder(path)
    subs = sorted((d for d in listing if d.is_dir() and not d.name.startswith(".") and d.name != REMOVED_DIR),
                  key=lambda d: d.name)
    out: list[Subset] = []
    numbered = [(d, parse_folder_name(d.name)) for d in subs]
    for d, parsed in numbered:
        if parsed is None:
            continue
        repeats, tokens = parsed
        if repeats < 1:
            notes.append(f"{d}: 0 repeats, not used (kohya skips it too)")
            continue
        _check_repeats(d, repeats)
        out.append(Subset(d, repeats, tokens, is_regularization))
    loose = [p for p in listing if is_picture(p)]
    if not out and loose:
        out.append(Subset(path, 1, "", is_regularization))   # a flat folder (A1111 style)
    elif out and loose:
        notes.append(f"{path}: {len(loose)} pictures lie beside the N_name folders and are not used "
                     f"(kohya only reads the numbered folders)")
    for d, parsed in numbered:
        if parsed is not None:
            continue
        low = d.name.lower()
        if _depth == 0 and low in REG_FOLDER_NAMES:          # one level of well-known containers
            out += find_subsets(d, is_regularization=True, notes=notes, _depth=1)
        elif _depth == 0 and low in INSTANCE_FOLDER_NAMES:
            out += find_subsets(d, is_regularization=is_regularization, notes=notes, _depth=1)
        elif _holds_pictures(d):
            notes.append(_unnumbered_note(d))
    return out


def scan_dataset(path: str | Path, *, reg_path: str | Path | None = None, caption_ext: str = ".txt",
                 filename_captions: bool | None = None, word_regex: str = "", join_string: str = " ",
                 max_pixels: int | None = None, min_side: int = DEFAULT_MIN_SIDE, fingerprint: bool = False,
                 workers: int | None = None, progress=None, check: bool = True) -> DatasetReport:
    """Scan and validate a dataset folder. Reads only; never writes into it.

    Args:
        path: the dataset: a parent of `N_name` folders, one such folder, or a flat folder of pictures.
        reg_path: an optional separate folder of regularization (class) pictures, in the same layouts.
        caption_ext: sidecar extension (".txt"; kohya's scripts default to ".caption").
        filename_captions: use A1111's file-name captions when there is no sidecar. None = only in folders
            without class tokens (kohya falls back to class tokens, A1111 to the file name).
        word_regex, join_string: A1111's "Filename word regex" and "Filename join string" options.
        max_pixels, min_side, fingerprint, workers: see `check_picture` / `check_pictures`.
        check: open every picture (the heavy part). False = folders, repeats and captions only (sizes 0), for
            checks that must answer before the pictures are read.
    Returns:
        a `DatasetReport` with one `ImageRecord` per picture, in folder then file-name order.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        if root.exists():
            raise UserError(f"the dataset {root} is a file, not a folder: give the folder that holds the pictures")
        raise UserError(f"dataset folder not found: {root}")
    ext = normalize_ext(caption_ext)
    notes: list[str] = []
    subsets = find_subsets(root, notes=notes)
    if reg_path is not None:
        reg = Path(reg_path).expanduser()
        if not reg.is_dir():
            raise UserError(f"regularization folder not found: {reg}")
        subsets += find_subsets(reg, is_regularization=True, notes=notes)
    seen: set[tuple[Path, str]] = set()
    unique = []
    for sub in subsets:   # a --reg folder that also sits inside the dataset is scanned once
        key = (sub.folder.resolve(), sub.folder.name)
        if key not in seen:
            seen.add(key)
            unique.append(sub)
    subsets = unique
    # A link to another picture folder under a name of its own ("2_more -> 1_dog") is a subset of its own, as in
    # kohya's sd-scripts (it lists folders by name and follows links): its pictures train at both folders' repeats,
    # with each folder's class tokens. Said once, since that may not be what the link was made for.
    by_target: dict[Path, list[Subset]] = {}
    for sub in subsets:
        by_target.setdefault(sub.folder.resolve(), []).append(sub)
    for same in (group for group in by_target.values() if len(group) > 1):
        links = [s for s in same if s.folder.is_symlink()] or same[1:]
        for link in links:
            others = [s for s in same if s is not link]
            notes.append(f"{link.folder}: {LINKED_FOLDER_NOTE} "
                         f"{', '.join(s.folder.name for s in others)}; they are trained in each folder, "
                         f"{' + '.join(str(s.repeats) for s in same)} = {sum(s.repeats for s in same)} repeats in all "
                         "(as kohya does). Remove the link to train them once")
    if not subsets:
        others = sorted(p.name for p in _list_folder(root) if p.is_file() and not p.name.startswith(".")
                        and p.suffix.lower() not in IMAGE_EXTENSIONS + QUIET_EXTENSIONS)
        if others:
            notes.append(f"{root} holds {len(others)} files of types Training Lab does not read ("
                         f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): convert them to PNG, JPEG "
                         "or WebP")
        raise UserError(f"no pictures found in {root}: put them in folders named like \"10_sks dog\" "
                        f"(10 repeats, class tokens \"sks dog\") or directly in the folder"
                        + (f". Found: {'; '.join(notes)}" if notes else ""))

    skipped: list[tuple[Path, str]] = []
    pending: list[tuple[Path, Subset, str, str, list[Problem], Path | None]] = []
    for sub in subsets:
        try:
            with os.scandir(sub.folder) as it:   # one listing per folder; DirEntry caches the file type
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            _list_folder(sub.folder)             # the same failure, as a UserError naming the folder
            raise
        files = [Path(e.path) for e in entries if _entry_is(e, "file")]
        names = {p.name for p in files}
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
        labels = {p.stem[:-len(MASK_LABEL)]: p for p in images if is_mask_label(p)}
        pictures = [p for p in images if not is_mask_label(p)]
        picture_set = set(images)
        sub.image_count = len(pictures)
        if not pictures:
            notes.append(f"{sub.folder}: no pictures, not used")
        stems: dict[str, list[Path]] = {}
        for p in pictures:
            stems.setdefault(p.stem, []).append(p)
        for stem, label in labels.items():
            if stem not in stems:
                notes.append(f"{label}: a mask (\"{MASK_LABEL}\") without its picture {stem}.*")
        face_bases = {"_".join(s.split("_")[:-4]) for s in stems if len(s.split("_")) >= 5}
        for p in files:
            low = p.suffix.lower()
            if p in picture_set or p.name.startswith("."):
                continue
            if low == ext.lower():
                if p.stem not in stems and p.stem not in face_bases:
                    notes.append(f"{p}: caption without a picture")
            elif low not in QUIET_EXTENSIONS:
                skipped.append((p, f"not a picture type we read ({p.suffix or 'no extension'})"))
        for e in entries:
            if _entry_is(e, "dir") and sub.folder != root and e.name != REMOVED_DIR and not e.name.startswith("."):
                if _holds_pictures(Path(e.path)):   # kohya reads no sub-folders either
                    notes.append(f"{e.path}: pictures in a sub-folder of a picture folder are not used; move them "
                                 f"up into {sub.folder.name} (or into a folder of their own beside it)")
                else:
                    notes.append(f"{e.path}: sub-folders of a picture folder are not scanned")
        for other in (c for c in CAPTION_EXTENSIONS if c != ext.lower()):   # e.g. kohya's .caption beside .txt
            missed = [p for p in pictures if p.stem + other in names
                      and not any(c.name in names for c in _sidecar_candidates(p, ext))]
            if missed:
                notes.append(f"{sub.folder}: {len(missed)} pictures have a {other} file but no {ext} caption (e.g. "
                             f"{missed[0].stem}{other}): those {other} files are not used; set the caption extension "
                             f"to {other} (--caption-ext {other}) to train on them")
        use_names = filename_captions if filename_captions is not None else not sub.class_tokens
        for p in pictures:
            problems: list[Problem] = []
            caption, source = "", "none"
            for cand in _sidecar_candidates(p, ext):
                if cand.name in names:
                    caption, problems = read_sidecar(cand)
                    source = "sidecar"
                    break
            if source == "none" and use_names:
                caption, source = filename_caption(p.stem, word_regex, join_string), "filename"
            if source == "none" and sub.class_tokens:
                caption, source = sub.class_tokens, "folder"
            if source == "none" or (source == "filename" and not caption):
                problems.append(Problem("no_caption", "no caption (no sidecar, no class tokens): trains unconditioned"))
            if len(stems[p.stem]) > 1 and source == "sidecar":
                problems.append(Problem("shared_caption", f"{len(stems[p.stem])} pictures named {p.stem}.* share "
                                                          f"one caption file"))
            pending.append((p, sub, caption, source, problems, labels.get(p.stem)))

    checks = check_pictures([p for p, *_ in pending], max_pixels=max_pixels, min_side=min_side,
                            fingerprint=fingerprint, workers=workers, progress=progress) if check \
        else [PictureCheck() for _ in pending]
    records = []
    for (p, sub, caption, source, cap_problems, label), chk in zip(pending, checks):
        records.append(ImageRecord(
            path=p, width=chk.width, height=chk.height, caption=caption, caption_source=source,
            repeats=sub.repeats, concept=sub.concept, folder=sub.folder, is_regularization=sub.is_regularization,
            problems=chk.problems + cap_problems, format=chk.format, mode=chk.mode, file_size=chk.file_size,
            fingerprint=chk.fingerprint, stats=chk.stats, mask=label,
        ))
    return DatasetReport(root=root, records=records, subsets=subsets, skipped=skipped, notes=notes)


# ---- kohya's repeat bookkeeping --------------------------------------------------------------------------
def effective_repeats(records: list[ImageRecord]) -> list[int]:
    """Repeats per record as kohya trains them: regularization repeats are rebalanced to the instance total.

    sd-scripts `DreamBoothDataset.__init__`: the regularization pictures are cycled, first with their folder's
    repeats and then one extra repeat at a time, until they add up to the instance pictures × repeats; reg
    pictures beyond that are not used (a warning there, repeats 0 here). Unusable records count 0.
    """
    out = [r.repeats if r.usable and not r.is_regularization else 0 for r in records]
    target = sum(out)
    regs = [i for i, r in enumerate(records) if r.is_regularization and r.usable]
    if not regs or target == 0:
        return out
    n, first = 0, True
    while n < target:
        for i in regs:
            if first:
                out[i] = records[i].repeats
                n += records[i].repeats
            else:
                out[i] += 1
                n += 1
            if n >= target:
                break
        first = False
    return out


def dataset_dirs_info(records: Iterable[ImageRecord], *, regularization: bool = False) -> dict[str, dict[str, int]]:
    """kohya's `ss_dataset_dirs` / `ss_reg_dataset_dirs`: `{dir_name: {"n_repeats": N, "img_count": M}}`."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if r.is_regularization != regularization or not r.usable:
            continue
        entry = out.setdefault(r.dir_name, {"n_repeats": r.repeats, "img_count": 0})
        entry["img_count"] += 1
    return out
