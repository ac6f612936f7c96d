"""What the CLI and the Convert tab share: which conversion an input gets, running it, and the report.

`route` decides per input (diffusers folder → single file, diffusers/PEFT LoRA → kohya, pickles →
.safetensors, or what `--to` asks for); `convert_other` runs the non-pickle conversions and turns every
expected problem into a "refused" result; `convert_inputs` runs a mixed list; `list_model_files` and
`result_rows` / `result_text` are the tab's plain, gradio-free handlers' building blocks. Nothing here
imports torch at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import UserError
from ..formats.names import MODEL_SUFFIXES
from .output import ConvertConfig, ConvertResult

TARGETS = ("safetensors", "kohya", "single-file", "diffusers")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_LISTED = 2000


def route(path: str | Path, to: str | None = None) -> str:
    """The conversion `path` gets: one of TARGETS, or "refuse:<reason>"."""
    from .diffusers_folder import is_diffusers_folder
    from .lora import looks_like_diffusers_lora

    path = Path(path)
    if to is not None and to not in TARGETS:
        return f"refuse:unknown target {to!r} (choose {', '.join(TARGETS)})"
    if to == "safetensors":
        return to
    if to == "single-file":
        return to if is_diffusers_folder(path) else f"refuse:{path.name} is not a diffusers folder " \
                                                    "(no model_index.json or unet/config.json)"
    if to == "diffusers":
        return to if path.is_file() and path.suffix.lower() in MODEL_SUFFIXES else \
            f"refuse:{path.name}: --to diffusers needs a single-file checkpoint ({', '.join(MODEL_SUFFIXES)})"
    if to == "kohya":
        return to
    if is_diffusers_folder(path):
        return "single-file"
    if looks_like_diffusers_lora(path):
        return "kohya"
    if path.is_file() and path.suffix.lower() == ".safetensors":
        return (f"refuse:{path.name} is already .safetensors; use --to diffusers to make a diffusers folder of a "
                "checkpoint, or --to kohya for a diffusers/PEFT LoRA")
    return "safetensors"


def output_for(path: Path, target: str, out_dir: Path) -> Path:
    from ..formats.files import safe_child
    from .lora import output_name

    if target == "kohya":
        return safe_child(out_dir, output_name(path))
    if target == "single-file":
        return safe_child(out_dir, f"{path.name}.safetensors")
    if target == "diffusers":
        return safe_child(out_dir, path.stem)
    raise ValueError(target)


def convert_other(path: str | Path, target: str, out_dir: str | Path, cfg: ConvertConfig | None = None, *,
                  family: str | None = None, prediction: str | None = None, lora_alpha: float | None = None,
                  events: Any = None) -> ConvertResult:
    """Run a kohya / single-file / diffusers conversion; expected problems become a "refused" result."""
    cfg = cfg or ConvertConfig()
    path, out_dir = Path(path), Path(out_dir)
    if target.startswith("refuse:"):
        return ConvertResult(path, "refused", message=target[len("refuse:"):])
    if not path.exists():
        return ConvertResult(path, "refused", message=f"input not found: {path}")
    try:
        out = output_for(path, target, out_dir)
        if target == "kohya":
            from .lora import convert_lora

            return convert_lora(path, out, family=family, prediction=prediction, lora_alpha=lora_alpha,
                                dtype=cfg.dtype, overwrite=cfg.overwrite, events=events)
        if target == "single-file":
            from .diffusers_folder import folder_to_file

            return folder_to_file(path, out, family=family, prediction=prediction, dtype=cfg.dtype,
                                  overwrite=cfg.overwrite, events=events)
        if target == "diffusers":
            from .diffusers_folder import file_to_folder

            return file_to_folder(path, out, prediction=prediction, overwrite=cfg.overwrite, events=events)
    except UserError as e:
        text = str(e)
        return ConvertResult(path, "refused", message=text if text.startswith(path.name) else f"{path.name}: {text}")
    except OSError as e:
        return ConvertResult(path, "refused", message=f"{path.name}: {e.strerror or e}")
    raise ValueError(f"not a conversion of this module: {target}")


def planned_outputs(inputs: Iterable[str | Path], out_dir: str | Path, to: str | None = None) -> list[Path]:
    """The files and folders a conversion of `inputs` would write (inputs it would refuse write nothing)."""
    from .batch import plan

    pickled, out = [], []
    for raw in inputs:
        target = route(raw, to)
        if target == "safetensors":
            pickled.append(raw)
        elif not target.startswith("refuse:") and Path(raw).exists():
            try:
                out.append(output_for(Path(raw), target, Path(out_dir)))
            except UserError:
                pass
    if pickled:
        out += [job.output for job in plan(pickled, out_dir)[0]]
    return out


def clean_stale_outputs(inputs: Iterable[str | Path], out_dir: str | Path, to: str | None = None) -> list[Path]:
    """Remove what an interrupted conversion of these inputs left behind: the temporary files (`atomic_write`'s
    ".NAME.xxxxxxxx.tmp") of the outputs this conversion will write, and a diffusers folder that was being
    written aside under such a name when it holds only the parts `file_to_folder` writes. Nothing else is
    touched: not another output's temporary file, not a finished file, not a folder kept aside during an
    overwrite (".NAME.xxxxxxxx.old", which may hold the user's previous folder). Returns what was removed."""
    from ..formats.files import remove_stale_temps
    from .diffusers_folder import is_partial_folder

    by_folder: dict[Path, set[str]] = {}
    for path in planned_outputs(inputs, out_dir, to):
        by_folder.setdefault(path.parent, set()).add(path.name)
    removed: list[Path] = []
    for folder, names in sorted(by_folder.items()):
        removed += remove_stale_temps(folder, names.__contains__, folder_is_ours=is_partial_folder)
    return removed


def convert_inputs(inputs: Iterable[str | Path], out_dir: str | Path, cfg: ConvertConfig | None = None, *,
                   to: str | None = None, family: str | None = None, prediction: str | None = None,
                   lora_alpha: float | None = None, events: Any = None, stop: Any = None,
                   on_result: Callable[[ConvertResult], None] | None = None,
                   clean_stale: bool = True) -> list[ConvertResult]:
    """Convert a mixed list of inputs, each by `route`; pickles go through `batch.convert_all` together. First
    `clean_stale_outputs` (unless the caller has just done it: `clean_stale=False`)."""
    from .batch import convert_all

    cfg = cfg or ConvertConfig()
    inputs = list(inputs)
    stale = clean_stale_outputs(inputs, out_dir, to) if clean_stale else []
    if stale and events is not None:
        events.status(f"removed {len(stale)} temporary file(s) an interrupted conversion left behind")
    pickled, results = [], []
    claimed = _claims(inputs, out_dir, to)
    for i, raw in enumerate(inputs):
        target = route(raw, to)
        if target == "safetensors":
            pickled.append(raw)
            continue
        first = claimed["by"].get(i)
        if first is not None:   # two inputs, one output name: the second would replace the first's output
            out, other = first
            result = ConvertResult(Path(raw), "refused", message=f"{Path(raw).name}: would write {out.name} like {other}; "
                                                                 "rename one of them")
        elif stop is not None and getattr(stop, "requested", False):
            result = ConvertResult(Path(raw), "refused", message=f"{Path(raw).name}: not started ({stop.reason})")
        else:
            result = convert_other(raw, target, out_dir, cfg, family=family, prediction=prediction,
                                   lora_alpha=lora_alpha, events=events)
        results.append(result)
        if on_result:
            on_result(result)
    if pickled:
        results += convert_all(pickled, out_dir, cfg, events, stop, on_result=on_result, claimed=claimed["other"])
    return results


def _claims(inputs: list[Any], out_dir: str | Path, to: str | None) -> dict[str, dict]:
    """Which input of a batch writes which output, the first input in order winning a name: "by" maps the index of
    each later non-pickle input whose output an earlier input writes to (that output, the earlier source); "other"
    maps each output of a non-pickle input that keeps its name to its source (`batch.plan` refuses pickles that
    would write it)."""
    from .batch import plan

    owner: dict[Path, Path] = {}
    by: dict[int, tuple[Path, Path]] = {}
    other: dict[Path, Path] = {}
    for i, raw in enumerate(inputs):
        target = route(raw, to)
        if target.startswith("refuse:") or not Path(raw).exists():
            continue
        if target == "safetensors":
            for job in plan([raw], out_dir)[0]:
                owner.setdefault(job.output, job.source.resolve())
            continue
        try:
            out = output_for(Path(raw), target, Path(out_dir))
        except UserError:
            continue
        source = Path(raw).resolve()
        if owner.get(out, source) != source:
            by[i] = (out, owner[out])
        else:
            owner[out] = other[out] = source
    return {"by": by, "other": other}


# ---- listing and reporting (the Convert tab's handlers use these) ---------------------------------------
def list_model_files(folders: Iterable[str | Path], *, recursive: bool = True) -> list[str]:
    """Model files (.ckpt/.pt/.pth/.bin/.safetensors) and diffusers folders under `folders`, sorted, deduplicated."""
    from .diffusers_folder import is_diffusers_folder

    out: list[str] = []
    seen: set[str] = set()
    for folder in folders:
        root = Path(str(folder)).expanduser()
        if not str(folder).strip() or not root.is_dir():
            continue
        for here, dirs, files in os.walk(root):
            here_path = Path(here)
            dirs.sort()
            if is_diffusers_folder(here_path) and here_path != root:
                dirs[:] = []          # a diffusers folder is one input; its component files are not
                found = [here_path]
            else:
                found = [here_path / f for f in sorted(files) if f.lower().endswith(MODEL_SUFFIXES)
                         and not f.startswith(".")]
            for p in found:
                key = str(p.resolve())
                if key not in seen:
                    seen.add(key)
                    out.append(str(p))
            if not recursive:
                dirs[:] = []
            if len(out) >= MAX_LISTED:
                return out
    return out


RESULT_COLUMNS = ["input", "status", "kind", "output", "A1111 short hash", "sha256", "details"]


def result_rows(results: Iterable[ConvertResult]) -> list[list[str]]:
    """One table row per result (the tab's result table)."""
    rows = []
    for r in results:
        details = [r.message] if r.message else []
        if r.dropped:
            details.append("dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(r.dropped.items())))
        details += [f"warning: {w}" for w in r.warnings]
        rows.append([r.source.name, r.status, r.kind, str(r.output or ""), r.hashes.get("shorthash", ""),
                     r.hashes.get("sha256", ""), "; ".join(details)])
    return rows


def result_text(results: list[ConvertResult]) -> str:
    """A short summary line (counts per status)."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing to do"
