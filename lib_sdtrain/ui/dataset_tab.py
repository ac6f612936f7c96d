"""The Dataset tab: look at a dataset before training on it, and fix its captions.

What it shows (all through the same core functions as `python -m lib_sdtrain dataset ...`):
scan report (pictures, repeats, unusable files and why), per-picture caption editor, bulk tag edits and the
trigger token, tag frequencies, token counts against CLIP's 75-token window, the caption styles explained,
aspect-ratio buckets, near-duplicate groups side by side, recurring features, size advice with the steps
arithmetic, and class (regularization) pictures rendered with the host's model.

The handlers are plain functions of plain values (strings, numbers, lists) so tests can call them without
gradio; `build(ctx)` only wires them to widgets. Nothing here writes into the dataset except:
- saving one caption (the `.txt` sidecar, atomically; the picture is never touched),
- bulk tag edits, after the user has seen the preview and pressed "Write captions",
- moving extra near-duplicates to `<dataset>/_removed/` (never deleting), only with the confirm box ticked,
- class pictures, into the folder the user names.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import UserError
from ..sample_settings import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLING

if TYPE_CHECKING:
    from ..data.scan import DatasetReport

CAPTION_EXT = ".txt"
KINDS = ("subject", "style", "finetune")
STYLE_ORDER = ("single-token", "several-tokens", "sentence")


# ---- scanning, cached --------------------------------------------------------------------------------------
def _folders_stamp(*paths: str) -> tuple:
    """A cheap fingerprint of the dataset's folders: every folder's modification time (a caption write, a
    moved picture or a new file changes its folder's mtime, so the cached scan is dropped)."""
    out = []
    for p in paths:
        if not p:
            continue
        root = Path(p).expanduser()
        try:
            out.append((str(root), root.stat().st_mtime_ns))
            for dirpath, dirnames, _ in os.walk(root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for d in dirnames:
                    out.append((os.path.join(dirpath, d), os.stat(os.path.join(dirpath, d)).st_mtime_ns))
        except OSError:
            out.append((str(root), None))
    return tuple(out)


_SCAN_CACHE: OrderedDict[tuple, tuple[tuple, DatasetReport]] = OrderedDict()
_SCAN_LOCK = threading.Lock()


def _clean(text: str | None) -> str:
    return (text or "").strip().strip('"').strip()


def scan(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT, *, fingerprint: bool = False,
         min_side: int | None = None, mask_dir: str = "") -> DatasetReport:
    """`data.scan.scan_dataset`, cached until a folder of the dataset (or the mask folder) changes. `min_side`:
    small-picture warnings below this side (None: the scan's default, 256; the tab passes the model's smallest
    bucket). `mask_dir`: kohya's loss-mask folder, whose masks replace the "-masklabel" sidecars
    (`data.masks.attach_mask_dir`)."""
    from ..data.masks import attach_mask_dir
    from ..data.scan import DEFAULT_MIN_SIDE, scan_dataset

    folder, reg, mask_dir = _clean(folder), _clean(reg), _clean(mask_dir)
    if not folder:
        raise UserError("choose a dataset folder first")
    ext = caption_ext or CAPTION_EXT
    min_side = int(min_side or DEFAULT_MIN_SIDE)
    key = (folder, reg, ext, fingerprint, min_side, mask_dir)
    stamp = _folders_stamp(folder, reg, mask_dir)
    with _SCAN_LOCK:
        hit = _SCAN_CACHE.get(key)
        if hit and hit[0] == stamp:
            _SCAN_CACHE.move_to_end(key)
            return hit[1]
    if mask_dir:   # the plain scan (cached, shared with the tab's other views) with the folder's masks on copies
        plain = scan(folder, reg, ext, fingerprint=fingerprint, min_side=min_side)
        records = [dataclasses.replace(r) for r in plain.records]
        attach_mask_dir(records, mask_dir, [Path(p).expanduser() for p in (folder, reg) if p])   # UserError: no folder
        report = dataclasses.replace(plain, records=records)
    else:
        report = scan_dataset(folder, reg_path=reg or None, caption_ext=ext, fingerprint=fingerprint,
                              workers=0 if not fingerprint else None, min_side=min_side)
    with _SCAN_LOCK:
        _SCAN_CACHE[key] = (stamp, report)
        while len(_SCAN_CACHE) > 6:
            _SCAN_CACHE.popitem(last=False)
    return report


def _rel(path: Path | str, root: Path) -> str:
    """`path` relative to `root`, exactly (the caption editor's picker resolves it back to the file)."""
    from ..data.scan import relative_name

    return relative_name(path, root)


def _rel_any(path: Path, roots: Sequence[Path]) -> str:
    """`path` relative to the first root that holds it (the dataset, then the regularization folder)."""
    for root in roots:
        rel = _rel(path, root)
        if not Path(rel).is_absolute():
            return rel
    return str(path)


def _folder_label(folder: Path, root: Path) -> str:
    rel = _rel(folder, root)
    return folder.name if Path(rel).is_absolute() else (rel if rel != "." else folder.name)


def _md_escape(text: Any) -> str:
    from ..data.scan import shown

    return shown(text).replace("|", "\\|")   # a newline in a name or message would end the table row


def _md_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---- scan report -------------------------------------------------------------------------------------------
def model_size(ctx: Any) -> tuple[int, str]:
    """(native size, where it came from) of the host's current model; 512 when it cannot tell."""
    try:
        return ctx.host().native_resolution(None)
    except Exception:  # noqa: BLE001 - the tab must build even when no model is there yet
        return 512, "no model information; 512 assumed"


def scan_report(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT, min_side: int | None = None,
                mask_dir: str = "") -> str:
    """The scan as Markdown: folders with repeats, problem pictures with reasons, loss masks that training would
    refuse, skipped files, totals."""
    from ..data.masks import mask_problem
    from ..data.scan import shown

    report = scan(folder, reg, caption_ext, min_side=min_side, mask_dir=mask_dir)
    root = report.root
    c = report.counts()
    folder_masks = Path(_clean(mask_dir)).expanduser().resolve() if _clean(mask_dir) else None
    from_folder = sum(1 for r in report.records if r.mask is not None and folder_masks is not None
                      and folder_masks in r.mask.resolve().parents)
    masked = ""
    if c["mask_files"]:
        sources = [f"{from_folder} from the mask folder"] if from_folder else []
        if c["mask_files"] > from_folder:
            sources.append(f'{c["mask_files"] - from_folder} "-masklabel" beside the picture')
        masked = f" {c['mask_files']} with a loss mask file ({', '.join(sources)}; used with masked_loss)."
    if folder_masks is not None and not from_folder:
        masked += (f" No picture has a mask in the mask folder {folder_masks} (a mask has its picture's file name, "
                   "in the same sub-folder or at the top).")
    lines = [f"**{c['pictures']} pictures**: {c['usable']} usable ({c['warnings']} with warnings), "
             f"{c['errors']} unusable; {c['instance']} instance, {c['regularization']} regularization; "
             f"{c['instance_with_repeats']} instance samples per epoch (pictures × repeats)." + masked, ""]
    lines.append(_md_table([(_folder_label(s.folder, root), s.repeats, s.class_tokens or "-",
                             "regularization" if s.is_regularization else "instance", s.image_count)
                            for s in report.subsets], ["folder", "repeats", "class tokens", "kind", "pictures"]))
    bad = [(report.name(r.path), f"{r.width}x{r.height}", "; ".join(f"{p.severity}: {p.message}" for p in r.problems))
           for r in report.records if r.problems]
    if bad:
        lines += ["", "**Pictures with problems** (errors are left out of training):", "",
                  _md_table(bad, ["picture", "size", "problems"])]
    else:
        lines += ["", "No problems found in the pictures or their captions."]
    masks = [(report.name(r.path), why) for r in report.records if r.mask is not None
             for why in [mask_problem(r)] if why]
    if masks:
        lines += ["", "**Loss masks that training refuses** (with masked_loss on, fix or remove them first):", "",
                  _md_table(masks, ["picture", "problem"])]
    if report.skipped:
        lines += ["", "**Files not taken:**"] + [f"- `{report.name(p)}`: {shown(why)}" for p, why in report.skipped]
    if report.notes:
        lines += ["", "**Notes:**"] + [f"- {shown(n)}" for n in report.notes]
    return "\n".join(lines)


def picture_choices(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT) -> list[str]:
    """Relative paths of the readable pictures (for the caption editor's picker), in scan order."""
    report = scan(folder, reg, caption_ext)
    roots = [report.root] + ([Path(_clean(reg)).expanduser()] if _clean(reg) else [])
    return [_rel_any(r.path, roots) for r in report.records if r.usable]


def picture_options(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT) -> list[tuple[str, str]]:
    """(label, value) for the caption editor's picker: the value is `picture_choices`' exact relative path, the
    label the same with control characters escaped (`shown`); a label that another already is gets " (2)", ...
    (gradio 3 tells the choices apart by their labels)."""
    from ..data.scan import shown_choices

    return shown_choices(picture_choices(folder, reg, caption_ext))


def gallery_items(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT, limit: int = 500) -> list[tuple[str, str]]:
    """(file path, label) pairs for a gallery: the usable pictures, the caption's first line as the label."""
    report = scan(folder, reg, caption_ext)
    out = []
    for r in [r for r in report.records if r.usable][:limit]:
        first = r.caption.split("\n", 1)[0]
        out.append((str(r.path), (first[:60] + "…") if len(first) > 60 else first))
    return out


# ---- one caption -------------------------------------------------------------------------------------------
def _resolve_picture(folder: str, reg: str, rel: str) -> Path:
    """The picture `rel` names, refusing anything outside the dataset's folders or not a picture."""
    from ..data.scan import IMAGE_EXTENSIONS

    rel = _clean(rel)
    if not rel:
        raise UserError("choose a picture first")
    roots = [Path(_clean(p)).expanduser().resolve() for p in (folder, reg) if _clean(p)]
    if not roots:
        raise UserError("choose a dataset folder first")
    for root in roots:
        cand = (root / rel).resolve()
        if (root == cand or root in cand.parents) and cand.is_file():
            if cand.suffix.lower() not in IMAGE_EXTENSIONS:
                raise UserError(f"{rel} is not a picture")
            return cand
    raise UserError(f"picture {rel!r} not found in the dataset")


def _picture_record(folder: str, reg: str, rel: str, caption_ext: str, mask_dir: str = "") -> tuple[Path, Any]:
    """(the picture `rel` names, its scan record or None): the picture refused as `_resolve_picture` does."""
    path = _resolve_picture(folder, reg, rel)
    records = scan(folder, reg, caption_ext, mask_dir=mask_dir).records
    return path, next((r for r in records if r.path.resolve() == path), None)


def _current_caption(path: Path, rec: Any, caption_ext: str) -> str:
    """The picture's caption as its file holds it now: the cached scan is kept while no folder changes, and a
    program that rewrites a caption file in place changes no folder."""
    from ..data.scan import _sidecar_candidates, normalize_ext, read_sidecar

    if rec is not None and rec.caption_source == "sidecar":
        for cand in _sidecar_candidates(path, normalize_ext(caption_ext or CAPTION_EXT)):
            if cand.is_file():
                return read_sidecar(cand)[0]
    return rec.caption if rec else ""


def load_caption(folder: str, reg: str, rel: str, caption_ext: str = CAPTION_EXT,
                 mask_dir: str = "") -> tuple[str, str, str]:
    """(picture path, caption text, where the caption comes from) for the editor."""
    path, rec = _picture_record(folder, reg, rel, caption_ext, mask_dir)
    caption = _current_caption(path, rec, caption_ext)
    source = rec.caption_source if rec else "none"
    where = {"sidecar": f"from {path.stem}{caption_ext}", "filename": "from the file name (no caption file yet)",
             "folder": "from the folder's class tokens (no caption file yet)",
             "none": "no caption yet"}.get(source, source)
    if rec is not None and rec.mask is not None:
        where += f"; loss mask {rec.mask.name} (used with masked_loss; the picture shows the untrained parts dimmed)"
    return str(path), caption, where


def picture_mask(folder: str, reg: str, rel: str, caption_ext: str = CAPTION_EXT, mask_dir: str = "") -> Path | None:
    """The loss mask file of the picture `rel` (from the mask folder, else its "-masklabel" sidecar), if any."""
    rec = _picture_record(folder, reg, rel, caption_ext, mask_dir)[1]
    return rec.mask if rec is not None else None


def masked_thumbnail(path: str | Path, mask: str | Path, size: int = 640) -> Any:
    """`thumbnail` of a picture with its loss mask shown: each part dimmed by how little it weighs (weight 0 at a
    quarter of its brightness, weight 1 as it is)."""
    import numpy as np
    from PIL import Image

    from ..data.masks import read_mask

    pic = thumbnail(path, size)
    w = np.asarray(read_mask(Path(mask), pic.size), dtype=np.float32)[..., None] / 255.0
    return Image.fromarray((np.asarray(pic, dtype=np.float32) * (0.25 + 0.75 * w)).round().astype(np.uint8))


def save_caption(folder: str, reg: str, rel: str, text: str, caption_ext: str = CAPTION_EXT, *,
                 loaded: str | None = None) -> str:
    """Write the picture's caption sidecar (atomically). The picture itself is never opened for writing.
    `loaded`: the caption the editor was given (`load_caption`); a file changed since then is not replaced."""
    from ..data.captions import write_caption

    path, rec = _picture_record(folder, reg, rel, caption_ext)
    text = "\n".join(line.strip() for line in (text or "").splitlines() if line.strip())
    if rec is not None and any(p.code in ("long_caption", "huge_caption") for p in rec.problems):
        raise UserError(f"the caption file of {path.name} is longer than training reads and the editor shows only "
                        "its start; saving here would lose the rest: shorten it in a text editor")
    now = _current_caption(path, rec, caption_ext) if loaded is not None else None
    if now is not None and now not in (loaded, text):   # another program (or tab) wrote it in between
        raise UserError(f"the caption of {path.name} was changed on disk after the editor loaded it (it now reads "
                        f"{now[:80]!r}); nothing was saved. Pick the picture again to load the new caption, then "
                        "make your edit")
    written = write_caption(path, text, caption_ext or CAPTION_EXT)
    from ..data.captions import count_tokens

    n = count_tokens(text.split("\n", 1)[0], _tokenizer())
    warn = f" - {n} tokens, over the 75-token window: the end is cut" if n > 75 else f" ({n} tokens)"
    return f"saved {written.name}{warn}"


# ---- bulk tag edits ----------------------------------------------------------------------------------------
@dataclass
class BulkEdit:
    add: str = ""
    at_start: bool = False
    remove: str = ""
    replace: str = ""          # one "old=new" per line (or comma-separated); "old=" removes the tag
    trigger: str = ""
    include_reg: bool = False
    edits: list[Callable[[str], str]] = field(default_factory=list, repr=False)

    def compile(self) -> Callable[[str], str]:
        from ..data import captions as C

        fns: list[Callable[[str], str]] = []
        if self.trigger.strip():
            trigger = C.check_trigger(self.trigger)
            fns.append(lambda c, t=trigger: C.set_trigger(c, t))
        items = [s.strip() for line in self.replace.splitlines() for s in line.split(",") if s.strip()]
        if items:
            mapping = C.parse_replacements(items)
            fns.append(lambda c, m=mapping: C.replace_tags(c, m))
        if self.remove.strip():
            drop = C.split_tags(self.remove)
            fns.append(lambda c, d=drop: C.remove_tags(c, d))
        if self.add.strip():
            new = C.split_tags(self.add)
            fns.append(lambda c, n=new, s=self.at_start: C.add_tags(c, n, at_start=s))
        if not fns:
            raise UserError("nothing to do: fill in tags to add, remove or replace, or a trigger token")

        def edit(caption: str) -> str:
            for fn in fns:
                caption = fn(caption)
            return caption

        return edit


def bulk_edit(folder: str, reg: str, caption_ext: str, spec: BulkEdit, *, write: bool) -> tuple[str, int]:
    """Preview (write=False) or apply the edit to every usable caption. Returns (Markdown, captions changed)."""
    from ..data import captions as C

    report = scan(folder, reg, caption_ext)
    changes = C.plan_caption_edits(report.usable, spec.compile(), caption_ext=caption_ext or CAPTION_EXT,
                                   include_regularization=spec.include_reg)
    left = C.too_long_to_edit(report.usable, include_regularization=spec.include_reg)
    left_md = (f"\n\n{len(left)} captions left unedited (their files are too long to read whole; shorten them by "
               "hand): " + ", ".join(f"`{report.name(r.path)}`" for r in left[:20])) if left else ""
    if not changes:
        return "No caption would change." + left_md, 0
    if write:
        C.apply_caption_changes(changes)
    head = (f"**{len(changes)} captions written.**" if write else
            f"**{len(changes)} captions would change** (nothing written yet; press *Write captions* to save):")
    rows = [(report.name(c.image), c.old.replace("\n", " / "), c.new.replace("\n", " / "),
             "new file" if c.creates_file else "") for c in changes[:200]]
    more = f"\n\n… and {len(changes) - 200} more" if len(changes) > 200 else ""
    return head + "\n\n" + _md_table(rows, ["picture", "before", "after", ""]) + more + left_md, len(changes)


# ---- tags and tokens ---------------------------------------------------------------------------------------
_TOKENIZER: list[Any] = []


def _tokenizer():
    """Our CLIP tokenizer if its vocabulary is installed (exact counts), else None (estimates)."""
    if not _TOKENIZER:
        from ..data.captions import default_tokenizer

        _TOKENIZER.append(default_tokenizer())
    return _TOKENIZER[0]


def tag_rows(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT, top: int = 200) -> list[list[Any]]:
    """[tag, pictures with it, share in %] over the usable instance pictures, most frequent first."""
    from ..data.captions import tag_table

    report = scan(folder, reg, caption_ext)
    return [[t, n, round(100 * s, 1)] for t, n, s in tag_table(report.records)[:top]]


def token_summary(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT) -> str:
    """Token counts of the captions against the 75-token window, with the captions over it listed."""
    from ..data.captions import TOKEN_WINDOW, token_report, trigger_report

    report = scan(folder, reg, caption_ext)
    tok = token_report(report.records, _tokenizer())
    lines = [f"Tokens per caption ({'exact, CLIP tokenizer' if tok['exact'] else 'estimated'}): "
             f"max **{tok['max']}**, mean {tok['mean']:.1f}. The text encoder sees {TOKEN_WINDOW} tokens at a "
             f"time; training uses the first window only, so tokens past it are not learned."]
    over = tok["over_window"]
    if over:
        lines += ["", f"**{len(over)} captions are over the {TOKEN_WINDOW}-token window:**"]
        lines += [f"- `{report.name(o['path'])}`: {o['tokens']} tokens" for o in over[:50]]
    else:
        lines.append(f"All captions fit in the {TOKEN_WINDOW}-token window.")
    trig = trigger_report(report.records)
    if trig["triggers"] and trig["with_trigger"]:
        lines += ["", f"Trigger `{', '.join(trig['triggers'])}` (the folder's first word): first in {trig['first']}, "
                      f"in the first half of {trig['early']}, in the second half of {trig['late']} captions, "
                      f"missing from {trig['missing']}."]
        if trig["hint"]:
            lines.append(f"**Hint:** {trig['hint']}")
    return "\n".join(lines)


def caption_style_help(style: str) -> str:
    """Markdown that explains one caption style (the words come from data.captions.CAPTION_STYLES)."""
    from ..data.captions import CAPTION_STYLES

    s = CAPTION_STYLES.get(style)
    if s is None:
        raise UserError(f"unknown caption style {style!r}; choose one of {', '.join(CAPTION_STYLES)}")
    return f"**{s['title']}** - e.g. `{s['example']}`\n\n{s['help']}"


def style_choices() -> list[tuple[str, str]]:
    from ..data.captions import CAPTION_STYLES

    return [(CAPTION_STYLES[k]["title"], k) for k in STYLE_ORDER if k in CAPTION_STYLES]


# ---- buckets, guidance -------------------------------------------------------------------------------------
BUCKET_HEADERS = ["bucket", "aspect", "pictures", "with repeats", "batches"]   # the Buckets table's columns


def bucket_settings(resolution: str | int | None, min_bucket: int | None, max_bucket: int | None,
                    native: int) -> tuple[str, int, int]:
    """The Buckets sub-tab's fields with their empty defaults filled at click time: no resolution (or 0) = the
    model's native size; a bucket bound of 0 = half / twice the resolution (kohya's 256-1024 at 512). The tab
    keeps these empty rather than the size of the model loaded when it was built, which A1111 would keep in
    ui-config.json for every later start and model (session 21, real A1111 v1.10.1)."""
    from ..data.buckets import parse_resolution
    from ..train.preflight import default_buckets_for

    text = str(resolution if resolution is not None else "").strip()
    if text in ("", "0"):
        text = str(int(native))
    w, h = parse_resolution(text)
    low, high = default_buckets_for(w, h)
    return text, int(min_bucket or 0) or low, int(max_bucket or 0) or high


def _plan(report: DatasetReport, resolution: str, min_bucket: int, max_bucket: int, step: int,
          no_upscale: bool, no_buckets: bool):
    from ..data.buckets import parse_resolution, plan_buckets
    from ..data.scan import effective_repeats

    usable = report.usable
    if not usable:
        raise UserError("no usable pictures in the dataset")
    return usable, plan_buckets([(r.width, r.height) for r in usable], effective_repeats(usable),
                                resolution=parse_resolution(resolution), min_size=int(min_bucket),
                                max_size=int(max_bucket), step=int(step), no_upscale=bool(no_upscale),
                                enable=not no_buckets)


def bucket_report(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT, resolution: str = "512",
                  min_bucket: int = 256, max_bucket: int = 1024, step: int = 64, no_upscale: bool = False,
                  no_buckets: bool = False, batch: int = 1) -> tuple[list[list[Any]], str]:
    """Rows [bucket, aspect, pictures, with repeats, batches] and a one-paragraph summary."""
    report = scan(folder, reg, caption_ext)
    _, plan = _plan(report, resolution, min_bucket, max_bucket, step, no_upscale, no_buckets)
    batch = max(1, int(batch))
    pictures: dict[tuple[int, int], int] = {}
    for a, n in zip(plan.assignments, plan.repeats):
        if n > 0:
            pictures[a.bucket] = pictures.get(a.bucket, 0) + 1
    rows = [[f"{w}x{h}", round(w / h, 2), pictures[(w, h)], n, -(-n // batch)] for (w, h), n in plan.counts().items()]
    summary = (f"{len(rows)} buckets used (of {len(plan.ladder) or 'one per picture size'}); mean aspect error "
               f"{plan.mean_ar_error():.4f}; {plan.batch_count(batch)} batches of {batch} per epoch. A batch "
               f"never mixes buckets, so a bucket with few pictures adds a small batch.")
    return rows, summary


def guidance_report(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT, kind: str = "subject",
                    batch: int = 1, accum: int = 1, epochs: int = 10, resolution: str = "512",
                    min_bucket: int = 256, max_bucket: int = 1024, step: int = 64, no_upscale: bool = False,
                    no_buckets: bool = False) -> tuple[str, dict[str, Any]]:
    """Size advice and the steps arithmetic as Markdown, plus the raw result (for the Train tab)."""
    from ..data.guidance import dataset_guidance

    if kind not in KINDS:
        raise UserError(f"kind must be one of {', '.join(KINDS)}")
    report = scan(folder, reg, caption_ext)
    _, plan = _plan(report, resolution, min_bucket, max_bucket, step, no_upscale, no_buckets)
    result = dataset_guidance(report.records, kind=kind, batch_size=max(1, int(batch)),
                              accumulation=max(1, int(accum)), epochs=max(1, int(epochs)),
                              bucket_counts=list(plan.counts().values()))
    advice = [("✔ " if a["level"] == "ok" else "⚠ **Warning:** ") + a["text"] for a in result["advice"]]
    s = result["steps"]
    reg_txt = " × 2 (regularization)" if s["regularization_factor"] == 2 else ""
    steps = (f"**Steps:** {result['instance']} pictures × repeats = "
             f"{s['samples_per_epoch'] // s['regularization_factor']}{reg_txt} samples per epoch; "
             f"batch {s['batch_size']} × accumulation {s['accumulation']} → {s['batches_per_epoch']} batches, "
             f"**{s['steps_per_epoch']} steps per epoch, {s['total_steps']} steps in {s['epochs']} epochs**.")
    hints = "\n".join(f"- {h}" for h in s["hints"])
    return "\n\n".join(advice + [steps] + ([hints] if hints else [])), result


# ---- near-duplicates and recurring features ----------------------------------------------------------------
def duplicate_groups(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT, threshold: int = 12,
                     min_correlation: float = 0.95) -> list[dict[str, Any]]:
    """Near-duplicate groups: [{"paths": [...], "keep": path, "labels": [...]}]. Reads only."""
    from ..data.dedupe import find_duplicate_groups

    threshold, min_correlation = int(threshold), float(min_correlation)
    if not 0 <= threshold <= 32:
        raise UserError(f"the hash distance must be between 0 and 32 bits, got {threshold}")
    if not -1.0 <= min_correlation <= 1.0:
        raise UserError(f"the correlation must be between -1 and 1, got {min_correlation}")
    report = scan(folder, reg, caption_ext, fingerprint=True)
    groups = find_duplicate_groups(report.records, phash_max=threshold, min_correlation=min_correlation)
    by_path = {r.path: r for r in report.records}
    out = []
    for g in groups:
        labels = []
        for p in g.paths:
            r = by_path.get(p)
            size = f" {r.width}x{r.height}" if r else ""
            labels.append(f"{report.name(p)}{size}" + (" (keep)" if p == g.keep else ""))
        out.append({"paths": [str(p) for p in g.paths], "keep": str(g.keep), "labels": labels})
    return out


def duplicates_markdown(groups: list[dict[str, Any]]) -> str:
    if not groups:
        return "No near-duplicates found."
    extra = sum(len(g["paths"]) - 1 for g in groups)
    lines = [f"**{len(groups)} groups of near-duplicates** ({extra} extra copies). The suggested keeper is the "
             f"largest picture training can use. Copies teach the model their shared details twice as hard; keep "
             f"one of each."]
    lines += [f"{i}. " + ", ".join(g["labels"]) for i, g in enumerate(groups, 1)]
    return "\n".join(lines)


def group_choices(groups: list[dict[str, Any]]) -> list[str]:
    return [f"group {i}: {len(g['paths'])} pictures" for i, g in enumerate(groups, 1)]


def group_gallery(groups: list[dict[str, Any]], choice: str | int | None) -> list[tuple[str, str]]:
    """The pictures of one group, side by side, labelled (for a gallery with one row)."""
    if not groups or choice in (None, ""):
        return []
    if isinstance(choice, int):
        idx = choice
    else:
        try:
            idx = int(str(choice).split(":", 1)[0].split()[-1]) - 1
        except (ValueError, IndexError):
            raise UserError(f"unknown group {choice!r}") from None
    if not 0 <= idx < len(groups):
        raise UserError(f"unknown group {choice!r}")
    g = groups[idx]
    return list(zip(g["paths"], g["labels"]))


def move_duplicates(folder: str, groups: list[dict[str, Any]], confirmed: bool,
                    caption_ext: str = CAPTION_EXT) -> str:
    """Move every picture of each group except its keeper (with its caption) to `<dataset>/_removed/`.

    Only when `confirmed` (the user ticked the box). Nothing is deleted; moving back restores the dataset.
    """
    from ..data.dedupe import move_to_removed
    from ..data.scan import REMOVED_DIR, shown

    if not confirmed:
        raise UserError("tick the confirmation box first: the extra copies are moved to "
                        f"{REMOVED_DIR}/ inside the dataset (nothing is deleted)")
    if not groups:
        return "Nothing to move: find near-duplicates first."
    root = Path(_clean(folder)).expanduser()
    extra = [Path(p) for g in groups for p in g["paths"] if p != g["keep"]]
    moved = move_to_removed(extra, root, caption_ext=caption_ext or CAPTION_EXT, keep=[Path(g["keep"]) for g in groups])
    base = root.resolve()
    return (f"Moved {len(moved)} files to {root / REMOVED_DIR} (nothing deleted; move them back to undo):\n"
            + "\n".join(f"- `{shown(_rel(a, base))}` → `{shown(_rel(b, base))}`" for a, b in moved))


def features_markdown(folder: str, reg: str = "", caption_ext: str = CAPTION_EXT) -> str:
    """Things most pictures of a concept share (tags, background, brightness, colour), with advice."""
    from ..data.features import recurring_features

    report = scan(folder, reg, caption_ext, fingerprint=True)
    feats = recurring_features(report.records)
    if not feats:
        return ("No recurring feature found: nothing that most pictures of a concept share besides the concept "
                "itself.")
    lines = ["**Recurring features** - the model learns what most pictures share as part of the concept:"]
    for f in feats:
        ex = f" (e.g. {', '.join(f.examples[:3])})" if f.examples else ""
        lines.append(f"- [{f.concept}] **{f.label}**: {f.count} of {f.total} pictures{ex}. {f.advice}")
    return "\n".join(lines)


# ---- class pictures ----------------------------------------------------------------------------------------
@dataclass
class ClassGenRequest:
    out_dir: str
    prompt: str
    count: int = 50
    seed: int = 0
    width: int = 0             # 0 = the model's native size (its header / family), as for training
    height: int = 0
    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER
    cfg_scale: float = DEFAULT_CFG_SCALE
    negative: str = ""
    batch_size: int = 1
    model: str = ""            # the model file to load ("" = the host's current or default model)

    def checked(self) -> ClassGenRequest:
        if not _clean(self.out_dir):
            raise UserError("choose the folder for the class pictures, e.g. reg/1_dog")
        if not self.prompt.strip():
            raise UserError("the class prompt is empty (e.g. 'a photo of a dog')")
        for name in ("count", "seed", "width", "height", "steps", "batch_size"):
            setattr(self, name, int(getattr(self, name)))
        self.cfg_scale = float(self.cfg_scale)
        self.out_dir = _clean(self.out_dir)
        return self


def run_classgen(host: Any, parts: Any, req: ClassGenRequest, events: Any = None, stop: Any = None) -> dict[str, Any]:
    """Render the class pictures with the host's sampler (resumable: existing ones are skipped)."""
    from ..classgen import generate_class_images

    req.checked()
    if not req.width or not req.height:
        try:
            size = int(host.native_resolution(req.model or None)[0])
        except Exception:  # noqa: BLE001 - a host that cannot tell: SD1's size
            size = 512
        req.width, req.height = req.width or size, req.height or size
    result = generate_class_images(host, parts, req.prompt, req.count, req.out_dir, seed=req.seed,
                                   width=req.width, height=req.height, steps=req.steps, sampler=req.sampler,
                                   events=events, stop=stop, negative=req.negative, cfg_scale=req.cfg_scale,
                                   batch_size=req.batch_size)
    return result.to_dict()


class ClassGenRunner:
    """One class-picture job at a time in a background thread, with progress and a stop button.

    `get_host()` gives the host on the worker thread (the UI context's: A1111's, or a standalone one). The job
    runs as one of the host's jobs (`host.job_context`, a `HostJob` of kind "classgen"): inside A1111 under its
    queue lock, shown by its progress display ("class pictures 3/60") and stopped by its Interrupt button as by
    this tab's Stop, the pictures already written kept for the next run. The model (the request's, or the
    host's current / default one) is loaded and given back inside the job. Progress is read by polling
    `state()`.
    """

    def __init__(self, get_host: Callable[[], Any]) -> None:
        from ..events import StopToken

        self._get_host = get_host
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = StopToken()
        self._state: dict[str, Any] = {"running": False, "done": 0, "total": 0, "status": "idle", "result": None,
                                       "error": "", "last": ""}

    def start(self, req: ClassGenRequest) -> str:
        from ..events import Events, StoppedBeforeStart

        req.checked()
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise UserError("class pictures are already being rendered; stop that run first")
            self._stop.reset()
            self._state = {"running": True, "done": 0, "total": req.count, "status": "starting",
                           "result": None, "error": "", "last": ""}

        def listen(event) -> None:
            with self._lock:
                if event.kind == "progress":
                    self._state["done"] = event.data.get("step", 0)
                    self._state["total"] = event.data.get("total", req.count)
                    self._state["last"] = event.data.get("path", self._state["last"])
                elif event.kind == "status":
                    self._state["status"] = event.data.get("text", "")

        def work() -> None:
            try:
                result = self._render(req, Events(listen))
                with self._lock:
                    self._state["result"] = result
                    self._state["status"] = (f"stopped: {result['generated']} rendered, {len(result['paths'])} in "
                                             f"the folder (run again to resume)" if result["stopped"] else
                                             f"done: {result['generated']} rendered, {result['skipped']} already "
                                             f"there, {len(result['paths'])} in {req.out_dir}")
                    if result.get("left_out"):
                        self._state["status"] += (f"; {result['left_out']} skipped while drawing, not saved "
                                                  "(render again to draw them)")
            except StoppedBeforeStart:      # stopped while A1111's queue kept it waiting: nothing drawn
                with self._lock:
                    self._state["result"] = {"paths": [], "generated": 0, "skipped": 0, "stopped": True,
                                             "left_out": 0}
                    self._state["status"] = "stopped while waiting for A1111's queue: nothing rendered"
            except Exception as e:  # noqa: BLE001 - shown in the UI instead of killing the thread silently
                with self._lock:
                    self._state["error"] = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                    self._state["status"] = "failed"
            finally:
                with self._lock:
                    self._state["running"] = False

        self._thread = threading.Thread(target=work, name="training-lab-classgen", daemon=True)
        self._thread.start()
        return f"rendering {req.count} class pictures into {req.out_dir}"

    def _render(self, req: ClassGenRequest, events: Any) -> dict[str, Any]:
        """Load, draw and give the model back, all inside the host's job (a host without `job_context` has no
        lock, display or stop control to join)."""
        from ..hosts import host_job

        host = self._get_host()
        with host_job(host, "classgen", events, self._stop):
            model = _clean(req.model)
            events.status(f"loading the model{f' {model}' if model else ''}")
            parts = host.load(model or None)
            try:
                return run_classgen(host, parts, req, events, self._stop)
            finally:
                host.release(parts)

    def stop(self) -> str:
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
            waiting = str(self._state.get("status", "")).startswith("waiting")
        if not running:
            return "nothing is running"
        self._stop.request("stopped from the Dataset tab")
        return "stopping: nothing was drawn yet (it was waiting for its turn)" if waiting else \
            "stopping after the current picture…"

    def join(self, timeout: float | None = None) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def progress_text(self) -> str:
        s = self.state()
        if s["error"]:
            return f"**Error:** {s['error']}"
        if s["total"]:
            return f"{s['done']} / {s['total']} class pictures - {s['status']}"
        return s["status"]


def classgen_runner(ctx: Any) -> ClassGenRunner:
    """The Dataset tab's class-picture runner: its jobs run on `ctx.host()` (one host per job)."""
    return ClassGenRunner(ctx.host)


# ---- pictures for galleries --------------------------------------------------------------------------------
def thumbnail(path: str | Path, size: int = 192) -> Any:
    """A small RGB copy of a picture for a gallery (the file is only read). Thumbnails rather than file paths:
    every gradio version shows them, wherever the dataset lives (gradio 4+ refuses to serve paths outside its
    allowed folders)."""
    from PIL import Image, ImageOps

    from ..data.thumbnail import eight_bit_grey

    with Image.open(path) as im:
        im.draft("RGB", (size * 2, size * 2))
        im = eight_bit_grey(ImageOps.exif_transpose(im))   # 16-bit grey shown as training reads it, not white
        im = im.convert("RGB")
        im.thumbnail((size, size))
        return im


def gallery_thumbs(items: Sequence[tuple[str, str]], size: int = 192, limit: int = 200) -> list[tuple[Any, str]]:
    out = []
    for path, label in list(items)[:limit]:
        try:
            out.append((thumbnail(path, size), label))
        except OSError:
            continue
    return out


def _err(e: Exception) -> str:
    return f"**Error:** {e}" if isinstance(e, UserError) else f"**Error:** {type(e).__name__}: {e}"


# ---- the tab -----------------------------------------------------------------------------------------------
def build(ctx: Any) -> None:
    """The Dataset tab's widgets and events, inside the caller's `gr.Tab` (see ui/tabs.py)."""
    import gradio as gr

    from . import compat
    from ..train.preflight import default_buckets
    from .context import host_sampler_names, host_sampler_spelling

    native, native_source = model_size(ctx)
    low, _ = default_buckets(native)    # small-picture warnings follow the model's size

    upd = compat.update
    C = ctx.components

    def keep(n: int) -> list[Any]:
        return [upd() for _ in range(n)]

    with gr.Column(elem_id="training_lab_dataset"):
        gr.Markdown("Point at a dataset folder: `N_name` folders (N repeats, class tokens *name*) or a flat folder "
                    "of pictures, with optional caption files beside them. Nothing is written into it unless you "
                    "press a *Save* / *Write* / *Move* button.")
        with gr.Row():
            folder = gr.Textbox(label="Dataset folder", placeholder="/path/to/dataset", scale=4,
                                elem_id="training_lab_ds_folder")
            reg = gr.Textbox(label="Regularization (class) folder, optional", scale=3,
                             elem_id="training_lab_ds_reg")
            ext = gr.Textbox(label="Caption extension", value=CAPTION_EXT, scale=1, elem_id="training_lab_ds_ext")
            mask_dir = gr.Textbox(label="Loss mask folder (kohya mask_dir), optional", scale=2,
                                  elem_id="training_lab_ds_mask_dir")
            scan_btn = gr.Button("Scan", variant="primary", scale=1, elem_id="training_lab_ds_scan")
        status = gr.Markdown("", elem_id="training_lab_ds_status")
        C["dataset.folder"], C["dataset.reg"], C["dataset.caption_ext"] = folder, reg, ext

        with gr.Tabs(elem_id="training_lab_ds_tabs"):
            with gr.Tab("Report", id="ds_report"):
                report_md = gr.Markdown("", elem_id="training_lab_ds_report")
                with gr.Row():
                    kind = gr.Radio(list(KINDS), value="subject", label="What the dataset teaches")
                    batch = gr.Number(value=1, precision=0, label="Batch size")
                    accum = gr.Number(value=1, precision=0, label="Gradient accumulation")
                    epochs = gr.Number(value=10, precision=0, label="Epochs")
                    guide_btn = gr.Button("Size advice and steps", elem_id="training_lab_ds_guide")
                guide_md = gr.Markdown("", elem_id="training_lab_ds_guidance")

            with gr.Tab("Captions", id="ds_captions"):
                gallery = compat.gallery("Pictures (click one to edit its caption)", columns=6, height=360,
                                         elem_id="training_lab_ds_gallery", allow_preview=False)
                with gr.Row():
                    with gr.Column(scale=1):
                        preview = gr.Image(label="Picture", interactive=False, height=320,
                                           elem_id="training_lab_ds_preview")
                    with gr.Column(scale=2):
                        picture = gr.Dropdown(label="Picture", choices=[], elem_id="training_lab_ds_picture")
                        caption = gr.Textbox(label="Caption", lines=4, elem_id="training_lab_ds_caption")
                        where = gr.Markdown("")
                        save_btn = gr.Button("Save caption", variant="primary", elem_id="training_lab_ds_save")
                        style = gr.Radio(compat.choices(style_choices()), value=STYLE_ORDER[0],
                                         label="Caption style", elem_id="training_lab_ds_style")
                        style_md = gr.Markdown(caption_style_help(STYLE_ORDER[0]))

            with gr.Tab("Tags", id="ds_tags"):
                with gr.Row():
                    with gr.Column(scale=1):
                        tags_df = compat.dataframe(["tag", "pictures", "share %"], elem_id="training_lab_ds_tagtable")
                    with gr.Column(scale=1):
                        tokens_md = gr.Markdown("", elem_id="training_lab_ds_tokens")
                gr.Markdown("**Bulk edit**: tags are the comma-separated parts of a caption; edits compare whole "
                            "tags, ignoring case. *Preview* shows every change; *Write captions* saves them.")
                with gr.Row():
                    trigger = gr.Textbox(label="Trigger token (made the first tag)", elem_id="training_lab_ds_trigger")
                    add = gr.Textbox(label="Add tags (comma-separated)", elem_id="training_lab_ds_add")
                    at_start = gr.Checkbox(label="Add at the start", value=False)
                with gr.Row():
                    remove = gr.Textbox(label="Remove tags (comma-separated)", elem_id="training_lab_ds_remove")
                    replace = gr.Textbox(label="Replace tags: old=new, one per line (old= removes)", lines=2,
                                         elem_id="training_lab_ds_replace")
                    include_reg = gr.Checkbox(label="Also edit the regularization captions", value=False)
                with gr.Row():
                    preview_btn = gr.Button("Preview", elem_id="training_lab_ds_bulk_preview")
                    write_btn = gr.Button("Write captions", variant="primary", elem_id="training_lab_ds_bulk_write")
                bulk_md = gr.Markdown("", elem_id="training_lab_ds_bulk")

            with gr.Tab("Buckets", id="ds_buckets"):
                with gr.Row():
                    # empty: the model's size when a report is made (not at build time: A1111 keeps a
                    # widget's first value in ui-config.json for every later start and model)
                    resolution = gr.Textbox(value="", label="Resolution (empty = the model's size; 512 or WxH)",
                                            info=f"the model's native size now: {native} ({native_source})")
                    min_b = gr.Number(value=0, precision=0, label="Smallest bucket side (0 = half the resolution)")
                    max_b = gr.Number(value=0, precision=0, label="Largest bucket side (0 = twice the resolution)")
                    C["dataset.bucket_resolution"], C["dataset.bucket_min"], C["dataset.bucket_max"] = \
                        resolution, min_b, max_b
                    step_b = gr.Number(value=64, precision=0, label="Bucket step")
                    b_batch = gr.Number(value=1, precision=0, label="Batch size")
                with gr.Row():
                    no_upscale = gr.Checkbox(label="No upscaling (one bucket per picture size)", value=False)
                    no_buckets = gr.Checkbox(label="No buckets (resize and centre-crop to one size)", value=False)
                    bucket_btn = gr.Button("Bucket report", elem_id="training_lab_ds_bucket_btn")
                bucket_md = gr.Markdown("")
                bucket_df = compat.dataframe(BUCKET_HEADERS, elem_id="training_lab_ds_buckets")

            with gr.Tab("Duplicates", id="ds_dupes"):
                with gr.Row():
                    threshold = gr.Slider(0, 32, value=12, step=1, label="Largest hash distance (bits of 64)")
                    min_corr = gr.Slider(0.5, 1.0, value=0.95, step=0.01, label="Smallest colour correlation")
                    dupe_btn = gr.Button("Find near-duplicates", elem_id="training_lab_ds_dupe_btn")
                    feat_btn = gr.Button("Recurring features", elem_id="training_lab_ds_feat_btn")
                dupe_md = gr.Markdown("", elem_id="training_lab_ds_dupes")
                groups_state = gr.State([])
                group = gr.Dropdown(label="Group", choices=[], elem_id="training_lab_ds_group")
                group_gal = compat.gallery("Side by side", columns=4, height=260, elem_id="training_lab_ds_group_gallery")
                with gr.Row():
                    confirm = gr.Checkbox(label="Move every copy except the suggested keeper to _removed/ inside "
                                                "the dataset (nothing is deleted)", value=False,
                                          elem_id="training_lab_ds_confirm")
                    move_btn = gr.Button("Move extra copies", variant="stop", elem_id="training_lab_ds_move")
                feat_md = gr.Markdown("", elem_id="training_lab_ds_features")

            with gr.Tab("Class pictures", id="ds_classgen"):
                gr.Markdown("Prior preservation needs generic pictures of the class (usually 20-100× the instance "
                            "pictures) made by the model you train. Pictures are named from their seed and "
                            "settings, so a stopped run resumes and a larger count renders only the new seeds.")
                with gr.Row():
                    cg_out = gr.Textbox(label="Output folder (e.g. reg/1_dog)", elem_id="training_lab_ds_cg_out")
                    cg_prompt = gr.Textbox(label="Class prompt", placeholder="a photo of a dog",
                                           elem_id="training_lab_ds_cg_prompt")
                    cg_neg = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    cg_model = gr.Textbox(label="Model (empty: the loaded / default model)",
                                          value="" if ctx.in_webui else ctx.default_model,
                                          elem_id="training_lab_ds_cg_model")
                    cg_count = gr.Number(value=50, precision=0, label="Pictures")
                    cg_seed = gr.Number(value=0, precision=0, label="First seed")
                    # 0: the model's own size when the pictures are drawn (a 64-px toy model drew 512-px class
                    # pictures by default; real A1111 v1.10.1, session 21). Not the size at build time: A1111
                    # keeps a widget's first value in ui-config.json and shows it at every later start
                    cg_w = gr.Number(value=0, precision=0, label="Width (0 = the model's size)")
                    cg_h = gr.Number(value=0, precision=0, label="Height (0 = the model's size)")
                    C["dataset.class_width"], C["dataset.class_height"] = cg_w, cg_h
                with gr.Row():
                    steps_f, cfg_f = SAMPLING["steps"], SAMPLING["cfg_scale"]
                    cg_steps = gr.Number(value=steps_f.default, precision=0, label="Steps", minimum=steps_f.minimum,
                                         maximum=steps_f.maximum)
                    cg_names = host_sampler_names(ctx)   # inside the WebUI: every sampler of its txt2img
                    cg_sampler = gr.Dropdown(cg_names, value=host_sampler_spelling(cg_names, DEFAULT_SAMPLER),
                                             label="Sampler", allow_custom_value=True,
                                             elem_id="training_lab_ds_cg_sampler")
                    cg_cfg = gr.Number(value=cfg_f.default, label="CFG scale", minimum=cfg_f.minimum,
                                       maximum=cfg_f.maximum)
                    cg_batch = gr.Number(value=1, precision=0, label="Batch")
                with gr.Row():
                    cg_start = gr.Button("Render class pictures", variant="primary", elem_id="training_lab_ds_cg_start")
                    cg_stop = gr.Button("Stop", variant="stop", elem_id="training_lab_ds_cg_stop")
                cg_md = gr.Markdown("", elem_id="training_lab_ds_cg_progress")

    # ---- events -------------------------------------------------------------------------------------------
    def on_scan(f, r, e, m):
        try:
            text = scan_report(f, r, e, min_side=low, mask_dir=m)
            options = picture_options(f, r, e)
            items = gallery_items(f, r, e)
            return [f"Scanned {len(options)} usable pictures.", text, tag_rows(f, r, e), token_summary(f, r, e),
                    gallery_thumbs(items), upd(choices=compat.labelled(options), value=None), options]
        except Exception as ex:  # noqa: BLE001 - every failure is shown, none kills the page
            return [_err(ex)] + keep(6)

    pictures_state = gr.State([])   # the picker's (label, exact relative path) pairs
    scan_btn.click(on_scan, [folder, reg, ext, mask_dir], [status, report_md, tags_df, tokens_md, gallery, picture,
                                                  pictures_state])

    loaded_caption = gr.State(None)   # the caption as the editor got it: Save refuses a file changed since

    def on_pick(f, r, e, m, choice, options):
        if not choice:
            return [None, "", "", "", None]
        try:
            rel = compat.chosen(options, choice)
            path, cap, src = load_caption(f, r, rel, e, m)
            label = picture_mask(f, r, rel, e, m)
            try:
                shown = masked_thumbnail(path, label) if label is not None else thumbnail(path, 640)
            except OSError:                  # an unreadable mask: the picture alone (the scan reports the file)
                shown = thumbnail(path, 640)
            return [shown, cap, src, "", cap]
        except Exception as ex:  # noqa: BLE001
            return [None, "", "", _err(ex), None]

    picture.change(on_pick, [folder, reg, ext, mask_dir, picture, pictures_state],
                   [preview, caption, where, status, loaded_caption])

    def on_select(options, evt):
        idx = evt.index if isinstance(evt.index, int) else (evt.index[0] if evt.index else 0)
        return upd(value=compat.choice_at(options, idx)) if options and 0 <= idx < len(options) else upd()

    on_select.__annotations__ = {"options": list, "evt": gr.SelectData}   # gradio finds SelectData by annotation
    gallery.select(on_select, [pictures_state], [picture])

    def on_save(f, r, e, choice, text, loaded, options):
        # the Tags sub-tab's table and token summary count the saved caption (they stayed at the scan's)
        try:
            rel = compat.chosen(options, choice)
            msg = save_caption(f, r, rel, text, e, loaded=loaded)
            return [msg, tag_rows(f, r, e), token_summary(f, r, e), load_caption(f, r, rel, e)[1]]
        except Exception as ex:  # noqa: BLE001
            return [_err(ex), upd(), upd(), loaded]   # a State gets its value back, never an update dict

    save_btn.click(on_save, [folder, reg, ext, picture, caption, loaded_caption, pictures_state],
                   [status, tags_df, tokens_md, loaded_caption])
    C["dataset.save_caption"], C["dataset.caption"], C["dataset.tags"] = save_btn, caption, tags_df
    C["dataset.bulk_write"] = write_btn
    style.change(lambda s: caption_style_help(s) if s else "", [style], [style_md])

    def on_bulk(write):
        def run(f, r, e, trig, add_, start, rem, rep, inc):
            try:
                spec = BulkEdit(add=add_ or "", at_start=bool(start), remove=rem or "", replace=rep or "",
                                trigger=trig or "", include_reg=bool(inc))
                text, n = bulk_edit(f, r, e, spec, write=write)
                if write and n:
                    return [text, tag_rows(f, r, e), token_summary(f, r, e), ""]
                return [text, upd(), upd(), ""]
            except Exception as ex:  # noqa: BLE001
                return ["", upd(), upd(), _err(ex)]
        return run

    bulk_inputs = [folder, reg, ext, trigger, add, at_start, remove, replace, include_reg]
    preview_btn.click(on_bulk(False), bulk_inputs, [bulk_md, tags_df, tokens_md, status])
    def reload_caption(f, r, e, m, choice, loaded, options):
        # the caption box holds the written text, so a later Save caption cannot undo the bulk edit
        if not choice:
            return [upd(), loaded]
        try:
            cap = load_caption(f, r, compat.chosen(options, choice), e, m)[1]
            return [cap, cap]
        except Exception:  # noqa: BLE001 - the bulk report already shows any failure
            return [upd(), loaded]

    write_btn.click(on_bulk(True), bulk_inputs, [bulk_md, tags_df, tokens_md, status]).then(
        reload_caption, [folder, reg, ext, mask_dir, picture, loaded_caption, pictures_state],
        [caption, loaded_caption])

    def on_guide(f, r, e, k, b, a, ep, res, mn, mx, st, nu, nb):
        try:
            res, mn, mx = bucket_settings(res, mn, mx, model_size(ctx)[0])
            return [guidance_report(f, r, e, k, b or 1, a or 1, ep or 1, res, mn, mx, st, nu, nb)[0], ""]
        except Exception as ex:  # noqa: BLE001
            return ["", _err(ex)]

    guide_btn.click(on_guide, [folder, reg, ext, kind, batch, accum, epochs, resolution, min_b, max_b, step_b,
                               no_upscale, no_buckets], [guide_md, status])

    def on_buckets(f, r, e, res, mn, mx, st, nu, nb, b):
        try:
            res, mn, mx = bucket_settings(res, mn, mx, model_size(ctx)[0])
            rows, summary = bucket_report(f, r, e, res, mn, mx, st, nu, nb, b or 1)
            return [summary, rows, ""]
        except Exception as ex:  # noqa: BLE001
            # the summary and the table both go: the last report's buckets beside the error read as this one's
            return ["", compat.empty_table(BUCKET_HEADERS), _err(ex)]

    bucket_btn.click(on_buckets, [folder, reg, ext, resolution, min_b, max_b, step_b, no_upscale, no_buckets,
                                  b_batch], [bucket_md, bucket_df, status])

    def on_dupes(f, r, e, th, mc):
        try:
            groups = duplicate_groups(f, r, e, th, mc)
            names = group_choices(groups)
            first = names[0] if names else None
            side = gallery_thumbs(group_gallery(groups, first), size=256) if first else []
            return [duplicates_markdown(groups), groups, upd(choices=names, value=first), side, ""]
        except Exception as ex:  # noqa: BLE001
            return ["", [], upd(choices=[], value=None), [], _err(ex)]

    dupe_btn.click(on_dupes, [folder, reg, ext, threshold, min_corr], [dupe_md, groups_state, group, group_gal, status])

    def on_group(groups, choice):
        try:
            return [gallery_thumbs(group_gallery(groups, choice), size=256) if choice else [], ""]
        except Exception as ex:  # noqa: BLE001
            return [[], _err(ex)]

    group.change(on_group, [groups_state, group], [group_gal, status])

    def on_move(f, e, groups, ok):
        try:
            return [move_duplicates(f, groups, bool(ok), e), [], upd(choices=[], value=None), [],
                    upd(value=False), ""]
        except Exception as ex:  # noqa: BLE001
            return [upd(), upd(), upd(), upd(), upd(), _err(ex)]

    move_btn.click(on_move, [folder, ext, groups_state, confirm],
                   [dupe_md, groups_state, group, group_gal, confirm, status])

    def on_features(f, r, e):
        try:
            return [features_markdown(f, r, e), ""]
        except Exception as ex:  # noqa: BLE001
            return ["", _err(ex)]

    feat_btn.click(on_features, [folder, reg, ext], [feat_md, status])

    # class pictures: one runner per page, a job of the context's host; Start streams progress until it ends
    runner = classgen_runner(ctx)
    C["dataset.classgen_runner"] = runner

    def on_cg_start(out, prompt, neg, model, count, seed, w, h, steps, sampler, cfg, b):
        import time

        try:
            req = ClassGenRequest(out, prompt or "", count=count or 0, seed=seed or 0, width=w or 0,
                                  height=h or 0, steps=steps or DEFAULT_STEPS, sampler=sampler or DEFAULT_SAMPLER,
                                  cfg_scale=DEFAULT_CFG_SCALE if cfg is None else cfg, negative=neg or "",
                                  batch_size=b or 1, model=model or "")
            yield runner.start(req)
        except Exception as ex:  # noqa: BLE001
            yield _err(ex)
            return
        while runner.state()["running"]:
            time.sleep(0.5)
            yield runner.progress_text()
        yield runner.progress_text()

    cg_start.click(on_cg_start, [cg_out, cg_prompt, cg_neg, cg_model, cg_count, cg_seed, cg_w, cg_h, cg_steps,
                                 cg_sampler, cg_cfg, cg_batch], [cg_md])
    cg_stop.click(lambda: runner.stop(), [], [cg_md])
