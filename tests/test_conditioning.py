"""PromptEncoder on tiny random CLIP text models: layers, shapes, emphasis, padding, pooled, gradients, TI hook.

The A1111 facts these encode are listed in lib_sdtrain/models/conditioning.py; a scratch run of A1111 v1.10.1's
real forward() on the same kind of models agreed to max|diff| 0 (see tests/data/tokenizer_cases.json
"cross_checks").
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lib_sdtrain.errors import UserError
from lib_sdtrain.hosts import TextConditioning
from lib_sdtrain.models.conditioning import PromptEncoder, apply_emphasis
from lib_sdtrain.models.tokenizer import END_ID, START_ID, make_tokenizers

ROOT = Path(__file__).resolve().parents[1]
CASES = json.loads((ROOT / "tests" / "data" / "tokenizer_cases.json").read_text(encoding="utf-8"))
LONG = " ".join(["a"] * 100)


def _text_model(cls, width, layers, act, seed, projection=0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection or width)
    model = cls(cfg).eval()
    with torch.no_grad():   # HF's init leaves LayerNorms at 1/0; make every layer matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def tok():
    return {f: make_tokenizers(f) for f in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def clip_l():
    return _text_model(CLIPTextModel, 32, 3, "quick_gelu", 0)


@pytest.fixture(scope="module")
def vit_h():     # SD2 layout: OpenCLIP ViT-H in a CLIPTextModel, gelu, all blocks kept
    return _text_model(CLIPTextModel, 24, 4, "gelu", 1)


@pytest.fixture(scope="module")
def big_g():
    return _text_model(CLIPTextModelWithProjection, 40, 3, "gelu", 2, projection=16)


def _ids(encoder: PromptEncoder, prompt: str, index: int = 0, chunk: int = 0) -> torch.Tensor:
    return torch.tensor([encoder.chunks(prompt, index)[0][chunk].ids])


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---- SD1 ----------------------------------------------------------------------------------------------------

def test_sd1_last_layer_and_shape(tok, clip_l):
    enc = PromptEncoder("sd1", tok["sd1"], [clip_l])
    with torch.no_grad():
        cond = enc(["a photo of a cat", "dog"])
        assert isinstance(cond, TextConditioning) and cond.pooled is None
        assert cond.context.shape == (2, 77, 32)
        ids = _ids(enc, "a photo of a cat")
        assert ids[0, :3].tolist() == [START_ID, 320, 1125] and ids[0, -1] == END_ID == ids[0, 10]   # pad = end
        _close(cond.context[:1], clip_l(input_ids=ids).last_hidden_state)


def test_sd1_clip_skip_takes_earlier_layer_through_final_norm(tok, clip_l):
    enc = PromptEncoder("sd1", tok["sd1"], [clip_l], clip_skip=2)
    with torch.no_grad():
        ids = _ids(enc, "a cat")
        out = clip_l(input_ids=ids, output_hidden_states=True)
        _close(enc(["a cat"]).context, clip_l.text_model.final_layer_norm(out.hidden_states[-2]))
        assert not torch.allclose(enc(["a cat"]).context, out.last_hidden_state)
    with pytest.raises(UserError, match="clip skip"):
        PromptEncoder("sd1", tok["sd1"], [clip_l], clip_skip=4)      # only 3 layers
    with pytest.raises(UserError, match="clip skip"):
        PromptEncoder("sd1", tok["sd1"], [clip_l], clip_skip=0)


def test_long_prompt_gives_154_tokens_chunk_by_chunk(tok, clip_l):
    enc = PromptEncoder("sd1", tok["sd1"], [clip_l])
    with torch.no_grad():
        cond = enc([LONG, "a cat"])
        assert cond.context.shape == (2, 154, 32)
        second = _ids(enc, LONG, chunk=1)
        assert second[0, :27].tolist() == [START_ID] + [320] * 25 + [END_ID]
        _close(cond.context[:1, 77:], clip_l(input_ids=second).last_hidden_state)
        # the short prompt is padded with an all-padding chunk, as A1111 does
        empty = torch.tensor([[START_ID] + [END_ID] * 76])
        _close(cond.context[1:, 77:], clip_l(input_ids=empty).last_hidden_state)
    assert enc.token_count(LONG) == (100, 150)
    assert enc.token_count("<lora:x:1> a cat") == (2, 75)


def test_emphasis_follows_the_formula(tok, clip_l):
    prompts = ["a (cat:1.5) on [a mat]", "((dog)) BREAK x"]
    enc = PromptEncoder("sd1", tok["sd1"], [clip_l])
    chunks = [enc.chunks(p)[0][0] for p in prompts]
    ids = torch.tensor([c.ids for c in chunks])
    mults = torch.tensor([c.multipliers for c in chunks])
    assert mults[0, 2].item() == pytest.approx(1.5) and mults[0, 5].item() == pytest.approx(1 / 1.1)
    with torch.no_grad():
        z = clip_l(input_ids=ids).last_hidden_state                  # [2, 77, 32]
        weighted = z * mults[..., None]
        # "Original": multiply, then restore the mean of the whole batch tensor
        original = enc(prompts).context[:, :77]
        _close(original, weighted * (z.mean() / weighted.mean()))
        assert torch.allclose(original.mean(), z.mean(), atol=1e-6)
        assert not torch.allclose(original, z, atol=1e-4)
        _close(PromptEncoder("sd1", tok["sd1"], [clip_l], emphasis="No norm")(prompts).context[:, :77], weighted)
        _close(PromptEncoder("sd1", tok["sd1"], [clip_l], emphasis="Ignore")(prompts).context[:, :77], z)
        # "None": brackets are ordinary text and BREAK is a word
        plain = PromptEncoder("sd1", tok["sd1"], [clip_l], emphasis="None")
        assert plain.chunks(prompts[0])[0][0].ids[1:4] == [320, 263, 2368]          # a ( cat
        assert len(plain.chunks(prompts[1])[0]) == 1
    assert apply_emphasis(z, mults, "Ignore") is z
    with pytest.raises(UserError):
        apply_emphasis(z, mults, "Loud")


def test_extra_network_tags_are_stripped(tok, clip_l):
    enc = PromptEncoder("sd1", tok["sd1"], [clip_l])
    with torch.no_grad():
        _close(enc(["<lora:style:0.8> a cat <hypernet:h:1>"]).context, enc(["a cat"]).context)
        kept = PromptEncoder("sd1", tok["sd1"], [clip_l], strip_networks=False)
        assert kept.token_count("<lora:x:1> a cat")[0] > 2


def test_gradients_reach_the_token_embedding(tok, clip_l):
    enc = PromptEncoder("sd1", tok["sd1"], [clip_l])
    table = clip_l.get_input_embeddings().weight
    table.requires_grad_(True)
    try:
        enc(["a (cat:1.2)", LONG]).context.square().sum().backward()
        assert table.grad[320].abs().sum() > 0 and table.grad[2368].abs().sum() > 0
        assert table.grad[1000].abs().sum() == 0                     # a token no prompt used
    finally:
        table.grad = None
        table.requires_grad_(False)


# ---- SD2 ----------------------------------------------------------------------------------------------------

def test_sd2_penultimate_layer_with_final_norm_and_zero_padding(tok, vit_h):
    enc = PromptEncoder("sd2", tok["sd2"], [vit_h])
    seen = []
    hook = vit_h.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs["input_ids"]),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            cond = enc(["a red fox"])
    finally:
        hook.remove()
    ids = seen[0]
    assert ids[0, :6].tolist() == [START_ID, 320, 736, 3240, END_ID, 0] and ids[0, 5:].eq(0).all()
    assert cond.context.shape == (1, 77, 24) and cond.pooled is None
    with torch.no_grad():
        out = vit_h(input_ids=ids, output_hidden_states=True)
        _close(cond.context, vit_h.text_model.final_layer_norm(out.hidden_states[-2]))
        # A1111 ignores CLIP skip for SD2
        _close(PromptEncoder("sd2", tok["sd2"], [vit_h], clip_skip=2)(["a red fox"]).context, cond.context)


# ---- SDXL ---------------------------------------------------------------------------------------------------

def test_sdxl_concatenates_penultimate_layers_and_pools_the_first_chunk(tok, clip_l, big_g):
    enc = PromptEncoder("sdxl", tok["sdxl"], [clip_l, big_g])
    with torch.no_grad():
        cond = enc([LONG, "a cat"])
        assert cond.context.shape == (2, 154, 32 + 40) and cond.pooled.shape == (2, 16)
        ids1, ids2 = _ids(enc, LONG, 0, 1), _ids(enc, LONG, 1, 1)
        assert ids1[0, 27:].eq(END_ID).all() and ids2[0, 27:].eq(0).all()      # pads: 49407 vs 0
        h1 = clip_l(input_ids=ids1, output_hidden_states=True).hidden_states[-2]          # no final norm
        h2 = big_g(input_ids=ids2, output_hidden_states=True).hidden_states[-2]           # no ln_final
        _close(cond.context[:1, 77:, :32], h1)
        _close(cond.context[:1, 77:, 32:], h2)
        first = big_g(input_ids=_ids(enc, LONG, 1, 0)).text_embeds
        _close(cond.pooled[:1], first)
        assert not torch.allclose(cond.pooled[:1], big_g(input_ids=ids2).text_embeds)
        # transformers pools at argmax(ids) when eos_token_id == 2 (legacy configs), else at the first 49407;
        # with pad 0 after the end token both are the end token's position (sgm's pool uses argmax)
        legacy = big_g.text_model.eos_token_id
        try:
            for eos in (2, END_ID):
                big_g.text_model.eos_token_id = eos
                _close(enc([LONG, "a cat"]).pooled, cond.pooled)
        finally:
            big_g.text_model.eos_token_id = legacy
        # the pooled output is unweighted: emphasis changes the context only
        weighted = enc(["(a:1.5) b", "c"])
        _close(weighted.pooled[:1], big_g(input_ids=_ids(enc, "(a:1.5) b", 1)).text_embeds)
        # with A1111's "Clip skip SDXL" option encoder 1 takes hidden_states[-clip_skip], still without norm
        skip = PromptEncoder("sdxl", tok["sdxl"], [clip_l, big_g], clip_skip=1, sdxl_clip_l_skip=True)
        ids = _ids(enc, "a cat")
        _close(skip(["a cat"]).context[..., :32], clip_l(input_ids=ids, output_hidden_states=True).hidden_states[-1])


def test_sdxl_needs_a_projection_model(tok, clip_l):
    enc = PromptEncoder("sdxl", tok["sdxl"], [clip_l, clip_l])
    with pytest.raises(UserError, match="CLIPTextModelWithProjection"):
        with torch.no_grad():
            enc(["a"])


# ---- textual inversion hook ---------------------------------------------------------------------------------

TI_CASES = [c for c in CASES["chunks"] if c.get("embeddings")]


@pytest.mark.parametrize("case", TI_CASES, ids=[f"{c['flavor']}-{c['prompt'][:30]!r}" for c in TI_CASES])
def test_embedding_placement_matches_a1111(tok, clip_l, vit_h, case):
    family, model = ("sd1", clip_l) if case["flavor"] == "hf" else ("sd2", vit_h)
    enc = PromptEncoder(family, tok[family], [model])
    width = model.get_input_embeddings().weight.shape[1]
    for name, n in case["embeddings"]:
        enc.add_embedding(name, [torch.zeros(n, width)])
    chunks, count = enc.chunks(case["prompt"])
    expected_ids = case.get("model_ids") or [c["tokens"] for c in case["chunks"]]
    if family == "sd2" and "model_ids" not in case:
        expected_ids = [ids[:ids.index(END_ID) + 1] + [0] * (76 - ids.index(END_ID)) for ids in expected_ids]
    assert [c.ids for c in chunks] == expected_ids
    assert [c.multipliers for c in chunks] == [c["multipliers"] for c in case["chunks"]]
    assert [[[p - 1, n] for p, n in c.fixes] for c in chunks] == [c["fixes"] for c in case["chunks"]]
    assert count == case["token_count"]


def test_embedding_vectors_are_spliced_and_trained(tok, clip_l, big_g):
    enc = PromptEncoder("sdxl", tok["sdxl"], [clip_l, big_g])
    clip_l_vec = torch.nn.Parameter(torch.randn(2, 32))
    clip_g_vec = torch.nn.Parameter(torch.randn(2, 40))
    enc.add_embedding("mytoken", [clip_l_vec, clip_g_vec])
    seen = []   # what the first transformer block receives: token embeddings (spliced) + positions

    def grab(_module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])
    hook = clip_l.text_model.encoder.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        cond = enc(["a photo of mytoken", "plain"])
    finally:
        hook.remove()
    chunk = enc.chunks("a photo of mytoken")[0][0]
    assert chunk.fixes == [(4, "mytoken")] and chunk.ids[4:6] == [0, 0]      # placeholders, as in A1111
    positions = clip_l.text_model.embeddings.position_embedding.weight
    table = clip_l.get_input_embeddings().weight
    _close(seen[0][0, 4:6], (clip_l_vec + positions[4:6]).detach())
    _close(seen[0][0, 3], (table[539] + positions[3]).detach())               # "of" untouched
    _close(seen[0][1], (table[torch.tensor(enc.chunks("plain")[0][0].ids)] + positions).detach())
    cond.context.sum().backward()
    assert clip_l_vec.grad.abs().sum() > 0 and clip_g_vec.grad.abs().sum() > 0
    # the splice hook is gone after the call; the table itself never changes
    assert len(clip_l.get_input_embeddings()._forward_hooks) == 0
    with torch.no_grad():
        without = PromptEncoder("sdxl", tok["sdxl"], [clip_l, big_g])(["a photo of mytoken"])
        enc.remove_embedding("mytoken")
        _close(enc(["a photo of mytoken"]).context, without.context)
    assert enc.embeddings == {}


def test_embedding_input_is_checked(tok, clip_l, big_g):
    enc = PromptEncoder("sdxl", tok["sdxl"], [clip_l, big_g])
    with pytest.raises(UserError, match="width"):
        enc.add_embedding("x", [torch.zeros(1, 32), torch.zeros(1, 32)])
    with pytest.raises(UserError, match="same n"):
        enc.add_embedding("x", [torch.zeros(1, 32), torch.zeros(2, 40)])
    with pytest.raises(UserError, match="needs 2"):
        enc.add_embedding("x", [torch.zeros(1, 32)])
    with pytest.raises(UserError):
        enc.add_embedding("  ", [torch.zeros(1, 32), torch.zeros(1, 40)])


# ---- bad input ----------------------------------------------------------------------------------------------

def test_bad_arguments_are_user_errors(tok, clip_l):
    with pytest.raises(UserError, match="family"):
        PromptEncoder("sd3", tok["sd1"], [clip_l])
    with pytest.raises(UserError, match="needs 2"):
        PromptEncoder("sdxl", tok["sd1"], [clip_l])
    with pytest.raises(UserError, match="emphasis"):
        PromptEncoder("sd1", tok["sd1"], [clip_l], emphasis="Loud")
    enc = PromptEncoder("sd1", tok["sd1"], [clip_l])
    for bad in ("a cat", [], [1, 2]):
        with pytest.raises(UserError):
            enc(bad)


def test_original_emphasis_equals_a1111_and_survives_a_zero_mean():
    torch.manual_seed(0)
    z = torch.randn(2, 77, 8)
    ones = torch.ones(2, 77)
    # all weights 1: A1111 multiplies by mean/mean == 1.0 exactly, so the output is z bit for bit
    assert torch.equal(apply_emphasis(z, ones), z * (z.mean() / (z * ones[..., None]).mean()))
    mults = ones.clone()
    mults[0, 3] = 1.5
    assert torch.equal(apply_emphasis(z, mults), (z * mults[..., None]) * (z.mean() / (z * mults[..., None]).mean()))
    # a zero-mean encoder output (A1111 would give NaN): no rescaling instead
    flat = z - z.mean()
    flat[0, 3] = 0.0
    flat = flat - flat.mean()
    assert torch.isfinite(apply_emphasis(flat, ones)).all()
    zero = torch.zeros(2, 77, 8)
    assert torch.equal(apply_emphasis(zero, mults), zero)
