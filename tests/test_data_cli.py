"""`python -m lib_sdtrain dataset ...`: every subcommand, --json output, and the dataset left byte-for-byte
unchanged by every read-only tool."""

import json
import os
import random
import shutil
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from lib_sdtrain import cli
from test_data_support import make_picture, transform, tree_checksum, write_bad_files


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("template") / "data"
    rng = random.Random(9)
    inst = root / "img" / "10_sks dog"
    inst.mkdir(parents=True)
    for i in range(8):
        im = make_picture(rng, rng.choice([320, 256, 192]), rng.choice([256, 320]))
        im.save(inst / f"p{i}.png")
        (inst / f"p{i}.txt").write_text("sks dog, red tie" + (", grass" if i % 2 else "") + "\n")
    transform(im, rng, "jpeg").save(inst / "copy.jpg")   # same size: the PNG original is the keeper
    write_bad_files(root / "img" / "2_extra")
    reg = root / "reg" / "1_dog"
    reg.mkdir(parents=True)
    for i in range(12):
        make_picture(rng, 256, 256).save(reg / f"r{i}.png")
    return root


@pytest.fixture()
def dataset(template, tmp_path) -> Path:
    """A fresh copy per test (copy2 keeps modification times, which the checksum includes)."""
    return Path(shutil.copytree(template, tmp_path / "data"))


def _run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["dataset", *[str(a) for a in argv]])
    return code, capsys.readouterr().out


def test_read_only_tools_leave_the_dataset_unchanged(dataset, capsys, tmp_path):
    before = tree_checksum(dataset)
    # the default resolution is the default model's (the toy model, 64 px); this set is made for 512
    for argv in (["scan", dataset], ["scan", dataset, "--all"], ["tags", dataset],
                 ["buckets", dataset, "--resolution", "512"], ["dedupe", dataset],
                 ["guidance", dataset, "--resolution", "512"], ["tags", dataset, "--add", "x", "--trigger", "ohwx"],
                 ["dedupe", dataset, "--sheets", tmp_path / "sheets"],
                 ["buckets", dataset, "--no-upscale", "--resolution", "512"]):
        code, out = _run(capsys, *argv)
        assert code == 0 and out.strip(), argv
        code, out = _run(capsys, *argv, "--json")
        assert code == 0 and isinstance(json.loads(out), dict), argv
        assert tree_checksum(dataset) == before, f"{argv} changed the dataset"
    assert list((tmp_path / "sheets").glob("*.png"))


def test_scan_json_lists_bad_files_with_reasons(dataset, capsys):
    code, out = _run(capsys, "scan", dataset, "--json")
    data = json.loads(out)
    by = {Path(r["path"]).name: r for r in data["records"]}
    assert {p["code"] for p in by["cut.jpg"]["problems"]} == {"truncated"}
    assert by["cut.jpg"]["problems"][0]["severity"] == "error"
    assert by["alpha.png"]["problems"][0]["severity"] == "warning"
    assert data["counts"]["regularization"] == 12


def test_dedupe_json_gives_groups_of_paths(dataset, capsys):
    code, out = _run(capsys, "dedupe", dataset, "--json")
    data = json.loads(out)
    names = [sorted(Path(p).name for p in g) for g in data["groups"]]
    assert ["copy.jpg", "p7.png"] in names
    assert any(f["label"] == "red tie" for f in data["recurring"])


def test_tags_json_has_kohyas_tag_frequency(dataset, capsys):
    code, out = _run(capsys, "tags", dataset, "--json")
    freq = json.loads(out)["tag_frequency"]
    assert freq["10_sks dog"] == {"sks dog": 9, "red tie": 8, "grass": 4}
    assert freq["1_dog"] == {"dog": 12}


def test_buckets_and_guidance_json(dataset, capsys):
    code, out = _run(capsys, "buckets", dataset, "--json", "--batch", "2", "--resolution", "512")
    data = json.loads(out)
    assert len(data["ladder"]) == 17 and data["bucket_info"]["buckets"]   # kohya's 256..1024 ladder at 512
    assert all(p["bucket"] in data["ladder"] for p in data["pictures"])
    code, out = _run(capsys, "buckets", dataset, "--json", "--resolution", "1024")
    ladder = json.loads(out)["ladder"]                                      # bounds scale: 512..2048 at 1024
    assert min(min(b) for b in ladder) == 512 and max(max(b) for b in ladder) == 2048
    code, out = _run(capsys, "guidance", dataset, "--json", "--kind", "subject", "--batch", "2", "--epochs", "3",
                     "--resolution", "512")
    g = json.loads(out)
    assert g["steps"]["regularization_factor"] == 2 and g["steps"]["epochs"] == 3


def test_tags_write_changes_only_captions(dataset, capsys):
    pictures = {p: p.read_bytes() for p in dataset.rglob("*") if p.suffix != ".txt" and p.is_file()}
    code, out = _run(capsys, "tags", dataset, "--remove", "red tie", "--trigger", "ohwx", "--write")
    assert code == 0 and "written" in out
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.suffix != ".txt" and p.is_file()} == pictures
    assert (dataset / "img" / "10_sks dog" / "p1.txt").read_text() == "ohwx, sks dog, grass\n"
    assert (dataset / "img" / "10_sks dog" / "copy.txt").read_text() == "ohwx, sks dog\n"   # new caption file
    assert not list((dataset / "reg").rglob("*.txt"))
    # where the trigger (the first word of a two-word folder, "10_sks dog") stands: after the edit "ohwx" comes
    # first, so "sks" stands in the first half of "ohwx, sks dog, ..." (9 pictures); the one-word "2_extra" names
    # no trigger
    code, out = _run(capsys, "tags", dataset, "--json")
    trig = json.loads(out)["trigger"]
    assert code == 0 and trig["triggers"] == ["sks"]
    assert (trig["first"], trig["early"], trig["late"]) == (0, 9, 0) and trig["hint"] == ""
    # asked for explicitly, "extra" stands at the end of the 9 usable "ohwx, extra" captions
    code, out = _run(capsys, "tags", dataset, "--trigger", "extra")
    assert code == 0 and "trigger extra: first in 0" in out and "hint: the trigger (extra)" in out


def test_a_trigger_that_is_not_one_tag_is_refused_before_anything_is_written(dataset, capsys):
    before = tree_checksum(dataset)
    for trigger in ("", "  ", "ohwx, dog"):       # "" used to be ignored without a word; "a, b" is two tags
        assert cli.main(["dataset", "tags", str(dataset), "--trigger", trigger, "--write"]) == 2
        assert "trigger" in capsys.readouterr().err
    assert tree_checksum(dataset) == before


def test_caption_edits_holding_control_characters_are_refused_before_anything_is_written(dataset, capsys):
    """--trigger, --add and --replace's new tags took an escape, a line break (a new wildcard line) or a
    text-direction override into every caption; refused now with the character named. A tab and any other
    character (accents, CJK, emoji joiners) are still written; --remove may name such a tag."""
    before = tree_checksum(dataset)
    for bad, name in (("\x1b[31m", "\\x1b"), ("a\rb", "\\r"), ("x\u202egnp", "text-direction"),
                      ("a\u2028b", "\\u2028"), ("\x7f", "\\x7f")):
        for argv in (["--trigger", "ohwx" + bad], ["--add", "red" + bad], ["--replace", "red tie=tie" + bad]):
            assert cli.main(["dataset", "tags", str(dataset), *argv, "--write"]) == 2, argv
            err = capsys.readouterr().err
            assert name in err and err.count("\n") == 1, (argv, err)
    assert tree_checksum(dataset) == before
    code, _ = _run(capsys, "tags", dataset, "--add", "café\tnoir, 猫, 👩\u200d🔬", "--remove", "x\x1b",
                     "--write")
    assert code == 0
    assert (dataset / "img" / "10_sks dog" / "p1.txt").read_text() == "sks dog, red tie, grass, café\tnoir, 猫, 👩\u200d🔬\n"


def test_dedupe_remove_moves_copies_aside(dataset, capsys):
    code, out = _run(capsys, "dedupe", dataset, "--remove", "--json")
    moved = [Path(m["from"]) for m in json.loads(out)["moved"]]
    assert [p.name for p in moved if p.parent.name == "10_sks dog"] == ["copy.jpg"]
    # write_bad_files saves one picture under several names: true duplicates, so they are moved too (one kept)
    assert all(not p.exists() for p in moved)
    assert len([p for p in (dataset / "_removed").rglob("*") if p.is_file()]) == len(moved)
    assert len([p for p in moved if p.parent.name == "2_extra" and p.suffix != ".txt"]) >= 3
    assert (dataset / "_removed" / "img" / "10_sks dog" / "copy.jpg").is_file()
    code, out = _run(capsys, "dedupe", dataset, "--json")
    assert not any("copy.jpg" in p for g in json.loads(out)["groups"] for p in g)


def test_user_errors(capsys, tmp_path):
    assert cli.main(["dataset", "scan", str(tmp_path / "missing")]) == 2
    assert cli.main(["dataset"]) == 2
    assert cli.main(["dataset", "tags", str(tmp_path), "--write"]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "pic.png").write_bytes(b"x")            # a file given where the folder belongs
    assert cli.main(["dataset", "scan", str(tmp_path / "pic.png")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_classgen_command_with_a_stand_in_host(monkeypatch, tmp_path, capsys):
    class Host:
        name = "stand-in"
        released = False

        def load(self, model=None):
            assert model == "model.safetensors"
            return object()

        def sample(self, parts, requests, stop=None):
            return [Image.new("RGB", (r.width, r.height), "gray") for r in requests]

        def release(self, parts):
            Host.released = True

    module = types.ModuleType("lib_sdtrain.hosts.standalone")
    module.StandaloneHost = Host
    monkeypatch.setitem(sys.modules, "lib_sdtrain.hosts.standalone", module)
    code, out = _run(capsys, "classgen", tmp_path / "1_dog", "--model", "model.safetensors", "--prompt", "a dog",
                     "--count", "3", "--width", "64", "--height", "64", "--json")
    assert code == 0 and json.loads(out)["generated"] == 3 and Host.released
    assert len(list((tmp_path / "1_dog").glob("*.png"))) == 3
    # a sampler the standalone host does not draw with is refused before any model loads (it was after)
    Host.load = lambda self, model=None: pytest.fail("the model was loaded before the sampler was checked")
    assert cli.main(["dataset", "classgen", str(tmp_path / "1_dog"), "--model", "model.safetensors", "--prompt",
                     "a dog", "--sampler", "foo"]) == 2
    assert "unknown sampler 'foo'" in capsys.readouterr().err
    assert len(list((tmp_path / "1_dog").glob("*.png"))) == 3


def test_dedupe_sheets_never_replace_a_file_nor_land_among_the_pictures(dataset, capsys, tmp_path):
    sheets = tmp_path / "sheets"
    sheets.mkdir()
    (sheets / "dupes-001.png").write_text("the user's own file")
    code, out = _run(capsys, "dedupe", dataset, "--sheets", sheets, "--json")
    assert code == 0 and (sheets / "dupes-001.png").read_text() == "the user's own file"
    assert "dupes-001-1.png" in {Path(p).name for p in json.loads(out)["sheets"]}
    before = tree_checksum(dataset)
    assert cli.main(["dataset", "dedupe", str(dataset), "--sheets", str(dataset / "img" / "10_sks dog")]) != 0
    assert "picture folder of the dataset" in capsys.readouterr().err
    assert tree_checksum(dataset) == before


def test_odd_resolutions_and_batch_sizes(dataset, capsys):
    # --batch 0 stopped buckets with ZeroDivisionError; resolutions 0, -512 or 99999999 gave reports of "buckets
    # at -512x-512"; 0 now means the model's native size, as train's resolution 0 does
    for argv, message in ((["buckets", dataset, "--batch", "0"], "--batch must be at least 1"),
                          (["scan", dataset, "--resolution", "-512"], "from 64 to 4096"),
                          (["guidance", dataset, "--resolution", "99999999"], "from 64 to 4096"),
                          (["buckets", dataset, "--resolution", "512x32"], "from 64 to 4096")):
        assert cli.main(["dataset", *map(str, argv)]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert cli.main(["dataset", "scan", str(dataset), "--resolution", "0"]) == 0
    assert "native size" in capsys.readouterr().out


def test_dedupe_says_a_file_reached_through_a_link_once_not_as_its_own_duplicate(tmp_path, capsys):
    # A linked numbered folder (scanned and trained as a subset of its own) listed each of its pictures as a
    # near-duplicate of itself; a picture linked or hard-linked under a second name did the same
    rng = random.Random(5)
    folder = tmp_path / "data" / "1_dog"
    folder.mkdir(parents=True)
    im = make_picture(rng)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        make_picture(rng).save(folder / name)
    im.save(folder / "e.png")
    transform(im, rng, "jpeg").save(folder / "e_copy.jpg")         # a real near-duplicate, still found
    (folder / "z.png").symlink_to("a.png")
    os.link(folder / "b.png", folder / "hard.png")
    (tmp_path / "data" / "2_more").symlink_to("1_dog")
    data = tmp_path / "data"
    before = tree_checksum(data)
    code, out = _run(capsys, "dedupe", data, "--json")
    result = json.loads(out)
    assert code == 0
    assert [[Path(p).relative_to(data).as_posix() for p in g] for g in result["groups"]] == [
        ["1_dog/e.png", "1_dog/e_copy.jpg"]]
    same = {tuple(Path(p).relative_to(data).as_posix() for p in g) for g in result["same_file"]}
    assert same == {("1_dog/a.png", "1_dog/z.png", "2_more/a.png", "2_more/z.png"),
                    ("1_dog/b.png", "1_dog/hard.png", "2_more/b.png", "2_more/hard.png"),
                    ("1_dog/c.png", "2_more/c.png"), ("1_dog/d.png", "2_more/d.png"),
                    ("1_dog/e.png", "2_more/e.png"), ("1_dog/e_copy.jpg", "2_more/e_copy.jpg")}
    code, out = _run(capsys, "dedupe", data)
    assert "1 groups of near-duplicates" in out and "2_more/e" not in out.split("the same file")[0]
    assert "the same file reached twice through a link" in out
    assert "1_dog/ = 2_more/: 4 pictures" in out
    assert "1_dog/a.png = 1_dog/z.png = 2_more/a.png = 2_more/z.png" in out
    assert tree_checksum(data) == before
    code, out = _run(capsys, "dedupe", data, "--remove", "--json")
    assert [Path(m["from"]).name for m in json.loads(out)["moved"]] == ["e_copy.jpg"]   # no path of one file
    assert all((folder / n).is_file() for n in ("a.png", "b.png", "z.png", "hard.png", "e.png"))


def test_dedupe_sheets_are_not_written_where_the_next_scan_would_train_on_them(tmp_path, capsys):
    """Only the picture folders themselves were refused for --sheets: sheets written into the dataset folder (whose
    loose pictures a scan reads once it holds some), into img/ of a flat layout or into a new N_name folder were
    scanned as training pictures the next time."""
    root = tmp_path / "ds"
    pics = root / "img" / "3_dog"
    pics.mkdir(parents=True)
    make_picture(random.Random(1), 128, 128).save(pics / "a.png")
    shutil.copyfile(pics / "a.png", pics / "b.png")      # a copy: one group, so sheets are written
    (tmp_path / "reg").mkdir()
    make_picture(random.Random(2), 128, 128).save(tmp_path / "reg" / "c.png")
    before = tree_checksum(root)
    for sheets in (root, root / "img", pics, root / "img" / "2_sheets", tmp_path / "reg"):
        assert cli.main(["dataset", "dedupe", str(root), "--reg", str(tmp_path / "reg"), "--sheets", str(sheets)]) == 2
        assert "would be trained on" in capsys.readouterr().err, sheets
    assert tree_checksum(root) == before and not (root / "img" / "2_sheets").exists()
    # a folder the scan passes over is fine, inside the dataset too (sub-folders of a picture folder are not read)
    for sheets in (tmp_path / "sheets", root / "notes", pics / "sheets"):
        assert cli.main(["dataset", "dedupe", str(root), "--sheets", str(sheets), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["sheets"], sheets
    assert cli.main(["dataset", "scan", str(root), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["records"]) == 2      # still only a.png and b.png


def test_negative_sizes_and_counts_are_refused_not_taken_as_they_are(dataset, capsys):
    """scan --min-side -1 reported "warnings below -1 px", scan --max-pixels 0 marked every picture unusable as too
    large (exit 0), and tags --top -1 listed every tag but the last."""
    for argv, why in ((["scan", dataset, "--min-side", "-1"], "--min-side must be 0"),
                      (["scan", dataset, "--max-pixels", "0"], "--max-pixels must be at least 1"),
                      (["scan", dataset, "--max-pixels", "-5"], "--max-pixels must be at least 1"),
                      (["tags", dataset, "--top", "-1"], "--top must be 0 or more")):
        assert cli.main(["dataset", *map(str, argv)]) == 2, argv
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err
    code, out = _run(capsys, "scan", dataset, "--max-pixels", "99999999999999999999", "--json")
    assert code == 0 and json.loads(out)["counts"]["usable"] > 0


def test_dedupe_remove_in_a_folder_it_cannot_change_is_one_line_and_leaves_no_stray_copy(dataset, capsys, monkeypatch):
    """--remove in a read-only picture folder ended in shutil's PermissionError traceback, after shutil.move had
    copied the picture into _removed/ without deleting the original: a second copy of it."""
    import lib_sdtrain.data.dedupe as D

    real_move, calls = shutil.move, []

    def move_that_cannot_delete(src, dest):
        calls.append(src)
        if len(calls) == 1:
            return real_move(src, dest)
        shutil.copy2(src, dest)                    # what shutil.move does when the rename is refused ...
        raise PermissionError(1, "Operation not permitted", src)      # ... and then the delete is refused too

    monkeypatch.setattr(D.shutil, "move", move_that_cannot_delete)
    assert cli.main(["dataset", "dedupe", str(dataset), "--remove"]) == 2
    err = capsys.readouterr().err
    assert f"cannot move {calls[1]}" in err and "permission denied" in err and "1 files were moved" in err, err
    assert err.count("\n") == 1 and Path(calls[1]).is_file() and not Path(calls[0]).exists()
    removed = [p.name for p in (dataset / "_removed").rglob("*") if p.is_file()]
    assert removed == [Path(calls[0]).name]        # the first move; no copy of the second


def test_tags_write_that_fails_part_way_says_which_captions_already_changed(dataset, capsys, monkeypatch):
    """A caption file the disk refuses part way (an immutable file, a full disk) stopped `tags --write` with
    "cannot write X" alone, although the captions before it had been rewritten: the user could not tell."""
    import lib_sdtrain.formats.files as F
    from lib_sdtrain.errors import DiskError

    real, calls = F.atomic_write_text, []

    def refuse_the_second(path, text, **kw):
        calls.append(Path(path))
        if len(calls) == 2:
            raise DiskError(f"cannot write {path}: permission denied (errno 1)")
        return real(path, text, **kw)

    monkeypatch.setattr(F, "atomic_write_text", refuse_the_second)
    assert cli.main(["dataset", "tags", str(dataset), "--add", "newtag", "--write"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {calls[1]}" in err and "1 of " in err and "captions were written before it" in err, err
    assert "newtag" in calls[0].read_text() and "newtag" not in calls[1].read_text()
