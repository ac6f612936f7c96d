"""CLIP tokenizer and A1111 prompt syntax against ids produced by A1111 v1.10.1's own code.

Expected values: tests/data/tokenizer_cases.json (its "about" and "cross_checks" fields say how they were made).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lib_sdtrain.errors import UserError
from lib_sdtrain.models import tokenizer as tok_mod
from lib_sdtrain.models.prompt import (
    CHUNK_LENGTH, chunk_prompt, empty_chunk, finish_ids, parse_attention, strip_extra_networks, target_token_count,
)
from lib_sdtrain.models.tokenizer import END_ID, START_ID, VOCAB_SIZE, ClipTokenizer, find_bpe_vocab, make_tokenizers

ROOT = Path(__file__).resolve().parents[1]
CASES = json.loads((ROOT / "tests" / "data" / "tokenizer_cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizers():
    return {"hf": ClipTokenizer(None, flavor="hf"), "open_clip": ClipTokenizer(0, flavor="open_clip")}


def _label(text: str) -> str:
    return repr(text[:40])


def test_vocabulary_found_without_importing_open_clip():
    code = ("import sys; from lib_sdtrain.models.tokenizer import ClipTokenizer, find_bpe_vocab; "
            "import lib_sdtrain.models.conditioning; t = ClipTokenizer(); assert t.encode('a cat') == [320, 2368]; "
            "print(find_bpe_vocab().name, sorted(m for m in ('open_clip', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["bpe_simple_vocab_16e6.txt.gz", "[]"]


def test_vocabulary_constants(tokenizers):
    for t in tokenizers.values():
        assert (t.start_id, t.end_id, t.vocab_size, t.comma_id) == (START_ID, END_ID, VOCAB_SIZE, 267)
        assert t.token_id("!") == 0                      # A1111's textual-inversion placeholder id
    assert tokenizers["hf"].pad_id == END_ID and tokenizers["open_clip"].pad_id == 0


def test_make_tokenizers_per_family():
    assert [(t.flavor, t.pad_id) for t in make_tokenizers("sd1")] == [("hf", END_ID)]
    assert [(t.flavor, t.pad_id) for t in make_tokenizers("sd2")] == [("open_clip", 0)]
    assert [(t.flavor, t.pad_id) for t in make_tokenizers("sdxl")] == [("hf", END_ID), ("open_clip", 0)]
    with pytest.raises(UserError):
        make_tokenizers("sd3")


@pytest.mark.parametrize("case", CASES["encode"], ids=[_label(c["text"]) for c in CASES["encode"]])
def test_encode_matches_both_reference_tokenizers(tokenizers, case):
    assert tokenizers["hf"].encode(case["text"]) == case["hf"]
    assert tokenizers["open_clip"].encode(case["text"]) == case["open_clip"]


def test_flavors_differ_only_where_the_references_do(tokenizers):
    # transformers: no HTML unescape when ftfy sees '<'; literal specials spelled <|endoftext|>.
    hf, oc = tokenizers["hf"], tokenizers["open_clip"]
    assert hf.encode("a < b &amp; c") != oc.encode("a < b &amp; c")
    assert hf.encode("<|endoftext|>") == [END_ID] and oc.encode("<end_of_text>") == [END_ID]
    assert hf.encode("&amp; “smart”") == oc.encode("&amp; “smart”")


def test_bpe_results_are_cached(tokenizers):
    t = tokenizers["open_clip"]
    first = t.encode("supercalifragilistic")
    assert "supercalifragilistic" in t._cache
    assert t.encode("supercalifragilistic") == first


def test_decode_is_readable(tokenizers):
    t = tokenizers["hf"]
    assert t.decode(t.encode("Café 東京 🐱, hello")) == "café 東京 🐱, hello"   # "🐱," is one pre-token (neither is a letter)


def test_hf_tokenizer_folder_gives_the_same_ids(tmp_path, tokenizers):
    # The layout an SD1 model / our toy model ships: vocab.json + merges.txt (deps.md §3 recipe).
    import gzip
    base = tokenizers["open_clip"]
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(base._vocab.encoder), encoding="utf-8")
    lines = gzip.open(find_bpe_vocab()).read().decode("utf-8").split("\n")
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines[1:48895]) + "\n",
                                                       encoding="utf-8")
    folder_tok = ClipTokenizer(None, tmp_path, flavor="hf")
    texts = [c["text"] for c in CASES["encode"]]
    assert [folder_tok.encode(t) for t in texts] == [c["hf"] for c in CASES["encode"]]
    # transformers' own slow tokenizer from the same files (4.x; 5.x made CLIPTokenizer the fast one, no ftfy)
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5 has no slow CLIPTokenizer")
    ref = transformers.CLIPTokenizer(str(tmp_path / "tokenizer" / "vocab.json"),
                                     str(tmp_path / "tokenizer" / "merges.txt"))
    assert [ref(t, add_special_tokens=False)["input_ids"] for t in texts] == [c["hf"] for c in CASES["encode"]]


def test_missing_vocabulary_is_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        ClipTokenizer(vocab=tmp_path / "nope.txt.gz")
    with pytest.raises(UserError, match="no CLIP vocabulary"):
        ClipTokenizer(vocab=tmp_path)
    monkeypatch.setattr(tok_mod, "find_bpe_vocab", lambda: None)
    with pytest.raises(UserError, match="open-clip-torch"):
        ClipTokenizer()
    bad = tmp_path / "bad.txt"
    bad.write_text("header\nnot a merges file\n")
    with pytest.raises(UserError, match="merges"):
        ClipTokenizer(vocab=bad)
    with pytest.raises(UserError):
        ClipTokenizer(0, flavor="sentencepiece")


# ---- prompt syntax ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES["attention"], ids=[_label(c["text"]) for c in CASES["attention"]])
def test_parse_attention_matches_a1111(case):
    assert [list(run) for run in parse_attention(case["text"])] == case["parsed"]   # exact floats


@pytest.mark.parametrize("case", CASES["errors"], ids=[c["text"] for c in CASES["errors"]])
def test_bad_weight_is_a_user_error(case):
    assert case["a1111_raises"] == "ValueError"
    with pytest.raises(UserError, match="attention weight"):
        parse_attention(case["text"])


def test_strip_extra_networks_reports_tags():
    text, tags = strip_extra_networks("a <lora:my_lora:0.8>, cat <hypernet:h:1>")
    assert text == "a , cat "
    assert tags == [("lora", ["my_lora", "0.8"]), ("hypernet", ["h", "1"])]


PLAIN_CHUNKS = [c for c in CASES["chunks"] if not c.get("embeddings")]


@pytest.mark.parametrize("case", PLAIN_CHUNKS, ids=[
    f"{c['flavor']}-{c['emphasis']}-{c['comma_backtrack']}-{_label(c['prompt'])}" for c in PLAIN_CHUNKS])
def test_chunks_match_a1111(tokenizers, case):
    text, _ = strip_extra_networks(case["prompt"])
    assert text == case["stripped"]
    chunks, count = chunk_prompt(text, tokenizers[case["flavor"]], emphasis=case["emphasis"],
                                 comma_backtrack=case["comma_backtrack"])
    expected_ids = case.get("model_ids") or [c["tokens"] for c in case["chunks"]]
    assert [c.ids for c in chunks] == expected_ids
    assert [c.multipliers for c in chunks] == [c["multipliers"] for c in case["chunks"]]
    assert all(len(c.ids) == len(c.multipliers) == CHUNK_LENGTH + 2 for c in chunks)
    assert count == case["token_count"]
    assert target_token_count(count) == case["target_count"]


@pytest.mark.parametrize("case", CASES["batches"], ids=[f"{b['flavor']}-{len(b['prompts'])}" for b in CASES["batches"]])
def test_batch_padding_matches_a1111(tokenizers, case):
    t = tokenizers[case["flavor"]]
    per_prompt = [chunk_prompt(strip_extra_networks(p)[0], t)[0] for p in case["prompts"]]
    n = max(len(c) for c in per_prompt)
    got = [[(c[k] if k < len(c) else empty_chunk(t)).ids for c in per_prompt] for k in range(n)]
    assert got == case["chunk_ids"]


def test_comma_backtrack_case_is_exercised():
    # the expectations above must contain a real relocation: the same prompt chunks differently without it
    by_bt = {c["comma_backtrack"]: c for c in CASES["chunks"] if c["prompt"].startswith("one two three")}
    assert by_bt[20]["chunks"][0]["tokens"] != by_bt[0]["chunks"][0]["tokens"]
    assert by_bt[20]["chunks"][0]["tokens"].count(END_ID) == 11    # 10 tokens moved to the next chunk


def test_finish_ids_pads_after_the_first_end(tokenizers):
    assert finish_ids([320, END_ID, END_ID], tokenizers["open_clip"]) == [START_ID, 320, END_ID, 0, 0]
    assert finish_ids([320, END_ID, END_ID], tokenizers["hf"]) == [START_ID, 320, END_ID, END_ID, END_ID]


def test_chunk_options_are_checked(tokenizers):
    with pytest.raises(UserError):
        chunk_prompt("a", tokenizers["hf"], emphasis="Loud")
    with pytest.raises(UserError):
        chunk_prompt("a", tokenizers["hf"], comma_backtrack=75)
    with pytest.raises(UserError):
        tokenizers["hf"].encode(None)
