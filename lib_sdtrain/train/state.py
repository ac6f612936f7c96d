"""The resumable run state, committed in one step, verified before use.

A state is `RUN/state/`:

    tensors-<step>-<random>.safetensors   method tensors (the trained weights) and the optimizer's tensors
    state.json                            the manifest: counters, losses, schedule, optimizer layout, settings,
                                          the saves made so far, the base model's identity (name, file,
                                          sha256), and the tensors file's name, size and sha256

Saving writes the tensors file first (temporary name, fsync, rename), then the manifest the same way; the
manifest's rename is the one commit point. A kill before it leaves the previous manifest naming the previous
tensors file, which is only deleted after the new manifest is in place, so the state on disk is always the
old one or the new one, never a mix. Loading checks the manifest's format, the tensors file's size and
sha256 and every tensor name and shape against the method, and refuses with a clear message otherwise.

The settings alone do not say which model was trained (`model = ""` means the host's loaded model), so the
manifest also records the base model; a resume refuses a different base (`check_base`): its untrained parts
(the VAE, the UNet blocks outside train_blocks, everything around an adapter) and the output's metadata would
otherwise silently come from another model. States written before the base was recorded still resume, with a
note that the base could not be checked.

A state is also written at the end of every run (`final` names the final file), so resuming a finished run
does nothing (or continues to a larger step count) instead of repeating steps. Nothing here is a pickle.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..formats.files import atomic_write, atomic_write_text, fsync_dir, remove_stale_temps

if TYPE_CHECKING:   # torch is imported where tensors are handled: reading a manifest (the command line's check
    import torch   # of --resume, before any work) needs none

STATE_FORMAT = 2
MANIFEST = "state.json"
TENSORS_GLOB = "tensors-*.safetensors"
LEGACY_TENSORS = "state.safetensors"   # versions before the manifest: state.safetensors, then state.json


# ---- finite weights ---------------------------------------------------------------------------------------
def nonfinite(tensors: dict[str, torch.Tensor], limit: int = 3) -> list[str]:
    """Names of (up to `limit`) floating-point tensors holding NaN or ±inf."""
    import torch

    bad = []
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


# ---- where a state is ---------------------------------------------------------------------------------------
def find_state_dir(path: str | Path) -> Path:
    """The state folder for what the user gave: a run folder, its `state/` folder, or the manifest itself."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == MANIFEST:
        p = p.parent
    if (p / "state" / MANIFEST).is_file() or ((p / "state").is_dir() and not (p / MANIFEST).is_file()):
        p = p / "state"
    return p


def has_state(run_dir: Path) -> bool:
    return (Path(run_dir) / "state" / MANIFEST).is_file()


_verified: dict[tuple, str] = {}   # (path, size, times, inode) -> sha256: a resume hashes its state once


def _sha256_file(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if key in _verified:
        return _verified[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    _verified.clear()
    _verified[key] = h.hexdigest()
    return _verified[key]


# ---- optimizer state as tensors + JSON ---------------------------------------------------------------------
def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors + JSON of an optimizer state; sharded (FSDP) tensors are gathered whole, so the layout is the same
    as one process's (a collective then: every process calls this, in the same order)."""
    import torch

    from ..models.sharding import full_tensor

    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        plain["state"][str(idx)] = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = full_tensor(v.detach()).cpu().contiguous()
                plain["state"][str(idx)][k] = {"tensor": f"optim.{idx}.{k}"}
            else:
                plain["state"][str(idx)][k] = v
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for idx, entry in plain["state"].items():
        state[int(idx)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in entry.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


# ---- save ---------------------------------------------------------------------------------------------------
def save_run_state(folder: Path, method, optimizer, scheduler, scaler, *, step: int, batch_no: int,
                   losses: list[float], cfg, saved: list[Path] = (), final: Path | None = None,
                   write: bool = True, base: dict[str, str] | None = None,
                   validation: list[tuple[int, float]] = (), plan: dict[str, int] | None = None) -> Path | None:
    """Write and commit a state (see the module docstring); returns the manifest's path. `base` is the base
    model's identity (`base_identity`), checked when the state is resumed; `validation` the (step, held-out loss)
    measurements so far, so a resumed run keeps its validation history and its rise warning; `plan` the step
    arithmetic it was saved under (`plan.plan_record`), so a resume notices another dataset or batch size.

    Refuses (UserError) to write non-finite trained tensors: a state that cannot continue is worth nothing,
    and the previous state stays committed. Under FSDP every process calls this (the tensors are gathered);
    `write` is true in rank 0 only, the others return None after gathering.
    """
    from safetensors.torch import save_file

    method_tensors = {f"method.{k}": v.detach().cpu().contiguous() for k, v in method.training_state().items()}
    bad = nonfinite(method_tensors)
    if bad:
        raise UserError(f"not saving the state at step {step}: the trained weights are not finite ({bad[0]})")
    tensors = dict(method_tensors)
    opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    if not write:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"tensors-{step:08d}-{secrets.token_hex(4)}.safetensors"
    atomic_write(folder / name, lambda p: save_file(tensors, str(p)))
    manifest = {
        "format": STATE_FORMAT,
        "tensors": {"file": name, "size": (folder / name).stat().st_size, "sha256": _sha256_file(folder / name),
                    "method_keys": {k: list(v.shape) for k, v in method_tensors.items()}},
        "step": step,
        "batch_no": batch_no,
        "losses": [float(x) if math.isfinite(x) else repr(float(x)) for x in losses],
        "validation": [[int(k), float(v) if math.isfinite(v) else repr(float(v))] for k, v in validation],
        "optimizer": opt_plain,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "method": method.name,
        "saved": [str(p) for p in saved],
        "final": str(final) if final else None,
        "config": {"version": cfg.VERSION, **cfg.to_dict()},
    }
    if base is not None:
        manifest["base"] = dict(base)
    if plan is not None:
        manifest["plan"] = dict(plan)
    path = atomic_write_text(folder / MANIFEST, json.dumps(manifest))   # the commit point
    for old in folder.glob(TENSORS_GLOB):       # tensors of earlier states: no manifest names them any more
        if old.name != name:
            old.unlink(missing_ok=True)
    fsync_dir(folder)
    return path


# ---- read and verify -----------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(state folder, manifest) after checking the manifest and its tensors file; UserError otherwise."""
    folder = find_state_dir(path)
    manifest_path = folder / MANIFEST
    if not folder.exists() and not folder.parent.exists():
        raise UserError(f"nothing to resume at {path}: no such run folder (give the run's folder, e.g. "
                        "outputs/runs/NAME)")
    if not manifest_path.is_file():
        if (folder / LEGACY_TENSORS).is_file():
            raise UserError(f"the state in {folder} was written by an older version that could not tell a complete "
                            "state from a half-written one; it cannot be verified, so it is not used")
        run = folder.parent if folder.name == "state" else folder
        orphans = sorted(folder.glob(TENSORS_GLOB))
        if orphans:   # a state's tensors without the manifest that says what they are and verifies them
            at = re.match(r"tensors-(\d+)-", orphans[-1].name)
            last = _last_save(run)
            raise UserError(
                f"the state in {folder} cannot be resumed: its manifest {MANIFEST} is missing (deleted, or the run "
                f"was stopped while writing its first state), and without it {orphans[-1].name}"
                f"{f' (step {int(at.group(1))})' if at else ''} cannot be verified or continued. Begin a new run "
                f"from the run's last saved file instead (start_from{f', e.g. {last}' if last else ''}; Dreambooth "
                "and finetune: that file as the model), or start the run again")
        if (run / "config.toml").is_file():
            raise UserError(f"no resumable state in {folder}: the run stopped before its first state was saved "
                            "(start it again instead of resuming)")
        raise UserError(f"nothing to resume at {path}: it is not a run folder (give the run's folder, e.g. "
                        "outputs/runs/NAME)")
    try:
        meta = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"the state manifest {manifest_path} cannot be read: {e}") from None
    if isinstance(meta, dict) and "format" not in meta and "tensors" not in meta and (folder / LEGACY_TENSORS).is_file():
        from ..launch import detect_launch

        if detect_launch().rank == 0:
            migrate_legacy_state(folder, meta)     # refuses (UserError) with the reason unless provably complete
        else:                                      # several processes: the first converts, the others wait for it
            _wait_for_migration(folder)
        return read_manifest(folder)
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or not isinstance(meta.get("tensors"), dict):
        raise UserError(f"{manifest_path} is not a state this version can resume (format "
                        f"{meta.get('format') if isinstance(meta, dict) else '?'}, expected {STATE_FORMAT})")
    t = meta["tensors"]
    for key, kind in (("step", int), ("batch_no", int), ("losses", list), ("optimizer", dict), ("scheduler", dict),
                      ("method", str), ("config", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise UserError(f"{manifest_path} is damaged: '{key}' is missing or of the wrong type")
    if not isinstance(t.get("file"), str) or "/" in t["file"] or "\\" in t["file"] or not isinstance(t.get("sha256"), str):
        raise UserError(f"{manifest_path} is damaged: it does not name its tensors file")
    tensors_path = folder / t["file"]
    if not tensors_path.is_file():
        raise UserError(f"the state in {folder} is incomplete: {t['file']} is missing")
    if tensors_path.stat().st_size != t.get("size") or _sha256_file(tensors_path) != t["sha256"]:
        raise UserError(f"the state in {folder} does not match its manifest ({t['file']} was changed or damaged); "
                        "it is not used")
    if len(meta["losses"]) != meta["step"]:
        raise UserError(f"{manifest_path} is damaged: {len(meta['losses'])} losses for {meta['step']} steps")
    if "base" in meta and not (isinstance(meta["base"], dict)
                               and all(isinstance(v, str) for v in meta["base"].values())):
        raise UserError(f"{manifest_path} is damaged: 'base' is not a base model's identity")
    if not (isinstance(meta.get("saved", []), list) and all(isinstance(p, str) for p in meta.get("saved", []))
            and isinstance(meta.get("final"), (str, type(None)))):
        raise UserError(f"{manifest_path} is damaged: 'saved' or 'final' does not list file paths")
    try:
        meta["losses"] = [float(x) for x in meta["losses"]]
    except (TypeError, ValueError):
        raise UserError(f"{manifest_path} is damaged: 'losses' holds something other than numbers") from None
    plan = meta.get("plan")
    if plan is not None and not (isinstance(plan, dict) and all(
            isinstance(plan.get(k), int) and not isinstance(plan.get(k), bool) and plan[k] > 0
            for k in ("batches_per_epoch", "samples_per_epoch", "per_step", "total_steps"))):
        raise UserError(f"{manifest_path} is damaged: 'plan' is not the run's step arithmetic")
    meta["validation"] = _validation_history(meta.get("validation", []), meta["step"], manifest_path)
    return folder, meta


def _last_save(run: Path) -> Path | None:
    """The newest output file of a run (by its folder's config.toml: name and output folder), or None when the
    config cannot tell (unreadable, or the host's output folder, which is not known here)."""
    from ..config import _toml_loads

    try:
        config = _toml_loads((run / "config.toml").read_text(encoding="utf-8"))
        name, out = str(config.get("name") or ""), Path(str(config.get("output") or "")).expanduser()
    except (OSError, UnicodeDecodeError, UserError, TypeError, ValueError):
        return None
    if not name or not str(config.get("output") or "") or not out.is_dir():
        return None
    own = re.compile(rf"^{re.escape(name)}(-\d{{6,}}|-step\d{{8,}})?\.(safetensors|pt)$")
    found = [p for p in out.iterdir() if own.match(p.name) and p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _validation_history(raw: Any, step: int, manifest_path: Path) -> list[tuple[int, float]]:
    """A manifest's (step, validation loss) pairs, checked: steps rising, none after the state's step."""
    damaged = UserError(f"{manifest_path} is damaged: 'validation' is not a list of (step, loss) measurements")
    if not isinstance(raw, list):
        raise damaged
    history: list[tuple[int, float]] = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int) and not isinstance(pair[0], bool)
                and isinstance(pair[1], (int, float, str)) and not isinstance(pair[1], bool)):
            raise damaged
        try:
            value = float(pair[1])
        except ValueError:
            raise damaged from None
        if not 0 < pair[0] <= step or (history and pair[0] <= history[-1][0]):
            raise damaged
        history.append((pair[0], value))
    return history


# ---- states of older versions --------------------------------------------------------------------------------
def _scalar(header: Any, name: str) -> float | None:
    """The value of a one-element tensor of a checked .safetensors header (read without torch), else None."""
    import struct

    entry = header.tensors.get(name)
    fmt = {"F32": "<f", "F64": "<d", "I64": "<q", "I32": "<i"}.get(entry.dtype) if entry is not None else None
    if fmt is None or math.prod(entry.shape) != 1 or entry.end - entry.start != struct.calcsize(fmt):
        return None
    with open(header.path, "rb") as fh:
        fh.seek(header.data_start + entry.start)
        return float(struct.unpack(fmt, fh.read(entry.end - entry.start))[0])


def legacy_state_problem(folder: Path, old: dict[str, Any]) -> str | None:
    """Why the two-file state of an older version (state.safetensors written, then state.json) cannot be shown
    to be one save, or None when it can. Those versions could be killed between the two writes, leaving step-N
    weights beside the counters of an earlier save; the proof that both files are of one save: every optimizer
    step count stored in the tensors file equals the step in state.json (no fp16 loss scaling, whose skipped
    steps would break that equality), and the settings are the run folder's config.toml."""
    from ..formats.safetensors_io import read_header

    for key, kind in (("step", int), ("batch_no", int), ("losses", list), ("optimizer", dict), ("scheduler", dict),
                      ("method", str), ("config", dict)):
        if not isinstance(old.get(key), kind) or isinstance(old.get(key), bool):
            return f"its state.json has no valid '{key}'"
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in old["losses"]):
        return "its state.json has a loss that is not a number"
    if len(old["losses"]) != old["step"]:
        return f"its state.json holds {len(old['losses'])} losses for {old['step']} steps"
    if old.get("scaler"):
        return "it was trained with fp16 loss scaling, whose skipped steps keep the optimizer's count from the run's"
    try:
        header = read_header(folder / LEGACY_TENSORS)
    except UserError as e:
        return str(e)
    opt_state = old["optimizer"].get("state")
    if not isinstance(opt_state, dict) or not isinstance(old["optimizer"].get("param_groups"), list):
        return "its state.json has no valid optimizer layout"
    counts = []
    for entry in opt_state.values():
        if not isinstance(entry, dict):
            return "its state.json has no valid optimizer layout"
        for key, value in entry.items():
            ref = value.get("tensor") if isinstance(value, dict) else None
            if isinstance(value, dict) and (not isinstance(ref, str) or ref not in header.tensors):
                return f"its state.json names an optimizer tensor the tensors file does not hold ({key})"
            if key == "step":
                counts.append(_scalar(header, ref) if ref is not None else
                              float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None)
    if not counts or None in counts:
        return "its optimizer keeps no step count to check the two files against each other"
    if any(c != old["step"] for c in counts):
        return (f"its weights are from optimizer step {int(max(counts))} but state.json says step {old['step']}: the "
                "two files are of different saves (a run stopped between writing them)")
    if not any(name.startswith("method.") for name in header.tensors):
        return "its tensors file holds no trained weights"
    run_config = (folder.parent if folder.name == "state" else folder) / "config.toml"
    if run_config.is_file():
        from ..config import load_config
        from .settings import TrainSettings

        try:
            same = (load_config(TrainSettings, run_config).to_dict()
                    == TrainSettings.from_dict({k: v for k, v in old["config"].items() if k != "version"}).to_dict())
        except (UserError, ValueError, TypeError, KeyError):
            same = False
        if not same:
            return "the run folder's config.toml and the state's settings differ, so the two may be of different runs"
    return None


MIGRATION_WAIT_S = 600.0


def _wait_for_migration(folder: Path) -> None:
    """(Processes other than rank 0.) Wait until rank 0 has converted an older version's state."""
    import time

    deadline = time.monotonic() + MIGRATION_WAIT_S
    while time.monotonic() < deadline:
        try:
            if json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("format") == STATE_FORMAT:
                return
        except (OSError, ValueError, AttributeError):
            pass
        time.sleep(0.2)
    raise UserError(f"the state in {folder} was written by an older version and the first process did not convert "
                    f"it within {MIGRATION_WAIT_S:.0f} s; resume it once with a single process")


def migrate_legacy_state(folder: Path, old: dict[str, Any]) -> None:
    """Rewrite a provably complete two-file state of an older version as a verified state (tensors file copied
    under its new name, then the manifest as the commit point, then the old tensors file removed); UserError
    with the reason when it cannot be shown to be one save. A kill at any point leaves a state that resumes or
    migrates again."""
    import shutil

    why = legacy_state_problem(folder, old)
    if why:
        raise UserError(f"the state in {folder} was written by an older version as two files that cannot be shown "
                        f"to be one save: {why}. It is not used; start the run again (its saved files are kept)")
    from ..formats.safetensors_io import read_header

    step = old["step"]
    name = f"tensors-{step:08d}-{secrets.token_hex(4)}.safetensors"
    atomic_write(folder / name, lambda p: shutil.copyfile(folder / LEGACY_TENSORS, p))
    header = read_header(folder / name)
    note = (f"the state at step {step} was written by an older version (state.safetensors + state.json); its "
            "optimizer step counts match its counters, so it was converted to the verified format")
    manifest = {
        "format": STATE_FORMAT,
        "tensors": {"file": name, "size": (folder / name).stat().st_size, "sha256": _sha256_file(folder / name),
                    "method_keys": {k: list(e.shape) for k, e in header.tensors.items() if k.startswith("method.")}},
        "step": step, "batch_no": old["batch_no"],
        "losses": [float(x) if math.isfinite(x) else repr(float(x)) for x in old["losses"]],
        "optimizer": old["optimizer"], "scheduler": old["scheduler"], "scaler": None, "method": old["method"],
        "saved": [], "final": None, "config": old["config"], "migrated": note,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest))   # the commit point
    (folder / LEGACY_TENSORS).unlink(missing_ok=True)
    fsync_dir(folder)


# ---- the base model a state was trained from ----------------------------------------------------------------
def base_identity(info: Any) -> dict[str, str]:
    """What a state records of its base model (a hosts.ModelInfo): name, file and full-file sha256 (hashed
    here if the host did not know it; the final file's metadata `lab.base_sha256` / `ss_new_sd_model_hash`
    needs the same hash, so this is no extra work over a run)."""
    info.fill_hashes()
    return {"name": str(info.name or ""), "path": str(info.path or ""), "sha256": str(info.sha256 or "")}


def file_identity(path: Any) -> dict[str, str] | None:
    """`base_identity` of a model known only by its file (before it is loaded), or None without a file."""
    if not path or not Path(path).is_file():
        return None
    from ..formats.hashes import model_sha256

    return {"name": Path(path).stem, "path": str(path), "sha256": model_sha256(path)}


def _describe(base: dict[str, str]) -> str:
    name = base.get("name") or (Path(base["path"]).stem if base.get("path") else "") or "an unnamed model"
    where = f", {base['path']}" if base.get("path") else ""
    digest = f"sha256 {base['sha256'][:10]}" if base.get("sha256") else "hash unknown"
    return f"'{name}' ({digest}{where})"


def check_base(meta: dict[str, Any], current: dict[str, str]) -> str | None:
    """Whether the model about to be resumed on is the one the state was trained from (`base_identity` of each).

    Returns None when it is, a note when the state is older than this check (nothing recorded) or neither side
    has a hash and names cannot decide; raises UserError when they differ. The sha256 decides when both are
    known (a model moved or renamed is still the same model; a file replaced under the same name is not);
    without hashes the file path, then the name, is compared."""
    saved = meta.get("base")
    if not isinstance(saved, dict) or not any(saved.get(k) for k in ("sha256", "path", "name")):
        return ("the state was saved by a version that did not record its base model, so the base cannot be "
                f"checked: the run goes on with {_describe(current)}; it must be the model the run started from")
    if saved.get("sha256") and current.get("sha256"):
        same = saved["sha256"].lower() == current["sha256"].lower()
    elif saved.get("path") and current.get("path"):
        same = Path(saved["path"]).expanduser().resolve() == Path(current["path"]).expanduser().resolve()
    elif saved.get("name") and current.get("name"):
        same = saved["name"] == current["name"]
    else:
        return (f"the base model could not be checked (the state names {_describe(saved)}, the model now is "
                f"{_describe(current)}); it must be the model the run started from")
    if not same:
        raise UserError(
            f"this run was trained from the base model {_describe(saved)}, but the model to resume on is "
            f"{_describe(current)}. Resuming on another model would mix the two (its untrained parts and the "
            "output's metadata would come from the new one). Load the run's base model (in the WebUI: choose it "
            "at the top of the page; on the command line: --model) and resume again, or start a new run to "
            "train the other model")
    return None


# Choices made for one start, not settings of the run: a resume alone does not take them from the state. A run
# started with overwrite on and resumed under another name would otherwise replace the user's files there.
NOT_INHERITED = ("version", "overwrite")


# Settings a resume may change without changing how the steps so far were trained: the run's length and its
# saves, pictures and logs; the rates and the step arithmetic (said by the loop on their own); how the work is
# done (attention, caching, compiling, processes: the same numbers up to rounding); the base model (check_base).
RESUME_MAY_CHANGE = frozenset((
    "version", "overwrite", "resume", "name", "output", "epochs", "max_steps", "keep_last", "save_state",
    "save_every_n_epochs", "save_every_n_steps", "save_from_epoch", "sample_every_n_epochs", "sample_every_n_steps",
    "sample_prompts", "control_prompts", "sample_sampler", "sample_seed", "sample_size", "sample_steps", "sample_cfg",
    "tensorboard", "validation_every_n_steps", "stop_on_divergence", "learning_rate", "unet_lr", "text_encoder_lr",
    "data", "reg_data", "batch_size", "grad_accum", "attention", "cache_latents", "cache_latents_to_disk",
    "cache_text_encoder_outputs", "channels_last", "gradient_checkpointing", "torch_compile", "compile_backend",
    "distributed", "ddp_find_unused_parameters", "optimizer_kernel", "model", "start_from"))


def changed_settings(was: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(name, the state's value, this run's) of each setting that changes how a step trains and differs between
    the settings a state was trained with and a resumed run's: a schedule, an optimizer, a loss or noise option,
    a caption option changed at resume applies from the resumed step on only. Nested settings (the method's
    table) are named `table.key`; names missing from the state (an older version) are not compared."""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, name: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) & set(b)):
                walk(a[key], b[key], f"{name}.{key}" if name else key)
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append((name, a, b))

    for key in sorted(set(was) & set(now) - RESUME_MAY_CHANGE):
        walk(was[key], now[key], key)
    return out


def read_state_settings(path: str | Path) -> dict[str, Any]:
    """The settings a state was trained with (for `--resume DIR` without `--config`), less `NOT_INHERITED`."""
    _, meta = read_manifest(path)
    return {k: v for k, v in meta["config"].items() if k not in NOT_INHERITED}


def load_run_state(path: str | Path, method, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Verify the state and load it into the method, optimizer, schedule and loss scaler; returns the manifest."""
    from ..formats.safetensors_io import read_safetensors
    from .average import PREFIX as EMA_PREFIX

    folder, meta = read_manifest(path)
    if meta["method"] != method.name:
        raise UserError(f"that state belongs to a {meta['method']} run, not {method.name}")
    tensors, _ = read_safetensors(folder / meta["tensors"]["file"])
    own = {f"method.{k}": list(v.shape) for k, v in method.training_state().items()}
    stored = {k: list(v.shape) for k, v in tensors.items() if k.startswith("method.")}
    if own != stored or stored != meta["tensors"].get("method_keys"):
        averaged = [any(k.startswith("method." + EMA_PREFIX) for k in keys) for keys in (stored, own)]
        if averaged[0] != averaged[1]:   # the average's tensors are there or not: name the setting, not a tensor
            on = ["on" if a else "off" for a in averaged]
            raise UserError(f"the state in {folder} was trained with adapter_ema {on[0]}, and this run has it "
                            f"{on[1]}: resume with adapter_ema {on[0]}")
        diff = sorted(set(own) ^ set(stored)) or [k for k in own if own[k] != stored.get(k)]
        raise UserError(f"the state in {folder} does not fit this run's settings (first difference: "
                        f"{diff[0] if diff else 'tensor shapes'}); resume with the settings it was trained with")
    method.load_training_state({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")})
    rates = list(scheduler.base_lrs)   # this run's base rates (learning_rate, unet_lr, text_encoder_lr)
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the saved optimizer state does not fit this run's settings: {e}") from None
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    # the optimizer's and the schedule's state carry the base rates the state was trained at: a rate set anew for
    # the resumed run was ignored without a word. It is this run's (the loop says so when it differs).
    if len(scheduler.base_lrs) == len(rates) and scheduler.base_lrs != rates:
        meta["rates_were"] = list(scheduler.base_lrs)
    scheduler.base_lrs = rates
    # the rate of the next step is the schedule's at the state's step under this run's total: the optimizer's
    # groups hold the rate of the plan the state was saved under, which a changed total (continuing a finished
    # run) would otherwise keep for one step (a finished cosine run's 0)
    for group, base, rate in zip(optimizer.param_groups, rates, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * rate(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if meta.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    return meta


def discard_state(run_dir: Path) -> None:
    """A fresh run under an existing run folder (overwriting allowed): the old state must not be resumed into
    the new run, so its manifest goes first (the commit point), then its tensors."""
    folder = Path(run_dir) / "state"
    if folder.is_dir():
        for p in [folder / MANIFEST, *folder.glob(TENSORS_GLOB), folder / LEGACY_TENSORS]:
            p.unlink(missing_ok=True)


# ---- leftovers of killed runs ------------------------------------------------------------------------------
def clean_stale_temp_files(out_dir: Path, name: str, suffixes: tuple[str, ...], run_dir: Path) -> list[Path]:
    """Remove temporary files a killed save of this run left: in the output folder only those of this run's
    names (NAME, NAME-000004, NAME-step00000120 with its suffixes), in the run folder (ours alone) every one;
    also tensors files of the state that no manifest names. Returns what was removed."""
    own = re.compile(rf"^{re.escape(name)}(-\d{{6}}|-step\d{{8}})?({'|'.join(re.escape(s) for s in suffixes)})$")
    removed = remove_stale_temps(out_dir, lambda target: own.match(target) is not None)
    removed += remove_stale_temps(run_dir, lambda target: True, recursive=True)
    state = Path(run_dir) / "state"
    if state.is_dir():
        named = None
        try:
            named = json.loads((state / MANIFEST).read_text(encoding="utf-8"))["tensors"]["file"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        for p in state.glob(TENSORS_GLOB):
            try:
                if p.name != named and p.is_file():
                    p.unlink()
                    removed.append(p)
            except OSError:
                pass
    return removed


# ---- loss.csv after a resume --------------------------------------------------------------------------------
def trim_loss_csv(path: Path, step: int) -> int:
    """Keep the header and the rows of steps <= `step` (rows a killed run wrote after its state would be
    written again); returns the rows removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    text = path.read_text(encoding="utf-8", errors="replace")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return 0
    keep, dropped = [rows[0]], 0
    for row in rows[1:]:
        try:
            ok = int(row[0]) <= step and len(row) == len(rows[0])
        except (ValueError, IndexError):
            ok = False
        if ok:
            keep.append(row)
        else:
            dropped += 1
    if dropped or not text.endswith("\n"):   # also a last row a kill cut short
        out = io.StringIO()
        csv.writer(out).writerows(keep)
        atomic_write_text(path, out.getvalue())
    return dropped
