import json

from lib_sdtrain.formats import hashes
from conftest import GOLDEN


def _examples():
    return json.loads((GOLDEN / "a1111_defaults.json").read_text())["hashes"]["worked_examples"]


def test_small_safetensors_example(tmp_path):
    ex = _examples()["example_safetensors"]
    p = tmp_path / "hash_example.safetensors"
    p.write_bytes(bytes.fromhex(ex["file_bytes_hex"]))
    assert hashes.sha256_file(p) == ex["full_file_sha256"]
    assert hashes.addnet_hash(p) == ex["lora"]["addnet_hash (sha256 of the bytes after the 8+N header)"]
    assert hashes.legacy_model_hash(p) == "e3b0c442"
    assert hashes.addnet_hash_bytes(p.read_bytes()) == hashes.addnet_hash(p)


def test_big_file_example(tmp_path):
    ex = _examples()["example_big_file"]
    p = tmp_path / "big.pt"
    p.write_bytes(bytes(i % 251 for i in range(0x120000)))
    assert hashes.sha256_file(p) == ex["full_file_sha256"]
    assert hashes.legacy_model_hash(p) == ex["legacy_model_hash (first 8 hex of sha256 over bytes 0x100000..0x10FFFF)"]
    assert hashes.lora_hash(p)[:12] == ex["lora_hash_if_named_.pt (non-safetensors: whole-file sha256, first 12 hex)"]


def test_model_sha256_reads_a_file_once_and_again_when_it_changes(tmp_path, monkeypatch):
    import hashlib
    import os

    path = tmp_path / "base.safetensors"
    path.write_bytes(b"first weights")
    reads = []
    real = hashes.sha256_file
    monkeypatch.setattr(hashes, "sha256_file", lambda p, offset=0: reads.append(p) or real(p, offset))
    assert hashes.model_sha256(path) == hashlib.sha256(b"first weights").hexdigest()
    assert hashes.model_sha256(tmp_path / "." / "base.safetensors") == hashlib.sha256(b"first weights").hexdigest()
    assert len(reads) == 1                       # the same file (however named) is read once
    path.write_bytes(b"other weights, longer")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert hashes.model_sha256(path) == hashlib.sha256(b"other weights, longer").hexdigest()
    assert len(reads) == 2                       # a changed file is read again
