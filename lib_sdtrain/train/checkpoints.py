"""Output names, every-N saving, keep-last-K pruning, and the resumable training state.

Outputs: `NAME.safetensors` (final), `NAME-000004.safetensors` (epoch 4, kohya's naming), `NAME-step00000120`
(step saves). The run folder keeps `config.toml`, `loss.csv`, TensorBoard events, control pictures and
`state/` — the state is tensors in safetensors plus JSON, never a pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..formats.files import atomic_write, atomic_write_text


@dataclass
class RunFiles:
    out_dir: Path
    run_dir: Path
    name: str
    suffix: str
    # other suffixes under which a file of the same name means the same thing to the host (A1111 names an
    # embedding after its file stem, whatever the extension: tok.pt and tok.safetensors are one word)
    same_name_suffixes: tuple[str, ...] = ()

    @property
    def final(self) -> Path:
        return self.out_dir / f"{self.name}{self.suffix}"

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "state"

    def epoch_file(self, epoch: int) -> Path:
        return self.out_dir / f"{self.name}-{epoch:06d}{self.suffix}"

    def step_file(self, step: int) -> Path:
        return self.out_dir / f"{self.name}-step{step:08d}{self.suffix}"

    def check_free(self, overwrite: bool) -> None:
        """Refuse to start when files of this name exist and replacing them was not asked for."""
        if overwrite:
            return
        taken = [p for p in (self.final, self.run_dir) if p.exists()]
        if self.same_name_suffixes and self.out_dir.is_dir():   # A1111 also reads the subfolders
            taken += [p for x in self.same_name_suffixes for p in sorted(self.out_dir.rglob(f"{self.name}{x}"))]
        taken += sorted(self.out_dir.glob(f"{self.name}-[0-9]*{self.suffix}"))[:3] if self.out_dir.is_dir() else []
        taken += sorted(self.out_dir.glob(f"{self.name}-step*{self.suffix}"))[:3] if self.out_dir.is_dir() else []
        if taken:
            raise UserError(f"output name '{self.name}' is taken ({taken[0]}); choose another name, allow "
                            "overwriting, or resume that run")

    def prune(self, saved: list[Path], keep: int) -> list[Path]:
        """Delete this run's intermediate saves beyond the last `keep` (never the final file)."""
        intermediate = [p for p in saved if p != self.final]
        old = intermediate[:-keep] if keep else []
        for p in old:
            p.unlink(missing_ok=True)
        return old


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        plain["state"][str(idx)] = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
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


def save_state(folder: Path, method, optimizer, scheduler, scaler, step: int, batch_no: int, losses: list[float],
               cfg) -> Path:
    """Everything needed to continue exactly: method tensors, optimizer, schedule, counters."""
    from safetensors.torch import save_file

    tensors = {f"method.{k}": v.detach().cpu().contiguous() for k, v in method.training_state().items()}
    opt_tensors, opt_plain = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    meta = {
        "step": step,
        "batch_no": batch_no,
        "losses": losses,
        "optimizer": opt_plain,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "method": method.name,
        "config": {"version": cfg.VERSION, **cfg.to_dict()},
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "state.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write_text(folder / "state.json", json.dumps(meta))
    return folder


def load_state(folder: Path, method, optimizer, scheduler, scaler) -> dict[str, Any]:
    from safetensors.torch import load_file

    if folder.is_dir() and (folder / "state").is_dir():
        folder = folder / "state"
    if not (folder / "state.json").is_file() or not (folder / "state.safetensors").is_file():
        raise UserError(f"no resumable state in {folder} (expected state.json and state.safetensors)")
    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if meta.get("method") != method.name:
        raise UserError(f"that state belongs to a {meta.get('method')} run, not {method.name}")
    tensors = load_file(str(folder / "state.safetensors"))
    method.load_training_state({k[len("method."):]: v for k, v in tensors.items() if k.startswith("method.")})
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    except (ValueError, KeyError) as e:
        raise UserError(f"the saved optimizer state does not fit this run's settings: {e}") from None
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    if meta.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    return meta
