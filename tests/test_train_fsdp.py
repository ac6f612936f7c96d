"""FSDP (`distributed = "fsdp"`, torch fully_shard) under torchrun with gloo on the CPU: a full fine-tune in two
processes gives the same saved checkpoint and the same resumable state as one process with the same global batch,
a state written by either resumes in the other, and the methods FSDP is not for are refused up front."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_sdtrain.config import save_config
from lib_sdtrain.errors import UserError
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train import optim
from lib_sdtrain.train import state as S
from lib_sdtrain.train.distributed import Dist, fsdp_missing
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings

from test_train_loop import make_dataset
import launch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")   # the same float rounding as each torchrun process below

# SGD (momentum 0.9): the update is linear in the gradient, so the only difference between the runs is the order
# of float sums (reduce-scatter vs. one process's accumulation); Adam divides by |gradient| and turns those
# rounding differences on near-zero gradients into whole ±lr steps. The momentum buffer is optimizer state, so
# the resumable state has something to gather and to shard again.
# Measured (2 shared cores, torch 2.13): the largest difference is about 2e-6 (float rounding of different
# summation orders, grown over 4 steps), while a wrong gradient scale or a one-process norm gives 5e-4 .. 1.5e-3.
TOL = {"rtol": 1e-4, "atol": 1e-5}
# The gradient norms of the 4 steps here are about 2.5, 4.3, 1.9 and 2.5 (one process): clipping at 2.2 acts on
# some steps and not on others, so a wrong norm (one process's part only) or a wrong gradient scale (the sum
# instead of the mean over processes) changes the result; clipping every step would hide a uniform scale error.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_settings(tmp_path, model, data, **over):
    cfg = {
        "method": "finetune", "model": str(model), "data": str(data), "resolution": 64, "min_bucket": 64,
        "max_bucket": 64, "batch_size": 1, "epochs": 1, "max_steps": 0, "learning_rate": 0.05,
        "optimizer": "sgd", "weight_decay": 0.0, "max_grad_norm": 2.2, "save_every_n_epochs": 0,
        "tensorboard": False, "save_state": True,
        # "up": the other UNet weights stay frozen and are not sharded (FSDP's ignored parameters); EMA: the
        # saved file holds the EMA, which each process keeps for its part only
        "finetune": {"train_blocks": "up", "ema": True, "ema_decay": 0.5, "save_precision": "fp32"},
    }
    cfg.update(over)
    return TrainSettings.from_dict(cfg)


def host(tmp_path, name):
    return StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / name)


DRIVER = """
import json, sys
import torch
from lib_sdtrain.cli import main


def lent_model_comes_back(config):
    # a host that lends one model object (as A1111 does): after the FSDP run it must be exactly as before
    from lib_sdtrain.config import load_config
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.train.loop import train
    from lib_sdtrain.train.settings import TrainSettings

    cfg = load_config(TrainSettings, config)
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=config + ".out")
    parts = host.load(cfg.model)
    host.load = lambda model=None: parts
    unet = parts.unet
    look = lambda: {"values": {k: v.clone() for k, v in unet.state_dict().items()},
                    "params": {n: (id(p), p.requires_grad, type(p)) for n, p in unet.named_parameters()},
                    "modules": {n: (type(m), len(m._forward_pre_hooks), len(m._forward_hooks),
                                    len(m._state_dict_pre_hooks), sorted(m.__dict__)) for n, m in unet.named_modules()},
                    "training": unet.training}
    before = look()
    result = train(cfg, host)
    after = look()
    report = {"steps": result.steps,
              "values": before["values"].keys() == after["values"].keys() and all(
                  torch.equal(before["values"][k], after["values"][k]) for k in before["values"]),
              "params": before["params"] == after["params"], "modules": before["modules"] == after["modules"],
              "training": before["training"] == after["training"],
              "grads": all(p.grad is None for p in unet.parameters())}
    with open(f"{config}.rank{torch.distributed.get_rank()}.json", "w") as f:
        json.dump(report, f)


for config in sys.argv[1:]:   # several runs in the same two processes: one interpreter start-up (the slow part)
    if config.startswith("lent="):
        lent_model_comes_back(config[5:])
        continue
    expect = 3 if config.startswith("diverge=") else 0     # 3: the CLI's code for a diverged run
    if expect:     # its rate is far above what settings allow (it diverges at once); the test lifts the limit
        from lib_sdtrain.train.optim import RATE_LIMITS
        RATE_LIMITS["sgd"] = float("inf")
    code = main(["train", "--config", config.split("=")[-1], "--device", "cpu", "--dtype", "fp32"])
    if code != expect:
        sys.exit(f"{config}: exit code {code}, expected {expect}")
"""


def start_torchrun(tmp_path, runs: list[TrainSettings], lent: TrainSettings | None = None,
                   diverge: TrainSettings | None = None) -> subprocess.Popen:
    """The runs in two processes under torchrun, started in the background (the caller trains its one-process
    references meanwhile); `finish` waits."""
    configs = []
    for i, cfg in enumerate(runs):
        configs.append(str(tmp_path / f"run{i}.toml"))
        save_config(cfg, configs[-1])
    if diverge is not None:
        save_config(diverge, tmp_path / "diverge.toml")
        configs.append(f"diverge={tmp_path / 'diverge.toml'}")
    if lent is not None:
        save_config(lent, tmp_path / "lent.toml")
        configs.append(f"lent={tmp_path / 'lent.toml'}")
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TRAINING_LAB_OUTPUT": str(tmp_path / "host-two")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(tmp_path / "driver.py"), *configs]
    return launch.start(cmd, cwd=tmp_path, env=env)


def finish(proc: subprocess.Popen) -> str:
    out, err, timed_out = launch.wait(proc, timeout=300)
    assert not timed_out, "the two processes did not finish within 300 s (a hang?)\n" + out[-3000:] + err[-3000:]
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out + "\n" + err     # warnings go to stderr


def state_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    folder, meta = S.read_manifest(run_dir)
    return load_file(str(folder / meta["tensors"]["file"])), meta


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    print(f"{what}: {len(a)} tensors, largest difference {worst:.2e}")   # shown with -s
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), **TOL, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.mark.skipif(not torch.distributed.is_available() or bool(fsdp_missing()),
                    reason="torch without distributed support or without fully_shard (torch < 2.6)")
def test_fsdp_two_processes_match_one_and_states_resume_across(tmp_path, monkeypatch):
    t0 = time.time()
    monkeypatch.setitem(optim.RATE_LIMITS, "sgd", float("inf"))    # for the diverging run (as in DRIVER)
    model = make_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1")
    # 1 picture × 3 repeats = 3 batches per epoch: the second step of an epoch has one batch, so one process has
    # none and joins the reduce-scatter with a zero-weighted pass
    data = make_dataset(tmp_path / "data", n=1)

    # one process, 2 batches accumulated per step; 1 epoch = 2 steps, then resumed to 2 epochs = 4 steps
    one = base_settings(tmp_path, model, data, grad_accum=2, output=str(tmp_path / "one"), name="one")
    r1 = train(one, host(tmp_path, "host-one"))
    assert r1.steps == 2

    a = load_file(str(r1.final))
    s1, m1 = state_tensors(r1.run_dir)    # read now: the FSDP resume below continues this run in place
    # the text encoder trained too: it stays whole under FSDP, its gradients averaged by one all-reduce, and the
    # clipping norm sums the sharded UNet parts and the whole text-encoder gradients
    te = {"train_blocks": "mid", "train_text_encoder": True, "ema": False, "save_precision": "fp32"}

    # two processes under torchrun, FSDP, one batch each per step: a fresh run, then the one-process state above
    # resumed to 2 epochs (in the same two processes)
    two = base_settings(tmp_path, model, data, grad_accum=1, output=str(tmp_path / "two"), name="two",
                        distributed="fsdp")
    cont2 = base_settings(tmp_path, model, data, grad_accum=1, epochs=2, output=str(tmp_path / "one"), name="one",
                          distributed="fsdp", resume=str(r1.run_dir))
    te2 = base_settings(tmp_path, model, data, grad_accum=1, output=str(tmp_path / "te2"), name="te2",
                        save_state=False, finetune=te, distributed="fsdp")
    lent = base_settings(tmp_path, model, data, grad_accum=1, output=str(tmp_path / "lent"), name="lent",
                         save_state=False, distributed="fsdp")
    # weights driven to inf/NaN (no stop on the loss): both processes find it at the end, in their own parts,
    # agree, and nothing is written
    diverge = base_settings(tmp_path, model, data, grad_accum=1, output=str(tmp_path / "nan"), name="nan",
                            save_state=False, distributed="fsdp", learning_rate=1e38, max_grad_norm=0.0,
                            stop_on_divergence=False)
    proc = start_torchrun(tmp_path, [two, cont2, te2], lent, diverge)

    # meanwhile, in this process: the text-encoder run and the uninterrupted reference (2 epochs)
    te1 = train(base_settings(tmp_path, model, data, grad_accum=2, output=str(tmp_path / "te1"), name="te1",
                              save_state=False, finetune=te), host(tmp_path, "host-te1"))
    ref = base_settings(tmp_path, model, data, grad_accum=2, epochs=2, output=str(tmp_path / "ref"), name="ref",
                        save_state=False)
    want = load_file(str(train(ref, host(tmp_path, "host-ref")).final))
    stdout = finish(proc)
    assert "FSDP (torch fully_shard)" in stdout and "each process holding 1/2" in stdout, \
        stdout[-2000:]
    assert "resumed at step 2" in stdout, stdout[-2000:]
    assert "the trained weights are not finite (NaN/inf in unet." in stdout, stdout[-2000:]
    assert not (tmp_path / "nan").exists() or not list((tmp_path / "nan").iterdir())
    # a lent model (one object, as in A1111) comes back exactly: values, parameter objects and flags, module
    # classes, hooks and attributes (FSDP's are gone), train/eval mode, no gradients — in both processes
    for rank in (0, 1):
        report = json.loads((tmp_path / f"lent.toml.rank{rank}.json").read_text())
        assert report == {"steps": 2, "values": True, "params": True, "modules": True, "training": True,
                          "grads": True}, (rank, report)

    # the saved checkpoint: the same keys, dtypes and values (EMA weights) as one process's, rank 0 alone wrote it
    b = load_file(str(tmp_path / "two" / "two.safetensors"))
    assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}
    assert_same(a, b, "checkpoint")
    base = load_file(str(model))
    moved = [k for k in a if "output_blocks" in k and not torch.equal(a[k], base[k].to(a[k].dtype))]
    frozen = [k for k in a if "input_blocks" in k and k.endswith("weight")]
    assert moved, "no trained weight moved: the comparison would be trivial"
    assert frozen and all(torch.equal(a[k], base[k].to(a[k].dtype)) and torch.equal(b[k], a[k]) for k in frozen)
    with safe_open(str(tmp_path / "two" / "two.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lab.weights"] == "ema" and meta["lab.method"] == "finetune"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["two.safetensors"]

    c, d = load_file(str(te1.final)), load_file(str(tmp_path / "te2" / "te2.safetensors"))
    assert_same(c, d, "with the text encoder")
    assert any("cond_stage_model" in k and not torch.equal(c[k], base[k].to(c[k].dtype)) for k in c), \
        "the text encoder did not move"
    assert "trained values outside the UNet kept whole" in stdout

    # the resumable states: the same tensors (weights, EMA, momentum buffers), whole, in the one-process layout
    s2, m2 = state_tensors(tmp_path / "host-two" / "runs" / "two")
    assert any(k.startswith("optim.") and k.endswith("momentum_buffer") for k in s1)
    assert_same(s1, s2, "state")
    assert m1["optimizer"]["param_groups"] == m2["optimizer"]["param_groups"]

    # the FSDP state resumed in one process (the run continues to 2 epochs)
    cont1 = base_settings(tmp_path, model, data, grad_accum=2, epochs=2, output=str(tmp_path / "two"), name="two",
                          resume=str(tmp_path / "host-two" / "runs" / "two"))
    got1 = train(cont1, host(tmp_path, "host-two"))
    assert got1.steps == 4
    assert_same(want, load_file(str(got1.final)), "FSDP state resumed in one process")

    # the one-process state resumed under FSDP in two processes (run above)
    assert_same(want, load_file(str(tmp_path / "one" / "one.safetensors")), "one-process state resumed under FSDP")
    print(f"FSDP equality + resume test: {time.time() - t0:.1f} s")


def test_fsdp_is_refused_for_adapter_methods_and_a_no_op_in_one_process(tmp_path):
    for method in ("lora", "embedding", "hypernetwork"):
        with pytest.raises(UserError, match="distributed = 'fsdp' is for methods that train the model's own"):
            TrainSettings.from_dict({"method": method, "distributed": "fsdp", "name": "tok"})
    with pytest.raises(UserError):
        TrainSettings.from_dict({"method": "finetune", "distributed": "sharded"})
    # one process: nothing to shard, the groups come back unchanged and the run stays plain
    dist = Dist()
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))]}]
    assert dist.shard(None, None, groups, "fsdp") is groups and not dist.sharded


def test_fsdp_on_a_torch_without_fully_shard_is_a_clear_refusal(monkeypatch):
    """A1111's torch 2.1.2 has no fully_shard: several processes with distributed = "fsdp" stop with the reason
    before any work (no collective is reached); the module itself imports there (no top-level FSDP import)."""
    import lib_sdtrain.train.distributed as D
    from lib_sdtrain.launch import Launch
    from lib_sdtrain.methods.finetune import FinetuneMethod

    monkeypatch.setattr(D, "fsdp_missing", lambda: "distributed = 'fsdp' needs torch >= 2.6 (test)")
    dist = Dist(Launch(rank=0, world=2, launcher="torchrun"))
    with pytest.raises(UserError, match="needs torch >= 2.6"):
        dist.shard(None, FinetuneMethod, [{"params": []}], "fsdp")
    assert not dist.sharded
    monkeypatch.setattr(D, "fsdp_missing", lambda: "")
    with pytest.raises(UserError, match="use bf16"):
        dist.shard(None, FinetuneMethod, [{"params": []}], "fsdp", mixed_precision="fp16")
    with pytest.raises(UserError, match="torch_compile off"):
        dist.shard(None, FinetuneMethod, [{"params": []}], "fsdp", torch_compile=True)
    # DDP runs are untouched by the setting's checks
    assert dist.shard(None, FinetuneMethod, groups := [{"params": []}], "ddp") is groups


@pytest.mark.skipif(not torch.distributed.is_available() or bool(fsdp_missing()),
                    reason="torch without distributed support or without DTensor")
def test_joining_processes_gather_along_but_keep_nothing(tmp_path):
    """Ranks > 0 join rank 0's save gatherings inside `joining()`: the collective runs, the whole tensor is dropped
    (no copy of the whole model in every process); rank 0 and calls outside keep it. A one-process gloo group."""
    import torch.distributed as td
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lib_sdtrain.launch import Launch
    from lib_sdtrain.models.sharding import full_tensor, gather_like, local_tensor, shard_like

    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        whole = torch.arange(12.0).reshape(4, 3)
        d = distribute_tensor(whole, mesh, [Shard(0)])
        assert torch.equal(full_tensor(d), whole) and torch.equal(local_tensor(d), whole)
        assert torch.equal(shard_like(whole * 2, d), whole * 2)
        assert torch.equal(gather_like(local_tensor(d), d), whole)
        with Dist(Launch(rank=1, world=2)).joining():
            assert full_tensor(d).numel() == 0 and gather_like(local_tensor(d), d).numel() == 0
            assert torch.equal(full_tensor(whole), whole)          # plain tensors pass through
        with Dist(Launch(rank=0, world=2)).joining():
            assert torch.equal(full_tensor(d), whole)              # rank 0 keeps what it writes
        assert torch.equal(full_tensor(d), whole)
    finally:
        td.destroy_process_group()
