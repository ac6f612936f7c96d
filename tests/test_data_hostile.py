"""Dataset folders as users bring them (session 23's audit): odd picture modes, folder names and files that are
not pictures. Each test names what went wrong before its fix."""

import numpy as np
import pytest
from PIL import Image

from lib_sdtrain.data import scan as S
from lib_sdtrain.data.buckets import BucketAssignment
from lib_sdtrain.data.dataset import load_picture

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

