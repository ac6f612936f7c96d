"""Textual inversion on tiny SD1, SD2-v and SDXL models: A1111's init rule, its file formats, its splice.

- `init_vectors` follows A1111's create_embedding (truncated ids for the CLIP wrapper, all ids for OpenCLIP).
- A run through `train()` writes TOKEN.pt / TOKEN.safetensors whose structure is the golden one written by
  A1111's own code (keys, types, dtypes, requires_grad; shapes [N, D] of the tiny encoders) and that passes
  A1111 v1.10.1's safe-loading check.
- The file read back the A1111 way (`create_embedding_from_data`) and spliced at the word's positions by an
  independent re-implementation gives the same UNet output as the trained model.
- `detach` leaves the model bit-identical and the word unknown again.
"""

import json
from pathlib import Path

import pytest
import torch
from a1111_ti_hn import (
    a1111_check_pt,
    a1111_embedding_vectors,
    a1111_load,
    describe,
    skeleton,
)
from conftest import GOLDEN, load_tiny, write_pictures
from safetensors import safe_open

from lib_sdtrain.errors import UserError
from lib_sdtrain.hosts import TextConditioning
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.methods.embedding import (
    EmbeddingMethod,
    EmbeddingSettings,
    init_vectors,
)
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings

FORMATS = GOLDEN / "a1111_formats"
TOKEN = "zwxtok"
FAMILIES = ["sd1", "sd2", "sdxl"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pictures(tmp_path_factory.mktemp("data") / "2_zwx", 4,
                          captions=f"a photo of {TOKEN}, red square {{i}}").parent


def run_cfg(tmp_path, tiny_checkpoints, dataset, family, **embedding):
    return TrainSettings.from_dict({
        "method": "embedding", "model": str(tiny_checkpoints[family]), "data": str(dataset),
        "output": str(tmp_path / "out"), "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2,
        "max_steps": 3, "learning_rate": 0.02, "tensorboard": False, "cache_latents": True,
        "embedding": {"token": TOKEN, "vectors": 2, "init_text": "cat", **embedding}})


# ---- A1111's create rule ------------------------------------------------------------------------------
def test_init_vectors_follow_a1111_create_embedding():
    table = torch.arange(10.0)[:, None].repeat(1, 3)      # row i = [i, i, i]
    rows = lambda v: v[:, 0].tolist()
    assert rows(init_vectors(table, [7], 3, truncate=True)) == [7, 7, 7]            # short text repeated
    assert rows(init_vectors(table, [1, 2, 3, 4], 2, truncate=True)) == [1, 2]      # CLIP: max_length = N
    assert rows(init_vectors(table, [1, 2, 3, 4], 2, truncate=False)) == [1, 3]     # OpenCLIP: i*k//N of all
    assert rows(init_vectors(table, [1, 2], 5, truncate=False)) == [1, 1, 1, 2, 2]
    assert rows(init_vectors(table, [], 2, truncate=True)) == [0, 0]                 # no init text: zeros


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_starts_from_the_init_text_rows(tiny_checkpoints, family):
    parts = load_tiny(tiny_checkpoints, family)
    method = EmbeddingMethod(EmbeddingSettings(token=TOKEN, init_text="cat dog bird fish", vectors=2))
    method.attach(parts, text_encoder_lr=1e-3)
    try:
        for vec, table, tok in zip(method.vectors(), parts.token_embeddings(), parts.tokenizers):
            ids = tok.encode("cat dog bird fish")
            pick = [ids[0], ids[1]] if family != "sd2" else [ids[0], ids[2]]
            assert torch.equal(vec, table.weight[pick].detach())
    finally:
        method.detach()


# ---- end to end: train() writes A1111's files -------------------------------------------------------
@pytest.mark.parametrize("family,fmt", [("sd1", "pt"), ("sd1", "safetensors"), ("sd2", "pt"), ("sdxl", "pt"),
                                        ("sdxl", "safetensors")])
def test_train_writes_the_golden_format(tmp_path, tiny_checkpoints, dataset, family, fmt):
    cfg = run_cfg(tmp_path, tiny_checkpoints, dataset, family, save_format=fmt)
    assert cfg.name == TOKEN                                     # the file name is the token
    result = train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs"))
    assert result.stopped == "" and result.final.name == f"{TOKEN}.{fmt}" and result.steps == 3
    parts = load_tiny(tiny_checkpoints, family)
    widths = [t.weight.shape[1] for t in parts.token_embeddings()]
    init = [init_vectors(t.weight, tok.encode("cat"), 2, truncate=family != "sd2")
            for t, tok in zip(parts.token_embeddings(), parts.tokenizers)]
    if fmt == "pt":
        a1111_check_pt(result.final)
        data = torch.load(result.final, weights_only=True)
        golden_name = "ti_sdxl_2vec.pt.json" if family == "sdxl" else "ti_sd1_2vec_trained.pt.json"
        golden = json.loads((FORMATS / golden_name).read_text())["unpickled_structure"]
        assert skeleton(describe(data)) == skeleton(golden)
        if family != "sdxl":
            assert data["name"] == TOKEN and data["step"] == 3 and data["string_to_token"] == {"*": 265}
            assert data["sd_checkpoint"] == parts.info.fill_hashes().sha256[:10]
            assert data["sd_checkpoint_name"] == f"tiny-{family}"
    else:
        golden_name = "ti_sdxl_2vec.safetensors.json" if family == "sdxl" else "ti_sd1_2vec.safetensors.json"
        golden = json.loads((FORMATS / golden_name).read_text())["safetensors_header"]
        with safe_open(str(result.final), "pt") as f:
            meta = f.metadata()
            header = {k: (f.get_slice(k).get_dtype(), len(f.get_slice(k).get_shape())) for k in f.keys()}
        assert header == {k: (v["dtype"], len(v["shape"])) for k, v in golden.items()}
        assert meta["lab.token"] == TOKEN and meta["ss_steps"] == "3" and meta["lab.vectors"] == "2"
        assert json.loads(meta["lab.embedding"])["init_text"] == "cat"
        data = a1111_load(result.final)
    got = a1111_embedding_vectors(data)
    assert got["vectors"] == 2 and got["shape"] == sum(widths)
    vecs = [got["vec"]] if family != "sdxl" else [got["vec"]["clip_l"], got["vec"]["clip_g"]]
    assert [tuple(v.shape) for v in vecs] == [(2, w) for w in widths]
    assert all(not torch.equal(v, i) for v, i in zip(vecs, init))   # trained away from the init text


def test_a_users_embedding_of_the_same_word_in_another_format_is_never_shadowed(tmp_path, tiny_checkpoints, dataset):
    cfg = run_cfg(tmp_path, tiny_checkpoints, dataset, "sd1", save_format="safetensors")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{TOKEN}.pt").write_bytes(b"the user's own embedding")   # A1111 would see one word, two files
    with pytest.raises(UserError, match="is taken"):
        train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs"))
    assert (out / f"{TOKEN}.pt").read_bytes() == b"the user's own embedding"
    assert not (out / f"{TOKEN}.safetensors").exists()
    (out / "old").mkdir()
    (out / f"{TOKEN}.pt").rename(out / "old" / f"{TOKEN}.pt")
    with pytest.raises(UserError, match="is taken"):          # a subfolder holds the same word for A1111 too
        train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs"))


def test_captions_without_the_token_are_refused(tmp_path, tiny_checkpoints, dataset, monkeypatch):
    cfg = run_cfg(tmp_path, tiny_checkpoints, dataset, "sd1").replace(max_steps=1)
    cfg.embedding.token = "qqvx"
    cfg = TrainSettings.from_dict({**cfg.to_dict(), "name": "qqvx"})
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")
    with pytest.raises(UserError, match="none of the 4 captions contains the token 'qqvx'"):   # before any step
        train(cfg, host)
    # the loop's own guard, should the text check ever pass where the tokenizer finds no match
    monkeypatch.setattr("lib_sdtrain.train.preflight.contains_word", lambda text, word: True)
    with pytest.raises(UserError, match="no training caption contained the token"):
        train(cfg, host)
    assert not (tmp_path / "out" / "qqvx.safetensors").exists()


def test_a_token_only_in_held_out_captions_is_refused_before_any_step(tmp_path, tiny_checkpoints, monkeypatch):
    """validation_split can hold out every picture whose caption has the token: the run had trained to its end
    and then refused to save ("no training caption contained the token"), its time lost."""
    import random

    folder = tmp_path / "data" / "1_zwx"
    names = sorted(f"{i}.png" for i in range(4))
    held = set(random.Random("validation:42:1_zwx").sample(names, 2))   # validation.split_validation's draw
    write_pictures(folder, 4, captions=[f"a photo of {TOKEN}" if n in held else "a photo of a cat" for n in names])
    cfg = TrainSettings.from_dict({**run_cfg(tmp_path, tiny_checkpoints, folder.parent, "sd1").to_dict(),
                                   "name": TOKEN, "validation_split": 0.5})
    monkeypatch.setattr(StandaloneHost, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=f"none of the 2 training captions contains the token '{TOKEN}' "
                                        "\\(validation_split holds out 2 pictures"):
        train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs"))


def test_embedding_files_of_no_vectors_or_uneven_sdxl_halves_are_refused_with_the_reason(tmp_path):
    """clip_l and clip_g of other vector counts (A1111 would splice the token's vectors out of step) and a file of
    0 vectors were described by `info` as embeddings and taken by start_from; a single tensor of another shape
    was called "a textual-inversion embedding, not a model checkpoint" by `info`."""
    from safetensors.torch import save_file

    from lib_sdtrain.commands.info import describe_any

    cases = {"uneven": ({"clip_l": torch.ones(2, 8), "clip_g": torch.ones(3, 16)},
                        "clip_l holds 2 vectors and clip_g 3"),
             "empty": ({"emb_params": torch.ones(0, 8)}, "holds no vector"),
             "cube": ({"emb_params": torch.ones(1, 2, 8)}, "not a \\[vectors, width\\] float tensor")}
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(UserError, match=message):
            describe_any(str(tmp_path / f"{name}.safetensors"))
    save_file({"clip_l": torch.ones(2, 8), "clip_g": torch.ones(2, 16), "extra": torch.ones(1)},
              str(tmp_path / "extra.safetensors"))      # A1111 uses clip_l and clip_g, nothing else
    assert describe_any(str(tmp_path / "extra.safetensors"))[0]["widths"] == [8, 16]


def test_output_name_and_token_are_one():
    base = {"method": "embedding", "data": "x"}
    assert TrainSettings.from_dict({**base, "embedding": {"token": "abc"}}).name == "abc"
    cfg = TrainSettings.from_dict({**base, "name": "mychar"})
    assert cfg.embedding.token == "mychar" and cfg.name == "mychar"
    assert TrainSettings.from_dict({**base, "name": "abc", "embedding": {"token": "abc"}}).name == "abc"
    assert TrainSettings.from_dict({**base, "name": "other", "embedding": {"token": "abc"}}).name == "abc"
    for bad in ("a(b)", "x:y", " lead", "a,b"):
        with pytest.raises(UserError):
            TrainSettings.from_dict({**base, "embedding": {"token": bad}})
    with pytest.raises(UserError):
        TrainSettings.from_dict({**base, "embedding": {"vectors": 0}})


# ---- A1111's splice reproduces the trained model ------------------------------------------------------
def a1111_conditioning(parts, words, vectors):
    """`"<words> TOKEN"` encoded the A1111 way: [start] + ids(words) + N rows of the vectors + [end] + pads, the
    rows overwritten in the token-embedding output; each family's layer; SDXL: both encoders concatenated."""
    family = parts.family
    contexts, pooled = [], None
    for i, (enc, tok, vec) in enumerate(zip(parts.text_encoders, parts.tokenizers, vectors)):
        words_ids = tok.encode(words)
        n = vec.shape[0]
        pad = 0 if family == "sd2" or i == 1 else 49407
        ids = [49406, *words_ids, *[0] * n, 49407]
        ids = torch.tensor([ids + [pad] * (77 - len(ids))])
        start = 1 + len(words_ids)

        def splice(_module, _args, out, start=start, vec=vec):
            out = out.clone()
            out[0, start:start + vec.shape[0]] = vec
            return out

        handle = enc.get_input_embeddings().register_forward_hook(splice)
        try:
            out = enc(input_ids=ids, output_hidden_states=True)
        finally:
            handle.remove()
        if family == "sd1":
            z = out.last_hidden_state
        elif family == "sd2":
            z = enc.text_model.final_layer_norm(out.hidden_states[-2])
        else:
            z = out.hidden_states[-2]
            pooled = out.text_embeds if i == 1 else pooled
        contexts.append(z)
    return TextConditioning(torch.cat(contexts, dim=2), pooled)


def model_snapshot(parts):
    roots = [parts.unet, *parts.text_encoders]
    return [({k: v.clone() for k, v in r.state_dict().items()}, {n: p.requires_grad for n, p in r.named_parameters()},
             {n: m.training for n, m in r.named_modules()}, [(n, type(m)) for n, m in r.named_modules()])
            for r in roots]


def assert_unchanged(parts, snap):
    for r, (state, grads, modes, classes) in zip([parts.unet, *parts.text_encoders], snap):
        now = r.state_dict()
        assert list(now) == list(state) and all(torch.equal(now[k], v) for k, v in state.items())
        assert {n: p.requires_grad for n, p in r.named_parameters()} == grads
        assert {n: m.training for n, m in r.named_modules()} == modes
        assert [(n, type(m)) for n, m in r.named_modules()] == classes


@pytest.mark.parametrize("family", FAMILIES)
def test_a1111_splice_reproduces_the_trained_model(tmp_path, tiny_checkpoints, family):
    parts = load_tiny(tiny_checkpoints, family)
    parts.unet.requires_grad_(True)        # a host that leaves its model trainable (A1111 does): restored after
    snap = model_snapshot(parts)
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([300, 700])
    prompt = f"a photo of {TOKEN}"
    with torch.no_grad():
        before = parts.predict(x, t, parts.encode_text([prompt, prompt]))

    method = EmbeddingMethod(EmbeddingSettings(token=TOKEN, init_text="red square", vectors=3))
    groups = method.attach(parts, text_encoder_lr=0.05)
    assert [p for g_ in groups for p in g_["params"]] and not any(
        p.requires_grad for r in [parts.unet, *parts.text_encoders] for p in r.parameters())
    opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.0)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(parts.predict(x, t, parts.encode_text([prompt, "a red square"])), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = parts.predict(x, t, parts.encode_text([prompt, prompt]))
    files = []
    for fmt in ("pt", "safetensors"):
        method.settings.save_format = fmt
        files.append(method.save(tmp_path / f"{TOKEN}{method.file_suffix}", {"ss_steps": "3"}))
    state = method.training_state()
    method.detach()

    assert_unchanged(parts, snap)
    assert not parts.prompt_encoder.embeddings and "encode_text" not in vars(parts)
    with torch.no_grad():
        assert torch.equal(parts.predict(x, t, parts.encode_text([prompt, prompt])), before)
    assert (trained - before).abs().max() > 1e-4                     # the word matters once trained
    for path in files:
        got = a1111_embedding_vectors(a1111_load(path))
        vec = got["vec"]
        vectors = [vec] if family != "sdxl" else [vec["clip_l"], vec["clip_g"]]
        assert [torch.equal(v, s) for v, s in zip(vectors, state.values())] == [True] * len(vectors)
        with torch.no_grad():
            cond = a1111_conditioning(parts, "a photo of", vectors)
            cond = TextConditioning(cond.context.repeat(2, 1, 1),
                                    None if cond.pooled is None else cond.pooled.repeat(2, 1))
            out = parts.predict(x, t, cond)
        assert torch.allclose(out, trained, atol=1e-5, rtol=0), (path.name, (out - trained).abs().max())
        # and our own loader (used to evaluate saved files) puts the same vectors back
        again = EmbeddingMethod(EmbeddingSettings(token=TOKEN, vectors=3))
        again.attach(parts)
        try:
            again.load_weights(path)
            with torch.no_grad():
                assert torch.equal(parts.predict(x, t, parts.encode_text([prompt, prompt])), trained)
        finally:
            again.detach()
    with pytest.raises(UserError, match="do not fit"):
        again = EmbeddingMethod(EmbeddingSettings(token=TOKEN, vectors=2))
        again.attach(parts)
        try:
            again.load_weights(files[0])
        finally:
            again.detach()


def test_training_state_round_trip(tiny_checkpoints):
    parts = load_tiny(tiny_checkpoints, "sdxl")
    method = EmbeddingMethod(EmbeddingSettings(token=TOKEN, vectors=2))
    method.attach(parts)
    try:
        state = {k: v + 1 for k, v in method.training_state().items()}
        method.load_training_state(state)
        assert all(torch.equal(a, b) for a, b in zip(method.training_state().values(), state.values()))
        with pytest.raises(UserError):
            method.load_training_state({"vectors.0": state["vectors.0"]})
    finally:
        method.detach()
        method.detach()   # safe twice
    assert not parts.prompt_encoder.embeddings
