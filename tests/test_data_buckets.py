"""data/buckets.py against kohya's sd-scripts (model_util.make_bucket_resolutions, BucketManager.select_bucket).

The expected ladders are sd-scripts' output at commit 48d368f (run out of tree); the assignments were checked
against BucketManager on 15,000 random sizes (0 mismatches) and the cases below are worked by hand.
"""

import json
from collections import Counter

import pytest

from lib_sdtrain.data import buckets as B
from lib_sdtrain.errors import UserError

KOHYA_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
             (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
             (1024, 256)]
KOHYA_1024_256_2048 = [
    (256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 1856), (512, 1920), (512, 1984), (512, 2048),
    (576, 1664), (576, 1728), (576, 1792), (640, 1536), (640, 1600), (704, 1408), (704, 1472), (768, 1280),
    (768, 1344), (832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1088, 960), (1152, 896), (1216, 832),
    (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 256), (2048, 320), (2048, 384), (2048, 448),
    (2048, 512)]


def test_ladder_512_is_kohyas_17_buckets():
    ladder = B.make_bucket_ladder(512, 256, 1024, 64)
    assert ladder == KOHYA_512 and len(ladder) == 17
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in ladder)


def test_ladder_1024_min_256_max_2048():
    assert B.make_bucket_ladder(1024, 256, 2048, 64) == KOHYA_1024_256_2048


def test_ladder_non_square_and_rounding_of_min_max():
    ladder = B.make_bucket_ladder((768, 512), 250, 1000)      # min → 192, max → 1024, like kohya's adjust
    assert (640, 576) in ladder and max(max(b) for b in ladder) <= 1024 and min(min(b) for b in ladder) >= 192


@pytest.mark.parametrize("args", [(512, 600, 1024, 64), (512, 256, 448, 64), (512, 256, 1024, 60), (32, 8, 64, 64)])
def test_bad_settings_are_user_errors(args):
    with pytest.raises(UserError):
        B.make_bucket_ladder(*args)


@pytest.mark.parametrize("size, no_upscale, bucket, resized, crop", [
    ((1000, 500), False, (704, 320), (704, 352), (0, 16)),   # nearest aspect 2.2; cover by width, crop height
    ((600, 800), False, (448, 576), (448, 597), (0, 10)),
    ((512, 512), False, (512, 512), (512, 512), (0, 0)),     # exact size wins
    ((300, 200), False, (640, 384), (640, 427), (0, 21)),    # upscaled to cover
    ((2000, 1000), True, (640, 320), (640, 320), (0, 0)),    # downscaled to max area at its own aspect
    ((300, 200), True, (256, 192), (300, 200), (22, 4)),     # own bucket, floored to 64, centre crop
])
def test_assignment_matches_kohya(size, no_upscale, bucket, resized, crop):
    a = B.assign_bucket(*size, KOHYA_512, no_upscale=no_upscale, max_area=512 * 512)
    assert (a.bucket, a.resized, (a.crop_left, a.crop_top)) == (bucket, resized, crop)
    assert a.original == size
    assert a.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


def test_size_conditioning_is_height_width_order():
    a = B.assign_bucket(1000, 500, KOHYA_512)
    sc = a.size_conditioning()
    assert sc.original_size == (500, 1000) and sc.crop_top_left == (16, 0) and sc.target_size == (320, 704)
    # kohya fits the picture inside the bucket instead: 640×320 centred in 704 → "left" 32, where we cut 16 rows
    assert B.kohya_crop_ltrb((704, 320), (1000, 500)) == (32.0, 0, 672.0, 320)


def test_bucket_info_is_kohyas_structure():
    sizes = [(1000, 500), (1000, 500), (600, 800), (512, 512)]
    plan = B.plan_buckets(sizes, [10, 10, 10, 3], resolution=512)
    info = plan.bucket_info()
    assert info["buckets"] == {0: {"resolution": [448, 576], "count": 10}, 1: {"resolution": [512, 512], "count": 3},
                               2: {"resolution": [704, 320], "count": 20}}
    assert info["mean_img_ar_error"] == pytest.approx((0.2 + 0.2 + 0.02777777 + 0) / 4)
    assert json.loads(json.dumps(info))["buckets"]["2"]["resolution"] == [704, 320]   # as A1111 reads it
    assert plan.batch_count(4) == 3 + 1 + 5


def test_fixed_size_without_buckets():
    plan = B.plan_buckets([(1000, 500), (300, 900)], [1, 1], resolution=512, enable=False)
    assert [a.bucket for a in plan.assignments] == [(512, 512), (512, 512)]
    assert plan.assignments[0].resized == (1024, 512) and plan.assignments[0].crop_left == 256


def test_sampler_batches_stay_in_one_bucket_and_count_repeats():
    buckets = [(512, 512)] * 5 + [(704, 320)] * 3 + [(448, 576)] * 1
    repeats = [2] * 5 + [3] * 3 + [1]
    s = B.BucketBatchSampler(buckets, repeats, batch_size=4, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 3 + 3 + 1
    for b in batches:
        assert len({buckets[i] for i in b}) == 1
    assert Counter(i for b in batches for i in b) == {i: n for i, n in enumerate(repeats)}


def test_sampler_is_deterministic_per_seed_and_epoch():
    buckets = [(512, 512)] * 20 + [(704, 320)] * 20
    s = B.BucketBatchSampler(buckets, [1] * 40, batch_size=4, seed=7)
    e0 = s.batches(0)
    assert e0 == B.BucketBatchSampler(buckets, [1] * 40, batch_size=4, seed=7).batches(0)
    s.set_epoch(1)
    assert list(s) != e0 and list(s) == s.batches(1)
    assert B.BucketBatchSampler(buckets, [1] * 40, batch_size=4, seed=8).batches(0) != e0
    ordered = B.BucketBatchSampler(buckets, [1] * 40, batch_size=4, shuffle=False).batches(0)
    assert ordered[0] == [0, 1, 2, 3]


def test_sampler_drop_last_and_from_plan():
    plan = B.plan_buckets([(512, 512)] * 5, [1] * 5, resolution=512)
    s = B.BucketBatchSampler.from_plan(plan, 2, drop_last=True)
    assert len(s) == 2 and all(len(b) == 2 for b in s)
    with pytest.raises(UserError):
        B.BucketBatchSampler([(512, 512)], [1], 0)


def test_sampler_works_as_a_torch_batch_sampler():
    torch = pytest.importorskip("torch")
    data = torch.arange(10)
    s = B.BucketBatchSampler([(512, 512)] * 6 + [(704, 320)] * 4, [1] * 10, batch_size=3, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_sampler=s)
    seen = sorted(int(x) for batch in loader for x in batch)
    assert seen == list(range(10))


@pytest.mark.parametrize("text, size", [("512", (512, 512)), (" 768x512 ", (768, 512)), ("768 X 512", (768, 512)),
                                        ("768,512", (768, 512)), ("768, 512", (768, 512)), (512, (512, 512)),
                                        (512.0, (512, 512)), ("520", (520, 520)), ("64x4096", (64, 4096))])
def test_parse_resolution_takes_every_form_the_cli_and_the_tab_took(text, size):
    assert B.parse_resolution(text) == size


@pytest.mark.parametrize("text, message", [("32", "from 64 to 4096"), ("512x5000", "from 64 to 4096"),
                                           ("-512", "from 64 to 4096"), ("0x0", "from 64 to 4096"),
                                           ("abc", "whole number or WxH"), ("512x", "whole number or WxH"),
                                           ("512.5", "whole number or WxH"), ("1,2,3", "whole number or WxH"),
                                           ("", "whole number or WxH"), ("nan", "whole number or WxH")])
def test_parse_resolution_refuses_odd_sizes_and_junk_naming_the_value(text, message):
    with pytest.raises(UserError, match=message) as e:
        B.parse_resolution(text)
    assert repr(text) in str(e.value)


def test_the_buckets_tab_and_the_cli_share_the_resolution_parser(tmp_path, capsys):
    # The tab had its own parser: it drew a bucket report at 32 or 99999 px and refused "768,512", which
    # kohya's --resolution and ss_resolution take; the CLI refused "768,512" too.
    from PIL import Image

    from lib_sdtrain import cli
    from lib_sdtrain.ui.dataset_tab import bucket_settings

    with pytest.raises(UserError, match="from 64 to 4096"):
        bucket_settings("99999", 0, 0, 64)
    with pytest.raises(UserError, match="from 64 to 4096"):
        bucket_settings("32", 0, 0, 64)
    assert bucket_settings("768,512", 0, 0, 64) == ("768,512", 256, 1536)
    folder = tmp_path / "1_x"
    folder.mkdir()
    Image.new("RGB", (256, 128)).save(folder / "a.png")
    assert cli.main(["dataset", "buckets", str(tmp_path), "--json", "--resolution", "128,64"]) == 0
    assert json.loads(capsys.readouterr().out)["pictures"][0]["bucket"] == [128, 64]


def test_the_buckets_tab_and_the_cli_take_the_same_default_bounds_for_two_sides(tmp_path, capsys):
    # For "768x512" the tab took both bounds from the longer side (384-1536) and the CLI from the shorter
    # (256-1024): the same dataset got two bucket ladders. Both now take 256-1536, which holds both sides.
    from PIL import Image

    from lib_sdtrain import cli
    from lib_sdtrain.ui.dataset_tab import bucket_settings

    _, low, high = bucket_settings("768x512", 0, 0, 512)
    assert (low, high) == (256, 1536)
    (tmp_path / "1_x").mkdir()
    Image.new("RGB", (300, 200)).save(tmp_path / "1_x" / "a.png")
    assert cli.main(["dataset", "buckets", str(tmp_path), "--json", "--resolution", "768x512"]) == 0
    ladder = json.loads(capsys.readouterr().out)["ladder"]
    assert min(min(b) for b in ladder) == low and max(max(b) for b in ladder) == high


def test_a_huge_largest_bucket_side_makes_the_ladder_at_once():
    """`dataset buckets --max-bucket 99999999999999999999` never returned: the ladder counted every width up to the
    largest side, although no width past area / min_size has a bucket. Same ladder, now at once."""
    import signal

    def too_slow(*_):
        raise TimeoutError("the bucket ladder took over 10 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(10)
    try:
        huge = B.make_bucket_ladder(512, 256, 10 ** 20, 64)
        plan = B.plan_buckets([(640, 480)], [1], resolution=512, min_size=256, max_size=10 ** 20)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert huge == B.make_bucket_ladder(512, 256, 1024, 64) and len(huge) == 17
    assert plan.assignments[0].bucket in huge
