"""Hostile input for the robustness tests and benchmarks: mutated .safetensors headers, corrupt pictures and
captions. Every generator is seeded, so a failure names a case that can be made again.

Used by tests/test_safety_fuzz.py (a few hundred cases) and tools/safety_fuzz.py (more); the list of entry
points they go through is tests/safety_readers.py.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Callable, Iterator

# ---- .safetensors headers -------------------------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def pack(header: bytes | str | dict | list | None, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _deep(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def _deep_obj(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _tensor_mutations(rng: random.Random) -> list[Callable[[dict], object]]:
    """Edits of one tensor entry (return value ignored; the entry is changed in place)."""
    def dtype(e):
        e["dtype"] = rng.choice(["F4", "f32", "", 7, None, ["F32"], "F32 ", "BF16", "I64", "U8", "F8_E4M3",
                                 "C64", "\u0000", "F16" * 1000])

    def shape(e):
        e["shape"] = rng.choice([[-1], [1.5], [True], ["3"], [2 ** 62, 2 ** 62], [1] * 100, [[2]], None, {}, "3",
                                 [0], [], [2 ** 64], list(reversed(e.get("shape") or [1])), [3] * 5])

    def offsets(e):
        a, b = (e.get("data_offsets") or [0, 0])[:2]
        e["data_offsets"] = rng.choice([[b, a], [a, b + 1], [a - 1, b], [a, 2 ** 63], [-4, b], [a, b, b],
                                        [a], [float(a), float(b)], [str(a), b], None, [a, a], [0, b - a],
                                        [a + 1, b + 1], [True, b]])

    def drop(e):
        e.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)

    def extra(e):
        e[rng.choice(["x", "data_offsets ", "__proto__"])] = rng.choice([1, [1], {"a": 1}])

    return [dtype, shape, offsets, drop, extra]


def _metadata_mutations(rng: random.Random) -> list[Callable[[dict], object]]:
    keys = ["lab.config", "ss_network_args", "lab.network", "lab.architecture", "ss_tag_frequency",
            "ss_bucket_info", "ss_network_dim", "ss_network_alpha", "lab.pretrain_config", "arch", "heads",
            "ss_steps", "ss_epoch", "modelspec.architecture", "ss_output_name"]

    def value(m):
        m[rng.choice(keys)] = rng.choice([
            _deep(5_000), _deep_obj(3_000), "[1, 2]", "null", "{", "true", "1e999", '"s"', "{}", "[]",
            json.dumps({"method": ["lora"], "model": 1, "data": None}), json.dumps({"algo": ["x"]}),
            json.dumps({"method": "lora", "model": "", "data": "", "lora": [1]}), "NaN", "-1", "0" * 10_000,
            "x" * 20_000, "\u0000\u2028", json.dumps({"conv_dim": "big", "algo": "locon"})])

    def non_text(m):
        m[rng.choice(keys)] = rng.choice([1, None, [1], {"a": "b"}, True, 1.5])

    return [value, value, value, non_text]


def mutate_safetensors(valid: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutated copy of the `valid` .safetensors bytes, and the kind of mutation."""
    header, body = split_safetensors(valid)
    (n,) = struct.unpack("<Q", valid[:8])
    kind = rng.choice(["flip", "flip", "truncate", "length", "structure", "tensor", "tensor", "tensor",
                       "metadata", "metadata", "garbage", "overlap", "duplicate", "benign"])
    if kind == "flip":
        raw = bytearray(valid[8:8 + n])
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return kind, pack(bytes(raw), body)
    if kind == "truncate":
        return kind, valid[:rng.randrange(len(valid))]
    if kind == "length":
        return kind, pack(valid[8:8 + n], body, rng.choice([0, 1, n - 1, n + 1, n + len(body) + 1, 2 ** 63,
                                                            2 ** 64 - 1, 100_000_001, rng.randrange(2 ** 32)]))
    if kind == "structure":
        return kind, pack(rng.choice(["[]", "null", "1", '"s"', "{}", _deep(5_000), _deep_obj(5_000),
                                      '{"a": ' + _deep(3000) + "}", "[" + json.dumps(header) + "]",
                                      json.dumps(header) + "x", "", " " * 10, "{\"__metadata__\": [1]}",
                                      "{\"__metadata__\": null}"]), body)
    if kind == "tensor":
        name = rng.choice([k for k in header if k != "__metadata__"])
        if rng.random() < 0.2:
            header[name] = rng.choice([None, [], "F32", 1, [header[name]]])
        else:
            rng.choice(_tensor_mutations(rng))(header[name])
        return kind, pack(header, body)
    if kind == "metadata":
        meta = header.setdefault("__metadata__", {})
        if rng.random() < 0.15:
            header["__metadata__"] = rng.choice([[1], "x", 1, {"a": {"b": "c"}}, _deep(10)])
        else:
            rng.choice(_metadata_mutations(rng))(meta)
        return kind, pack(header, body)
    if kind == "garbage":
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
        return kind, pack(raw if rng.random() < 0.5 else b"{" + raw, body)
    if kind == "overlap":
        names = [k for k in header if k != "__metadata__"]
        a = rng.choice(names)
        header["zz_extra"] = dict(header[a])
        return kind, pack(header, body)
    if kind == "duplicate":
        text = json.dumps(header)
        name = rng.choice([k for k in header if k != "__metadata__"])
        dup = json.dumps({name: header[name]})[1:-1]
        return kind, pack("{" + dup + "," + text[1:], body)
    # benign: the same content with the header padded differently (must still be read)
    return kind, pack(json.dumps(header) + " " * rng.randint(0, 7), body)


def mutated_files(valid: bytes, count: int, seed: int = 0) -> Iterator[tuple[int, str, bytes]]:
    rng = random.Random(seed)
    for i in range(count):
        kind, data = mutate_safetensors(valid, rng)
        yield i, kind, data


# ---- pictures and captions ------------------------------------------------------------------------------------
def _png_bytes(rng: random.Random, size=(64, 64), mode="RGB") -> bytes:
    import io

    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(rng.randrange(2 ** 31)).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(rng: random.Random, size=(64, 64)) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(rng.randrange(2 ** 31)).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def corrupt_picture(rng: random.Random) -> tuple[str, str, bytes]:
    """(kind, file extension, bytes) of one damaged or hostile picture file."""
    kind = rng.choice(["truncated_png", "truncated_jpeg", "flipped_png", "flipped_jpeg", "empty", "random",
                       "text", "header_only", "bomb", "tiny", "wrong_ext", "zero_dim", "huge_chunk"])
    png, jpg = _png_bytes(rng), _jpeg_bytes(rng)
    if kind == "truncated_png":
        return kind, ".png", png[:rng.randrange(8, len(png) - 1)]
    if kind == "truncated_jpeg":
        return kind, ".jpg", jpg[:rng.randrange(4, len(jpg) - 2)]
    if kind in ("flipped_png", "flipped_jpeg"):
        raw = bytearray(png if kind == "flipped_png" else jpg)
        for _ in range(rng.randint(1, 20)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return kind, ".png" if kind == "flipped_png" else ".jpg", bytes(raw)
    if kind == "empty":
        return kind, rng.choice([".png", ".jpg", ".webp"]), b""
    if kind == "random":
        return kind, rng.choice([".png", ".jpg", ".webp", ".gif", ".bmp", ".tif"]), \
            bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000)))
    if kind == "text":
        return kind, ".jpg", b"this is not a picture\n" * 10
    if kind == "header_only":
        return kind, ".png", png[:33]
    if kind == "bomb":   # a PNG whose IHDR claims 100000 x 100000 pixels
        import zlib

        ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        return kind, ".png", (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
                              + struct.pack(">I", zlib.crc32(chunk)) + png[33:])
    if kind == "tiny":
        return kind, ".png", _png_bytes(rng, (1, 1))
    if kind == "wrong_ext":
        return kind, ".png", jpg
    if kind == "zero_dim":
        import zlib

        ihdr = struct.pack(">IIBBBBB", 0, 64, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + ihdr
        return kind, ".png", (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
                              + struct.pack(">I", zlib.crc32(chunk)) + png[33:])
    # huge_chunk: a chunk length far beyond the file
    return kind, ".png", png[:33] + struct.pack(">I", 2 ** 31 - 1) + b"IDAT" + png[41:80]


def corrupt_caption(rng: random.Random) -> tuple[str, bytes]:
    """(kind, bytes) of one hostile caption file."""
    kind = rng.choice(["invalid_utf8", "huge", "many_tags", "nul", "whitespace", "bom", "control", "braces",
                       "lines", "emoji", "long_word"])
    if kind == "invalid_utf8":
        return kind, b"zwx \xff\xfe\xc3 toy"
    if kind == "huge":
        return kind, b"zwx toy " * rng.randint(100_000, 1_400_000)
    if kind == "many_tags":
        return kind, ", ".join(f"tag{i}" for i in range(rng.randint(2_000, 10_000))).encode()
    if kind == "nul":
        return kind, b"zwx\x00toy\x00" * 50
    if kind == "whitespace":
        return kind, b" \n\t\r\n  "
    if kind == "bom":
        return kind, "\ufeffzwx toy, red".encode()
    if kind == "control":
        return kind, bytes(range(32)) * 20
    if kind == "braces":
        return kind, ("{" * 5000 + "a|b" + "}" * 5000).encode()
    if kind == "lines":
        return kind, ("zwx toy, line\n" * rng.randint(1_000, 20_000)).encode()
    if kind == "emoji":
        return kind, ("😀" * rng.randint(1_000, 100_000)).encode()
    return kind, b"a" * rng.randint(10_000, 500_000)
