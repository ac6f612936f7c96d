"""SIGKILL a training run at random moments and check that nothing the user owns is lost (issue #14).

    python tools/safety_kill.py --kills 40 --seed 14 [--json out.json]

One process imports torch once, trains an uninterrupted reference LoRA on the tiny model, then for each kill
forks a child that trains the same run through the real CLI (`python -m lib_sdtrain train`) and is killed
with SIGKILL: either at the n-th file operation of a save (`os.fsync` / `os.replace` inside
`formats.files.atomic_write`, which includes the moment between the state's tensors file and its manifest),
at the n-th loss row (between steps), or after a random delay. Then it checks, for each kill:

- corrupt: a non-temporary .safetensors file in the output folder that does not read back or is not finite;
- the next run: `train --resume RUN_FOLDER` alone when a state exists (it must finish with final weights
  bit-identical to the reference, or refuse), else the resume must be refused and a fresh run (--overwrite)
  must give the reference weights;
- silently wrong: a next run that exits 0 with weights different from the reference;
- temp files: this tool's temporary files (and unreferenced state tensors) left after the next run;
- loss.csv: exactly one row per step after the next run.

Prints a JSON summary (and writes it with --json). The test suite runs this with a few kills
(tests/test_safety_state.py); the full 40-kill result is in bench/results/safety_kill.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")   # before torch: no OpenMP thread pool, so fork() is safe

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)


def make_data(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    folder = root / "3_zwx toy"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        arr = np.zeros((64, 64 + 16 * (i % 2), 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        arr[16:48, 16:48] = [255, 0, 0]
        Image.fromarray(arr).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zwx toy, red square, picture {i}")
    return root


def settings(model: Path, data: Path, epochs: int = 2) -> dict:
    # 4 pictures x 3 repeats, 2 buckets, batch 2: 6 steps per epoch, 12 steps; a save every 2 steps (keep 2)
    # and every epoch, a state with each
    return {"model": str(model), "data": str(data), "name": "run", "resolution": 64, "min_bucket": 64,
            "max_bucket": 128, "batch_size": 2, "epochs": epochs, "learning_rate": 1e-3, "save_every_n_epochs": 1,
            "save_every_n_steps": 2, "keep_last": 2, "tensorboard": False, "sample_every_n_epochs": 0,
            "seed": 7, "lora": {"network_dim": 2, "network_alpha": 2, "targets": "attn", "train_text_encoder": False}}


def tensors_of(path: Path) -> dict:
    from lib_sdtrain.formats.safetensors_io import read_safetensors

    return read_safetensors(path)[0]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


class Hooks:
    """Count (and at call `kill_at` SIGKILL the process before) file operations of saves and loss rows."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at, self.calls, self.kinds = kill_at, 0, []
        self._replace, self._fsync = os.replace, os.fsync

    def point(self, kind: str) -> None:
        self.calls += 1
        self.kinds.append(kind)
        if self.kill_at is not None and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self) -> None:
        from lib_sdtrain.train import monitor

        hooks = self

        def replace(src, dst, *a, **k):
            hooks.point("save:replace:" + Path(str(dst)).name)
            return hooks._replace(src, dst, *a, **k)

        def fsync(fd):
            hooks.point("save:fsync")
            return hooks._fsync(fd)

        write = monitor.LossLog.write

        def log_write(self, *a, **k):
            hooks.point("step")
            return write(self, *a, **k)

        os.replace, os.fsync = replace, fsync
        monitor.LossLog.write = log_write


def cli(argv: list[str], log: Path, out_root: Path, hooks: Hooks | None = None, delay: float | None = None
        ) -> dict:
    """Run `python -m lib_sdtrain ARGV` in a forked child; returns how it ended."""
    pid = os.fork()
    if pid == 0:   # the child: never returns
        code = 70
        try:
            fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ["TRAINING_LAB_OUTPUT"] = str(out_root)
            if hooks is not None:
                hooks.install()
            from lib_sdtrain.cli import main

            code = main(argv)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 71
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if delay is not None:
        deadline = time.time() + delay
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        else:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    else:
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"killed": os.WTERMSIG(status) == signal.SIGKILL, "rc": None}
    return {"killed": False, "rc": os.WEXITSTATUS(status)}


def temp_files(*folders: Path) -> list[str]:
    from lib_sdtrain.formats.files import TEMP_NAME
    from lib_sdtrain.train.state import TENSORS_GLOB

    out = []
    for folder in folders:
        if folder.is_dir():
            out += [str(p) for p in folder.rglob("*") if TEMP_NAME.match(p.name)]
    state = folders[-1] / "state"
    if state.is_dir():
        try:
            named = json.loads((state / "state.json").read_text())["tensors"]["file"]
        except (OSError, ValueError, KeyError):
            named = None
        out += [str(p) for p in state.glob(TENSORS_GLOB) if p.name != named]
    return out


def corrupt_files(folder: Path) -> list[str]:
    from lib_sdtrain.errors import UserError
    from lib_sdtrain.formats.files import TEMP_NAME
    from lib_sdtrain.train.state import nonfinite

    bad = []
    for p in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        if TEMP_NAME.match(p.name):
            continue
        try:
            if nonfinite(tensors_of(p)):
                bad.append(f"{p.name}: not finite")
        except UserError as e:
            bad.append(f"{p.name}: {e}")
    return bad


def loss_rows(run_dir: Path) -> list[int]:
    with open(run_dir / "loss.csv", newline="", encoding="utf-8") as fh:
        return [int(r[0]) for r in list(csv.reader(fh))[1:]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=40)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of 6 steps (the suite uses 1)")
    args = ap.parse_args(argv)
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint
    from lib_sdtrain.train.state import has_state

    work = Path(args.workdir or tempfile.mkdtemp(prefix="safety-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_tiny_checkpoint(work / "tiny.safetensors", "sd1")
    data = make_data(work / "data")
    cfg_path = work / "run.json"
    cfg_path.write_text(json.dumps(settings(model, data, args.epochs)))

    # the reference, in this process, counting the kill points on the way (the same code path as the children)
    from lib_sdtrain.cli import main as cli_main
    from lib_sdtrain.train import monitor

    counter = Hooks()
    original_write = monitor.LossLog.write
    counter.install()
    ref_root = work / "ref"
    os.environ["TRAINING_LAB_OUTPUT"] = str(ref_root)
    saved_out, saved_err = sys.stdout, sys.stderr
    t0 = time.time()
    with open(work / "ref.log", "w") as log:
        sys.stdout = sys.stderr = log
        try:
            rc = cli_main(["train", "--config", str(cfg_path), "--output", str(ref_root / "out")])
        finally:
            sys.stdout, sys.stderr = saved_out, saved_err
            os.replace, os.fsync = counter._replace, counter._fsync
            monitor.LossLog.write = original_write
    ref_seconds = time.time() - t0
    if rc != 0:
        raise SystemExit(f"reference run failed ({rc}); see {work / 'ref.log'}")
    points = list(enumerate(counter.kinds, start=1))
    save_points = [i for i, k in points if k.startswith("save")]
    # after the state's tensors file is renamed and before its manifest is: the folder's fsync, the manifest's
    # fsync and (killed before it happens) the manifest's rename
    tensors_done = [i for i, k in points if k.startswith("save:replace:tensors-")]
    between = [t + d for t in tensors_done for d in (1, 2, 3) if t + d <= len(points)]
    step_points = [i for i, k in points if k == "step"]
    reference = tensors_of(ref_root / "out" / "run.safetensors")
    total_steps = len(step_points)

    rng = random.Random(args.seed)
    plan = []
    for i in range(args.kills):   # about 1/5 between the state's parts, 2/5 elsewhere in saves, 1/5 steps, 1/5 time
        r = i % 5
        if r == 0:
            plan.append(("between_state_parts", rng.choice(between), None))
        elif r in (1, 2):
            plan.append(("in_save", rng.choice(save_points), None))
        elif r == 3:
            plan.append(("between_steps", rng.choice(step_points), None))
        else:
            plan.append(("random_time", None, rng.uniform(0.05, ref_seconds * 1.1)))
    rows = []
    for i, (mode, point, delay) in enumerate(plan):
        trial = work / f"k{i:02d}"
        out, run_dir = trial / "out", trial / "runs" / "run"
        log = trial / "log.txt"
        trial.mkdir()
        argv = ["train", "--config", str(cfg_path), "--output", str(out)]
        first = cli(argv, log, trial, hooks=Hooks(point) if point else None, delay=delay)
        row = {"trial": i, "mode": mode, "point": point,
               "point_kind": counter.kinds[point - 1] if point else None, "delay_s": delay,
               "killed": first["killed"], "first_rc": first["rc"], "state": has_state(run_dir),
               "corrupt_after_kill": corrupt_files(out), "temp_after_kill": len(temp_files(out, run_dir))}
        if row["state"]:
            nxt = cli(["train", "--resume", str(run_dir)], log, trial)
            row["next"] = "resume"
        else:
            refused = cli(["train", "--resume", str(run_dir)], log, trial)
            row["resume_without_state_refused"] = refused["rc"] == 2
            nxt = cli(argv + ["--overwrite"], log, trial)
            row["next"] = "fresh"
        row["next_rc"] = nxt["rc"]
        final = out / "run.safetensors"
        row["final_equal"] = final.is_file() and nxt["rc"] == 0 and same(tensors_of(final), reference)
        row["silently_wrong"] = nxt["rc"] == 0 and not row["final_equal"]
        row["corrupt_after_next"] = corrupt_files(out)
        row["temp_after_next"] = temp_files(out, run_dir)
        try:
            steps = loss_rows(run_dir)
            row["loss_rows_ok"] = steps == list(range(1, total_steps + 1))
        except (OSError, ValueError, IndexError):
            row["loss_rows_ok"] = False
        rows.append(row)
    summary = {
        "kills": len(rows),
        "killed": sum(r["killed"] for r in rows),
        "inside_saves": sum(r["killed"] and r["mode"] in ("in_save", "between_state_parts") for r in rows),
        "between_state_parts": sum(r["killed"] and r["mode"] == "between_state_parts" for r in rows),
        "with_state": sum(r["state"] for r in rows),
        "corrupt_files": sum(len(r["corrupt_after_kill"]) + len(r["corrupt_after_next"]) for r in rows),
        "silently_wrong": sum(r["silently_wrong"] for r in rows),
        "resumed_bit_exact": sum(r["final_equal"] and r["next"] == "resume" for r in rows),
        "resume_refused_with_state": sum(r["next"] == "resume" and r["next_rc"] != 0 for r in rows),
        "fresh_bit_exact": sum(r["final_equal"] and r["next"] == "fresh" for r in rows),
        "no_state_resume_refused": sum(r.get("resume_without_state_refused", False) for r in rows),
        "no_state": sum(not r["state"] for r in rows),
        "temp_files_after_kill": sum(r["temp_after_kill"] for r in rows),
        "temp_files_after_next_run": sum(len(r["temp_after_next"]) for r in rows),
        "loss_csv_ok": sum(r["loss_rows_ok"] for r in rows),
        "kill_points": len(points), "save_points": len(save_points), "steps": total_steps,
        "reference_seconds": round(ref_seconds, 2), "seed": args.seed, "workdir": str(work),
    }
    result = {"summary": summary, "trials": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
