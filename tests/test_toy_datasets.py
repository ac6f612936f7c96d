"""Toy concept datasets follow the users' folder conventions and never overwrite a folder."""

import re

import pytest
from PIL import Image

from conftest import toy_cli
from lib_sdtrain.errors import UserError
from lib_sdtrain.toy import datasets, world




KOHYA = re.compile(r"^(\d+)_(.+)$")


def _check_folder(folder, n, repeats, name):
    m = KOHYA.match(folder.name)
    assert m and int(m.group(1)) == repeats and m.group(2) == name
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == n and len(list(folder.glob("*.txt"))) == n
    for p in pngs:
        assert p.with_suffix(".txt").is_file()
    assert not list(folder.glob(".*"))            # no temporary files left behind
    return pngs


def test_subject_dataset(tmp_path):
    ws = datasets.make_subject_dataset(tmp_path, n_images=8, repeats=20, seed=3)
    assert ws.folder == tmp_path / "img" / "20_zwx shape"
    pngs = _check_folder(ws.folder, 8, 20, "zwx shape")
    texts = [p.with_suffix(".txt").read_text().strip() for p in pngs]
    assert texts == ws.captions
    for text, scene in zip(texts, ws.scenes):
        assert text.startswith("zwx, a ") and " shape " in text
        assert world.parse_caption(text) == scene and scene.is_subject
    assert len({s.colour for s in ws.scenes}) >= 6 and len({s.background for s in ws.scenes}) == 4   # varied
    with Image.open(pngs[0]) as im:
        assert im.size == (64, 64)


def test_style_and_class_sets_share_one_root(tmp_path):
    style = datasets.make_style_dataset(tmp_path, n_images=20, repeats=3, seed=1, size=128)
    reg = datasets.make_class_set(tmp_path, n_images=30, seed=1)
    _check_folder(style.folder, 20, 3, "zkz style")
    _check_folder(reg.folder, 30, 1, "shape")
    assert reg.folder.parent == tmp_path / "reg"
    for text, scene in zip(style.captions, style.scenes):
        assert text.startswith("zkz style, a ") and scene.is_styled and not scene.is_subject
    assert all(" shape " in t and "zkz" not in t and "zwx" not in t for t in reg.captions)   # generic class captions
    assert not any(s.is_held_out for s in style.scenes + reg.scenes)
    with Image.open(style.images[0]) as im:
        assert im.size == (128, 128)


def test_caption_modes(tmp_path):
    tok = datasets.make_subject_dataset(tmp_path / "a", n_images=5, captions="token")
    assert set(tok.captions) == {"zwx shape"}
    short = datasets.make_style_dataset(tmp_path / "b", n_images=5, captions="short")
    assert all(t.startswith("zkz style, a ") and " of a " not in t for t in short.captions)
    full = datasets.make_class_set(tmp_path / "c", n_images=5, captions="full")
    assert [world.parse_caption(t) for t in full.captions] == full.scenes
    with pytest.raises(UserError):
        datasets.make_subject_dataset(tmp_path / "d", n_images=5, captions="poetic")
    mixed = datasets.make_class_set(tmp_path / "e", n_images=6, captions="mixed")
    generic, specific = mixed.captions[0::2], mixed.captions[1::2]
    assert all(" shape " in t for t in generic)                       # the class word: prior for "shape"
    assert [world.parse_caption(t) for t in specific] == mixed.scenes[1::2]   # the world's own shape words
    assert not any(" shape " in t for t in specific)


def test_same_seed_same_files(tmp_path):
    a = datasets.make_subject_dataset(tmp_path / "a", n_images=5, seed=9)
    b = datasets.make_subject_dataset(tmp_path / "b", n_images=5, seed=9)
    assert [p.read_bytes() for p in a.images] == [p.read_bytes() for p in b.images]


def test_never_overwrites_a_concept_folder(tmp_path):
    datasets.make_subject_dataset(tmp_path, n_images=5, repeats=10)
    before = (tmp_path / "img" / "10_zwx shape" / "0000.png").read_bytes()
    with pytest.raises(UserError):
        datasets.make_subject_dataset(tmp_path, n_images=5, repeats=10, seed=1)
    with pytest.raises(UserError):                       # same concept under other repeats: kohya would train both
        datasets.make_subject_dataset(tmp_path, n_images=5, repeats=5, seed=1)
    assert (tmp_path / "img" / "10_zwx shape" / "0000.png").read_bytes() == before
    assert not (tmp_path / "img" / "5_zwx shape").exists()
    user = tmp_path / "mine"
    (user / "img" / "1_shape").mkdir(parents=True)
    (user / "img" / "1_shape" / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(UserError):
        datasets.make_base_dataset(user, n_images=3)
    assert (user / "img" / "1_shape" / "holiday.jpg").read_bytes() == b"not ours"


def test_background_weight_writes_the_shape_mask_as_alpha(tmp_path):
    """RGBA pictures, the same colours as the opaque set; alpha 255 on the shape and a margin, the weight elsewhere;
    a masked load reads those weights per latent cell."""
    from dataclasses import replace

    import numpy as np

    from lib_sdtrain.data.buckets import BucketAssignment
    from lib_sdtrain.data.dataset import load_picture_and_mask

    plain = datasets.make_subject_dataset(tmp_path / "a", n_images=6, seed=4)
    masked = datasets.make_subject_dataset(tmp_path / "b", n_images=6, seed=4, background_weight=0.2)
    assert masked.scenes == plain.scenes and masked.captions == plain.captions
    # the same scenes and jitter in other colours: the pixels that change are the shape's
    recoloured = world.render_scenes([replace(s, colour="green" if s.colour != "green" else "red")
                                      for s in plain.scenes], 64, 4)
    for a, b, other in zip(plain.images, masked.images, recoloured):
        with Image.open(a) as ia, Image.open(b) as ib:
            assert ib.mode == "RGBA" and np.array_equal(np.asarray(ia), np.asarray(ib)[..., :3])
            alpha = np.asarray(ib)[..., 3]
            shape = np.abs(np.asarray(ia).astype(int) - np.asarray(other).astype(int)).sum(-1) > 0
        assert set(np.unique(alpha)) == {51, 255}
        assert shape.sum() > 20 and (alpha[shape] == 255).all()      # the shape is inside the full-weight part
        assert (alpha == 255).sum() > shape.sum()                    # with a margin around it
        share = (alpha == 255).mean()
        assert 0.02 < share < 0.7
        whole = BucketAssignment(bucket=(64, 64), resized=(64, 64), original=(64, 64), crop_left=0, crop_top=0,
                                 ar_error=0.0)
        _, cells = load_picture_and_mask(b, whole, mask=True)
        assert cells.min().item() == pytest.approx(0.2, abs=1e-6) and cells.max().item() == pytest.approx(1.0)
    style = datasets.make_style_dataset(tmp_path / "c", n_images=3, seed=1, background_weight=0.0)
    with Image.open(style.images[0]) as im:
        assert set(np.unique(np.asarray(im)[..., 3])) == {0, 255}
    for bad in (-0.1, 1.5, True, "0.2", float("nan")):
        with pytest.raises(UserError, match="background_weight"):
            datasets.make_subject_dataset(tmp_path / "d", n_images=2, background_weight=bad)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("kwargs", [dict(n_images=0), dict(repeats=0), dict(size=8), dict(n_images=2.5)])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(UserError):
        datasets.make_subject_dataset(tmp_path, **kwargs)


def test_base_dataset_and_iterators(tmp_path):
    ws = datasets.make_base_dataset(tmp_path, n_images=20, seed=2)
    _check_folder(ws.folder, 20, 1, "shape")
    assert all(world.caption_attributes(t) for t in ws.captions)
    img, text = next(datasets.iter_base_pictures(seed=2))
    assert img.size == (64, 64) and text == ws.captions[0]       # the iterator and the folder agree
    pics = [next(it) for it in [datasets.iter_autoencoder_pictures(seed=0)] for _ in range(5)]
    assert all(p.size == (64, 64) for p in pics)


def test_cli_dataset_and_pictures(tmp_path, capsys):
    assert toy_cli(["dataset", "subject", "--out", str(tmp_path), "--n", "6", "--repeats", "15"]) == 0
    _check_folder(tmp_path / "img" / "15_zwx shape", 6, 15, "zwx shape")
    assert toy_cli(["dataset", "class", "--out", str(tmp_path), "--n", "10"]) == 0
    _check_folder(tmp_path / "reg" / "1_shape", 10, 1, "shape")
    assert toy_cli(["dataset", "subject", "--out", str(tmp_path), "--n", "6", "--repeats", "15"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert toy_cli(["pictures", "--out", str(tmp_path / "p"), "--n", "4", "--concept", "style"]) == 0
    texts = [p.read_text().strip() for p in sorted((tmp_path / "p").glob("*.txt"))]
    assert len(texts) == 4 and all(t.startswith("zkz style, ") for t in texts)
    assert toy_cli(["pictures", "--out", str(tmp_path / "p"), "--n", "4"]) == 2


def test_toy_is_a_cli_command(tmp_path):
    from lib_sdtrain import cli

    if "toy" not in cli.COMMANDS:
        pytest.skip("the 'toy' command is not registered in lib_sdtrain/cli.py COMMANDS yet")
    assert cli.main(["toy", "dataset", "class", "--out", str(tmp_path), "--n", "3"]) == 0
    assert cli.main(["toy", "dataset", "class", "--out", str(tmp_path), "--n", "0"]) == 2


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, monkeypatch):
    """toy dataset / toy pictures / dataset classgen made their folder with a bare mkdir: a read-only place or a
    file in the way ended in a PermissionError or NotADirectoryError traceback."""
    import errno
    from pathlib import Path

    from lib_sdtrain.classgen import generate_class_images
    from lib_sdtrain.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("the user's")
    for argv in (["dataset", "subject", "--out", str(blocker / "ds"), "--n", "1"],
                 ["pictures", "--out", str(blocker / "pics"), "--n", "1"]):
        assert main(["toy", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert "cannot create the folder" in err and "not a folder" in err and err.count("\n") == 1, err

    class Host:
        def sample(self, parts, requests, stop=None):
            return [Image.new("RGB", (64, 64)) for _ in requests]

    def denied(self, *a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(UserError, match="cannot create the folder .*permission denied"):
        generate_class_images(Host(), None, "a dog", 1, tmp_path / "reg", width=64, height=64, steps=1)
    assert main(["toy", "pictures", "--out", str(tmp_path / "pics"), "--n", "1"]) == 2
    assert "permission denied" in capsys.readouterr().err and blocker.read_text() == "the user's"
