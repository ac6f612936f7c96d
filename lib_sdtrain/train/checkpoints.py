"""Output names, every-N saving, keep-last-K pruning, and the resumable training state.

Outputs: `NAME.safetensors` (final), `NAME-000004.safetensors` (epoch 4, kohya's naming), `NAME-step00000120`
(step saves). The run folder keeps `config.toml`, `loss.csv`, TensorBoard events, control pictures and
`state/` — the state is tensors in safetensors plus a JSON manifest, never a pickle (see `state.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..formats.files import is_read_only


def resume_hint(run_dir: Path) -> str:
    """How to go on from a run's state, in the words of every place a run starts from (the stop message, the
    disk-full message and the name-taken refusal all say it this way)."""
    return (f"resume the run {run_dir} (--resume on the command line, the resume setting in the Train tab, "
            '"resume" in the API)')


@dataclass
class RunFiles:
    out_dir: Path
    run_dir: Path
    name: str
    suffix: str
    # other suffixes under which a file of the same name means the same thing to the host (A1111 names an
    # embedding after its file stem, whatever the extension: tok.pt and tok.safetensors are one word)
    same_name_suffixes: tuple[str, ...] = ()
    # files the method writes beside each output under the output's stem (full-model methods: the base's
    # NAME.yaml, which A1111 loads with NAME.safetensors): one already there makes the name taken as well
    side_suffixes: tuple[str, ...] = ()

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
        if self.final.is_dir():   # no overwrite replaces a folder: the run would fail at its final save
            raise UserError(f"output name '{self.name}' is taken by a folder ({self.final}); choose another name")
        if overwrite:   # a file the user made read-only is never replaced: refused now, not at the final save
            locked = [p for p in (self.final, *(self.out_dir / f"{self.name}{x}" for x in self.side_suffixes))
                      if is_read_only(p)]
            if locked:
                raise UserError(f"{locked[0]} is read-only, so overwriting does not replace it; make it writable, "
                                "or choose another name")
            return
        taken = [p for p in (self.final, self.run_dir) if p.exists()]
        taken += [p for p in self.taken_outputs() if p not in taken]
        if taken:   # (state.has_state without importing torch: the command line refuses before torch loads)
            hint = (f", or {resume_hint(self.run_dir)}" if (self.state_dir / "state.json").is_file()
                    else " (that run has no state to resume)")
            raise UserError(f"output name '{self.name}' is taken ({taken[0]}); choose another name or allow "
                            f"overwriting{hint}")

    def check_resume_target(self, state_config: dict, host_dir: Path, overwrite: bool) -> None:
        """A resumed run's saves replace the files it saved before, under the name and in the folder of the settings
        its state records (`host_dir`: the host's folder for an empty `output`). Resumed under another name or
        into another folder, the files already there are not its own: refused unless overwriting is allowed, as
        for a new run."""
        own_name = str(state_config.get("name") or "")
        own_dir = Path(state_config["output"]).expanduser() if state_config.get("output") else Path(host_dir)
        if overwrite or (own_name == self.name and own_dir.resolve() == self.out_dir.expanduser().resolve()):
            return
        taken = self.taken_outputs()
        if taken:
            raise UserError(f"output name '{self.name}' is taken ({taken[0]}), and the run being resumed "
                            f"({self.run_dir}) did not write it: it saved as '{own_name}' in {own_dir}. Resume "
                            "with its own name and output folder, choose a free name, or allow overwriting")

    def taken_outputs(self) -> list[Path]:
        """Files in the output folder that a run of this name would write or that the host reads as this name."""
        taken = [self.final] if self.final.exists() else []
        if self.same_name_suffixes and self.out_dir.is_dir():   # A1111 also reads the subfolders
            taken += [p for x in self.same_name_suffixes for p in sorted(self.out_dir.rglob(f"{self.name}{x}"))]
        if self.out_dir.is_dir():
            # the output and its epoch and step saves, then each side file the same way (a NAME.yaml the user
            # left would be paired with the new checkpoint)
            for x in (self.suffix, *self.side_suffixes):
                plain = self.out_dir / f"{self.name}{x}"
                taken += [plain] if plain.exists() and plain not in taken else []
                taken += sorted(self.out_dir.glob(f"{self.name}-[0-9]*{x}"))[:3]
                taken += sorted(self.out_dir.glob(f"{self.name}-step*{x}"))[:3]
        return taken

    def is_intermediate(self, path: Path) -> bool:
        """Whether `path` is named as one of this run's epoch or step saves, in its output folder.

        Only such files are ever deleted by pruning: a state manifest lists its saves by path, and one that was
        edited, copied from elsewhere or damaged must not make a resumed run delete a file it did not write.
        """
        path = Path(path)
        if path.parent.resolve() != self.out_dir.resolve() or not path.name.endswith(self.suffix):
            return False
        stem = path.name[:len(path.name) - len(self.suffix)]
        return re.fullmatch(rf"{re.escape(self.name)}-(\d{{6,}}|step\d{{8,}})", stem) is not None

    def read_only_saves(self, saved: list[Path]) -> list[Path]:
        """This run's intermediate saves the user made read-only: pruning keeps them and does not count them."""
        return [p for p in saved if p != self.final and self.is_intermediate(p) and is_read_only(p)]

    def prune(self, saved: list[Path], keep: int) -> list[Path]:
        """Delete this run's intermediate saves beyond the last `keep` (never the final file, never a file not
        named as one of its saves, never one the user made read-only: those are not counted among the `keep`)."""
        locked = self.read_only_saves(saved)
        intermediate = [p for p in saved if p != self.final and self.is_intermediate(p) and p not in locked]
        old = intermediate[:-keep] if keep else []
        for p in old:
            p.unlink(missing_ok=True)
        return old
