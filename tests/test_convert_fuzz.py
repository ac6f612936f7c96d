"""Seeded fuzzing of the safe loader: random bytes, truncations and bit flips of valid files, and mutated
pickles inside otherwise valid containers. Every case must end in a result or a UserError - no other
exception, no crash, no hang (each case runs under a timer) - and the converter must do the same."""

from __future__ import annotations

import random
import signal
import sys
import time
import zipfile
from contextlib import contextmanager

import pytest
import torch

from lib_sdtrain.convert import batch
from lib_sdtrain.convert.output import ConvertConfig
from lib_sdtrain.formats.safe_pickle import load_checkpoint
from lib_sdtrain.errors import UserError
from test_convert_support import legacy_bytes, torch_zip_members, write_zip, zip_members_of

SEED = 20240611
CASE_SECONDS = 5.0


class Hang(BaseException):
    """Raised by the timer; a BaseException so that no `except Exception` in the code under test eats it."""


@contextmanager
def time_limit(seconds: float):
    if not hasattr(signal, "setitimer"):  # Windows: measure only
        start = time.monotonic()
        yield
        assert time.monotonic() - start < seconds * 4
        return

    def fire(signum, frame):
        raise Hang(f"case took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _check_load(path) -> str:
    """Load `path`; return "ok" or "refused". Any exception other than UserError fails the test."""
    with time_limit(CASE_SECONDS):
        try:
            load_checkpoint(path)
            return "ok"
        except UserError as e:
            msg = str(e)
            assert msg.startswith(path.name) and "\n" not in msg, msg
            return "refused"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Valid files to mutate: zip and legacy, with several dtypes, views, nested containers and scalars."""
    d = tmp_path_factory.mktemp("seeds")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {
        "state_dict": {"w": base, "view": base[1:, 2:], "h": torch.ones(3, dtype=torch.float16),
                       "b": torch.tensor([True, False]), "i": torch.arange(5), "bf": torch.zeros(2, dtype=torch.bfloat16),
                       "model_ema.w": base.clone()},
        "global_step": 12, "epoch": 1, "opt": [{"lr": 0.1, "state": {0: {"m": torch.zeros(2)}}}], "s": {1, 2},
    }
    files = {}
    for name, legacy in (("zip.ckpt", False), ("legacy.ckpt", True)):
        torch.save(obj, d / name, _use_new_zipfile_serialization=not legacy)
        files[name] = (d / name).read_bytes()
    return files


def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_random_bytes(tmp_path):
    rng = random.Random(SEED)
    prefixes = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"c", b"(", b"PK\x05\x06"]
    for i in range(600):
        data = rng.choice(prefixes) + bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 64, 700])))
        _check_load(_write(tmp_path, f"rand{i}.pt", data))


def test_truncations(tmp_path, seeds):
    rng = random.Random(SEED + 1)
    for name, data in seeds.items():
        cuts = sorted({rng.randrange(len(data)) for _ in range(200)} | {0, 1, 8, len(data) - 1})
        for n in cuts:
            assert _check_load(_write(tmp_path, f"cut{n}_{name}", data[:n])) == "refused"


def test_bit_flips(tmp_path, seeds):
    rng = random.Random(SEED + 2)
    outcomes = {"ok": 0, "refused": 0}
    for name, data in seeds.items():
        for i in range(400):
            raw = bytearray(data)
            for _ in range(rng.choice([1, 1, 2, 8])):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            outcomes[_check_load(_write(tmp_path, f"flip{i}_{name}", bytes(raw)))] += 1
    assert outcomes["refused"] > 0


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    raw = bytearray(blob)
    for _ in range(rng.choice([1, 2, 4])):
        op = rng.randrange(4)
        at = rng.randrange(len(raw)) if raw else 0
        if op == 0 and raw:
            raw[at] = rng.getrandbits(8)
        elif op == 1:
            raw.insert(at, rng.getrandbits(8))
        elif op == 2 and raw:
            del raw[at]
        else:  # splice in an opcode byte that builds or calls things
            raw.insert(at, rng.choice(b"cRbio\x81\x92\x93(tsuae\x82QP"))
    return bytes(raw)


def test_mutated_pickles_in_valid_containers(tmp_path, seeds):
    """Re-zip with a mutated data.pkl (so the CRC is right and the interpreter sees the garbage) and mutate
    the legacy stream's pickles; also run the converter on whatever still loads."""
    rng = random.Random(SEED + 3)
    src = tmp_path / "zip.ckpt"
    src.write_bytes(seeds["zip.ckpt"])
    members = zip_members_of(src)
    pkl_name = next(k for k in members if k.endswith("data.pkl"))
    loaded = []
    for i in range(800):
        m = dict(members)
        m[pkl_name] = _mutate(rng, members[pkl_name])
        path = write_zip(tmp_path / f"mut{i}.ckpt", m)
        if _check_load(path) == "ok":
            loaded.append(path)
    legacy = seeds["legacy.ckpt"]
    for i in range(400):
        cut = rng.randrange(20, 600)  # the pickles sit at the start of a legacy file
        path = _write(tmp_path, f"legmut{i}.pt", _mutate(rng, legacy[:cut]) + legacy[cut:])
        if _check_load(path) == "ok":
            loaded.append(path)
    out = tmp_path / "out"
    with time_limit(CASE_SECONDS * 4):
        results = batch.convert_all(loaded[:40], out, ConvertConfig(overwrite=True))
    assert all(r.status in ("converted", "refused") for r in results)
    assert len(loaded) > 10 and sum(r.status == "converted" for r in results) > 0  # the fuzz reached the converter
