"""The standalone app in a real headless Chromium, as a person would use it.

Starts `python -m lib_sdtrain app` on a free port with a tiny random SD1 model and a tiny generated dataset,
then, in the browser: scans the dataset in the Dataset tab, loads a config file in the Train tab, types the data
folder and a small step count, starts a LoRA run, watches the Monitor tab's progress and loss chart move and the
saved file appear, starts a second run and stops it with the Stop button. Screenshots go to tests/artifacts/.

Needs Debian's `chromium` and `chromium-driver` (tools/test.sh installs them when run as root) and selenium
(requirements-lock.txt); skips with the reason otherwise. Deselect with `-m "not browser"`.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_inputs(work: Path) -> tuple[Path, Path, Path]:
    from PIL import Image, ImageDraw

    from lib_sdtrain.testing.tiny import make_tiny_checkpoint

    model = make_tiny_checkpoint(work / "tiny.safetensors", "sd1")
    folder = work / "data" / "2_sks cat"
    folder.mkdir(parents=True)
    rng = random.Random(1)
    for i in range(4):
        im = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
        ImageDraw.Draw(im).ellipse([8, 8, 40 + 4 * i, 48], fill=(250, 250, 250))
        im.save(folder / f"c{i}.png")
        (folder / f"c{i}.txt").write_text("sks cat, white dot\n")
    config = work / "run.toml"
    config.write_text(f"model = '{model.as_posix()}'\nresolution = 64\nmin_bucket = 64\nmax_bucket = 128\nepochs = 100\n"
                      "sample_every_n_epochs = 0\nsave_every_n_epochs = 0\ntensorboard = false\n")
    return model, work / "data", config


@pytest.fixture()
def browser():
    if not (Path(CHROMIUM).is_file() and Path(DRIVER).is_file()):
        pytest.skip("chromium / chromedriver not installed (Debian: apt-get install chromium chromium-driver; "
                    "tools/test.sh does it when run as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements-lock.txt)")
    pytest.importorskip("gradio", reason="the app needs gradio (requirements.txt)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture()
def app(tmp_path):
    model, data, config = _make_inputs(tmp_path)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "lib_sdtrain", "app", "--port", str(port), "--model", str(model),
                             "--output-root", str(tmp_path / "out"), "--device", "cpu", "--dtype", "fp32",
                             "--no-browser"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    if proc.poll() is not None:
        log.close()
        pytest.fail("the app did not start:\n" + (tmp_path / "app.log").read_text()[-4000:])
    yield {"url": url, "data": data, "config": config, "out": tmp_path / "out", "log": tmp_path / "app.log"}
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


_SELECTED_JOB = ("const e = document.querySelector('#training_lab_monitor_job input'); "
                 "return e ? e.value : '';")
JOB_CAP_S = 240          # only a guard against a hung job (a whole run takes ~15 s here); the waits end when the job's state is reached


class JobFailed(Exception):
    pass


class Page:
    """Small helpers over selenium for gradio pages (elements found by our elem_ids)."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By

        self.d, self.By = driver, By

    def wait(self, what, timeout: float = 30.0, message: str = "", fail: bool = True):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = what()
                if value:
                    return value
            except Exception:  # noqa: BLE001 - the element may be re-rendered while we look
                pass
            time.sleep(0.3)
        if not fail:
            return None
        self.shot("ui_failure.png")
        raise AssertionError(f"timed out: {message or what}")

    def content(self, elem_id: str) -> str:
        """An element's text even while its tab is hidden (selenium's .text is empty for hidden elements)."""
        return self.d.execute_script("const e = document.getElementById(arguments[0]); "
                                     "return e ? e.textContent : '';", elem_id) or ""

    def wait_job(self, name: str, states: tuple[str, ...], message: str, cap: float = JOB_CAP_S) -> str:
        """Wait on the job's state as the Monitor shows it (not on a fixed time): until its progress line names
        `name` with one of `states`; fails at once when the job failed. `cap` only guards against a hang."""
        def state() -> str:
            text = (self.content("training_lab_monitor_progress") + " " +
                    self.content("training_lab_monitor_message")).lower()
            if name in text and "failed" in text:
                raise JobFailed(text)
            return text if name in text and any(s in text for s in states) else ""

        try:
            return self.wait(state, cap, message)
        except AssertionError as e:   # a timeout: say what the Monitor showed instead
            raise AssertionError(f"{e}; the Monitor showed job {self.d.execute_script(_SELECTED_JOB)!r}: "
                                 f"{self.content('training_lab_monitor_progress')!r}") from None
        except JobFailed as e:
            self.shot("ui_job_failed.png")
            raise AssertionError(f"{message}: the job failed: {e}") from None

    def el(self, elem_id: str):
        return self.d.find_element(self.By.ID, elem_id)

    def text(self, elem_id: str) -> str:
        return self.el(elem_id).text

    def tab(self, label: str) -> None:
        buttons = self.d.find_elements(self.By.CSS_SELECTOR, "button[role=tab]")
        button = next(b for b in buttons if b.text.strip() == label and b.is_displayed())
        button.click()

    def type(self, elem_id: str, text: str) -> None:
        box = self.el(elem_id).find_element(self.By.CSS_SELECTOR, "textarea, input")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", box)
        box.clear()
        box.send_keys(text)
        box.send_keys("\t")          # blur: typed settings update on blur

    def open_accordion(self, label: str) -> None:
        head = self.wait(lambda: next((h for h in self.d.find_elements(self.By.CSS_SELECTOR, ".label-wrap")
                                       if h.text.strip().startswith(label) and h.is_displayed()), None),
                         20, f"the {label!r} accordion")
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", head)
        head.click()

    def click(self, elem_id: str) -> None:
        button = self.el(elem_id)
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
        button.click()

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.d.save_screenshot(str(path))
        return path


def test_app_in_chromium_trains_and_stops(browser, app):
    t0 = time.time()
    page = Page(browser)
    browser.get(app["url"])
    page.wait(lambda: browser.find_elements(page.By.ID, "training_lab_tabs"), 45, "the page loads")

    # Dataset tab: scan the folder
    page.tab("Dataset")
    page.type("training_lab_ds_folder", str(app["data"]))
    page.click("training_lab_ds_scan")
    page.wait(lambda: "4 pictures" in page.text("training_lab_ds_report"), 30, "the scan report")
    assert "2_sks cat" in page.text("training_lab_ds_report")
    page.shot("ui_dataset_tab.png")

    # Train tab: load the config, then the data folder, a name and a small step count
    page.tab("Train")
    page.wait(lambda: page.el("training_lab_train_start").is_displayed(), 20, "the Train tab")
    page.open_accordion("Config file")
    page.wait(lambda: page.el("training_lab_train_config_path").is_displayed(), 10, "the config accordion")
    page.type("training_lab_train_config_path", str(app["config"]))
    page.click("training_lab_train_config_load")
    page.wait(lambda: "Loaded" in page.text("training_lab_train_message")
              or "loaded" in page.text("training_lab_train_message"), 20, "the config loads")
    page.type("training_lab_train_data", str(app["data"]))
    page.type("training_lab_train_name", "browser-lora")
    page.type("training_lab_train_max_steps", "80")   # long enough to see the chart grow on the fast toy model
    page.wait(lambda: "max_steps 80" in page.text("training_lab_train_plan"), 20, "the steps arithmetic")
    page.shot("ui_tab.png")
    page.click("training_lab_train_start")

    # Monitor tab (the app switches to it): progress, the loss chart and the saved file
    page.wait(lambda: page.el("training_lab_monitor_progress").is_displayed(), 20, "the Monitor tab opens")
    page.wait_job("browser-lora", ("step ",), "the first run trains")
    first = page.wait(lambda: browser.execute_script(
        "return document.querySelectorAll('#training_lab_monitor_chart polyline.tl-loss').length && "
        "document.querySelector('#training_lab_monitor_chart polyline.tl-loss').getAttribute('points')"),
        60, "the loss chart draws")
    progress_seen = page.text("training_lab_monitor_progress")
    page.wait_job("browser-lora", ("finished",), "the first run finishes")
    page.wait(lambda: "browser-lora.safetensors" in page.text("training_lab_monitor_saved"), 60,
              "the finished file is listed")
    last = browser.execute_script(
        "return document.querySelector('#training_lab_monitor_chart polyline.tl-loss').getAttribute('points')")
    assert len(last.split()) > len(first.split()) or last != first, "the loss chart did not move"
    assert progress_seen.strip(), "no progress shown"
    assert (app["out"] / "Lora" / "browser-lora.safetensors").is_file() or \
        list(app["out"].rglob("browser-lora.safetensors")), "the LoRA file is not on disk"
    page.shot("ui_monitor_tab.png")

    # A second run, stopped with the Stop button
    page.tab("Train")
    page.type("training_lab_train_name", "browser-stop")
    page.type("training_lab_train_max_steps", "100000")
    # typed settings reach the server on blur; start only once the arithmetic shows the new cap
    page.wait(lambda: "100000" in page.text("training_lab_train_plan"), 30, "the new settings are applied")
    page.click("training_lab_train_start")

    def answered() -> bool:   # the server's answer to Start names the job (Train message or Monitor)
        return "browser-stop" in page.content("training_lab_train_message") + page.content(
            "training_lab_monitor_progress")

    if not page.wait(answered, 30, fail=False):
        # Seen 2 times in ~10 full-suite runs, never alone: the click was lost while the page was still
        # updating from the first run (no answer from the server). Record the page, then press Start once more.
        page.shot("ui_second_start_lost.png")
        page.tab("Train")
        page.click("training_lab_train_start")
        page.wait(answered, 60, "the server answers the second Start")
    page.wait_job("browser-stop", ("running",), "the second run runs")
    page.click("training_lab_monitor_stop")
    page.wait_job("browser-stop", ("stopped",), "the run stops")
    page.shot("ui_stopped.png")
    print(f"browser test: {time.time() - t0:.0f} s")
