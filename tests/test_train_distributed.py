"""Launch detection (torchrun, accelerate launch, MPI) and joining the process group under a real `accelerate launch`."""

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

from lib_sdtrain.launch import detect_launch
from lib_sdtrain.train.distributed import launch_warnings
from lib_sdtrain.train.settings import TrainSettings

import launch

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    launch = detect_launch(env)
    assert (launch.rank, launch.world, launch.local_rank, launch.launcher) == (3, 4, 1, "torchrun")
    assert launch.mixed_precision is None and not launch.cpu_only


def test_plain_process_and_mpi_environment():
    assert (detect_launch({}).world, detect_launch({}).launcher) == (1, "none")
    mpi = detect_launch({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (mpi.rank, mpi.world, mpi.local_rank, mpi.launcher) == (1, 2, 1, "mpi")
    pmi = detect_launch({"PMI_RANK": "0", "PMI_SIZE": "3"})
    assert (pmi.rank, pmi.world, pmi.local_rank) == (0, 3, 0)


def test_bad_environment_is_a_clear_error():
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        detect_launch({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        detect_launch({"WORLD_SIZE": "two"})


def test_accelerate_choices_are_read_and_differences_reported():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "ACCELERATE_MIXED_PRECISION": "bf16",
           "ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "False"}
    launch = detect_launch(env)
    assert launch.launcher == "accelerate" and launch.mixed_precision == "bf16" and launch.wants_fsdp
    notes = launch_warnings(launch, TrainSettings(mixed_precision="no"))
    assert len(notes) == 2 and "'bf16'" in notes[0] and "FSDP" in notes[1]
    assert launch_warnings(detect_launch({**env, "ACCELERATE_USE_FSDP": "false"}),
                           TrainSettings(mixed_precision="bf16")) == []
    # the run shards itself (distributed = "fsdp"): accelerate's FSDP wish is met, no note
    assert launch_warnings(launch, TrainSettings(mixed_precision="bf16", method="finetune", distributed="fsdp")) == []


PROBE = """
import json, torch
from lib_sdtrain.train.distributed import Dist
from lib_sdtrain.hosts.standalone import default_device
d = Dist.setup()
t = torch.tensor([float(d.rank + 1)])
torch.distributed.all_reduce(t)
# one file per rank: the two processes share one stdout, where their lines can interleave
with open(f"probe-{d.rank}.json", "w") as f:
    json.dump({"rank": d.rank, "world": d.world, "launcher": d.launch.launcher,
               "local": d.launch.local_rank, "sum": float(t), "device": str(default_device()),
               "mean_loss": d.mean_loss([1.0 + d.rank])}, f)
torch.distributed.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not shutil.which("accelerate", path=str(Path(sys.executable).parent)),
                    reason="accelerate's launcher is not installed in this environment")
def test_accelerate_launch_two_processes_join_one_group(tmp_path):
    """`accelerate launch --multi_gpu` starts its processes through torch's elastic launcher; on a machine without
    GPUs they join a gloo group. Our detection sees rank, world and launcher in both."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(script)]
    done = launch.run(cmd, timeout=240, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = sorted((json.loads(f.read_text()) for f in tmp_path.glob("probe-*.json")), key=lambda r: r["rank"])
    assert [r["rank"] for r in rows] == [0, 1] and all(r["world"] == 2 for r in rows)
    assert all(r["launcher"] == "accelerate" and r["sum"] == 3.0 for r in rows)
    assert [r["local"] for r in rows] == [0, 1]
    assert all(r["mean_loss"] == 1.5 for r in rows)      # the step loss is averaged over both processes
    assert all(r["device"] == "cpu" for r in rows)
