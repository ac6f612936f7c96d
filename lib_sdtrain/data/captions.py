"""Captions and tags: sidecar files, bulk tag edits, tag frequencies, token counts, and caption-time augmentation.

A caption is comma-separated tags ("sks dog, on grass, sunny") or a sentence. It lives in a sidecar text file
next to the picture (`name.txt`), or comes from the file name or the folder's class tokens (see `data/scan.py`).

Writing sidecars is the one thing in `data/` that changes a dataset, and it happens only through
`apply_caption_changes`, which the CLI/UI call when the user asks to write. Each file is replaced atomically
(`formats.files.atomic_write_text`): a crash leaves the old caption or the new one, never half a file.

`process_caption` is what the training loop calls for every sample: kohya's `BaseDataset.process_caption`
order (anchors.md §3 "Caption processing order"), deterministic for a given `random.Random`.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence

from ..errors import DiskError, UserError
from ..formats.names import BIDI_CONTROLS

if TYPE_CHECKING:
    import random

    from .scan import ImageRecord

TOKEN_WINDOW = 75     # CLIP's 77 positions minus BOS/EOS; A1111 splits longer prompts into 75-token chunks
CLIP_BOS, CLIP_EOS = 49406, 49407

# Help texts for the UI's caption-style picker (training guide, "Captioning" and "Attention").
CAPTION_STYLES: dict[str, dict[str, str]] = {
    "single-token": {
        "title": "One token per picture",
        "example": "sks dog",
        "help": "Every picture is captioned with the same instance token (often with its class word). All of "
                "each step's attention goes to that token, so the concept is learned quickly, but everything "
                "the pictures share - background, clothes, lighting - is learned as part of it. Suits a "
                "subject with varied pictures; set it with a folder name like '10_sks dog' and no caption files.",
    },
    "several-tokens": {
        "title": "Several tags per picture",
        "example": "sks dog, sitting, red collar, grass, daylight",
        "help": "The trigger token first, then tags for what else is in the picture. The step's attention is "
                "shared among the tags, so training on the trigger is slower, but a described feature (the red "
                "collar) attaches to its own tag instead of the concept and can be prompted away later. Use it "
                "when a feature recurs that is not part of the concept. Keep the trigger fixed with keep_tokens=1 "
                "when shuffling tags.",
    },
    "sentence": {
        "title": "A sentence per picture",
        "example": "a photo of sks dog sitting on the grass wearing a red collar",
        "help": "Natural language, as the base model's own training captions were. It spreads the attention "
                "over many tokens at once, which suits full fine-tuning on large, varied datasets more than "
                "a single subject. Do not shuffle sentences: tag shuffling would scramble the words' order.",
    },
}


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


# ---- tags ------------------------------------------------------------------------------------------------
def caption_first_line(caption: str) -> str:
    return caption.split("\n", 1)[0]


def split_tags(caption: str, sep: str = ",") -> list[str]:
    """Tags of a caption: split on `sep`, stripped, empty ones dropped."""
    return [t.strip() for t in caption.split(sep) if t.strip()]


def join_tags(tags: Iterable[str], sep: str = ", ") -> str:
    return sep.join(tags)


def _per_line(caption: str, fn: Callable[[list[str]], list[str]]) -> str:
    # Each line of a multi-line caption is one wildcard variant: edit every line the same way.
    lines = caption.split("\n") if caption else [""]
    return "\n".join(join_tags(fn(split_tags(line))) for line in lines)


def check_caption_text(text: str, what: str) -> str:
    """`text` that an edit writes into captions, refused when it holds a control character other than tab (a line
    break makes a new wildcard line, an escape sequence rewrites the terminal that shows the caption) or a
    text-direction control (the caption would display other than it reads). Any other character is kept."""
    for c in text:
        if c in BIDI_CONTROLS:
            raise UserError(f"{what} {text!r} contains the text-direction control {c!r}, which makes a caption "
                            "display other than it reads; remove it")
        if c != "\t" and (unicodedata.category(c) == "Cc" or c in "\u2028\u2029"):
            raise UserError(f"{what} {text!r} contains the control character {c!r}; captions take tabs but no "
                            "other control characters (line breaks, escapes); remove it")
    return text


def add_tags(caption: str, tags: Sequence[str], *, at_start: bool = False) -> str:
    """Add tags a caption does not have yet (compared case-insensitively), at the end or the start."""
    new = [check_caption_text(t.strip(), "the tag to add") for t in tags if t.strip()]

    def edit(cur: list[str]) -> list[str]:
        have = {t.lower() for t in cur}
        extra = [t for t in dict.fromkeys(new) if t.lower() not in have]
        return extra + cur if at_start else cur + extra

    return _per_line(caption, edit)


def remove_tags(caption: str, tags: Sequence[str]) -> str:
    """Remove whole tags (case-insensitive); "red" does not touch "red collar"."""
    drop = {t.strip().lower() for t in tags if t.strip()}
    return _per_line(caption, lambda cur: [t for t in cur if t.lower() not in drop])


def replace_tags(caption: str, mapping: dict[str, str]) -> str:
    """Replace whole tags (case-insensitive keys); an empty replacement removes the tag. No duplicates result."""
    low = {k.strip().lower(): check_caption_text(v.strip(), f"the replacement for {k.strip()!r}")
           for k, v in mapping.items() if k.strip()}

    def edit(cur: list[str]) -> list[str]:
        out: list[str] = []
        for t in cur:
            t = low.get(t.lower(), t)
            if t and t.lower() not in {o.lower() for o in out}:
                out.append(t)
        return out

    return _per_line(caption, edit)


def check_trigger(token: str) -> str:
    """The trigger token, stripped; refused when empty or when it is not one tag."""
    token = token.strip()
    if not token:
        raise UserError("the trigger token is empty")
    if "," in token or "\n" in token:
        raise UserError(f"the trigger {token!r} must be one tag, without commas or line breaks")
    return check_caption_text(token, "the trigger")


def set_trigger(caption: str, token: str) -> str:
    """Make `token` the first tag (removing it from elsewhere), where kohya's keep_tokens=1 keeps it fixed."""
    token = check_trigger(token)
    return _per_line(caption, lambda cur: [token] + [t for t in cur if t.lower() != token.lower()])


def parse_replacements(items: Sequence[str]) -> dict[str, str]:
    """CLI form "old=new" (or "old=" to remove) → mapping."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"replacement {item!r} must look like old=new")
        old, new = item.split("=", 1)
        if not old.strip():
            raise UserError(f"replacement {item!r} has no tag to replace")
        out[old.strip()] = check_caption_text(new.strip(), f"the replacement for {old.strip()!r}")
    return out


# ---- sidecars ----------------------------------------------------------------------------------------------
def read_caption(image: str | Path, caption_ext: str = ".txt") -> str | None:
    """The sidecar's caption (non-empty lines joined by "\\n"), or None when there is no sidecar."""
    from .scan import caption_path, read_sidecar

    path = caption_path(Path(image), caption_ext)
    if not path.is_file():
        return None
    text, problems = read_sidecar(path)
    bad = [p for p in problems if p.severity == "error"]
    if bad:
        raise UserError(bad[0].message)
    return text


def refuse_read_only(paths: Iterable[Path]) -> None:
    """UserError for the first existing caption file the user made read-only: an atomic replace would write it
    all the same (a rename needs only the folder writable) and leave it writable."""
    from ..formats.files import is_read_only

    for path in paths:     # (not there yet, a new sidecar, or unreadable: not read-only; the write says why)
        if is_read_only(path):
            raise UserError(f"{path} is read-only; make it writable to change its caption (nothing was written)")


def write_caption(image: str | Path, caption: str, caption_ext: str = ".txt") -> Path:
    """Write (atomically replace) the picture's sidecar. Changes the dataset: call only when the user asks."""
    from ..formats.files import atomic_write_text
    from .scan import caption_path

    path = caption_path(Path(image), caption_ext)
    refuse_read_only([path])
    return atomic_write_text(path, caption.strip() + "\n")


@dataclass(frozen=True)
class CaptionChange:
    image: Path
    caption_file: Path
    old: str
    new: str
    creates_file: bool     # no sidecar of that name yet (the caption came from a file name or the folder)

    def to_dict(self) -> dict[str, Any]:
        return {"image": str(self.image), "caption_file": str(self.caption_file), "old": self.old,
                "new": self.new, "creates_file": self.creates_file}


def _whole_caption(record: ImageRecord, caption_ext: str) -> str | None:
    """The uncut caption of a record whose caption the scan cut to the text encoder's 225 tokens (what an edit must
    start from, or the rest of the file is lost); None for a file over MAX_CAPTION_BYTES, which is never read whole,
    or one that cannot be read."""
    from .scan import _sidecar_candidates, normalize_ext, read_sidecar

    for cand in _sidecar_candidates(record.path, normalize_ext(caption_ext)):
        if cand.is_file():
            text, problems = read_sidecar(cand, cap=False)   # the scan's reading, lines kept whole
            if any(p.code in ("huge_caption", "caption_encoding") for p in problems):
                return None
            return text
    return None


def too_long_to_edit(records: Sequence[ImageRecord], *, include_regularization: bool = False) -> list[ImageRecord]:
    """Records `plan_caption_edits` leaves alone: their caption file is over MAX_CAPTION_BYTES (read only in part)."""
    return [r for r in records if (include_regularization or not r.is_regularization)
            and any(p.code == "huge_caption" for p in r.problems)]


def plan_caption_edits(records: Sequence[ImageRecord], edit: Callable[[str], str], *,
                       caption_ext: str = ".txt", include_regularization: bool = False) -> list[CaptionChange]:
    """What `edit` would change, without writing anything (a dry run the user can review).

    A caption the scan cut to 225 tokens is edited whole, from its file; one over MAX_CAPTION_BYTES is left out
    (writing back what was read would lose the rest of the file; `too_long_to_edit` lists them)."""
    from .scan import caption_path

    out = []
    for r in records:
        if r.is_regularization and not include_regularization:
            continue
        old = r.caption
        if any(p.code == "huge_caption" for p in r.problems):
            continue
        if any(p.code == "long_caption" for p in r.problems):
            old = _whole_caption(r, caption_ext)
            if old is None:
                continue
        new = edit(old)
        if new != old:
            path = caption_path(r.path, caption_ext)
            if r.caption_source != "sidecar" and path.is_file():
                # a file the scan did not read as this caption (Windows and macOS: "A.txt" for "a.png", which
                # the scan matches by exact name); writing the edit would replace it with the folder's caption
                raise UserError(f"{path} exists but was not read as the caption of {r.path.name} (a name that "
                                "differs in upper/lower case?); rename it to match the picture, then edit again")
            out.append(CaptionChange(r.path, path, old, new, not path.is_file()))
    return out


def apply_caption_changes(changes: Sequence[CaptionChange]) -> list[Path]:
    """Write planned changes, each file atomically (none when one of the files is read-only). Returns the written
    sidecars."""
    from ..formats.files import atomic_write_text

    refuse_read_only([c.caption_file for c in changes])
    written: list[Path] = []
    for c in changes:
        try:
            written.append(atomic_write_text(c.caption_file, c.new.strip() + "\n"))
        except DiskError as e:   # a file the mode bits allow but the disk refuses: say what is already changed
            if not written:
                raise
            raise DiskError(f"{e}; {len(written)} of {len(changes)} captions were written before it, the others "
                            "are unchanged") from None
    return written


# ---- frequencies -----------------------------------------------------------------------------------------
def tag_frequency(records: Iterable[ImageRecord], *, wildcards: bool = False) -> dict[str, dict[str, int]]:
    """kohya's `ss_tag_frequency`: `{dir_name: {tag: count}}`.

    sd-scripts `BaseDataset.set_tag_frequency(os.path.basename(subset.image_dir), captions)`: the key is the
    folder's base name ("10_sks dog"), captions are split on ",", stripped and lower-cased, and counted once per
    occurrence. Regularization folders are included (kohya counts every subset). The caption is the one loaded:
    the first line, or all lines when wildcards are on; pictures without a sidecar count their class tokens.
    """
    out: dict[str, dict[str, int]] = {}
    for r in records:
        if not r.usable:
            continue
        freq = out.setdefault(r.dir_name, {})
        text = r.caption if wildcards else caption_first_line(r.caption)
        for tag in text.split(","):
            tag = tag.strip().lower()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return out


def tag_table(records: Sequence[ImageRecord]) -> list[tuple[str, int, float]]:
    """(tag, pictures with it, share of pictures) over usable instance pictures, most frequent first."""
    recs = [r for r in records if r.usable and not r.is_regularization]
    counts: dict[str, int] = {}
    for r in recs:
        for tag in {t.lower() for t in split_tags(caption_first_line(r.caption))}:
            counts[tag] = counts.get(tag, 0) + 1
    n = max(1, len(recs))
    return [(t, c, c / n) for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


# ---- tokens ----------------------------------------------------------------------------------------------
# CLIP's pre-tokenizer pattern (openai/CLIP simple_tokenizer.py) with `re` classes instead of \p{L} / \p{N}.
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)


def approx_token_count(text: str) -> int:
    """A tokenizer-free estimate of CLIP's token count (without BOS/EOS).

    CLIP first splits text into words, single digits and punctuation runs, then BPE splits rare words into
    sub-words. The estimate counts 1 token per word of up to 8 letters and one more per 4 further letters,
    1 per digit, and 1 per 2 punctuation characters. On English tag captions it lands within about 10 % of
    CLIP, usually on the high side (long words that CLIP knows whole); invented trigger words ("ohwx") may be a
    token low. Pass a real tokenizer for exact counts (`default_tokenizer`).
    """
    n = 0
    for piece in _CLIP_PIECES.findall(" ".join(text.lower().split())):
        if piece[0].isalpha():
            n += 1 + max(0, math.ceil((len(piece) - 8) / 4))
        elif piece[0].isdigit() or piece.startswith("'"):
            n += 1
        else:
            n += math.ceil(len(piece) / 2)
    return n


def default_tokenizer() -> Tokenizer | None:
    """Our CLIP tokenizer (`models.tokenizer.ClipTokenizer`, A1111's SD1 ids) if its vocabulary is installed,
    else None (then counts are estimated)."""
    try:
        from ..models.tokenizer import ClipTokenizer

        return ClipTokenizer(flavor="hf")
    except (ImportError, UserError, OSError):
        return None


def count_tokens(text: str, tokenizer: Tokenizer | None = None) -> int:
    """CLIP tokens in `text`, excluding BOS/EOS. With no tokenizer, `approx_token_count`.

    `tokenizer` is any object with `encode(text) -> list[int]` (ours in `models/tokenizer.py`, or a Hugging
    Face CLIPTokenizer); a leading BOS (49406) and trailing EOS (49407) are not counted if it adds them.
    """
    if tokenizer is None:
        return approx_token_count(text)
    ids = list(tokenizer.encode(text))
    if ids and ids[0] == CLIP_BOS:
        ids = ids[1:]
    if ids and ids[-1] == CLIP_EOS:
        ids = ids[:-1]
    return len(ids)


def token_report(records: Sequence[ImageRecord], tokenizer: Tokenizer | None = None,
                 window: int = TOKEN_WINDOW) -> dict[str, Any]:
    """Token counts of the captions (first line), with those over `window` listed."""
    counts = [(r.path, count_tokens(caption_first_line(r.caption), tokenizer)) for r in records if r.usable]
    over = [(p, n) for p, n in counts if n > window]
    values = [n for _, n in counts]
    return {
        "exact": tokenizer is not None,
        "window": window,
        "max": max(values, default=0),
        "mean": (sum(values) / len(values)) if values else 0.0,
        "over_window": [{"path": str(p), "tokens": n} for p, n in over],
    }


# ---- where the trigger stands ----------------------------------------------------------------------------
# CLIP's text encoder is causal: a word changes only its own position and those after it. A trigger at the end of
# a caption reaches little more than the end token and the padding, and the UNet sees nearly the same context with
# and without it. Measured on the toy model (bench/caption_position.py, bench/README.md "The style words in
# front"): a style trigger added at the end moved the context by 0.9 % of its energy, in front by 4.6 %, and a
# UNet LoRA bound the style to it +0.08 at the end against +0.55 in front (same pictures and steps).
TRIGGER_LATE_SHARE = 0.5     # hint when more than this share of the captions have the trigger in their second half


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s,()\[\]{}:|]+", text.lower()) if w]


def trigger_report(records: Sequence[ImageRecord], trigger: str = "") -> dict[str, Any]:
    """Where the trigger stands in the usable instance pictures' captions (first line).

    `trigger`: the word(s) to look for; empty = the first word of each picture's folder concept when the concept
    has two words or more (kohya's "instance class" tokens: "10_sks dog" -> "sks"; a one-word folder such as
    "10_dog" names a class, not a trigger, and is left out). Counts: "first" (the caption starts with it),
    "early" (in its first half), "late" (in its second half), "missing". `hint` is set when most captions that
    have it have it late.
    """
    counts = {"first": 0, "early": 0, "late": 0, "missing": 0}
    late_examples: list[str] = []
    triggers: set[str] = set()
    given = _words(trigger)
    for r in records:
        if not r.usable or r.is_regularization:
            continue
        if given:
            want = given
        else:
            concept = _words(r.concept)
            want = concept[:1] if len(concept) >= 2 else []
        if not want:
            continue
        triggers.add(" ".join(want))
        words = _words(caption_first_line(r.caption))
        at = next((i for i in range(len(words) - len(want) + 1) if words[i:i + len(want)] == want), None)
        if at is None:
            counts["missing"] += 1
        elif at == 0:
            counts["first"] += 1
        elif at + len(want) / 2 <= len(words) / 2:
            counts["early"] += 1
        else:
            counts["late"] += 1
            if len(late_examples) < 3:
                late_examples.append(str(r.path))
    having = counts["first"] + counts["early"] + counts["late"]
    hint = ""
    if having and counts["late"] / having > TRIGGER_LATE_SHARE:
        name = ", ".join(sorted(triggers))
        hint = (f"the trigger ({name}) stands in the second half of {counts['late']} of {having} captions that have "
                "it. CLIP's text encoder reads left to right, so a word at the end changes little of what the UNet "
                "sees and binds weakly (on the toy model a style trigger bound +0.08 at the end, +0.55 in front). "
                "Put it first (set the trigger token to make it the first tag; keep_tokens 1 keeps it there when "
                "tags are shuffled).")
    return {"triggers": sorted(triggers), **counts, "with_trigger": having, "late_examples": late_examples,
            "hint": hint}


# ---- caption-time augmentation (the training loop calls this per sample) -----------------------------------
@dataclass(frozen=True)
class CaptionOptions:
    """kohya's per-subset caption settings (names in brackets are sd-scripts' flags)."""

    prefix: str = ""                   # [caption_prefix] joined with a space
    suffix: str = ""                   # [caption_suffix]
    dropout_rate: float = 0.0          # [caption_dropout_rate] whole caption → "" with this probability
    dropout_every_n_epochs: int = 0    # [caption_dropout_every_n_epochs] epochs are 1-based, as kohya counts
    wildcards: bool = False            # [enable_wildcard] random line + {a|b} choices; else the first line
    shuffle: bool = False              # [shuffle_caption]
    keep_tokens: int = 0               # [keep_tokens] the first N tags stay in place
    keep_tokens_separator: str = ""    # [keep_tokens_separator] text before it stays; a second one → fixed suffix
    separator: str = ","               # [caption_separator]
    secondary_separator: str = ""      # [secondary_separator] replaced by `separator` at the end (keeps groups)
    tag_dropout_rate: float = 0.0      # [caption_tag_dropout_rate] per flexible tag
    token_warmup_min: int = 1          # [token_warmup_min]
    token_warmup_step: float = 0       # [token_warmup_step] steps; a value < 1 is a fraction of max_train_steps

    def validate(self) -> None:
        for name in ("dropout_rate", "tag_dropout_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"{name} must be between 0 and 1, got {v}")
        if self.keep_tokens < 0 or self.dropout_every_n_epochs < 0:
            raise UserError("keep_tokens and dropout_every_n_epochs cannot be negative")
        if not self.separator:
            raise UserError("the caption separator cannot be empty")


# A side word stands between anything but letters and digits: an underscore parts words too, as in booru tags
# ("looking_to_the_left", "left_hand"), where `\b` would see one word and leave the side unswapped
SIDES = re.compile(r"(?<![^\W_])(left|right)(most|ward|wards)?(?![^\W_])", re.IGNORECASE)


def swap_sides(caption: str) -> str:
    """The caption of the mirrored picture: "left" and "right" (also leftmost, rightward, ...) trade places, in
    the case they were written in. Every such word is swapped, "right" meaning "correct" too."""
    def swap(m: re.Match) -> str:
        word, tail = m.group(1), m.group(2) or ""
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            other = other.upper()
        elif word[0].isupper():
            other = other.capitalize()
        return other + tail
    return SIDES.sub(swap, caption)


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # "{{" and "}}" are literal braces; pick placeholders that do not occur in the text.
    left, right = "⦅", "⦆"
    while left in caption or right in caption:
        left, right = left + "⦅", right + "⦆"
    caption = caption.replace("{{", left).replace("}}", right)
    caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(left, "{").replace(right, "}")


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, *, epoch: int = 1, step: int = 0,
                    max_train_steps: int = 0) -> str:
    """The caption one training sample sees, in sd-scripts' order (`BaseDataset.process_caption`):

    1. prefix/suffix; 2. whole-caption dropout (→ "", the unconditional case); 3. wildcards, or the first line;
    4. split on the separator into fixed (first `keep_tokens`, or before `keep_tokens_separator`) and flexible
    tags, plus a fixed suffix after a second separator; 5. token warm-up truncation; shuffle the flexible tags;
    6. per-tag dropout; 7. re-join with ", " and turn the secondary separator into the separator.
    Steps 4-6 run only when shuffling, warm-up or tag dropout is on (otherwise the text is untouched).
    The random draws are made in kohya's order from `rng`, so a seeded `rng` gives the same captions.
    """
    if opts.prefix:
        caption = opts.prefix + " " + caption
    if opts.suffix:
        caption = caption + " " + opts.suffix
    dropped = opts.dropout_rate > 0 and rng.random() < opts.dropout_rate
    dropped = dropped or (opts.dropout_every_n_epochs > 0 and epoch % opts.dropout_every_n_epochs == 0)
    if dropped:
        return ""
    caption = _expand_wildcards(caption, rng) if opts.wildcards else caption.split("\n")[0]

    warmup = opts.token_warmup_step
    if 0 < warmup < 1:
        warmup = math.floor(warmup * max_train_steps)
    if opts.shuffle or warmup > 0 or opts.tag_dropout_rate > 0:
        sep = opts.separator
        fixed: list[str] = []
        suffix: list[str] = []
        ks = opts.keep_tokens_separator
        if ks and ks in caption:
            fixed_part, flex_part = caption.split(ks, 1)
            if ks in flex_part:
                flex_part, suffix_part = flex_part.split(ks, 1)
                suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
            fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
            flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(sep)]   # kohya keeps empty tags here
            flex = tokens[:]
            if opts.keep_tokens > 0:
                fixed, flex = tokens[:opts.keep_tokens], tokens[opts.keep_tokens:]
        if warmup and step < warmup:
            keep = math.floor(step * ((len(flex) - opts.token_warmup_min) / warmup)) + opts.token_warmup_min
            flex = flex[:keep]
        if opts.shuffle:
            rng.shuffle(flex)
        if opts.tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)
    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.separator)
    return caption
