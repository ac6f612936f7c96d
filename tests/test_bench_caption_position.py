"""bench/caption_position.py: a trigger word at the end of a caption reaches only what follows it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import caption_position

from lib_sdtrain.hosts.standalone import StandaloneHost, default_model


def test_style_words_in_front_move_the_context_more_than_at_the_end(tmp_path):
    parts = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path).load(default_model())
    res = caption_position.measure(parts, 8)
    end, front = res["style words at the end"], res["style words in front"]
    # causal text encoder: words at the end change only the end token and the padding, in front every word
    assert front["energy_share"] > 3 * end["energy_share"] > 0
    assert front["words"] > 2 * end["words"]
    assert res["subject token in the middle"]["energy_share"] > end["energy_share"]
    assert res["subject token in front"]["words"] > res["subject token in the middle"]["words"]


def test_the_pairs_differ_only_by_the_trigger_words():
    v = caption_position.variants(4)
    for with_words, without in v.values():
        assert len(with_words) == len(without) == 4
    w, wo = v["style words in front"]
    assert all(a == "zkz style, " + b for a, b in zip(w, wo))
    w, wo = v["subject token in the middle"]
    assert all(a.replace("zwx ", "") == b and " zwx shape " in a for a, b in zip(w, wo))
    w, wo = v["subject token in front"]
    assert all(a == "zwx, " + b for a, b in zip(w, wo))
