"""ui/dataset_tab.py handlers on a small generated dataset (no gradio needed): the scan text, the caption editor
(only the .txt changes), bulk tag edits (preview writes nothing), tags and tokens, buckets and guidance,
near-duplicate groups and their move to _removed/, and class pictures through the runner with a tiny model."""

from __future__ import annotations

import contextlib
import hashlib
import random
from pathlib import Path

import pytest
from PIL import Image

from lib_sdtrain.errors import UserError
from lib_sdtrain.ui import dataset_tab as T
from test_data_support import make_picture, tree_checksum


def _pictures_checksum(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.suffix.lower() in (".png", ".jpg")}


@pytest.fixture()
def dataset(tmp_path):
    """10_sks dog: 6 varied pictures with captions, one a resized copy of another, one long caption,
    one truncated file; reg/1_dog: 2 pictures without captions."""
    rng = random.Random(5)
    inst = tmp_path / "data" / "10_sks dog"
    inst.mkdir(parents=True)
    caps = ["sks dog, grass, red collar", "sks dog, beach", "dog, grass, sunny", "sks dog, red collar, indoors",
            "sks dog, " + ", ".join(f"extra detail number {i}" for i in range(30))]
    for i, cap in enumerate(caps):
        make_picture(rng, 320, 256).save(inst / f"p{i}.png")
        (inst / f"p{i}.txt").write_text(cap + "\n")
    with Image.open(inst / "p0.png") as im:     # a near-duplicate of p0, smaller, no caption file
        im.resize((240, 192), Image.Resampling.BICUBIC).save(inst / "p0_copy.jpg", quality=92)
    (inst / "broken.png").write_bytes((inst / "p1.png").read_bytes()[:300])
    reg = tmp_path / "reg" / "1_dog"
    reg.mkdir(parents=True)
    for i in range(2):
        make_picture(rng, 256, 320).save(reg / f"r{i}.png")
    return tmp_path / "data", tmp_path / "reg"


def test_scan_report_lists_folders_repeats_and_bad_files(dataset):
    data, reg = dataset
    before = tree_checksum(data)
    text = T.scan_report(str(data), str(reg))
    assert "**9 pictures**: 8 usable (1 with warnings), 1 unusable; 7 instance, 2 regularization" in text
    assert "| 10_sks dog | 10 | sks dog | instance | 7 |" in text
    assert "| 1_dog | 1 | dog | regularization | 2 |" in text
    assert "broken.png" in text and "error:" in text
    assert "60 instance samples per epoch" in text           # 6 usable instance pictures × 10 repeats
    assert "p0_copy.jpg | 240x192 | warning:" in text         # small: upscaled
    assert tree_checksum(data) == before                     # scanning reads only
    choices = T.picture_choices(str(data), str(reg))
    assert "10_sks dog/p0.png" in choices and "10_sks dog/broken.png" not in choices
    assert len(choices) == 8 and choices[-2:] == ["1_dog/r0.png", "1_dog/r1.png"]
    labels = dict(T.gallery_items(str(data)))
    assert labels[str(data / "10_sks dog" / "p1.png")] == "sks dog, beach"
    with pytest.raises(UserError, match="choose a dataset folder"):
        T.scan_report("  ")
    with pytest.raises(UserError, match="not found"):
        T.scan_report(str(data / "missing"))


def test_caption_save_changes_only_the_txt(dataset):
    data, reg = dataset
    pics = _pictures_checksum(data)
    other = (data / "10_sks dog" / "p2.txt").read_bytes()
    path, caption, where = T.load_caption(str(data), str(reg), "10_sks dog/p1.png")
    assert (Path(path).name, caption, where) == ("p1.png", "sks dog, beach", "from p1.txt")
    msg = T.save_caption(str(data), str(reg), "10_sks dog/p1.png", "  sks dog, beach, sunset \n\n")
    assert msg.startswith("saved p1.txt")
    assert (data / "10_sks dog" / "p1.txt").read_text() == "sks dog, beach, sunset\n"
    assert _pictures_checksum(data) == pics
    assert (data / "10_sks dog" / "p2.txt").read_bytes() == other
    assert T.load_caption(str(data), str(reg), "10_sks dog/p1.png")[1] == "sks dog, beach, sunset"  # cache refreshed
    # a picture without a sidecar gets a new one; a regularization picture is found in the reg folder
    _, cap, where = T.load_caption(str(data), str(reg), "10_sks dog/p0_copy.jpg")
    assert (cap, where) == ("sks dog", "from the folder's class tokens (no caption file yet)")
    T.save_caption(str(data), str(reg), "1_dog/r0.png", "dog, standing")
    assert (reg / "1_dog" / "r0.txt").read_text() == "dog, standing\n"
    assert _pictures_checksum(data) == pics
    for bad in ("../reg/1_dog/r1.png", "/etc/passwd", "10_sks dog/p1.txt", "10_sks dog/nope.png", ""):
        with pytest.raises(UserError):
            T.save_caption(str(data), "", bad, "x")
    assert not (reg / "1_dog" / "r1.txt").exists()


def test_caption_save_never_replaces_a_caption_changed_on_disk_since_it_was_loaded(dataset):
    """A caption file rewritten in place (a text editor, a tagger) changes no folder, so the cached scan kept
    showing the old caption, and Save wrote the editor's text over the other program's edit."""
    data, reg = dataset
    rel, txt = "10_sks dog/p1.png", data / "10_sks dog" / "p1.txt"
    loaded = T.load_caption(str(data), str(reg), rel)[1]
    with open(txt, "r+", encoding="utf-8") as fh:        # in place: the folder's mtime stays
        fh.truncate(0)
        fh.write("sks dog, beach, edited elsewhere\n")
    assert T.load_caption(str(data), str(reg), rel)[1] == "sks dog, beach, edited elsewhere"   # shown as it is now
    with pytest.raises(UserError, match="p1.png was changed on disk after the editor loaded it .*nothing was saved"):
        T.save_caption(str(data), str(reg), rel, loaded + ", sunset", loaded=loaded)
    assert txt.read_text() == "sks dog, beach, edited elsewhere\n"
    again = T.load_caption(str(data), str(reg), rel)[1]                # picked again: saves
    T.save_caption(str(data), str(reg), rel, again + ", sunset", loaded=again)
    assert txt.read_text() == "sks dog, beach, edited elsewhere, sunset\n"


def test_bulk_tag_edits_preview_then_write(dataset):
    data, reg = dataset
    before = tree_checksum(data.parent)
    spec = T.BulkEdit(trigger="sks dog", add="photo", remove="sunny", replace="red collar=blue collar\nbeach=")
    text, n = T.bulk_edit(str(data), str(reg), ".txt", spec, write=False)
    assert n == 6 and "would change" in text and "nothing written yet" in text
    assert tree_checksum(data.parent) == before                # the preview writes nothing
    pics = _pictures_checksum(data.parent)
    text, n = T.bulk_edit(str(data), str(reg), ".txt", spec, write=True)
    assert n == 6 and "6 captions written" in text
    folder = data / "10_sks dog"
    assert (folder / "p0.txt").read_text() == "sks dog, grass, blue collar, photo\n"
    assert (folder / "p1.txt").read_text() == "sks dog, photo\n"
    assert (folder / "p2.txt").read_text() == "sks dog, dog, grass, photo\n"
    assert (folder / "p0_copy.txt").read_text() == "sks dog, photo\n"          # created from the class tokens
    assert not (reg / "1_dog" / "r0.txt").exists()                               # reg left alone by default
    assert _pictures_checksum(data.parent) == pics
    # the same edit again changes nothing; the table reflects the written captions
    assert T.bulk_edit(str(data), str(reg), ".txt", spec, write=True) == ("No caption would change.", 0)
    rows = {r[0]: r[1:] for r in T.tag_rows(str(data), str(reg))}
    assert rows["sks dog"] == [6, 100.0] and rows["photo"] == [6, 100.0] and rows["grass"] == [2, 33.3]
    assert "beach" not in rows and "red collar" not in rows and rows["blue collar"][0] == 2
    with pytest.raises(UserError, match="nothing to do"):
        T.bulk_edit(str(data), str(reg), ".txt", T.BulkEdit(), write=True)
    with pytest.raises(UserError, match="old=new"):
        T.bulk_edit(str(data), str(reg), ".txt", T.BulkEdit(replace="oops"), write=False)


def test_tokens_and_caption_styles(dataset):
    data, _ = dataset
    text = T.token_summary(str(data))
    assert "over the 75-token window" in text and "p4.png" in text and "p1.png" not in text
    assert "Trigger `sks`" in text and "Hint" not in text      # "sks dog, ..." captions: the trigger is first
    for key in T.STYLE_ORDER:
        help_text = T.caption_style_help(key)
        assert "e.g." in help_text and len(help_text) > 120
    assert [k for _, k in T.style_choices()] == list(T.STYLE_ORDER)
    with pytest.raises(UserError):
        T.caption_style_help("haiku")


def test_buckets_and_guidance(dataset):
    data, reg = dataset
    rows, summary = T.bucket_report(str(data), "", resolution="512", batch=4)
    assert sum(r[2] for r in rows) == 6 and sum(r[3] for r in rows) == 60    # 6 pictures × 10 repeats
    assert all(r[4] == -(-r[3] // 4) for r in rows) and "batches of 4 per epoch" in summary
    text, result = T.guidance_report(str(data), str(reg), kind="subject", batch=2, epochs=3)
    steps = result["steps"]
    assert steps["samples_per_epoch"] == 120 and steps["regularization_factor"] == 2   # reg doubles the samples
    assert steps["total_steps"] == 3 * steps["steps_per_epoch"] and f"{steps['total_steps']} steps in 3 epochs" in text
    assert "Warning" in text                              # 2 class pictures for 6 instance pictures is too few
    with pytest.raises(UserError, match="resolution"):
        T.bucket_report(str(data), "", resolution="big")


def test_duplicate_groups_and_move_to_removed(dataset):
    data, reg = dataset
    before = tree_checksum(data)
    groups = T.duplicate_groups(str(data), str(reg))
    assert len(groups) == 1
    names = sorted(Path(p).name for p in groups[0]["paths"])
    assert names == ["p0.png", "p0_copy.jpg"] and Path(groups[0]["keep"]).name == "p0.png"
    assert tree_checksum(data) == before                                     # finding reads only
    assert "1 groups of near-duplicates" in T.duplicates_markdown(groups)
    side = T.group_gallery(groups, T.group_choices(groups)[0])
    assert [Path(p).name for p, _ in side] == [Path(p).name for p in groups[0]["paths"]]
    assert any(label.endswith("(keep)") for _, label in side)
    with pytest.raises(UserError, match="tick the confirmation"):
        T.move_duplicates(str(data), groups, False)
    assert tree_checksum(data) == before
    copy_bytes = (data / "10_sks dog" / "p0_copy.jpg").read_bytes()
    msg = T.move_duplicates(str(data), groups, True)
    assert "Moved 1 files" in msg and "nothing deleted" in msg
    moved = data / "_removed" / "10_sks dog" / "p0_copy.jpg"
    assert moved.read_bytes() == copy_bytes and not (data / "10_sks dog" / "p0_copy.jpg").exists()
    assert (data / "10_sks dog" / "p0.png").is_file()
    assert T.duplicate_groups(str(data), str(reg)) == []                       # rescanned: _removed is skipped
    feats = T.features_markdown(str(data))
    assert feats.startswith("**Recurring features**") or feats.startswith("No recurring feature")


def test_recurring_tag_is_reported(dataset):
    data, _ = dataset
    for p in (data / "10_sks dog").glob("p*.txt"):
        p.write_text("sks dog, white background, " + p.read_text())
    text = T.features_markdown(str(data))
    assert "white background" in text


def test_classgen_runner_with_tiny_model(tmp_path):
    import torch

    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    torch.set_num_threads(1)
    model = make_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1")
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "out")
    loads, jobs, real_load = [], [], host.load

    def load(model=None):
        loads.append(model)
        return real_load(model)

    @contextlib.contextmanager
    def job_context(job):          # the standalone host's does nothing; record what the runner hands it
        jobs.append((job.kind, job.id, job.stop is runner._stop))  # noqa: SLF001
        yield

    host.load, host.job_context = load, job_context
    runner = T.ClassGenRunner(lambda: host)
    out = tmp_path / "reg" / "1_dog"
    req = T.ClassGenRequest(str(out), "a photo of a dog", count=3, seed=7, width=64, height=64, steps=2,
                              model=str(model))
    assert "3 class pictures" in runner.start(req)
    with pytest.raises(UserError, match="already"):
        runner.start(req)
    runner.join(60)
    st = runner.state()
    assert st["error"] == "" and not st["running"] and st["done"] == 3 and st["result"]["generated"] == 3
    assert len(list(out.glob("class-*.png"))) == 3 and "done: 3 rendered" in runner.progress_text()
    with Image.open(next(out.glob("class-*.png"))) as im:
        assert im.size == (64, 64)
    # width and height 0 (the tab's default): the model's own size, here the tiny model's 64 px (session 21)
    zero = tmp_path / "reg" / "1_native"
    runner.start(T.ClassGenRequest(str(zero), "a photo of a dog", count=1, seed=7, steps=2, model=str(model)))
    runner.join(60)
    assert runner.state()["error"] == ""
    with Image.open(next(zero.glob("class-*.png"))) as im:
        assert im.size == (64, 64)
    loads.pop(), jobs.pop()
    # resumable: asking for 4 renders only the new seed; stop before the first batch renders nothing
    runner.start(T.ClassGenRequest(str(out), "a photo of a dog", count=4, seed=7, width=64, height=64, steps=2,
                                   model=str(model)))
    runner.join(60)
    assert loads == [str(model), str(model)]
    assert [(kind, same) for kind, _, same in jobs] == [("classgen", True)] * 2 and jobs[0][1] != jobs[1][1]
    assert runner.state()["result"]["generated"] == 1 and runner.state()["result"]["skipped"] == 3
    runner._stop.request("test")   # noqa: SLF001 - a stop that is pending when the job starts is reset
    assert runner.stop() == "nothing is running"
    with pytest.raises(UserError, match="prompt"):
        runner.start(T.ClassGenRequest(str(out), " "))
    with pytest.raises(UserError, match="folder"):
        runner.start(T.ClassGenRequest("", "a dog"))


def test_classgen_stop_button(tmp_path):
    import threading

    gate, entered = threading.Event(), threading.Event()

    class SlowHost:             # no job_context: nothing to join; load / release lend nothing
        def load(self, model=None):
            return None

        def release(self, parts):
            pass

        def sample(self, parts, requests, stop=None):
            entered.set()
            gate.wait(10)
            return [Image.new("RGB", (r.width, r.height), (r.seed % 256, 0, 0)) for r in requests]

    runner = T.ClassGenRunner(SlowHost)
    runner.start(T.ClassGenRequest(str(tmp_path / "c"), "a cat", count=20, width=64, height=64))
    assert entered.wait(10)                   # the first picture is being rendered
    assert runner.stop().startswith("stopping")
    gate.set()
    runner.join(10)
    st = runner.state()
    assert st["result"]["stopped"] and st["result"]["generated"] == 1 and "stopped" in st["status"]
