"""Dreambooth with prior preservation, end to end on tiny SD1 / SD2-v / SDXL models through `train()`.

Checked: the saved checkpoint has exactly the base file's keys, shapes and (fp16) dtypes and loads back into
the trained weights; the base file is never changed or replaced; class pictures are drawn when missing and a
stopped drawing resumes without redoing pictures; instance/class prompts become the captions; the host's
in-memory model is bit-identical after a finished, failed or stopped run; CLI flags; diffusers export.
"""

import hashlib

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lib_sdtrain.errors import UserError
from lib_sdtrain.events import Events, StopToken
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.methods.dreambooth import DreamboothMethod, DreamboothSettings
from lib_sdtrain.models.checkpoint import load_checkpoint
from lib_sdtrain.testing.tiny import make_tiny_checkpoint
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings
from conftest import fail_on_batch, write_pictures


pytestmark = pytest.mark.usefixtures("one_thread")


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_instances(root, n=3):
    write_pictures(root / "2_zwx toy", n, captions="zwx toy, red square {i}")
    return root


class RecordingHost(StandaloneHost):
    """A standalone host that remembers the parts it lent and counts what it drew."""

    def __init__(self, tmp_path, **kw):
        super().__init__(device="cpu", dtype="fp32", output_root=tmp_path / "outputs", **kw)
        self.lent, self.drawn = [], 0

    def load(self, model=None):
        parts = super().load(model)
        self.lent.append(parts)
        return parts

    def sample(self, parts, requests, stop=None):
        self.drawn += len(requests)
        return super().sample(parts, requests, stop)


def settings(tmp_path, model, **db):
    return TrainSettings.from_dict({
        "method": "dreambooth", "model": str(model), "data": str(make_instances(tmp_path / "data")),
        "output": str(model.parent), "name": "db", "resolution": 64, "min_bucket": 64, "max_bucket": 64,
        "batch_size": 2, "epochs": 1, "max_steps": 3, "learning_rate": 1e-3, "tensorboard": False,
        "sample_steps": 2, "save_every_n_epochs": 0,
        "dreambooth": {"instance_prompt": "zwx toy", "class_prompt": "a toy", "num_class_images": 2, **db}})


def unet_output(unet, family):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(x, torch.tensor([500]), encoder_hidden_states=ctx, **kwargs).sample


def capture_at_final_save(host, store):
    """Events listener: at the final save (before detach) keep the trained weights of the lent model."""
    def listener(event):
        if event.kind == "saved" and event.data.get("final"):
            parts = host.lent[-1]
            store["unet"] = {k: v.detach().clone() for k, v in parts.unet.state_dict().items()}
            store["te"] = [{k: v.detach().clone() for k, v in e.state_dict().items()} for e in parts.text_encoders]
    return listener


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_checkpoint_has_the_base_layout_and_loads_back_into_the_trained_weights(tmp_path, family):
    base = make_tiny_checkpoint(tmp_path / "models" / "base.safetensors", family, dtype=torch.float16)
    base_hash = sha(base)
    host, trained = RecordingHost(tmp_path), {}
    result = train(settings(tmp_path, base), host, Events(capture_at_final_save(host, trained)))
    assert result.stopped == "" and result.final == base.parent / "db.safetensors"
    assert sha(base) == base_hash   # the base file is untouched

    with safe_open(str(base), "pt") as f:
        want = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    with safe_open(str(result.final), "pt") as f:
        got = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        meta = f.metadata()
    assert got == want    # exactly the base's keys, shapes and dtypes (fp16 save of an fp16 base)

    assert meta["lab.method"] == "dreambooth" and meta["lab.base_model"] == "base"
    assert meta["lab.base_sha256"] == base_hash and meta["ss_new_sd_model_hash"] == base_hash
    assert meta["lab.steps"] == meta["ss_steps"] == "3" and meta["ss_num_reg_images"] == "2"
    assert '"method": "dreambooth"' in meta["lab.config"] and meta["lab.weights"] == "raw"
    class_dir = host.output_dir("class")
    assert len(list(class_dir.glob("*/*.png"))) == 2   # the missing class pictures were drawn

    back = load_checkpoint(result.final, dtype=torch.float32)
    original = load_checkpoint(base, dtype=torch.float32)
    sd, base_sd = back.unet.state_dict(), original.unet.state_dict()
    # the file holds the trained weights (rounded to fp16) under the right names
    assert all(torch.equal(sd[k], v.half().float()) for k, v in trained["unet"].items())
    assert any(not torch.equal(sd[k], base_sd[k]) for k in sd)   # ... and training changed them
    for enc, te, base_enc in zip(back.text_encoders, trained["te"], original.text_encoders):
        esd = enc.state_dict()
        assert all(torch.equal(esd[k], v.half().float()) for k, v in te.items() if v.is_floating_point())
        assert any(not torch.equal(esd[k], v) for k, v in base_enc.state_dict().items())  # TE trained
    assert all(torch.equal(v, original.vae.state_dict()[k]) for k, v in back.vae.state_dict().items())

    trained_unet = load_checkpoint(base, dtype=torch.float32).unet
    trained_unet.load_state_dict({k: v.half().float() for k, v in trained["unet"].items()})
    assert torch.allclose(unet_output(back.unet, family), unet_output(trained_unet, family), atol=2e-3, rtol=0)


def test_fp32_save_reproduces_the_trained_unet_exactly(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "models" / "base.safetensors", "sd1")
    host, trained = RecordingHost(tmp_path), {}
    cfg = settings(tmp_path, base, save_precision="fp32", train_text_encoder=False)
    result = train(cfg, host, Events(capture_at_final_save(host, trained)))
    back = load_checkpoint(result.final)
    reference = load_checkpoint(base).unet
    reference.load_state_dict(trained["unet"])
    assert all(torch.equal(back.unet.state_dict()[k], v) for k, v in trained["unet"].items())
    # same weights; CPU kernels still round by memory alignment (a deepcopy of one tiny UNet differs by 2e-4)
    assert torch.allclose(unet_output(back.unet, "sd1"), unet_output(reference, "sd1"), atol=2e-3, rtol=0)
    original = load_checkpoint(base)
    for enc, base_enc in zip(back.text_encoders, original.text_encoders):   # text encoder not trained
        assert all(torch.equal(v, base_enc.state_dict()[k]) for k, v in enc.state_dict().items())


def test_never_writes_over_the_base_model(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "models" / "base.safetensors", "sd1")
    before = sha(base)
    host = RecordingHost(tmp_path)
    for name in ("base", "BASE"):
        cfg = settings(tmp_path / name, base).replace(name=name, overwrite=True)
        with pytest.raises(UserError, match="base model"):
            train(cfg, host)
    assert sha(base) == before and host.drawn == 0   # refused before any class picture was drawn
    # the check also holds where only the loaded model's path is known (A1111: model = the loaded one)
    method = DreamboothMethod(DreamboothSettings())
    method._out_dir, method._out_name = base.parent, "base"
    parts = host.load(str(base))
    with pytest.raises(UserError, match="base model"):
        method.attach(parts)
    method.detach()


def test_class_pictures_are_drawn_when_missing_and_resumed_without_redoing(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "models" / "base.safetensors", "sd1")
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(class_dir / "mine.png")   # the user's own picture counts
    cfg = settings(tmp_path, base, class_data=str(class_dir), num_class_images=6)   # drawn 2 at a time

    stop = StopToken()
    host = RecordingHost(tmp_path)
    events = Events(lambda e: stop.request("test") if e.kind == "progress" and e.data.get("job") == "classgen"
                    and e.data.get("path") else None)
    first = train(cfg, host, events, stop)
    assert first.stopped == "stopped" and first.final is None
    drawn = sorted(class_dir.glob("class-*.png"))
    assert len(drawn) == 2 and host.drawn == 2    # stopped after the first batch of pictures
    stamps = [p.stat().st_mtime_ns for p in drawn]

    host2 = RecordingHost(tmp_path)
    second = train(cfg, host2)
    assert second.stopped == "" and host2.drawn == 3     # only the 3 still missing (6 - mine - 2 drawn)
    assert [p.stat().st_mtime_ns for p in drawn] == stamps
    assert len(list(class_dir.glob("*.png"))) == 6
    assert all(p.with_suffix(".txt").read_text().strip() == "a toy" for p in class_dir.glob("class-*.png"))

    host3 = RecordingHost(tmp_path)   # nothing missing: the model is not even loaded for drawing
    out = DreamboothMethod(cfg.dreambooth).prepare_data(cfg, host3, Events(), StopToken())
    assert host3.drawn == 0 and len(host3.lent) == 0 and out.reg_data == str(class_dir)


def test_a_class_picture_skipped_in_the_host_is_drawn_by_the_next_run(tmp_path):
    """A host's skip control (A1111's Skip) cuts a class picture short: it is not saved, the run trains on the
    others and says why it has fewer; the next run draws only that one."""
    base = make_tiny_checkpoint(tmp_path / "models" / "base.safetensors", "sd1")
    cfg = settings(tmp_path, base, class_data=str(tmp_path / "class"), num_class_images=3)

    class SkippingHost(RecordingHost):
        def sample(self, parts, requests, stop=None):
            pictures = super().sample(parts, requests, stop)
            return [None if r.seed == 1 and stop is not None else im for r, im in zip(requests, pictures)]

    warnings = []
    events = Events(lambda e: warnings.append(e.data["text"]) if e.kind == "warning" else None)
    out = DreamboothMethod(cfg.dreambooth).prepare_data(cfg, SkippingHost(tmp_path), events, StopToken())
    assert out.reg_data == str(tmp_path / "class") and len(list((tmp_path / "class").glob("class-*.png"))) == 2
    assert any("fewer than the 3 asked for (1 skipped while drawing" in w for w in warnings), warnings
    host = RecordingHost(tmp_path)
    DreamboothMethod(cfg.dreambooth).prepare_data(cfg, host, Events(), StopToken())
    assert host.drawn == 1 and len(list((tmp_path / "class").glob("class-*.png"))) == 3


def test_a_resume_on_another_model_is_refused_before_class_pictures_are_drawn(tmp_path):
    """Class pictures are kept for later runs: drawn with the wrong model they would teach its prior from then on.
    A resume on another base is refused before the missing ones are drawn (found in a real A1111: the base was
    checked only after the model was loaded, i.e. after the drawing)."""
    from lib_sdtrain.errors import UserError

    base = make_tiny_checkpoint(tmp_path / "models" / "base.safetensors", "sd1")
    class_dir = tmp_path / "class"
    cfg = settings(tmp_path, base, class_data=str(class_dir), num_class_images=2).replace(max_steps=4)
    stop = StopToken()
    events = Events(lambda e: stop.request("test") if e.kind == "progress" and e.data.get("phase") != "cache"
                    and e.data.get("job") != "classgen" and e.data.get("step") == 2 else None)
    first = train(cfg, RecordingHost(tmp_path), events, stop)
    assert first.stopped == "stopped"
    drawn = sorted(class_dir.glob("class-*.png"))
    assert len(drawn) == 2
    drawn[0].unlink()                                   # one class picture missing on resuming
    drawn[0].with_suffix(".txt").unlink()
    other = make_tiny_checkpoint(tmp_path / "models" / "other.safetensors", "sd1", seed=1)
    host = RecordingHost(tmp_path)
    with pytest.raises(UserError, match="trained from the base model 'base'"):
        train(cfg.replace(resume=str(first.run_dir), model=str(other)), host)
    assert host.drawn == 0 and host.lent == []          # refused before drawing or loading anything
    assert sorted(class_dir.glob("class-*.png")) == drawn[1:]
    done = train(cfg.replace(resume=str(first.run_dir)), RecordingHost(tmp_path))   # the right model: goes on
    assert done.stopped == "" and done.steps == 4


def test_instance_and_class_prompts_become_the_captions(tmp_path):
    from lib_sdtrain.data.scan import scan_dataset

    data = make_instances(tmp_path / "data")
    reg = tmp_path / "reg"
    reg.mkdir()
    Image.new("RGB", (64, 64)).save(reg / "r.png")
    (reg / "r.txt").write_text("some caption")
    report = scan_dataset(data, reg_path=reg)
    DreamboothMethod(DreamboothSettings(instance_prompt="zwx toy", class_prompt="a toy")).prepare_records(
        report.records)
    assert {r.caption for r in report.instance} == {"zwx toy"}
    assert [r.caption for r in report.regularization] == ["a toy"]
    report = scan_dataset(data, reg_path=reg)
    DreamboothMethod(DreamboothSettings()).prepare_records(report.records)   # empty prompts: captions stay
    assert sorted(r.caption for r in report.instance)[0] == "zwx toy, red square 0"


def snapshot(parts):
    roots = [parts.unet, parts.vae, *parts.text_encoders]
    return [({k: v.clone() for k, v in m.state_dict().items()}, {n: p.requires_grad for n, p in m.named_parameters()},
             {n: x.training for n, x in m.named_modules()}) for m in roots]


def assert_same(parts, snap):
    for m, (state, grads, modes) in zip([parts.unet, parts.vae, *parts.text_encoders], snap):
        now = m.state_dict()
        assert all(torch.equal(now[k], v) and now[k].dtype == v.dtype for k, v in state.items())
        assert {n: p.requires_grad for n, p in m.named_parameters()} == grads
        assert {n: x.training for n, x in m.named_modules()} == modes


@pytest.mark.parametrize("outcome", ["finished", "failed", "stopped"])
def test_the_lent_model_is_restored_bit_exactly(tmp_path, monkeypatch, outcome):
    base = make_tiny_checkpoint(tmp_path / "models" / "base.safetensors", "sdxl")
    host = StandaloneHost(device="cpu", dtype="bf16", output_root=tmp_path / "outputs")
    parts = host.load(str(base))
    for p in parts.unet.parameters():   # like A1111: the user's model is not frozen
        p.requires_grad_(True)
    snap = snapshot(parts)
    monkeypatch.setattr(host, "load", lambda model=None: parts)
    cfg = settings(tmp_path, base, num_class_images=1).replace(max_steps=2, mixed_precision="bf16")
    stop, events = StopToken(), Events()
    if outcome == "failed":
        fail_on_batch(monkeypatch, 2)
        with pytest.raises(RuntimeError, match="simulated"):
            train(cfg, host, events, stop)
    else:
        if outcome == "stopped":
            events = Events(lambda e: stop.request() if e.kind == "loss" else None)
        result = train(cfg, host, events, stop)
        assert result.stopped == ("stopped" if outcome == "stopped" else "")
        assert (result.final is None) == (outcome == "stopped")
    assert_same(parts, snap)


def test_cli_flags_reach_the_settings(tmp_path):
    import argparse

    from lib_sdtrain.commands.train import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--method", "dreambooth", "--class-data", str(tmp_path), "--class-prompt",
                              "a photo of a dog", "--prior-loss-weight", "0.5", "--instance-prompt",
                              "a photo of zwx dog", "--num-class-images", "40", "--dreambooth-save-precision", "fp32",
                              "--no-dreambooth-train-text-encoder"])
    cfg = settings_from_args(args)
    assert cfg.method == "dreambooth" and cfg.prior_loss_weight == 0.5
    db = cfg.dreambooth
    assert (db.class_data, db.class_prompt, db.instance_prompt) == (str(tmp_path), "a photo of a dog",
                                                                    "a photo of zwx dog")
    assert db.num_class_images == 40 and db.save_precision == "fp32" and db.train_text_encoder is False
    with pytest.raises(UserError, match="train_blocks"):
        TrainSettings.from_dict({"dreambooth": {"train_blocks": "up,sideways"}})
    # settings both methods have get the method's name in their flag, so one never sets the other's
    args = parser.parse_args(["--method", "finetune", "--finetune-train-blocks", "up", "--ema"])
    cfg = settings_from_args(args)
    assert cfg.finetune.train_blocks == "up" and cfg.finetune.ema and cfg.dreambooth.train_blocks == "all"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_export_loads_in_diffusers_with_the_same_outputs(tmp_path, family):
    import diffusers

    from lib_sdtrain.methods.diffusers_export import export_diffusers

    base = make_tiny_checkpoint(tmp_path / "base.safetensors", family, seed=3)
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")
    parts = host.load(str(base))
    with safe_open(str(base), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    folder = export_diffusers(tensors, meta, tmp_path / "export", parts)
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(str(folder), local_files_only=True)
    theirs_sd = pipe.unet.state_dict()
    assert all(torch.equal(theirs_sd[k], v) for k, v in parts.unet.state_dict().items())
    assert torch.allclose(unet_output(pipe.unet, family), unet_output(parts.unet, family), atol=2e-3, rtol=0)
    prompt = "a photo of zwx toy"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ours = torch.tensor([parts.tokenizers[0].start_id, *parts.tokenizers[0].encode(prompt),
                         parts.tokenizers[0].end_id])
    assert torch.equal(ids[0, :len(ours)], ours)
    with torch.no_grad():
        theirs = pipe.text_encoder(ids, output_hidden_states=True)
        mine = parts.text_encoders[0](ids, output_hidden_states=True)
    if family == "sd2":   # diffusers drops the last layer; A1111 takes the penultimate one + final norm
        want = parts.text_encoders[0].text_model.final_layer_norm(mine.hidden_states[-2])
        assert torch.allclose(theirs.last_hidden_state, want, atol=1e-6)
    else:
        assert torch.allclose(theirs.last_hidden_state, mine.last_hidden_state, atol=1e-6)
    assert (folder.parent / "export").is_dir() and export_diffusers(tensors, meta, tmp_path / "export",
                                                                    parts).name == "export-1"   # never replaced


def test_train_with_export_writes_the_diffusers_folder_in_the_run_folder(tmp_path):
    base = make_tiny_checkpoint(tmp_path / "models" / "base.safetensors", "sd1")
    host = RecordingHost(tmp_path)
    result = train(settings(tmp_path, base, export_diffusers=True, num_class_images=1), host)
    folder = result.run_dir / "diffusers"
    assert (folder / "model_index.json").is_file() and (folder / "unet" / "config.json").is_file()
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    back = load_checkpoint(result.final, dtype=torch.float32)
    assert all(torch.equal(v.float(), back.unet.state_dict()[k]) for k, v in unet.state_dict().items())
