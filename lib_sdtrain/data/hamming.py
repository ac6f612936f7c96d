"""Pairs of 64-bit hashes within a Hamming distance: the search behind `dedupe`'s near-duplicates.

The question: n items, each with one *query* hash q_i and k *view* hashes v_i1..v_ik (for pictures: the pHash of
the full view, and the pHashes of the full and 9 cropped views). The distance of a pair is the smallest
|q_i xor v_jw| or |q_j xor v_iw| over the views w, both ways. Wanted: every pair i < j with distance ≤ t, with that
distance. Two exact methods give the same answer (`close_pairs` picks one):

- `pairs_by_scan`: every query against every view, in row blocks. Time n²·k, memory O(n) besides the pairs
  found. The method dedupe always used, and the fallback where the index would not be faster.
- `pairs_by_index`: multi-index hashing (Norouzi, Punjani & Fleet, "Fast Search in Hamming Space with
  Multi-Index Hashing", CVPR 2012) with per-chunk radii (the generalised pigeonhole principle, Qin et al.,
  "GPH: Similarity Search in Hamming Space", ICDE 2018). m disjoint chunks of the bits get radii r_c with
  Σ (r_c + 1) = t + 1. Two hashes within t bits are within r_c bits on at least one chunk c: otherwise every
  chunk would differ by ≥ r_c + 1 bits and the whole by ≥ t + 1. So every view is filed under each chunk's
  value, each query looks up all values within r_c of its own chunk value (its "ball"), and the views found are
  verified by their full distance. Bits in no chunk weaken the filter, never the guarantee (the verification
  counts all 64). Time about n·(ball sizes + candidates); memory O(n·k + 2^width) besides the pairs found, and
  never an n×n matrix.

The share of view pairs that become candidates falls as the chunks widen, at the price of larger balls and
tables; the planner weighs both for the n at hand, so the work grows slower than n² (bench/dedupe_scale.py:
about n^1.6 from 10,000 to 50,000 items at t = 12). The share depends on how unevenly the hashes spread, so
`estimate_costs` counts it on a sample of the queries instead of assuming uniform bits.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

HASH_BITS = 64
TABLE_BITS = 22            # widest chunk: its bucket sizes and offsets are two direct tables of 2^22 int64 (64 MB)
MAX_CHUNKS = 8
SCAN_BLOCK = 1 << 17       # scan: query rows × items per block (small blocks stay in cache)
PROBE_BLOCK = 1 << 16      # index: (query, ball value) look-ups per batch (likewise)
CANDIDATE_BLOCK = 1 << 17  # index: candidates verified per step

# What one step costs, in ns of CPU time (numpy 2.4, one core of a shared 2-core Intel Xeon VM; fitted on
# bench/dedupe_scale.py's synthetic hashes at 5,000-40,000 items, t = 12). They only steer the choice between
# layouts and the scan: a wrong figure costs speed, never correctness.
COST_SCAN = 0.65         # one query against one view (xor, popcount, minimum)
COST_PROBE = 5.5         # one ball value looked up in a chunk's occupancy table
COST_HIT = 11.0          # one non-empty bucket found (its offsets, its share of the expansion)
COST_CANDIDATE = 6.0     # one candidate view expanded and verified
COST_SORT = 110.0        # one view filed under one chunk (argsort, gathers)
COST_TABLE = 3.0         # one value of a chunk's tables



def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element (uint8)."""
    if hasattr(np, "bitwise_count"):  # numpy ≥ 2.0; A1111 ships numpy 1.26
        return np.bitwise_count(x)
    # SWAR popcount (Hacker's Delight 5-2), vectorised
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.uint8)


@dataclass(frozen=True)
class Chunk:
    """Bits [shift, shift + width) of a hash, searched within `radius` bits."""

    shift: int
    width: int
    radius: int

    def values(self, hashes: np.ndarray) -> np.ndarray:
        return ((hashes >> np.uint64(self.shift)) & np.uint64((1 << self.width) - 1)).astype(np.intp)


@lru_cache(maxsize=64)
def ball(width: int, radius: int) -> np.ndarray:
    """Every `width`-bit mask with at most `radius` bits set (xor it onto a value: the values within `radius`)."""
    masks = [sum(1 << b for b in bits) for r in range(min(radius, width) + 1)
             for bits in itertools.combinations(range(width), r)]
    out = np.array(masks, dtype=np.intp)
    out.flags.writeable = False
    return out


def ball_size(width: int, radius: int) -> int:
    return sum(math.comb(width, r) for r in range(min(radius, width) + 1))


def chunk_layouts(t: int) -> list[tuple[Chunk, ...]]:
    """The layouts the planner weighs: m chunks (1 ≤ m ≤ t + 1) of equal width w (the low m·w bits), radii
    spread so that Σ (r_c + 1) = t + 1. Wider chunks filter better but have larger balls and tables."""
    out = []
    for m in range(1, min(t + 1, MAX_CHUNKS) + 1):
        base, extra = divmod(t + 1, m)
        radii = [base - 1 + (c < extra) for c in range(m)]
        for w in range(4, min(HASH_BITS // m, TABLE_BITS) + 1):
            out.append(tuple(Chunk(c * w, w, r) for c, r in enumerate(radii)))
    return out


def plan_chunks(queries: np.ndarray, views: np.ndarray, t: int, sample: int = 256) -> tuple[Chunk, ...] | None:
    """The cheapest chunk layout for `pairs_by_index`, or None where the scan is expected to be cheaper."""
    return min(estimate_costs(queries, views, t, sample), key=lambda row: row[0])[1]


def estimate_costs(queries: np.ndarray, views: np.ndarray, t: int,
                   sample: int = 256) -> list[tuple[float, tuple[Chunk, ...] | None]]:
    """(expected ns, layout) for the scan (layout None) and the layouts worth a look.

    A layout's cost is its tables, its ball look-ups and its candidates. The layouts are ranked as if every bit
    were an independent coin; the best four are then counted on a sample of the queries, since pHashes of
    similar pictures share chunk values far more often than random bits would.
    """
    n, k = views.shape
    total = n * k
    out: list[tuple[float, tuple[Chunk, ...] | None]] = [(COST_SCAN * n * total, None)]
    # From t ≈ HASH_BITS / 4 on, t + 1 radii leave chunks of a few bits, or balls of tens of thousands of values:
    # the candidates or look-ups approach n·k per query and the scan is as fast (and simpler). Fall back.
    if t < 0 or t >= HASH_BITS // 4 or n < 2:
        return out

    def fixed_cost(layout: tuple[Chunk, ...]) -> float:
        return sum(total * COST_SORT + (1 << c.width) * COST_TABLE + n * ball_size(c.width, c.radius) * COST_PROBE
                   for c in layout)

    def uniform_cost(layout: tuple[Chunk, ...]) -> float:
        cost = fixed_cost(layout)
        for c in layout:
            per_bucket = total / (1 << c.width)                          # views per value, on average
            found = (1 - math.exp(-per_bucket)) * COST_HIT + per_bucket * COST_CANDIDATE
            cost += n * ball_size(c.width, c.radius) * found
        return cost

    picks = np.linspace(0, n - 1, min(n, sample)).astype(np.intp)
    flat = views.reshape(-1)
    for layout in sorted(chunk_layouts(t), key=uniform_cost)[:4]:
        cost = fixed_cost(layout)
        if cost >= out[0][0]:
            continue
        hits = found = 0
        for c in layout:
            sizes = np.bincount(c.values(flat), minlength=1 << c.width)[c.values(queries[picks])[:, None]
                                                                           ^ ball(c.width, c.radius)[None, :]]
            hits += int(np.count_nonzero(sizes))
            found += int(sizes.sum())
        out.append((cost + n * (hits * COST_HIT + found * COST_CANDIDATE) / len(picks), layout))
    return out


def _closest(i: np.ndarray, j: np.ndarray, d: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per pair (i < j): the smallest distance found for it; rows sorted by (i, j)."""
    a, b = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    key = a * n + b
    order = np.lexsort((d, key))
    key = key[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    sel = order[first]
    return a[sel], b[sel], d[sel].astype(np.int64)


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)


def pairs_by_scan(queries: np.ndarray, views: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) arrays, i < j, sorted: every query against every view, vectorised in row blocks."""
    n = len(queries)
    if n < 2 or t < 0:
        return _empty()
    cols = np.ascontiguousarray(views.T)                                  # [k, n]
    block = max(1, SCAN_BLOCK // n)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, n, block):
        stop = min(n, start + block)
        # d[r, j] = min over views w of |q[start + r] xor v[j, w]|
        rowbits = queries[start:stop, None]
        d = popcount(rowbits ^ cols[0][None, :])                         # [rows, n] uint8
        for w in range(1, len(cols)):
            np.minimum(d, popcount(rowbits ^ cols[w][None, :]), out=d)
        rows, js = np.nonzero(d <= t)
        keep = rows + start != js
        found.append((rows[keep] + start, js[keep], d[rows[keep], js[keep]]))
    if not found:
        return _empty()
    return _closest(*(np.concatenate(parts) for parts in zip(*found)), n)


def pairs_by_index(queries: np.ndarray, views: np.ndarray, t: int,
                   layout: tuple[Chunk, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) arrays, i < j, sorted: multi-index search over `layout` (Σ (radius + 1) must be ≥ t + 1)."""
    n, k = views.shape
    if n < 2 or t < 0:
        return _empty()
    if sum(c.radius + 1 for c in layout) < t + 1:
        raise ValueError(f"chunk radii cover distance {sum(c.radius + 1 for c in layout) - 1}, not {t}")
    flat = views.reshape(-1)                                             # view e belongs to item e // k
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for chunk in layout:
        if chunk.radius < 0:
            continue
        values = chunk.values(flat)
        sizes = np.bincount(values, minlength=1 << chunk.width)           # views per chunk value x; they sit at
        start = np.cumsum(sizes) - sizes                                  # sorted positions [start[x], + sizes[x])
        if chunk.width <= 16:
            values = values.astype(np.uint16)                            # numpy's stable sort is a radix sort
        order = np.argsort(values, kind="stable")
        del values
        sorted_views, owner = flat[order], (order // k).astype(np.int32 if n < 2**31 else np.int64)
        del order
        # Where most values are empty, a 1-byte table says which to look up (it stays in cache); where most hold
        # views, the sizes are looked up directly.
        occupied = sizes > 0 if len(flat) < len(sizes) else None
        mine = chunk.values(queries)
        near = ball(chunk.width, chunk.radius)
        batch = max(1, PROBE_BLOCK // len(near))
        for b0 in range(0, n, batch):
            keys = (mine[b0:b0 + batch, None] ^ near[None, :]).reshape(-1)   # [B·|ball|] chunk values to look up
            if occupied is None:
                count = sizes[keys]
                hit = np.flatnonzero(count)                              # the non-empty buckets, by query
                count = count[hit]
                keys = keys[hit]
            else:
                hit = np.flatnonzero(occupied[keys])
                keys = keys[hit]
                count = sizes[keys]
            if hit.size:
                found.extend(_verify(queries, sorted_views, owner, t, b0 + hit // len(near), start[keys], count))
    if not found:
        return _empty()
    return _closest(*(np.concatenate(parts) for parts in zip(*found)), n)


def _verify(queries: np.ndarray, sorted_views: np.ndarray, owner: np.ndarray, t: int, query: np.ndarray,
            lo: np.ndarray, count: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Candidates: query[p] against the sorted views [lo[p], lo[p] + count[p]) for each bucket p (count > 0,
    query ascending). Returns the (query, owner, distance) arrays within t, at most CANDIDATE_BLOCK at a time."""
    out = []
    ends = np.cumsum(count)
    p0 = 0
    while p0 < len(count):   # (one bucket may hold more than CANDIDATE_BLOCK)
        base = int(ends[p0 - 1]) if p0 else 0
        p1 = max(p0 + 1, int(np.searchsorted(ends, base + CANDIDATE_BLOCK, side="right")))
        cnt, last, first = count[p0:p1], ends[p0:p1] - base, lo[p0:p1]
        # Positions in the sorted views: runs first[p], first[p] + 1, ... as one cumulative sum (np.repeat is
        # slow over millions of short runs)
        step = np.ones(int(last[-1]), dtype=np.int64)
        step[0] = first[0]
        step[last[:-1]] = first[1:] - first[:-1] - cnt[:-1] + 1
        pos = np.cumsum(step)
        # Each query's hash, repeated over all its candidates (few long runs: buckets come grouped by query)
        qs = query[p0:p1]
        runs = np.flatnonzero(np.diff(qs, prepend=-1))
        per_query = np.diff(np.append(np.append(0, last)[runs], last[-1]))
        d = popcount(np.repeat(queries[qs[runs]], per_query) ^ sorted_views[pos])
        close = np.flatnonzero(d <= t)
        if close.size:
            qi = qs[np.searchsorted(last, close, side="right")]
            oj = owner[pos[close]]
            keep = qi != oj
            out.append((qi[keep], oj[keep], d[close[keep]]))
        p0 = p1
    return out


def close_pairs(queries: np.ndarray, views: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair i < j within distance t: (i, j, distance) arrays sorted by (i, j). The index where the planner
    expects it to be faster, else the scan; both give exactly the same pairs.

    Args:
        queries: uint64 [n], one query hash per item.
        views: uint64 [n, k], the view hashes per item.
        t: the largest distance (an integer number of bits).
    """
    layout = plan_chunks(queries, views, t)
    if layout is None:
        return pairs_by_scan(queries, views, t)
    return pairs_by_index(queries, views, t, layout)
