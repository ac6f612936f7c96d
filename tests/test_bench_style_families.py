"""bench/style_families.py: the painted style families and the measured properties that read them."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import style_families as sf

from lib_sdtrain.errors import UserError
from lib_sdtrain.toy import world


def scenes(n=24, seed=5):
    return world.sample_scenes(n, seed, holdout="include")


@pytest.mark.parametrize("family", ["split", "shaded", "hollow"])
def test_each_reading_calls_its_own_style_and_not_the_plain_world(family):
    sc = scenes()
    rng = world.make_rng(5, 1)
    painted = [sf.paint(s, family, 64, rng) for s in sc]
    plain = world.render_scenes(sc, 64, 5)
    assert all(sf.reads(family, painted, None)), family
    assert not any(sf.reads(family, plain, None)), family
    # the other coarse styles are not mistaken for this one (split and shaded share a reading by design)
    others = [f for f in ("split", "shaded", "hollow") if f != family and {f, family} != {"split", "shaded"}]
    for other in others:
        rng = world.make_rng(5, 1)
        assert not any(sf.reads(family, [sf.paint(s, other, 64, rng) for s in sc], None)), (family, other)


def test_painting_keeps_the_scene_and_its_jitter():
    s = world.Scene("circle", "blue", "large", "left", "gray")
    a = np.asarray(sf.paint(s, "split", 64, world.make_rng(3, 1)), dtype=float)
    plain = np.asarray(world.render(s, 64, world.make_rng(3, 1)), dtype=float)
    changed = np.abs(a - plain).max(axis=2) > 8
    shape = np.abs(plain - plain[:, :1]).max(axis=2) > 40
    inner = shape.copy()            # the shape less a pixel at its edge (antialiasing differs there)
    inner[1:] &= shape[:-1]
    inner[:-1] &= shape[1:]
    inner[:, 1:] &= shape[:, :-1]
    inner[:, :-1] &= shape[:, 1:]
    rows = np.nonzero(shape.any(axis=1))[0]
    middle = (rows.min() + rows.max()) / 2
    upper, lower = inner.copy(), inner.copy()
    upper[int(middle) - 1:] = False
    lower[:int(middle) + 2] = False
    # the upper half of the shape is repainted, the lower half and the background are not
    assert changed[upper].mean() > 0.95 and not changed[lower].any()
    near = shape.copy()             # the shape and a pixel around it
    near[1:] |= shape[:-1]
    near[:-1] |= shape[1:]
    near[:, 1:] |= shape[:, :-1]
    near[:, :-1] |= shape[:, 1:]
    assert not changed[~near].any()


def test_readings_of_an_empty_picture_and_an_unknown_family():
    empty = world.render_background("gray", 64)
    assert sf.brighter_top(empty) == 0.0 and sf.hole_share(empty) == 0.0
    with pytest.raises(UserError, match="unknown family"):
        sf.paint(world.Scene("circle", "red"), "dotted", 64, world.make_rng(0, 1))
