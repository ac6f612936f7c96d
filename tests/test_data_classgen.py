"""classgen.py with a fake host that renders solid colours: names, resuming, events, stopping."""

from pathlib import Path

import pytest
from PIL import Image

from lib_sdtrain.classgen import class_image_name, generate_class_images
from lib_sdtrain.errors import UserError
from lib_sdtrain.events import EventLog, Events, StopToken
from lib_sdtrain.hosts import SampleRequest


class FakeHost:
    name = "fake"

    def __init__(self):
        self.requests: list[SampleRequest] = []

    def sample(self, parts, requests, stop=None):
        self.requests += requests
        return [Image.new("RGB", (r.width, r.height), ((r.seed * 37) % 256, 80, 160)) for r in requests]


def test_renders_the_set_with_deterministic_names(tmp_path):
    host, log = FakeHost(), EventLog()
    out = tmp_path / "reg" / "1_dog"
    res = generate_class_images(host, None, "a photo of a dog", 5, out, seed=100, width=64, height=96,
                                steps=4, events=Events(log), batch_size=2)
    assert (res.generated, res.skipped, res.stopped) == (5, 0, False)
    assert [r.seed for r in host.requests] == [100, 101, 102, 103, 104]
    assert all((r.width, r.height, r.steps, r.prompt) == (64, 96, 4, "a photo of a dog") for r in host.requests)
    names = [p.name for p in res.paths]
    assert names == [class_image_name("a photo of a dog", s, width=64, height=96, steps=4) for s in range(100, 105)]
    with Image.open(res.paths[1]) as im:
        assert im.size == (64, 96) and im.getpixel((0, 0)) == ((101 * 37) % 256, 80, 160)
    assert (out / (Path(names[0]).stem + ".txt")).read_text() == "a photo of a dog\n"
    _, events = log.since(0)
    progress = [e.data["step"] for e in events if e.kind == "progress"]
    assert progress == [0, 1, 2, 3, 4, 5] and all(e.data.get("job") == "classgen" for e in events if e.kind == "progress")


def test_resumes_and_grows_without_rerendering(tmp_path):
    host = FakeHost()
    generate_class_images(host, None, "a dog", 3, tmp_path, seed=0, width=64, height=64)
    host2 = FakeHost()
    res = generate_class_images(host2, None, "a dog", 6, tmp_path, seed=0, width=64, height=64)
    assert (res.generated, res.skipped) == (3, 3) and [r.seed for r in host2.requests] == [3, 4, 5]
    other = generate_class_images(FakeHost(), None, "a cat", 2, tmp_path, seed=0, width=64, height=64)
    assert other.generated == 2 and len(list(tmp_path.glob("*.png"))) == 8   # another prompt, other names


def test_stop_token_keeps_what_was_saved(tmp_path):
    stop = StopToken()
    host = FakeHost()

    def listener(event):
        if event.kind == "progress" and event.data["step"] == 2:
            stop.request("test")

    res = generate_class_images(host, None, "a dog", 10, tmp_path, seed=0, width=64, height=64,
                                events=Events(listener), stop=stop)
    assert res.stopped and res.generated == 2 and len(res.paths) == 2
    stop.reset()
    res2 = generate_class_images(FakeHost(), None, "a dog", 10, tmp_path, seed=0, width=64, height=64, stop=stop)
    assert (res2.generated, res2.skipped, res2.stopped) == (8, 2, False)


def test_a_picture_the_host_left_out_is_not_saved_and_drawn_next_time(tmp_path):
    """None from host.sample (A1111's Skip cut that picture short, given a stop token): that seed is not saved
    and not counted, the pictures after it keep their own seeds, and the next call draws only the missing one."""
    class Skipping(FakeHost):
        def sample(self, parts, requests, stop=None):
            return [None if r.seed == 2 else im for r, im in zip(requests, super().sample(parts, requests, stop))]

    log = EventLog()
    res = generate_class_images(Skipping(), None, "a dog", 4, tmp_path, seed=1, width=64, height=64,
                                events=Events(log), stop=StopToken(), batch_size=3)
    assert (res.generated, res.left_out, res.skipped, res.stopped) == (3, 1, 0, False)
    assert [p.name.rsplit("-", 1)[1] for p in res.paths] == ["1.png", "3.png", "4.png"]
    with Image.open(res.paths[1]) as im:                # seed 3's picture under seed 3's name
        assert im.getpixel((0, 0)) == ((3 * 37) % 256, 80, 160)
    _, events = log.since(0)
    assert [e.data["step"] for e in events if e.kind == "progress"] == [0, 1, 2, 3]
    assert res.to_dict()["left_out"] == 1
    host = FakeHost()
    again = generate_class_images(host, None, "a dog", 4, tmp_path, seed=1, width=64, height=64)
    assert (again.generated, again.skipped) == (1, 3) and [r.seed for r in host.requests] == [2]


@pytest.mark.parametrize("kw", [{"prompt": " "}, {"count": -1}, {"seed": -1}, {"width": 70}, {"width": 4104},
                                {"steps": 0}, {"cfg_scale": float("nan")}, {"cfg_scale": float("inf")}])
def test_bad_arguments_are_user_errors(tmp_path, kw):
    args = {"prompt": "a dog", "count": 1, "seed": 0, "width": 64, "steps": 4} | kw
    with pytest.raises(UserError):
        generate_class_images(FakeHost(), None, args.pop("prompt"), args.pop("count"), tmp_path, **args)


def test_a_host_returning_too_few_pictures_is_a_bug(tmp_path):
    class Broken(FakeHost):
        def sample(self, parts, requests, stop=None):
            return []

    with pytest.raises(RuntimeError):
        generate_class_images(Broken(), None, "a dog", 1, tmp_path, width=64, height=64)


@pytest.mark.parametrize("kw, message", [
    ({"count": 10 ** 20}, "from 0 to 100000"),        # listed 10**20 names: never returned
    ({"steps": 10 ** 20}, "steps must be from 1 to 150"),   # torch.linspace's OverflowError traceback
    ({"steps": 151}, "steps must be from 1 to 150"),
    ({"cfg_scale": 1e300}, "from 0 to 30"),           # drew pictures of NaN, saved as class pictures
    ({"cfg_scale": -0.5}, "from 0 to 30"),
])
def test_class_picture_counts_steps_and_cfg_past_every_other_sampling_box_are_refused(tmp_path, kw, message):
    import signal

    def too_slow(*_):
        raise TimeoutError("not refused within 10 s")

    args = {"count": 1, "seed": 0, "width": 64, "height": 64, "steps": 4} | kw
    host = FakeHost()
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(10)
    try:
        with pytest.raises(UserError, match=message):
            generate_class_images(host, None, "a dog", args.pop("count"), tmp_path / "reg", **args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not host.requests and not (tmp_path / "reg").exists()
    generate_class_images(host, None, "a dog", 1, tmp_path / "ok", width=64, height=64, steps=150, cfg_scale=30)
    assert len(list((tmp_path / "ok").glob("class-*.png"))) == 1
