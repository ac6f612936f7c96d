"""Dataset folders as users bring them (session 23's audit): odd picture modes, folder names and files that are
not pictures. Each test names what went wrong before its fix."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
