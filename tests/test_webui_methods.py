"""Textual inversion, hypernetworks and full fine-tuning through WebUIHost on the fake A1111 (tests/fake_webui).

The fake's text side follows A1111 v1.10.1: transformers' CLIPTokenizer / open_clip's SimpleTokenizer behind the
hijack wrappers, the embedding DB (`ids_lookup`, `word_embeddings`, register/reload rules), prompt chunking with
textual-inversion placeholders and `EmbeddingsWithFixes`; its attention forwards run `shared.loaded_hypernetworks`
and the plain one records them on the layers (`hyper_k` / `hyper_v`). So these tests check that the methods
train through A1111's own machinery, write files A1111 loads, and give the WebUI back as it was.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fake_webui
from conftest import fail_on_batch, write_pictures

from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train.settings import TrainSettings

sys.path.remove(str(Path(__file__).resolve().parent))

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui-methods")
    with fake_webui.installed(root) as dirs:
        for fam in FAMILIES:
            make_tiny_checkpoint(dirs["checkpoint"] / f"tiny-{fam}.safetensors", fam)
        from modules import sd_models

        sd_models.list_models()
        import lib_sdtrain.hosts.webui as webui_mod

        yield {"dirs": dirs, "mod": webui_mod, "root": root}


@pytest.fixture
def clean(webui):
    """Default options; afterwards the lock must be free and no hypernetwork left loaded or attached."""
    from modules import call_queue, shared

    shared.opts.data["training_xattention_optimizations"] = False
    shared.state.begin("test")
    yield webui
    assert not call_queue.queue_lock.locked(), "the GPU lock was left taken"
    shared.loaded_hypernetworks.clear()
    model = shared.sd_model
    if model is not None:
        for m in model.modules():
            for attr in ("hyper_k", "hyper_v"):
                if attr in m._modules:
                    delattr(m, attr)


def load_family(fam):
    from modules import sd_models, shared

    current = sd_models.model_data.sd_model
    if current is None or not current.sd_model_checkpoint.endswith(f"tiny-{fam}.safetensors"):
        sd_models.load_model(sd_models.checkpoint_aliases[f"tiny-{fam}"])
    return shared.sd_model


def make_data(root: Path, token: str, n=2) -> Path:
    return write_pictures(root / f"data-{token}" / "2_toy", n, captions=f"{token} toy, red square").parent


def settings(root: Path, method: str, name: str, **extra) -> TrainSettings:
    return TrainSettings.from_dict({
        "method": method, "name": name, "data": str(make_data(root, name)), "resolution": 64, "min_bucket": 64,
        "max_bucket": 64, "batch_size": 1, "max_steps": 3, "learning_rate": 0.05, "save_every_n_epochs": 0,
        "save_state": False, "tensorboard": False, "sample_every_n_epochs": 0, **extra})


def standalone(model):
    from lib_sdtrain.hosts.standalone import StandaloneHost

    return StandaloneHost(device="cpu", dtype="fp32").load(model.sd_model_checkpoint)


# ---- snapshots of what the WebUI owns ---------------------------------------------------------------------
def db_state():
    from modules import sd_hijack

    db = sd_hijack.model_hijack.embedding_db
    return {"words": list(db.word_embeddings.items()),
            "ids": [(k, v, list(v)) for k, v in db.ids_lookup.items()],
            "skipped": list(db.skipped_embeddings.items())}


def assert_db_same(before):
    """Same names in the same order bound to the same objects; the same ids_lookup list objects and entries."""
    after = db_state()
    assert [k for k, _ in after["words"]] == [k for k, _ in before["words"]]
    assert all(a[1] is b[1] for a, b in zip(after["words"], before["words"]))
    assert [k for k, _, _ in after["ids"]] == [k for k, _, _ in before["ids"]]
    for (_, lst, items), (_, lst0, items0) in zip(after["ids"], before["ids"]):
        assert lst is lst0 and len(items) == len(items0)
        assert all(a[0] == b[0] and a[1] is b[1] for a, b in zip(items, items0))
    assert [(k, v) for k, v in after["skipped"]] == [(k, v) for k, v in before["skipped"]]


def model_state(model):
    import ldm.modules.attention
    from modules import shared

    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "modules": {n: m for n, m in model.named_modules()},
        "attention": ldm.modules.attention.CrossAttention.forward,
        "hypernetworks": (shared.loaded_hypernetworks, list(shared.loaded_hypernetworks)),
    }


def assert_model_same(before, model):
    from modules import shared

    after = model_state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    changed = [k for k, v in before["tensors"].items() if not torch.equal(v, after["tensors"][k])]
    assert not changed, changed[:5]
    assert after["grads"] == before["grads"] and after["modes"] == before["modes"]
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][n] is m for n, m in before["modules"].items())     # same objects, nothing wrapped
    assert after["attention"] is before["attention"]
    lst, items = before["hypernetworks"]
    assert shared.loaded_hypernetworks is lst and shared.loaded_hypernetworks == items


def registered_vec(name):
    from modules import sd_hijack

    emb = sd_hijack.model_hijack.embedding_db.word_embeddings.get(name)
    return None if emb is None else emb.vec


# ---- tokenizers ---------------------------------------------------------------------------------------------
TEXTS = ["a (red:1.3) square, zwx", "Café &amp; crème  brûlée!!", "x<|endoftext|>y <end_of_text> z", "", "don't 42"]


@pytest.mark.parametrize("fam", FAMILIES)
def test_tokenizers_are_a1111s_own_ids_without_start_and_end(clean, fam):
    from lib_sdtrain.models.tokenizer import make_tokenizers

    model = load_family(fam)
    host = clean["mod"].WebUIHost()
    parts = host.load()
    try:
        ours = make_tokenizers(fam)       # the standalone host's tokenizers, A1111-exact per family
        assert len(parts.tokenizers) == len(ours) == len(parts.text_encoders)
        for tok, ref in zip(parts.tokenizers, ours):
            for text in TEXTS:
                assert tok.encode(text) == ref.encode(text), (fam, text)
            assert (tok.start_id, tok.end_id, tok.pad_id, tok.comma_id) == \
                (ref.start_id, ref.end_id, ref.pad_id, ref.comma_id) == (49406, 49407, ref.pad_id, 267)
            assert tok.token_id(",</w>") == 267 and tok.token_id("cat</w>") == ref.token_id("cat</w>")
            assert tok.flavor == ref.flavor
        # what the raw host objects would have given: HF's encode adds start/end, OpenCLIP wrappers hold none
        wrapped = parts.text_wrappers[0].wrapped
        assert wrapped.tokenizer.encode("cat")[0] == 49406 if fam != "sd2" else not hasattr(wrapped, "tokenizer")
    finally:
        host.release(parts)
    _ = model


# ---- textual inversion --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", FAMILIES)
def test_embedding_splices_through_a1111_like_the_standalone_host(clean, fam):
    """Same init vectors as the standalone host; A1111's EmbeddingsWithFixes gives the standalone conditioning,
    carries gradients to the vectors, and the DB is exactly as before afterwards."""
    from modules import sd_hijack

    from lib_sdtrain.methods.embedding import EmbeddingMethod, EmbeddingSettings

    model = load_family(fam)
    db_before = db_state()
    host = clean["mod"].WebUIHost()
    parts = host.load()
    ref = standalone(model)
    s = EmbeddingSettings(token="tokinit", init_text="red square toy", vectors=3)   # 4 ids: SD2 spreads them
    web_m, ref_m = EmbeddingMethod(s), EmbeddingMethod(EmbeddingSettings(**s.to_dict()))
    try:
        web_m.attach(parts)
        ref_m.attach(ref)
        for a, b in zip(web_m.vectors(), ref_m.vectors()):
            assert a.shape == b.shape and torch.equal(a, b)
        vec = registered_vec("tokinit")
        params = web_m._params
        if fam == "sdxl":
            assert set(vec) == {"clip_l", "clip_g"} and vec["clip_l"] is params[0] and vec["clip_g"] is params[1]
        else:
            assert vec is params[0]
        emb = sd_hijack.model_hijack.embedding_db.word_embeddings["tokinit"]
        assert emb.vectors == 3 and emb.shape == sum(p.shape[1] for p in params) and emb.filename

        prompts = ["a tokinit toy, (tokinit:1.2) red", "plain red square"]
        cond = parts.encode_text(prompts)
        with torch.no_grad():
            cond_ref = ref.encode_text(prompts)
        assert torch.allclose(cond.context, cond_ref.context, atol=1e-5)
        if fam == "sdxl":
            assert torch.allclose(cond.pooled, cond_ref.pooled, atol=1e-5)
        cond.context.square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        with torch.no_grad():
            plain = parts.encode_text(prompts[1:]).context
            params[-1].add_(0.5)
            changed = parts.encode_text(prompts).context
            assert torch.equal(parts.encode_text(prompts[1:]).context, plain)     # prompts without the word
        assert not torch.allclose(changed[0], cond.context[0].detach())            # the word's vectors count
    finally:
        web_m.detach()
        ref_m.detach()
        host.release(parts)
    assert_db_same(db_before)


@pytest.mark.parametrize("fam", FAMILIES)
def test_embedding_run_writes_a1111s_folder_and_gives_the_webui_back(clean, fam, tmp_path):
    from modules import sd_hijack
    from safetensors.torch import load_file

    from lib_sdtrain.events import Events
    from lib_sdtrain.methods.embedding import (
        EmbeddingMethod,
        EmbeddingSettings,
        embedding_vectors,
    )
    from lib_sdtrain.train.loop import train

    model = load_family(fam)
    token = f"tok{fam}"
    before, db_before = model_state(model), db_state()
    events, seen = Events(), []

    def spy(event):
        if event.kind == "progress" and event.data.get("phase") != "cache":
            vec = registered_vec(token)
            tensors = list(vec.values()) if isinstance(vec, dict) else [vec]
            seen.append(all(isinstance(t, torch.nn.Parameter) and t.requires_grad for t in tensors))

    events.subscribe(spy)
    cfg = settings(tmp_path, "embedding", token, embedding={"vectors": 2, "init_text": "red square"})
    result = train(cfg, clean["mod"].WebUIHost(), events)
    assert result.stopped == "" and result.steps == 3 and all(np.isfinite(result.losses))
    assert seen == [True] * 3                        # A1111's DB held the trainable vectors at every step
    assert result.final == clean["dirs"]["embedding"] / f"{token}.safetensors" and result.final.is_file()

    saved = embedding_vectors(load_file(str(result.final)), result.final.name)
    ref = standalone(model)
    init = EmbeddingMethod(EmbeddingSettings(token=token, init_text="red square", vectors=2))
    init.attach(ref)
    try:
        start = init.vectors()
    finally:
        init.detach()
    assert all(not torch.allclose(a, b) for a, b in zip(saved, start))   # the vectors trained

    # A1111 rescanned its folder: the word is now the file's (not our parameter), everything else as before
    db = sd_hijack.model_hijack.embedding_db
    emb = db.word_embeddings[token]
    assert emb.filename == str(result.final) and emb.vectors == 2
    loaded = [emb.vec["clip_l"], emb.vec["clip_g"]] if fam == "sdxl" else [emb.vec]
    assert all(torch.equal(a, b) and not a.requires_grad for a, b in zip(loaded, saved))
    assert [k for k in db.word_embeddings if k != token] == [k for k, _ in db_before["words"] if k != token]
    assert_model_same(before, model)


def test_add_embedding_checks_its_input_and_release_cleans_up(clean):
    """Wrong shapes are refused clearly; a word registered over another one that shares its first token keeps
    that one when removed; `release()` takes out words a method left behind (the DB exactly as before)."""
    from modules import sd_hijack
    from modules.textual_inversion.textual_inversion import Embedding

    from lib_sdtrain.errors import UserError

    model = load_family("sd1")
    db = sd_hijack.model_hijack.embedding_db
    db_before = db_state()
    host = clean["mod"].WebUIHost()
    parts = host.load()
    width = parts.token_embeddings()[0].weight.shape[1]
    try:
        for bad in ([torch.zeros(2, width), torch.zeros(2, width)], [torch.zeros(2, width + 1)],
                    [torch.zeros(76, width)], [torch.zeros(width)]):
            with pytest.raises(UserError):
                parts.add_embedding("tokbad", bad)
        assert "tokbad" not in db.word_embeddings
        assert parts.tokenizers[0].encode("catzzq")[0] == parts.tokenizers[0].encode("catyyq")[0]
        mine = torch.nn.Parameter(torch.ones(2, width))
        parts.add_embedding("catzzq", [mine])
        other = Embedding(torch.zeros(1, width), "catyyq")
        other.vectors, other.shape = 1, width
        db.register_embedding(other, model)          # e.g. a Lora's bundled embedding, registered meanwhile
        parts.remove_embedding("catzzq")
        assert "catzzq" not in db.word_embeddings and db.word_embeddings["catyyq"] is other
        first = parts.tokenizers[0].encode("catyyq")[0]
        assert [e for _, e in db.ids_lookup[first]] == [other]
        db.register_embedding_by_name(None, model, "catyyq")
        assert_db_same(db_before)
        parts.add_embedding("tokleft", [mine])       # a method that never removed its word
    finally:
        host.release(parts)
    assert_db_same(db_before)


def _user_embedding(dirs, model, name):
    """An embedding file the user already has (A1111's .pt layout), loaded as A1111 loads its folder."""
    from modules import sd_hijack

    from lib_sdtrain.formats.a1111 import embedding_pt_layout, write_torch_pt

    width = model.cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight.shape[1]
    write_torch_pt(dirs["embedding"] / f"{name}.pt", embedding_pt_layout(torch.full((1, width), 0.25), name=name))
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    return sd_hijack.model_hijack.embedding_db.word_embeddings[name]


def test_stopped_failed_and_refreshed_runs_restore_the_users_embedding(clean, tmp_path, monkeypatch):
    """The user's embedding of the same name is shadowed while training and comes back exactly; a Refresh of
    A1111's embedding list in the middle of a run does not stop the vectors from training."""
    from modules import sd_hijack

    from lib_sdtrain.events import Events, StopToken
    from lib_sdtrain.train import loop

    model = load_family("sd1")
    token = "tokshadow"
    users = _user_embedding(clean["dirs"], model, token)
    db = sd_hijack.model_hijack.embedding_db
    cfg = settings(tmp_path, "embedding", token, max_steps=6, embedding={"vectors": 1, "init_text": "toy"})
    # a file of the same word is refused unless replacing was allowed (test_embedding.py); here it was
    cfg = TrainSettings.from_dict({**cfg.to_dict(), "overwrite": True})
    host = clean["mod"].WebUIHost()

    # stopped (the Interrupt button) at step 2
    before, db_before = model_state(model), db_state()
    events, stop, seen = Events(), StopToken(), []

    def stop_at_two(event):
        if event.kind == "progress" and event.data.get("phase") != "cache":
            emb = db.word_embeddings[token]
            seen.append(emb is not users and isinstance(emb.vec, torch.nn.Parameter))
            if event.data["step"] == 2:
                stop.request("test")

    events.subscribe(stop_at_two)
    result = loop.train(cfg, host, events, stop)
    assert result.stopped == "stopped" and seen == [True, True]
    assert db.word_embeddings[token] is users
    assert_db_same(db_before)
    assert_model_same(before, model)

    # failed on the second batch
    real = fail_on_batch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated"):
        loop.train(TrainSettings.from_dict({**cfg.to_dict(), "overwrite": True}), host)
    monkeypatch.setattr(loop, "train_batch", real)
    assert_db_same(db_before)
    assert_model_same(before, model)

    # A1111's Refresh (a forced reload of the DB) at step 1: the word is registered again for step 2 and the
    # vectors keep receiving gradients; afterwards the reloaded DB stays, without our vectors
    events, stop, grads = Events(), StopToken(), []
    spy_real = loop.train_batch

    def spy_batch(cfg_, parts, method, *a, **k):
        out = spy_real(cfg_, parts, method, *a, **k)
        grads.append(float(method._params[0].grad.abs().sum()))
        return out

    wiped = []     # (listeners' exceptions are swallowed by Events: record, check afterwards)

    def refresh_then_stop(event):
        if event.kind == "progress" and event.data.get("phase") != "cache":
            if event.data["step"] == 1:
                db.load_textual_inversion_embeddings(force_reload=True)
                wiped.append(not isinstance(db.word_embeddings[token].vec, torch.nn.Parameter))
            if event.data["step"] == 3:
                stop.request("test")

    monkeypatch.setattr(loop, "train_batch", spy_batch)
    events.subscribe(refresh_then_stop)
    result = loop.train(TrainSettings.from_dict({**cfg.to_dict(), "overwrite": True}), host, events, stop)
    assert result.stopped == "stopped" and wiped == [True] and len(grads) == 3 and all(g > 0 for g in grads)
    reloaded = db.word_embeddings[token]
    assert reloaded is not users and reloaded.filename == users.filename and torch.equal(reloaded.vec, users.vec)
    assert [k for k in db.word_embeddings] == [k for k, _ in db_before["words"]]
    assert not any(isinstance(e.vec, torch.nn.Parameter) for e in db.word_embeddings.values())
    assert all(e is not None for entries in db.ids_lookup.values() for _, e in entries)
    assert_model_same(before, model)
    (clean["dirs"]["embedding"] / f"{token}.pt").unlink()
    db.load_textual_inversion_embeddings(force_reload=True)


# ---- hypernetworks ------------------------------------------------------------------------------------------
def _user_hypernetwork(dirs, model, name="userhn"):
    """A hypernetwork the user generated with last: loaded in `shared.loaded_hypernetworks`, and recorded on
    the attention layers by A1111's plain attention forward (as after a generation without optimisation)."""
    from modules import prompt_parser, sd_hijack, shared
    from modules.hypernetworks import hypernetwork

    from lib_sdtrain.formats.a1111 import hypernetwork_layout, write_torch_pt
    from lib_sdtrain.methods.hypernetwork import model_sizes

    g = torch.Generator().manual_seed(1)

    def mlp(w):
        return {"linear.0.weight": torch.randn(2 * w, w, generator=g) * 0.2, "linear.0.bias": torch.zeros(2 * w),
                "linear.1.weight": torch.randn(w, 2 * w, generator=g) * 0.2, "linear.1.bias": torch.zeros(w)}

    layers = {w: (mlp(w), mlp(w)) for w in model_sizes(model.model.diffusion_model)}
    write_torch_pt(dirs["hypernetwork"] / f"{name}.pt", hypernetwork_layout(
        layers, name=name, step=1, layer_structure=[1, 2, 1], activation_func="linear", is_layer_norm=False,
        weight_initialization="Normal", sd_checkpoint=None, sd_checkpoint_name=None, activate_output=False,
        use_dropout=False, dropout_structure=[0, 0, 0]))
    shared.reload_hypernetworks()
    hypernetwork.load_hypernetworks([name], [1.0])
    sd_hijack.undo_optimizations()
    try:
        with torch.no_grad():
            cond = model.get_learned_conditioning(prompt_parser.SdConditioning(["a toy"], width=64, height=64))
            model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond)
    finally:
        sd_hijack.model_hijack.apply_optimizations()
    assert sum("hyper_k" in m._modules for m in model.modules()) > 0
    return shared.loaded_hypernetworks[0]


def _predict(parts, seed=0):
    torch.manual_seed(seed)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    return parts.predict(x, t, parts.encode_text(["a toy"]))


@pytest.mark.parametrize("fam", FAMILIES)
def test_hypernetwork_runs_inside_a1111s_attention_forwards(clean, fam):
    """The to_k/to_v wrappers act (and get gradients) under A1111's plain attention forward, which training
    uses, and under the optimised one (training_xattention_optimizations); the user's loaded hypernetwork is
    not applied meanwhile."""
    import ldm.modules.attention
    from modules import sd_hijack, shared

    from lib_sdtrain.methods.hypernetwork import (
        HypernetworkMethod,
        HypernetworkSettings,
    )

    model = load_family(fam)
    users = _user_hypernetwork(clean["dirs"], model)
    host = clean["mod"].WebUIHost()
    for keep_optimization in (False, True):
        shared.opts.data["training_xattention_optimizations"] = keep_optimization
        parts = host.load()
        method = HypernetworkMethod(HypernetworkSettings())
        try:
            forward = ldm.modules.attention.CrossAttention.forward
            assert (forward is sd_hijack.scaled_dot_product_attention_forward) == keep_optimization
            assert shared.loaded_hypernetworks == [] and not any("hyper_k" in m._modules for m in model.modules())
            with torch.no_grad():
                base = _predict(parts)
            method.attach(parts)
            with torch.no_grad():
                for pair in method.modules.values():
                    for m in pair:
                        for p in m.parameters():
                            p.zero_()
                assert torch.allclose(_predict(parts), base, atol=1e-6)     # identity MLPs: the model itself
                for pair in method.modules.values():
                    for m in pair:
                        m.linear[-1].bias.fill_(0.3)
                assert not torch.allclose(_predict(parts), base, atol=1e-3)
            _predict(parts).square().mean().backward()
            assert all(p.grad is not None for p in method.parameters())
            assert sum(float(p.grad.abs().sum()) > 0 for p in method.parameters()) >= len(method.modules)
        finally:
            method.detach()
            host.release(parts)
        assert shared.loaded_hypernetworks == [users] and sum("hyper_k" in m._modules for m in model.modules()) > 0


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_hypernetwork_run_writes_a_file_a1111_applies_and_restores_the_users_one(clean, fam, tmp_path,
                                                                                  monkeypatch):
    from modules import shared
    from modules.hypernetworks import hypernetwork

    from lib_sdtrain.events import Events
    from lib_sdtrain.train.loop import train

    model = load_family(fam)
    _user_hypernetwork(clean["dirs"], model)
    before = model_state(model)
    events, during, loads = Events(), [], []
    real_load = hypernetwork.load_hypernetworks

    def spy_load(names, multipliers=None):
        loads.append(list(names))
        return real_load(names, multipliers)

    monkeypatch.setattr(hypernetwork, "load_hypernetworks", spy_load)

    attn2 = next(m for n, m in model.model.diffusion_model.named_modules() if n.endswith("attn2"))

    def spy(event):
        if event.kind == "progress" and event.data.get("phase") != "cache":
            during.append((list(shared.loaded_hypernetworks),
                           any("hyper_k" in m._modules for m in model.modules()), type(attn2.to_k).__name__))

    # a run that fails on its second batch gives everything back too (the user's hypernetwork included)
    from lib_sdtrain.train import loop

    real_batch = fail_on_batch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated"):
        train(settings(tmp_path, "hypernetwork", f"hnfail-{fam}", learning_rate=1e-3), clean["mod"].WebUIHost())
    monkeypatch.setattr(loop, "train_batch", real_batch)
    assert_model_same(before, model)

    events.subscribe(spy)
    name = f"hn-{fam}"
    cfg = settings(tmp_path, "hypernetwork", name, learning_rate=1e-3, sample_every_n_steps=2, sample_steps=2,
                   sample_prompts=[f"<hypernet:userhn:1> {name} toy"])
    result = train(cfg, clean["mod"].WebUIHost(), events)
    assert result.stopped == "" and result.steps == 3 and all(np.isfinite(result.losses))
    assert during == [([], False, "HyperProjection")] * 3     # the user's one never ran while training
    assert ["userhn"] in loads                                 # ...but the control prompt's tag did, for its picture
    assert result.final == clean["dirs"]["hypernetwork"] / f"{name}.pt" and result.final.is_file()
    assert name in shared.hypernetworks                        # A1111's list was refreshed
    assert_model_same(before, model)

    # A1111 loads the file and it changes the model's output
    from lib_sdtrain.methods.hypernetwork import model_sizes

    trained = hypernetwork.load_hypernetwork(name)
    assert sorted(trained.layers) == sorted(model_sizes(model.model.diffusion_model))
    from modules import prompt_parser

    cond = model.get_learned_conditioning(prompt_parser.SdConditioning(["a toy"], width=64, height=64))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([400])
    saved = list(shared.loaded_hypernetworks)
    try:
        with torch.no_grad():
            shared.loaded_hypernetworks[:] = []
            plain = model.apply_model(x, t, cond)
            shared.loaded_hypernetworks[:] = [trained]
            assert not torch.allclose(model.apply_model(x, t, cond), plain)
    finally:
        shared.loaded_hypernetworks[:] = saved


def test_control_pictures_extra_networks_do_not_leak_into_training(clean, monkeypatch):
    """A control prompt's <lora:...> merge (A1111's builtin Lora merges into the weights and keeps a backup)
    and <hypernet:...> load are undone once the picture is made."""
    from lib_sdtrain.hosts import SampleRequest
    from modules import processing, shared

    model = load_family("sd1")
    _user_hypernetwork(clean["dirs"], model)
    networks = fake_webui.load_lora_extension()
    fake_webui.write_lora(clean["dirs"]["lora"] / "ctl.safetensors", model, STYLE_LORA["sd1"])
    host = clean["mod"].WebUIHost()
    parts = host.load()
    merged = [model.network_layer_mapping[networks._resolve(k, model)] for k in STYLE_LORA["sd1"]]
    weights = [m.weight.detach().clone() for m in merged]
    real = processing.process_images
    during = []

    def spy(p):                # the picture is made with the merge in the weights
        out = real(p)
        during.append([not torch.equal(m.weight, w) for m, w in zip(merged, weights)])
        return out

    monkeypatch.setattr(processing, "process_images", spy)
    try:
        images = host.sample(parts, [SampleRequest("<hypernet:userhn:1> <lora:ctl:1> toy", steps=2, width=64,
                                                   height=64)])
        assert len(images) == 1 and during == [[True] * len(merged)]
        assert all(torch.equal(m.weight, w) and m.network_weights_backup is None for m, w in zip(merged, weights))
        assert networks.loaded_networks == [] and shared.loaded_hypernetworks == []
        assert not any("hyper_k" in m._modules for m in model.modules())
    finally:
        host.release(parts)
    assert [h.name for h in shared.loaded_hypernetworks] == ["userhn"]


# ---- whole model ------------------------------------------------------------------------------------------
def test_finetune_two_steps_saves_the_stock_keys_and_restores(clean, tmp_path):
    """A full fine-tune through WebUIHost: the file has exactly `checkpoint_state_dict`'s keys (the stock
    checkpoint's: no hijack names, no hypernetwork modules hanging on layers), and the live model comes back."""
    from safetensors.torch import load_file

    from lib_sdtrain.train.loop import train

    model = load_family("sd1")
    _user_hypernetwork(clean["dirs"], model)
    before = model_state(model)
    assert any(".hyper_k." in k for k in before["tensors"])
    host = clean["mod"].WebUIHost()
    parts = host.load()
    try:
        keys = set(parts.checkpoint_state_dict())
    finally:
        host.release(parts)
    stock = load_file(model.sd_model_checkpoint)
    assert keys == set(stock) - {k for k in stock if k.endswith("position_ids")}
    cfg = settings(tmp_path, "finetune", "ft-sd1", max_steps=2, learning_rate=1e-4,
                   finetune={"save_precision": "fp32"})
    result = train(cfg, host)
    assert result.stopped == "" and result.steps == 2 and result.final.parent == clean["dirs"]["checkpoint"]
    saved = load_file(str(result.final))
    assert set(saved) == keys
    assert any(not torch.equal(saved[k], stock[k]) for k in keys if k.startswith("model.diffusion_model."))
    assert_model_same(before, model)


def test_a_checkpoint_named_like_the_loaded_model_is_refused_at_submission(clean, tmp_path):
    """With overwrite on and model = "" (the loaded checkpoint), the job was accepted and failed once started;
    now JobManager.start refuses it (the API's HTTP 400), as it does a taken name, and nothing is queued."""
    from lib_sdtrain.errors import UserError
    from lib_sdtrain.jobs import JobManager

    load_family("sd1")
    host = clean["mod"].WebUIHost()
    jobs = JobManager(lambda: host, around_job=host.job_context)
    try:
        cfg = settings(tmp_path, "finetune", "tiny-sd1", overwrite=True)
        with pytest.raises(UserError, match="would write over the base model .*tiny-sd1.safetensors"):
            jobs.start(cfg.to_dict())
        assert jobs.list_jobs() == []
    finally:
        jobs.shutdown()


# ---- after a generation with a LoRA (issue #16, defect 1) ---------------------------------------------------
STYLE_LORA = {   # kohya module names: UNet Linear + 3×3 Conv2d, text encoder (SD2: MultiheadAttention q/k/v/out)
    "sd1": ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_up_blocks_1_attentions_2_proj_out", "lora_unet_down_blocks_0_resnets_0_conv1",
            "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te_text_model_encoder_layers_0_mlp_fc1"],
    "sd2": ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
            "lora_unet_mid_block_resnets_1_conv2"]
           + [f"lora_te_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")]
           + ["lora_te_text_model_encoder_layers_0_mlp_fc2"],
}


def _generate(prompt):
    from modules import processing, shared

    pin = {"sd_model_checkpoint": shared.sd_model.sd_checkpoint_info.name}      # on the loaded model
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, steps=2, width=64, height=64, seed=3,
                                                    do_not_save_samples=True, do_not_save_grid=True,
                                                    override_settings=pin)
    return processing.process_images(p)


@pytest.mark.parametrize("fam", ["sd1", "sd2"])
def test_embedding_and_hypernetwork_train_after_a_generation_with_a_lora(clean, fam, tmp_path):
    """In A1111 the builtin Lora leaves `<lora:style:1>`'s deltas merged in the weights after the picture, with
    CPU backups, on Linear, Conv2d and (SD2's text encoder) MultiheadAttention layers; the weights still require
    grad (the UNet's). Training must take the merge out without tripping autograd, train, and leave the weights clean."""
    from torch import nn

    from lib_sdtrain.train.loop import train

    networks = fake_webui.load_lora_extension()
    model = load_family(fam)
    fake_webui.write_lora(clean["dirs"]["lora"] / "style.safetensors", model, STYLE_LORA[fam])
    clean_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    unet = model.model.diffusion_model
    assert all(p.requires_grad for p in unet.parameters())     # A1111 never freezes the UNet (LDM freezes the rest)
    runs = [("embedding", {"embedding": {"vectors": 1, "init_text": "toy"}}),
            ("hypernetwork", {"hypernetwork": {"layer_structure": "1, 2, 1"}})]
    for method, extra in runs:
        assert len(_generate("<lora:style:1> a toy").images) == 1
        merged = [m for m in model.modules() if getattr(m, "network_weights_backup", None) is not None]
        kinds = {type(m) for m in merged}
        assert {nn.Linear, nn.Conv2d} <= kinds and (fam != "sd2" or nn.MultiheadAttention in kinds), kinds
        assert [n.name for n in networks.loaded_networks] == ["style"]
        now = model.state_dict()
        assert any(not torch.equal(v, now[k]) for k, v in clean_weights.items())       # the merge is in

        result = train(settings(tmp_path, method, f"after{method[:3]}{fam}", **extra),
                       clean["mod"].WebUIHost())
        assert result.stopped == "" and result.steps == 3 and all(np.isfinite(result.losses))
        now = model.state_dict()
        assert all(torch.equal(v, now[k]) for k, v in clean_weights.items())            # merge out, nothing else
        assert not any(getattr(m, "network_weights_backup", None) is not None for m in model.modules())
        assert networks.loaded_networks == []
        assert all(p.requires_grad for p in unet.parameters())       # the WebUI's flags given back
    # the next picture with the tag merges again from the clean weights, and one without it takes it out
    _generate("<lora:style:1> a toy")
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    _generate("a toy")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in clean_weights.items())
    assert any(not torch.equal(v, merged[k]) for k, v in clean_weights.items())
