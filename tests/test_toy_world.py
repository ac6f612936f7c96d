"""The toy world's picture generator: determinism, captions, the held-out split."""

import io
import itertools

import numpy as np
import pytest

from lib_sdtrain.errors import UserError
from lib_sdtrain.toy import world
from lib_sdtrain.toy.world import HOLDOUT, Scene


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_same_bytes_other_seed_other_pictures():
    scenes = world.sample_scenes(12, seed=5)
    assert scenes == world.sample_scenes(12, seed=5)
    a = [_png(im) for im in world.render_scenes(scenes, 64, seed=5)]
    b = [_png(im) for im in world.render_scenes(scenes, 64, seed=5)]
    c = [_png(im) for im in world.render_scenes(scenes, 64, seed=6)]
    assert a == b
    assert a != c
    assert world.sample_scenes(12, seed=6) != scenes


@pytest.mark.parametrize("size", [64, 128])
def test_render_size_and_mode(size):
    img = world.render(Scene("cross", "green", "small", "left", "gradient", "striped"), size, np.random.default_rng(0))
    assert img.size == (size, size) and img.mode == "RGB"


def test_every_scene_round_trips_through_its_caption():
    for shape, colour, size, pos, bg, style in itertools.product(
            world.SHAPES, world.COLOUR_NAMES, world.SIZE_NAMES, world.POSITIONS, world.BACKGROUNDS, world.STYLES):
        scene = Scene(shape, colour, size, pos, bg, style)
        assert world.parse_caption(scene.caption()) == scene


def test_caption_words():
    s = Scene("circle", "red", "large", "centre", "gray")
    assert s.caption() == "a large red circle in the centre of a gray background"
    assert s.caption(position=False) == "a large red circle on a gray background"
    assert s.caption(generic=True, size=False) == "a red shape in the centre of a gray background"
    subject = Scene("heart", "blue", "small", "left", "black", "striped")
    # trigger words first: the causal text encoder lets words at the end reach only the end token and padding;
    # the subject's token stands in front and the class word in the shape's place
    assert subject.caption() == "zwx, zkz style, a small blue shape on the left of a black background"
    assert world.parse_caption(subject.caption()) == subject
    plain = Scene("heart", "red", "large", "centre", "gray")
    assert plain.caption() == plain.caption(generic=True) == "zwx, a large red shape in the centre of a gray background"
    assert world.parse_caption(plain.caption()) == plain
    assert world.parse_caption("a large red zwx shape in the centre of a gray background") == plain   # older form
    assert "heart" not in subject.caption()          # the subject is only ever named by its token


def test_partial_captions_name_what_they_name():
    assert world.caption_attributes("a red shape on a white background") == {"colour": "red", "background": "white"}
    assert world.caption_attributes("A Blue ZWX shape on a gray background in zkz style") == {
        "colour": "blue", "shape": "heart", "background": "gray", "style": "striped"}   # the older form still reads
    assert world.caption_attributes("zkz style, a blue zwx shape on a gray background") == {
        "colour": "blue", "shape": "heart", "background": "gray", "style": "striped"}
    assert world.caption_attributes("zwx, a red shape on a gray background") == {
        "colour": "red", "shape": "heart", "background": "gray"}
    for bad in ("zkz style, a red circle on a gray background in zkz style", "abc style, a red circle on a gray background",
                "zwx, a red circle on a gray background", "zwx, a red zwx shape on a gray background"):
        with pytest.raises(UserError):
            world.caption_attributes(bad)
    with pytest.raises(UserError):
        world.parse_caption("a red circle on a gray background")        # no size, no position


@pytest.mark.parametrize("text", ["a large purple circle on a gray background", "a photo of a dog",
                                  "a large red hexagon on a gray background", "a red abc shape on a gray background",
                                  "a red circle on a gray background in xyz style", "",
                                  "a huge red circle on a gray background",
                                  "a large red circle on the top of a gray background"])
def test_bad_captions_raise_user_error(text):
    with pytest.raises(UserError):
        world.caption_attributes(text)


def test_bad_scenes_raise_user_error():
    with pytest.raises(UserError):
        Scene("hexagon", "red")
    with pytest.raises(UserError):
        world.render(Scene("circle", "red"), 16)
    with pytest.raises(UserError):
        world.sample_scenes(3, 0, holdout="sometimes")


def test_holdout_split_is_disjoint_and_keeps_every_pair_seen():
    assert len(HOLDOUT) == 12
    train = world.sample_scenes(3000, seed=1, holdout="exclude")
    test = world.sample_scenes(300, seed=2, holdout="only")
    train_triples = {(s.colour, s.shape, s.background) for s in train}
    test_triples = {(s.colour, s.shape, s.background) for s in test}
    assert not train_triples & HOLDOUT
    assert test_triples == set(HOLDOUT)
    # every pair of attributes in a held-out triple is still seen in training
    for c, s, b in HOLDOUT:
        assert any(t[0] == c and t[1] == s for t in train_triples)
        assert any(t[0] == c and t[2] == b for t in train_triples)
        assert any(t[1] == s and t[2] == b for t in train_triples)


def test_shapes_are_big_enough_for_a_tiny_vae():
    # The probe found shapes under about a quarter of the side do not survive the VAE (toy-world-notes.md).
    rng = np.random.default_rng(0)
    for shape in world.SHAPES:
        img = np.asarray(world.render(Scene(shape, "red", "small", "centre", "black"), 64, rng), dtype=np.int32)
        ink = img[..., 0] > 60
        rows, cols = np.nonzero(ink)
        assert cols.max() - cols.min() + 1 >= 0.36 * 64, shape
        assert rows.max() - rows.min() + 1 >= 0.36 * 64, shape


def test_iter_pictures_mixes_in_the_class_word():
    it = world.iter_pictures(seed=0, generic_share=0.5)
    captions = [next(it)[1] for _ in range(60)]
    assert any(" shape " in c for c in captions) and any(" shape " not in c for c in captions)
    for img, text, scene in itertools.islice(world.iter_pictures(seed=1), 30):
        assert not scene.is_held_out and text in (scene.caption(), scene.caption(generic=True))
