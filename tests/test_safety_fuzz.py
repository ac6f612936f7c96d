"""Hostile files through every entry point (issue #14): mutated .safetensors headers through every reader of
a user's file, corrupt pictures and captions through the dataset tools and a training run. Anything but a
clean result or a UserError (one line for the user) is a failure. Fixed seeds; tools/safety_bench.py runs
the same with more cases."""

from __future__ import annotations

import random
import traceback
from collections import Counter

import pytest

from lib_sdtrain.errors import UserError
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.testing.hostile import corrupt_caption, corrupt_picture, mutated_files
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings
from conftest import make_dataset
from safety_readers import header_readers


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = make_tiny_checkpoint(root / "tiny.safetensors", "sd1")
    data = make_dataset(root / "data", 2, 64)
    cfg = TrainSettings.from_dict({
        "model": str(model), "data": str(data), "name": "t", "resolution": 64, "min_bucket": 64, "max_bucket": 64,
        "max_steps": 1, "save_every_n_epochs": 0, "tensorboard": False, "sample_every_n_epochs": 0,
        "lora": {"network_dim": 2, "network_alpha": 2, "targets": "attn", "train_text_encoder": False}})
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=root / "outputs")
    result = train(cfg, host)
    return {"root": root, "model": model, "host": host, "final": result.final, "valid": result.final.read_bytes()}


def run_readers(readers, path, case, failures):
    for name, read in readers.items():
        try:
            read(path)
        except UserError:
            pass
        except BaseException as e:  # noqa: BLE001 - every other exception is what this test looks for
            failures.append(f"case {case} / {name}: {type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}")


def test_fuzzed_headers_never_crash_a_reader(lora_run, capsys):
    """>= 200 mutated headers (seed 14) through every reader; the slow whole-command paths (CLI convert/info,
    run discovery, applying the file to a loaded model) on every 8th case."""
    root, host = lora_run["root"], lora_run["host"]
    parts = host.load(str(lora_run["model"]))
    try:
        every = header_readers(root / "work", model=lora_run["model"], output_root=root / "outputs", parts=parts,
                               host=host)
        slow = {k: every.pop(k) for k in ("cli.convert", "cli.convert_kohya", "cli.info", "runs.discover_run",
                                          "apply.applier")}
        failures: list[str] = []
        kinds: Counter = Counter()
        refused = 0
        for i, kind, blob in mutated_files(lora_run["valid"], 200, seed=14):
            lora_run["final"].write_bytes(blob)
            kinds[kind] += 1
            run_readers(every, lora_run["final"], i, failures)
            if i % 8 == 0:
                run_readers(slow, lora_run["final"], i, failures)
            try:
                from lib_sdtrain.formats.safetensors_io import read_header

                read_header(lora_run["final"])
            except UserError:
                refused += 1
        capsys.readouterr()
    finally:
        host.release(parts)
        lora_run["final"].write_bytes(lora_run["valid"])
    assert not failures, f"{len(failures)} crashes:\n" + "\n".join(failures[:5])
    assert len(kinds) >= 9 and refused >= 150, (kinds, refused)   # the mutations really are hostile


def test_benign_header_variants_still_read(lora_run):
    from lib_sdtrain.formats.safetensors_io import read_header, read_safetensors
    from lib_sdtrain.testing.hostile import pack, split_safetensors

    header, body = split_safetensors(lora_run["valid"])
    path = lora_run["root"] / "padded.safetensors"
    path.write_bytes(pack(__import__("json").dumps(header) + "     ", body))
    tensors, meta = read_safetensors(path)
    assert set(tensors) == set(read_header(lora_run["final"]).tensors) and meta == header["__metadata__"]


@pytest.mark.parametrize("header,reason", [
    ("[]", "not a JSON table"), ("null", "not a JSON table"), ("[" * 5000 + "]" * 5000, "not a JSON table"),
    ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ('{"__metadata__": [1]}', "__metadata__"), ('{"__metadata__": {"a": 1}}', "__metadata__"),
    ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "does not fill"),
    ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "v": {"dtype": "F32", "shape": [1], '
     '"data_offsets": [0, 4]}}', "overlap"),
    ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "gap"),
    ('{"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}', "dtype"),
    ('{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "shape"),
    ('{"w": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', "shape"),
    ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], '
     '"data_offsets": [0, 4]}}', "twice"),
])
def test_each_header_rule_has_its_reason(tmp_path, header, reason):
    from lib_sdtrain.formats.safetensors_io import read_header
    from lib_sdtrain.testing.hostile import pack

    path = tmp_path / "bad.safetensors"
    path.write_bytes(pack(header, b"\0" * 8))
    with pytest.raises(UserError, match=reason):
        read_header(path)


def test_corrupt_pictures_and_captions_through_the_dataset_tools_and_training(tmp_path, lora_run):
    """>= 100 corrupt pictures and >= 100 hostile captions (seed 14): scan, the Dataset tab's reports, the caption
    editor, and a training run over the lot (which skips the unusable files and trains on the good ones)."""
    from lib_sdtrain.ui import dataset_tab as D

    rng = random.Random(14)
    folder = tmp_path / "data" / "2_zwx toy"
    folder.mkdir(parents=True)
    make_dataset(tmp_path / "good", 2, 64)
    for p in (tmp_path / "good" / "3_zwx toy").iterdir():
        p.rename(folder / p.name)
    kinds: Counter = Counter()
    for i in range(110):
        kind, ext, blob = corrupt_picture(rng)
        (folder / f"bad{i:03d}{ext}").write_bytes(blob)
        kinds[kind] += 1
    for i in range(2):   # the good pictures get hostile captions too; the rest go beside copies of them
        kind, blob = corrupt_caption(rng)
        (folder / f"{i}.txt").write_bytes(blob)
    for i in range(110):
        kind, blob = corrupt_caption(rng)
        (folder / f"cap{i:03d}.png").write_bytes((folder / "0.png").read_bytes())
        (folder / f"cap{i:03d}.txt").write_bytes(blob)
        kinds["caption:" + kind] += 1
    failures: list[str] = []
    data = str(tmp_path / "data")
    calls = {"scan_report": lambda: D.scan_report(data), "tag_rows": lambda: D.tag_rows(data),
             "token_summary": lambda: D.token_summary(data), "bucket_report": lambda: D.bucket_report(data),
             "guidance": lambda: D.guidance_report(data), "gallery": lambda: D.gallery_items(data)}
    for rel in ["2_zwx toy/bad000.png", "2_zwx toy/cap000.png", "2_zwx toy/cap001.png"]:
        calls[f"load_caption {rel}"] = lambda rel=rel: D.load_caption(data, "", rel)
    for name, call in calls.items():
        try:
            call()
        except UserError:
            pass
        except BaseException as e:  # noqa: BLE001
            failures.append(f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc()[-800:]}")
    cfg = TrainSettings.from_dict({
        "model": str(lora_run["model"]), "data": data, "output": str(tmp_path / "out"), "name": "hostile",
        "resolution": 64, "min_bucket": 64, "max_bucket": 64, "max_steps": 2, "batch_size": 4,
        "save_every_n_epochs": 0, "tensorboard": False, "sample_every_n_epochs": 0, "shuffle_tags": True,
        "caption_wildcards": True, "lora": {"network_dim": 2, "network_alpha": 2, "targets": "attn"}})
    result = train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs"))
    assert not failures, "\n".join(failures[:5])
    assert result.final.is_file() and result.steps == 2
    assert sum(v for k, v in kinds.items() if not k.startswith("caption:")) >= 100 and len(kinds) >= 15
