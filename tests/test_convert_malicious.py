"""A corpus of hostile files, generated here: every one is refused with a message naming the problem, and the
sentinel file each payload tries to create never appears. A control test proves the payloads are live."""

from __future__ import annotations

import collections
import pickle
import struct
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest
import torch

from lib_sdtrain.convert import batch
from lib_sdtrain.formats import safe_pickle
from lib_sdtrain.convert.output import ConvertConfig
from lib_sdtrain.formats.safe_pickle import CorruptFileError, UnsafeFileError, load_checkpoint, load_state_dict
from lib_sdtrain.errors import UserError
from test_convert_support import (FakeStorage, Reduce, TensorLike, dumps_with_storages, legacy_bytes,
                                  payload_objects, payload_variants, torch_zip_members, write_zip,
                                  zip_members_of)

# the global each payload must be refused by (os.system pickles as posix.system on Linux)
EXPECTED_GLOBAL = {
    "os_system": "posix.system", "posix_system": "posix.system", "builtins_eval": "builtins.eval",
    "builtins_exec": "builtins.exec", "subprocess_check_output": "subprocess.check_output",
    "subprocess_popen": "subprocess.Popen", "global_os_system": "os.system", "inst_os_system": "os.system",
    "obj_builtins_exec": "builtins.exec", "stack_global_memo": "builtins.eval",
    "getattr_import_chain": "builtins.getattr", "stack_global_exec_p4": "builtins.exec",
}


def _expected(name: str) -> str:
    for prefix, dotted in EXPECTED_GLOBAL.items():
        if name == prefix or name.startswith(prefix + "_"):
            return dotted
    raise KeyError(name)


VARIANTS = sorted(payload_variants(__import__("pathlib").Path("/x")))
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="payloads use posix")


@posix_only
def test_payloads_are_live(tmp_path):
    """Control: plain pickle.loads (in a throw-away process) really runs every payload."""
    sentinels = {name: tmp_path / f"sentinel_{name}" for name in VARIANTS}
    blobs = {name: payload_variants(sentinels[name])[name] for name in VARIANTS}
    script = textwrap.dedent("""
        import pickle, sys, time, pathlib
        blobs, sentinels = pickle.loads(sys.stdin.buffer.read())
        for name, blob in blobs.items():
            try:
                pickle.loads(blob)
            except Exception:
                pass
        deadline = time.time() + 20
        while time.time() < deadline and not all(pathlib.Path(p).exists() for p in sentinels.values()):
            time.sleep(0.05)
    """)
    data = pickle.dumps((blobs, {k: str(v) for k, v in sentinels.items()}))
    subprocess.run([sys.executable, "-c", script], input=data, check=True, timeout=60, capture_output=True)
    dead = [name for name, p in sentinels.items() if not p.exists()]
    assert not dead, f"payloads that did not fire: {dead}"


def _containers(blob: bytes, tmp_path, name: str) -> dict[str, object]:
    """The payload pickle placed where a model file carries pickles."""
    return {
        "raw.pt": blob,
        "zip_data_pkl.ckpt": torch_zip_members(blob, prefix="evil"),
        "legacy_object.pt": legacy_bytes(blob, []),
        "legacy_magic.pt": legacy_bytes(pickle.dumps({}, protocol=2), [], magic_pickle=blob),
        "legacy_sysinfo.pt": legacy_bytes(pickle.dumps({}, protocol=2), [], sys_info=blob),
    }


def _write(path, content) -> None:
    if isinstance(content, dict):
        write_zip(path, content)
    else:
        path.write_bytes(content)


@posix_only
@pytest.mark.parametrize("name", VARIANTS)
def test_payload_refused_in_every_container(tmp_path, name):
    sentinel = tmp_path / "sentinel"
    blob = payload_variants(sentinel)[name]
    for label, content in _containers(blob, tmp_path, name).items():
        path = tmp_path / f"{name}-{label}"
        _write(path, content)
        with pytest.raises(UnsafeFileError) as e:
            load_checkpoint(path)
        msg = str(e.value)
        assert msg.startswith(path.name + ": refused: ") and "\n" not in msg
        assert f"'{_expected(name)}'" in msg, msg
    assert not sentinel.exists()


@posix_only
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_payload_hidden_deep_in_a_real_torch_save(tmp_path, legacy):
    """The real-world attack: torch.save of a state dict with a payload inside a dict inside a list."""
    sentinel = tmp_path / "sentinel"
    for name, evil in payload_objects(sentinel).items():
        obj = {"state_dict": {"w": torch.ones(3), "meta": [1, {"deep": evil}]}, "global_step": 1}
        path = tmp_path / f"{name}.ckpt"
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
        for loader in (load_checkpoint, load_state_dict):
            with pytest.raises(UnsafeFileError, match=f"forbidden global '{_expected(name)}'"):
                loader(path)
    assert not sentinel.exists()


@posix_only
def test_batch_refuses_the_whole_corpus_and_writes_nothing(tmp_path):
    sentinel = tmp_path / "sentinel"
    src = tmp_path / "in"
    src.mkdir()
    for name, blob in payload_variants(sentinel).items():
        write_zip(src / f"{name}_zip.ckpt", torch_zip_members(blob))
        (src / f"{name}_legacy.pt").write_bytes(legacy_bytes(blob, []))
    out = tmp_path / "out"
    results = batch.convert_all([src], out, ConvertConfig())
    assert len(results) == 2 * len(VARIANTS)
    assert all(r.status == "refused" and "forbidden global" in r.message for r in results)
    assert not out.exists() or not any(out.rglob("*"))
    assert not sentinel.exists()


# ---- structural refusals inside the pickle --------------------------------------------------------------
def _zip_with(tmp_path, data_pkl: bytes, storages=None, name="case.ckpt"):
    return write_zip(tmp_path / name, torch_zip_members(data_pkl, storages))


def _tensor_pickle(size, stride, numel=4, hooks=None, offset=0) -> bytes:
    st = FakeStorage("0", torch.FloatStorage, numel)
    return dumps_with_storages({"w": TensorLike(st, offset, size, stride, hooks)})


PICKLE_CASES = {
    "obj_allowed_class": (b"(ccollections\nOrderedDict\no.", "OBJ"),
    "inst_allowed_class": (b"(icollections\nOrderedDict\n.", "INST"),
    "ext1": (b"\x80\x02\x82\x01.", "EXT1"),
    "newobj_ordered_dict": (b"\x80\x02ccollections\nOrderedDict\n)\x81.", "NEWOBJ"),
    "call_model_checkpoint": (b"\x80\x02cpytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n)R.",
                              "may not be called"),
    "build_ordered_dict": (b"\x80\x02ccollections\nOrderedDict\n)R}X\x03\x00\x00\x00fooK\x01sb.", "BUILD"),
    "text_persid": (b"P0\n.", "PERSID"),
    "torch_load": (b"\x80\x02ctorch.serialization\nload\nX\x01\x00\x00\x00x\x85R.", "'torch.serialization.load'"),
    "load_from_bytes": (b"\x80\x02ctorch.storage\n_load_from_bytes\nC\x01x\x85R.", "'torch.storage._load_from_bytes'"),
    "qtensor": (b"\x80\x02ctorch._utils\n_rebuild_qtensor\n).", "'torch._utils._rebuild_qtensor'"),
    "param_with_state": (b"\x80\x02ctorch._utils\n_rebuild_parameter_with_state\n).",
                         "'torch._utils._rebuild_parameter_with_state'"),
    "numpy_load": (b"\x80\x02cnumpy\nload\n).", "'numpy.load'"),
    "numpy_object_dtype": (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R.", "not a plain numeric type"),
    "copyreg_reconstructor": (b"\x80\x02ccopy_reg\n_reconstructor\n).", "'copyreg._reconstructor'"),
    "complex_storage": (b"\x80\x02ctorch\nComplexFloatStorage\n.", "'torch.ComplexFloatStorage'"),
    "append_to_global": (b"\x80\x02ccollections\nOrderedDict\nK\x01a.", "cannot add items"),
    "deep_tuple_key": (b"\x80\x02}K\x01" + b"\x85" * 10 + b"K\x02s.", "unsupported dict key"),
    "hooks": (_tensor_pickle((4,), (1,), hooks=collections.OrderedDict({1: 2})), "backward hooks"),
    "view_past_storage": (_tensor_pickle((10,), (1,)), "runs past its storage"),
    "negative_offset": (_tensor_pickle((2,), (1,), offset=-1), "bad storage offset"),
    "zero_stride_bomb": (_tensor_pickle((10 ** 9,), (0,)), "expands its storage"),
    "persistent_id_outside_tensor": (dumps_with_storages({"s": FakeStorage("0", torch.FloatStorage, 4)}), None),
    "newline_in_name": (b"\x80\x04\x8c\x04os\nx\x8c\x06system\x93.", "forbidden global 'os\\nx'.'system' (via STACK_GLOBAL)"),
    "self_reference": (b"\x80\x02}X\x01\x00\x00\x00a]q\x00h\x00as.", "refers to itself"),
    "deep_nesting": (b"\x80\x02}X\x01\x00\x00\x00a" + b"]" * 300 + b"a" * 299 + b"s.", "nests deeper"),
}


@pytest.mark.parametrize("case", sorted(PICKLE_CASES))
def test_structural_refusals(tmp_path, case):
    blob, expected = PICKLE_CASES[case]
    path = _zip_with(tmp_path, blob, {"0": bytes(16)})
    if expected is None:  # a bare storage object is harmless data, but not a tensor: it is simply dropped
        assert load_checkpoint(path)["s"] is not None
        with pytest.raises(UserError, match="no tensors"):
            load_state_dict(path)
        return
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert expected in str(e.value), str(e.value)
    assert str(e.value).startswith("case.ckpt: ")


# ---- zip container tricks -----------------------------------------------------------------------------
@pytest.fixture
def good_members(tmp_path):
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, path)
    members = zip_members_of(path)
    data = next(v for k, v in members.items() if k.endswith("/data.pkl"))
    storage = next(v for k, v in members.items() if k.endswith("/data/0"))
    return data, storage


ZIP_CASES = {
    "dotdot_prefix": (lambda d, s: {"../data.pkl": d, "../data/0": s}, "path tricks"),
    "dotdot_inside": (lambda d, s: {"a/../data.pkl": d, "a/data/0": s}, "path tricks"),
    "absolute": (lambda d, s: {"/a/data.pkl": d, "/a/data/0": s}, "path tricks"),
    "backslash": (lambda d, s: {"a\\data.pkl": d, "a\\data\\0": s}, "path tricks"),
    "drive_letter": (lambda d, s: {"C:/a/data.pkl": d, "C:/a/data/0": s}, "path tricks"),
    "directory_entry": (lambda d, s: {"a/": b"", "a/data.pkl": d, "a/data/0": s}, "directory entry"),
    "no_prefix": (lambda d, s: {"data.pkl": d, "a/data/0": s}, "outside the archive prefix"),
    "two_prefixes": (lambda d, s: {"a/data.pkl": d, "b/data/0": s}, "more than one archive prefix"),
    "two_data_pkl_two_prefixes": (lambda d, s: {"a/data.pkl": d, "a/data/0": s, "b/data.pkl": d},
                                  "more than one archive prefix"),
    "unexpected_member": (lambda d, s: {"a/data.pkl": d, "a/data/0": s, "a/evil.py": b"import os"},
                          "unexpected zip member 'a/evil.py'"),
    "torchscript": (lambda d, s: {"a/data.pkl": d, "a/data/0": s, "a/code/__torch__.py": b"", "a/constants.pkl": b""},
                    "unexpected zip member"),
    "nested_storage_name": (lambda d, s: {"a/data.pkl": d, "a/data/0/x": s}, "unexpected zip member"),
    "no_data_pkl": (lambda d, s: {"a/data/0": s, "a/version": b"3"}, "no data.pkl"),
    "missing_storage": (lambda d, s: {"a/data.pkl": d}, "data/0 is missing"),
    "short_storage": (lambda d, s: {"a/data.pkl": d, "a/data/0": s[:-4]}, "the pickle expects"),
    "bad_byteorder": (lambda d, s: {"a/data.pkl": d, "a/data/0": s, "a/byteorder": b"middle"}, "byte order"),
    "trailing_pickle_bytes": (lambda d, s: {"a/data.pkl": d + b"junk", "a/data/0": s}, "after the pickle"),
}


@pytest.mark.parametrize("case", sorted(ZIP_CASES))
def test_zip_tricks_refused(tmp_path, good_members, case):
    build, expected = ZIP_CASES[case]
    path = write_zip(tmp_path / "trick.ckpt", build(*good_members))
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert expected in str(e.value), str(e.value)


def test_duplicate_data_pkl_refused(tmp_path, good_members):
    d, s = good_members
    path = tmp_path / "dup.ckpt"
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "w") as zf:  # zipfile itself warns about it
        zf.writestr("a/data.pkl", d)
        zf.writestr("a/data/0", s)
        zf.writestr("a/data.pkl", d)
    with pytest.raises(UnsafeFileError, match="two data.pkl"):
        load_checkpoint(path)


def test_encrypted_member_refused(tmp_path, good_members):
    d, s = good_members
    path = write_zip(tmp_path / "enc.ckpt", {"a/data.pkl": d, "a/data/0": s})
    raw = bytearray(path.read_bytes())  # zipfile cannot write encrypted members: set the flag bit by hand
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        raw[raw.find(sig) + flag_at] |= 0x1
    path.write_bytes(bytes(raw))
    with pytest.raises(UnsafeFileError, match="encrypted"):
        load_checkpoint(path)


def test_bad_crc_in_tensor_data_is_corrupt(tmp_path):
    path = tmp_path / "crc.ckpt"
    torch.save({"w": torch.arange(64.0)}, path)
    raw = bytearray(path.read_bytes())
    at = raw.find(torch.arange(64.0).numpy().tobytes())
    raw[at + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="(?i)crc"):
        load_checkpoint(path)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_files_are_corrupt(tmp_path, fraction):
    for legacy in (False, True):
        path = tmp_path / f"t{legacy}.ckpt"
        torch.save({"state_dict": {"w": torch.arange(256.0)}}, path, _use_new_zipfile_serialization=not legacy)
        raw = path.read_bytes()
        path.write_bytes(raw[: int(len(raw) * fraction)])
        with pytest.raises(CorruptFileError) as e:
            load_checkpoint(path)
        assert str(e.value).startswith(path.name + ": cannot read: ")


# ---- legacy container ---------------------------------------------------------------------------------
def _legacy_obj(numel=4, view=None):
    st = FakeStorage("k1", torch.FloatStorage, numel, view=view, legacy=True)
    return dumps_with_storages({"w": TensorLike(st, 0, (2,), (1,))})


LEGACY_CASES = {
    "bad_magic": (lambda: legacy_bytes(_legacy_obj(), [("k1", 4, bytes(16))], magic_pickle=pickle.dumps(1, protocol=2)),
                  "magic"),
    "trailing_data": (lambda: legacy_bytes(_legacy_obj(), [("k1", 4, bytes(16))]) + b"payload", "unexpected bytes"),
    "truncated_data": (lambda: legacy_bytes(_legacy_obj(), [("k1", 4, bytes(12))]), "ends inside"),
    "count_mismatch": (lambda: legacy_bytes(_legacy_obj(), [("k1", 3, bytes(16))]), "holds 3 elements"),
    "unknown_key": (lambda: legacy_bytes(_legacy_obj(), [("k1", 4, bytes(16))],
                                         keys_pickle=pickle.dumps(["k1", "k2"], protocol=2)), "never used"),
    "missing_key": (lambda: legacy_bytes(_legacy_obj(), [], keys_pickle=pickle.dumps([], protocol=2)), "no data for"),
    "big_endian": (lambda: legacy_bytes(_legacy_obj(), [("k1", 4, bytes(16))], sys_info=pickle.dumps(
        {"protocol_version": 1001, "little_endian": False}, protocol=2)), "big-endian"),
    "view_past_storage": (lambda: legacy_bytes(_legacy_obj(view=("v", 3, 4)), [("k1", 4, bytes(16))]), "view runs past"),
    "module_source": (lambda: legacy_bytes(_module_pid(), []), "nn.Module"),
}


def _module_pid() -> bytes:
    class Mod:
        pass

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "x", "source", "file") if isinstance(obj, Mod) else None

    import io

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"m": Mod()})
    return buf.getvalue()


@pytest.mark.parametrize("case", sorted(LEGACY_CASES))
def test_legacy_refusals(tmp_path, case):
    build, expected = LEGACY_CASES[case]
    path = tmp_path / "old.pt"
    path.write_bytes(build())
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert expected in str(e.value), str(e.value)


def test_legacy_storage_views_load(tmp_path):
    """Old torch wrote views of a storage as ('storage', type, root, loc, numel, (view_key, offset, size))."""
    root = FakeStorage("k1", torch.FloatStorage, 6, legacy=True)
    view = FakeStorage("k1", torch.FloatStorage, 6, view=("v1", 2, 3), legacy=True)
    obj = dumps_with_storages({"a": TensorLike(root, 0, (6,), (1,)), "b": TensorLike(view, 1, (2,), (1,))})
    path = tmp_path / "views.pt"
    path.write_bytes(legacy_bytes(obj, [("k1", 6, torch.arange(6.0).numpy().tobytes())]))
    sd = load_checkpoint(path)
    assert sd["a"].tolist() == [0, 1, 2, 3, 4, 5] and sd["b"].tolist() == [3, 4]


def test_tar_format_refused(tmp_path):
    path = tmp_path / "ancient.pt"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("pickle")
        data = pickle.dumps({}, protocol=2)
        info.size = len(data)
        tf.addfile(info, __import__("io").BytesIO(data))
    with pytest.raises(UnsafeFileError, match="tar-based"):
        load_checkpoint(path)


def test_unknown_and_safetensors_inputs(tmp_path):
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(CorruptFileError, match="not a torch file"):
        load_checkpoint(tmp_path / "text.ckpt")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "st.ckpt"))
    with pytest.raises(UnsafeFileError, match="safetensors"):
        load_checkpoint(tmp_path / "st.ckpt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_torch_load_is_never_called(tmp_path, monkeypatch):
    """The loader must not reach torch.load (not even with weights_only) for any input."""
    def boom(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(torch.serialization, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    legacy = tmp_path / "ok_legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert load_state_dict(path)["w"].tolist() == [1, 1]
    assert load_checkpoint(legacy)["w"].tolist() == [1, 1]
    assert safe_pickle.__name__  # imported modules hold no reference to torch.load either
    import inspect
    import lib_sdtrain.formats.archive as archive_mod
    import lib_sdtrain.formats.unpickler as unpickler_mod

    for mod in (archive_mod, unpickler_mod, safe_pickle):
        src = inspect.getsource(mod)
        assert "torch.load(" not in src and "pickle.load" not in src and "Unpickler(" not in src
