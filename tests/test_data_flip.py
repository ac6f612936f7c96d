"""Mirroring pictures at random (`flip_aug`): the right pixels, the right cached latents, about half the time, the
same draws on a resumed run, SDXL's crop offset mirrored with the picture, and the setting in the saved file."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from lib_sdtrain.data.buckets import BucketAssignment, BucketPlan
from lib_sdtrain.data.captions import CaptionOptions
from lib_sdtrain.data.dataset import TrainData
from lib_sdtrain.data.scan import scan_dataset
from lib_sdtrain.errors import UserError
from lib_sdtrain.events import Events
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings


def two_sided(folder, n=2, size=(64, 64)):
    """n pictures whose left half is red and right half blue, so a mirrored one is told apart at once."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", size, (0, 0, 255))
        im.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
        im.paste((0, 255, 0), (8 * i, 56, 8 * i + 8, 64))             # pictures differ (the cache is by content)
        im.save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"zwx, picture {i}")
    return folder


def make_data(folder, *, flip, seed=3):
    records = scan_dataset(str(folder)).usable
    a = BucketAssignment(bucket=(64, 64), resized=(64, 64), original=(64, 64), crop_left=0, crop_top=0, ar_error=0.0)
    plan = BucketPlan([a] * len(records), [1] * len(records), [(64, 64)])
    return TrainData(records, plan, CaptionOptions(), seed=seed, flip=flip)


def test_mirrored_pixels_are_the_picture_mirrored_and_drawn_about_half_the_time(tmp_path):
    data = make_data(two_sided(tmp_path / "d"), flip=True)
    plain, mirrored = data.pixels(0), data.pixels(0, mirrored=True)
    assert plain[0, 32, 5] > 0.9 and plain[2, 32, 5] < -0.9          # red on the left
    assert torch.equal(mirrored, plain.flip(-1))
    assert mirrored[2, 32, 5] > 0.9 and mirrored[0, 32, 5] < -0.9    # blue on the left once mirrored
    draws = [data.mirrored(i, epoch, step, j) for epoch in range(1, 6) for step in range(40) for j, i in
             enumerate((0, 1))]
    assert 0.4 < sum(draws) / len(draws) < 0.6                        # 400 draws: 1/2 ± 0.1 is beyond 4 sd
    again = make_data(tmp_path / "d", flip=True)                      # a resumed run: the same draws
    assert draws == [again.mirrored(i, epoch, step, j) for epoch in range(1, 6) for step in range(40)
                     for j, i in enumerate((0, 1))]
    off = make_data(tmp_path / "d", flip=False)
    assert not any(off.mirrored(i, 1, step, 0) for step in range(50) for i in (0, 1))
    batch = off.batch([0, 1], 1, 0, use_cache=False)
    assert batch["mirrored"] == [False, False] and torch.equal(batch["pixels"][0], plain)


def test_batches_mirror_exactly_the_drawn_pictures_from_pixels_and_from_the_cache(tmp_path):
    data = make_data(two_sided(tmp_path / "d"), flip=True)
    calls = []

    def encode(px):
        calls.append(px.shape[0])
        return F.avg_pool2d(px, 8)

    data.build_cache(encode, model_id="m")
    assert len(calls) == 4 and set(data.cache) == set(data.mirror_cache) == {0, 1}   # each picture both ways
    seen = set()
    for step in range(12):
        uncached = data.batch([0, 1], 1, step, use_cache=False)
        cached = data.batch([0, 1], 1, step, use_cache=True)
        assert uncached["mirrored"] == cached["mirrored"]
        for j, i in enumerate((0, 1)):
            m = cached["mirrored"][j]
            seen.add(m)
            assert torch.equal(uncached["pixels"][j], data.pixels(i, mirrored=m))
            assert torch.allclose(cached["latents"][j], encode(data.pixels(i, mirrored=m)[None])[0])
    assert seen == {True, False}


def test_disk_cache_keeps_both_latents_and_reuses_them(tmp_path):
    data = make_data(two_sided(tmp_path / "d"), flip=True)
    calls = []

    def encode(px):
        calls.append(1)
        return F.avg_pool2d(px, 8)

    data.build_cache(encode, model_id="m", disk_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4 and len(calls) == 4
    again = make_data(tmp_path / "d", flip=True)
    again.build_cache(encode, model_id="m", disk_dir=tmp_path / "cache")
    assert len(calls) == 4                                            # all four read back
    for i in (0, 1):
        assert torch.equal(again.mirror_cache[i], data.mirror_cache[i])
        assert not torch.equal(again.mirror_cache[i], again.cache[i])


def test_sdxl_crop_offset_is_mirrored_with_the_picture(tmp_path):
    data = make_data(two_sided(tmp_path / "d", n=1, size=(100, 64)), flip=True)
    a = BucketAssignment(bucket=(64, 64), resized=(100, 64), original=(100, 64), crop_left=10, crop_top=0,
                         ar_error=0.0)
    data.plan = BucketPlan([a], [1], [(64, 64)])
    assert data.size_conditioning(0).crop_top_left == (0, 10)
    mirrored = data.size_conditioning(0, mirrored=True)
    assert mirrored.crop_top_left == (0, 26)                          # 100 - 10 - 64 cut from the other side
    assert mirrored.original_size == (64, 100) and mirrored.target_size == (64, 64)
    # the mirrored crop is the same pixels as cropping the mirrored picture at that offset
    full = Image.open(data.records[0].path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    want = torch.tensor(list(full.crop((26, 0, 90, 64)).getdata()), dtype=torch.float32)
    got = ((data.pixels(0, mirrored=True) + 1) * 127.5).permute(1, 2, 0).reshape(-1, 3)
    assert torch.allclose(got, want, atol=0.5)


def test_a_run_with_flip_aug_mirrors_pictures_and_says_so_in_its_file(tmp_path, monkeypatch):
    model = make_tiny_checkpoint(tmp_path / "sd1.safetensors", "sd1")
    data = two_sided(tmp_path / "data" / "2_zwx", n=2).parent
    drawn = []
    real = TrainData.batch

    def counting(self, *a, **k):
        out = real(self, *a, **k)
        drawn.extend(out["mirrored"])
        return out

    monkeypatch.setattr(TrainData, "batch", counting)

    def run(name, flip):
        cfg = TrainSettings.from_dict({
            "model": str(model), "data": str(data), "output": str(tmp_path / name), "name": name,
            "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2, "epochs": 1, "max_steps": 4,
            "optimizer": "sgd", "learning_rate": 0.5, "save_every_n_epochs": 0, "save_state": False,
            "tensorboard": False, "flip_aug": flip, "lora": {"network_dim": 4, "save_dtype": "fp32"}})
        result = train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host"), Events())
        with safe_open(str(result.final), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}   # noqa: SIM118 - no __iter__

    meta_off, off = run("off", False)
    assert meta_off["ss_flip_aug"] == "False" and not any(drawn)
    drawn.clear()
    meta_on, on = run("on", True)
    assert meta_on["ss_flip_aug"] == "True" and any(drawn) and not all(drawn)
    assert any(not torch.equal(on[k], off[k]) for k in on if "lora_up" in k)   # the mirrored pictures trained


def test_captions_that_name_a_side_are_warned_about(tmp_path, monkeypatch):
    from lib_sdtrain.events import EventLog

    def stop_at_load(self, model=None):
        raise RuntimeError("stopped before the model loads")

    monkeypatch.setattr(StandaloneHost, "load", stop_at_load)

    def warnings_for(captions, flip=True, kind="warning", **more):
        folder = tmp_path / f"d{len(list(tmp_path.iterdir()))}" / "1_zwx"
        two_sided(folder, n=len(captions))
        for i, text in enumerate(captions):
            (folder / f"p{i}.txt").write_text(text)
        cfg = TrainSettings.from_dict({"data": str(folder.parent), "output": str(tmp_path / "o"), "name": "w",
                                       "resolution": 64, "min_bucket": 64, "max_bucket": 64, "flip_aug": flip,
                                       "tensorboard": False, **more})
        log = EventLog()
        with pytest.raises(RuntimeError, match="stopped before"):
            train(cfg, StandaloneHost(device="cpu", output_root=tmp_path / "host"), Events(log))
        return [e.data["text"] for e in log.since(0)[1] if e.kind == kind]

    sided = warnings_for(["zwx, a heart on the LEFT of a wall", "zwx, a heart", "zwx, right-hand side"])
    assert any("2 of 3 captions name a side" in w and "flip_swap_sides" in w for w in sided)
    assert not any("name a side" in w for w in warnings_for(["zwx, bright", "zwx, a leftover, upright"]))
    assert any("1 of 1 captions name a side" in w for w in warnings_for(["zwx, hand_on_left_hip"]))   # booru tag
    assert not any("name a side" in w for w in warnings_for(["zwx on the left"], flip=False))
    # with the sides swapped there is nothing to warn about; the run says what it does
    assert not any("name a side" in w for w in warnings_for(["zwx on the left"], flip_swap_sides=True))
    assert any("1 of 1 captions name a side" in t for t in warnings_for(["zwx on the left"], kind="status",
                                                                         flip_swap_sides=True))


def test_swap_sides_trades_left_and_right_in_the_case_written():
    from lib_sdtrain.data.captions import swap_sides

    assert swap_sides("zwx, a heart on the left of a wall") == "zwx, a heart on the right of a wall"
    assert swap_sides("Left eye, RIGHT hand, leftmost, rightwards") == "Right eye, LEFT hand, rightmost, leftwards"
    assert swap_sides("left-hand side, right, left") == "right-hand side, left, right"
    untouched = "bright, upright, leftover, copyright, alright, bright_light, leftover_food"
    assert swap_sides(untouched) == untouched
    # booru tags: an underscore parts words ("left_hand" had stayed while "right-eye" turned left-eye)
    assert swap_sides("left_hand, right-eye, looking_to_the_LEFT") == "right_hand, left-eye, looking_to_the_RIGHT"
    assert swap_sides(swap_sides("a on the left, b on the right")) == "a on the left, b on the right"


def test_mirrored_pictures_get_the_swapped_caption_and_only_they(tmp_path):
    folder = two_sided(tmp_path / "d", n=4)
    for i in range(4):
        (folder / f"p{i}.txt").write_text(f"zwx {i} on the left")
    swapping = make_data(folder, flip=True)
    swapping.swap_sides = True
    plain = make_data(folder, flip=True)
    seen = set()
    for step in range(8):
        batch, other = swapping.batch([0, 1, 2, 3], 1, step, use_cache=False), plain.batch([0, 1, 2, 3], 1, step,
                                                                                         use_cache=False)
        for i, (text, mirrored) in enumerate(zip(batch["captions"], batch["mirrored"])):
            assert text == f"zwx {i} on the {'right' if mirrored else 'left'}"
            seen.add(mirrored)
        assert other["captions"] == [f"zwx {i} on the left" for i in range(4)]   # without it: as written
    assert seen == {True, False}
    with pytest.raises(UserError, match="needs flip_aug"):
        TrainSettings.from_dict({"data": "x", "flip_swap_sides": True}).validate()
