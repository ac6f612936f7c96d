"""data/captions.py: tag edits, sidecar writes, ss_tag_frequency, token counts, kohya's caption processing."""

import random
from pathlib import Path

import pytest

from lib_sdtrain.data import captions as C
from lib_sdtrain.data.scan import scan_dataset
from lib_sdtrain.errors import UserError
from test_data_support import make_picture, tree_checksum


def _dataset(root: Path) -> Path:
    rng = random.Random(1)
    f = root / "10_sks dog"
    f.mkdir(parents=True)
    for name, cap in [("a", "sks dog, Red Collar, grass"), ("b", "sks dog, red collar"), ("c", None)]:
        make_picture(rng, 300, 300).save(f / f"{name}.png")
        if cap is not None:
            (f / f"{name}.txt").write_text(cap + "\n", encoding="utf-8")
    r = root / "reg" / "1_dog"
    r.mkdir(parents=True)
    make_picture(rng, 300, 300).save(r / "r.png")
    return root


# ---- tag edits -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn, caption, expected", [
    (lambda c: C.add_tags(c, ["grass", "sunny"]), "dog, Grass", "dog, Grass, sunny"),
    (lambda c: C.add_tags(c, ["sks"], at_start=True), "dog", "sks, dog"),
    (lambda c: C.add_tags(c, ["x"]), "", "x"),
    (lambda c: C.remove_tags(c, ["RED"]), "red, red collar, dog", "red collar, dog"),
    (lambda c: C.replace_tags(c, {"dog": "puppy"}), "dog, cute dog", "puppy, cute dog"),
    (lambda c: C.replace_tags(c, {"dog": "puppy"}), "puppy, dog", "puppy"),
    (lambda c: C.replace_tags(c, {"grass": ""}), "dog, grass", "dog"),
    (lambda c: C.set_trigger(c, "ohwx"), "dog, ohwx, grass", "ohwx, dog, grass"),
    (lambda c: C.set_trigger(c, "ohwx"), "a, b\nc", "ohwx, a, b\nohwx, c"),      # every wildcard line
])
def test_tag_edits(fn, caption, expected):
    assert fn(caption) == expected


def test_replacement_parsing():
    assert C.parse_replacements(["a=b", "c="]) == {"a": "b", "c": ""}
    with pytest.raises(UserError):
        C.parse_replacements(["nothing"])
    with pytest.raises(UserError):
        C.set_trigger("x", " ")
    with pytest.raises(UserError, match="one tag"):        # "a,b" would read back as two tags
        C.set_trigger("x", "ohwx, dog")


def test_plan_is_a_dry_run_and_apply_writes_only_captions(tmp_path):
    root = _dataset(tmp_path)
    rep = scan_dataset(root, workers=0)
    before = tree_checksum(root)
    changes = C.plan_caption_edits(rep.records, lambda c: C.set_trigger(C.remove_tags(c, ["grass"]), "ohwx"))
    assert tree_checksum(root) == before                      # planning writes nothing
    by = {c.image.name: c for c in changes}
    assert set(by) == {"a.png", "b.png", "c.png"}             # the reg picture is left alone by default
    assert by["a.png"].new == "ohwx, sks dog, Red Collar" and not by["a.png"].creates_file
    assert by["c.png"].new == "ohwx, sks dog" and by["c.png"].creates_file   # caption came from the folder
    pictures = {p: p.read_bytes() for p in root.rglob("*.png")}
    written = C.apply_caption_changes(changes)
    assert sorted(p.name for p in written) == ["a.txt", "b.txt", "c.txt"]
    assert {p: p.read_bytes() for p in root.rglob("*.png")} == pictures   # pictures untouched
    assert not list(root.rglob("*.tmp"))
    again = scan_dataset(root, workers=0)
    assert {r.path.name: r.caption for r in again.records}["c.png"] == "ohwx, sks dog"
    assert C.read_caption(root / "10_sks dog" / "a.png") == "ohwx, sks dog, Red Collar"
    assert C.read_caption(root / "10_sks dog" / "zzz.png") is None
    C.write_caption(root / "10_sks dog" / "a.png", "new caption", ".caption")
    assert (root / "10_sks dog" / "a.caption").read_text() == "new caption\n"


def test_a_read_only_caption_file_is_refused_and_no_caption_of_the_edit_is_written(tmp_path):
    """An atomic replace needs only the folder writable: a caption the user had made read-only was replaced, and
    left writable (0644)."""
    root = _dataset(tmp_path)
    b = root / "10_sks dog" / "b.txt"
    b.chmod(0o444)
    before = tree_checksum(root)
    changes = C.plan_caption_edits(scan_dataset(root, workers=0).records, lambda c: C.add_tags(c, ["new"]))
    assert len(changes) == 3
    with pytest.raises(UserError, match=r"b\.txt is read-only; make it writable .*nothing was written"):
        C.apply_caption_changes(changes)
    with pytest.raises(UserError, match="read-only"):
        C.write_caption(root / "10_sks dog" / "b.png", "new caption")
    assert tree_checksum(root) == before and not b.stat().st_mode & 0o222


# ---- frequencies -----------------------------------------------------------------------------------------
def test_ss_tag_frequency_matches_kohya(tmp_path):
    root = _dataset(tmp_path)
    rep = scan_dataset(root, workers=0)
    before = tree_checksum(root)
    freq = C.tag_frequency(rep.records)
    # sd-scripts set_tag_frequency: key = basename of the image dir, tags split on ",", stripped, lower-cased;
    # a picture without a caption file counts its class tokens; reg folders are included.
    assert freq == {"10_sks dog": {"sks dog": 3, "red collar": 2, "grass": 1}, "1_dog": {"dog": 1}}
    table = C.tag_table(rep.records)
    assert table[0] == ("sks dog", 3, 1.0) and ("red collar", 2, 2 / 3) in table
    assert tree_checksum(root) == before


def test_tag_frequency_uses_first_line_unless_wildcards():
    from lib_sdtrain.data.scan import ImageRecord

    r = ImageRecord(Path("a.png"), 512, 512, "a, b\nc, d", "sidecar", 1, "x", Path("1_x"))
    assert C.tag_frequency([r]) == {"1_x": {"a": 1, "b": 1}}
    assert C.tag_frequency([r], wildcards=True) == {"1_x": {"a": 1, "b\nc": 1, "d": 1}}


# ---- tokens ----------------------------------------------------------------------------------------------
class _FakeTokenizer:
    def encode(self, text):
        return [C.CLIP_BOS] + [1] * len(text.split()) + [C.CLIP_EOS]


def test_token_counts_with_and_without_a_tokenizer():
    assert C.count_tokens("a photo of sks dog", _FakeTokenizer()) == 5   # BOS/EOS not counted
    assert C.approx_token_count("a photo of sks dog") == 5
    assert C.approx_token_count("masterpiece, 1girl") == 5   # 11 letters: 2 (CLIP: 1), "," 1, "1" 1, "girl" 1
    assert C.approx_token_count("") == 0
    long = ", ".join(f"tag{i}" for i in range(40))
    assert C.approx_token_count(long) > C.TOKEN_WINDOW


def test_token_report_lists_captions_over_the_window(tmp_path):
    from lib_sdtrain.data.scan import ImageRecord

    recs = [ImageRecord(Path("short.png"), 512, 512, "dog", "sidecar", 1, "x", Path("1_x")),
            ImageRecord(Path("long.png"), 512, 512, " ".join(["word"] * 90), "sidecar", 1, "x", Path("1_x"))]
    rep = C.token_report(recs)
    assert rep["max"] == 90 and not rep["exact"] and [o["path"] for o in rep["over_window"]] == ["long.png"]
    assert C.token_report(recs, _FakeTokenizer())["exact"]


# ---- kohya's caption processing --------------------------------------------------------------------------
def test_no_options_leaves_the_caption_alone():
    rng = random.Random(0)
    assert C.process_caption("a,b ,  c\nsecond", C.CaptionOptions(), rng) == "a,b ,  c"
    assert C.process_caption("x", C.CaptionOptions(prefix="pre", suffix="post"), rng) == "pre x post"


def test_shuffle_keeps_the_first_tags_and_is_deterministic():
    opts = C.CaptionOptions(shuffle=True, keep_tokens=2)
    cap = "ohwx, dog, a, b, c, d, e, f"
    outs = {C.process_caption(cap, opts, random.Random(s)) for s in range(30)}
    assert len(outs) > 5
    assert all(o.startswith("ohwx, dog, ") and sorted(o.split(", ")) == sorted(cap.split(", ")) for o in outs)
    assert C.process_caption(cap, opts, random.Random(5)) == C.process_caption(cap, opts, random.Random(5))


def test_keep_tokens_separator_and_fixed_suffix():
    opts = C.CaptionOptions(shuffle=True, keep_tokens_separator="|||")
    for s in range(10):
        out = C.process_caption("ohwx, dog ||| a, b, c ||| best quality", opts, random.Random(s))
        head, *mid, tail = out.split(", ")
        assert head == "ohwx" and mid[0] == "dog" and tail == "best quality" and sorted(mid[1:]) == ["a", "b", "c"]


def test_matches_kohya_random_call_order():
    # Re-implementation of sd-scripts' process_caption with the same draws: rate check, shuffle, then per-tag.
    cap = "t0, t1, t2, t3, t4, t5, t6, t7"
    opts = C.CaptionOptions(shuffle=True, keep_tokens=1, tag_dropout_rate=0.3, dropout_rate=0.2)
    for seed in range(20):
        ref = random.Random(seed)
        if ref.random() < 0.2:
            expected = ""
        else:
            tokens = [t.strip() for t in cap.strip().split(",")]
            fixed, flex = tokens[:1], tokens[1:]
            ref.shuffle(flex)
            flex = [t for t in flex if ref.random() >= 0.3]
            expected = ", ".join(fixed + flex)
        assert C.process_caption(cap, opts, random.Random(seed)) == expected


def test_dropout_every_n_epochs_and_rate():
    opts = C.CaptionOptions(dropout_every_n_epochs=3)
    assert [C.process_caption("x", opts, random.Random(0), epoch=e) for e in range(1, 7)] == ["x", "x", "", "x", "x", ""]
    rng = random.Random(1)
    drops = sum(C.process_caption("x", C.CaptionOptions(dropout_rate=0.25), rng) == "" for _ in range(4000))
    assert 850 < drops < 1150


def test_wildcards_and_escaped_braces():
    opts = C.CaptionOptions(wildcards=True)
    outs = {C.process_caption("a {red|blue} car, {{literal}}", opts, random.Random(s)) for s in range(40)}
    assert outs == {"a red car, {literal}", "a blue car, {literal}"}
    lines = {C.process_caption("one\ntwo", opts, random.Random(s)) for s in range(40)}
    assert lines == {"one", "two"}


def test_token_warmup_and_secondary_separator():
    opts = C.CaptionOptions(token_warmup_step=10, token_warmup_min=1)
    assert C.process_caption("a, b, c, d, e", opts, random.Random(0), step=0) == "a"
    assert C.process_caption("a, b, c, d, e", opts, random.Random(0), step=5) == "a, b, c"
    assert C.process_caption("a, b, c, d, e", opts, random.Random(0), step=10) == "a, b, c, d, e"
    frac = C.CaptionOptions(token_warmup_step=0.5)
    assert C.process_caption("a, b, c", frac, random.Random(0), step=0, max_train_steps=100) == "a"
    sec = C.CaptionOptions(shuffle=True, secondary_separator=";;;")
    for s in range(10):
        out = C.process_caption("x, red;;;hat, y", sec, random.Random(s))
        assert "red,hat" in out and sorted(out.replace("red,hat", "R").split(", ")) == ["R", "x", "y"]


def test_option_validation_and_styles():
    with pytest.raises(UserError):
        C.CaptionOptions(dropout_rate=1.5).validate()
    with pytest.raises(UserError):
        C.CaptionOptions(separator="").validate()
    assert set(C.CAPTION_STYLES) == {"single-token", "several-tokens", "sentence"}
    assert all({"title", "example", "help"} <= set(v) and len(v["help"]) > 80 for v in C.CAPTION_STYLES.values())


def test_default_tokenizer_gives_exact_counts_when_installed():
    tok = C.default_tokenizer()
    if tok is None:
        pytest.skip("CLIP vocabulary (open-clip-torch) not installed")
    assert C.count_tokens("a photo of sks dog", tok) == 5
    assert C.count_tokens("masterpiece, 1girl", tok) == 4


def test_trigger_report_says_where_the_trigger_stands():
    from lib_sdtrain.data.scan import ImageRecord

    def rec(caption, concept="zkz style", reg=False):
        return ImageRecord(Path("p.png"), 64, 64, caption, "sidecar", 1, concept, Path("10_" + concept),
                           is_regularization=reg)

    late = [rec(f"a {c} circle on a gray background in zkz style") for c in ("red", "blue", "green")]
    front = [rec("zkz style, a red circle on a gray background"), rec("a zkz circle, red, on gray, large, round")]
    rep = C.trigger_report(late + front + [rec("a circle"), rec("zkz style, anything", reg=True)])
    assert rep["triggers"] == ["zkz"]                     # the folder concept's first word
    assert (rep["first"], rep["early"], rep["late"], rep["missing"]) == (1, 1, 3, 1)   # class pictures not counted
    assert "second half of 3 of 5" in rep["hint"] and "first" in rep["hint"]
    assert C.trigger_report(front)["hint"] == ""          # in front: nothing to say
    # an explicit trigger of several words; a word inside another word is not it
    rep = C.trigger_report([rec("zkz style, a circle"), rec("a zkzz style circle")], "ZKZ style")
    assert rep["triggers"] == ["zkz style"] and (rep["first"], rep["missing"]) == (1, 1)
    # a one-word folder ("10_dog") names a class, not a trigger: nothing to report unless one is given
    dogs = [rec("a photo of a dog", concept="dog")] * 3
    assert C.trigger_report(dogs)["triggers"] == [] and C.trigger_report(dogs)["hint"] == ""
    assert C.trigger_report(dogs, "dog")["late"] == 3


def test_edits_reach_captions_longer_than_the_text_encoder_reads(tmp_path):
    # A caption over 225 tokens (80 tags here, 1.2 KB) was left out of every edit without a word: "--trigger ohwx
    # --write" said it wrote the others, and that picture trained without the trigger
    folder = tmp_path / "1_x"
    folder.mkdir()
    rng = random.Random(5)
    for name in ("long", "huge", "short"):
        make_picture(rng).save(folder / f"{name}.png")
    long_caption = ", ".join(f"tag number {i}" for i in range(80))
    (folder / "long.txt").write_text(long_caption)
    (folder / "huge.txt").write_text("word, " * 60_000)          # over 256 KiB: read only in part
    (folder / "short.txt").write_text("red")
    rep = scan_dataset(tmp_path, workers=0)
    changes = C.plan_caption_edits(rep.records, lambda c: C.set_trigger(c, "ohwx"))
    assert sorted(c.image.name for c in changes) == ["long.png", "short.png"]
    C.apply_caption_changes(changes)
    assert (folder / "long.txt").read_text() == "ohwx, " + long_caption + "\n"      # whole, not the cut 225 tokens
    assert [r.path.name for r in C.too_long_to_edit(rep.records)] == ["huge.png"]
    assert (folder / "huge.txt").read_text() == "word, " * 60_000


def test_a_caption_file_too_big_to_read_whole_has_its_own_problem_code(tmp_path):
    # too_long_to_edit found these files by matching "over 256 KiB" in the problem's message: rewording the
    # message would have let an edit write back the cut start of the file. The code alone must tell.
    import dataclasses

    folder = tmp_path / "1_x"
    folder.mkdir()
    rng = random.Random(6)
    for name in ("long", "huge"):
        make_picture(rng).save(folder / f"{name}.png")
    (folder / "long.txt").write_text(", ".join(f"tag number {i}" for i in range(80)))
    (folder / "huge.txt").write_text("word, " * 60_000)
    rep = scan_dataset(tmp_path, workers=0)
    by = {r.path.name: r for r in rep.records}
    assert {p.code for p in by["huge.png"].problems} & {"long_caption", "huge_caption"} == {"huge_caption"}
    assert {p.code for p in by["long.png"].problems} & {"long_caption", "huge_caption"} == {"long_caption"}
    for r in rep.records:   # a reworded message changes nothing
        r.problems = [dataclasses.replace(p, message="reworded") for p in r.problems]
    assert [r.path.name for r in C.too_long_to_edit(rep.records)] == ["huge.png"]
    assert [c.image.name for c in C.plan_caption_edits(rep.records, lambda c: "ohwx, " + c)] == ["long.png"]


def test_an_edit_never_replaces_a_caption_file_the_scan_did_not_read(tmp_path):
    # On Windows and macOS "A.txt" is the file "a.txt": the scan (exact names) gave a.png its folder caption and
    # the edit replaced the user's A.txt with it. Shown here with a file that appears after the scan.
    folder = tmp_path / "1_sks dog"
    folder.mkdir()
    make_picture(random.Random(1)).save(folder / "a.png")
    rep = scan_dataset(tmp_path, workers=0)
    assert rep.records[0].caption_source == "folder"
    (folder / "a.txt").write_text("the user's caption")
    with pytest.raises(UserError, match="was not read as the caption of a.png"):
        C.plan_caption_edits(rep.records, lambda c: C.add_tags(c, ["x"]))
    assert (folder / "a.txt").read_text() == "the user's caption"
