"""Several processes (torchrun, gloo on the CPU): through DistributedDataParallel, the same weights as one process
with the same global batch."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib_sdtrain.config import save_config
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings

from test_train_loop import make_dataset
import launch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_and_two_processes(base: dict, tmp_path: Path):
    """The run of `base` settings in one process (2 batches accumulated per step, one thread) and under torchrun
    in two (one batch each per step): the same global batch. Returns (one's TrainResult, torchrun's output)."""
    single = TrainSettings.from_dict({**base, "grad_accum": 2, "output": str(tmp_path / "one"), "name": "one"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as each torchrun process: the same float rounding in both runs
    try:
        one = train(single, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host1"))
    finally:
        torch.set_num_threads(threads)
    two = TrainSettings.from_dict({**base, "grad_accum": 1, "output": str(tmp_path / "two"), "name": "two"})
    config = tmp_path / "two.toml"
    save_config(two, config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "lib_sdtrain", "train", "--config", str(config),
           "--device", "cpu", "--dtype", "fp32"]
    done = launch.run(cmd, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return one, done


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # SDXL, UNet-only LoRA: the common multi-GPU case. DDP then runs without find_unused_parameters (every trained
    # tensor is used each step) and the text conditioning comes from the text-encoder output cache (SDXL default)
    model = make_tiny_checkpoint(tmp_path / "tiny.safetensors", "sdxl")
    # 1 picture × 3 repeats = 3 batches: the second (last) step of the epoch has one batch, so one process has none
    # and joins the all-reduce with a zero-weighted pass
    data = make_dataset(tmp_path / "data", n=1)
    base = {
        "model": str(model), "data": str(data), "resolution": 64, "min_bucket": 64, "max_bucket": 128,
        # SGD: the update is linear in the gradient. Adam divides by |gradient|, so on the near-zero gradients of
        # the first steps, float rounding (thread counts differ between the runs) flips whole ±lr updates.
        "batch_size": 1, "epochs": 1, "max_steps": 0, "learning_rate": 0.5, "optimizer": "sgd",
        "weight_decay": 0.0, "max_grad_norm": 0.0, "save_every_n_epochs": 0,
        "tensorboard": False, "save_state": False,
        "lora": {"network_dim": 4, "network_alpha": 4, "save_dtype": "fp32",   # fp16 would round away the check
                 "train_text_encoder": False},
    }
    # one process with 2 batches accumulated per step; two processes with one batch each, gradients averaged
    one, done = one_and_two_processes(base, tmp_path)
    assert one.steps == 2
    assert "DistributedDataParallel" in done.stdout and "find_unused_parameters=False" in done.stdout, \
        done.stdout[-2000:]
    assert "caching text-encoder outputs" in done.stdout

    a = load_file(str(one.final))
    b = load_file(str(tmp_path / "two" / "two.safetensors"))
    assert a.keys() == b.keys() and a
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-6,
                                   msg=lambda m, k=k: f"{k}: {m}")
        moved += "lora_up" in k and bool(a[k].abs().sum() > 0)
    assert moved, "the LoRA up weights never moved: the comparison would be trivial"
    # only rank 0 wrote: one final file, no second copy under another name
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["two.safetensors"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_measure_the_validation_loss_one_process_measures(tmp_path, mode):
    """Every process measures the held-out pictures at the same steps (none waits for another; under FSDP each
    block's weights are gathered from both), and with the same global batch the values are those of one process.
    DDP trains a LoRA, FSDP a fine-tune of the up blocks (FSDP shards whole weights; `distributed` does nothing
    in the single process)."""
    import re

    model = make_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1")
    from conftest import make_dataset as flat_dataset

    data = flat_dataset(tmp_path / "data", n=4, repeats=1)     # 2 held out, 2 trained: one batch per process
    base = {"model": str(model), "data": str(data), "resolution": 64, "min_bucket": 64, "max_bucket": 64,
            "batch_size": 1, "epochs": 2, "learning_rate": 0.5, "optimizer": "sgd", "weight_decay": 0.0,
            "max_grad_norm": 0.0, "save_every_n_epochs": 0, "tensorboard": False, "save_state": False,
            "validation_split": 0.5, "lora": {"network_dim": 4, "save_dtype": "fp32"}}
    if mode == "fsdp":
        base.update({"method": "finetune", "distributed": "fsdp", "learning_rate": 0.05,
                     "finetune": {"train_blocks": "up", "ema": False, "save_precision": "fp32"}})
        del base["lora"]
    one, done = one_and_two_processes(base, tmp_path)
    assert mode != "fsdp" or "FSDP (torch fully_shard)" in done.stdout, done.stdout[-2000:]
    seen = [(int(s), float(v)) for v, s in re.findall(r"validation loss ([0-9.e+-]+) at step (\d+)", done.stdout)]
    assert [s for s, _ in one.validation] == [s for s, _ in seen] == [1, 2], done.stdout[-2000:]
    for (_, a), (_, b) in zip(one.validation, seen):
        assert b == pytest.approx(a, rel=1e-3)                 # printed to 4 significant digits
