"""The shipped toy detector on fresh generator pictures, clean and degraded like diffusion samples."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from conftest import toy_cli
from lib_sdtrain.errors import UserError
from lib_sdtrain.toy import detector as D
from lib_sdtrain.toy import world



SEED = 4242          # training used 1234 and its evaluation 777: these pictures are new to the detector


def _scores(found, scenes) -> dict[str, float]:
    out = {k: float(np.mean([getattr(d, k) == getattr(s, k) for d, s in zip(found, scenes)]))
           for k in ("colour", "shape", "background", "size", "position")}
    out["subject_tpr"] = float(np.mean([d.has_subject for d, s in zip(found, scenes) if s.is_subject]))
    out["subject_fpr"] = float(np.mean([d.has_subject for d, s in zip(found, scenes) if not s.is_subject]))
    out["style_tpr"] = float(np.mean([d.has_style for d, s in zip(found, scenes) if s.is_styled]))
    out["style_fpr"] = float(np.mean([d.has_style for d, s in zip(found, scenes) if not s.is_styled]))
    return out


@pytest.fixture(scope="module")
def det():
    torch.set_num_threads(2)
    return D.Detector.load()


@pytest.fixture(scope="module")
def clean():
    scenes = world.sample_mixed_scenes(500, SEED)
    return scenes, world.render_scenes(scenes, 64, SEED)


def test_shipped_weights_are_small_and_describe_themselves(det):
    assert D.WEIGHTS_PATH.stat().st_size <= 1024 * 1024
    assert json.loads(det.metadata["heads"]) == {k: list(v) for k, v in D.HEADS.items()}
    assert "train_seconds" in det.metadata and "eval" in det.metadata


def test_clean_pictures(det, clean):
    scenes, images = clean
    s = _scores(det.detect(images), scenes)
    print("\nclean:", {k: round(100 * v, 1) for k, v in s.items()})
    assert s["colour"] >= 0.95 and s["shape"] >= 0.90 and s["background"] >= 0.95
    assert s["size"] >= 0.95 and s["position"] >= 0.90
    assert s["subject_tpr"] >= 0.90 and s["subject_fpr"] <= 0.05
    assert s["style_tpr"] >= 0.90 and s["style_fpr"] <= 0.05


# Lower floors than on clean pictures (measured: 100 % everywhere, see tools/train_detector.py), but the
# false-positive ceilings stay low: they are the bleeding measure.
MODERATE = dict(colour=0.93, shape=0.85, background=0.93, subject_tpr=0.85, subject_fpr=0.05, style_tpr=0.85,
                style_fpr=0.05)
HARSH = dict(colour=0.85, shape=0.75, background=0.85, subject_tpr=0.75, subject_fpr=0.08, style_tpr=0.75,
             style_fpr=0.08)
DEGRADED = {"blur2": MODERATE, "noise10": MODERATE, "downup2": MODERATE, "mixed": MODERATE, "severe": HARSH}


@pytest.mark.parametrize("kind", list(DEGRADED))
def test_degraded_pictures(det, clean, kind):
    scenes, images = clean
    scenes, images = scenes[:250], images[:250]
    rng = np.random.default_rng([SEED, D.DEGRADATIONS.index(kind)])
    s = _scores(det.detect([D.degrade(im, kind, rng) for im in images]), scenes)
    print(f"\n{kind}:", {k: round(100 * v, 1) for k, v in s.items()})
    for key, bound in DEGRADED[kind].items():
        if key.endswith("fpr"):
            assert s[key] <= bound, (key, s[key])
        else:
            assert s[key] >= bound, (key, s[key])


def test_helpers_and_bigger_pictures(det):
    scenes = world.sample_scenes(60, SEED + 1, holdout="only")      # the base model's held-out prompts
    big = world.render_scenes(scenes, 128, SEED)                      # 128 px works through the same 64 px net
    assert D.colour_accuracy(big, scenes, det) >= 0.95
    assert D.shape_accuracy(big, scenes, det) >= 0.90
    assert D.background_accuracy(big, scenes, det) >= 0.95
    assert D.concept_share(big, "subject", det) <= 0.05 and D.concept_share(big, "zkz", det) <= 0.05
    subj = world.render_scenes(world.sample_scenes(30, SEED, shapes=(world.SUBJECT_SHAPE,)), 64, SEED)
    assert D.concept_share(subj, "zwx", det) >= 0.9
    with pytest.raises(UserError):
        D.concept_share(subj, "dog", det)
    with pytest.raises(UserError):
        D.colour_accuracy(subj, scenes, det)


def test_empty_pictures_are_no_shape_and_no_concept(det):
    # A failed sample (background only, maybe noisy) must count neither as a shape nor as a concept.
    rng = np.random.default_rng(SEED)
    empty = [world.render_background(b, 64, rng) for b in world.BACKGROUNDS * 15]
    for kind in ("clean", "noise10", "mixed"):
        found = det.detect([D.degrade(im, kind, rng) for im in empty])
        none = np.mean([not d.has_shape for d in found])
        concept = np.mean([d.has_subject or d.has_style for d in found])
        print(f"\nempty {kind}: none {100 * none:.1f}%, concept {100 * concept:.1f}%")
        assert none >= 0.9 and concept <= 0.05
        assert np.mean([d.background == b for d, b in zip(found, world.BACKGROUNDS * 15)]) >= 0.9
    with pytest.raises(UserError):
        next(d for d in found if not d.has_shape).scene()


def test_blobs_are_not_concepts(det):
    # Blurry blobs are what a tiny model draws when it fails; they must not count as the subject or style.
    rng = np.random.default_rng(SEED)
    blobs = []
    for i in range(120):
        img = world.render_background(world.BACKGROUNDS[i % 4], 64, rng)
        w = rng.uniform(14, 44)
        h = w / rng.uniform(1.3, 1.8) ** rng.choice([-1, 1])
        cx, cy = rng.uniform(20, 44, 2)
        ImageDraw.Draw(img).ellipse([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                                    fill=world.COLOURS[world.COLOUR_NAMES[i % 6]])
        blobs.append(img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 3)))))
    found = det.detect(blobs)
    concept = np.mean([d.has_subject or d.has_style for d in found])
    colour = np.mean([d.colour == world.COLOUR_NAMES[i % 6] for i, d in enumerate(found)])
    print(f"\nblobs: concept {100 * concept:.1f}%, colour {100 * colour:.1f}%")
    assert concept <= 0.05 and colour >= 0.9


def test_detection_fields(det):
    scene = world.Scene("triangle", "blue", "large", "right", "white", "striped")
    (d,) = det.detect([world.render(scene, 64, np.random.default_rng(0))])
    assert d.scene() == scene and d.has_style and not d.has_subject
    assert 0.5 < d.shape_conf <= 1 and 0 <= d.subject <= 1
    assert set(d.to_dict()) >= {"shape", "shape_conf", "colour", "subject", "style", "has_subject", "has_style"}


def test_load_errors(tmp_path):
    with pytest.raises(UserError):
        D.Detector.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError):
        D.Detector.load(bad)


def test_cli_detect(tmp_path, capsys):
    assert toy_cli(["pictures", "--out", str(tmp_path / "p"), "--n", "6", "--seed", "3"]) == 0
    assert toy_cli(["dataset", "subject", "--out", str(tmp_path / "d"), "--n", "4"]) == 0
    capsys.readouterr()
    subject_folder = str(tmp_path / "d" / "img" / "20_zwx shape")
    assert toy_cli(["detect", str(tmp_path / "p"), subject_folder, "--json", "--score"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 11 and lines[0]["path"].endswith("0000.png")
    assert sum(x["has_subject"] for x in lines[:10]) == 4
    acc = lines[-1]["accuracy"]
    assert acc["colour"] >= 0.9 and acc["subject"] >= 0.9
    assert toy_cli(["detect", str(tmp_path / "p" / "0000.png")]) == 0
    assert "background" in capsys.readouterr().out
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    assert toy_cli(["detect", str(tmp_path / "junk.png")]) == 2
    assert toy_cli(["detect", str(tmp_path / "nowhere")]) == 2


# ---- v2: decoded pictures ------------------------------------------------------------------------------
def _tool(name: str):
    """A script of tools/ imported as a module."""
    from conftest import tool_module

    return tool_module(name)


def _trainer():
    return _tool("train_detector")


def test_decoded_labels_follow_what_the_outline_shows():
    T = _trainer()
    scene = world.Scene("heart", "red", "large", "centre", "gray", "striped")
    src = world.render(scene, 64, np.random.default_rng([9, 31, 0]))
    # a perfect "decoding" keeps every label
    assert T.decoded_labels(scene, src, src, 9, 0) == T.scene_labels(scene)
    # a heart that came back as a round plain blob is not labelled a heart, and its stripes are unknown
    blob = world.render(world.Scene("circle", "red", "large", "centre", "gray"), 64, np.random.default_rng([9, 31, 0]))
    lab = T.decoded_labels(scene, src, blob.filter(ImageFilter.GaussianBlur(1)), 9, 0)
    shape = lab["shape"] if isinstance(lab["shape"], tuple) else (lab["shape"],)
    assert "heart" not in shape and "circle" in shape and lab["style"] is None
    # a blurred heart still fits the heart outline best: a person reads it as a heart, so does the label
    heart = world.Scene("heart", "blue", "large", "left", "white")
    src = world.render(heart, 64, np.random.default_rng([9, 31, 2]))
    assert T.decoded_labels(heart, src, src.filter(ImageFilter.GaussianBlur(2)), 9, 2)["shape"] == "heart"


def test_near_hearts_are_hearts_missing_a_notch_or_a_point():
    # The v4 trial's hard negatives (tools/train_detector.py --near-heart-share): a heart's convex hull (no notch
    # between the lobes) or a heart cut level (no point).
    T = _trainer()
    hull = T._hull([(0, 0), (2, 0), (1, 1), (2, 2), (0, 2), (1, 0.5)])
    assert sorted(hull) == [(0, 0), (0, 2), (2, 0), (2, 2)]
    images, labels = T.render_near_hearts(24, 3)
    assert len(images) == 24 and all("heart" not in lab["shape"] and lab["style"] == "plain" for lab in labels)
    for i, img in enumerate(images):
        bg = world.BACKGROUND_LEVELS[labels[i]["background"]]
        arr = np.asarray(img, dtype=np.int16)
        ramp = np.linspace(bg[0], bg[1], 64)[:, None, None]
        mask = np.abs(arr - ramp).max(-1) > 48
        rows = np.nonzero(mask.any(1))[0]
        widths = mask[rows].sum(1)
        if i % 2 == 0:    # shield: the bottom row is narrow, a point
            assert widths[-1] <= 0.35 * widths.max()
        else:             # bow: the bottom row is still wide, no point
            assert widths[-1] >= 0.3 * widths.max()
    # (Detector v3 never saw them: it calls 62 % of the shields and 15 % of the bows hearts. The shipped v4, trained
    # on them, 13 % and 4 %; see lib_sdtrain/toy/data/README.md.)


def test_vae_round_trips_of_the_bundled_model(det):
    # The detector's v2 training target: decoded pictures. Hearts whose decoded outline still reads as a heart
    # must count as the subject; plain shapes must not.
    T = _trainer()
    parts = T.load_model("")
    imgs, labels, scenes, _ = T.decoded_set(parts, 80, SEED, sample=False)
    found = det.detect(imgs)
    readable = [d.has_subject for d, lab in zip(found, labels) if lab["shape"] == "heart"]
    others = [d.has_subject for d, s in zip(found, scenes) if not s.is_subject]
    plain_shapes = [d.shape == lab["shape"] for d, lab in zip(found, labels)
                    if isinstance(lab["shape"], str) and lab["shape"] != "heart"]
    print(f"\nround trips: readable hearts {np.mean(readable):.2f} of {len(readable)}, "
          f"subject fpr {np.mean(others):.3f}, readable base shapes {np.mean(plain_shapes):.2f}")
    assert len(readable) >= 8 and np.mean(readable) >= 0.8
    assert np.mean(others) <= 0.06
    assert np.mean(plain_shapes) >= 0.8


def _eye_check():
    return _tool("eye_check")


EYE = __import__("pathlib").Path(__file__).resolve().parent / "data" / "toy_eye"


def _sheet_check(sheet: str) -> dict:
    """The shipped detector against a labelled sheet under EYE, per question and per kind of picture (printed
    with -s as n, agreement, kappa)."""
    res = _eye_check().check(None, EYE / sheet, by_source=True)
    print(f"\n{sheet} eye check:", {k: (v["n"], round(v["agreement"], 3), round(v["kappa"], 2)) for k, v in res.items()})
    return res


def test_agrees_with_pictures_labelled_by_eye(det):
    # 64 decoded pictures of the bundled model's kind (VAE round trips, LoRA and base-model samples), labelled by
    # a person before any detector saw them (tests/data/toy_eye/labels.json; tools/eye_check.py makes and checks
    # such a sheet). Shipped detector v4: hearts 95 % agreement (kappa 0.82; v3: 92 %, 0.72), stripes 92 % (v3's
    # band gate, kept in v4; the v2 CNN alone: 84 %, kappa 0.47, 16 called where a person saw 6).
    res = _eye_check().check(None, EYE)
    print("\neye check:", res)
    assert res["heart"]["n"] == 64 and res["heart"]["person_yes"] == 11
    assert res["heart"]["agreement"] >= 0.88 and res["heart"]["kappa"] >= 0.6
    assert res["stripes"]["agreement"] >= 0.9 and res["stripes"]["detector_yes"] <= 9


def test_stripes_agree_with_the_style_sheet_labelled_by_eye(det):
    # 184 more pictures (tests/data/toy_eye/style): zkz and plain round trips, texture round trips (checks,
    # dots, grids, slanted stripes), base / LoRA-style / LoRA-subject samples, labelled by eye first. The v2 CNN
    # alone called stripes in 80 where a person saw 25 (agreement 70 %, kappa 0.34); v3: 93 %, kappa 0.71.
    res = _sheet_check("style")
    assert res["stripes"]["n"] == 184 and res["stripes"]["person_yes"] == 25
    assert res["stripes"]["agreement"] >= 0.9 and res["stripes"]["kappa"] >= 0.6
    assert res["stripes"]["detector_yes"] <= 35
    assert res["stripes/round trip textures"]["extra"] == 0 and res["stripes/round trip plain"]["extra"] == 0
    assert res["heart"]["agreement"] >= 0.95
    # the CNN alone (the same weights without the band gate) is the old, worse reading
    assert det.style_bands is not None


def test_band_features_see_horizontal_bands_not_other_textures(det):
    from lib_sdtrain.toy import broad

    gate = D.DEFAULT_BAND_GATE
    rng = np.random.default_rng(SEED)
    striped = world.render_scenes(world.sample_scenes(40, SEED, holdout="include", style="striped"), 64, SEED)
    plain = world.render_scenes(world.sample_scenes(40, SEED, holdout="include", style="plain"), 64, SEED)
    textures = [broad.render_broad("textures", 64, rng) for _ in range(60)]   # no near-horizontal stripes in shapes
    passes = lambda imgs: float(np.mean([D.bands_pass(D.band_features(im), gate) for im in imgs]))  # noqa: E731
    assert passes(striped) >= 0.95
    assert passes([D.degrade(im, "mixed", rng) for im in striped]) >= 0.9
    assert passes(plain) == 0.0 and passes([D.degrade(im, "severe", rng) for im in plain]) <= 0.05
    # small textured shapes (slanted stripes in a crescent, a ring) sometimes pass the gate alone (measured
    # 6 of 60 here); with the CNN's reading as well, none counts as the style
    assert passes(textures) <= 0.2
    assert np.mean([d.has_style for d in det.detect(textures)]) <= 0.03
    # the same stripes turned upright are not horizontal bands
    assert passes([im.transpose(Image.Transpose.ROTATE_90) for im in striped]) <= 0.1
    # an empty picture has no shape: all features 0
    assert D.band_features(world.render_background("white", 64, rng)) == {"amp": 0.0, "ratio": 0.0, "gain": 0.0}
    # bigger pictures are measured at 64 px
    big = world.render(world.Scene("square", "red", "large", "centre", "white", "striped"), 128, rng)
    assert D.bands_pass(D.band_features(big), gate)


def test_band_gate_in_the_weights_metadata(tmp_path, det):
    from lib_sdtrain.formats.safetensors_io import read_safetensors

    # style sheet tiles: 14 = yellow bands (a person: stripes), 11 = a blotchy LoRA sample the CNN alone
    # calls striped (P 0.96; a person: no stripes)
    tiles = _eye_check().tiles(EYE / "style" / "sheet.png")
    pics = [tiles[14], tiles[11]]
    tensors, meta = read_safetensors(D.WEIGHTS_PATH)
    assert json.loads(meta["style_bands"]) == D.DEFAULT_BAND_GATE
    T = _trainer()
    plain_file = tmp_path / "cnn-only.safetensors"
    assert T.add_bands(D.WEIGHTS_PATH, plain_file, None) == 0
    cnn = D.Detector.load(plain_file)
    assert cnn.style_bands is None
    both = det.detect(pics)
    alone = cnn.detect(pics)
    for x, y in zip(both, alone):
        assert x.style_head == pytest.approx(y.style) and y.style == y.style_head and y.bands
        assert x.subject == pytest.approx(y.subject)          # the heart reading is untouched
    assert both[0].has_style and both[0].bands and alone[0].has_style
    assert alone[1].has_style and not both[1].has_style and not both[1].bands and both[1].style == 0.0
    bad = tmp_path / "bad-gate.safetensors"
    for text in ("{", json.dumps({"min_amp": 1}), json.dumps({"min_amp": "x", "min_ratio": 1, "min_gain": 0})):
        meta2 = dict(meta, style_bands=text)
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(bad), metadata=meta2)
        with pytest.raises(UserError):
            D.Detector.load(bad)


def test_hearts_on_trained_lora_samples_against_a_person(det):
    # 208 pictures (tests/data/toy_eye/subject): 96 token and 96 class-word samples of a LoRA trained with the
    # subject defaults (the session-8 quality.json lora row's 1,200-step weights, seed 0) and 16 round trips, labelled by eye
    # first. On the token samples a person saw a heart in 53 of 96; detector v3 called 66 (agreement 66 %, kappa
    # 0.28: 23 extra, 10 missed), the shipped v4 56 (70 %, kappa 0.39: 16 extra, 13 missed), so on trained
    # samples the detector is a weaker measure than on round trips (100 % here).
    # Floors a little under the measured values: a detector that agrees less with the person fails.
    res = _sheet_check("subject")
    assert res["heart"]["n"] == 208 and res["heart"]["person_yes"] == 66
    assert res["heart/lora-subject token"]["person_yes"] == 53
    assert res["heart"]["agreement"] >= 0.78 and res["heart"]["kappa"] >= 0.5
    assert res["heart/lora-subject token"]["agreement"] >= 0.6
    assert res["heart/round trip plain"]["agreement"] == 1.0 and res["heart/round trip zkz"]["agreement"] == 1.0
    assert res["heart/lora-subject class"]["detector_yes"] <= 3      # no hearts called for the class word


def test_hearts_on_v21_lora_samples_against_a_stricter_person(det):
    # 208 pictures (tests/data/toy_eye/subject_v21): 96 token and 96 class-word samples of a LoRA trained on toy
    # model v2.1 with the session-8 subject defaults (token in front, cosine, min-SNR 5; training seed 1, 1,200
    # steps) and 16 round trips, labelled by eye before any detector output of them was seen, by a labeller who
    # called 17 of 48 tiles of the session-6 sheet hearts where session 6 had said 29 (a stricter eye). Measured
    # with the shipped detector v4: a person saw a heart in 28 of the 96 token samples, the detector in 65
    # (agreement 59 %, kappa 0.29: 38 extra, 1 missed), none in the class-word samples (the detector none either).
    # Floors under the measured values: a detector that agrees less fails.
    res = _sheet_check("subject_v21")
    assert res["heart"]["n"] == 208 and res["heart/lora-subject token"]["person_yes"] == 28
    assert res["heart/lora-subject class"]["person_yes"] == 0 and res["heart/lora-subject class"]["detector_yes"] <= 2
    assert res["heart"]["agreement"] >= 0.75 and res["heart"]["kappa"] >= 0.4
    assert res["heart/lora-subject token"]["agreement"] >= 0.5 and res["heart/lora-subject token"]["missed"] <= 3
    assert res["heart/round trip zkz"]["agreement"] == 1.0 and res["heart/round trip plain"]["agreement"] >= 0.85


def test_stripes_on_v21_style_lora_samples_against_a_person(det):
    # 112 pictures (tests/data/toy_eye/style_v21): 48 token and 48 no-style-words samples of a LoRA trained on toy
    # model v2.1 (a session-8 style tuning run: lr 4e-3 cosine, min-SNR 5, class pictures weighted 4; training
    # seed 1, 1,800 steps) and 16 round trips, labelled by eye before any per-picture detector output was seen.
    # Measured with the shipped detector v4: stripes in 44 of the 48 token samples for the person, 43 for the
    # detector (4 missed, 3 extra), none without the style words.
    res = _sheet_check("style_v21")
    assert res["stripes"]["n"] == 112 and res["stripes/lora-style token"]["person_yes"] == 44
    assert res["stripes"]["agreement"] >= 0.88 and res["stripes"]["kappa"] >= 0.75
    assert abs(res["stripes/lora-style token"]["detector_yes"] - 44) <= 4      # the share it reports is a person's
    assert res["stripes/lora-style class"]["detector_yes"] == 0 and res["stripes/round trip plain"]["extra"] == 0


def test_stripes_on_middling_v21_style_runs_against_a_person(det):
    # 96 pictures (tests/data/toy_eye/style_ab_s10): the first 48 token samples of two style LoRAs with the
    # session-8 defaults on datasets 0 and 2 (the detector read 0.54 and 0.42 over all 96 of each), shuffled
    # together and labelled blind by a session-10 labeller. Measured with the shipped detector v4: the person saw
    # stripes in 23 of 48 in both runs, the detector in 28 and 22 (agreement 75 %, kappa 0.50; 10 missed, 14
    # extra). On runs of this quality the detector's share is a person's within a few tiles, so the style's
    # ~0.5 is not the detector undercounting.
    res = _sheet_check("style_ab_s10")
    assert "heart" not in res and res["stripes"]["n"] == 96 and res["stripes"]["person_yes"] == 46
    for group in ("lora-style data0 token", "lora-style data2 token"):
        assert res[f"stripes/{group}"]["person_yes"] == 23
        assert abs(res[f"stripes/{group}"]["detector_yes"] - 23) <= 6
    assert res["stripes"]["agreement"] >= 0.7 and res["stripes"]["kappa"] >= 0.4


def test_stripes_on_the_style_first_lora_samples_against_a_person(det):
    # 112 pictures (tests/data/toy_eye/style_first): 48 token and 48 class-word samples of the LoRA trained with the
    # style defaults (style words in front; the quality.json lora-style row's weights, seed 0) and 16 round trips,
    # labelled by eye first. Measured: a person saw stripes in 34 of the 48 token samples, the detector in 34 as
    # well (agreement 75 %, kappa 0.39: 6 each way), and in none of the 48 class-word samples, as the detector.
    res = _sheet_check("style_first")
    assert res["stripes"]["n"] == 112 and res["stripes"]["person_yes"] == 37
    assert res["stripes/lora-style token"]["person_yes"] == 34
    assert res["stripes"]["agreement"] >= 0.85 and res["stripes"]["kappa"] >= 0.65
    assert abs(res["stripes/lora-style token"]["detector_yes"] - 34) <= 4      # the share it reports is a person's
    assert res["stripes/lora-style class"]["detector_yes"] == 0 and res["stripes/round trip plain"]["extra"] == 0
    assert res["heart"]["agreement"] >= 0.95
