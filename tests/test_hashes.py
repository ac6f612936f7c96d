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
