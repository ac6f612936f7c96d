"""Dataset folders as users bring them (session 23's audit): odd picture modes, folder names and files that are
not pictures. Each test names what went wrong before its fix."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_support import tree_checksum

from lib_sdtrain.data import scan as S
from lib_sdtrain.data.buckets import BucketAssignment
from lib_sdtrain.data.dataset import load_picture
from lib_sdtrain.errors import UserError

SQUARE = BucketAssignment(bucket=(64, 64), resized=(64, 64), original=(64, 64), crop_left=0, crop_top=0,
                          ar_error=0.0)


@pytest.mark.parametrize("mode, value, fmt", [("I;16", 32768, "PNG"), ("I", 32768, "TIFF"), ("F", 0.5, "TIFF")])
def test_a_16_bit_grey_picture_trains_as_its_grey_not_white(tmp_path, mode, value, fmt):
    """PIL's conversion of 16-bit (and 32-bit, float) grey to RGB clips at 255: a scanner's 16-bit mid-grey PNG
    trained as a white square, and the scan's thumbnail (dedupe, features) saw white too."""
    path = tmp_path / f"grey.{fmt.lower()}"
    Image.new(mode, (64, 64), value).save(path, format=fmt)
    pixels = load_picture(path, SQUARE)
    assert abs(float(pixels.mean())) < 0.02, float(pixels.mean())       # mid-grey is 0 in [-1, 1], white is 1
    rec = S.scan_dataset(tmp_path, workers=0, fingerprint=True, min_side=64).records[0]
    assert "high_bit_depth" in {p.code for p in rec.problems}
    assert abs(rec.stats.luma - 0.5) < 0.02, rec.stats.luma


def test_a_16_bit_grey_picture_keeps_its_shades(tmp_path):
    """Not only the level: a ramp over the 16-bit range stays a ramp from black to white."""
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = load_picture(tmp_path / "ramp.png", SQUARE)
    assert float(pixels[0, 0, 0]) < -0.95 and float(pixels[0, 0, -1]) > 0.95
    assert float(pixels[0, 0, 32]) == pytest.approx(0.0, abs=0.05)



def _pics(folder: Path, names, size=(96, 96)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", size, (40 * i % 256, 90, 160)).save(folder / name)
    return folder


def _preflight_warnings(tmp_path: Path, data: Path) -> list[str]:
    from lib_sdtrain.train import preflight as P
    from lib_sdtrain.train.settings import TrainSettings

    cfg = TrainSettings.from_dict({"data": str(data), "output": str(tmp_path / "out"), "tensorboard": False})
    return P.preflight(cfg, P.FolderHost(tmp_path / "outputs")).warnings


def test_the_run_names_every_folder_and_file_of_the_dataset_it_will_not_use(tmp_path):
    """Before, a run said nothing of a "0_name" folder, of a numbered folder whose pictures sit one folder deeper,
    of pictures whose captions are .caption files (sd-scripts' default) while the run reads .txt, or of .heic
    files; "-3_x" and "10 x" were told to become "10_-3_x" and "10_10 x"."""
    data = tmp_path / "data"
    _pics(data / "10_sks", ["a.png", "b.png"])
    (data / "10_sks" / "b.caption").write_text("sks, from kohya's caption file")
    (data / "10_sks" / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    _pics(data / "0_off", ["c.png"])
    _pics(data / "-3_neg", ["d.png"])
    _pics(data / "10 space", ["e.png"])
    _pics(data / "5_nested" / "inner", ["f.png"])
    before = tree_checksum(data)
    warnings = _preflight_warnings(tmp_path, data)
    text = "\n".join(warnings)
    assert "0_off: 0 repeats, not used" in text
    assert "-3_neg: -3 repeats" in text and 'rename it e.g. "10_neg"' in text
    assert "10 space: the repeat count must be followed by" in text and 'rename it "10_space"' in text
    assert "5_nested: no pictures, not used" in text
    assert "inner: pictures in a sub-folder" in text and "move them up into 5_nested" in text
    assert "1 pictures have a .caption file but no .txt caption" in text and "--caption-ext .caption" in text
    assert "10_sks/IMG_0001.HEIC" in text and "1 files" in text
    assert tree_checksum(data) == before                  # the checks write nothing into the dataset


@pytest.mark.parametrize("layout, says", [({"0_off": ["a.png"]}, "0_off: 0 repeats"),
                                          ({"10 dog": ["a.png"]}, 'rename it "10_dog"'),
                                          ({".": ["x.heic", "y.psd"]}, "2 files of types Training Lab does not read")])
def test_no_pictures_found_says_what_it_did_find(tmp_path, layout, says):
    """The error said only "no pictures found" while the scan knew why (its notes were dropped with it)."""
    for folder, names in layout.items():
        (tmp_path / folder).mkdir(exist_ok=True)
        for name in names:
            (tmp_path / folder / name).write_bytes(b"not read")
        if names[0].endswith(".png"):
            _pics(tmp_path / folder, names)
    with pytest.raises(UserError, match="no pictures found") as e:
        S.scan_dataset(tmp_path, workers=0)
    assert says in str(e.value)


def _unreadable(monkeypatch, *folders: Path) -> None:
    """Listing these folders fails as it does without read permission (the tests may run as root)."""
    import os

    real_iterdir, real_scandir = Path.iterdir, os.scandir
    shut = {str(f) for f in folders}

    def iterdir(self):
        if str(self) in shut:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    def scandir(path="."):
        if str(path) in shut:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setattr(S.os, "scandir", scandir)


def test_a_folder_that_cannot_be_read_is_passed_over_or_named(tmp_path, monkeypatch):
    """A disk's root-only lost+found beside the picture folders stopped the scan with a PermissionError
    traceback; a picture folder that cannot be read did too, where it now says which folder and what to do."""
    _pics(tmp_path / "10_sks", ["a.png"])
    (tmp_path / "lost+found").mkdir()
    _unreadable(monkeypatch, tmp_path / "lost+found")
    assert [r.path.name for r in S.scan_dataset(tmp_path, workers=0).records] == ["a.png"]
    _unreadable(monkeypatch, tmp_path / "10_sks")
    with pytest.raises(UserError, match=r"cannot read the folder .*10_sks \(Permission denied\)"):
        S.scan_dataset(tmp_path, workers=0)
    with pytest.raises(UserError, match=r"cannot read the folder .*10_sks"):
        S.scan_dataset(tmp_path / "10_sks", workers=0)          # the picture folder given directly


def test_dedupe_keeps_the_copy_training_can_use(tmp_path):
    """The suggested keeper was the largest copy even when training skips it (here its caption is not UTF-8), so
    `dedupe --remove` moved away the copy that would have trained and kept the one that never does."""
    from lib_sdtrain.data.dedupe import find_duplicate_groups

    rng = np.random.default_rng(3)
    art = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).resize((256, 192), Image.NEAREST)
    art.save(tmp_path / "big.png")
    (tmp_path / "big.txt").write_bytes("café, naïve".encode("latin-1"))
    art.resize((128, 96), Image.LANCZOS).save(tmp_path / "small.png")
    (tmp_path / "small.txt").write_text("a cat")
    recs = S.scan_dataset(tmp_path, workers=0, fingerprint=True, min_side=64).records
    assert {r.path.name: r.usable for r in recs} == {"big.png": False, "small.png": True}
    [group] = find_duplicate_groups(recs)
    assert group.keep.name == "small.png"


def test_a_very_thin_picture_is_cropped_without_making_the_whole_stretched_picture(tmp_path, monkeypatch):
    """A picture whose short side is small and whose long side is huge (64 x 50,000 px here; under the bomb limit)
    was stretched whole to cover its bucket before the crop: for 64 x 1,000,000 px at a 256-px-wide bucket that
    is a 256 x 4,000,000 picture, gigabytes. The crop is now resampled from the matching region of the original;
    for ordinary pictures the pixels are those of resize-then-crop, within rounding."""
    from lib_sdtrain.data.buckets import assign_bucket, make_bucket_ladder

    thin = tmp_path / "thin.png"
    Image.new("RGB", (64, 50_000), (200, 40, 40)).save(thin)
    a = assign_bucket(64, 50_000, make_bucket_ladder(512, 256, 1024, 64))
    assert a.resized[0] * a.resized[1] > 10 * a.bucket[0] * a.bucket[1]   # the stretched picture would be huge
    made = []
    real = Image.Image.resize

    def resize(self, size, *args, **kwargs):
        made.append(tuple(size))
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    pixels = load_picture(thin, a)
    assert tuple(pixels.shape[1:]) == (a.bucket[1], a.bucket[0])
    assert made and max(w * h for w, h in made) <= a.bucket[0] * a.bucket[1], made
    assert abs(float(pixels[0].mean()) - (200 / 127.5 - 1)) < 0.01
    monkeypatch.undo()
    # an ordinary picture: the same pixels as resizing it whole and cropping
    rng = np.random.default_rng(0)
    art = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    art.save(tmp_path / "art.png")
    a = assign_bucket(640, 480, make_bucket_ladder(512, 256, 1024, 64))
    whole = np.asarray(art.resize(a.resized, Image.Resampling.LANCZOS).crop(
        (a.crop_left, a.crop_top, a.crop_left + a.bucket[0], a.crop_top + a.bucket[1])), dtype=np.float32)
    got = (load_picture(tmp_path / "art.png", a).permute(1, 2, 0).numpy() + 1.0) * 127.5
    assert got.shape == whole.shape and np.abs(got - whole).max() <= 1.01
