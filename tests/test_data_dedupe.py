"""data/dedupe.py and data/features.py: planted near-duplicates are found, different pictures are not grouped,
contact sheets and removal work, and recurring features are reported."""

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_sdtrain.data import dedupe as D
from lib_sdtrain.data import features as F
from lib_sdtrain.data.scan import ImageRecord, scan_dataset
from lib_sdtrain.errors import UserError
from test_data_support import TRANSFORMS, make_picture, transform, tree_checksum


def _planted(root: Path, originals: int = 150, seed: int = 11) -> dict[str, int]:
    """Varied pictures plus transformed copies; returns {file name: source index}."""
    rng = random.Random(seed)
    folder = root / "10_sks"
    folder.mkdir(parents=True)
    source = {}
    for i in range(originals):
        w, h = rng.choice([(256, 192), (192, 256), (224, 224), (288, 192)])
        im = make_picture(rng, w, h)
        im.save(folder / f"o{i:03d}.png")
        source[f"o{i:03d}.png"] = i
        if i % 2 == 0:   # half the originals get one copy, every fifth a second one
            for k in range(1 + (i % 10 == 0)):
                kind = TRANSFORMS[(i // 2 + k) % len(TRANSFORMS)]
                name = f"o{i:03d}_{kind}{k}.jpg"
                transform(im, rng, kind).save(folder / name, quality=92)
                source[name] = i
    return source


def test_planted_near_duplicates_precision_and_recall(tmp_path):
    source = _planted(tmp_path)
    before = tree_checksum(tmp_path)
    rep = scan_dataset(tmp_path, fingerprint=True, workers=0)
    groups = D.find_duplicate_groups(rep.records)
    assert tree_checksum(tmp_path) == before

    def pairs(groups_of_names):
        return {frozenset(p) for g in groups_of_names for p in itertools.combinations(sorted(g), 2)}

    by_source: dict[int, list[str]] = {}
    for name, i in source.items():
        by_source.setdefault(i, []).append(name)
    truth = pairs(g for g in by_source.values() if len(g) > 1)
    found = pairs([p.name for p in g.paths] for g in groups)
    tp = len(truth & found)
    precision = tp / len(found) if found else 0.0
    recall = tp / len(truth)
    missed = sorted(tuple(sorted(p)) for p in truth - found)
    wrong = sorted(tuple(sorted(p)) for p in found - truth)
    print(f"\nnear-duplicates: {len(rep.records)} pictures, {len(truth)} planted pairs, {len(found)} found; "
          f"precision {precision:.3f}, recall {recall:.3f}; missed {missed[:5]}, wrong {wrong[:5]}")
    assert precision >= 0.95 and recall >= 0.95
    for g in groups:   # the suggested keeper is the biggest picture of its group
        sizes = {r.path: r.width * r.height for r in rep.records}
        assert sizes[g.keep] == max(sizes[p] for p in g.paths)


def test_each_transform_alone_is_caught_and_strangers_are_not():
    rng = random.Random(3)
    originals = [make_picture(rng, 256, 192) for _ in range(60)]
    prints = [D.picture_fingerprint(im) for im in originals]
    for kind in TRANSFORMS:
        hits = 0
        for im, fp in zip(originals[:30], prints[:30]):
            copy = D.picture_fingerprint(transform(im, rng, kind))
            hits += bool(D.near_duplicate_pairs([fp, copy]))
        assert hits >= 29, (kind, hits)
    assert D.group_near_duplicates(prints) == []


def test_fingerprint_is_size_and_format_stable():
    rng = random.Random(5)
    im = make_picture(rng, 400, 300)
    a = D.picture_fingerprint(im)
    b = D.picture_fingerprint(im.resize((200, 150)))
    assert D.hash_distance(a, b) <= 4 and D.colour_correlation(a, b) > 0.99
    assert len(a.bits) == 11 and all(bin(p).count("1") == 32 for p in a.bits[1:])   # balanced pHash bits
    assert D.hamming(a.dhash, b.dhash) <= 12


def test_popcount_fallback_matches(monkeypatch):
    x = np.random.default_rng(0).integers(0, 2**63, 1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    expected = np.array([bin(int(v)).count("1") for v in x])
    assert (D._popcount(x).astype(int) == expected).all()
    monkeypatch.delattr(np, "bitwise_count", raising=False)   # numpy 1.26, as A1111 ships
    assert (D._popcount(x).astype(int) == expected).all()


def test_union_find_chains_groups():
    base = D.Fingerprint(tuple([0] + [(1 << 32) - 1] * 10), np.ones((10, 189), dtype=np.float16) / np.sqrt(189))
    shift = lambda n: D.Fingerprint(tuple([0] + [((1 << 32) - 1) << n] * 10), base.colour)  # noqa: E731
    far = D.Fingerprint(tuple([0] + [((1 << 32) - 1) << 32] * 10), base.colour)
    # 0~1 and 1~2 (distance 8 each) but 0 and 2 are 16 apart: still one group, via 1
    assert D.group_near_duplicates([base, shift(4), shift(8), far], phash_max=8) == [[0, 1, 2]]


def test_contact_sheets_and_moving_to_removed(tmp_path):
    rng = random.Random(2)
    folder = tmp_path / "1_x"
    folder.mkdir()
    im = make_picture(rng)
    im.save(folder / "a.png")
    transform(im, rng, "jpeg").save(folder / "b.jpg")
    (folder / "b.txt").write_text("caption of b")
    Image.new("L", (64, 64), 255).save(folder / "b-masklabel.png")    # OneTrainer's mask of b: moves with it
    make_picture(rng).save(folder / "c.png")
    rep = scan_dataset(tmp_path, fingerprint=True, workers=0)
    groups = D.find_duplicate_groups(rep.records)
    assert [[p.name for p in g.paths] for g in groups] == [["a.png", "b.jpg"]]
    sheets = D.contact_sheets(groups, tmp_path / "sheets")
    with Image.open(sheets[0]) as sheet:
        assert sheet.width > 2 * 192 and sheet.height >= 192
    with pytest.raises(UserError):
        D.contact_sheet([folder / "a.png"], folder / "a.png")
    moved = D.move_to_removed([folder / "b.jpg"], tmp_path)
    assert sorted(b.relative_to(tmp_path).as_posix() for _, b in moved) == \
        ["_removed/1_x/b-masklabel.png", "_removed/1_x/b.jpg", "_removed/1_x/b.txt"]
    assert not (folder / "b.jpg").exists() and (tmp_path / "_removed" / "1_x" / "b.jpg").is_file()
    (folder / "b.jpg").write_bytes((tmp_path / "_removed" / "1_x" / "b.jpg").read_bytes())
    again = D.move_to_removed([folder / "b.jpg"], tmp_path)               # never overwrites: gets a new name
    assert again[0][1].name == "b-1.jpg"
    assert [r.path.name for r in scan_dataset(tmp_path, workers=0).records] == ["a.png", "c.png"]
    with pytest.raises(UserError):
        D.move_to_removed([Path("/etc/hostname")], tmp_path)


def _rec(name, caption, stats=None, concept="sks dog"):
    return ImageRecord(Path(name), 512, 512, caption, "sidecar", 10, concept, Path("10_sks dog"), stats=stats)


def test_recurring_tags():
    recs = [_rec(f"{i}.png", "sks dog, red tie" + (", grass" if i < 3 else "") + (", beach" if i == 0 else ""))
            for i in range(8)]
    found = F.recurring_tags(recs)
    assert [(f.label, f.count, f.total) for f in found] == [("red tie", 8, 8)]   # trigger tag and rare tags left out
    assert "red tie" in found[0].advice and found[0].examples
    assert F.recurring_tags(recs[:3]) == []                                     # too few pictures to judge


def test_recurring_picture_traits(tmp_path):
    rng = random.Random(4)
    recs = []
    for i in range(10):
        im = make_picture(rng, 200, 200)
        arr = np.asarray(im).copy()
        if i < 8:   # a white frame/background around most pictures
            arr[:30], arr[-30:], arr[:, :30], arr[:, -30:] = 245, 245, 245, 245
        arr = (arr * 0.25).astype(np.uint8) if i < 7 else arr   # and most of them dark
        recs.append(_rec(f"{i}.png", "sks dog", F.picture_stats(Image.fromarray(arr))))
    found = {f.kind: f for f in F.recurring_picture_traits(recs)}
    assert set(found) == {"background", "brightness"}
    assert found["brightness"].label == "dark pictures" and found["brightness"].count == 7
    bg = found["background"]
    assert bg.count == 7 or bg.count == 8
    assert all(f.to_dict()["share"] >= 0.6 for f in found.values())
    assert F.recurring_features(recs) == F.recurring_tags(recs) + F.recurring_picture_traits(recs)


def test_moving_copies_that_are_symbolic_links(tmp_path):
    # A copy that is a link to a file outside the dataset was followed: the refusal came after the other copies had
    # moved (and without a word of them). A kept link's own target was moved away, leaving the keeper dangling.
    rng = random.Random(3)
    folder, outside = tmp_path / "data" / "1_x", tmp_path / "elsewhere"
    folder.mkdir(parents=True)
    outside.mkdir()
    im = make_picture(rng)
    for p in (folder / "a.png", folder / "b.png", outside / "o.png"):
        im.save(p)
    (folder / "c.png").symlink_to(outside / "o.png")
    (folder / "0.png").symlink_to("b.png")
    root = tmp_path / "data"
    moved = D.move_to_removed([folder / "a.png", folder / "b.png", folder / "c.png"], root, keep=[folder / "0.png"])
    assert sorted(b.name for _, b in moved) == ["a.png", "c.png"]
    assert (root / "_removed" / "1_x" / "c.png").is_symlink() and (outside / "o.png").is_file()
    assert (folder / "b.png").is_file() and (folder / "0.png").is_file()     # the keeper still opens
    with pytest.raises(UserError, match="not inside the dataset"):
        D.move_to_removed([folder / "0.png", outside / "o.png"], root)
    assert (folder / "0.png").is_symlink()                                   # checked before anything moved


def test_copies_in_a_separate_regularization_folder_go_to_its_own_removed(tmp_path):
    # dedupe --remove --reg DIR: a copy among the class pictures stopped the move ("not inside the dataset"),
    # after the dataset's own copies had moved
    rng = random.Random(4)
    data, reg = tmp_path / "data" / "1_x", tmp_path / "reg" / "1_cls"
    data.mkdir(parents=True)
    reg.mkdir(parents=True)
    im = make_picture(rng)
    im.save(data / "a.png")
    im.save(data / "b.png")
    other = make_picture(rng)
    other.save(reg / "r.png")
    other.save(reg / "s.png")
    moved = D.move_to_removed([data / "b.png", reg / "s.png"], tmp_path / "data", reg_root=tmp_path / "reg")
    assert sorted(b.relative_to(tmp_path).as_posix() for _, b in moved) == ["data/_removed/1_x/b.png",
                                                                            "reg/_removed/1_cls/s.png"]
    with pytest.raises(UserError, match="not inside the dataset"):
        D.move_to_removed([data / "a.png", reg / "r.png"], tmp_path / "data")
    assert (data / "a.png").is_file()


def test_many_identical_copies_are_searched_once(tmp_path, monkeypatch):
    # 10,000 copies of one picture listed 50 M pairs (minutes, gigabytes); identical fingerprints are now joined
    # to their first holder and the pair search sees each fingerprint once
    rng = random.Random(6)
    folder = tmp_path / "1_x"
    folder.mkdir()
    make_picture(rng).save(folder / "p000.png")
    for i in range(1, 40):
        (folder / f"p{i:03d}.png").write_bytes((folder / "p000.png").read_bytes())
    make_picture(rng).save(folder / "other.png")
    Image.new("RGB", (96, 96), (9, 9, 9)).save(folder / "flat1.png")      # no colour structure: never a pair
    Image.new("RGB", (96, 96), (9, 9, 9)).save(folder / "flat2.png")
    rep = scan_dataset(tmp_path, fingerprint=True, workers=0)
    seen = []
    real = D.near_duplicate_pairs
    monkeypatch.setattr(D, "near_duplicate_pairs", lambda prints, **kw: seen.append(len(prints)) or real(prints, **kw))
    groups = D.find_duplicate_groups(rep.records)
    assert seen == [3]
    assert [sorted(p.name for p in g.paths) for g in groups] == [[f"p{i:03d}.png" for i in range(40)]]
    assert groups[0].keep.name == "p000.png" and len(groups[0].pairs) == 39
