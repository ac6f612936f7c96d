"""Tensors FSDP split across processes (DTensors): whole, local part, and back.

The methods (which keep backups and EMA copies of trained weights) and the training loop's run state both need
these; they live here, below both, so a method never imports the training loop. Plain tensors pass through
unchanged, and on a torch without DTensors (A1111's 2.1.2) nothing is ever sharded.
"""

from __future__ import annotations

from typing import Any

import torch

_DTENSOR: list[Any] = []   # [DTensor class or None], looked up once (a failed import is slow to repeat)


def is_sharded(t: Any) -> bool:
    """A tensor FSDP split across the processes (a DTensor)."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except Exception:  # noqa: BLE001 - torch < 2.5 or without distributed: no DTensors, nothing is sharded
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0] is not None and isinstance(t, _DTENSOR[0])


JOINING: list[bool] = [False]   # inside train.distributed.Dist.joining(): gathered tensors are dropped at once


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded (DTensor) one is gathered from every process (a collective: every process
    must call it, in the same order); a plain one is returned as it is."""
    if not is_sharded(t):
        return t
    whole = t.full_tensor()
    return whole.new_empty(0) if JOINING[0] else whole


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a view of its storage); a plain tensor itself."""
    return t.to_local() if is_sharded(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's part of `full` laid out as the sharded `like` (plain `like`: `full` itself). Local: every
    process has the whole `full` (a file everyone read), so nothing is sent."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    full = full.to(like.device, like.dtype)
    try:
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    except TypeError:   # torch without src_data_rank: rank 0's copy is scattered (the same values)
        return distribute_tensor(full, like.device_mesh, like.placements).to_local()


def gather_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose part in this process is `local`, laid out as the sharded `like` (a collective)."""
    if not is_sharded(like):
        return local
    from torch.distributed.tensor import DTensor

    d = DTensor.from_local(local.to(like.device), like.device_mesh, like.placements, shape=like.shape,
                           stride=like.stride(), run_check=False)
    return full_tensor(d).to(local.device)
