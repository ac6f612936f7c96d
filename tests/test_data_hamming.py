"""data/hamming.py: the near-copy search returns exactly the pairs (and distances) of a brute-force reference, for
several thresholds, through the multi-index search, the scan and the planner's choice alike."""

import dataclasses
import random

import numpy as np
import pytest

from lib_sdtrain.data import dedupe as D
from lib_sdtrain.data import hamming as H

K = 10                                          # views per item, as in a Fingerprint (full view + 9 crops)
THRESHOLDS = (0, 1, 2, 5, 8, D.PHASH_MAX, 15, 16, 20)
TIGHT = (5, D.PHASH_MAX, 15)                    # thresholds whose layouts get tight copies planted


def brute_force(queries: list[int], views: list[list[int]], t: int) -> list[tuple[int, int, int]]:
    """Every pair i < j, in order, whose distance (the fewest differing bits between one's query and any view of
    the other, both ways) is at most t, with that distance."""
    out = []
    for i in range(len(queries)):
        for j in range(i + 1, len(queries)):
            d = min(min((queries[i] ^ v).bit_count() for v in views[j]),
                    min((queries[j] ^ v).bit_count() for v in views[i]))
            if d <= t:
                out.append((i, j, d))
    return out


def _layouts(t: int) -> list[tuple[H.Chunk, ...]]:
    """Layouts run by force for threshold t: the planner's candidates at their narrowest, in between, widest, and
    with 16-bit chunks (each chunk's radius comes from t, so these are layouts `close_pairs` may pick)."""
    every = H.chunk_layouts(t)
    return [every[0], every[len(every) // 2], every[-1]] + [lay for lay in every if lay[0].width == 16][:2]


def _tight_mask(rng: random.Random, layout: tuple[H.Chunk, ...], lucky: int) -> int:
    """Σ (radius + 1) − 1 differing bits: radius + 1 in every chunk but `lucky`, which gets its radius. Such a
    pair is found through chunk `lucky` only, so a radius one short there misses it."""
    bits = [b for c, chunk in enumerate(layout)
            for b in rng.sample(range(chunk.shift, chunk.shift + chunk.width), chunk.radius + (c != lucky))]
    return sum(1 << b for b in bits)


def make_hashes(seed: int = 1, n: int = 200,
                layouts: tuple[tuple[H.Chunk, ...], ...] = ()) -> tuple[list[int], list[list[int]]]:
    """n random items (crop views 2-12 bits off the full view, like a picture's), then planted copies at every
    distance 0..21: pairs whose crop views are far (so exactly that distance), copies of an item with all views
    shifted alike, copies near one of an item's crops only; and for each layout its tight copies."""
    rng = random.Random(seed)
    queries: list[int] = []
    views: list[list[int]] = []

    def add(q: int, crops: list[int]) -> None:
        queries.append(q)
        views.append([q] + crops)

    def bits(d: int) -> int:
        return sum(1 << b for b in rng.sample(range(64), d))

    def far() -> list[int]:
        return [rng.getrandbits(64) for _ in range(K - 1)]

    for _ in range(n):
        q = rng.getrandbits(64)
        add(q, [q ^ bits(rng.randint(2, 12)) for _ in range(K - 1)])
    for d in range(22):
        for _ in range(2):
            q = rng.getrandbits(64)
            add(q, far())
            add(q ^ bits(d), far())
        src, m = rng.randrange(n), bits(d)
        add(queries[src] ^ m, [v ^ m for v in views[src][1:]])
        src = rng.randrange(n)
        add(views[src][rng.randrange(1, K)] ^ bits(d), far())
    for layout in layouts:
        if all(c.radius + 1 <= c.width for c in layout):
            for lucky in range(len(layout)):
                q = rng.getrandbits(64)
                add(q, far())
                add(q ^ _tight_mask(rng, layout, lucky), far())
    return queries, views


def _arrays(queries: list[int], views: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(queries, dtype=np.uint64), np.array(views, dtype=np.uint64)


def _rows(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[tuple[int, int, int]]:
    return list(zip(*(a.tolist() for a in result)))


@pytest.fixture(scope="module")
def planted():
    queries, views = make_hashes(layouts=tuple(lay for t in TIGHT for lay in _layouts(t)))
    return queries, views, brute_force(queries, views, max(THRESHOLDS) + 1)


def test_planted_distances_straddle_every_threshold(planted):
    # the data only tests a threshold if pairs sit exactly at it and one bit beyond it
    queries, _, every = planted
    assert len(queries) > 300
    found = {d for *_, d in every}
    assert all(t in found and t + 1 in found for t in THRESHOLDS)


@pytest.mark.parametrize("t", THRESHOLDS)
def test_every_method_returns_exactly_the_brute_force_pairs(planted, t):
    queries, views, every = planted
    truth = [row for row in every if row[2] <= t]
    q, v = _arrays(queries, views)
    assert _rows(H.close_pairs(q, v, t)) == truth
    assert _rows(H.pairs_by_scan(q, v, t)) == truth
    for layout in _layouts(t):
        assert _rows(H.pairs_by_index(q, v, t, layout)) == truth, layout


def test_small_blocks_and_the_numpy_1_popcount(planted, monkeypatch):
    # candidates verified a few at a time (one bucket spans several steps), as on a huge folder; numpy < 2
    queries, views, every = planted
    q, v = _arrays(queries, views)
    monkeypatch.setattr(H, "CANDIDATE_BLOCK", 50)   # the 4-bit chunks' buckets hold ~250 views each
    monkeypatch.setattr(H, "PROBE_BLOCK", 64)
    monkeypatch.setattr(H, "SCAN_BLOCK", 5)
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    t = D.PHASH_MAX
    truth = [row for row in every if row[2] <= t]
    for layout in (_layouts(t)[0], _layouts(t)[-1]):
        assert _rows(H.pairs_by_index(q, v, t, layout)) == truth, layout
    assert _rows(H.pairs_by_scan(q, v, t)) == truth


def _reachable(layout: tuple[H.Chunk, ...], queries: list[int], views: list[list[int]], i: int, j: int) -> bool:
    """Whether a search over `layout` can see pair (i, j) at all: one's query within a chunk's radius of a view
    of the other on that chunk, either way."""
    return any((chunk.values(np.uint64(queries[a])) ^ chunk.values(np.uint64(w))).bit_count() <= chunk.radius
               for chunk in layout for a, b in ((i, j), (j, i)) for w in views[b])


def test_tight_copies_need_every_chunk_radius_in_full():
    # An off-by-one in any chunk's radius would lose pairs: the planted tight copies are what catches it
    t = D.PHASH_MAX
    layout = next(lay for lay in H.chunk_layouts(t) if len(lay) == 4 and lay[0].width == 16)
    queries, views = make_hashes(seed=3, n=40, layouts=(layout,))
    truth = brute_force(queries, views, t)
    assert _rows(H.pairs_by_index(*_arrays(queries, views), t, layout)) == truth
    for c in range(len(layout)):
        short = layout[:c] + (dataclasses.replace(layout[c], radius=layout[c].radius - 1),) + layout[c + 1:]
        with pytest.raises(ValueError):
            H.pairs_by_index(*_arrays(queries, views), t, short)
        assert not all(_reachable(short, queries, views, i, j) for i, j, _ in truth), c


def test_large_thresholds_fall_back_to_the_scan(planted):
    rng = np.random.default_rng(0)
    many = rng.integers(0, 2**63, (5000, K), dtype=np.uint64) * np.uint64(2)
    assert H.plan_chunks(many[:, 0], many, D.PHASH_MAX) is not None    # the index for the default ...
    assert H.plan_chunks(many[:, 0], many, H.HASH_BITS // 4) is None   # ... not once the chunks get too short
    queries, views, _ = planted
    q, v = _arrays(queries, views)
    assert H.plan_chunks(q, v, 40) is None
    assert _rows(H.close_pairs(q[:80], v[:80], 40)) == brute_force(queries[:80], views[:80], 40)


def test_near_duplicate_pairs_match_the_fingerprint_definition(planted):
    # through dedupe: the same pairs, in the same order, with the pHash distance of hash_distance and the dHash
    _, views, _ = planted
    rng = random.Random(9)
    colour = np.ones((K, 189), dtype=np.float16) / np.sqrt(189)
    prints = [D.Fingerprint(tuple([rng.getrandbits(64)] + vs), colour) for vs in views]
    for t in (0, D.PHASH_MAX):
        expected = [(i, j, D.hamming(prints[i].dhash, prints[j].dhash), D.hash_distance(prints[i], prints[j]))
                    for i in range(len(prints)) for j in range(i + 1, len(prints))
                    if D.hash_distance(prints[i], prints[j]) <= t]
        assert expected
        assert [row[:4] for row in D.near_duplicate_pairs(prints, phash_max=t)] == expected
