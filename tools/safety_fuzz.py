"""Hostile files through every entry point, at benchmark size (issue #14).

    python tools/safety_fuzz.py [--headers 640] [--model-headers 100] [--pictures 150] [--captions 150]
                                [--seed 2026] [--json bench/results/safety_fuzz.json]

1. Mutated .safetensors headers (lib_sdtrain/testing/hostile.py) of a trained tiny LoRA through every reader
   listed in tests/safety_readers.py, including the `compare` command (which renders) and applying the file to
   a loaded model as compare does; then mutated headers of the tiny model checkpoint itself.
2. Corrupt pictures and hostile captions in one dataset through `dataset scan|tags|buckets|dedupe|guidance`
   (CLI), the Dataset tab's functions, and a training run over the lot.

Anything but a normal result or a UserError (one line for the user; exit code 1/2 for a command) counts as a
traceback. Prints and writes a JSON summary. The test suite runs the same code with fewer cases
(tests/test_safety_fuzz.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run_all(readers: dict, path: Path, case: str, tracebacks: list, calls: Counter) -> None:
    from lib_sdtrain.errors import UserError

    for name, read in readers.items():
        calls[name] += 1
        try:
            read(path)
        except UserError:
            pass
        except BaseException as e:  # noqa: BLE001 - what this tool counts
            tracebacks.append({"case": case, "entry": name, "error": f"{type(e).__name__}: {str(e)[:200]}",
                               "where": traceback.format_exc()[-600:]})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--headers", type=int, default=640)
    ap.add_argument("--model-headers", type=int, default=100)
    ap.add_argument("--pictures", type=int, default=150)
    ap.add_argument("--captions", type=int, default=150)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from conftest import make_dataset
    from safety_readers import header_readers

    from lib_sdtrain.cli import main as cli
    from lib_sdtrain.errors import UserError
    from lib_sdtrain.formats.safetensors_io import read_header
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.testing.hostile import corrupt_caption, corrupt_picture, mutated_files
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint
    from lib_sdtrain.train.loop import train
    from lib_sdtrain.train.settings import TrainSettings

    work = Path(args.workdir or tempfile.mkdtemp(prefix="safety-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TRAINING_LAB_OUTPUT"] = str(work / "outputs")   # the commands' run folders stay in the workdir
    model = make_tiny_checkpoint(work / "tiny.safetensors", "sd1")
    data = make_dataset(work / "data", 2, 64)
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=work / "outputs")
    cfg = TrainSettings.from_dict({
        "model": str(model), "data": str(data), "name": "t", "resolution": 64, "min_bucket": 64, "max_bucket": 64,
        "max_steps": 1, "save_every_n_epochs": 0, "tensorboard": False, "sample_every_n_epochs": 0,
        "lora": {"network_dim": 2, "network_alpha": 2, "targets": "attn", "train_text_encoder": False}})
    final = train(cfg, host).final
    valid = final.read_bytes()
    parts = host.load(str(model))
    readers = header_readers(work / "work", model=model, output_root=work / "outputs", parts=parts, host=host,
                             compare=True)
    tracebacks: list = []
    calls: Counter = Counter()
    kinds: Counter = Counter()
    refused = 0
    t0 = time.time()
    devnull = open(os.devnull, "w")
    out, err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = devnull   # the commands print their refusals
    try:
        for i, kind, blob in mutated_files(valid, args.headers, seed=args.seed):
            final.write_bytes(blob)
            kinds["lora:" + kind] += 1
            try:
                read_header(final)
            except UserError:
                refused += 1
            run_all(readers, final, f"lora {i} {kind}", tracebacks, calls)
        final.write_bytes(valid)
        model_bytes = model.read_bytes()
        target = work / "mutated-model.safetensors"
        model_readers = {k: v for k, v in readers.items() if k not in ("cli.compare", "apply.applier")}
        model_readers["cli.train"] = lambda p: cli(["train", "--model", str(p), "--data", str(data), "--name",
                                                   "m", "--output", str(work / "mout"), "--max-steps", "1",
                                                   "--resolution", "64", "--device", "cpu", "--overwrite"])
        for i, kind, blob in mutated_files(model_bytes, args.model_headers, seed=args.seed + 1):
            target.write_bytes(blob)
            kinds["model:" + kind] += 1
            try:
                read_header(target)
            except UserError:
                refused += 1
            run_all(model_readers, target, f"model {i} {kind}", tracebacks, calls)
    finally:
        sys.stdout, sys.stderr = out, err
        host.release(parts)
    header_seconds = time.time() - t0

    # ---- pictures and captions --------------------------------------------------------------------------
    from lib_sdtrain.ui import dataset_tab as D

    rng = random.Random(args.seed)
    ds = work / "hostile-data"
    folder = ds / "2_zwx toy"
    folder.mkdir(parents=True)
    good = sorted((data / "3_zwx toy").glob("*.png"))
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
        (folder / p.with_suffix(".txt").name).write_text("zwx toy")
    pic_kinds: Counter = Counter()
    for i in range(args.pictures):
        kind, ext, blob = corrupt_picture(rng)
        (folder / f"bad{i:03d}{ext}").write_bytes(blob)
        pic_kinds[kind] += 1
    for i in range(args.captions):
        kind, blob = corrupt_caption(rng)
        (folder / f"cap{i:03d}.png").write_bytes(good[0].read_bytes())
        (folder / f"cap{i:03d}.txt").write_bytes(blob)
        pic_kinds["caption:" + kind] += 1
    d = str(ds)
    entry = {
        "cli.dataset scan": lambda: cli(["dataset", "scan", d, "--json"]),
        "cli.dataset tags": lambda: cli(["dataset", "tags", d, "--json"]),
        "cli.dataset buckets": lambda: cli(["dataset", "buckets", d, "--json"]),
        "cli.dataset dedupe": lambda: cli(["dataset", "dedupe", d, "--json"]),
        "cli.dataset guidance": lambda: cli(["dataset", "guidance", d, "--json"]),
        "tab.scan_report": lambda: D.scan_report(d), "tab.tag_rows": lambda: D.tag_rows(d),
        "tab.token_summary": lambda: D.token_summary(d), "tab.bucket_report": lambda: D.bucket_report(d),
        "tab.guidance": lambda: D.guidance_report(d), "tab.gallery": lambda: D.gallery_items(d),
        "tab.duplicates": lambda: D.duplicate_groups(d), "tab.features": lambda: D.features_markdown(d),
        "cli.train": lambda: cli(["train", "--model", str(model), "--data", d, "--name", "hostile", "--output",
                                  str(work / "hout"), "--max-steps", "2", "--resolution", "64", "--batch-size", "4",
                                  "--shuffle-tags", "--caption-wildcards", "--device", "cpu", "--overwrite",
                                  "--network-dim", "2", "--no-tensorboard"]),
    }
    for i in range(0, args.pictures, max(1, args.pictures // 10)):
        rel = f"2_zwx toy/bad{i:03d}" + next(p.suffix for p in folder.glob(f"bad{i:03d}.*"))
        entry[f"tab.load_caption bad{i:03d}"] = lambda rel=rel: D.load_caption(d, "", rel)
    for i in range(0, args.captions, max(1, args.captions // 10)):
        entry[f"tab.load_caption cap{i:03d}"] = lambda i=i: D.load_caption(d, "", f"2_zwx toy/cap{i:03d}.png")
    t1 = time.time()
    sys.stdout = sys.stderr = devnull
    codes = {}
    try:
        for name, call in entry.items():
            calls[name] += 1
            try:
                codes[name] = call()
            except UserError:
                codes[name] = "UserError"
            except BaseException as e:  # noqa: BLE001
                tracebacks.append({"case": "dataset", "entry": name, "error": f"{type(e).__name__}: {str(e)[:200]}",
                                   "where": traceback.format_exc()[-600:]})
    finally:
        sys.stdout, sys.stderr = out, err
    summary = {
        "headers_lora": args.headers, "headers_model": args.model_headers,
        "headers_refused_by_reader": refused, "header_entry_points": len(readers) + 1,
        "corrupt_pictures": args.pictures, "hostile_captions": args.captions,
        "dataset_entry_points": len(entry), "train_exit_code": codes.get("cli.train"),
        "tracebacks": len(tracebacks), "calls": sum(calls.values()),
        "header_seconds": round(header_seconds, 1), "dataset_seconds": round(time.time() - t1, 1),
        "mutation_kinds": dict(kinds), "picture_kinds": dict(pic_kinds), "seed": args.seed,
    }
    result = {"summary": summary, "tracebacks": tracebacks[:50], "entry_points": sorted(calls)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_kinds")}, indent=1))
    for t in tracebacks[:10]:
        print(t["case"], t["entry"], t["error"], file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
