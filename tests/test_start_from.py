"""start_from: a LoRA, embedding or hypernetwork file is the starting point of a new run (kohya's network_weights,
A1111's training of an existing embedding / hypernetwork). Trained at learning rate 0 the new run saves exactly
the file it started from; parts the file lacks start fresh, with a warning; files that do not fit, missing files
and full-model methods are refused."""

from pathlib import Path

import pytest
import torch
from conftest import write_pictures
from safetensors.torch import load_file

from lib_sdtrain.errors import UserError
from lib_sdtrain.events import EventLog, Events
from lib_sdtrain.formats.safe_pickle import load_checkpoint
from lib_sdtrain.hosts.standalone import StandaloneHost
from lib_sdtrain.train.loop import train
from lib_sdtrain.train.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_pictures(tmp_path_factory.mktemp("data") / "2_zwx", 2, captions="a photo of zwx, red square {i}").parent


def run(tmp_path, tiny_checkpoints, dataset, name, *, method="lora", lr=0.5, events=None, **over):
    section = over.pop("section", {})
    cfg = TrainSettings.from_dict({
        "method": method, "model": str(tiny_checkpoints["sd1"]), "data": str(dataset), "name": name,
        "output": str(tmp_path / name), "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2,
        "max_steps": 2, "optimizer": "sgd", "learning_rate": lr, "weight_decay": 0.0, "save_state": False,
        "save_every_n_epochs": 0, "tensorboard": False, method: section, **over})
    return train(cfg, StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host"), events or Events())


def test_a_lora_run_starts_from_the_file(tmp_path, tiny_checkpoints, dataset):
    lora = {"network_dim": 4, "network_alpha": 2, "save_dtype": "fp32"}
    first = run(tmp_path, tiny_checkpoints, dataset, "a", section=lora).final
    a = load_file(str(first))
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)          # it trained
    again = load_file(str(run(tmp_path, tiny_checkpoints, dataset, "b", lr=0.0, section=lora,
                              start_from=str(first)).final))
    assert a.keys() == again.keys() and all(torch.equal(a[k], again[k]) for k in a)
    fresh = load_file(str(run(tmp_path, tiny_checkpoints, dataset, "c", lr=0.0, section=lora).final))
    assert all(v.abs().sum() == 0 for k, v in fresh.items() if "lora_up" in k)     # without it: a fresh start
    # another alpha: the file's update is kept (A1111's scale rule), written with this run's alpha
    other = load_file(str(run(tmp_path, tiny_checkpoints, dataset, "d", lr=0.0, start_from=str(first),
                              section={**lora, "network_alpha": 4}).final))
    k = next(k for k in a if k.endswith("lora_up.weight"))
    base = k[: -len("lora_up.weight")]
    assert float(other[base + "alpha"]) == 4.0
    assert torch.allclose(other[k] * 4 / 4, a[k] * 2 / 4)
    with pytest.raises(UserError, match="does not fit"):
        run(tmp_path, tiny_checkpoints, dataset, "e", start_from=str(first), section={**lora, "network_dim": 8})
    with pytest.raises(UserError, match="is not a file"):
        run(tmp_path, tiny_checkpoints, dataset, "f", start_from=str(tmp_path / "nothing.safetensors"),
            section=lora)


def test_parts_the_file_lacks_start_fresh_with_a_warning(tmp_path, tiny_checkpoints, dataset):
    unet_only = run(tmp_path, tiny_checkpoints, dataset, "u", section={
        "network_dim": 4, "save_dtype": "fp32", "train_text_encoder": False}).final
    log = EventLog()
    out = load_file(str(run(tmp_path, tiny_checkpoints, dataset, "ut", lr=0.0, start_from=str(unet_only),
                            events=Events(log), section={"network_dim": 4, "save_dtype": "fp32"}).final))
    warnings = [e.data["text"] for e in log.since(0)[1] if e.kind == "warning"]
    assert any("are not in u.safetensors" in w and "start fresh" in w for w in warnings)
    src = load_file(str(unet_only))
    assert all(torch.equal(out[k], src[k]) for k in src)
    assert any(k.startswith("lora_te") for k in out) and all(
        out[k].abs().sum() == 0 for k in out if k.startswith("lora_te") and "lora_up" in k)
    # the other way round, a file with modules this network does not train is refused
    with pytest.raises(UserError, match="does not fit this network"):
        run(tmp_path, tiny_checkpoints, dataset, "tu", start_from=str(tmp_path / "ut" / "ut.safetensors"),
            section={"network_dim": 4, "train_text_encoder": False})


def test_an_embedding_and_a_hypernetwork_start_from_their_files(tmp_path, tiny_checkpoints, dataset):
    emb = {"token": "zwx", "vectors": 2, "init_text": "cat"}
    first = run(tmp_path, tiny_checkpoints, dataset, "zwx", method="embedding", lr=0.05, section=emb).final
    tmp2 = tmp_path / "second"
    again = run(tmp2, tiny_checkpoints, dataset, "zwx", method="embedding", lr=0.0, section=emb,
                start_from=str(first)).final
    a, b = load_file(str(first))["emb_params"], load_file(str(again))["emb_params"]
    assert torch.equal(a, b)
    with pytest.raises(UserError, match="do not fit this embedding"):
        run(tmp_path / "third", tiny_checkpoints, dataset, "zwx", method="embedding", start_from=str(first),
            section={**emb, "vectors": 3})

    hn = run(tmp_path, tiny_checkpoints, dataset, "hn", method="hypernetwork", lr=0.05).final
    hn2 = run(tmp_path, tiny_checkpoints, dataset, "hn2", method="hypernetwork", lr=0.0, start_from=str(hn)).final
    x, y = load_checkpoint(hn), load_checkpoint(hn2)
    sizes = [k for k in x if type(k) is int]
    assert sizes and all(torch.equal(sx[n], sy[n]) for w in sizes for sx, sy in zip(x[w], y[w]) for n in sx)


def test_full_model_methods_refuse_start_from():
    with pytest.raises(UserError, match="give the checkpoint to continue from as the model"):
        TrainSettings.from_dict({"method": "finetune", "data": "x", "start_from": "a.safetensors"})


def test_a_resumed_run_needs_no_start_file(tmp_path, tiny_checkpoints, dataset):
    lora = {"network_dim": 4, "save_dtype": "fp32"}
    first = run(tmp_path, tiny_checkpoints, dataset, "a", section=lora).final
    cfg = TrainSettings.from_dict({
        "model": str(tiny_checkpoints["sd1"]), "data": str(dataset), "name": "r", "output": str(tmp_path / "r"),
        "resolution": 64, "min_bucket": 64, "max_bucket": 64, "batch_size": 2, "max_steps": 4, "optimizer": "sgd",
        "learning_rate": 0.5, "save_every_n_steps": 2, "save_every_n_epochs": 0, "tensorboard": False,
        "start_from": str(first), "lora": lora})
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "host")
    whole = load_file(str(train(cfg, host).final))
    stopped = TrainSettings.from_dict({**cfg.to_dict(), "name": "r2", "max_steps": 4})
    from conftest import fail_on_batch

    mp = pytest.MonkeyPatch()
    try:
        fail_on_batch(mp, n=3)
        with pytest.raises(RuntimeError):
            train(stopped, host)
    finally:
        mp.undo()
    first.unlink()                                          # the start file is gone; the state carries on
    resumed = train(TrainSettings.from_dict({**stopped.to_dict(), "resume": str(tmp_path / "host" / "runs" / "r2")}),
                    host)
    got = load_file(str(resumed.final))
    assert all(torch.allclose(got[k], whole[k], atol=1e-6) for k in whole)


def test_the_train_tab_offers_the_hosts_files_newest_first(tmp_path):
    import os
    import types

    pytest.importorskip("gradio")
    from lib_sdtrain.ui.train_tab import start_choices

    host = StandaloneHost(device="cpu", output_root=tmp_path)
    made = []
    for i, (kind, name) in enumerate((("lora", "old.safetensors"), ("embedding", "tok.pt"),
                                      ("hypernetwork", "hn.pt"), ("lora", "sub/new.safetensors"))):
        path = host.output_dir(kind) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
        made.append(path)
    (host.output_dir("lora") / "notes.txt").write_text("not a network")
    (host.output_dir("lora") / "pickled.pt").write_bytes(b"x")        # start_from reads only .safetensors LoRAs
    ctx = types.SimpleNamespace(host=lambda: host)
    assert start_choices(ctx) == ["", *(str(p) for p in reversed(made))]
    assert start_choices(ctx, "lora") == ["", str(made[3]), str(made[0])]     # the chosen method's files only
    assert start_choices(ctx, "embedding") == ["", str(made[1])]
    assert start_choices(ctx, "dreambooth") == [""]                         # cannot start from a file

    def broken():
        raise RuntimeError("no host")

    assert start_choices(types.SimpleNamespace(host=broken)) == [""]


def test_a_start_file_with_weights_that_are_not_finite_is_refused_before_training(tmp_path, tiny_checkpoints,
                                                                                   dataset):
    """A NaN in the file had made the first step's loss NaN: the run cached its latents, then stopped as diverged,
    with nothing naming the file. Now it is refused where the file is loaded (LoRA, embedding, hypernetwork)."""
    from safetensors.torch import save_file

    lora = {"network_dim": 4, "network_alpha": 2, "save_dtype": "fp32"}
    weights = load_file(str(run(tmp_path, tiny_checkpoints, dataset, "a", section=lora).final))
    k = sorted(k for k in weights if k.endswith("lora_up.weight"))[3]
    weights[k][0, 0] = float("nan")
    save_file(weights, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UserError, match="nan.safetensors holds weights that are not finite"):
        run(tmp_path, tiny_checkpoints, dataset, "b", section=lora, start_from=str(tmp_path / "nan.safetensors"))
    hn = load_checkpoint(run(tmp_path, tiny_checkpoints, dataset, "hn", method="hypernetwork").final)
    width = next(k for k in hn if type(k) is int)
    hn[width][0]["linear.0.bias"][0] = float("inf")
    torch.save(hn, tmp_path / "inf.pt")
    with pytest.raises(UserError, match="inf.pt holds weights that are not finite"):
        run(tmp_path, tiny_checkpoints, dataset, "hn2", method="hypernetwork", start_from=str(tmp_path / "inf.pt"))


def test_a_lora_whose_tensors_do_not_fit_each_other_or_the_network_is_refused(tmp_path, tiny_checkpoints, dataset):
    """An alpha of several values and factors that do not multiply raised RuntimeError / ValueError from the
    arithmetic (start_from and `info`); a module of other widths and rank with the same numbers of values
    ([8, in/2] and [out/2, 8] for [4, in] and [out, 4]) was loaded reshaped, its weights scrambled."""
    from safetensors.torch import save_file

    from lib_sdtrain.commands.info import describe_network

    lora = {"network_dim": 4, "network_alpha": 2, "save_dtype": "fp32"}
    weights = load_file(str(run(tmp_path, tiny_checkpoints, dataset, "a", section=lora).final))
    up = min(k for k in weights if k.endswith("lora_up.weight"))
    name = up[: -len(".lora_up.weight")]
    down, alpha = f"{name}.lora_down.weight", f"{name}.alpha"
    cases = {
        "alpha": ({alpha: torch.tensor([2.0, 2.0])}, "its alpha holds 2 values, not one"),
        "transposed": ({up: weights[up].T.contiguous()}, "do not multiply"),
        "rank_0": ({up: weights[up][:, :0].contiguous(), down: weights[down][:0].contiguous()}, "has rank 0"),
        "other_widths": ({down: weights[down].reshape(8, -1).contiguous(),
                          up: weights[up].reshape(-1, 8).contiguous()}, "does not fit"),
    }
    for case, (change, message) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file({**weights, **change}, str(path))
        with pytest.raises(UserError, match=message):
            run(tmp_path, tiny_checkpoints, dataset, "b", section=lora, start_from=str(path))
        if case != "other_widths":          # a file on its own is fine with other widths
            with pytest.raises(UserError, match=message):
                describe_network(str(path))


def test_a_hypernetwork_file_of_another_layout_is_refused(tmp_path, tiny_checkpoints, dataset):
    """A width holding one layer state instead of the (k, v) pair had been loaded into k alone (v started fresh,
    unannounced); a layer_structure written as text, or tensors where the layer states belong, raised ValueError /
    AttributeError (start_from and `info`)."""
    from lib_sdtrain.commands.info import describe_hypernetwork

    hn = load_checkpoint(run(tmp_path, tiny_checkpoints, dataset, "hn", method="hypernetwork").final)
    width = next(k for k in hn if type(k) is int)
    cases = {
        "one_state": ({width: hn[width][:1]}, "does not hold the \\(k, v\\) pair"),
        "text_structure": ({"layer_structure": "1, 2, 1"}, "is not a list of numbers"),
        "tensors": ({width: (torch.zeros(3), torch.zeros(3))}, "does not hold the \\(k, v\\) pair"),
        "bad_factor": ({"layer_structure": [1, float("nan"), 1]}, "every factor must be"),
    }
    for case, (change, message) in cases.items():
        path = tmp_path / f"{case}.pt"
        torch.save({**hn, **change}, path)
        with pytest.raises(UserError, match=message):
            run(tmp_path, tiny_checkpoints, dataset, "hn2", method="hypernetwork", start_from=str(path))
        with pytest.raises(UserError, match=message):
            describe_hypernetwork(str(path))


def test_lycoris_modules_whose_factors_do_not_fit_are_refused_on_reading(tmp_path):
    """LoHa halves of two shapes raised RuntimeError in `info` (their Hadamard product); a LoKr factor that is no
    matrix was described as if it were one."""
    from safetensors.torch import save_file

    from lib_sdtrain.formats.kohya import import_kohya

    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    loha = {f"{name}.hada_w{i}_{ab}": torch.ones(shape) for i in (1, 2) for ab, shape in (("a", (8, 2)), ("b", (2, 4)))}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    assert import_kohya(tmp_path / "loha.safetensors").algorithms() == {"loha"}
    save_file({**loha, f"{name}.hada_w2_a": torch.ones(7, 2)}, str(tmp_path / "halves.safetensors"))
    with pytest.raises(UserError, match="two Hadamard halves have other shapes"):
        import_kohya(tmp_path / "halves.safetensors")
    save_file({f"{name}.lokr_w1": torch.ones(4), f"{name}.lokr_w2": torch.ones(2, 2)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(UserError, match="lokr_w1 \\(4,\\) is not a matrix"):
        import_kohya(tmp_path / "k.safetensors")


def test_an_epoch_save_of_the_runs_own_name_is_not_a_start(tmp_path, tiny_checkpoints, dataset):
    """With overwrite on, a run named like the file it starts from replaced that file with its own epoch save
    part-way and keep_last then deleted it: the user's start was lost. The final file of that name may still be
    trained further in place (replaced once, at the end)."""
    import hashlib

    lora = {"network_dim": 4, "save_dtype": "fp32"}
    out = tmp_path / "own"
    run(tmp_path, tiny_checkpoints, dataset, "own", section=lora, max_steps=0, epochs=2, save_every_n_epochs=1)
    start = out / "own-000001.safetensors"
    digest = hashlib.sha256(start.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="is an epoch or step save of this run's name"):
        run(tmp_path, tiny_checkpoints, dataset, "own", section=lora, max_steps=0, epochs=2, save_every_n_epochs=1,
            keep_last=1, overwrite=True, start_from=str(start))
    assert hashlib.sha256(start.read_bytes()).hexdigest() == digest
    again = run(tmp_path, tiny_checkpoints, dataset, "own", section=lora, overwrite=True,
                start_from=str(out / "own.safetensors"))
    assert again.final == out / "own.safetensors"


def test_a_model_checkpoint_given_as_the_start_is_refused_from_its_header(tmp_path, tiny_checkpoints, dataset,
                                                                          monkeypatch):
    """A checkpoint given by mistake was read whole (and copied to float32 for a LoRA) before it was refused, with
    a message that named neither the file nor what it is: a full-size SDXL checkpoint needs some 14 GB for that."""
    import shutil

    from lib_sdtrain.formats import safetensors_io

    start = tmp_path / "model.safetensors"
    shutil.copy(tiny_checkpoints["sd1"], start)
    real = safetensors_io.read_safetensors

    def reader(path, *a, **k):
        assert Path(path) != start, "the checkpoint's tensors were read"
        return real(path, *a, **k)

    monkeypatch.setattr(safetensors_io, "read_safetensors", reader)
    cases = {"lora": "model.safetensors is not a LoRA / LyCORIS network file \\(a model checkpoint",
             "embedding": "model.safetensors: not an embedding A1111 reads \\(it holds 909 tensors",
             "hypernetwork": "a hypernetwork is an A1111 .pt file"}
    for method, message in cases.items():
        name = "zwx" if method == "embedding" else method
        with pytest.raises(UserError, match=message):
            run(tmp_path, tiny_checkpoints, dataset, name, method=method, start_from=str(start),
                section={"token": "zwx"} if method == "embedding" else {})


def test_a_pickled_checkpoint_given_as_the_start_is_refused_before_its_tensors_are_read(tmp_path, tiny_checkpoints,
                                                                                        dataset, monkeypatch):
    """The same for a pickled file: an embedding or hypernetwork start read a .ckpt's tensors in full before
    its layout was judged."""
    from lib_sdtrain.formats import safe_pickle

    start = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"model.diffusion_model.w{i}": torch.zeros(4) for i in range(3)}, "epoch": 1}, start)
    monkeypatch.setattr(safe_pickle, "materialize", lambda *a: pytest.fail("the checkpoint's tensors were read"))
    with pytest.raises(UserError, match="model.ckpt: not an embedding A1111 reads \\(a dict of 2 entries"):
        run(tmp_path, tiny_checkpoints, dataset, "zwx", method="embedding", start_from=str(start),
            section={"token": "zwx"})
    with pytest.raises(UserError, match="model.ckpt: not a hypernetwork \\(no layers by attention width"):
        run(tmp_path, tiny_checkpoints, dataset, "hn", method="hypernetwork", start_from=str(start))
