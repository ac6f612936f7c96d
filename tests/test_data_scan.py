"""data/scan.py: folder layouts, captions, per-file validation, and the guarantee that scanning writes nothing."""

import codecs
import random
from pathlib import Path

import pytest
from PIL import Image

from lib_sdtrain.data import scan as S
from lib_sdtrain.errors import UserError
from test_data_support import make_picture, tree_checksum, write_bad_files


def _pics(folder: Path, names, size=(320, 256), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name in names:
        make_picture(rng, *size).save(folder / name)


def test_kohya_layout_repeats_class_tokens_and_reg(tmp_path):
    _pics(tmp_path / "img" / "10_sks dog", ["a.png", "b.jpg", "c.webp"])
    (tmp_path / "img" / "10_sks dog" / "a.txt").write_text("sks dog, on grass\n")
    _pics(tmp_path / "img" / "3_ohwx_cat", ["d.png"])
    _pics(tmp_path / "img" / "notes", ["ignored.png"])                  # no repeat count: not used
    _pics(tmp_path / "reg" / "1_dog", ["r1.png", "r2.png"])
    rep = S.scan_dataset(tmp_path, workers=0)
    by = {r.path.name: r for r in rep.records}
    assert set(by) == {"a.png", "b.jpg", "c.webp", "d.png", "r1.png", "r2.png"}
    assert (by["a.png"].caption, by["a.png"].caption_source) == ("sks dog, on grass", "sidecar")
    assert (by["b.jpg"].caption, by["b.jpg"].caption_source) == ("sks dog", "folder")
    assert by["b.jpg"].repeats == 10 and by["b.jpg"].concept == "sks dog" and by["b.jpg"].dir_name == "10_sks dog"
    assert by["d.png"].caption == "ohwx_cat" and by["d.png"].repeats == 3     # kohya re-joins with "_"
    assert by["r1.png"].is_regularization and by["r1.png"].caption == "dog"
    assert any("notes" in n and "repeat count" in n for n in rep.notes)
    assert rep.counts()["instance_with_repeats"] == 3 * 10 + 3


def test_absurd_repeat_counts_are_refused_with_a_clear_error(tmp_path):
    _pics(tmp_path / "ds" / f"{S.MAX_REPEATS}_fine", ["a.png"])
    assert S.scan_dataset(tmp_path / "ds", workers=0).counts()["instance_with_repeats"] == S.MAX_REPEATS
    _pics(tmp_path / "ds" / "99999999999_typo", ["b.png"])
    for root in (tmp_path / "ds", tmp_path / "ds" / "99999999999_typo"):      # a parent, or the folder itself
        with pytest.raises(UserError, match="99999999999 repeats is more than 10,000"):
            S.scan_dataset(root, workers=0, check=False)


def test_a_single_numbered_folder_given_directly(tmp_path):
    _pics(tmp_path / "5_sks", ["x.png"])
    rep = S.scan_dataset(tmp_path / "5_sks", workers=0)
    assert [(r.repeats, r.caption, r.caption_source) for r in rep.records] == [(5, "sks", "folder")]


def test_flat_folder_uses_a1111_file_name_captions(tmp_path):
    _pics(tmp_path, ["00012-a red car.png", "3 blue bike.png", "-7-old house.png", "1_cat.png", "IMG 1.png"])
    rep = S.scan_dataset(tmp_path, workers=0)
    caps = {r.path.name: (r.caption, r.caption_source, r.repeats) for r in rep.records}
    # A1111: re.sub(r"^[-\d]+\s*", "", stem): digits and hyphens, then spaces; underscores stay.
    assert caps["00012-a red car.png"] == ("a red car", "filename", 1)
    assert caps["3 blue bike.png"][0] == "blue bike"
    assert caps["-7-old house.png"][0] == "old house"
    assert caps["1_cat.png"][0] == "_cat"
    assert caps["IMG 1.png"][0] == "IMG 1"


def test_filename_word_regex_and_join(tmp_path):
    assert S.filename_caption("0001-a_red_car", r"[a-z]+", " ") == "a red car"
    assert S.filename_caption("a_red_car", r"[a-z]+", "") == "aredcar"
    with pytest.raises(UserError):
        S.filename_caption("x", "(", " ")


def test_custom_caption_extension_and_face_crop_sidecar(tmp_path):
    _pics(tmp_path / "2_sks", ["one.png", "src_10_20_30_40.png"])
    (tmp_path / "2_sks" / "one.caption").write_text("from caption file\nsecond line\n")
    (tmp_path / "2_sks" / "src.caption").write_text("face crop source")
    rep = S.scan_dataset(tmp_path, caption_ext="caption", workers=0)
    by = {r.path.name: r for r in rep.records}
    assert by["one.png"].caption == "from caption file\nsecond line"
    assert "multiline_caption" in {p.code for p in by["one.png"].problems}
    assert by["src_10_20_30_40.png"].caption == "face crop source"   # kohya's face-crop fallback


def test_bad_files_get_their_reason_and_severity(tmp_path):
    folder = tmp_path / "1_sks"
    expected = write_bad_files(folder)
    before = tree_checksum(tmp_path)
    rep = S.scan_dataset(tmp_path, workers=0, min_side=256)
    assert tree_checksum(tmp_path) == before
    by = {r.path.name: r for r in rep.records}
    lines = []
    for name, code in sorted(expected.items()):
        codes = {p.code for p in by[name].problems}
        lines.append(f"{name:16} {sorted(codes)}")
        if code:
            assert code in codes, (name, codes)
            severity = S.PROBLEM_SEVERITY[code]
            assert by[name].usable == (severity != "error" and not any(p.severity == "error" for p in by[name].problems))
        else:
            assert not codes, (name, codes)
    print("\n".join(lines))
    for name in ("empty.png", "text.jpg", "cut.png", "cut.jpg", "tiny.png", "bomb.png", "badcap.png"):
        assert not by[name].usable, name
    for name in ("small.png", "alpha.png", "cmyk.jpg", "deep.png", "anim.gif", "really_png.jpg", "rotated.jpg"):
        assert by[name].usable, name
    assert all(p.message for r in rep.records for p in r.problems)


def test_huge_pictures_are_refused_before_decoding(tmp_path):
    Image.new("RGB", (400, 400), "red").save(tmp_path / "big.png")
    chk = S.check_picture(tmp_path / "big.png", max_pixels=100_000)
    assert [p.code for p in chk.problems] == ["huge"]


def test_process_pool_matches_serial(tmp_path):
    _pics(tmp_path, [f"{i:03d}.png" for i in range(40)], size=(96, 96))
    (tmp_path / "zz.png").write_bytes(b"")
    paths = sorted(tmp_path.glob("*.png"))
    serial = S.check_pictures(paths, workers=0, fingerprint=True)
    pooled = S.check_pictures(paths, workers=2, fingerprint=True)
    assert [c.fingerprint.bits if c.fingerprint else None for c in serial] == \
           [c.fingerprint.bits if c.fingerprint else None for c in pooled]
    assert [[p.code for p in c.problems] for c in serial] == [[p.code for p in c.problems] for c in pooled]


def test_other_files_are_listed_and_removed_folder_is_skipped(tmp_path):
    _pics(tmp_path / "1_x", ["a.png"])
    (tmp_path / "1_x" / "readme.docx").write_bytes(b"x")
    (tmp_path / "1_x" / "orphan.txt").write_text("no picture")
    (tmp_path / "1_x" / "a.npz").write_bytes(b"cache")
    _pics(tmp_path / "_removed" / "1_x", ["old.png"])
    rep = S.scan_dataset(tmp_path, workers=0)
    assert [r.path.name for r in rep.records] == ["a.png"]
    assert [p.name for p, _ in rep.skipped] == ["readme.docx"]
    assert any("orphan.txt" in n for n in rep.notes)


def test_missing_or_empty_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        S.scan_dataset(tmp_path / "nope")
    with pytest.raises(UserError, match="no pictures"):
        S.scan_dataset(tmp_path)
    with pytest.raises(UserError):
        S.normalize_ext("a/b")


def test_effective_repeats_balance_regularization_like_kohya(tmp_path):
    # 2 instance pictures × 5 repeats = 10 samples; 3 reg pictures × 1 repeat are cycled to 10 in total.
    def rec(reg, repeats):
        return S.ImageRecord(Path("x.png"), 512, 512, "", "none", repeats, "c", Path("f"), reg)

    recs = [rec(False, 5), rec(False, 5), rec(True, 1), rec(True, 1), rec(True, 1)]
    assert S.effective_repeats(recs) == [5, 5, 4, 3, 3]
    recs = [rec(False, 1)] + [rec(True, 1) for _ in range(4)]     # more reg than needed: the rest unused
    assert S.effective_repeats(recs) == [1, 1, 0, 0, 0]


def test_dataset_dirs_info(tmp_path):
    _pics(tmp_path / "10_sks dog", ["a.png", "b.png"])
    _pics(tmp_path / "reg" / "1_dog", ["r.png"])
    rep = S.scan_dataset(tmp_path, workers=0)
    assert S.dataset_dirs_info(rep.records) == {"10_sks dog": {"n_repeats": 10, "img_count": 2}}
    assert S.dataset_dirs_info(rep.records, regularization=True) == {"1_dog": {"n_repeats": 1, "img_count": 1}}
    d = rep.to_dict()
    assert d["counts"]["pictures"] == 3 and d["subsets"][0]["concept"] == "sks dog"


def test_exif_rotated_pictures_report_their_upright_size(tmp_path):
    # data/dataset.py turns pictures upright (ImageOps.exif_transpose), so buckets must use the upright size
    im = make_picture(random.Random(1), 320, 200)
    exif = Image.Exif()
    exif[0x0112] = 6                      # rotate 90°: shown 200 wide, 320 high
    im.save(tmp_path / "turned.jpg", exif=exif.tobytes())
    im.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.jpg")
    rep = S.scan_dataset(tmp_path, workers=0, fingerprint=True)
    by = {r.path.name: r for r in rep.records}
    assert (by["turned.jpg"].width, by["turned.jpg"].height) == (200, 320)
    assert "exif_rotated" in {p.code for p in by["turned.jpg"].problems}
    from lib_sdtrain.data.dedupe import find_duplicate_groups

    assert len(find_duplicate_groups(rep.records)) == 1   # hashed upright too: it matches the upright copy


def test_threads_from_a_ui_thread_match_serial(tmp_path):
    import threading

    _pics(tmp_path, [f"{i:03d}.png" for i in range(20)], size=(96, 96))
    paths = sorted(tmp_path.glob("*.png"))
    serial = S.check_pictures(paths, workers=0, fingerprint=True)
    box = {}
    t = threading.Thread(target=lambda: box.update(out=S.check_pictures(paths, workers=2, fingerprint=True)))
    t.start()
    t.join()
    assert [c.fingerprint.bits for c in box["out"]] == [c.fingerprint.bits for c in serial]


def test_reg_folder_inside_the_dataset_is_scanned_once(tmp_path):
    _pics(tmp_path / "10_sks", ["a.png"])
    _pics(tmp_path / "reg" / "1_dog", ["r.png"])
    rep = S.scan_dataset(tmp_path, reg_path=tmp_path / "reg", workers=0)
    assert sorted(r.path.name for r in rep.records) == ["a.png", "r.png"]


def test_truncation_is_caught_even_when_pil_is_told_to_tolerate_it(tmp_path, monkeypatch):
    from PIL import ImageFile

    write_bad_files(tmp_path)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)   # as some extensions set it globally
    for name in ("cut.jpg", "cut.png"):
        assert "truncated" in {p.code for p in S.check_picture(tmp_path / name).problems}, name
    assert not S.check_picture(tmp_path / "fine.png").problems


def test_a_symlink_loop_among_the_pictures_is_passed_over(tmp_path):
    # os.DirEntry.is_file() raises for a link that leads to itself (ELOOP); the scan stopped with a traceback
    _pics(tmp_path / "1_x", ["a.png"])
    (tmp_path / "1_x" / "loop.png").symlink_to(tmp_path / "1_x" / "loop.png")
    (tmp_path / "1_x" / "ring").symlink_to(tmp_path / "1_x" / "ring2")
    (tmp_path / "1_x" / "ring2").symlink_to(tmp_path / "1_x" / "ring")
    rep = S.scan_dataset(tmp_path, workers=0)
    assert [r.path.name for r in rep.records] == ["a.png"]


def test_a_caption_with_nul_bytes_is_refused_as_not_utf8(tmp_path):
    # UTF-16 without a byte-order mark is valid UTF-8 with a NUL after each letter: it was read as the caption
    # "r\x00e\x00d\x00..." and scanned as fine
    _pics(tmp_path / "1_x", ["a.png", "b.png"])
    (tmp_path / "1_x" / "a.txt").write_bytes("red, square".encode("utf-16-le"))
    (tmp_path / "1_x" / "b.txt").write_bytes(b"red,\x00 square")
    rep = S.scan_dataset(tmp_path, workers=0)
    for r in rep.records:
        assert [p.code for p in r.problems] == ["caption_encoding"] and not r.usable, r.path.name
        assert "NUL" in r.problems[0].message and "UTF-8" in r.problems[0].message


def test_a_utf16_caption_with_its_byte_order_mark_is_read_and_left_as_it_is(tmp_path):
    # a BOM makes the encoding certain, but the scan refused UTF-16 captions with one ("not UTF-8 text")
    from lib_sdtrain.data.caption_limit import MAX_CAPTION_BYTES

    _pics(tmp_path / "1_x", ["le.png", "be.png", "u8.png", "bad.png", "big.png", "nobom.png"])
    files = {"le.txt": "\ufeffcafé, red square\n😀 tag".encode("utf-16-le"),
             "be.txt": "\ufeffcafé, red square\n😀 tag".encode("utf-16-be"),
             "u8.txt": "\ufeffcafé, red square\n😀 tag".encode("utf-8"),
             "bad.txt": codecs.BOM_UTF16_LE + b"r\x00\x00\xdc",             # a lone low surrogate: undecodable
             # over the size read: the cut falls between the two halves of an emoji's surrogate pair
             "big.txt": ("\ufeff" + "a" * ((MAX_CAPTION_BYTES - 4) // 2) + "😀" * 4).encode("utf-16-le"),
             "nobom.txt": "red, square".encode("utf-16-le")}
    for name, data in files.items():
        (tmp_path / "1_x" / name).write_bytes(data)
    before = tree_checksum(tmp_path)
    by = {r.path.stem: r for r in S.scan_dataset(tmp_path, workers=0, check=False).records}
    for stem in ("le", "be", "u8"):
        assert by[stem].caption == "café, red square\n😀 tag", stem
        assert [p.code for p in by[stem].problems] == ["multiline_caption"], stem
    assert [p.code for p in by["bad"].problems] == ["caption_encoding"]
    assert "not valid UTF-16" in by["bad"].problems[0].message and "re-save it as UTF-8" in by["bad"].problems[0].message
    assert by["big"].usable and "huge_caption" in [p.code for p in by["big"].problems]
    assert set(by["big"].caption) == {"a"}
    assert [p.code for p in by["nobom"].problems] == ["caption_encoding"] and "NUL" in by["nobom"].problems[0].message
    assert tree_checksum(tmp_path) == before                          # read, never rewritten


def test_a_numbered_link_to_another_picture_folder_trains_at_both_repeat_counts_and_says_so(tmp_path):
    # "2_more -> 1_x" was dropped by the de-duplication meant for a --reg folder inside the dataset, without a word;
    # kohya's sd-scripts lists folders by name and follows links, so it trains the pictures at both counts
    _pics(tmp_path / "1_x", ["a.png", "b.png"])
    (tmp_path / "2_more").symlink_to(tmp_path / "1_x", target_is_directory=True)
    _pics(tmp_path / "reg" / "1_dog", ["r.png"])
    rep = S.scan_dataset(tmp_path, reg_path=tmp_path / "reg", workers=0, check=False)
    assert [(s.folder.name, s.repeats, s.class_tokens) for s in rep.subsets] == \
        [("1_x", 1, "x"), ("2_more", 2, "more"), ("1_dog", 1, "dog")]          # the --reg folder still once
    assert sorted((r.dir_name, r.path.name, r.repeats, r.caption) for r in rep.instance) == \
        [("1_x", "a.png", 1, "x"), ("1_x", "b.png", 1, "x"), ("2_more", "a.png", 2, "more"),
         ("2_more", "b.png", 2, "more")]
    assert rep.counts()["instance_with_repeats"] == 2 * 1 + 2 * 2
    note = (f"{tmp_path / '2_more'}: {S.LINKED_FOLDER_NOTE} 1_x; they are trained in each folder, 1 + 2 = 3 "
            "repeats in all (as kohya does). Remove the link to train them once")
    assert [n for n in rep.notes if S.LINKED_FOLDER_NOTE in n] == [note]
    from lib_sdtrain.train import preflight as P
    from lib_sdtrain.train.settings import TrainSettings

    cfg = TrainSettings.from_dict({"data": str(tmp_path), "reg_data": str(tmp_path / "reg"),
                                   "output": str(tmp_path / "out"), "tensorboard": False})
    warnings = P.preflight(cfg, P.FolderHost(tmp_path / "outputs")).warnings
    assert [w for w in warnings if S.LINKED_FOLDER_NOTE in w] == [n for n in rep.notes if S.LINKED_FOLDER_NOTE in n]


def test_a_huge_worker_count_starts_no_more_processes_than_the_cpus_and_chunks_need(tmp_path, monkeypatch, capsys):
    """`dataset scan --workers 99999999999999999999` went to ProcessPoolExecutor as it was, which under "fork"
    starts every process at once: a fork bomb. The pool now gets at most 4 per CPU and one per chunk; a negative
    count is refused."""
    import os

    from lib_sdtrain.cli import main

    asked = []

    class Recorder:                    # records the pool size, then "cannot start" (the serial fallback runs)
        def __init__(self, max_workers):
            asked.append(max_workers)
            raise OSError("no processes here")

    monkeypatch.setattr(S, "ProcessPoolExecutor", Recorder)
    _pics(tmp_path / "5_x", [f"{i:03d}.png" for i in range(12)], size=(64, 64))
    paths = sorted((tmp_path / "5_x").glob("*.png"))
    checks = S.check_pictures(paths, workers=10 ** 20)
    assert len(checks) == 12 and all(c.width == 64 and c.format == "PNG" for c in checks)
    assert asked and asked[0] <= min(3, 4 * (os.cpu_count() or 1)), asked      # 12 files: 3 chunks of 4
    assert main(["dataset", "scan", str(tmp_path), "--workers", "-1"]) == 2
    assert "--workers must be 0" in capsys.readouterr().err
