"""Run discovery: which files a training run saved, and at which epoch and step.

A run (train/loop.py, train/checkpoints.py `RunFiles`) leaves
    <output folder>/NAME-000004<suffix>        epoch 4 (kohya's naming)
    <output folder>/NAME-step00000120<suffix>  step 120
    <output folder>/NAME<suffix>               the final file
    <runs>/NAME/config.toml, loss.csv, samples/A, samples/B
The epoch and step of a file come from its name, and from its metadata (`ss_epoch`, `ss_steps`, which kohya
and this extension write) where the file has one: the final file's name carries neither. The same naming
holds for every method; only the folder (Host.output_dir kind) and the suffix differ.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..methods import METHODS

# standalone host layout: <output root>/<folder of kind> (hosts/standalone.py OUTPUT_KINDS)
STANDALONE_FOLDERS = {"lora": "Lora", "embedding": "embeddings", "hypernetwork": "hypernetworks",
                      "checkpoint": "Stable-diffusion"}

_SAVE_NAME = re.compile(r"^(?P<name>.+?)(?:-(?P<epoch>\d{6})|-step(?P<step>\d{6,}))?$")


@dataclass
class SavedFile:
    """One file a run saved."""

    path: Path
    name: str                    # the run's output name (the file stem without the epoch/step suffix)
    epoch: int | None = None
    step: int | None = None
    final: bool = False
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """What A1111 calls the file: `<lora:STEM:1>`, the embedding's token, the checkpoint's name."""
        return self.path.stem

    @property
    def label(self) -> str:
        """e.g. "epoch 2 · step 120", "final · epoch 4 · step 240", "step 300"."""
        parts = ["final"] if self.final else []
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}")
        if self.step is not None:
            parts.append(f"step {self.step}")
        return " · ".join(parts) or self.stem

    def sort_key(self) -> tuple:
        # the final file last; the others by step where known, else by epoch
        return (self.final, self.step if self.step is not None else -1, self.epoch if self.epoch is not None else -1,
                self.stem)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "stem": self.stem, "epoch": self.epoch, "step": self.step,
                "final": self.final, "label": self.label}


def parse_save_name(stem: str, name: str | None = None) -> tuple[str, int | None, int | None] | None:
    """(run name, epoch, step) from a file stem; None when `name` is given and the stem is not one of its files.

    "lora-000004" → ("lora", 4, None); "lora-step00000120" → ("lora", None, 120); "lora" → ("lora", None, None).
    """
    if name is not None:
        if stem == name:
            return name, None, None
        if not stem.startswith(name + "-"):
            return None
        rest = stem[len(name) + 1:]
        if re.fullmatch(r"\d{6}", rest):
            return name, int(rest), None
        m = re.fullmatch(r"step(\d{6,})", rest)
        return (name, None, int(m.group(1))) if m else None
    m = _SAVE_NAME.match(stem)
    assert m is not None  # the pattern matches every non-empty string
    epoch, step = m.group("epoch"), m.group("step")
    return m.group("name"), int(epoch) if epoch else None, int(step) if step else None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


PT_METADATA_MAX_BYTES = 300_000_000   # .pt files are read whole (safe unpickler); skip big ones


def _pt_metadata(path: Path) -> dict[str, str]:
    """A1111 embedding / hypernetwork .pt: its `step`, and our run keys kept in `optional_info` (JSON)."""
    try:
        if path.stat().st_size > PT_METADATA_MAX_BYTES:
            return {}
        from ..formats.safe_pickle import load_checkpoint

        obj = load_checkpoint(path)
    except (OSError, UserError):
        return {}
    if not isinstance(obj, dict):
        return {}
    meta: dict[str, str] = {}
    info = obj.get("optional_info")
    if isinstance(info, str):
        try:
            data = json.loads(info)
            if isinstance(data, dict):
                meta.update({str(k): str(v) for k, v in data.items()})
        except ValueError:
            pass
    if obj.get("step") is not None and "ss_steps" not in meta:
        meta["ss_steps"] = str(obj["step"])
    return meta


def file_metadata(path: Path) -> dict[str, str]:
    """Metadata of a saved file: a .safetensors header (no tensors read), or what an A1111 .pt holds; {} when
    unreadable."""
    if path.suffix.lower() == ".pt":
        return _pt_metadata(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    from ..formats.safetensors_io import read_metadata

    try:
        return read_metadata(path)
    except UserError:
        return {}


def describe_file(path: str | Path, name: str | None = None) -> SavedFile | None:
    """A `SavedFile` for `path` (epoch/step from the name, then from `ss_epoch`/`ss_steps`)."""
    path = Path(path)
    parsed = parse_save_name(path.stem, name)
    if parsed is None:
        return None
    run_name, epoch, step = parsed
    meta = file_metadata(path)
    meta_epoch, meta_step = _int_or_none(meta.get("ss_epoch")), _int_or_none(meta.get("ss_steps"))
    if step is not None and meta_epoch is not None:
        meta_epoch += 1            # kohya (and we, as kohya) write the 0-based epoch index into step saves
    final = epoch is None and step is None
    return SavedFile(path, run_name, epoch if epoch is not None else meta_epoch,
                     step if step is not None else meta_step, final, meta)


def saved_files(folder: str | Path, name: str, suffixes: tuple[str, ...]) -> list[SavedFile]:
    """Every file of run `name` in `folder`, oldest first (final last)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        if p.is_file() and p.suffix.lower() in suffixes and (p.stem == name or p.stem.startswith(name + "-")):
            f = describe_file(p, name)
            if f is not None:
                out.append(f)
    return sorted(out, key=SavedFile.sort_key)


def group_saved_files(folder: str | Path, suffixes: tuple[str, ...]) -> dict[str, list[SavedFile]]:
    """All files in `folder` grouped by run name; only names with at least one epoch or step save.

    Used where no run is chosen (A1111's X/Y/Z axis choices): "a-000001", "a-000002", "a" form run "a".
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    stems = {p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes}
    groups: dict[str, list[SavedFile]] = {}
    for stem, p in stems.items():
        name, epoch, step = parse_save_name(stem)  # type: ignore[misc]
        if epoch is None and step is None:
            continue
        groups.setdefault(name, [])
    for name in groups:
        groups[name] = [f for f in (describe_file(stems[s], name) for s in stems
                                    if s == name or s.startswith(name + "-")) if f is not None]
        groups[name].sort(key=SavedFile.sort_key)
    return {k: groups[k] for k in sorted(groups)}


@dataclass
class LossCurve:
    steps: list[int]
    epochs: list[int]
    losses: list[float]
    ema: list[float]

    def __len__(self) -> int:
        return len(self.steps)


def read_loss_csv(path: str | Path) -> LossCurve | None:
    """The loop's `loss.csv` (step, epoch, loss, loss_ema, lr, time); a resumed run's repeated steps keep the
    last row. None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    rows: dict[int, tuple[int, float, float]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                try:
                    rows[int(row["step"])] = (int(row["epoch"]), float(row["loss"]), float(row["loss_ema"]))
                except (KeyError, TypeError, ValueError):
                    continue
    except OSError:
        return None
    steps = sorted(rows)
    return LossCurve(steps, [rows[s][0] for s in steps], [rows[s][1] for s in steps], [rows[s][2] for s in steps])


@dataclass
class RunInfo:
    """A training run as the comparison sees it."""

    name: str
    method: str
    kind: str                            # Host.output_dir kind of its files
    files: list[SavedFile]
    run_dir: Path | None = None
    files_dir: Path | None = None
    config: Any = None                   # TrainSettings, when known (config.toml or the files' `lab.config`)

    @property
    def loss(self) -> LossCurve | None:
        return read_loss_csv(self.run_dir / "loss.csv") if self.run_dir else None

    @property
    def base_model(self) -> str:
        return getattr(self.config, "model", "") or ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "kind": self.kind,
                "run_dir": str(self.run_dir) if self.run_dir else None,
                "files_dir": str(self.files_dir) if self.files_dir else None,
                "files": [f.to_dict() for f in self.files]}


def _method_kind(method: str, cfg: Any = None) -> tuple[str, tuple[str, ...]]:
    """Output kind and suffixes of a method (registry); with the run's settings, the suffix they choose first."""
    if method not in METHODS:
        raise UserError(f"unknown training method {method!r} in the run's settings")
    spec = METHODS[method]
    if cfg is not None:
        try:
            from ..methods import create_method

            return spec.output_kind, tuple(dict.fromkeys((create_method(cfg).file_suffix, *spec.suffixes)))
        except (UserError, ImportError, AttributeError):
            pass
    return spec.output_kind, spec.suffixes


def _settings_from_metadata(meta: dict[str, str]) -> Any:
    """TrainSettings from a saved file's `lab.config` (the loop writes the whole run config there)."""
    from ..formats.safetensors_io import json_table

    data = json_table(meta.get("lab.config"))
    if data is None:
        return None
    try:
        from ..config import migrate
        from ..train.settings import TrainSettings

        if "method" in data and ("model" in data or "data" in data):
            return TrainSettings.from_dict(migrate(TrainSettings, data))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, UserError):
        return None
    return None


def discover_run(path: str | Path, host: Any = None) -> RunInfo:
    """Find a run's saved files from its run folder, its output folder plus name, or one of its files.

    Args:
        path: the run folder (`<runs>/NAME`, with config.toml), or one saved file (its run's other files are
            found next to it).
        host: the Host whose `output_dir(kind)` holds the files when the run's config names no output folder.
            Without one the standalone layout is assumed (`<root>/runs/NAME` → `<root>/<Lora|embeddings|...>`).
    """
    path = Path(path).expanduser()
    if path.is_file():
        f = describe_file(path)
        if f is None:
            raise UserError(f"{path.name} is not a training output")
        run_dir = _runs_folder_guess(path.parent, f.name, host)
        if run_dir is not None and (run_dir / "config.toml").is_file():
            from ..config import load_config
            from ..train.settings import TrainSettings

            cfg = load_config(TrainSettings, run_dir / "config.toml")
        else:
            cfg = _settings_from_metadata(f.metadata)
        method = getattr(cfg, "method", None) or _guess_method(path, f.metadata)
        kind, suffixes = _method_kind(method, cfg)
        name = getattr(cfg, "name", None) or f.name
        files = saved_files(path.parent, name, suffixes)
        if not any(g.path == path for g in files):
            # a renamed copy beside the run's files ("lo_v2.safetensors" next to lo-000001...): the run's files
            # were compared in its place; the file given is compared, with the saves of its own name
            name = f.name
            files = saved_files(path.parent, name, suffixes) or [f]
        return RunInfo(name, method, kind, files, run_dir, path.parent, cfg)
    if not path.is_dir():
        raise UserError(f"run folder not found: {path}")
    config_path = path / "config.toml"
    if not config_path.is_file():
        raise UserError(f"{path} is not a run folder (no config.toml); pass the run folder or one of its files")
    from ..config import load_config
    from ..train.settings import TrainSettings

    cfg = load_config(TrainSettings, config_path)
    kind, suffixes = _method_kind(cfg.method, cfg)
    candidates = []
    if cfg.output:
        candidates.append(Path(cfg.output))
    if host is not None:
        try:
            candidates.append(Path(host.output_dir(kind)))
        except (ValueError, KeyError):
            pass
    candidates.append(path.parent.parent / STANDALONE_FOLDERS.get(kind, kind))
    for folder in candidates:
        files = saved_files(folder, cfg.name, suffixes)
        if files:
            return RunInfo(cfg.name, cfg.method, kind, files, path, folder, cfg)
    raise UserError(f"no saved files of run '{cfg.name}' found (looked in "
                    f"{', '.join(str(c) for c in dict.fromkeys(candidates))})")


def _guess_method(path: Path, meta: dict[str, str]) -> str:
    if any(k.startswith("ss_network") for k in meta) or "lab.network" in meta:
        return "lora"
    if path.suffix.lower() == ".pt":
        return "hypernetwork"
    raise UserError(f"cannot tell which kind of training output {path.name} is; pass its run folder")


def _runs_folder_guess(files_dir: Path, name: str, host: Any) -> Path | None:
    candidates = []
    if host is not None:
        try:
            candidates.append(Path(host.output_dir("runs")) / name)
        except (ValueError, KeyError):
            pass
    candidates.append(files_dir.parent / "runs" / name)
    for c in candidates:
        if (c / "config.toml").is_file() or (c / "loss.csv").is_file():
            return c
    return None


def list_runs(runs_root: str | Path) -> list[Path]:
    """Run folders (with config.toml) under `runs_root`, newest first."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / "config.toml").is_file()]
    return sorted(runs, key=lambda p: (p / "config.toml").stat().st_mtime, reverse=True)
