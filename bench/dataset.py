"""Benchmark: scan + validate + hash a folder of 10,000 small pictures (target: ≤ 60 s on 2 CPU cores).

    .venv/bin/python bench/dataset.py [--count 10000] [--workers 2] [--out bench/results/dataset.json]

The pictures (a mix of PNG and JPEG, 96-192 px, with a few broken files and planted copies) are generated into
a temporary folder first, untimed. Timed stages: `scan_dataset(fingerprint=True)` (open, verify, decode, EXIF,
hashes and colour statistics for every picture, plus caption reading), then near-duplicate grouping and the
recurring-feature report. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _picture(rng: random.Random, w: int, h: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(3, 7)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = [x0, y0, x0 + rng.randint(8, w // 2), y0 + rng.randint(8, h // 2)]
        fill = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
    return im


def _make_one(args: tuple[str, int]) -> None:
    folder, i = args
    rng = random.Random(i)
    w, h = rng.randint(96, 192), rng.randint(96, 192)
    im = _picture(rng, w, h)
    path = Path(folder) / f"{i:05d}"
    if i % 2:
        im.save(path.with_suffix(".jpg"), quality=85)
    else:
        im.save(path.with_suffix(".png"))
    if i % 3 == 0:
        path.with_suffix(".txt").write_text(f"sks, shape {i % 7}, colour {i % 5}\n", encoding="utf-8")
    if i % 500 == 1:   # a planted near-duplicate
        im.resize((w // 2, h // 2)).save(Path(folder) / f"{i:05d}_copy.jpg", quality=40)


def generate(folder: Path, count: int, workers: int) -> None:
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(_make_one, [(str(folder), i) for i in range(count)], chunksize=256))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "empty.jpg").write_bytes(b"")


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the scan's worker processes)."""
    try:
        import resource
    except ImportError:  # Windows: this process only
        return time.process_time()
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_.ru_utime + self_.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2, help="worker processes for the scan (default: 2)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dataset.json"))
    args = ap.parse_args(argv)

    from lib_sdtrain.data.dedupe import find_duplicate_groups
    from lib_sdtrain.data.features import recurring_features
    from lib_sdtrain.data.scan import scan_dataset

    with tempfile.TemporaryDirectory(prefix="sdtrain-bench-") as tmp:
        folder = Path(tmp) / "10_sks"
        t0 = time.perf_counter()
        generate(folder, args.count, args.workers)
        t_gen = time.perf_counter() - t0

        t0, c0 = time.perf_counter(), _cpu_seconds()
        report = scan_dataset(Path(tmp), fingerprint=True, workers=args.workers)
        t_scan, c_scan = time.perf_counter() - t0, _cpu_seconds() - c0
        t0, c0 = time.perf_counter(), _cpu_seconds()
        groups = find_duplicate_groups(report.records)
        t_dedupe, c_dedupe = time.perf_counter() - t0, _cpu_seconds() - c0
        t0, c0 = time.perf_counter(), _cpu_seconds()
        features = recurring_features(report.records)
        t_features, c_features = time.perf_counter() - t0, _cpu_seconds() - c0
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    n = len(report.records)
    rows = [
        ("generate (untimed)", t_gen, None, ""),
        ("scan + validate + hash", t_scan, c_scan, f"{n / t_scan:,.0f} pictures/s"),
        ("near-duplicate groups", t_dedupe, c_dedupe, f"{len(groups)} groups"),
        ("recurring features", t_features, c_features, f"{len(features)} findings"),
        ("total timed", t_scan + t_dedupe + t_features, c_scan + c_dedupe + c_features, "target ≤ 60 s wall"),
    ]
    print(f"{'stage':<26}{'wall s':>9}{'CPU s':>9}  note")
    print("-" * 66)
    for name, secs, cpu, note in rows:
        print(f"{name:<26}{secs:>9.2f}{'' if cpu is None else f'{cpu:9.2f}':>9}  {note}")
    counts = report.counts()
    print(f"\n{n} pictures, {counts['errors']} unusable, {args.workers} workers, {os.cpu_count()} CPUs"
          + (f", load average {load:.1f} at the end" if load is not None else ""))

    result = {
        "benchmark": "dataset scan", "pictures": n, "workers": args.workers, "cpus": os.cpu_count(),
        "python": platform.python_version(), "machine": platform.machine(),
        "seconds": {"generate": t_gen, "scan_validate_hash": t_scan, "dedupe": t_dedupe, "features": t_features},
        "cpu_seconds": {"scan_validate_hash": c_scan, "dedupe": c_dedupe, "features": c_features},
        "load_average": load,
        "pictures_per_second": n / t_scan, "duplicate_groups": len(groups), "unusable": counts["errors"],
        "target_seconds": 60, "within_target": (t_scan + t_dedupe + t_features) <= 60,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
