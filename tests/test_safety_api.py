"""The JSON API and the app are not an open door (issue #14): the routes exist only with --api (or our
setting), and every route (starting or stopping a job, reading jobs and outputs) needs --api-auth unless the
client is this computer and nothing else can reach the server; the standalone app refuses other addresses without a login."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import fake_webui  # noqa: E402

sys.path.remove(str(HERE))


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    root = tmp_path_factory.mktemp("webui-api")
    with fake_webui.installed(root):
        from modules import script_callbacks

        script_callbacks.clear_callbacks()
        spec = importlib.util.spec_from_file_location("training_lab.py", ROOT / "scripts" / "training_lab.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
        module.stop_jobs()


@pytest.fixture
def opts():
    from modules import shared

    saved = {k: getattr(shared.cmd_opts, k, None) for k in ("api", "api_auth", "listen", "server_name", "share")}
    yield shared.cmd_opts
    for k, v in saved.items():
        setattr(shared.cmd_opts, k, v)


def mounted(script):
    from fastapi import FastAPI

    app = FastAPI()
    script.on_app_started(None, app)
    return app, {r.path for r in app.routes if r.path.startswith(script.API_PREFIX)}


def test_routes_exist_only_with_api_or_our_setting(script, opts):
    from modules import shared

    opts.api = False
    assert mounted(script)[1] == set()
    opts.api = True
    assert "/training-lab/api/jobs" in mounted(script)[1]
    opts.api = False
    shared.opts.data["training_lab_api"] = True
    try:
        assert "/training-lab/api/jobs" in mounted(script)[1]
    finally:
        shared.opts.data.pop("training_lab_api", None)


def test_routes_refuse_other_computers_without_api_auth(script, opts):
    from fastapi.testclient import TestClient

    opts.api, opts.api_auth, opts.listen = True, None, False
    app, _ = mounted(script)
    remote, local = TestClient(app), TestClient(app, client=("127.0.0.1", 50000))
    r = remote.post("/training-lab/api/jobs", json={"method": "nope"})
    assert r.status_code == 403 and "--api-auth" in r.json()["detail"]
    assert remote.post("/training-lab/api/jobs/job-1/stop").status_code == 403
    assert local.post("/training-lab/api/jobs", json={"method": "nope"}).status_code == 400   # past the guard
    # the read routes show file paths, prompts and settings: the same rule (#14 leftover: they were open)
    for path in READ_ROUTES:
        r = remote.get(path)
        assert r.status_code == 403 and "reading" in r.json()["detail"] and "--api-auth" in r.json()["detail"], path
    assert local.get("/training-lab/api/jobs").json() == {"jobs": []}                # this computer: no login
    assert local.get("/training-lab/api/outputs").status_code == 200
    assert local.get("/training-lab/api/jobs/job-1").status_code == 404              # past the guard
    # listening beyond this computer: no route for anyone without --api-auth (tunnels look local)
    for flag, value in (("listen", True), ("server_name", "0.0.0.0"), ("share", True)):
        setattr(opts, flag, value)
        app, _ = mounted(script)
        client = TestClient(app, client=("127.0.0.1", 50000))
        r = client.post("/training-lab/api/jobs", json={"method": "nope"})
        assert r.status_code == 403 and "listens beyond" in r.json()["detail"], flag
        for path in READ_ROUTES:
            r = client.get(path)
            assert r.status_code == 403 and "listens beyond" in r.json()["detail"], (flag, path)
        setattr(opts, flag, False if flag != "server_name" else None)
    opts.listen, opts.api_auth = True, "alice:s3cret"
    app, _ = mounted(script)
    client = TestClient(app)
    assert client.post("/training-lab/api/jobs", json={"method": "nope"}).status_code == 401
    assert client.post("/training-lab/api/jobs", json={"method": "nope"}, auth=("alice", "s3cret")).status_code == 400
    for path in READ_ROUTES:
        assert client.get(path).status_code == 401, path
    assert client.get("/training-lab/api/jobs", auth=("alice", "s3cret")).status_code == 200
    assert client.get("/training-lab/api/jobs/job-1", auth=("alice", "s3cret")).status_code == 404


READ_ROUTES = ("/training-lab/api/jobs", "/training-lab/api/jobs/job-1", "/training-lab/api/outputs")


def test_the_app_refuses_other_addresses_without_a_login(capsys, monkeypatch):
    from lib_sdtrain.cli import main
    from lib_sdtrain.commands import app
    from lib_sdtrain.errors import UserError

    monkeypatch.delenv("TRAINING_LAB_AUTH", raising=False)
    monkeypatch.setattr(app, "make_app", lambda args: pytest.fail("the app was built"))
    assert main(["app", "--host", "0.0.0.0", "--no-browser"]) == 2
    assert "--auth" in capsys.readouterr().err
    for port in ("0", "99999", "-1"):      # gradio's own OverflowError traceback before this check
        assert main(["app", "--port", port, "--no-browser"]) == 2
        assert "--port must be from 1 to 65535" in capsys.readouterr().err
    for host in ("127.0.0.1", "localhost", "::1"):
        app.check_listen(host, [])
    app.check_listen("0.0.0.0", app.parse_auth("alice:pw:with:colons"))
    assert app.parse_auth("a:b,c:d") == [("a", "b"), ("c", "d")]
    with pytest.raises(UserError):
        app.parse_auth("nopassword")


def test_the_app_refuses_an_output_root_it_cannot_write_before_building_anything(tmp_path, capsys, monkeypatch):
    """`app --output-root FILE` started the server and failed only when a job ran; now one line at start."""
    from lib_sdtrain.cli import main
    from lib_sdtrain.commands import app

    monkeypatch.setattr(app, "make_app", lambda args: pytest.fail("the app was built"))
    afile = tmp_path / "afile"
    afile.write_text("the user's")
    for root, words in ((afile, "is a file, not a folder: give --output-root a folder"),
                        (afile / "sub", "cannot be created: " + str(afile) + " is a file")):
        assert main(["app", "--output-root", str(root), "--no-browser"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    monkeypatch.setenv("TRAINING_LAB_OUTPUT", str(afile))             # the default root, from the environment
    assert main(["app", "--no-browser"]) == 2
    assert "$TRAINING_LAB_OUTPUT" in capsys.readouterr().err
    assert afile.read_text() == "the user's"
    app.check_output_root(str(tmp_path / "new" / "outputs"))            # a missing folder is fine: made when used
    assert not (tmp_path / "new").exists()


def test_a_job_with_only_resume_takes_the_run_settings(tmp_path):
    from lib_sdtrain.events import Events, StopToken
    from lib_sdtrain.hosts.standalone import StandaloneHost
    from lib_sdtrain.jobs import JobManager
    from lib_sdtrain.testing.tiny import make_tiny_checkpoint
    from lib_sdtrain.train.loop import train
    from lib_sdtrain.train.settings import TrainSettings
    from conftest import make_dataset

    model = make_tiny_checkpoint(tmp_path / "tiny.safetensors", "sd1")
    cfg = TrainSettings.from_dict({
        "model": str(model), "data": str(make_dataset(tmp_path / "data", 2, 64)), "output": str(tmp_path / "out"),
        "name": "r", "resolution": 64, "min_bucket": 64, "max_bucket": 64, "max_steps": 4, "tensorboard": False,
        "sample_every_n_epochs": 0, "lora": {"network_dim": 2, "network_alpha": 2, "targets": "attn"}})
    host = StandaloneHost(device="cpu", dtype="fp32", output_root=tmp_path / "outputs")
    stop = StopToken()
    part = train(cfg, host, Events(lambda e: stop.request() if e.kind == "progress" and e.data.get("phase") != "cache"
                                   and e.data.get("step") == 2 else None), stop)
    jobs = JobManager(lambda: host)
    try:
        job = jobs.start({"resume": str(part.run_dir), "lora": {"network_alpha": 2}})
        assert jobs.wait(job, timeout=300) == "finished", jobs.status(job)
        assert jobs.status(job)["step"] == 4 and (tmp_path / "out" / "r.safetensors").is_file()
    finally:
        jobs.shutdown(timeout=30)
