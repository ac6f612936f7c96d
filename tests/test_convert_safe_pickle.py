"""What the safe loader accepts: everything torch.save writes for model files, cross-checked against
torch.load(weights_only=True) (used here as an independent second opinion, never by the loader)."""

from __future__ import annotations

import collections
import importlib

import numpy as np
import pytest
import torch

from lib_sdtrain.formats.safe_pickle import find_state_dict, load_checkpoint, load_state_dict, open_checkpoint
from lib_sdtrain.formats.unpickler import LazyTensor
from test_convert_support import Reduce, torch_zip_members, write_zip, zip_members_of


def _same(ours, theirs, where="") -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), where
        assert (ours.dtype, ours.shape, ours.stride(), ours.requires_grad) == \
               (theirs.dtype, theirs.shape, theirs.stride(), theirs.requires_grad), where
        a, b = ours.detach(), theirs.detach()
        if a.numel():
            assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)), where
    elif isinstance(theirs, np.ndarray):
        assert isinstance(ours, np.ndarray) and ours.dtype == theirs.dtype and np.array_equal(ours, theirs), where
    elif isinstance(theirs, dict):
        assert set(ours) == set(theirs), where
        for k in theirs:
            _same(ours[k], theirs[k], f"{where}/{k}")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (o, t) in enumerate(zip(ours, theirs)):
            _same(o, t, f"{where}[{i}]")
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def _everything() -> dict:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    sd = collections.OrderedDict()
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool):
        sd[str(dt)] = (torch.randn(3, 2, generator=g) * 50).to(dt)
    sd["view"] = base[1:3, 2:]
    sd["transposed"] = base.t()
    sd["base"] = base
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.empty(0, 3)
    sd["grad"] = torch.randn(2, generator=g).requires_grad_()
    sd["param"] = torch.nn.Parameter(torch.randn(2, generator=g))
    sd["frozen_param"] = torch.nn.Parameter(torch.randn(2, generator=g), requires_grad=False)
    sd["float8"] = torch.randn(4, generator=g).to(torch.float8_e4m3fn)   # _rebuild_tensor_v3 + UntypedStorage
    sd["uint16"] = torch.arange(4).to(torch.uint16)
    return {
        "state_dict": sd, "global_step": 3, "epoch": 1.5, "name": "x", "flag": True, "none": None,
        "size": torch.Size([1, 2]), "device": torch.device("cpu"), "dtype": torch.float16,
        "set": {1, 2}, "frozenset": frozenset({"a"}), "bytes": b"\x00\xff", "bytearray": bytearray(b"ab"),
        "np_scalar": np.float64(1.25), "np_int": np.int64(7), "np_array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "nested": [{"deep": (1, "two", [3.0])}], "int_keys": {32: "a", 64: "b"},
    }


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_everything_torch_save_writes_matches_torch_load(tmp_path, legacy):
    obj = _everything()
    if legacy:  # torch's own legacy loader cannot read UntypedStorage-backed dtypes back
        del obj["state_dict"]["float8"], obj["state_dict"]["uint16"]
    path = tmp_path / "all.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    ours = load_checkpoint(path)
    core = importlib.import_module("numpy._core.multiarray" if np.__version__ >= "2" else "numpy.core.multiarray")
    extra = [frozenset, bytearray, np.dtype, np.ndarray, core.scalar, core._reconstruct,
             *(type(np.dtype(t)) for t in (np.float64, np.int64, np.float32))]
    with torch.serialization.safe_globals(extra):  # torch's restricted loader, widened for the numpy values
        theirs = torch.load(path, weights_only=True)
    ours_sizes = ours.pop("size"), ours.pop("device"), ours.pop("dtype")
    theirs_sizes = theirs.pop("size"), theirs.pop("device"), theirs.pop("dtype")
    assert ours_sizes == (tuple(theirs_sizes[0]), "cpu", torch.float16)
    assert isinstance(ours["np_scalar"], float) and isinstance(ours["np_int"], int)  # numpy scalars become Python's
    ours["np_scalar"], ours["np_int"] = np.float64(ours["np_scalar"]), np.int64(ours["np_int"])
    _same(ours, theirs)
    # tensors that shared a storage in the file share memory after loading, as with torch.load
    sd = ours["state_dict"]
    assert sd["view"].untyped_storage().data_ptr() == sd["base"].untyped_storage().data_ptr()


def test_weights_only_agrees_on_plain_state_dicts(tmp_path):
    """torch's own restricted loader as a second layer: same tensors for an ordinary checkpoint."""
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"a": torch.randn(3, 3), "b": torch.arange(4)}, "global_step": 1}, path)
    _same(load_checkpoint(path), torch.load(path, weights_only=True))


def test_lazy_open_reads_no_tensor_data_until_asked(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"a": torch.ones(1000), "model_ema.a": torch.zeros(1000)}}, path)
    with open_checkpoint(path) as archive:
        sd = find_state_dict(archive.root)
        assert all(isinstance(v, LazyTensor) for v in sd.values())
        assert sd["a"].shape == (1000,) and sd["a"].dtype == torch.float32 and sd["a"].nbytes == 4000
        assert not archive._raw  # nothing read yet
        assert sd["a"].load().sum().item() == 1000
        assert len(archive._raw) == 1  # only the storage that was asked for


def test_load_state_dict_unwraps_twice_and_skips_non_tensors(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"state_dict": {"w": torch.ones(1), "n": 3, 5: torch.ones(1)}}}, path)
    assert list(load_state_dict(path)) == ["w"]


def test_big_endian_zip(tmp_path):
    """`byteorder` = big: storages are stored big-endian and must be swapped on load."""
    tensors = {"f": torch.randn(5), "h": torch.randn(3).half(), "i": torch.arange(4), "b": torch.tensor([True, False])}
    path = tmp_path / "le.pt"
    torch.save(tensors, path)
    members = zip_members_of(path)
    prefix = next(k for k in members if k.endswith("/data.pkl")).split("/")[0]
    for key, t in enumerate(tensors.values()):  # torch numbers storages in the order it meets them
        name = f"{prefix}/data/{key}"
        item = t.element_size()
        raw = np.frombuffer(members[name], dtype=np.uint8).reshape(-1, item)[:, ::-1]
        members[name] = raw.tobytes()
    members[f"{prefix}/byteorder"] = b"big"
    big = write_zip(tmp_path / "be.pt", members)
    loaded = load_checkpoint(big)
    _same(loaded, tensors)
    _same(loaded, torch.load(big, weights_only=True))


def test_device_tensor_from_numpy(tmp_path):
    """`_rebuild_device_tensor_from_numpy` (tensors of storage-less devices) is on A1111's list."""
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    obj = {"t": Reduce(torch._utils._rebuild_device_tensor_from_numpy, arr, torch.float16, "cpu", False)}
    import pickle

    path = write_zip(tmp_path / "np.pt", torch_zip_members(pickle.dumps(obj, protocol=2)))
    t = load_checkpoint(path)["t"]
    assert t.dtype == torch.float16 and t.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_deflated_members_are_read(tmp_path):
    """torch writes stored members, but a re-zipped (deflated) archive is still a valid torch file."""
    path = tmp_path / "m.pt"
    torch.save({"w": torch.arange(100.0)}, path)
    import zipfile

    re = write_zip(tmp_path / "deflated.pt", zip_members_of(path), compress=zipfile.ZIP_DEFLATED)
    assert torch.equal(load_checkpoint(re)["w"], torch.arange(100.0))
