"""masked_loss: a picture's alpha channel weights its loss per latent cell (fitted, cropped and mirrored with the
pixels); opaque pictures weigh 1; the run's loss is weighted by it, from pixels and from the latent cache; the
file says so; a run whose pictures have no transparency is told."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lib_sdtrain.data.buckets import BucketAssignment, BucketPlan
from lib_sdtrain.data.captions import CaptionOptions
from lib_sdtrain.data.dataset import TrainData, load_picture_and_mask
from lib_sdtrain.data.scan import scan_dataset
from lib_sdtrain.errors import UserError
from lib_sdtrain.events import EventLog, Events
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train import loop
from lib_sdtrain.train.settings import TrainSettings

SQUARE = BucketAssignment(bucket=(64, 64), resized=(64, 64), original=(64, 64), crop_left=0, crop_top=0,
                          ar_error=0.0)


def half_transparent(path, opaque_alpha=255):
    """64×64: the left half fully transparent, the right half at `opaque_alpha`."""
    im = Image.new("RGBA", (64, 64), (200, 0, 0, opaque_alpha))
    im.paste((0, 0, 200, 0), (0, 0, 32, 64))
    im.save(path)
    return path


def test_the_mask_is_the_alpha_per_latent_cell_and_follows_the_mirror(tmp_path):
    path = half_transparent(tmp_path / "a.png")
    pixels, mask = load_picture_and_mask(path, SQUARE, mask=True)
    assert pixels.shape == (3, 64, 64) and mask.shape == (1, 8, 8)
    assert torch.equal(mask[0, :, :4], torch.zeros(8, 4)) and torch.equal(mask[0, :, 4:], torch.ones(8, 4))
    assert torch.allclose(pixels[:, :, :32], torch.ones(3, 64, 32))         # transparent: white underneath
    _, mirrored = load_picture_and_mask(path, SQUARE, mask=True, mirrored=True)
    assert torch.equal(mirrored, mask.flip(-1))
    assert load_picture_and_mask(path, SQUARE)[1] is None                    # not asked for
    Image.new("RGBA", (64, 64), (1, 2, 3, 255)).save(tmp_path / "opaque.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "rgb.png")
    assert load_picture_and_mask(tmp_path / "opaque.png", SQUARE, mask=True)[1] is None
    assert load_picture_and_mask(tmp_path / "rgb.png", SQUARE, mask=True)[1] is None
    # a bucket cut out of a wider picture: the mask is cut at the same place (the picture's right part)
    wide = Image.new("RGBA", (128, 64), (0, 0, 0, 0))
    wide.paste((9, 9, 9, 255), (96, 0, 128, 64))
    wide.save(tmp_path / "wide.png")
    cut = BucketAssignment(bucket=(64, 64), resized=(128, 64), original=(128, 64), crop_left=64, crop_top=0,
                           ar_error=0.0)
    _, m = load_picture_and_mask(tmp_path / "wide.png", cut, mask=True)
    assert torch.equal(m[0, :, 4:], torch.ones(8, 4)) and torch.equal(m[0, :, :4], torch.zeros(8, 4))


def test_batches_carry_the_masks_from_pixels_and_from_the_cache(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    half_transparent(folder / "a.png")
    Image.new("RGB", (64, 64), (0, 90, 0)).save(folder / "b.png")
    records = sorted(scan_dataset(str(folder)).usable, key=lambda r: r.path.name)
    data = TrainData(records, BucketPlan([SQUARE] * 2, [1, 1], [(64, 64)]), CaptionOptions(), seed=0, masked=True,
                     flip=True)
    batch = data.batch([0, 1], 1, 0, use_cache=False)
    want_a = load_picture_and_mask(records[0].path, SQUARE, mask=True, mirrored=batch["mirrored"][0])[1]
    assert torch.equal(batch["masks"][0], want_a) and torch.equal(batch["masks"][1], torch.ones(1, 8, 8))
    cached = TrainData(records, data.plan, CaptionOptions(), seed=0, masked=True, flip=True)
    cached.build_cache(lambda px: torch.nn.functional.avg_pool2d(px, 8), model_id="m")
    for step in range(6):
        b = cached.batch([0, 1], 1, step, use_cache=True)
        m = load_picture_and_mask(records[0].path, SQUARE, mask=True, mirrored=b["mirrored"][0])[1]
        assert torch.equal(b["masks"][0], m)
    plain = TrainData(records, data.plan, CaptionOptions(), seed=0)
    assert "masks" not in plain.batch([0, 1], 1, 0, use_cache=False)


def test_with_the_mask_on_alpha_is_a_weight_and_the_colours_stay(tmp_path):
    """A background at alpha 0.2 keeps its colours when masked (A1111 and kohya read alpha as a weight); only
    alpha 0 goes white. Without the mask the same picture is put on white by its transparency."""
    im = Image.new("RGBA", (64, 64), (0, 0, 200, 51))        # blue at weight 0.2
    im.paste((200, 0, 0, 255), (32, 0, 64, 64))             # red, full weight
    im.paste((10, 10, 10, 0), (0, 0, 8, 8))                 # one latent cell at weight 0: its stored colour is junk
    im.save(tmp_path / "w.png")
    pixels, mask = load_picture_and_mask(tmp_path / "w.png", SQUARE, mask=True)
    blue = torch.tensor([0, 0, 200]) / 127.5 - 1.0
    red = torch.tensor([200, 0, 0]) / 127.5 - 1.0
    assert torch.allclose(pixels[:, 32, 16], blue) and torch.allclose(pixels[:, 32, 48], red)
    assert torch.allclose(pixels[:, :8, :8], torch.ones(3, 8, 8))
    assert mask[0, 0, 0] == 0 and mask[0, 4, 1].item() == pytest.approx(0.2) and mask[0, 4, 6] == 1
    composited, _ = load_picture_and_mask(tmp_path / "w.png", SQUARE)
    assert composited[0, 32, 16] > 0.5          # unmasked: 80 % white over the blue


def test_the_disk_cache_keeps_the_mask_and_tells_weighted_pictures_apart(tmp_path, monkeypatch):
    from lib_sdtrain.data import dataset as D

    folder = tmp_path / "d"
    folder.mkdir()
    half_transparent(folder / "a.png", opaque_alpha=128)
    records = scan_dataset(str(folder)).usable
    plan = BucketPlan([SQUARE], [1], [(64, 64)])
    masked = TrainData(records, plan, CaptionOptions(), seed=0, masked=True)
    plain = TrainData(records, plan, CaptionOptions(), seed=0)
    assert masked.cache_key(0, "m") != plain.cache_key(0, "m")     # different pixels, different latents
    disk = tmp_path / "cache"
    disk.mkdir()
    encode = lambda px: torch.nn.functional.avg_pool2d(px, 8)
    masked.build_cache(encode, model_id="m", disk_dir=disk)
    want = masked.mask(0)
    reads = []
    real = D.load_picture_and_mask
    monkeypatch.setattr(D, "load_picture_and_mask", lambda *a, **k: reads.append(a) or real(*a, **k))
    again = TrainData(records, plan, CaptionOptions(), seed=0, masked=True)
    again.build_cache(encode, model_id="m", disk_dir=disk)
    assert torch.equal(again.mask(0), want) and torch.equal(again.cache[0], masked.cache[0])
    assert reads == []                           # mask and latents both from the disk: the picture is not read
    assert len(list(disk.iterdir())) == 1


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny.safetensors", "sd1")


def run(model, tmp_path, data, name, monkeypatch, statuses=None, **over):
    """Two steps with the element-wise loss replaced by 1 everywhere: the loss then reads the mean weight.
    `statuses`: a list that receives the run's status lines."""
    from lib_sdtrain.train import noise as N

    monkeypatch.setattr(N, "elementwise_loss", lambda pred, target, *a, **k: pred * 0 + 1)
    cfg = TrainSettings.from_dict({
        "model": str(model), "data": str(data), "output": str(tmp_path / name), "name": name, "resolution": 64,
        "min_bucket": 64, "max_bucket": 64, "batch_size": 1, "epochs": 1, "max_steps": 2, "optimizer": "sgd",
        "save_every_n_epochs": 0, "save_state": False, "tensorboard": False,
        "lora": {"network_dim": 4, "save_dtype": "fp32"}, **over})
    log = EventLog()
    result = loop.train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host"),
                        Events(log))
    with safe_open(str(result.final), "pt") as f:
        meta = f.metadata()
    if statuses is not None:
        statuses.extend(e.data["text"] for e in log.since(0)[1] if e.kind == "status")
    return result.losses, meta, [e.data["text"] for e in log.since(0)[1] if e.kind == "warning"]


@pytest.mark.parametrize("cache", [True, False])
def test_the_loss_is_weighted_by_the_alpha(model, tmp_path, monkeypatch, cache):
    data = tmp_path / "data" / "1_zwx"
    data.mkdir(parents=True)
    half_transparent(data / "a.png", opaque_alpha=255)
    (data / "a.txt").write_text("zwx")
    losses, meta, warnings = run(model, tmp_path, data.parent, "m", monkeypatch, masked_loss=True,
                                 cache_latents=cache)
    assert losses == pytest.approx([0.5, 0.5]) and meta["ss_masked_loss"] == "True"
    assert not any("masked_loss" in w for w in warnings)
    losses, meta, _ = run(model, tmp_path, data.parent, "u", monkeypatch, cache_latents=cache)
    assert losses == pytest.approx([1.0, 1.0]) and meta["ss_masked_loss"] == "False"
    # normalized: the loss is the mean over the weighted half only
    losses, _, _ = run(model, tmp_path, data.parent, "n", monkeypatch, cache_latents=cache, masked_loss=True,
                       masked_loss_normalize=True)
    assert losses == pytest.approx([1.0, 1.0])
    with pytest.raises(UserError, match="needs masked_loss"):
        run(model, tmp_path, data.parent, "x", monkeypatch, masked_loss_normalize=True)


def test_a_masked_run_without_transparent_pictures_is_told(model, tmp_path, monkeypatch):
    data = tmp_path / "data" / "1_zwx"
    data.mkdir(parents=True)
    Image.new("RGB", (64, 64), (0, 90, 0)).save(data / "b.png")
    losses, _, warnings = run(model, tmp_path, data.parent, "w", monkeypatch, masked_loss=True)
    assert losses == pytest.approx([1.0, 1.0])
    assert any("none of the 1 pictures has transparency" in w for w in warnings)


def test_pictures_that_weigh_nothing_are_told_and_a_run_of_only_such_pictures_is_refused(model, tmp_path,
                                                                                         monkeypatch):
    """A picture fully transparent (or with a mask file black all over) trains nothing, held out it measures 0:
    such runs had gone on without a word, and one of only such pictures trained nothing at all."""
    data = tmp_path / "data" / "1_zwx"
    data.mkdir(parents=True)
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(data / "a.png")
    Image.new("RGB", (64, 64), (0, 90, 0)).save(data / "b.png")
    Image.new("L", (64, 64), 0).save(data / "b-masklabel.png")
    with pytest.raises(UserError, match="every picture's loss weight is 0 everywhere"):
        run(model, tmp_path, data.parent, "z", monkeypatch, masked_loss=True)
    half_transparent(data / "c.png", opaque_alpha=255)
    statuses = []
    _, _, warnings = run(model, tmp_path, data.parent, "w", monkeypatch, statuses, masked_loss=True)
    assert any("2 of 3 pictures weigh 0 everywhere" in w for w in warnings), warnings
    # where each picture's weights come from: b's sidecar, a's and c's alpha
    assert "masked_loss: 1 of 3 training pictures weighted by a mask file, 2 by their alpha channel, 0 whole" \
        in statuses, statuses
    _, _, warnings = run(model, tmp_path, data.parent, "h", monkeypatch, masked_loss=True, validation_split=0.5,
                         seed=0)   # holds out a and b
    assert any("held-out pictures weigh 0 everywhere" in w and "validation loss is always 0" in w
               for w in warnings), warnings


# ---- mask files: OneTrainer's "-masklabel" sidecar and kohya's mask folder -------------------------------------
def grey_mask(path, left, right, size=(64, 64)):
    """A grey mask: `left` on the left half, `right` on the right half (0-255)."""
    im = Image.new("L", size, right)
    im.paste(left, (0, 0, size[0] // 2, size[1]))
    im.save(path)
    return path


def test_a_masklabel_sidecar_is_a_mask_not_a_picture(tmp_path):
    folder = tmp_path / "d" / "3_sks"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (0, 90, 0)).save(folder / "a.png")
    grey_mask(folder / "a-masklabel.png", 0, 255)
    grey_mask(folder / "lost-masklabel.png", 0, 255)
    report = scan_dataset(str(tmp_path / "d"))
    assert [r.path.name for r in report.records] == ["a.png"]           # never trained on as a picture
    assert report.records[0].mask == folder / "a-masklabel.png"
    assert not report.skipped and any("lost-masklabel.png" in n and "without its picture" in n for n in report.notes)
    assert report.counts()["mask_files"] == 1 and report.to_dict()["records"][0]["mask"].endswith("a-masklabel.png")
    from lib_sdtrain.ui.dataset_tab import scan_report

    assert "1 with a loss mask file" in scan_report(str(tmp_path / "d"))
    from lib_sdtrain.ui.dataset_tab import load_caption, masked_thumbnail, picture_mask

    assert "loss mask a-masklabel.png" in load_caption(str(tmp_path / "d"), "", "3_sks/a.png")[2]
    mask = picture_mask(str(tmp_path / "d"), "", "3_sks/a.png")
    shown = masked_thumbnail(folder / "a.png", mask, 64)
    assert shown.getpixel((10, 30)) == (0, round(90 * 0.25), 0) and shown.getpixel((50, 30)) == (0, 90, 0)


def test_a_mask_file_gives_the_weights_from_its_red_channel(tmp_path):
    Image.new("RGBA", (64, 64), (200, 0, 0, 0)).save(tmp_path / "p.png")     # fully transparent picture
    grey_mask(tmp_path / "m.png", 0, 127)
    pixels, weights = load_picture_and_mask(tmp_path / "p.png", SQUARE, mask=True, mask_file=tmp_path / "m.png")
    assert torch.equal(weights[0, :, :4], torch.zeros(8, 4))
    assert torch.allclose(weights[0, :, 4:], torch.full((8, 4), 127 / 255))
    assert torch.allclose(pixels, torch.ones(3, 64, 64))        # its transparency is transparency again: white
    _, mirrored = load_picture_and_mask(tmp_path / "p.png", SQUARE, mask=True, mirrored=True,
                                        mask_file=tmp_path / "m.png")
    assert torch.equal(mirrored, weights.flip(-1))
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "small_red.png")   # another size, same frame: resized;
    _, red = load_picture_and_mask(tmp_path / "p.png", SQUARE, mask=True, mask_file=tmp_path / "small_red.png")
    assert torch.equal(red, torch.ones(1, 8, 8))                # red channel 255 = weight 1, even in colour
    assert load_picture_and_mask(tmp_path / "p.png", SQUARE, mask_file=tmp_path / "m.png")[1] is None  # not asked


@pytest.mark.parametrize("mode, value, fmt", [("I;16", 32768, "PNG"), ("I", 32768, "TIFF"), ("F", 0.5, "TIFF"),
                                              ("L", 128, "PNG"), ("P", 0, "PNG"), ("1", 1, "PNG")])
def test_masks_of_every_depth_give_the_weight_they_show(tmp_path, mode, value, fmt):
    """A 16-bit mid-grey is half, not white (PIL's own conversion clips it to 255); float grey reads 0-1."""
    import numpy as np

    from lib_sdtrain.data.masks import weight_channel

    im = Image.new(mode, (8, 8), value)
    if mode == "P":
        im.putpalette([128, 0, 0] * 256)                      # palette entry 0: red 128
    im.save(tmp_path / f"m.{fmt.lower()}", format=fmt)
    with Image.open(tmp_path / f"m.{fmt.lower()}") as back:
        got = np.asarray(weight_channel(back))
    want = 255 if mode == "1" else 128
    assert got.dtype == np.uint8 and abs(int(got[0, 0]) - want) <= 1, (mode, got[0, 0])


def test_a_mask_folder_in_kohyas_layout(tmp_path):
    from lib_sdtrain.data.masks import attach_mask_dir, check_masks

    data = tmp_path / "data"
    for sub in ("3_sks", "1_other"):
        (data / sub).mkdir(parents=True)
        Image.new("RGB", (128, 96), (0, 90, 0)).save(data / sub / "a.jpg")
    Image.new("RGB", (128, 96), (0, 90, 0)).save(data / "3_sks" / "b.png")
    masks = tmp_path / "masks"
    (masks / "3_sks").mkdir(parents=True)
    grey_mask(masks / "3_sks" / "a.png", 0, 255, (128, 96))       # the same sub-folder: this one
    grey_mask(masks / "a.png", 255, 0, (128, 96))                 # the top: for pictures with none in their sub-folder
    records = sorted(scan_dataset(str(data)).usable, key=lambda r: str(r.path))
    assert attach_mask_dir(records, masks, [data]) == 2
    got = {str(r.path.relative_to(data)): r.mask for r in records}
    assert got == {"1_other/a.jpg": masks / "a.png", "3_sks/a.jpg": masks / "3_sks" / "a.png", "3_sks/b.png": None}
    # class pictures named as the instance ones: the top's a.png is not theirs, their own sub-folder's b.png is
    reg = tmp_path / "reg"
    (reg / "1_shape").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (128, 96), (90, 0, 0)).save(reg / "1_shape" / name)
    (masks / "1_shape").mkdir()
    grey_mask(masks / "1_shape" / "b.png", 0, 255, (128, 96))
    both = sorted(scan_dataset(str(data), reg_path=str(reg)).usable, key=lambda r: str(r.path))
    assert attach_mask_dir(both, masks, [data, reg]) == 3
    got = {str(r.path.relative_to(tmp_path)): r.mask for r in both if r.is_regularization}
    assert got == {"reg/1_shape/a.jpg": None, "reg/1_shape/b.jpg": masks / "1_shape" / "b.png"}
    check_masks(records)
    grey_mask(masks / "3_sks" / "a.png", 0, 255, (128, 128))      # another frame: refused before training
    with pytest.raises(UserError, match="own frame") as refused:
        check_masks(records)
    assert "turned a quarter" not in str(refused.value)
    grey_mask(masks / "3_sks" / "a.png", 0, 255, (96, 128))       # the frame turned: the refusal says so
    with pytest.raises(UserError, match=r"96×128 .*turned a quarter.*EXIF orientation.*own frame"):
        check_masks(records)
    Image.new("L", (128 * 5, 96 * 5), 255).save(masks / "3_sks" / "a.png")   # the frame, but 25 times the pixels
    with pytest.raises(UserError, match="times the pixels"):
        check_masks(records)
    (masks / "3_sks" / "a.png").write_bytes(b"not a picture")
    with pytest.raises(UserError, match="cannot be read"):
        check_masks(records)
    with pytest.raises(UserError, match="not a folder"):
        attach_mask_dir(records, tmp_path / "nowhere", [data])


def test_a_damaged_mask_or_a_picture_as_its_own_mask_is_refused_before_training(tmp_path):
    """A mask file whose header reads but whose data is cut short (a JPEG cut at 70 %) is refused by the check
    before training, not by the step that first decodes it (it raised OSError there); a mask_dir that is the
    dataset folder itself would weight each picture by its own red channel, and is refused too."""
    from lib_sdtrain.data.masks import attach_mask_dir, check_masks

    data = tmp_path / "data" / "2_sks"
    data.mkdir(parents=True)
    Image.new("RGB", (64, 64), (0, 90, 0)).save(data / "a.png")
    masks = tmp_path / "masks"
    masks.mkdir()
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(noisy, "L").save(masks / "a.jpg", quality=90)
    whole = (masks / "a.jpg").read_bytes()
    records = scan_dataset(str(data.parent)).usable
    assert attach_mask_dir(records, masks, [data.parent]) == 1
    check_masks(records)
    (masks / "a.jpg").write_bytes(whole[: int(len(whole) * 0.7)])
    with Image.open(masks / "a.jpg") as im:
        assert im.size == (64, 64)                  # the header still reads
    with pytest.raises(UserError, match="cannot be read as a picture"):
        check_masks(records)
    records = scan_dataset(str(data.parent)).usable
    assert attach_mask_dir(records, data.parent, [data.parent]) == 1
    with pytest.raises(UserError, match="that picture itself"):
        check_masks(records)


def test_the_cache_key_follows_the_mask_file(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.new("RGB", (64, 64), (0, 90, 0)).save(folder / "a.png")
    grey_mask(folder / "a-masklabel.png", 0, 255)
    records = scan_dataset(str(folder)).usable
    plan = BucketPlan([SQUARE], [1], [(64, 64)])
    key = TrainData(records, plan, CaptionOptions(), seed=0, masked=True).cache_key(0, "m")
    assert key != TrainData(records, plan, CaptionOptions(), seed=0).cache_key(0, "m")
    grey_mask(folder / "a-masklabel.png", 255, 0)                # the mask edited: its cached copy is not served
    assert TrainData(records, plan, CaptionOptions(), seed=0, masked=True).cache_key(0, "m") != key


def test_training_reads_the_mask_files_and_refuses_a_mask_dir_without_masked_loss(model, tmp_path, monkeypatch):
    data = tmp_path / "data" / "1_zwx"
    data.mkdir(parents=True)
    Image.new("RGB", (64, 64), (0, 90, 0)).save(data / "a.png")
    (data / "a.txt").write_text("zwx")
    masks = tmp_path / "masks"
    masks.mkdir()
    grey_mask(masks / "a.png", 0, 255)                           # half the picture trains
    losses, _, warnings = run(model, tmp_path, data.parent, "k", monkeypatch, masked_loss=True,
                                 mask_dir=str(masks))
    assert losses == pytest.approx([0.5, 0.5]) and not any("masked_loss" in w for w in warnings)
    grey_mask(data / "a-masklabel.png", 0, 51)                   # a sidecar; the mask folder still wins
    losses, _, _ = run(model, tmp_path, data.parent, "k2", monkeypatch, masked_loss=True, mask_dir=str(masks))
    assert losses == pytest.approx([0.5, 0.5])
    losses, _, _ = run(model, tmp_path, data.parent, "o", monkeypatch, masked_loss=True)   # the sidecar: 0.2 on half
    assert losses == pytest.approx([0.1, 0.1])
    losses, _, _ = run(model, tmp_path, data.parent, "u", monkeypatch)                      # masked_loss off
    assert losses == pytest.approx([1.0, 1.0])
    with pytest.raises(UserError, match="mask_dir is read only with masked_loss"):
        run(model, tmp_path, data.parent, "r", monkeypatch, mask_dir=str(masks))


def test_the_dataset_tab_reads_a_mask_folder_and_lists_masks_training_refuses(tmp_path, monkeypatch):
    """The Dataset tab with kohya's mask folder: its masks replace the sidecars in the count and the preview, a
    folder with no matching mask says so, a mask of another frame is listed before training would refuse it, and
    a path that is not a folder is a clear error."""
    from lib_sdtrain.errors import UserError
    from lib_sdtrain.ui.dataset_tab import load_caption, picture_mask, scan_report

    folder = tmp_path / "d" / "3_sks"
    folder.mkdir(parents=True)
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), (0, 90, 0)).save(folder / f"{name}.png")
    grey_mask(folder / "a-masklabel.png", 255, 255)                      # a sidecar the folder overrides
    masks = tmp_path / "masks" / "3_sks"
    masks.mkdir(parents=True)
    grey_mask(masks / "a.png", 0, 255)
    grey_mask(masks / "b.png", 0, 255, size=(64, 32))                    # another frame: refused by training
    d, m = str(tmp_path / "d"), str(tmp_path / "masks")
    import lib_sdtrain.data.scan as scan_module

    real, scans = scan_module.scan_dataset, []
    monkeypatch.setattr(scan_module, "scan_dataset", lambda *a, **k: scans.append(1) or real(*a, **k))
    text = scan_report(d, mask_dir=m)
    assert "2 with a loss mask file (2 from the mask folder; used with masked_loss)" in text
    assert "Loss masks that training refuses" in text and "| 3_sks/b.png |" in text and "64×32" in text
    assert picture_mask(d, "", "3_sks/a.png", mask_dir=m) == masks / "a.png"
    assert picture_mask(d, "", "3_sks/a.png") == folder / "a-masklabel.png"      # without the folder: the sidecar
    assert len(scans) == 1                          # one scan of the pictures serves both views
    assert "loss mask a.png" in load_caption(d, "", "3_sks/a.png", mask_dir=m)[2]
    assert "refuses" not in scan_report(d)                                         # the sidecar is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    text = scan_report(d, mask_dir=str(empty))
    assert "No picture has a mask in the mask folder" in text and '1 "-masklabel" beside the picture' in text
    with pytest.raises(UserError, match="is not a folder"):
        scan_report(d, mask_dir=str(tmp_path / "nowhere"))


def test_checking_masks_reads_each_mask_file_once_and_finds_the_ones_that_weigh_nothing(tmp_path, monkeypatch):
    from lib_sdtrain.data import masks as M

    data = tmp_path / "data" / "2_sks"
    data.mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.new("RGB", (128, 96), (0, 90, 0)).save(data / f"{name}.png")
    Image.new("L", (128, 96), 255).save(data / "a-masklabel.png")     # trains whole
    Image.new("L", (128, 96), 0).save(data / "b-masklabel.png")       # black all over: trains nothing
    Image.new("RGBA", (128, 96), (0, 0, 0, 0)).save(data / "c.png")   # no mask file, transparent all over
    records = sorted(scan_dataset(str(tmp_path / "data")).usable, key=lambda r: str(r.path))
    assert [r.mask is not None for r in records] == [True, True, False]
    opened = []
    real_open = M.Image.open

    def counting_open(fp, *a, **k):
        opened.append(os.path.basename(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(M.Image, "open", counting_open)
    blank = M.check_masks(records)
    assert [r.path.name for r in blank] == ["b.png", "c.png"]
    # one decode per mask file (the pictures' own alpha is read only where there is no mask file)
    assert sorted(opened) == ["a-masklabel.png", "b-masklabel.png", "c.png"]
