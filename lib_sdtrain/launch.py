"""Which process am I: rank, world size and local rank from the launcher's environment variables.

`torchrun` and `accelerate launch` (which starts its processes through torch's elastic launcher) set RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; MPI launchers (`mpirun`, accelerate's multi-CPU mode) set
OMPI_COMM_WORLD_* or PMI_*. `accelerate launch` also passes its own choices as ACCELERATE_* / FSDP_* variables
(mixed precision, CPU only, FSDP). No torch import: the host uses it to pick a device, the loop to join the group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK")


def _first_int(env: dict[str, str], names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = env.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not a whole number") from None
    return default


def _true(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Launch:
    """What the launcher told this process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str = "none"                       # "none" | "torchrun" | "accelerate" | "mpi"
    accelerate: dict[str, str] = field(default_factory=dict)   # ACCELERATE_* / FSDP_* settings, if any

    @property
    def mixed_precision(self) -> str | None:
        """accelerate's --mixed_precision (no | fp16 | bf16), None when not launched by accelerate."""
        value = self.accelerate.get("ACCELERATE_MIXED_PRECISION")
        return value if value in ("no", "fp16", "bf16") else None

    @property
    def cpu_only(self) -> bool:
        return _true(self.accelerate.get("ACCELERATE_USE_CPU"))

    @property
    def wants_fsdp(self) -> bool:
        return _true(self.accelerate.get("ACCELERATE_USE_FSDP"))


def detect_launch(env: dict[str, str] | None = None) -> Launch:
    """Rank, world size and local rank from torchrun / accelerate launch / MPI environment variables."""
    env = dict(os.environ if env is None else env)
    world = _first_int(env, WORLD_VARS, 1)
    rank = _first_int(env, RANK_VARS, 0)
    local = _first_int(env, LOCAL_RANK_VARS, rank)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent launch environment: rank {rank} of world size {world}")
    acc = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    if any(k.startswith("ACCELERATE_") for k in acc):
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in env or "LOCAL_WORLD_SIZE" in env or "RANK" in env:
        launcher = "torchrun" if world > 1 or "TORCHELASTIC_RUN_ID" in env else "none"
    elif world > 1:
        launcher = "mpi"
    else:
        launcher = "none"
    return Launch(rank=rank, world=world, local_rank=local, launcher=launcher, accelerate=acc)
