"""The `.pt` writer (formats/a1111.py): torch's bytes, minus the zip members A1111 v1.10.1 refuses.

- Each golden file (written by A1111's own code through torch 2.13's torch.save), read and written again,
  gives a data.pkl and storage records byte-identical to torch's, so the pickle is what torch writes.
- The golden files fail A1111 v1.10.1's zip-name check (`.format_version`, `.storage_alignment`); ours pass
  it, the stricter pre-1.7 check, the restricted unpickler, torch.load(weights_only=True) (also with mmap,
  which needs the 64-byte alignment) and our own safe unpickler.
"""

import json
import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch
from a1111_ti_hn import A1111_ZIP_NAMES_BEFORE_1_7, a1111_check_pt
from conftest import GOLDEN

from lib_sdtrain.formats.safe_pickle import load_checkpoint
from lib_sdtrain.errors import UserError
from lib_sdtrain.formats.a1111 import (
    embedding_pt_layout,
    hypernetwork_layout,
    parse_dropout_structure,
    parse_layer_structure,
    torch_pt_bytes,
    write_torch_pt,
)

FORMATS = GOLDEN / "a1111_formats"
PT_FILES = ["ti_sd1_2vec.pt", "ti_sd1_2vec_trained.pt", "ti_created_tiny_2vec.pt", "ti_sdxl_2vec.pt",
            "hn_tiny_121.pt"]


def same_tree(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.requires_grad == b.requires_grad \
            and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_tree(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name", PT_FILES)
def test_golden_files_rewritten_byte_for_byte(tmp_path, name):
    desc = json.loads((FORMATS / f"{name}.json").read_text())
    obj = torch.load(FORMATS / name, weights_only=True)
    prefix = desc["torch_save"]["archive_prefix"]
    path = tmp_path / name
    path.write_bytes(torch_pt_bytes(obj, prefix))
    with zipfile.ZipFile(FORMATS / name) as zg, zipfile.ZipFile(path) as zo:
        storages = [n for n in zg.namelist() if n.startswith(f"{prefix}/data/")]
        assert zo.namelist() == [f"{prefix}/data.pkl", *storages, f"{prefix}/version"]
        assert zo.read(f"{prefix}/data.pkl") == zg.read(f"{prefix}/data.pkl")
        assert all(zo.read(n) == zg.read(n) for n in storages)
        assert zo.read(f"{prefix}/version") == zg.read(f"{prefix}/version") == b"3\n"
    # the golden file is refused by A1111 v1.10.1 (what the writer exists for); ours is accepted
    assert desc["torch_save"]["passes_stock_v1_10_1_zip_name_check"] is False
    with pytest.raises(Exception, match="bad file inside"):
        a1111_check_pt(FORMATS / name)
    a1111_check_pt(path)
    a1111_check_pt(path, A1111_ZIP_NAMES_BEFORE_1_7)
    assert same_tree(torch.load(path, weights_only=True), obj)


def test_written_file_loads_everywhere(tmp_path):
    vec = torch.randn(3, 32)
    obj = embedding_pt_layout(vec, name="zwx", step=7, sd_checkpoint="0123456789", sd_checkpoint_name="tiny")
    path = write_torch_pt(tmp_path / "zwx.pt", obj)
    assert [p.name for p in tmp_path.iterdir()] == ["zwx.pt"]          # atomic: no temporary left behind
    a1111_check_pt(path)
    for loaded in (torch.load(path, weights_only=True), torch.load(path, weights_only=True, mmap=True),
                   load_checkpoint(path)):
        assert list(loaded) == ["string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                                "sd_checkpoint_name"]
        assert loaded["string_to_token"] == {"*": 265} and loaded["name"] == "zwx" and loaded["step"] == 7
        assert torch.equal(loaded["string_to_param"]["*"], vec)
        assert loaded["string_to_param"]["*"].requires_grad
    with zipfile.ZipFile(path) as z:
        assert z.namelist() == ["zwx/data.pkl", "zwx/data/0", "zwx/version"]
        for info in z.infolist():   # torch's writer aligns record data to 64 bytes (mmap loading relies on it)
            start = info.header_offset + 30 + len(info.filename.encode()) + _local_extra_len(path, info.header_offset)
            assert start % 64 == 0, info.filename
            assert info.compress_type == zipfile.ZIP_STORED


def _local_extra_len(path, offset):
    raw = path.read_bytes()[offset:offset + 30]
    return int.from_bytes(raw[28:30], "little")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int32, torch.uint8])
def test_dtypes_shapes_and_views(tmp_path, dtype):
    base = (torch.arange(24).reshape(4, 6) % 7).to(dtype)
    obj = {"t": base.t(), "scalar": base[1, 2].clone(), "empty": base[:0], "slice": base[1:3, 2:5],
           "nested": [(1, 2.5, None, True, "x")], "od": OrderedDict(a=base[0])}
    path = write_torch_pt(tmp_path / "d.pt", obj)
    a1111_check_pt(path)
    back = torch.load(path, weights_only=True)
    for key in ("t", "scalar", "empty", "slice"):
        assert back[key].dtype == dtype and torch.equal(back[key], obj[key]) and back[key].shape == obj[key].shape
    assert back["nested"] == [(1, 2.5, None, True, "x")] and type(back["od"]) is OrderedDict
    assert len(zipfile.ZipFile(path).namelist()) == 2 + 5   # one storage per tensor


@pytest.mark.parametrize("bad", [{"s": torch.Size([2])}, {"x": {1, 2}}, {"b": torch.zeros(2, dtype=torch.bool)},
                                 {(1, 2): 3}, {"f": torch.float32}])
def test_refuses_what_a1111_cannot_rebuild(tmp_path, bad):
    with pytest.raises((UserError, ValueError)):
        write_torch_pt(tmp_path / "bad.pt", bad)
    assert not list(tmp_path.iterdir())


def test_checker_refuses_forbidden_globals(tmp_path):
    # the re-implemented A1111 check must be able to fail on the pickle itself, not only on member names
    data = pickle.dumps({"x": print}, protocol=2)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", data)
        z.writestr("evil/version", "3\n")
    with pytest.raises(Exception, match="forbidden"):
        a1111_check_pt(path)


def test_hypernetwork_layout_matches_a1111_save_order():
    lin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4))
    layout = hypernetwork_layout({4: (lin.state_dict(), lin.state_dict())}, name="h", step=3,
                                 layer_structure=[1, 2, 1], activation_func="linear", is_layer_norm=False,
                                 weight_initialization="Normal", sd_checkpoint=None, sd_checkpoint_name=None,
                                 activate_output=False, use_dropout=True, dropout_structure=[0, 0.3, 0])
    golden = json.loads((FORMATS / "hn_tiny_121.pt.json").read_text())["unpickled_structure"]["items"]
    assert [k for k in layout if type(k) is str] == [k for k in golden if not k.startswith("<int")]
    assert type(layout[4]) is tuple and type(layout[4][0]) is OrderedDict
    assert layout[4][0]._metadata == lin.state_dict()._metadata
    assert layout["last_layer_dropout"] is True          # A1111: dropout_structure[-2] != 0


def test_structure_parsers_follow_a1111():
    assert parse_layer_structure("1, 2, 1") == [1.0, 2.0, 1.0]
    assert parse_layer_structure("1, 1.5, 2, 1") == [1.0, 1.5, 2.0, 1.0]
    # A1111 takes the last five too: NaN and inf crash later, 1e9 and 40 layers fill the memory, 0.001 gives a
    # layer with no units on a 320-wide attention
    for bad in ("2, 1", "1, 2", "1, x, 1", "1, 0, 1", "1, nan, 1", "1, inf, 1", "1, 1e9, 1", "1, 0.001, 1",
                "1, " + "2, " * 40 + "1"):
        with pytest.raises(UserError):
            parse_layer_structure(bad)
    s4 = [1, 2, 2, 1]
    assert parse_dropout_structure("", s4, False, True) == [0, 0, 0, 0]
    # A1111 parse_dropout_structure: [0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0] + [0]
    assert parse_dropout_structure("", s4, True, False) == [0, 0.3, 0, 0]
    assert parse_dropout_structure("", s4, True, True) == [0, 0.3, 0.3, 0]
    assert parse_dropout_structure("0, 0.1, 0.2, 0", s4, True, False) == [0, 0.1, 0.2, 0]
    for bad in ("0, 0.1, 0", "0.1, 0, 0, 0", "0, 1, 0, 0"):
        with pytest.raises(UserError):
            parse_dropout_structure(bad, s4, True, False)
