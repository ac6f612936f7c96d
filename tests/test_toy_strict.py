"""The strict heart reader: loads only on its own detector, reads like a strict person on held-out pictures, and
the shipped file is what tools/fit_strict_heart.py fits from the labelled sheets."""

import json
import shutil

import numpy as np
import pytest

from conftest import tool_module
from lib_sdtrain.errors import UserError
from lib_sdtrain.toy import strict

pytestmark = pytest.mark.usefixtures("one_thread")


def _tool():
    """tools/fit_strict_heart.py as a module (loaded once)."""
    return tool_module("fit_strict_heart")


@pytest.fixture(scope="module")
def sets():
    return _tool().labelled_sets()


def test_held_out_pictures_read_closer_to_the_person_than_the_detector(sets):
    from lib_sdtrain.toy.detector import default_detector

    tool, reader, det = _tool(), strict.default_strict(), default_detector()
    for key in ("D", "D*"):                     # another labeller; D*: pictures no fit has seen
        imgs, person = sets[key]
        ours = tool.agreement(reader.calls(imgs), person)
        theirs = tool.agreement([d.has_subject for d in det.detect(imgs)], person)
        assert ours["agreement"] >= 0.72 and ours["kappa"] >= 0.4, ours
        assert abs(ours["called"] - ours["person"]) <= 0.12 * ours["n"], ours       # about the person's count
        assert ours["kappa"] > theirs["kappa"] and theirs["called"] - theirs["person"] >= 0.25 * theirs["n"]


def test_clean_drawings_are_read_as_what_they_are():
    tool = _tool()
    imgs, truth = tool.anchor_set(60, seed=31)
    calls = strict.default_strict().calls(imgs)
    assert sum(c == t for c, t in zip(calls, truth)) >= 114          # of 120


def test_the_shipped_file_is_what_the_tool_fits(tmp_path):
    out = tmp_path / "s.json"
    assert _tool().main(["--out", str(out)]) == 0
    fresh, shipped = json.loads(out.read_text()), json.loads(strict.STRICT_PATH.read_text())
    assert fresh["detector_sha256"] == shipped["detector_sha256"]
    np.testing.assert_allclose(fresh["weights"], shipped["weights"], rtol=1e-4, atol=1e-5)
    assert fresh["held_out"] == shipped["held_out"]


def test_refuses_another_detector_and_broken_files(tmp_path):
    other = tmp_path / "det.safetensors"
    shutil.copy(strict.WEIGHTS_PATH, other)
    with open(other, "ab") as f:
        f.write(b" ")                                    # another file: another hash
    with pytest.raises(UserError, match="fitted on another detector"):
        strict.StrictHeart.load(detector_path=other)
    bad = tmp_path / "bad.json"
    for text, message in (("{", "not valid JSON"), ('{"format": "x"}', "is not a strict heart reader"),
                          (json.dumps({"format": strict.FORMAT, "weights": [1.0], "bias": 0, "mean": [0.0],
                                       "std": [1.0]}), "reads 1 features")):
        bad.write_text(text)
        with pytest.raises(UserError, match=message):
            strict.StrictHeart.load(bad, detector=strict.default_strict().detector)
    with pytest.raises(UserError, match="not found"):
        strict.StrictHeart.load(tmp_path / "missing.json")


def test_fit_refuses_degenerate_labels():
    x = np.zeros((4, 3))
    with pytest.raises(UserError, match="both answers"):
        strict.fit(x, [True] * 4)
    with pytest.raises(UserError, match="one feature row per label"):
        strict.fit(x, [True, False])
