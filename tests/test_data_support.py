"""Shared helpers for the tests/test_data_*.py files: synthetic pictures, planted copies, bad files, checksums.

Imported by the other data tests (`from test_data_support import ...`); its own tests check the helpers.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

TRANSFORMS = ("resize", "jpeg", "crop", "colour", "combo")


def make_picture(rng: random.Random, w: int = 256, h: int = 192) -> Image.Image:
    """A varied synthetic 'photo': a two-colour gradient, 3-8 filled shapes, a few lines and mild noise."""
    c1 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    c2 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float32)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    arr = (c1 * (1 - t) + c2 * t) * np.ones((h, w, 1), dtype=np.float32)
    im = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = [x0, y0, x0 + rng.randint(20, w // 2), y0 + rng.randint(20, h // 2)]
        fill = tuple(rng.randrange(256) for _ in range(3))
        k = rng.random()
        if k < 0.4:
            d.ellipse(box, fill=fill)
        elif k < 0.8:
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(rng.randrange(w), rng.randrange(h)) for _ in range(3)], fill=fill)
    for _ in range(rng.randint(0, 3)):
        d.line([(rng.randrange(w), rng.randrange(h)), (rng.randrange(w), rng.randrange(h))],
               fill=tuple(rng.randrange(256) for _ in range(3)), width=rng.randint(1, 4))
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def transform(im: Image.Image, rng: random.Random, kind: str) -> Image.Image:
    """A near-duplicate of `im`: resized, recompressed, cropped 5-10 %, colour-shifted, or all of these."""
    w, h = im.size
    if kind == "resize":
        s = rng.uniform(0.4, 0.8) if rng.random() < 0.7 else rng.uniform(1.2, 1.6)
        return im.resize((int(w * s), int(h * s)), Image.Resampling.BICUBIC)
    if kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=rng.randint(25, 50))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "crop":
        f = rng.uniform(0.05, 0.10)
        if rng.random() < 0.5:                       # centred
            dx, dy = int(w * f / 2), int(h * f / 2)
            return im.crop((dx, dy, w - dx, h - dy))
        dx, dy = int(w * f), int(h * f)              # from one side
        return im.crop([(dx, 0, w, h), (0, dy, w, h), (0, 0, w - dx, h), (0, 0, w, h - dy)][rng.randrange(4)])
    if kind == "colour":
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.9, 1.1))
        im = ImageEnhance.Color(im).enhance(rng.uniform(0.85, 1.15))
        shift = np.array([rng.randint(-12, 12) for _ in range(3)])
        return Image.fromarray(np.clip(np.asarray(im).astype(int) + shift, 0, 255).astype(np.uint8))
    if kind == "combo":
        return transform(transform(transform(im, rng, "crop"), rng, "resize"), rng, "jpeg")
    raise ValueError(kind)


def tree_checksum(root: Path) -> str:
    """sha256 over every file's relative path, size, modification time and bytes (and every folder's name)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_dir():
            h.update(b"D" + rel.encode() + b"\0")
            continue
        st = p.stat()
        h.update(b"F" + rel.encode() + b"\0" + str(st.st_size).encode() + b"\0" + str(st.st_mtime_ns).encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def png_bytes(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 2, data: bytes | None = None) -> bytes:
    """A PNG written by hand (for headers PIL will not write: 16-bit RGB, absurd sizes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if data is None:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
        row = b"\x00" + bytes(width * channels * bit_depth // 8)
        data = zlib.compress(row * height)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def write_bad_files(folder: Path) -> dict[str, str]:
    """Files with known problems; returns {file name: expected problem code}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    good = make_picture(rng, 320, 320)
    expected = {}

    (folder / "empty.png").write_bytes(b"")
    expected["empty.png"] = "empty_file"
    (folder / "text.jpg").write_text("this is not a picture\n")
    expected["text.jpg"] = "unreadable"
    buf = io.BytesIO()
    good.save(buf, "PNG")
    (folder / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expected["cut.png"] = "truncated"
    buf = io.BytesIO()
    good.save(buf, "JPEG", quality=90)
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    expected["cut.jpg"] = "truncated"
    good.resize((40, 40)).save(folder / "tiny.png")
    expected["tiny.png"] = "too_small"
    good.resize((200, 150)).save(folder / "small.png")
    expected["small.png"] = "small"
    rgba = good.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "alpha.png")
    expected["alpha.png"] = "alpha"
    good.convert("CMYK").save(folder / "cmyk.jpg")
    expected["cmyk.jpg"] = "cmyk"
    (folder / "deep.png").write_bytes(png_bytes(300, 300, bit_depth=16, colour_type=2))
    expected["deep.png"] = "high_bit_depth"
    Image.fromarray((np.arange(300 * 300).reshape(300, 300) % 65535).astype(np.uint16)).save(folder / "grey16.png")
    expected["grey16.png"] = "high_bit_depth"
    frames = [good, good.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    expected["anim.gif"] = "animated"
    (folder / "bomb.png").write_bytes(png_bytes(100_000, 100_000, data=zlib.compress(b"\x00" * 64)))
    expected["bomb.png"] = "huge"
    good.save(folder / "really_png.jpg", format="PNG")
    expected["really_png.jpg"] = "wrong_extension"
    exif = Image.Exif()
    exif[0x0112] = 6
    good.save(folder / "rotated.jpg", exif=exif.tobytes())
    expected["rotated.jpg"] = "exif_rotated"
    good.convert("L").save(folder / "grey.png")
    expected["grey.png"] = "grayscale"
    good.save(folder / "badcap.png")
    (folder / "badcap.txt").write_bytes("caf\xe9, tag".encode("latin-1"))
    expected["badcap.png"] = "caption_encoding"
    good.save(folder / "blankcap.png")
    (folder / "blankcap.txt").write_text("\n  \n")
    expected["blankcap.png"] = "empty_caption"
    good.save(folder / "fine.png")
    (folder / "fine.txt").write_text("sks dog, grass\n")
    expected["fine.png"] = ""
    return expected


# ---- the helpers' own tests ------------------------------------------------------------------------------
def test_transforms_keep_pictures_valid():
    rng = random.Random(0)
    im = make_picture(rng)
    for kind in TRANSFORMS:
        out = transform(im, rng, kind)
        assert out.mode == "RGB" and min(out.size) > 50


def test_checksum_sees_content_and_names(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    first = tree_checksum(tmp_path)
    assert tree_checksum(tmp_path) == first
    (tmp_path / "b.txt").write_text("")
    assert tree_checksum(tmp_path) != first


def test_hand_written_png_reads(tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes(8, 4, bit_depth=16))
    with Image.open(tmp_path / "x.png") as im:
        assert im.size == (8, 4)
        im.load()
