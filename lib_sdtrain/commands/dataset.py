"""Inspect and prepare a training dataset: scan, tags, buckets, dedupe, guidance, classgen.

  python -m lib_sdtrain dataset scan DIR            validate every picture, list captions and problems
  python -m lib_sdtrain dataset tags DIR            tag frequencies and token counts; --add/--remove/--replace/
                                                    --trigger edit captions (a dry run unless --write)
  python -m lib_sdtrain dataset buckets DIR         aspect-ratio buckets (kohya's ladder) and batches per epoch
  python -m lib_sdtrain dataset dedupe DIR          near-duplicate groups and recurring features; --sheets DIR
                                                    writes contact sheets; --remove moves copies to DIR/_removed
  python -m lib_sdtrain dataset guidance DIR        dataset size advice and the steps/epochs arithmetic
  python -m lib_sdtrain dataset classgen OUT_DIR    render class (regularization) pictures with a model

Every subcommand takes --json for scripts. Only `tags --write`, `dedupe --remove` and `classgen` write files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..sample_settings import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER, DEFAULT_STEPS, accepted_samplers


# ---- arguments ---------------------------------------------------------------------------------------------
def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="dataset folder: a parent of N_name folders, one such folder, or a flat folder")
    p.add_argument("--reg", metavar="DIR", help="a separate folder of regularization (class) pictures")
    p.add_argument("--caption-ext", default=".txt", help="caption sidecar extension (default: .txt)")
    p.add_argument("--filename-captions", default=None, action=argparse.BooleanOptionalAction,
                   help="use A1111's file-name captions when there is no sidecar (default: only in folders "
                        "without class tokens)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes for opening pictures (default: one per CPU for large sets; 0 = none)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _add_resolution_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolution", default="", help="training resolution: 512, 1024 or WxH as 768x512 or 768,512 "
                                                    "(default: the native size of --model, as train uses it)")
    p.add_argument("--model", default="", help="the model the run will train, for its native size (default: the "
                                               "bundled toy model, train's default; 64 px)")


def _add_bucket_args(p: argparse.ArgumentParser) -> None:
    _add_resolution_args(p)
    p.add_argument("--min-bucket", type=int, default=0, help="smallest bucket side (default: half the resolution, "
                                                             "256 at 512)")
    p.add_argument("--max-bucket", type=int, default=0, help="largest bucket side (default: twice the resolution, "
                                                             "1024 at 512)")
    p.add_argument("--bucket-step", type=int, default=64, help="bucket side step (default: 64)")
    p.add_argument("--no-upscale", action="store_true", help="kohya's bucket_no_upscale: one bucket per picture size")
    p.add_argument("--no-buckets", action="store_true", help="one fixed size: resize to cover and centre-crop")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND")

    p = sub.add_parser("scan", help="validate pictures and captions")
    _add_dataset_args(p)
    _add_resolution_args(p)
    p.add_argument("--min-side", type=int, default=0, help="warn below this shorter side (default: the smallest "
                                                           "bucket side, half the resolution: 256 at 512)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse pictures above this many pixels (default: PIL's decompression-bomb limit)")
    p.add_argument("--all", action="store_true", help="list every picture, not only those with problems")
    p.set_defaults(_dataset=run_scan)

    p = sub.add_parser("tags", help="tag frequencies, token counts and bulk caption edits")
    _add_dataset_args(p)
    p.add_argument("--add", default="", help="comma-separated tags to add where missing")
    p.add_argument("--at-start", action="store_true", help="add the tags at the start instead of the end")
    p.add_argument("--remove", default="", help="comma-separated tags to remove")
    p.add_argument("--replace", action="append", default=[], metavar="OLD=NEW",
                   help="replace a whole tag (repeatable; OLD= removes it)")
    p.add_argument("--trigger", default=None, help="make this token the first tag of every caption")
    p.add_argument("--include-reg", action="store_true", help="also edit the regularization captions")
    p.add_argument("--write", action="store_true", help="write the edited captions (default: show what would change)")
    p.add_argument("--top", type=int, default=30, help="tags to list (default: 30)")
    p.add_argument("--approx-tokens", action="store_true",
                   help="estimate token counts instead of using the CLIP tokenizer")
    p.set_defaults(_dataset=run_tags)

    p = sub.add_parser("buckets", help="aspect-ratio buckets and batches")
    _add_dataset_args(p)
    _add_bucket_args(p)
    p.add_argument("--batch", type=int, default=1, help="batch size, for the batch count (default: 1)")
    p.set_defaults(_dataset=run_buckets)

    p = sub.add_parser("dedupe", help="near-duplicates and recurring features")
    _add_dataset_args(p)
    p.add_argument("--threshold", type=int, default=None,
                   help="largest crop-tolerant pHash distance (bits of 64) for near-duplicates (default: 12)")
    p.add_argument("--min-correlation", type=float, default=None,
                   help="smallest colour-structure correlation for near-duplicates (default: 0.95)")
    p.add_argument("--sheets", metavar="DIR", help="write a contact sheet per group into DIR")
    p.add_argument("--remove", action="store_true",
                   help="move every picture of a group except the suggested keeper to DIR/_removed (never deletes)")
    p.set_defaults(_dataset=run_dedupe)

    p = sub.add_parser("guidance", help="dataset size advice and step arithmetic")
    _add_dataset_args(p)
    _add_bucket_args(p)
    p.add_argument("--kind", default="subject", choices=["subject", "style", "finetune"],
                   help="what the dataset teaches (default: subject)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default: 10)")
    p.set_defaults(_dataset=run_guidance)

    p = sub.add_parser("classgen", help="render class (regularization) pictures with a model")
    p.add_argument("dir", help="output folder, e.g. reg/1_dog (created; existing pictures are kept and skipped)")
    p.add_argument("--model", required=True, help="base model file (.safetensors / .ckpt)")
    p.add_argument("--prompt", required=True, help="class prompt, e.g. 'a photo of a dog'")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--count", type=int, default=200, help="pictures in the set (default: 200)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampling steps (default: {DEFAULT_STEPS})")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER,
                   help=f"{accepted_samplers()} (default: {DEFAULT_SAMPLER})")
    p.add_argument("--cfg", type=float, default=DEFAULT_CFG_SCALE, help=f"CFG scale (default: {DEFAULT_CFG_SCALE:g})")
    p.add_argument("--batch", type=int, default=1, help="pictures per sampling call (default: 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(_dataset=run_classgen)


def run(args: argparse.Namespace) -> int:
    fn = getattr(args, "_dataset", None)
    if fn is None:
        raise UserError("choose a subcommand: scan, tags, buckets, dedupe, guidance or classgen "
                        "(python -m lib_sdtrain dataset --help)")
    return int(fn(args) or 0)


# ---- helpers -----------------------------------------------------------------------------------------------
def _scan(args: argparse.Namespace, *, fingerprint: bool = False, **kw: Any):
    from ..data.scan import scan_dataset

    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be 0 (none) or more, not {args.workers}")
    return scan_dataset(args.dir, reg_path=args.reg, caption_ext=args.caption_ext,
                        filename_captions=args.filename_captions, fingerprint=fingerprint,
                        workers=args.workers, **kw)


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    from ..data.scan import shown

    # a newline or other control character in a cell (a file name's) would break the row: shown escaped
    cells = [[str(h) for h in headers]] + [[shown(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _rel(path: Path, root: Path) -> str:
    """A file's name for human-readable output: relative to `root`, control characters escaped (JSON gives it
    exactly)."""
    from ..data.scan import relative_name, shown

    return shown(relative_name(path, root))


def _run_resolution(args: argparse.Namespace) -> tuple[tuple[int, int], str]:
    """(w, h) the run would train at: --resolution, else --model's native size (the toy model by default)."""
    if args.resolution and args.resolution.strip() != "0":    # 0 = the model's native size, as in train
        from ..data.buckets import parse_resolution

        return parse_resolution(args.resolution), "--resolution"
    from ..hosts import default_model
    from ..models.native import probe_model

    probe = probe_model(args.model or default_model())
    return (probe.native, probe.native), f"native size of {probe.path.name}; --resolution or --model to change"


def _plan(records, args: argparse.Namespace):
    from ..data.buckets import plan_buckets
    from ..data.scan import effective_repeats
    from ..models.native import default_buckets_for

    usable = [r for r in records if r.usable]
    repeats = effective_repeats(usable)
    (w, h), source = _run_resolution(args)
    low, high = default_buckets_for(w, h)
    print(f"resolution {w}x{h} ({source})", file=sys.stderr)
    return usable, plan_buckets([(r.width, r.height) for r in usable], repeats, resolution=(w, h),
                                min_size=args.min_bucket or low, max_size=args.max_bucket or max(high, w, h),
                                step=args.bucket_step,
                                no_upscale=args.no_upscale, enable=not args.no_buckets)


# ---- subcommands -------------------------------------------------------------------------------------------
def run_scan(args: argparse.Namespace) -> int:
    # -1 gave "small-picture warnings below -1 px"; --max-pixels 0 marked every picture unusable as too large
    if args.min_side < 0:
        raise UserError(f"--min-side must be 0 (the smallest bucket side) or more, not {args.min_side}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise UserError(f"--max-pixels must be at least 1, not {args.max_pixels}")
    min_side, source = args.min_side, "--min-side"
    if not min_side:
        from ..models.native import default_buckets

        (w, h), source = _run_resolution(args)
        min_side = default_buckets(min(w, h))[0]
        source = f"smallest bucket at {w}x{h}, {source}"
    report = _scan(args, min_side=min_side, max_pixels=args.max_pixels)
    if args.json:
        _print_json(report.to_dict())
        return 0
    from ..data.scan import shown

    root = report.root
    print(_table([(_rel(s.folder, root) or ".", s.repeats, s.class_tokens or "-", "reg" if s.is_regularization
                   else "instance", s.image_count) for s in report.subsets],
                 ["folder", "repeats", "class tokens", "kind", "pictures"]))
    print()
    rows = []
    for r in report.records:
        if not r.problems and not args.all:
            continue
        probs = "; ".join(f"{p.severity}: {p.message}" for p in r.problems) or "ok"
        rows.append((_rel(r.path, root), f"{r.width}x{r.height}", r.caption_source, probs))
    if rows:
        print(_table(rows, ["picture", "size", "caption", "problems"]))
        print()
    for path, why in report.skipped:
        print(f"skipped {_rel(path, root)}: {shown(why)}")
    for note in report.notes:
        print(f"note: {shown(note)}")
    print(f"small-picture warnings below {min_side} px ({source})")
    c = report.counts()
    print(f"{c['pictures']} pictures: {c['usable']} usable ({c['warnings']} with warnings), {c['errors']} unusable; "
          f"{c['instance']} instance, {c['regularization']} regularization; "
          f"{c['instance_with_repeats']} instance samples per epoch"
          + (f"; {c['mask_files']} with a loss mask file (\"-masklabel\", used with masked_loss)"
             if c["mask_files"] else ""))
    return 0


def run_tags(args: argparse.Namespace) -> int:
    from ..data import captions as C

    if args.top < 0:          # -1 listed every tag but the last
        raise UserError(f"--top must be 0 or more, not {args.top}")
    report = _scan(args)
    records = report.records
    edits = []
    if args.trigger is not None:
        trigger = C.check_trigger(args.trigger)
        edits.append(lambda c, t=trigger: C.set_trigger(c, t))
    if args.replace:
        mapping = C.parse_replacements(args.replace)
        edits.append(lambda c, m=mapping: C.replace_tags(c, m))
    if args.remove:
        drop = C.split_tags(args.remove)
        edits.append(lambda c, d=drop: C.remove_tags(c, d))
    if args.add:
        new = C.split_tags(args.add)
        edits.append(lambda c, n=new: C.add_tags(c, n, at_start=args.at_start))
    if args.write and not edits:
        raise UserError("--write needs an edit: --add, --remove, --replace or --trigger")

    def edit(caption: str) -> str:
        for fn in edits:
            caption = fn(caption)
        return caption

    changes = C.plan_caption_edits([r for r in records if r.usable], edit, caption_ext=args.caption_ext,
                                   include_regularization=args.include_reg) if edits else []
    written = C.apply_caption_changes(changes) if args.write else []
    not_edited = C.too_long_to_edit([r for r in records if r.usable], include_regularization=args.include_reg) \
        if edits else []
    table = C.tag_table(records)
    tokens = C.token_report(records, None if args.approx_tokens else C.default_tokenizer())
    trig = C.trigger_report(records, args.trigger or "")
    if args.json:
        _print_json({"tag_frequency": C.tag_frequency(records),
                     "tags": [{"tag": t, "count": n, "share": round(s, 3)} for t, n, s in table],
                     "tokens": tokens, "trigger": trig, "changes": [c.to_dict() for c in changes],
                     "written": [str(p) for p in written], "not_edited": [str(r.path) for r in not_edited]})
        return 0
    print(_table([(t, n, f"{s:.0%}") for t, n, s in table[:args.top]], ["tag", "pictures", "share"]))
    if len(table) > args.top:
        print(f"... {len(table) - args.top} more tags")
    print(f"\ntokens per caption ({'exact' if tokens['exact'] else 'estimated'}): max {tokens['max']}, "
          f"mean {tokens['mean']:.1f}; {len(tokens['over_window'])} over the {tokens['window']}-token window")
    for item in tokens["over_window"][:10]:
        print(f"  {_rel(Path(item['path']), report.root)}: {item['tokens']} tokens")
    if trig["triggers"]:
        print(f"\ntrigger {', '.join(trig['triggers'])}: first in {trig['first']}, in the first half of "
              f"{trig['early']}, in the second half of {trig['late']}, missing from {trig['missing']} captions")
        if trig["hint"]:
            print(f"hint: {trig['hint']}")
    if changes:
        print(f"\n{len(changes)} captions {'written' if args.write else 'would change (add --write to save)'}:")
        for c in changes[:20]:
            print(f"  {_rel(c.image, report.root)}: {c.old!r} -> {c.new!r}" + (" (new caption file)" if c.creates_file else ""))
        if len(changes) > 20:
            print(f"  ... {len(changes) - 20} more")
    elif edits:
        print("\nno caption changes")
    if not_edited:
        from ..data.caption_limit import MAX_CAPTION_BYTES

        print(f"\n{len(not_edited)} captions left unedited: their files are too long to read whole (over "
              f"{MAX_CAPTION_BYTES // 1024} KiB); shorten them by hand:")
        for r in not_edited[:10]:
            print(f"  {_rel(r.path, report.root)}")
    return 0


def run_buckets(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    report = _scan(args)
    usable, plan = _plan(report.records, args)
    counts = plan.counts()
    pictures: dict[tuple[int, int], int] = {}
    for a, n in zip(plan.assignments, plan.repeats):
        if n > 0:
            pictures[a.bucket] = pictures.get(a.bucket, 0) + 1
    if args.json:
        _print_json({
            "ladder": [list(b) for b in plan.ladder], "bucket_info": plan.bucket_info(),
            "batches_per_epoch": plan.batch_count(args.batch),
            "pictures": [{"path": str(r.path), "bucket": list(a.bucket), "resized": list(a.resized),
                          "crop_left": a.crop_left, "crop_top": a.crop_top, "repeats": n}
                         for r, a, n in zip(usable, plan.assignments, plan.repeats)],
        })
        return 0
    print(_table([(f"{w}x{h}", f"{w / h:.2f}", pictures[(w, h)], n) for (w, h), n in counts.items()],
                 ["bucket", "aspect", "pictures", "with repeats"]))
    print(f"\n{len(counts)} buckets used of {len(plan.ladder) or 'per-picture'}; mean aspect error "
          f"{plan.mean_ar_error():.4f}; {plan.batch_count(args.batch)} batches of {args.batch} per epoch")
    return 0


def run_dedupe(args: argparse.Namespace) -> int:
    from ..data.dedupe import (MIN_CORRELATION, PHASH_MAX, contact_sheets, find_duplicate_groups, move_to_removed,
                               same_file_groups)
    from ..data.features import recurring_features
    from ..data.scan import shown

    threshold = PHASH_MAX if args.threshold is None else args.threshold
    min_corr = MIN_CORRELATION if args.min_correlation is None else args.min_correlation
    if not 0 <= threshold <= 32:
        raise UserError(f"--threshold must be between 0 and 32 bits, got {threshold}")
    if not -1.0 <= min_corr <= 1.0:
        raise UserError(f"--min-correlation must be between -1 and 1, got {min_corr}")
    report = _scan(args, fingerprint=True)
    if args.sheets and _read_for_pictures(Path(args.sheets), report, args.reg):
        raise UserError(f"--sheets {shown(args.sheets)} is a picture folder of the dataset, or would be one with "
                        "pictures in it: the contact sheets would be trained on. Give a folder outside it")
    groups = find_duplicate_groups(report.records, phash_max=threshold, min_correlation=min_corr)
    same = same_file_groups(report.records)
    features = recurring_features(report.records)
    sheets = contact_sheets(groups, args.sheets) if args.sheets and groups else []
    moved = []
    if args.remove:
        extra = [p for g in groups for p in g.paths if p != g.keep]
        moved = move_to_removed(extra, report.root, caption_ext=args.caption_ext, keep=[g.keep for g in groups],
                                reg_root=args.reg)
    if args.json:
        _print_json({"groups": [[str(p) for p in g.paths] for g in groups],
                     "details": [g.to_dict() for g in groups],
                     "same_file": [[str(p) for p in paths] for paths in same],
                     "recurring": [f.to_dict() for f in features],
                     "sheets": [str(p) for p in sheets],
                     "moved": [{"from": str(a), "to": str(b)} for a, b in moved]})
        return 0
    root = report.root
    if groups:
        print(f"{len(groups)} groups of near-duplicates:")
        for i, g in enumerate(groups, 1):
            print(f"  {i}. " + ", ".join(_rel(p, root) + (" (keep)" if p == g.keep else "") for p in g.paths))
    else:
        print("no near-duplicates")
    if same:
        print("the same file reached twice through a link (not copies: nothing is moved; remove the link to "
              "train it once):")
        for line in _same_file_lines(same, root):
            print(f"  {line}")
    for p in sheets:
        print(f"contact sheet: {p}")
    for a, b in moved:
        print(f"moved {_rel(a, root)} -> {_rel(b, root)}")
    if features:
        print("\nrecurring features:")
        for f in features:
            print(f"  [{shown(f.concept)}] {f.label}: {f.count}/{f.total}. {f.advice}")
    return 0


def _read_for_pictures(folder: Path, report: Any, reg: str | None) -> bool:
    """Whether a scan of this dataset would read pictures put in `folder`: a picture folder, the dataset or --reg
    folder itself or a folder between it and a picture folder (img/: a flat folder's loose pictures are read), or
    a new N_name folder in one of those."""
    from ..data.scan import parse_folder_name

    folder = folder.expanduser().resolve()
    roots = [report.root.resolve()] + ([Path(reg).expanduser().resolve()] if reg else [])
    feeding = set(roots)
    for sub in report.subsets:
        f = sub.folder.resolve()
        feeding.add(f)
        for root in roots:
            if root in f.parents:
                feeding.update(p for p in f.parents if p == root or root in p.parents)
    return folder in feeding or (parse_folder_name(folder.name) is not None and folder.parent in feeding)


def _same_file_lines(same: Sequence[Sequence[Path]], root: Path) -> list[str]:
    """One line per set of folders: a linked folder's pictures are said once, with a count, not one by one."""
    from ..data.scan import shown

    by_folders: dict[tuple[Path, ...], list[Sequence[Path]]] = {}
    for paths in same:
        by_folders.setdefault(tuple(p.parent for p in paths), []).append(paths)
    lines = []
    for folders, groups in by_folders.items():
        if len(set(folders)) == len(folders) and len(groups) > 1:
            names = ", ".join(shown(paths[0].name) for paths in groups[:3])
            lines.append(f"{' = '.join(_rel(f, root) + '/' for f in folders)}: {len(groups)} pictures "
                         f"({names}{', ...' if len(groups) > 3 else ''})")
        else:
            lines += [" = ".join(_rel(p, root) for p in paths) for paths in groups]
    return lines


def run_guidance(args: argparse.Namespace) -> int:
    from ..data.guidance import dataset_guidance

    report = _scan(args)
    _, plan = _plan(report.records, args)
    result = dataset_guidance(report.records, kind=args.kind, batch_size=args.batch, accumulation=args.accum,
                              epochs=args.epochs, bucket_counts=list(plan.counts().values()))
    if args.json:
        _print_json(result)
        return 0
    for a in result["advice"]:
        print(f"{'ok' if a['level'] == 'ok' else 'WARNING'}: {a['text']}")
    s = result["steps"]
    reg = " × 2 (regularization)" if s["regularization_factor"] == 2 else ""
    print(f"\n{result['instance']} pictures × repeats = {s['samples_per_epoch'] // s['regularization_factor']}{reg} "
          f"samples per epoch; batch {s['batch_size']} × accumulation {s['accumulation']}: "
          f"{s['batches_per_epoch']} batches, {s['steps_per_epoch']} steps per epoch, "
          f"{s['total_steps']} steps in {s['epochs']} epochs")
    for h in s["hints"]:
        print(f"hint: {h}")
    return 0


def run_classgen(args: argparse.Namespace) -> int:
    from ..classgen import generate_class_images
    from ..events import Events, StopToken
    from ..sample_settings import check_sampler

    check_sampler(args.sampler)   # the standalone host draws with ours only: refused before a model loads
    try:
        from ..hosts.standalone import StandaloneHost
    except ImportError as e:
        raise UserError(f"the standalone model loader is not available: {e}") from None
    host = StandaloneHost()
    parts = host.load(args.model)

    def show(event) -> None:
        if args.json:
            return
        if event.kind == "progress":
            print(f"\r{event.data['step']}/{event.data['total']} class pictures", end="", file=sys.stderr, flush=True)
        elif event.kind == "status":
            print(event.data["text"], file=sys.stderr)

    try:
        result = generate_class_images(host, parts, args.prompt, args.count, args.dir, seed=args.seed,
                                       width=args.width, height=args.height, steps=args.steps, sampler=args.sampler,
                                       events=Events(show), stop=StopToken(), negative=args.negative,
                                       cfg_scale=args.cfg, batch_size=args.batch)
    finally:
        release = getattr(host, "release", None)
        if callable(release):
            release(parts)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(f"\n{result.generated} rendered, {result.skipped} already present, {len(result.paths)} in {args.dir}")
    return 0
