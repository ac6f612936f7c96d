"""Converting many files: inputs -> planned outputs -> one result per input, with progress events.

Inputs are files or folders (searched recursively for `.ckpt`/`.pt`/`.pth`/`.bin`; the sub-folder layout
is mirrored under the output folder). Each file is hashed, opened with the safe loader, recognised by the
first matching entry of `KINDS` and handed to that kind's converter. Nothing existing is replaced unless
`overwrite`; an output that already holds a conversion of the very same source (same sha256 and dtype) is
reported "up to date" instead. A refused file never stops the batch; its result says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..events import Events, StopToken
from ..formats import hashes
from ..formats.files import safe_child
from . import checkpoint, embedding, hypernetwork
from .output import ConvertConfig, ConvertResult, a1111_hashes, read_metadata
from ..formats.safe_pickle import PICKLE_SUFFIXES, open_checkpoint

OUTPUT_SUFFIX = ".safetensors"

# kind -> (recognise(root, path) -> bool, convert(archive, out_path, cfg, source_sha256) -> ConvertResult).
# Tried in this order; "checkpoint" takes any state dict with a tensor, so it comes last.
KINDS: dict[str, tuple[Callable[[Any], bool], Callable[..., ConvertResult]]] = {
    "hypernetwork": (hypernetwork.looks_like, hypernetwork.convert),
    "embedding": (embedding.looks_like, embedding.convert),
    "checkpoint": (checkpoint.looks_like, checkpoint.convert),
}


@dataclass
class Job:
    source: Path
    output: Path


def plan(inputs: list[str | Path], output_dir: str | Path, claimed: dict[Path, Path] | None = None
         ) -> tuple[list[Job], list[ConvertResult]]:
    """Jobs for every input file, and refusals for inputs that cannot even be planned (missing, wrong type,
    an output name outside `output_dir`, two inputs that would write the same output). `claimed`: outputs that
    other inputs of the same batch write (resolved output -> resolved source)."""
    out_dir = Path(output_dir)
    jobs: list[Job] = []
    refused: list[ConvertResult] = []
    claimed = dict(claimed or {})
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = [(f, f.relative_to(path)) for f in _walk(path)]
            if not found:
                refused.append(ConvertResult(path, "refused", message=f"no {'/'.join(PICKLE_SUFFIXES)} files in {path}"))
        elif path.is_file():
            if path.suffix.lower() not in PICKLE_SUFFIXES:
                refused.append(ConvertResult(path, "refused", message=f"{path.name}: not a pickled model file "
                                                                      f"({', '.join(PICKLE_SUFFIXES)})"))
                continue
            found = [(path, Path(path.name))]
        else:
            refused.append(ConvertResult(path, "refused", message=f"input not found: {path}"))
            continue
        for source, rel in found:
            try:
                target = safe_child(out_dir, rel.with_suffix(OUTPUT_SUFFIX).as_posix())
            except UserError as e:
                refused.append(ConvertResult(source, "refused", message=str(e)))
                continue
            if claimed.get(target) == source.resolve():  # the same file named twice (itself and its folder)
                continue
            if target in claimed:
                refused.append(ConvertResult(source, "refused", message=f"{source.name}: would write "
                                             f"{target.name} like {claimed[target]}; rename one of them"))
                continue
            claimed[target] = source.resolve()
            jobs.append(Job(source, target))
    return jobs, refused


def _walk(folder: Path) -> list[Path]:
    # os.walk does not follow directory symlinks, so a link loop cannot trap us
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in PICKLE_SUFFIXES:
                out.append(Path(root) / name)
    return out


def convert_file(job: Job, cfg: ConvertConfig, events: Events | None = None) -> ConvertResult:
    """Convert one file; every expected problem becomes a "refused" result, never an exception."""
    events = events or Events()
    source, out_path = job.source, job.output
    try:
        if out_path.exists() and os.path.samefile(out_path, source):
            return ConvertResult(source, "refused", message=f"{source.name}: output would replace the input")
        if out_path.exists() and not cfg.overwrite:
            sha = hashes.sha256_file(source)
            meta = read_metadata(out_path)
            if meta.get("converted_from_sha256") == sha and meta.get("converted_dtype") == (cfg.dtype or "unchanged"):
                return ConvertResult(source, "up to date", meta.get("converted_kind", ""), out_path,
                                     message="already converted from this file", hashes=a1111_hashes(out_path, meta.get("converted_kind", "checkpoint")))
            return ConvertResult(source, "refused", output=out_path,
                                 message=f"{out_path.name} already exists (use --overwrite to replace it)")
        events.status(f"{source.name}: hashing")
        sha = hashes.sha256_file(source)
        events.status(f"{source.name}: reading")
        with open_checkpoint(source) as archive:
            for kind, (recognise, convert) in KINDS.items():
                if recognise(archive.root, source):
                    break
            else:
                return ConvertResult(source, "refused", message=f"{source.name}: no tensors found (not a model file)")
            events.status(f"{source.name}: converting ({kind})")
            result = convert(archive, out_path, cfg, sha, events)
        if result.status == "converted" and result.output is not None:
            result.hashes = a1111_hashes(result.output, result.kind)
            events.saved(str(result.output), file_kind=result.kind, **result.hashes)
        return result
    except UserError as e:
        return ConvertResult(source, "refused", message=str(e))
    except OSError as e:  # disk full, permissions: the user's to fix, not a bug
        return ConvertResult(source, "refused", message=f"{source.name}: {e.strerror or e}")


def convert_all(inputs: list[str | Path], output_dir: str | Path, cfg: ConvertConfig,
                events: Events | None = None, stop: StopToken | None = None,
                on_result: Callable[[ConvertResult], None] | None = None,
                claimed: dict[Path, Path] | None = None) -> list[ConvertResult]:
    """Plan and run a batch; results come in input order, refusals from planning first. `claimed`: the outputs
    other inputs of the same batch write (`plan`), refused here.

    Emits `progress(step, total, file=..., phase="files")` before each file (converters add
    `phase="tensors"` progress within a file) and `saved(path, ...)` after each output;
    `on_result` sees each result as soon as it is known (the CLI prints it).
    """
    events = events or Events()
    jobs, results = plan(inputs, output_dir, claimed)
    for result in results:
        if on_result:
            on_result(result)
    for i, job in enumerate(jobs):
        if stop is not None and stop.requested:
            result = ConvertResult(job.source, "refused", message=f"{job.source.name}: not started ({stop.reason})")
        else:
            events.progress(i, len(jobs), file=job.source.name, phase="files")
            result = convert_file(job, cfg, events)
        results.append(result)
        if on_result:
            on_result(result)
    events.progress(len(jobs), len(jobs), file="", phase="files")
    return results
