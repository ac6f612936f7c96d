"""The golden A1111 files read exactly as A1111 describes them; embeddings convert to files A1111 reads
(compared with A1111's own .safetensors samples); hypernetworks are scanned and refused with a reason."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import GOLDEN
from lib_sdtrain.convert import batch
from lib_sdtrain.convert.output import ConvertConfig
from lib_sdtrain.formats.safe_pickle import load_checkpoint
from lib_sdtrain.formats.unpickler import allowed_globals
from lib_sdtrain.formats import hashes

FORMATS = GOLDEN / "a1111_formats"
GOLDEN_PT = sorted(p.name for p in FORMATS.glob("*.pt"))


def _describe(obj) -> dict:
    """`obj` in the vocabulary of the golden .json `unpickled_structure`."""
    if isinstance(obj, torch.Tensor):
        return {"type": "torch.Tensor", "shape": list(obj.shape), "dtype": str(obj.dtype),
                "requires_grad": obj.requires_grad}
    if isinstance(obj, dict):
        name = "collections.OrderedDict" if type(obj).__name__ == "OrderedDict" else "dict"
        items = {(f"<int {k}>" if isinstance(k, int) else k): _describe(v) for k, v in obj.items()}
        return {"type": name, "items": items, "key_types": sorted({type(k).__name__ for k in obj})}
    if isinstance(obj, (list, tuple)):
        return {"type": type(obj).__name__, "len": len(obj), "items": [_describe(v) for v in obj]}
    return {"type": type(obj).__name__, "value": obj}


def _same_structure(got: dict, want: dict, where: str = "") -> None:
    for key, value in want.items():
        if key == "items" and isinstance(value, dict):
            assert set(got["items"]) == set(value), where
            for k in value:
                _same_structure(got["items"][k], value[k], f"{where}/{k}")
        elif key == "items":
            for i, (g, w) in enumerate(zip(got["items"], value)):
                _same_structure(g, w, f"{where}[{i}]")
        else:
            assert got.get(key) == value, f"{where}: {key} {got.get(key)!r} != {value!r}"


@pytest.mark.parametrize("name", GOLDEN_PT)
def test_golden_pt_files_read_as_a1111_describes(name):
    desc = json.loads((FORMATS / f"{name}.json").read_text())
    for dotted in desc["torch_save"]["pickle_globals"]:
        module, _, attr = dotted.rpartition(".")
        assert (module, attr) in allowed_globals()
    assert hashes.sha256_file(FORMATS / name) == desc["sha256"]
    _same_structure(_describe(load_checkpoint(FORMATS / name)), desc["unpickled_structure"])


def _a1111_reads(data: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(vectors, width) by the branches of A1111's create_embedding_from_data for a .safetensors dict."""
    if "clip_g" in data and "clip_l" in data:
        return data["clip_g"].shape[0], data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
    assert len(data) == 1, "A1111: embedding file has multiple terms in it"
    emb = next(iter(data.values()))
    if emb.dim() == 1:
        emb = emb.unsqueeze(0)
    return emb.shape[0], emb.shape[-1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    results = batch.convert_all([FORMATS], out, ConvertConfig())
    return {r.source.name: r for r in results}


@pytest.mark.parametrize("name", [n for n in GOLDEN_PT if n.startswith("ti_")])
def test_embeddings_convert_to_what_a1111_reads(converted, name):
    r = converted[name]
    assert r.status == "converted" and r.kind == "embedding", r.message
    assert r.output.name == name.replace(".pt", ".safetensors")  # A1111 names an embedding by its file stem
    data = load_file(str(r.output))
    expect = json.loads((FORMATS / f"{name}.json").read_text())["a1111_create_embedding_from_data"]
    assert _a1111_reads(data) == (expect["vectors"], expect["shape"])
    assert r.hashes["shorthash"] == hashes.sha256_file(r.output)[:12]


@pytest.mark.parametrize("pt,st", [("ti_sd1_2vec.pt", "ti_sd1_2vec.safetensors"), ("ti_sdxl_2vec.pt", "ti_sdxl_2vec.safetensors")])
def test_embedding_matches_a1111s_own_safetensors(converted, pt, st):
    ours, theirs = load_file(str(converted[pt].output)), load_file(str(FORMATS / st))
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k])
    # same tensor bytes in the same layout: the data hash (after the header) is identical, only metadata differs
    assert hashes.addnet_hash(converted[pt].output) == hashes.addnet_hash(FORMATS / st)


def test_embedding_metadata_from_training(converted):
    r = converted["ti_sd1_2vec_trained.pt"]
    with safe_open(str(r.output), "pt") as f:
        meta = f.metadata()
    assert meta["embedding_step"] == "100" and meta["embedding_sd_checkpoint"] == "1c1f14f34b"
    assert meta["embedding_sd_checkpoint_name"] == "tiny" and meta["embedding_name"] == "ti_sd1_2vec_trained"
    assert meta["converted_kind"] == "embedding" and meta["converted_from"] == "ti_sd1_2vec_trained.pt"
    assert json.loads(meta["embedding_string_to_token"]) == {"*": "265"}


def test_hypernetwork_is_scanned_and_refused(converted):
    r = converted["hn_tiny_121.pt"]
    assert r.status == "refused" and r.kind == "hypernetwork" and r.output is None
    assert "sizes 32, 64, 128" in r.message and "layer structure 1, 2, 1" in r.message
    assert "24 tensors" in r.message and "A1111 lists hypernetworks only as .pt" in r.message
    assert not (r.source.parent / "hn_tiny_121.safetensors").exists()


def test_old_parameterdict_embedding(tmp_path):
    """A1111 once saved string_to_param as an nn.ParameterDict (hence ParameterDict on its allow-list)."""
    vec = torch.randn(3, 768)
    path = tmp_path / "old.pt"
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)}), "name": "old",
                "string_to_token": {"*": 265}, "step": 5}, path)
    (r,) = batch.convert_all([path], tmp_path / "out", ConvertConfig(dtype="fp16"))
    assert r.kind == "embedding", r.message
    data = load_file(str(r.output))
    assert list(data) == ["emb_params"] and torch.equal(data["emb_params"], vec.half())


def test_sdxl_string_to_param_pair_and_learned_embeds(tmp_path):
    pair = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    torch.save({"string_to_param": {"*": pair}, "name": "x"}, tmp_path / "pair.pt")
    torch.save({"<cat-toy>": torch.randn(768)}, tmp_path / "learned_embeds.bin")  # diffusers textual inversion
    r1, r2 = batch.convert_all([tmp_path / "pair.pt", tmp_path / "learned_embeds.bin"], tmp_path / "out", ConvertConfig())
    assert set(load_file(str(r1.output))) == {"clip_l", "clip_g"}
    assert r2.kind == "embedding" and _a1111_reads(load_file(str(r2.output))) == (1, 768)
    with safe_open(str(r2.output), "pt") as f:
        assert f.metadata()["embedding_key"] == "<cat-toy>"
    # A1111 calls it by its file name (live, session 22: "learned_embeds"), which the result says
    assert any("'<cat-toy>'" in w and "'learned_embeds'" in w and "rename" in w for w in r2.warnings), r2.warnings
    assert not r1.warnings


def test_a_pt_holding_only_emb_params_is_an_embedding(tmp_path):
    # kohya's embedding saved with torch.save ({"emb_params": [n, width]}) was converted as a "checkpoint": the
    # checkpoint hashes (10-hex short hash, legacy model hash) instead of the 12-hex one A1111 shows for it
    vec = torch.randn(2, 768)
    torch.save({"emb_params": vec}, tmp_path / "kohya.pt")
    torch.save({"weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "conv.pt")   # one tensor, not vectors
    r, conv = batch.convert_all([tmp_path / "kohya.pt", tmp_path / "conv.pt"], tmp_path / "out", ConvertConfig())
    assert (r.status, r.kind) == ("converted", "embedding"), r.message
    assert "embedding, 2 vectors of width 768" in r.message and not r.dropped
    data = load_file(str(r.output))
    assert list(data) == ["emb_params"] and torch.equal(data["emb_params"], vec)
    with safe_open(str(r.output), "pt") as f:
        assert f.metadata()["converted_kind"] == "embedding" and "embedding_key" not in f.metadata()
    assert len(r.hashes["shorthash"]) == 12 and "model_hash" not in r.hashes
    assert conv.kind == "checkpoint"


@pytest.mark.parametrize("obj,why", [
    ({"string_to_param": {"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}}, "2 terms"),
    ({"string_to_param": {"*": "not a tensor"}}, "not a floating-point"),
    ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1024)}, "expected [vectors, 1280]"),
    ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, "different numbers of vectors"),
], ids=["two_terms", "not_tensor", "wrong_width", "vector_counts"])
def test_embeddings_a1111_would_not_load_are_refused(tmp_path, obj, why):
    torch.save(obj, tmp_path / "e.pt")
    (r,) = batch.convert_all([tmp_path / "e.pt"], tmp_path / "out", ConvertConfig())
    assert r.status == "refused" and why in r.message, r.message


def test_the_next_conversion_removes_only_its_own_stale_temporary_files(tmp_path, capsys):
    """A killed conversion leaves `.NAME.xxxxxxxx.tmp` (atomic_write) or a half-written diffusers folder beside
    its outputs; the next conversion to those outputs removes them, and nothing that is not provably its own."""
    from lib_sdtrain.cli import main
    from lib_sdtrain.convert.report import clean_stale_outputs

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b"):
        torch.save({"string_to_param": {"*": torch.randn(2, 768)}, "name": name, "string_to_token": {"*": 265}},
                   src / f"{name}.pt")
    out = tmp_path / "out"
    out.mkdir()
    ours = [out / ".a.safetensors.ab12cd34.tmp", out / ".b.safetensors.x_9y8z7w.tmp"]
    theirs = [out / ".other.safetensors.ab12cd34.tmp",   # another output's: this conversion does not write it
              out / ".a.safetensors.tmp", out / "a.safetensors.ab12cd34.tmp", out / "notes.tmp",
              out / ".a.safetensors.ab12cd3.tmp"]       # not tempfile's 8 characters
    for p in ours + theirs:
        p.write_bytes(b"partial")
    not_ours_folder = out / ".a.safetensors.qwer1234.tmp"       # a folder by that name holding the user's file
    not_ours_folder.mkdir()
    (not_ours_folder / "photo.png").write_bytes(b"x")
    assert main(["convert", str(src), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "removed 2 temporary file(s) an interrupted conversion left behind" in printed, printed
    assert not [p for p in ours if p.exists()] and all(p.exists() for p in theirs)
    assert (not_ours_folder / "photo.png").exists()
    assert (out / "a.safetensors").is_file() and (out / "b.safetensors").is_file()

    # a diffusers folder written aside: removed only when it holds nothing but what file_to_folder writes
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"not read: only the planned output name matters")
    partial, foreign, kept_aside = (out / ".model.abcd1234.tmp", out / ".model.efgh5678.tmp",
                                    out / ".model.ijkl9012.old")
    for folder in (partial / "unet", foreign, kept_aside / "model"):
        folder.mkdir(parents=True)
    (partial / "model_index.json").write_text("{}")
    (foreign / "unet").mkdir()
    (foreign / "my-notes.txt").write_text("mine")
    assert clean_stale_outputs([ckpt], out, to="diffusers") == [partial]
    assert foreign.is_dir() and kept_aside.is_dir() and not partial.exists()


def test_an_embedding_of_no_vectors_is_refused_and_nan_vectors_are_told(tmp_path):
    # both were converted without a word
    torch.save({"string_to_param": {"*": torch.zeros(0, 768)}, "name": "z"}, tmp_path / "zero.pt")
    torch.save({"string_to_param": {"*": torch.full((2, 768), float("nan"))}, "name": "n"}, tmp_path / "nan.pt")
    torch.save({"string_to_param": {"*": torch.ones(2, 768)}, "name": "ok"}, tmp_path / "ok.pt")
    results = {r.source.name: r for r in batch.convert_all([tmp_path], tmp_path / "out", ConvertConfig())}
    assert results["zero.pt"].status == "refused" and "0 vectors" in results["zero.pt"].message
    assert not (tmp_path / "out" / "zero.safetensors").exists()
    assert results["nan.pt"].status == "converted" and any("NaN" in w for w in results["nan.pt"].warnings)
    assert results["ok.pt"].status == "converted" and not results["ok.pt"].warnings


def test_the_result_names_the_model_family_an_embedding_fits_and_warns_when_none_does(tmp_path):
    """A converted embedding said only "vectors of width 768"; a user had to know which models take which width,
    and a file no text encoder takes (a damaged one, or one from another model kind) converted without a word.
    The result now names the family (768: SD1.x, 1024: SD2.x, clip_l 768 + clip_g 1280: SDXL) and warns when no
    Stable Diffusion text encoder takes the vectors (A1111 then skips the file); an SDXL pair of the wrong widths
    was and is refused."""
    files = {"sd1": {"emb_params": torch.randn(2, 768)}, "sd2": {"emb_params": torch.randn(1, 1024)},
             "odd": {"emb_params": torch.randn(3, 512)},
             "xl": {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)},
             "xlbad": {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1024)}}
    for name, tensors in files.items():
        torch.save(tensors, tmp_path / f"{name}.pt")
    results = batch.convert_all([tmp_path / f"{n}.pt" for n in files], tmp_path / "out", ConvertConfig())
    got = {r.source.stem: r for r in results}
    assert got.pop("xlbad").status == "refused"
    assert all(r.status == "converted" and r.kind == "embedding" for r in got.values()), [r.message for r in results]
    assert "(for SD1.x models)" in got["sd1"].message and not got["sd1"].warnings
    assert "1 vector of width 1024 (for SD2.x models)" in got["sd2"].message and not got["sd2"].warnings
    assert "(for SDXL models)" in got["xl"].message and not got["xl"].warnings
    assert "for " not in got["odd"].message
    assert any("512 wide" in w and "A1111 will skip it" in w for w in got["odd"].warnings), got["odd"].warnings
