"""Several processes, one per GPU (gloo on the CPU): joining the group and DistributedDataParallel.

Launchers. `torchrun` and `accelerate launch` (which starts its processes through torch's elastic launcher) set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; MPI launchers (`mpirun`, accelerate's multi-CPU mode)
set OMPI_COMM_WORLD_* or PMI_*. `detect_launch` reads all of them, and also what `accelerate launch` asks for
through its own ACCELERATE_* variables (mixed precision, CPU only, FSDP), so the loop can follow or warn.

Gradients. The forward pass of a step (text conditioning + UNet) runs inside one `DistributedDataParallel`
module that holds the UNet, the text encoders and any trained tensor that lives outside them (embedding
vectors). DDP registers only parameters with `requires_grad` (the adapters, not the frozen base model),
groups their gradients into buckets and all-reduces each bucket as soon as the backward pass has produced it,
so communication overlaps the rest of the backward pass. Micro-batches of gradient accumulation run under
`no_sync()` except the last one of a step. DDP averages over processes; the loop scales each process's loss
so that the result equals one process accumulating the same global batch.

FSDP is not wired in yet (see the note at the end of this module).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..launch import Launch, detect_launch

__all__ = ["Dist", "Launch", "detect_launch"]


def launch_warnings(launch: Launch, cfg: Any) -> list[str]:
    """What `accelerate launch` asked for that the run's own settings decide differently."""
    out = []
    asked = launch.mixed_precision
    if asked is not None and asked != cfg.mixed_precision:
        out.append(f"accelerate launch asked for mixed precision {asked!r}; this run uses the setting "
                   f"mixed_precision = {cfg.mixed_precision!r} (pass --mixed-precision {asked} to follow it)")
    if launch.wants_fsdp:
        out.append("accelerate launch asked for FSDP; Training Lab shares gradients with DistributedDataParallel "
                   "(each GPU holds the whole model) and does not shard yet")
    return out


class _StepModule(torch.nn.Module):
    """The networks of one training step as one module, so DDP sees every trained tensor.

    `forward(fn)` calls `fn()` (text conditioning and the UNet, through the host's ModelParts): DDP prepares its
    gradient hooks before and, with `find_unused_parameters`, marks the tensors the step did not use after.
    """

    def __init__(self, nets: list[torch.nn.Module], trainable: list[torch.Tensor]) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)
        known = {id(p) for p in self.nets.parameters()}
        self.extra = torch.nn.ParameterList([p for p in trainable if id(p) not in known])

    def forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn()


class Dist:
    """The process group of a run and how gradients are shared (one process: every method is a no-op)."""

    def __init__(self, launch: Launch | None = None) -> None:
        self.launch = launch or Launch()
        self.rank, self.world = self.launch.rank, self.launch.world
        self.ddp: Any = None
        self.mode = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, env: dict[str, str] | None = None) -> Dist:
        launch = detect_launch(env)
        if launch.world <= 1:
            return cls(launch)
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and not launch.cpu_only else "gloo"
            if backend == "nccl":   # NCCL works on the current device: each process its own GPU
                torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
            env_now = os.environ
            env_now.setdefault("MASTER_ADDR", "127.0.0.1")
            env_now.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend, rank=launch.rank, world_size=launch.world)
        launch.rank, launch.world = dist.get_rank(), dist.get_world_size()
        return cls(launch)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    # ---- gradients -----------------------------------------------------------------------------------
    def wrap(self, parts: Any, trainable: list[torch.Tensor], *, find_unused: str = "auto",
             trains_text: bool = False, bucket_mb: int = 25) -> None:
        """Put the step's networks under DistributedDataParallel (world > 1 only).

        find_unused "auto": on when the text encoders are trained (SDXL and clip skip leave the last layers'
        adapters without a gradient) or trained tensors live outside the networks; "on" / "off" force it.
        """
        if self.world <= 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        nets = [parts.unet, *parts.text_encoders]
        module = _StepModule(nets, trainable)
        if find_unused == "auto":
            unused = trains_text or len(module.extra) > 0
        else:
            unused = find_unused == "on"
        device = parts.device
        kwargs: dict[str, Any] = {"find_unused_parameters": unused, "broadcast_buffers": False,
                                  "bucket_cap_mb": bucket_mb, "gradient_as_bucket_view": True}
        import inspect

        if "init_sync" in inspect.signature(DistributedDataParallel).parameters:
            kwargs["init_sync"] = False   # every process loaded the same file and seeded the adapters alike
        if device.type == "cuda":
            kwargs["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
        self.ddp = DistributedDataParallel(module, **kwargs)
        self.mode = "ddp"
        self.find_unused = unused

    def describe(self) -> str:
        if self.ddp is None:
            return f"{self.world} processes ({self.launch.launcher}), gradients summed after the backward pass"
        n = sum(p.numel() for p in self.ddp.module.parameters() if p.requires_grad)
        return (f"{self.world} processes ({self.launch.launcher}): DistributedDataParallel over {n:,} trained "
                f"values, find_unused_parameters={self.find_unused}")

    def forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one micro-batch's forward pass (through DDP when wrapped)."""
        return self.ddp(fn) if self.ddp is not None else fn()

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        """Micro-batches before the last one of a step keep their gradients local (DDP `no_sync`)."""
        if self.ddp is not None and not last:
            with self.ddp.no_sync():
                yield
        else:
            yield

    def loss_scale(self, used: int) -> float:
        """Divisor of each micro-batch loss: one process sums `used` micro-batches ÷ `used`; DDP then averages
        over the processes, so each divides by used / world to make the same mean."""
        return used / self.world if self.ddp is not None else float(used)

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Fallback without DDP (world > 1 but not wrapped): all-reduce (sum) every gradient."""
        if self.world == 1 or self.ddp is not None:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def mean_loss(self, losses: list[float]) -> float:
        """The step's loss averaged over every micro-batch of every process (the same number everywhere, so
        every process takes the same divergence decision)."""
        total, count = float(sum(losses)), float(len(losses))
        if self.world > 1:
            import torch.distributed as dist

            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor([total, count], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            total, count = float(t[0]), float(t[1])
        return total / max(1.0, count)

    def close(self) -> None:
        """Drop the DDP wrapper (the networks stay as they were; DDP never changed them)."""
        self.ddp = None


# FSDP. torch 2.13's `fully_shard` (FSDP2) runs on the CPU with gloo (checked with a two-process probe), but the
# loop cannot use it yet: sharding replaces the parameters with DTensors after the method has handed its parameter
# groups to the optimizer, the full-model methods keep references for EMA and saving, and gathering the full state
# to save is a collective every process must join while saving is done by rank 0 alone. Full fine-tunes therefore
# run with DDP (each GPU holds the whole model); sharding needs those three changes first.
