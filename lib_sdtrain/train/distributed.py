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

FSDP (`distributed = "fsdp"`, Dreambooth and full fine-tune). torch's `fully_shard` (FSDP2, torch >= 2.6; on
older torch the run is refused with a clear message) splits every trained UNet weight across the processes:
each holds 1/world of the trained weights, of their gradients and of the optimizer state (the bulk of a full
fine-tune: fp32 weights + gradients + two AdamW moments = 16 bytes per trained value). Units: every element of
a `ModuleList` of the UNet (down/up blocks, resnets, transformer blocks) holding at least 2 % of the trained
values is sharded on its own (its weights are gathered just before its forward and freed after), the rest by
the UNet itself. Frozen weights (`train_blocks` other than all) are not sharded: every process keeps them
whole, as with DDP. Trained tensors outside the UNet (the text encoders with `train_text_encoder`) stay whole
too; their gradients are averaged with one all-reduce after the backward pass. Saving gathers the full
weights (and the full optimizer state, for the resumable state) tensor by tensor; every process joins each
gathering in the same order, rank 0 keeps and writes them, the others drop each at once (`joining`). Files are
the same as a single process writes, and a state resumes under any number of processes. The NaN/inf checks
look at each process's part (no gathering). At the end the UNet gets its own class, hooks and plain parameters
back (their values from the method's backups), without talking to the other processes. With mixed_precision
"bf16" (`bf16_policy`) each unit's weights are all-gathered and computed in bf16, gradients are reduce-scattered
in fp32, and the shards the optimizer updates stay fp32 (gloo on the CPU gathers bf16 too: tested there).
Memory: every process still loads the whole model and the method keeps a CPU backup of the trained weights, so
host memory per process is not reduced; what FSDP divides is the device memory of the trained weights,
gradients and optimizer state.

Stopping. A stop (StopToken: Ctrl-C, a stop button) reaches each process at its own time, or only one of them.
`agree_stop` all-reduces a flag at the top of every step, so every process stops after the same step, joins
the same save and exits; without it a process that stopped early would wait in a save's gathering while the
others wait in the next step's (a hang).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..launch import Launch, detect_launch
from ..models import sharding
from ..models.sharding import full_tensor, gather_like, is_sharded, local_tensor, shard_like

__all__ = ["Dist", "Launch", "detect_launch", "fsdp_missing", "full_tensor", "is_sharded", "local_tensor", "shard_like",
           "gather_like"]

MODES = ("ddp", "fsdp")
FSDP_UNIT_SHARE = 0.02   # a ModuleList element with at least this share of the trained values is its own unit


def fsdp_missing() -> str:
    """Why FSDP cannot run with this torch ("" when it can)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401 - torch >= 2.6
        from torch.distributed.tensor import DTensor  # noqa: F401
    except ImportError:
        return (f"distributed = 'fsdp' needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                f"{torch.__version__}: use distributed = 'ddp' or a newer torch")
    return ""


def bf16_policy() -> Any:
    """FSDP mixed precision for mixed_precision = "bf16": each unit's weights are all-gathered and computed in
    bf16 (half the traffic and memory of the gathered copy), gradients are reduce-scattered in fp32 (no bf16
    rounding of the sum over processes), and the sharded weights the optimizer updates stay fp32 (master copy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def launch_warnings(launch: Launch, cfg: Any) -> list[str]:
    """What `accelerate launch` asked for that the run's own settings decide differently."""
    out = []
    asked = launch.mixed_precision
    if asked is not None and asked != cfg.mixed_precision:
        out.append(f"accelerate launch asked for mixed precision {asked!r}; this run uses the setting "
                   f"mixed_precision = {cfg.mixed_precision!r} (pass --mixed-precision {asked} to follow it)")
    if launch.wants_fsdp and getattr(cfg, "distributed", "ddp") != "fsdp":
        out.append("accelerate launch asked for FSDP; this run uses distributed = 'ddp' (each GPU holds the whole "
                   "model): pass --distributed fsdp to shard a Dreambooth or full fine-tune (accelerate's own "
                   "FSDP settings are not used: Training Lab shards with torch's fully_shard itself)")
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
        self.mode = "none"                  # "none" | "ddp" | "fsdp" (what wrap / shard did)
        self.fsdp_roots: list[torch.nn.Module] = []
        self.replicated: list[torch.Tensor] = []   # FSDP: trained tensors left whole (gradients all-reduced)
        self._undo_shard: list[Callable[[], None]] = []
        self._shard_info = ""
        self._names: dict[int, str] = {}     # FSDP: id of a sharded parameter -> its name, for messages

    @property
    def sharded(self) -> bool:
        """FSDP is on: saving gathers in every process (see `main_writes`)."""
        return self.mode == "fsdp"

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

    def _comm_device(self) -> torch.device:
        """Where small tensors for a collective live: the current GPU under NCCL, else the CPU (gloo)."""
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def agree_stop(self, stop: Any) -> bool:
        """Whether any process was asked to stop (StopToken: Ctrl-C, a stop button); the same answer in every
        process. One process: `stop.requested`. Several: one all-reduce (max) of a flag, so a stop that reaches
        the processes at different steps (Ctrl-C is delivered to each on its own; a stop button reaches only
        rank 0) stops all of them at the same step, before any of them starts a save or a step the others skip.
        A process that had no request of its own gets one ("stopped in another process")."""
        if self.world <= 1:
            return stop.requested
        import torch.distributed as dist

        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self._comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = bool(flag.item() > 0)
        if agreed and not stop.requested:
            stop.request("stopped in another process")
        return agreed

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
        if self.world <= 1 or self.mode == "fsdp":
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

    # ---- FSDP ------------------------------------------------------------------------------------------
    def shard(self, parts: Any, method: Any, groups: list[dict[str, Any]], mode: str = "ddp", *,
              mixed_precision: str = "no", torch_compile: bool = False) -> list[dict[str, Any]]:
        """FSDP (mode "fsdp", world > 1): shard the UNet's trained weights; the optimizer groups with the sharded
        parameters in place of the plain ones (build the optimizer after this). Otherwise `groups` unchanged."""
        from ..errors import UserError

        if mode not in MODES:
            raise UserError(f"distributed {mode!r}: choose one of {', '.join(MODES)}")
        if mode != "fsdp" or self.world <= 1:
            return groups
        reason = method.fsdp_refusal()   # MethodBase: "" = allowed
        if reason:
            raise UserError(reason)
        missing = fsdp_missing()
        if missing:
            raise UserError(missing)
        if mixed_precision == "fp16":
            # the loss scaler's overflow check sees only this process's part of the gradients: processes could
            # disagree on skipping a step
            raise UserError("distributed = 'fsdp' with mixed_precision = 'fp16' is not supported (fp16 loss "
                            "scaling would check each process's part of the gradients alone): use bf16")
        if torch_compile:   # the UNet is compiled before sharding here; that order is untested with FSDP's hooks
            raise UserError("distributed = 'fsdp' with torch_compile is not supported yet: turn torch_compile off")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        unet = parts.unet
        trained = {id(p) for g in groups for p in g["params"]}
        names = {id(p): n for n, p in unet.named_parameters()}
        sharded_ids = {i for i in trained if i in names}
        if not sharded_ids:
            raise UserError("distributed = 'fsdp' shards the UNet's trained weights, and this run trains none")
        ignored = {p for p in unet.parameters() if id(p) not in sharded_ids}
        total = sum(p.numel() for p in unet.parameters() if id(p) in sharded_ids)
        units = []
        for module in unet.modules():
            if isinstance(module, torch.nn.ModuleList):
                for child in module:
                    size = sum(p.numel() for p in child.parameters() if id(p) in sharded_ids)
                    if size and size >= FSDP_UNIT_SHARE * total:
                        units.append(child)
        # restore record, taken before anything changes: every module's attributes and hooks, every parameter
        self._record_unshard(unet)
        device = parts.device
        mesh = init_device_mesh(device.type, (self.world,))
        options: dict[str, Any] = {"mesh": mesh, "ignored_params": ignored}
        if mixed_precision == "bf16":   # gathered for compute in bf16, gradients reduced in fp32, fp32 shards kept
            options["mp_policy"] = bf16_policy()
        done = set()
        for module in reversed(units):    # modules() lists parents first: shard the innermost units first
            if id(module) not in done:
                fully_shard(module, **options)
                done.add(id(module))
        fully_shard(unet, **options)
        self.fsdp_roots = [unet]
        for g in groups:     # the whole originals: their storage goes (close puts the objects back)
            for p in g["params"]:
                if id(p) in sharded_ids:
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.mode = "fsdp"
        now = dict(unet.named_parameters())
        new_groups = []
        for g in groups:
            params = [now[names[id(p)]] if id(p) in sharded_ids else p for p in g["params"]]
            new_groups.append({**g, "params": params})
        self.replicated = [p for g in groups for p in g["params"] if id(p) not in sharded_ids]
        self._names = {id(now[names[i]]): f"unet.{names[i]}" for i in sharded_ids}
        method.after_shard()   # e.g. the EMA becomes this process's part too
        kept = sum(p.numel() for p in self.replicated)
        precision = ("; weights gathered in bf16, gradients reduced in fp32, fp32 master weights"
                     if "mp_policy" in options else "")
        self._shard_info = (f"FSDP (torch fully_shard) over {total:,} trained UNet values in {len(done) + 1} units"
                            f", each process holding 1/{self.world}" + precision
                            + (f"; {kept:,} trained values outside the UNet kept whole" if kept else ""))
        return new_groups

    def _record_unshard(self, root: torch.nn.Module) -> None:
        """Remember what `fully_shard` changes (class, attributes, hooks, parameters) so `close` can undo it
        without talking to the other processes (it also runs after a failure in one of them)."""
        hook_dicts = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_state_dict_pre_hooks",
                      "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
        for module in root.modules():
            cls, keys = module.__class__, set(module.__dict__)
            hooks = {h: dict(getattr(module, h)) for h in hook_dicts if hasattr(module, h)}
            params = dict(module._parameters)

            def undo(module=module, cls=cls, keys=keys, hooks=hooks, params=params) -> None:
                module.__class__ = cls
                for key in set(module.__dict__) - keys:
                    del module.__dict__[key]
                for name, saved in hooks.items():
                    live = getattr(module, name)
                    live.clear()
                    live.update(saved)
                for name, p in params.items():
                    now = module._parameters.get(name)
                    if now is not p and p is not None:
                        if p.numel() == 0 or (now is not None and is_sharded(now)):
                            # the sharded copy replaced it (its storage went): a one-element placeholder of its
                            # shape; the method's detach puts the saved original back
                            p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
                        p.grad = None
                        module._parameters[name] = p

            self._undo_shard.append(undo)

    @contextlib.contextmanager
    def joining(self) -> Iterator[None]:
        """A process other than rank 0 takes part in a save rank 0 writes (FSDP): it joins every gathering in the
        same order, but keeps none of the whole tensors (each is dropped as soon as it arrives: no whole copy of
        the model in every process's memory). Nothing computed inside may be used. Rank 0: no effect."""
        sharding.JOINING[0] = not self.main
        try:
            yield
        finally:
            sharding.JOINING[0] = False

    def after_backward(self, params: list[torch.Tensor]) -> None:
        """After a step's last backward pass: average what DDP / FSDP do not (several processes)."""
        if self.world == 1 or self.mode == "ddp":
            return
        import torch.distributed as dist

        share = self.replicated if self.mode == "fsdp" else params
        for p in share:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            if self.mode == "fsdp":     # each process's loss was scaled as for an average (see loss_scale)
                p.grad.div_(self.world)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> None:
        """Scale the gradients so their joint norm is at most `max_norm` (torch's clip_grad_norm_ formula);
        under FSDP the norm is summed over every process's part."""
        if self.mode != "fsdp":
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        sharded = [local_tensor(g) for g in grads if is_sharded(g)]
        whole = [g for g in grads if not is_sharded(g)]
        device = sharded[0].device if sharded else grads[0].device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for g in sharded:
            sq += g.float().pow(2).sum()
        dist.all_reduce(sq)
        for g in whole:   # identical in every process after after_backward: counted once
            sq += g.float().pow(2).sum().to(device)
        total = sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            local_tensor(g).mul_(coef.to(local_tensor(g).device))

    def nonfinite(self, params: list[torch.Tensor], check: Callable[[], list[str]]) -> list[str]:
        """Names of trained tensors holding NaN/inf; the same answer in every process. Without FSDP: `check()`
        (the method's own whole-tensor check). Under FSDP each process looks at its own part and the verdict is
        summed over the processes, so no process gathers a whole copy of the model just to look."""
        if self.mode != "fsdp":
            return check()
        import torch.distributed as dist

        mine = [self._names.get(id(p), "a trained tensor outside the UNet") for p in params
                if not bool(torch.isfinite(local_tensor(p.detach())).all())]
        device = local_tensor(params[0]).device if params else torch.device("cpu")
        count = torch.tensor([float(len(mine))], device=device)
        dist.all_reduce(count)
        if count.item() == 0:
            return []
        return mine or ["a trained weight held by another process"]

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After loading a whole (single-process layout) optimizer state: each sharded parameter's state tensors
        become this process's part of them."""
        if self.mode != "fsdp":
            return
        from torch.distributed.tensor import DTensor

        for p, entry in optimizer.state.items():
            if not is_sharded(p):
                continue
            for k, v in list(entry.items()):
                if torch.is_tensor(v) and not is_sharded(v) and tuple(v.shape) == tuple(p.shape):
                    entry[k] = DTensor.from_local(shard_like(v, p), p.device_mesh, p.placements, shape=p.shape,
                                                  stride=p.stride(), run_check=False)

    def describe(self) -> str:
        if self.mode == "fsdp":
            return f"{self.world} processes ({self.launch.launcher}): {self._shard_info}"
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
        elif self.mode == "fsdp":
            for root in self.fsdp_roots:    # gradients of earlier micro-batches stay whole and local
                root.set_requires_gradient_sync(last)
            yield
        else:
            yield

    def loss_scale(self, used: int) -> float:
        """Divisor of each micro-batch loss: one process sums `used` micro-batches ÷ `used`; DDP then averages
        over the processes, so each divides by used / world to make the same mean."""
        return used / self.world if self.mode in ("ddp", "fsdp") else float(used)

    def mean_loss(self, losses: list[float]) -> float:
        """The step's loss averaged over every micro-batch of every process (the same number everywhere, so
        every process takes the same divergence decision)."""
        total, count = float(sum(losses)), float(len(losses))
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([total, count], dtype=torch.float64, device=self._comm_device())
            dist.all_reduce(t)
            total, count = float(t[0]), float(t[1])
        return total / max(1.0, count)

    def close(self) -> None:
        """Drop the DDP wrapper (DDP never changed the networks); undo FSDP's changes to the UNet (its class,
        hooks and parameters: the plain parameters come back, their values from the method's backups)."""
        self.ddp = None
        while self._undo_shard:
            self._undo_shard.pop()()
        self.fsdp_roots, self.replicated = [], []
        if self.mode == "fsdp":
            self.mode = "none"
