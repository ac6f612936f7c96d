"""Benchmark: the near-copy pHash search, the old all-pairs scan against the new `data.hamming.close_pairs`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/dedupe_scale.py [--sizes 2000,10000,50000] [--threshold 12]
        [--pictures 0] [--old-limit-s 60] [--old-limit-gb 2] [--out bench/results/dedupe_scale.json]

Synthetic hashes shaped like the fingerprints `scan` makes: per item a full-view pHash with 32 of 64 bits set
and 9 crop views 4-14 bits off it (real crops are 4-18 bits off, median 10), plus 2 % planted copies of other
items at 0-16 bits. `--pictures N` adds a row for the fingerprints of N generated pictures (bench/dataset.py's
random shapes): real pHashes crowd together far more than random bits, which is the index's hard case.

For each size both methods run side by side on the same hashes (the old one is skipped where its time,
extrapolated from the previous size as n², would pass `--old-limit-s`, or its memory `--old-limit-gb`), their
pairs are compared, and a separate untimed pass measures each one's peak memory (tracemalloc). Times are the
best of 3 runs below 20,000 items, else one run; CPU time is this process's, wall time includes waiting for a
shared core. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib_sdtrain.data import hamming


def old_all_pairs(full: np.ndarray, views_by_view: np.ndarray, phash_max: int) -> list[tuple[int, int, int]]:
    """The search `dedupe.near_duplicate_pairs` ran before data/hamming.py (commit 03577fa), unchanged but for
    its inputs: full [n] and views [10, n] uint64. Returns (i, j, distance) sorted by (i, j)."""
    n = len(full)
    views = views_by_view
    block = max(1, 2_000_000 // n)
    best: dict[tuple[int, int], int] = {}
    for start in range(0, n, block):
        stop = min(n, start + block)
        rowbits = full[start:stop, None]
        d = hamming.popcount(rowbits ^ views[0][None, :])                   # [rows, n]
        for v in range(1, len(views)):
            np.minimum(d, hamming.popcount(rowbits ^ views[v][None, :]), out=d)
        rows, cols = np.nonzero(d <= phash_max)
        for r, j in zip(rows.tolist(), cols.tolist()):
            i = r + start
            if i == j:
                continue
            key = (i, j) if i < j else (j, i)
            dist = int(d[r, j])
            if dist < best.get(key, 99):
                best[key] = dist
    return [(i, j, d) for (i, j), d in sorted(best.items())]


def new_pairs(full: np.ndarray, views: np.ndarray, phash_max: int) -> list[tuple[int, int, int]]:
    i, j, d = hamming.close_pairs(full, views, phash_max)
    return list(zip(i.tolist(), j.tolist(), d.tolist()))


def _pack(bits: np.ndarray) -> np.ndarray:
    """bool [..., 64] → uint64 [...] (bit 63 first)."""
    return np.packbits(bits, axis=-1).view(">u8")[..., 0].astype(np.uint64)


def _swap(rng: np.random.Generator, bits: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Move k[r] set bits of row r to clear places (distance 2·k[r]; the count of set bits stays 32)."""
    score = rng.random(bits.shape)
    out = bits.copy()
    for value in (True, False):
        rank = np.argsort(np.where(bits == value, score, 2.0), axis=-1).argsort(axis=-1)   # rank among those bits
        out ^= (bits == value) & (rank < k[..., None])
    return out


def synthetic(n: int, seed: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """full [n] and views [n, k] (view 0 = full): balanced pHash-like bits, crops 4-14 bits off, 2 % copies."""
    rng = np.random.default_rng(seed)
    full = rng.random((n, 64)).argsort(axis=1) < 32                                   # [n, 64], 32 bits set
    views = np.repeat(full[:, None, :], k, axis=1)                                    # [n, k, 64]
    views[:, 1:] = _swap(rng, views[:, 1:], rng.integers(2, 8, (n, k - 1)))
    copies = rng.choice(n, n // 50, replace=False)
    sources = rng.integers(0, n, len(copies))
    shift = rng.integers(0, 9, len(copies))                                           # 0-16 bits
    views[copies] = _swap(rng, views[sources], np.repeat(shift[:, None], k, axis=1))
    packed = _pack(views)
    return np.ascontiguousarray(packed[:, 0]), np.ascontiguousarray(packed)


def pictures(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fingerprints of n generated pictures (random shapes, 96-192 px), as `scan` computes them."""
    from bench.dataset import _picture
    from lib_sdtrain.data.thumbnail import picture_fingerprint

    rng = random.Random(seed)
    arr = np.array([picture_fingerprint(_picture(rng, rng.randint(96, 192), rng.randint(96, 192))).bits
                    for _ in range(n)], dtype=np.uint64)
    return np.ascontiguousarray(arr[:, 1]), np.ascontiguousarray(arr[:, 1:])


def _timed(fn, repeats: int) -> tuple[float, float, list]:
    best_wall = best_cpu = float("inf")
    out: list = []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best_wall, best_cpu = min(best_wall, time.perf_counter() - w0), min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu, out


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _plan_text(full: np.ndarray, views: np.ndarray, t: int) -> str:
    layout = hamming.plan_chunks(full, views, t)
    if layout is None:
        return "scan"
    return f"{len(layout)}×{layout[0].width} bits, radii {','.join(str(c.radius) for c in layout)}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def run_row(label: str, full: np.ndarray, views: np.ndarray, t: int, run_old: bool, memory: bool) -> dict:
    n = len(full)
    repeats = 3 if n < 20_000 else 1
    row: dict = {"data": label, "n": n, "threshold": t, "plan": _plan_text(full, views, t)}
    new_wall, new_cpu, new = _timed(lambda: new_pairs(full, views, t), repeats)
    row.update(pairs=len(new), new_wall_s=new_wall, new_cpu_s=new_cpu)
    if run_old:
        by_view = np.ascontiguousarray(views.T)
        old_wall, old_cpu, old = _timed(lambda: old_all_pairs(full, by_view, t), repeats)
        row.update(old_wall_s=old_wall, old_cpu_s=old_cpu, same_pairs=old == new)
        if memory:
            row["old_peak_mb"] = _peak_mb(lambda: old_all_pairs(full, by_view, t))
    if memory:
        row["new_peak_mb"] = _peak_mb(lambda: new_pairs(full, views, t))
    return row


def _fmt(row: dict) -> str:
    def num(key: str, spec: str = ".2f") -> str:
        return format(row[key], spec) if key in row else "-"

    ratio_cpu = f"{row['old_cpu_s'] / row['new_cpu_s']:.1f}×" if "old_cpu_s" in row else "-"
    ratio_wall = f"{row['old_wall_s'] / row['new_wall_s']:.1f}×" if "old_wall_s" in row else "-"
    same = {True: "yes", False: "NO"}.get(row.get("same_pairs"), "-")   # type: ignore[arg-type]
    return (f"| {row['data']} | {row['n']:,} | {row['pairs']:,} | {num('old_cpu_s')} | {num('new_cpu_s', '.3f')} | "
            f"{ratio_cpu} | {num('old_wall_s')} | {num('new_wall_s', '.3f')} | {ratio_wall} | "
            f"{num('old_peak_mb', '.0f')} | {num('new_peak_mb', '.0f')} | {same} | {row['plan']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2000,10000,50000")
    ap.add_argument("--threshold", type=int, default=12)
    ap.add_argument("--pictures", type=int, default=0, help="also a row for N generated pictures' fingerprints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--old-limit-s", type=float, default=60.0)
    ap.add_argument("--old-limit-gb", type=float, default=2.0)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory passes")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dedupe_scale.json"))
    args = ap.parse_args(argv)

    rows = []
    last_old: tuple[int, float, float] | None = None     # (n, CPU s, peak MB) of the last old run
    jobs = [("synthetic", int(s)) for s in args.sizes.split(",")]
    if args.pictures:
        jobs.append(("pictures", args.pictures))
    header = ("| data | n | pairs ≤ t | old CPU s | new CPU s | CPU ratio | old wall s | new wall s | wall ratio | "
              "old peak MB | new peak MB | same pairs | new plan |")
    load_before = os.getloadavg()[0]
    print(f"threshold {args.threshold}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"numpy {np.__version__}, {_cpu_model()}, load {load_before:.1f}", flush=True)
    print(header + "\n|" + "---|" * (header.count("|") - 1), flush=True)
    for label, n in jobs:
        full, views = synthetic(n, args.seed) if label == "synthetic" else pictures(n, args.seed)
        run_old = True
        if last_old is not None and label == "synthetic":
            n0, cpu0, mb0 = last_old
            run_old = cpu0 * (n / n0) ** 2 <= args.old_limit_s and mb0 * n / n0 <= args.old_limit_gb * 1024
        row = run_row(label, full, views, args.threshold, run_old, not args.no_memory)
        row["load_after"] = os.getloadavg()[0]
        if "old_cpu_s" in row and label == "synthetic":
            last_old = (n, row["old_cpu_s"], row.get("old_peak_mb", 0.0))
        rows.append(row)
        print(_fmt(row), flush=True)
    result = {"machine": {"platform": platform.platform(), "processor": _cpu_model(),
                          "cpus": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__,
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "load_before": load_before, "threshold": args.threshold, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0 if all(r.get("same_pairs", True) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
