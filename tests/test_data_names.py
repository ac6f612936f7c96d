"""How a run names the dataset's pictures in its log (CLI, Train tab, Monitor, API status): relative to the dataset
folder, so that two folders' pictures of the same file name are told apart."""

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
