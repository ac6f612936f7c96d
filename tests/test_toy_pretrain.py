"""Toy pretraining v2 pieces: the broad VAE pictures, the world-vocabulary text training, combining models,
and the round-trip ceiling arithmetic. Tiny models only; the bundled model's own figures are in test_toy_model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_sdtrain.errors import UserError


def test_broad_pictures_are_deterministic_and_cover_every_family():
    from lib_sdtrain.toy import broad

    a = [np.asarray(im) for im, _ in zip(broad.iter_broad_pictures(3), range(12))]
    b = [np.asarray(im) for im, _ in zip(broad.iter_broad_pictures(3), range(12))]
    assert all(x.shape == (64, 64, 3) and np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], np.asarray(next(broad.iter_broad_pictures(4))))
    for fam in broad.FAMILIES:
        img = np.asarray(broad.render_broad(fam, 64, np.random.default_rng(1)), dtype=np.float64)
        assert img.std() > 1.0, fam                    # something is drawn, not a blank page
    # the held-out concepts are not among the shapes the VAE is shown
    assert "heart" not in broad.SILHOUETTES
    with pytest.raises(UserError):
        broad.render_broad("hearts", 64)
    with pytest.raises(UserError):
        next(broad.iter_broad_pictures(0, families=("world", "nope")))


def test_textures_inside_shapes_are_never_horizontal_bands():
    """The zkz style (horizontal bands inside a shape) stays out of the VAE's pictures."""
    from lib_sdtrain.toy import broad

    rng = np.random.default_rng(5)
    for _ in range(40):
        tex = np.asarray(broad._texture(rng, 64 * 4, (0, 0, 0), (255, 255, 255), horizontal_ok=False))[..., 0]
        rows_uniform = (tex == tex[:, :1]).all(axis=1).mean()       # a horizontal-band texture: every row one value
        assert rows_uniform < 0.9


def test_textured_scenes_fill_the_shape_with_a_named_texture_and_leave_the_plain_stream_alone():
    """The pretraining trial `textured_share` (session 23): a base shape filled with slanted stripes, checks, dots
    or a grid, captioned with the texture's word; never horizontal bands (the zkz style stays unseen), the
    background untouched, and a cache drawn with the share 0 is the plain world as before."""
    from lib_sdtrain.events import Events, StopToken
    from lib_sdtrain.toy import broad, world
    from lib_sdtrain.toy.pretrain import PretrainConfig, cache_latents

    rng = np.random.default_rng(7)
    words = set()
    for _ in range(24):
        scene = world.Scene(shape="square", colour="red", size="large", position="centre", background="white")
        plain, mask = world.render_with_mask(scene, 64, np.random.default_rng(3))
        textured, word = broad.textured_scene(scene, 64, np.random.default_rng(3))
        words.add(word)
        inside, outside = np.asarray(mask) > 250, np.asarray(mask) < 5
        a, b = np.asarray(plain, dtype=int), np.asarray(textured, dtype=int)
        assert np.array_equal(a[outside], b[outside])                       # the background is the world's
        assert b[inside].std(axis=0).max() > 20 and a[inside].std(axis=0).max() < 10   # a texture, where it was flat
        rows = b[..., 0][inside.any(axis=1)][:, inside.any(axis=0)]
        assert (rows == rows[:, :1]).all(axis=1).mean() < 0.9                # not horizontal bands
        words.add(broad.textured_scene(scene, 64, rng)[1])
    assert words == set(broad.TEXTURE_WORDS.values())

    class Encoder(torch.nn.Module):        # a stand-in VAE: the latents are the pictures, pooled
        def encode(self, x):
            pooled = torch.nn.functional.avg_pool2d(x, 8)[:, :3]
            dist = type("D", (), {"mean": torch.cat([pooled, pooled[:, :1]], 1), "std": torch.ones(len(x), 4, 8, 8)})
            return type("P", (), {"latent_dist": dist})

    def cache(share):
        cfg = PretrainConfig(latent_pictures=300, textured_share=share)
        return cache_latents(Encoder(), cfg, torch.device("cpu"), Events(), StopToken())

    plain_means, _, plain_caps = cache(0.0)
    tex_means, _, tex_caps = cache(0.5)
    changed = [i for i, (p, t) in enumerate(zip(plain_caps, tex_caps)) if p != t]
    assert 0.3 < len(changed) / len(plain_caps) < 0.6
    for i in changed:   # the same caption with the texture's word before the shape
        assert any(tex_caps[i] == plain_caps[i].replace(f" {w}", "", 1).replace("  ", " ") or
                   tex_caps[i].replace(f"{w} ", "", 1) == plain_caps[i] for w in broad.TEXTURE_WORDS.values())
        assert "zkz" not in tex_caps[i] and "zwx" not in tex_caps[i]
    same = [i for i in range(len(plain_caps)) if i not in changed]
    assert torch.equal(plain_means[same], tex_means[same])       # untouched pictures are the plain ones


def test_v21_pictures_draw_bands_inside_shapes_and_keep_the_v2_stream(monkeypatch):
    """bands_held_out=False (the v2.1 decoder's pictures) lets textures inside shapes run horizontally and pairs a
    colour with its pale tint half the time; the default stream (v2) is the same pictures as before."""
    from lib_sdtrain.toy import broad
    from lib_sdtrain.toy.pretrain import PretrainConfig, _vae_pictures

    rng = np.random.default_rng(5)
    horizontal = 0
    for _ in range(400):      # stripes are a quarter of the textures, near-horizontal ones ~1/30 of those
        tex = np.asarray(broad._texture(rng, 64 * 4, (0, 0, 0), (255, 255, 255), horizontal_ok=True))[..., 0]
        t = tex.astype(np.float64)
        # near-horizontal bands: rows differ from each other much more than pixels within a row
        horizontal += t.mean(axis=1).std() > 2 * t.std(axis=1).mean()
    assert horizontal >= 1, "horizontal_ok never gave horizontal bands in 400 textures"

    seen = []
    real = broad._texture

    def spy(rng, big, a, b, *, horizontal_ok):
        seen.append((horizontal_ok, sum(b) > sum(a) and all(y >= x for x, y in zip(a, b))))
        return real(rng, big, a, b, horizontal_ok=horizontal_ok)

    monkeypatch.setattr(broad, "_texture", spy)
    for seed in range(60):
        broad.render_broad("textures", 64, np.random.default_rng(seed), bands_held_out=False)
    inside = list(seen)
    assert inside and all(ok for ok, _ in inside)          # whole-picture and in-shape textures may be horizontal
    assert sum(pale for _, pale in inside) >= len(inside) // 5      # the pale-tint pairs
    seen.clear()
    for seed in range(60):
        broad.render_broad("textures", 64, np.random.default_rng(seed))
    assert any(not ok for ok, _ in seen)                   # v2: in-shape textures never horizontal
    monkeypatch.setattr(broad, "_texture", real)
    pale = broad._pale((200, 20, 20), np.random.default_rng(0))
    assert all(p > c for p, c in zip(pale, (200, 20, 20)) if c < 255) and pale[1] > 120

    v2 = next(_vae_pictures(PretrainConfig(vae_data="broad"), 9))
    assert np.array_equal(np.asarray(v2), np.asarray(next(broad.iter_broad_pictures(9))))
    it21 = _vae_pictures(PretrainConfig(vae_data="broad-bands"), 9)
    assert not all(np.array_equal(np.asarray(next(it21)), np.asarray(x))
                   for x, _ in zip(broad.iter_broad_pictures(9), range(6)))
    with pytest.raises(UserError):
        _vae_pictures(PretrainConfig(vae_data="bands"), 9)


def _tiny_text():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=300, max_position_embeddings=12, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, eos_token_id=2, bos_token_id=0, pad_token_id=1)
    return CLIPTextModel(cfg)


def test_world_vocabulary_trains_only_the_used_rows():
    from lib_sdtrain.toy.pretrain import WorldVocabulary

    text = _tiny_text()
    before = text.get_input_embeddings().weight.detach().clone()
    ids = torch.tensor([[0, 5, 7, 9, 2, 2, 2, 2, 2, 2, 2, 2], [0, 7, 11, 2, 2, 2, 2, 2, 2, 2, 2, 2]])
    vocab = WorldVocabulary(text, ids)
    params = [p for p in text.parameters() if p.requires_grad] + [vocab.offsets]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for _ in range(3):
        loss = text(input_ids=ids).last_hidden_state.pow(2).mean() - text(input_ids=ids).last_hidden_state[:, 1].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vocab.fold()
    after = text.get_input_embeddings().weight.detach()
    used = sorted({0, 2, 5, 7, 9, 11})
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(used)
    assert torch.equal(after[100:], before[100:]) and torch.equal(after[[1, 3, 4, 6, 8, 10]], before[[1, 3, 4, 6, 8, 10]])
    # the hook is gone: the folded table alone gives the trained output
    assert not text.get_input_embeddings()._forward_hooks


def test_joint_text_training_returns_both_ema_copies_and_keeps_rare_rows():
    from lib_sdtrain.events import Events, StopToken
    from lib_sdtrain.testing.tiny import build_tiny
    from lib_sdtrain.toy.pretrain import PretrainConfig, train_unet

    loaded = build_tiny("sd1", seed=0)
    text = loaded.text_encoders[0]
    vocab_n = text.get_input_embeddings().weight.shape[0]
    before = text.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    n, u = 24, 4
    ids = torch.full((u, 77), vocab_n - 1)
    ids[:, 0] = vocab_n - 2
    ids[1:, 1] = torch.tensor([10, 11, 12])
    means, stds = torch.randn(n, 4, 8, 8), torch.full((n, 4, 8, 8), 0.1)
    caption_index = torch.tensor([1 + i % 3 for i in range(n)])
    cfg = PretrainConfig(unet_minutes=0.03, unet_batch=8, captions_per_batch=2, warmup_steps=1, unet_lr=1e-3)
    ema, steps, loss, ema_text = train_unet(loaded.unet, means, stds, 1.0, None, caption_index, 0, cfg,
                                            torch.device("cpu"), Events(), StopToken(), text=text, ids=ids)
    assert steps >= 1 and np.isfinite(loss)
    table = ema_text.get_input_embeddings().weight
    used = {10, 11, 12, vocab_n - 1, vocab_n - 2}
    changed = set((table != before).any(dim=1).nonzero().flatten().tolist())
    assert changed and changed <= used
    assert not any(p.requires_grad for p in ema_text.parameters()) and ema is not loaded.unet


def test_combine_refuses_models_with_different_encoders(tmp_path):
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint
    from lib_sdtrain.toy.pretrain import combine

    a = make_tiny_checkpoint(tmp_path / "a.safetensors", "sd1", seed=0)
    b = make_tiny_checkpoint(tmp_path / "b.safetensors", "sd1", seed=1)
    with pytest.raises(UserError, match="different VAE encoders"):
        combine(a, b, tmp_path / "c.safetensors", device="cpu")
    assert not (tmp_path / "c.safetensors").exists()


def test_wilson_interval_and_ceiling_scenes():
    from lib_sdtrain.toy import world
    from lib_sdtrain.toy.evaluate import ceiling_scenes, wilson_interval

    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-3) and hi == 1.0
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    with pytest.raises(UserError):
        wilson_interval(0, 0)
    assert all(s.shape == world.SUBJECT_SHAPE for s in ceiling_scenes("subject", 20))
    assert all(s.size == "small" for s in ceiling_scenes("subject_small", 20))
    assert all(s.style == "striped" and s.shape in world.BASE_SHAPES for s in ceiling_scenes("style", 20))
    with pytest.raises(UserError):
        ceiling_scenes("nope", 3)


def test_vae_training_and_decoder_polish_share_one_loop():
    """train_vae trains the whole VAE; polish_decoder only the decoder (the encoder, so the latent space, stays
    bit-identical). Both run the shared loop: steps happen, the held-out PSNR is finite, non-finite batches skip."""
    from lib_sdtrain.events import Events, StopToken
    from lib_sdtrain.toy.pretrain import PretrainConfig, build_vae, polish_decoder, train_vae

    cfg = PretrainConfig(vae_widths=(32, 32), vae_pool=12, vae_batch=4, vae_minutes=0.01, vae_data="broad-bands")
    torch.manual_seed(0)
    vae = build_vae(cfg)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    seen = []
    steps, psnr = train_vae(vae, cfg, torch.device("cpu"), Events(seen.append), StopToken())
    assert steps >= 1 and np.isfinite(psnr)
    assert any(not torch.equal(before[k], v) for k, v in vae.state_dict().items() if k.startswith("encoder."))
    enc = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    dec = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith("decoder.")}
    steps, psnr = polish_decoder(vae, cfg, torch.device("cpu"), Events(seen.append), StopToken(), minutes=0.01)
    assert steps >= 1 and np.isfinite(psnr)
    assert all(torch.equal(enc[k], vae.state_dict()[k]) for k in enc)
    assert any(not torch.equal(dec[k], vae.state_dict()[k]) for k in dec)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_pretrain_config_from_a_saved_models_metadata():
    """`resume`, `polish` and `combine` rebuild the saved config: the same values back (lists as tuples), keys of
    other versions ignored, and a clear error for metadata that is not a JSON table."""
    import json

    from lib_sdtrain.toy.pretrain import PretrainConfig

    cfg = PretrainConfig(seed=7, size=128, threads=1)
    saved = json.loads(cfg.to_json())
    assert PretrainConfig.from_metadata({"lab.pretrain_config": cfg.to_json()}, "m") == cfg
    assert PretrainConfig.from_metadata({"lab.pretrain_config": json.dumps({**saved, "gone": 1})}, "m") == cfg
    assert PretrainConfig.from_metadata({}, "m") == PretrainConfig()
    for bad, why in (("{not json", "not valid JSON"), ("[1, 2]", "not a table")):
        with pytest.raises(UserError, match=why):
            PretrainConfig.from_metadata({"lab.pretrain_config": bad}, "m.safetensors")


def test_pretrain_takes_the_architecture_from_its_flags(monkeypatch, capsys):
    """`toy pretrain` could only make the bundled recipe: a trial of another size, a wider or deeper VAE or a UNet
    that learns textures needed a code edit. Its flags now set them (pretrain-vae: the VAE's), each checked; the
    architecture follows (the VAE's blocks per level too; written models load, measured by hand in session 23)."""
    from lib_sdtrain.cli import main
    from lib_sdtrain.toy import pretrain as P

    seen = {}

    def fake(out, cfg, **kw):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(P, "pretrain", fake)
    monkeypatch.setattr(P, "pretrain_vae", fake)
    with pytest.raises(SystemExit):
        main(["toy", "pretrain", "--out", "x.safetensors", "--size", "128", "--vae-widths", "64,128,256,256",
              "--vae-layers", "2", "--vae-data", "broad-bands", "--unet-widths", "64, 128,128",
              "--batch", "32", "--latent-pictures", "500", "--textured-share", "0.3"])
    cfg = seen["cfg"]
    assert (cfg.size, cfg.vae_widths, cfg.vae_layers, cfg.vae_data, cfg.unet_widths, cfg.unet_batch,
            cfg.latent_pictures, cfg.textured_share) == (128, (64, 128, 256, 256), 2, "broad-bands", (64, 128, 128),
                                                         32, 500, 0.3)
    arch = P.toy_architecture(cfg)
    assert arch.vae["layers_per_block"] == 2 and arch.vae["block_out_channels"] == [64, 128, 256, 256]
    assert arch.unet["block_out_channels"] == [64, 128, 128] and arch.unet["sample_size"] == 16
    assert P.toy_architecture(P.PretrainConfig()).vae["layers_per_block"] == 1          # the bundled recipe
    with pytest.raises(SystemExit):
        main(["toy", "pretrain-vae", "--out", "v.safetensors", "--vae-widths", "32,64", "--size", "64"])
    assert seen["cfg"].vae_widths == (32, 64)
    for bad, why in ((["--vae-widths", "48,64"], "multiple of 32"), (["--vae-layers", "9"], "from 1 to 4"),
                     (["--size", "100"], "multiple of 64"), (["--textured-share", "1"], "from 0 to 0.9")):
        try:
            code = main(["toy", "pretrain", "--out", "x.safetensors", *bad])
        except SystemExit as e:          # argparse's own refusal of a flag's type
            code = e.code
        assert code == 2 and why in capsys.readouterr().err


def test_pretrain_seeds_and_evaluation_sizes_past_their_range_are_refused_before_work(monkeypatch, capsys):
    """`toy pretrain --seed 99999999999999999999` reached torch.manual_seed (an OverflowError traceback), and
    `--eval-samples 99999999999999999999` started a run of the full time budget that could only fail at its final
    evaluation. Both are now refused with the other range checks, before anything runs."""
    from lib_sdtrain.cli import main
    from lib_sdtrain.toy import pretrain as P

    ran = []

    def fake(out, cfg, **kw):
        ran.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(P, "pretrain", fake)
    monkeypatch.setattr(P, "pretrain_vae", fake)
    for argv, why in ((["--seed", "99999999999999999999"], "--seed must be from 0 to 4294967295"),
                      (["--seed", "4294967296"], "--seed must be from 0 to 4294967295"),
                      (["--eval-samples", "99999999999999999999"], "--eval-samples must be from 1 to 100000"),
                      (["--eval-samples", "0"], "--eval-samples must be from 1 to 100000")):
        assert main(["toy", "pretrain", "--out", "x.safetensors", *argv]) == 2, argv
        assert why in capsys.readouterr().err
    assert main(["toy", "pretrain-vae", "--out", "v.safetensors", "--seed", "-1"]) == 2 and not ran
    with pytest.raises(SystemExit):
        main(["toy", "pretrain", "--out", "x.safetensors", "--seed", "4294967295", "--eval-samples", "100000"])
    assert (ran[0].seed, ran[0].eval_samples) == (4294967295, 100000)
