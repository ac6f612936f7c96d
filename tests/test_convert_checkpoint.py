"""Checkpoint conversion: bit-exact round trips, what is dropped and recorded, casting, shared storages,
verification, never overwriting, A1111 hashes, and the `convert` command."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch
from conftest import GOLDEN, ROOT
from safetensors import safe_open
from safetensors.torch import load_file

from lib_sdtrain import cli
from lib_sdtrain.convert import batch
from lib_sdtrain.convert.output import ConvertConfig, a1111_hashes
from lib_sdtrain.formats import hashes
from lib_sdtrain.formats.safe_pickle import load_checkpoint, load_state_dict

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _model_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for i, dt in enumerate(DTYPES):
        t = torch.randn(3, 5, generator=g) * 100
        sd[f"model.diffusion_model.t{i}"] = t.to(dt)
    big = torch.randn(6, 8, generator=g)
    sd["first_stage_model.tied_a"] = big
    sd["first_stage_model.tied_b"] = big                  # the same tensor twice (tied weights)
    sd["first_stage_model.slice"] = big[2:4]              # a view sharing the storage
    sd["first_stage_model.transposed"] = big.t()          # non-contiguous
    sd["cond_stage_model.scalar"] = torch.tensor(1.5)     # 0-dim
    sd["cond_stage_model.empty"] = torch.empty(0, 4)
    sd["cond_stage_model.position_ids"] = torch.arange(77).unsqueeze(0)
    sd["cond_stage_model.nan"] = torch.tensor([float("nan"), float("inf"), -0.0])
    sd["param"] = torch.nn.Parameter(torch.randn(4, generator=g))
    return sd


@pytest.fixture
def fake_lightning(monkeypatch):
    """A stand-in for pytorch_lightning's ModelCheckpoint, so torch.save writes the global old SD files have."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mods = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mods[names[-1]].ModelCheckpoint = cls
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    return cls


def _sd_file(tmp_path, fake_lightning, *, legacy=False, name="model.ckpt"):
    sd = _model_state()
    ema = {f"model_ema.diffusion_modelt{i}": torch.full((2,), float(i)) for i in range(3)}
    ema["model_ema.num_updates"] = torch.tensor(10)
    obj = {
        "epoch": 3, "global_step": 470000, "pytorch-lightning_version": "1.4.2",
        "state_dict": {**sd, **ema},
        "callbacks": {fake_lightning: {"best_model_score": None, "dirpath": "/x"}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [],
    }
    path = tmp_path / name
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path, sd, ema


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_round_trip_is_bit_exact(tmp_path, fake_lightning, legacy):
    path, sd, ema = _sd_file(tmp_path, fake_lightning, legacy=legacy)
    src_sha = hashes.sha256_file(path)
    out = tmp_path / "out"
    (r,) = batch.convert_all([path], out, ConvertConfig())
    assert r.status == "converted" and r.kind == "checkpoint", r.message
    assert hashes.sha256_file(path) == src_sha  # the input is untouched
    written = load_file(str(r.output))
    assert set(written) == set(sd)
    for k, t in sd.items():
        assert written[k].dtype == t.dtype and written[k].shape == t.shape, k
        assert _bits(written[k]) == _bits(t), k
    # the loader the standalone host uses agrees, and leaves EMA out unless asked
    loaded = load_state_dict(path)
    assert set(loaded) == set(sd)
    assert set(load_state_dict(path, keep_ema=True)) == set(sd) | set(ema)
    with safe_open(str(r.output), "pt") as f:
        meta = f.metadata()
    assert meta["converted_from"] == "model.ckpt" and meta["converted_from_sha256"] == src_sha
    assert meta["converted_kind"] == "checkpoint" and meta["converted_dtype"] == "unchanged"
    assert meta["converted_from_format"] == ("torch legacy" if legacy else "torch zip")
    assert meta["source_global_step"] == "470000" and meta["source_epoch"] == "3"
    assert meta["source_pytorch-lightning_version"] == "1.4.2"
    dropped = json.loads(meta["converted_dropped"])
    assert dropped["ema_tensors"] == len(ema)
    assert dropped["beside_state_dict"] == ["callbacks", "lr_schedulers", "optimizer_states"]
    assert dropped["shared_storage_copies"] == 2  # tied_b and slice became copies of their own


def test_lightning_modelcheckpoint_is_an_inert_key(tmp_path, fake_lightning):
    path, _, _ = _sd_file(tmp_path, fake_lightning)
    (key,) = load_checkpoint(path)["callbacks"]
    assert (key.module, key.name) == ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    assert not callable(key)


def test_keep_ema(tmp_path, fake_lightning):
    path, sd, ema = _sd_file(tmp_path, fake_lightning)
    (r,) = batch.convert_all([path], tmp_path / "out", ConvertConfig(keep_ema=True))
    assert set(load_file(str(r.output))) == set(sd) | set(ema)


@pytest.mark.parametrize("dtype,target", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtype_cast(tmp_path, fake_lightning, dtype, target):
    path, sd, _ = _sd_file(tmp_path, fake_lightning)
    (r,) = batch.convert_all([path], tmp_path / "out", ConvertConfig(dtype=dtype))
    written = load_file(str(r.output))
    for k, t in sd.items():
        if t.is_floating_point():
            assert written[k].dtype == target
            assert _bits(written[k]) == _bits(t.detach().to(target)), k
        else:
            assert written[k].dtype == t.dtype and torch.equal(written[k], t), k
    with safe_open(str(r.output), "pt") as f:
        assert f.metadata()["converted_dtype"] == dtype


def test_fp16_overflow_is_reported(tmp_path):
    path = tmp_path / "big.ckpt"
    torch.save({"state_dict": {"w": torch.tensor([1e6, 1.0])}}, path)
    (r,) = batch.convert_all([path], tmp_path / "out", ConvertConfig(dtype="fp16"))
    assert r.status == "converted" and any("overflowed" in w for w in r.warnings)


def test_plain_state_dict_and_bin(tmp_path):
    """diffusers-style .bin: a flat state dict, no wrapper."""
    src = tmp_path / "unet"
    src.mkdir()
    sd = {"conv_in.weight": torch.randn(4, 4, 3, 3), "conv_in.bias": torch.randn(4)}
    torch.save(sd, src / "diffusion_pytorch_model.bin")
    (r,) = batch.convert_all([tmp_path], tmp_path / "out", ConvertConfig())
    assert r.output == (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    written = load_file(str(r.output))
    assert all(torch.equal(written[k], v) for k, v in sd.items())


def test_never_overwrites_without_flag(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "m.safetensors"
    existing.write_bytes(b"user's own file")
    (r,) = batch.convert_all([path], out, ConvertConfig())
    assert r.status == "refused" and "already exists" in r.message and "--overwrite" in r.message
    assert existing.read_bytes() == b"user's own file"
    (r,) = batch.convert_all([path], out, ConvertConfig(overwrite=True))
    assert r.status == "converted" and torch.equal(load_file(str(existing))["w"], torch.ones(2))
    # a second run without --overwrite sees its own conversion of the same source and leaves it
    (r,) = batch.convert_all([path], out, ConvertConfig())
    assert r.status == "up to date" and r.ok
    # ... but not if the source changed, or the dtype differs
    (r,) = batch.convert_all([path], out, ConvertConfig(dtype="fp16"))
    assert r.status == "refused"
    assert sorted(p.name for p in out.iterdir()) == ["m.safetensors"]  # no temporary files left


def test_output_beside_the_input_and_name_collisions(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "a.ckpt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "a.pt")
    results = batch.convert_all([tmp_path], tmp_path, ConvertConfig())
    assert [r.status for r in results] == ["refused", "converted"]  # planning refusals come first
    assert "rename one of them" in results[0].message
    assert (tmp_path / "a.ckpt").exists() and (tmp_path / "a.pt").exists()


def test_inputs_that_cannot_be_planned(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    jobs, refused = batch.plan([tmp_path / "x.safetensors", tmp_path / "missing.ckpt", tmp_path / "empty"], tmp_path)
    assert not jobs and len(refused) == 3
    assert "not a pickled model file" in refused[0].message and "not found" in refused[1].message
    assert "no .ckpt" in refused[2].message


def test_output_names_cannot_escape(tmp_path, monkeypatch):
    """Names come from real files, but the planner still goes through safe_child."""
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"w": torch.ones(1)}, src / "m.ckpt")
    monkeypatch.setattr(batch, "_walk", lambda folder: [folder / ".." / ".." / "evil.ckpt"])
    jobs, refused = batch.plan([src], tmp_path / "out")
    assert not jobs and "outside" in refused[0].message


def test_verification_failure_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch as st

    real = st.save_file

    def corrupting(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # flip the last data byte
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 0xFF]))

    monkeypatch.setattr(st, "save_file", corrupting)
    path = tmp_path / "m.ckpt"
    torch.save({"w": torch.arange(8.0)}, path)
    out = tmp_path / "out"
    (r,) = batch.convert_all([path], out, ConvertConfig())
    assert r.status == "refused" and "verification failed" in r.message
    assert not any(out.iterdir())


def test_no_tensors_and_only_ema(tmp_path):
    torch.save({"name": "x", "step": 3}, tmp_path / "meta.pt")
    torch.save({"state_dict": {"model_ema.w": torch.ones(1)}}, tmp_path / "ema.ckpt")
    r1, r2 = batch.convert_all([tmp_path / "meta.pt", tmp_path / "ema.ckpt"], tmp_path / "out", ConvertConfig())
    assert r1.status == "refused" and "no tensors" in r1.message
    assert r2.status == "refused" and "--keep-ema" in r2.message


# ---- hashes ---------------------------------------------------------------------------------------------
def _examples():
    return json.loads((GOLDEN / "a1111_defaults.json").read_text())["hashes"]["worked_examples"]


def test_printed_hashes_match_the_golden_examples(tmp_path):
    ex = _examples()
    small = tmp_path / "hash_example.safetensors"
    small.write_bytes(bytes.fromhex(ex["example_safetensors"]["file_bytes_hex"]))
    h = a1111_hashes(small, "checkpoint")
    assert h["sha256"] == ex["example_safetensors"]["checkpoint"]["sha256"]
    assert h["shorthash"] == ex["example_safetensors"]["checkpoint"]["shorthash (first 10 hex)"]
    assert h["model_hash"] == "e3b0c442"
    big = tmp_path / "big.safetensors"
    big.write_bytes(bytes(i % 251 for i in range(0x120000)))
    h = a1111_hashes(big, "checkpoint")
    assert h["shorthash"] == ex["example_big_file"]["checkpoint_shorthash (first 10 hex)"]
    assert h["model_hash"] == ex["example_big_file"]["legacy_model_hash (first 8 hex of sha256 over bytes 0x100000..0x10FFFF)"]
    assert a1111_hashes(big, "embedding")["shorthash"] == ex["example_big_file"][
        "lora_hash_if_named_.pt (non-safetensors: whole-file sha256, first 12 hex)"]


def test_cli_prints_hashes_and_exit_codes(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.ones(4)}}, tmp_path / "good.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
    out = tmp_path / "out"
    assert cli.main(["convert", str(tmp_path / "good.ckpt"), "--output", str(out), "--dtype", "fp16"]) == 0
    text = capsys.readouterr().out
    written = out / "good.safetensors"
    sha = hashes.sha256_file(written)
    assert f"A1111 hash {sha[:10]}" in text and f"sha256 {sha}" in text and f"model hash {hashes.legacy_model_hash(written)}" in text
    assert load_file(str(written))["w"].dtype == torch.float16
    assert cli.main(["convert", str(tmp_path), "--output", str(out), "--dtype", "fp16"]) == 1
    text = capsys.readouterr().out
    assert "REFUSED  bad.ckpt: refused: forbidden global 'os.system'" in text
    assert "1 refused, 1 up to date" in text
    assert cli.main(["convert", str(tmp_path / "good.ckpt"), "--output", str(out), "--dtype", "fp8"]) == 2


def test_cli_subprocess_one_line_error_and_light_import(tmp_path):
    (tmp_path / "f").write_text("x")
    res = subprocess.run([sys.executable, "-m", "lib_sdtrain", "convert", str(tmp_path), "--output", str(tmp_path / "f")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error:") and res.stderr.count("\n") == 1


def test_output_named_like_a_model_file_is_refused_before_anything_is_written(tmp_path, capsys):
    torch.save({"state_dict": {"w": torch.ones(4)}}, tmp_path / "good.ckpt")
    for name in ("good.safetensors", "x.CKPT"):
        assert cli.main(["convert", str(tmp_path / "good.ckpt"), "--output", str(tmp_path / name)]) == 2
        assert "not a file name" in capsys.readouterr().err
        assert not (tmp_path / name).exists()
    out = tmp_path / "models.v2"                   # a folder name with a dot in it is still a folder
    assert cli.main(["convert", str(tmp_path / "good.ckpt"), "--output", str(out)]) == 0
    assert (out / "good.safetensors").is_file()
    code = "import sys, lib_sdtrain.commands.convert, lib_sdtrain.convert.batch; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False", res.stderr


def test_same_file_named_twice_is_converted_once(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "m.ckpt")
    jobs, refused = batch.plan([tmp_path / "m.ckpt", tmp_path], tmp_path / "out")
    assert len(jobs) == 1 and not refused


def test_live_progress_line_on_a_terminal(tmp_path):
    import io

    from lib_sdtrain.commands.convert import _Progress
    from lib_sdtrain.events import Events

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    torch.save({"state_dict": {f"w{i}": torch.ones(1) for i in range(3)}}, tmp_path / "m.ckpt")
    batch.convert_all([tmp_path / "m.ckpt"], tmp_path / "out", ConvertConfig(), Events(_Progress(stream)))
    text = stream.getvalue()
    assert "[1/1] m.ckpt" in text and "m.ckpt: tensor 0/3" in text and "converting (checkpoint)" in text
