"""Run scripts/training_lab.py's routes and tab under A1111 v1.10's own pins (gradio 3.41.2, fastapi 0.94,
pydantic 1, httpx 0.24.1) — executed by tests/test_extension_script.py with .venv-gradio3's Python.

No pytest there: plain asserts, one "OK <what>" line per check, exit status 0 when all pass.
Usage: python a1111_stack_check.py WEBUI_ROOT_DIR
"""

import importlib.util
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE.parent)]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import fake_webui  # noqa: E402
from lib_sdtrain.testing.tiny import make_tiny_checkpoint  # noqa: E402


def main(root: Path) -> None:
    with fake_webui.installed(root) as dirs:
        make_tiny_checkpoint(dirs["checkpoint"] / "tiny-sd1.safetensors", "sd1")
        from modules import script_callbacks, sd_models, shared

        sd_models.list_models()
        sd_models.load_model(sd_models.checkpoint_aliases["tiny-sd1"])
        script_callbacks.clear_callbacks()
        spec = importlib.util.spec_from_file_location("training_lab.py", ROOT / "scripts" / "training_lab.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)

        import fastapi
        import gradio
        import pydantic
        from fastapi.testclient import TestClient

        print("OK versions", gradio.__version__, fastapi.__version__, pydantic.VERSION)
        try:   # the tab's content belongs to lib_sdtrain/ui; a failure there is reported, the rest still runs
            tabs = script_callbacks.ui_tabs_callback()
            assert [(label, elem) for _, label, elem in tabs] == [("Training Lab", "training_lab")], tabs
            assert isinstance(tabs[0][0], gradio.Blocks)
            print("OK tab built under gradio", gradio.__version__)
        except Exception as e:  # noqa: BLE001
            print(f"TAB-FAIL {type(e).__name__}: {e}")

        shared.cmd_opts.api_auth = "alice:s3cret"
        shared.cmd_opts.api = True   # the routes are mounted only with --api
        app = fastapi.FastAPI()
        script_callbacks.app_started_callback(None, app)
        client = TestClient(app)
        assert client.get("/training-lab/api/jobs").status_code == 401
        folder = root / "data" / "2_zwx toy"
        folder.mkdir(parents=True)
        for i in range(2):
            arr = np.full((64, 64, 3), 60 * i, np.uint8)
            Image.fromarray(arr).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(f"zwx toy {i}")
        body = {"data": str(root / "data"), "name": "stack", "resolution": 64, "min_bucket": 64, "max_bucket": 64,
                "max_steps": 2, "save_every_n_epochs": 0, "save_state": False, "tensorboard": False,
                "sample_every_n_epochs": 0, "lora": {"network_dim": 2, "network_alpha": 2}}
        r = client.post("/training-lab/api/jobs", json=body, auth=("alice", "s3cret"))
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        assert script.manager().wait(job_id, timeout=300) == "finished", script.api_status(job_id)["error"]
        st = client.get(f"/training-lab/api/jobs/{job_id}?since=0", auth=("alice", "s3cret")).json()
        assert st["state"] == "finished" and st["events"], st
        assert (dirs["lora"] / "stack.safetensors").is_file()
        print("OK routes, auth and a training job under fastapi", fastapi.__version__, "/ pydantic", pydantic.VERSION)
        script_callbacks.script_unloaded_callback()
        print("OK unloaded")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
