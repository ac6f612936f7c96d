"""How a run names the dataset's pictures in its log (CLI, Train tab, Monitor, API status): relative to the dataset
folder, so that two folders' pictures of the same file name are told apart."""

import json
from pathlib import Path

import pytest
from PIL import Image

from lib_sdtrain.events import EventLog, Events
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings


class _Scanned(Exception):
    """Raised where the run would load the model: everything said about the data has been said by then."""


def _data_messages(tmp_path, data, **settings):
    """(warnings, statuses) a run gives about its data, up to the model's loading (the bundled toy model's file
    answers the preflight's model check)."""
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")

    def load(model=None):
        raise _Scanned

    host.load = load
    cfg = TrainSettings.from_dict({"data": str(data), "output": str(tmp_path / "out"),
                                   "name": "t", "resolution": 64, "min_bucket": 64, "max_bucket": 128,
                                   "tensorboard": False, **settings})
    log = EventLog()
    with pytest.raises(_Scanned):
        train(cfg, host, Events(log))
    events = log.since(0)[1]
    return ([e.data["text"] for e in events if e.kind == "warning"],
            [e.data["text"] for e in events if e.kind == "status"])


def _picture(path, colour=(200, 40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), colour).save(path)


def test_skipped_pictures_are_named_with_their_folder(tmp_path):
    # two subsets holding the same file names: "skipped a.png: ..." did not say which of them was left out
    data = tmp_path / "data"
    for folder in ("10_dog", "5_cat"):
        _picture(data / folder / "ok.png")
        (data / folder / "a.png").write_bytes(b"")                     # empty: cannot be used
    _picture(data / "5_cat" / "b.png")
    (data / "5_cat" / "b.txt").write_bytes("caf\xe9".encode("latin-1"))   # its caption is not text
    warnings, _ = _data_messages(tmp_path, data)
    skipped = sorted(w.split(":")[0] for w in warnings if w.startswith("skipped "))
    assert skipped == ["skipped 10_dog/a.png", "skipped 5_cat/a.png", "skipped 5_cat/b.png"]


def test_examples_in_the_data_warnings_are_named_with_their_folder(tmp_path):
    data = tmp_path / "data"
    for i in range(3):
        _picture(data / "2_x" / f"p{i}.png", (60 * i, 90, 120))
    (data / "2_x" / "p0.txt").write_text("x, on the left")
    warnings, statuses = _data_messages(tmp_path, data, flip_aug=True, validation_split=0.34)
    assert any("e.g. 2_x/p0.png)" in w for w in warnings if w.startswith("flip_aug")), warnings
    assert any("(e.g. 2_x/p" in s for s in statuses if s.startswith("validation:")), statuses


def test_a_picture_outside_the_dataset_is_named_by_its_whole_path(tmp_path):
    data, reg = tmp_path / "data", tmp_path / "elsewhere"
    _picture(data / "1_x" / "ok.png")
    (reg / "1_person").mkdir(parents=True)
    (reg / "1_person" / "r.png").write_bytes(b"")
    warnings, _ = _data_messages(tmp_path, data, reg_data=str(reg))
    assert any(w.startswith(f"skipped {reg / '1_person' / 'r.png'}: ") for w in warnings), warnings


def _control_names(data):
    """A dataset whose names hold a newline, a carriage return and an escape sequence."""
    _picture(data / "1_x" / "ok.png")
    (data / "1_x" / "bad\nname.png").write_bytes(b"")                       # unusable: listed with its name
    _picture(data / "1_x" / "cap\rtion.png")
    (data / "1_x" / "cap\rtion.txt").write_text("")                          # empty caption: a warning names it
    (data / "1_x" / "lone\x1b[31m.txt").write_text("a caption without a picture")
    return data


def test_cli_tables_and_notes_show_control_characters_escaped_and_json_exactly(tmp_path, capsys):
    # a newline in a file name split its row of `dataset scan`'s table (and a note) over two lines
    from lib_sdtrain import cli

    data = _control_names(tmp_path / "data")
    assert cli.main(["dataset", "scan", str(data), "--all"]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("1_x/")}
    assert set(rows) == {"1_x/ok.png", "1_x/bad\\nname.png", "1_x/cap\\rtion.png"}
    assert "error: " in rows["1_x/bad\\nname.png"] and "caption cap\\rtion.txt is empty" in rows["1_x/cap\\rtion.png"]
    assert any(line.startswith("note: ") and "lone\\x1b[31m.txt: caption without a picture" in line
               for line in out.splitlines()), out
    assert cli.main(["dataset", "scan", str(data), "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert {Path(r["path"]).name for r in exact["records"]} == {"ok.png", "bad\nname.png", "cap\rtion.png"}
    assert any("lone\x1b[31m.txt" in n for n in exact["notes"])


def test_the_runs_log_and_the_dataset_tab_show_control_characters_escaped(tmp_path):
    from lib_sdtrain.ui import dataset_tab as T

    data = _control_names(tmp_path / "data")
    warnings, _ = _data_messages(tmp_path, data)
    skipped = [w for w in warnings if w.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].startswith("skipped 1_x/bad\\nname.png: ") and "\n" not in skipped[0]
    md = T.scan_report(str(data))
    assert "1_x/bad\\nname.png" in md and "lone\\x1b[31m.txt: caption without a picture" in md
    assert "\r" not in md and "\x1b" not in md and "bad\nname" not in md
    assert "1_x/cap\rtion.png" in T.picture_choices(str(data))      # the picker's value stays exact: it opens the file
    assert ("1_x/cap\\rtion.png", "1_x/cap\rtion.png") in T.picture_options(str(data))   # its label is escaped


def test_shown_escapes_exactly_what_a_written_name_may_not_hold_as_unshowable():
    # shown's own list of text-direction controls missed U+061C (the Arabic letter mark) that names refuse; both
    # now read one set. Every BMP character is either escaped by shown and refused by name_problem as a control
    # (or NUL) character or text-direction control, or neither (the zero-width joiners of real names stay as they are)
    from lib_sdtrain.data.scan import shown
    from lib_sdtrain.formats.names import BIDI_CONTROLS, name_problem

    assert shown("a\u061cb.png") == "a\\u061cb.png"
    assert name_problem("a\u061cb") is not None and "\u061c" in BIDI_CONTROLS
    for c in BIDI_CONTROLS:
        assert shown(c) == repr(c)[1:-1] != c
    refusal = ("control character", "NUL", "text-direction control")
    differ = []
    for code in range(0x10000):
        c = chr(code)
        escaped = shown(f"a{c}b") != f"a{c}b"
        refused = any(r in (name_problem(f"a{c}b") or "") for r in refusal)
        if escaped != refused:
            differ.append(hex(code))
    assert not differ, differ
    assert shown("\u200d\u200c") == "\u200d\u200c"


def test_the_run_says_once_how_many_of_its_pictures_it_skips(tmp_path):
    # each skipped picture had its line (one per error: a picture with two had two), but no total was given
    data = tmp_path / "data"
    for i in range(3):
        _picture(data / "2_x" / f"p{i}.png", (60 * i, 90, 120))
    (data / "2_x" / "bad.png").write_bytes(b"")
    (data / "2_x" / "bad.txt").write_bytes(b"\xff\xfe\x00\xd8")               # UTF-16 with a lone surrogate
    _picture(data / "reg" / "1_person" / "r.png")
    (data / "reg" / "1_person" / "s.png").write_bytes(b"")
    warnings, _ = _data_messages(tmp_path, data)
    skipped = [w for w in warnings if w.startswith("skipped ")]
    assert [w.split(":")[0] for w in skipped] == ["skipped 2_x/bad.png", "skipped reg/1_person/s.png"]
    assert "empty" in skipped[0] and "not valid UTF-16" in skipped[0]         # both of its reasons, on one line
    summary = [w for w in warnings if "pictures skipped" in w]
    assert summary == [("2 of 6 pictures skipped (1 of the 2 regularization pictures): they cannot be used as they "
                        "are (each is listed above with its reason)")]
    assert warnings.index(summary[0]) == warnings.index(skipped[-1]) + 1
    clean = tmp_path / "clean"
    _picture(clean / "1_x" / "a.png")
    assert not [w for w in _data_messages(tmp_path, clean)[0] if "skipped" in w]
