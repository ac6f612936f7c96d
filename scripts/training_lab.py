"""A1111 entry of Training Lab: wiring only (A1111 executes every file in scripts/ at start-up and on Reload UI).

- on_ui_tabs      → the "Training Lab" tab, built by `lib_sdtrain.ui.tabs.build(ctx)`
- on_ui_settings  → Settings → Training Lab (outputs folder, memory note)
- on_app_started  → JSON routes under /training-lab/api/ (start, stop, watch runs; list runs and outputs), only
                    when A1111 runs with --api (or --nowebui) or Settings → Training Lab → "JSON API" is on;
                    behind A1111's --api-auth when it is set. Without --api-auth, every route (starting or
                    stopping a job, and reading jobs and outputs, which show file paths) is refused for clients
                    on other computers, and for everyone when the WebUI listens beyond this computer (--listen,
                    --server-name, --share, --ngrok)
- Settings → Reload UI executes this file again (new module, callbacks registered anew, a new gradio app and
  FastAPI app). The host and the job manager are not kept here but in lib_sdtrain.hosts.webui (`kept`), which
  Python keeps loaded, so a job running through the reload goes on and the reloaded tab and API show it, follow
  it and stop it; nothing is stopped on reload (A1111's Interrupt stops a job from any tab, as before).
  If the extension's files changed on disk meanwhile (an update), the reloaded tab says that a restart is
  needed to run the new version (`lib_sdtrain.source_changed`).
- on_before_ui    → A1111's Reload UI button no longer interrupts a running Training Lab training job
                    (hosts.webui.reload_keeps_training; it still interrupts anything else, as A1111 does), and
                    the WebUI's exits ("Apply and restart UI", the API's restart/kill/stop; not Ctrl-C, which
                    A1111 makes immediate) first stop a running training job so that it saves a resumable state
                    (hosts.webui.exit_keeps_training_state)

`lib_sdtrain` is imported at the top: the extension folder is on sys.path only while this file is loaded.
Everything heavy (the job manager, the host adapter, gradio pages, fastapi) is imported on first use.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import lib_sdtrain  # must resolve now, while A1111 has the extension folder on sys.path
from modules import script_callbacks, shared

EXTENSION_DIR = Path(__file__).resolve().parents[1]
TAB_LABEL, TAB_ID = "Training Lab", "training_lab"
SECTION = ("training_lab", "Training Lab")
API_PREFIX = "/training-lab/api"


def host():
    """The one WebUIHost of the WebUI process (kept across Reload UI, see the module docstring)."""
    from lib_sdtrain.hosts.webui import WebUIHost, kept

    return kept("host", lambda: WebUIHost(EXTENSION_DIR))


def manager():
    """The one JobManager of the WebUI process: jobs run one at a time, each under A1111's GPU lock and progress
    state; kept across Reload UI, so the reloaded tab sees (and can stop) the job that runs."""
    from lib_sdtrain.hosts.webui import kept

    def make():
        from lib_sdtrain.jobs import JobManager

        h = host()
        return JobManager(lambda: h, around_job=h.job_context)

    return kept("jobs", make)


# ---- the tab --------------------------------------------------------------------------------------------
def ui_context():
    from lib_sdtrain.ui.context import UiContext

    h = host()
    # comparisons and the Dataset tab's class pictures run as A1111 jobs through the host's job_context (queue
    # lock, progress, Interrupt)
    return UiContext(host_factory=lambda: h, jobs=manager(), in_webui=True, default_model="",
                     config_dir=h.outputs_root() / "configs")


UPDATED_NOTE = ("Training Lab's files changed on disk since the WebUI started (an update?). Reload UI keeps the "
                "code that was loaded, so that a training run can go on through it: restart the WebUI to use the "
                "new version.")


def on_ui_tabs():
    from lib_sdtrain.ui import tabs

    ctx = ui_context()
    if lib_sdtrain.source_changed():
        print(UPDATED_NOTE)   # it names Training Lab itself
        ctx.extras["notice"] = UPDATED_NOTE
    blocks = tabs.build(ctx)
    return [(blocks, TAB_LABEL, TAB_ID)]


# ---- settings -------------------------------------------------------------------------------------------
def on_ui_settings():
    opts = shared.opts
    opts.add_option("training_lab_outputs_dir", shared.OptionInfo(
        "", "Folder for Training Lab runs, control pictures and class images (empty: outputs/training-lab)",
        section=SECTION).info("trained files themselves go to models/Lora, embeddings, models/hypernetworks "
                              "and models/Stable-diffusion"))
    opts.add_option("training_lab_api", shared.OptionInfo(
        False, "JSON API under /training-lab/api/ even without --api (restart the WebUI to apply)",
        section=SECTION).info("using it from other computers needs --api-auth"))
    opts.add_option("training_lab_memory_note", shared.OptionInfo(
        True, "Show the GPU memory note on the Train tab", section=SECTION).info(
        "training uses the loaded checkpoint in place (no second copy); while it runs, generation waits"))


# ---- JSON API -------------------------------------------------------------------------------------------
def api_credentials() -> dict[str, str]:
    """{user: password} from --api-auth "user:pass,user2:pass2" (A1111's rule); empty = no auth."""
    raw = getattr(shared.cmd_opts, "api_auth", None) or ""
    out = {}
    for item in raw.split(","):
        if ":" in item:
            user, password = item.split(":", 1)
            out[user] = password
    return out


LOOPBACK = {"127.0.0.1", "::1", "localhost", "0:0:0:0:0:0:0:1"}


def api_enabled() -> bool:
    """A1111 mounts its own API only with --api (or --nowebui); ours follows, or our explicit setting."""
    o = shared.cmd_opts
    return bool(getattr(o, "api", False) or getattr(o, "nowebui", False)
                or getattr(shared.opts, "training_lab_api", False))


def listens_beyond_localhost() -> bool:
    """Whether other computers can reach the WebUI: --listen, a --server-name that is not loopback, or a tunnel
    (--share, --ngrok; their clients look local to the server, so the address alone cannot tell)."""
    o = shared.cmd_opts
    name = (getattr(o, "server_name", None) or "").strip().lower()
    return bool(getattr(o, "listen", False) or (name and name not in LOOPBACK) or getattr(o, "share", False)
                or getattr(o, "ngrok", None))


def job_route_refusal(client_host: str | None, reading: bool = False) -> str | None:
    """Why an API request must be refused, or None. With --api-auth every route already asks for a password;
    without it only this computer may use the routes, and only when nothing else can reach it. The same rule
    holds for starting/stopping jobs and for reading (`reading`): the job list, a job's events and the output
    list reveal file paths, prompts and settings."""
    if api_credentials():
        return None
    what = ("reading Training Lab jobs and outputs (they show file paths and settings)" if reading
            else "starting or stopping Training Lab jobs")
    if listens_beyond_localhost():
        return (f"{what} through the API needs --api-auth when the WebUI listens beyond this computer (--listen, "
                "--server-name, --share or --ngrok)")
    if (client_host or "").lower() not in LOOPBACK:
        return f"{what} through the API from another computer needs --api-auth"
    return None


def credentials_ok(username: str, password: str) -> bool:
    creds = api_credentials()
    if username not in creds:
        return False
    return secrets.compare_digest(password.encode("utf-8"), creds[username].encode("utf-8"))


def api_start(settings: dict) -> dict:
    if not isinstance(settings, dict):
        from lib_sdtrain.errors import UserError

        raise UserError("the request body must be a JSON object of training settings")
    job_id = manager().start(settings)
    return {"job_id": job_id, "status": manager().status(job_id)}


def api_stop(job_id: str) -> dict:
    return {"job_id": job_id, "state": manager().stop(job_id)}


def api_status(job_id: str, since: int = 0) -> dict:
    return manager().status(job_id, since=int(since))


def api_jobs() -> dict:
    return {"jobs": manager().list_jobs()}


def api_outputs() -> dict:
    return {"outputs": manager().list_outputs()}


def api_compare(body: dict) -> dict:
    """Compare a run's saved files on the same prompts and seeds (the Compare tab's job): renders as an A1111
    job (its queue lock; its progress API shows it; its Interrupt stops it, keeping a partial grid), writes the
    grid and its JSON beside the run (or at `out`), returns their paths, the summary rows, the advice, its
    warnings (e.g. a save left out) and whether it was stopped. Body: {"run": run folder or a saved file,
    "settings": CompareSettings fields (sampler: euler / ddim, or A1111's Euler / DDIM), "advice": bool, "out":
    optional .png path}."""
    from lib_sdtrain.errors import UserError

    if not isinstance(body, dict) or not isinstance(body.get("settings", {}), dict):
        raise UserError('the request body must be a JSON object: {"run": "RUN FOLDER", "settings": {...}}')
    unknown = sorted(set(body) - set(COMPARE_KEYS))   # a misspelt "settings" compared with the run's defaults
    if unknown:
        raise UserError(f"unknown key '{unknown[0]}' in the compare request; the keys are {', '.join(COMPARE_KEYS)}")
    for key in ("run", "out"):   # a list or a number was a 500 (after the whole grid was drawn, for out)
        value = body.get(key)
        if (value is not None and not isinstance(value, str)) or "\x00" in (value or ""):
            raise UserError(f"{key}: give a path as text, not {value!r}")
    advice = body.get("advice", True)
    if not isinstance(advice, bool):           # bool("no") was True
        raise UserError(f"advice: true or false, not {advice!r}")
    from lib_sdtrain.evaluate.compare import CompareSettings
    from lib_sdtrain.ui.compare_tab import run_compare

    settings = CompareSettings.from_dict(body.get("settings") or {})
    res = run_compare(ui_context(), body.get("run") or "", settings, advice=advice, out=body.get("out") or None)
    comp = res["comparison"]                         # None: stopped while waiting for the queue, no grid
    return {"path": res["path"], "json": res["json"], "advice": res["advice"] if advice and comp else None,
            "rows": comp.summary() if comp is not None else [],   # numbers (null where not scored), not text
            "warnings": list(comp.warnings) if comp is not None else [],   # e.g. a save left out (NaN weights)
            "stopped": res["stopped"]}               # Interrupt (or the tab's Stop): a partial grid


COMPARE_KEYS = ("run", "settings", "advice", "out")   # api_compare's body

ROUTES = [  # (method, path, handler)
    ("POST", "/jobs", api_start),
    ("GET", "/jobs", api_jobs),
    ("GET", "/jobs/{job_id}", api_status),
    ("POST", "/jobs/{job_id}/stop", api_stop),
    ("GET", "/outputs", api_outputs),
    ("POST", "/compare", api_compare),
]


def register_routes(app) -> list[str]:
    """Add the routes to A1111's FastAPI app; returns their paths. A route the app already has (the same path
    and method) is not added again: A1111 builds a new app on each Reload UI, and a second call for the same app
    would otherwise put a second, unreachable copy of every route beside the first."""
    from fastapi import Body, Depends, HTTPException, Request
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    from lib_sdtrain.errors import UserError

    def call(fn, *args):
        try:
            return fn(*args)
        except UserError as e:
            status = 404 if str(e).startswith("no job with id") else 400
            raise HTTPException(status_code=status, detail=str(e)) from None
        except Exception as e:  # noqa: BLE001 - a bug or a WebUI failure: one clear line here, the trace in the log
            from lib_sdtrain.jobs import crash_line

            logging.getLogger("training_lab").exception("Training Lab API %s failed", fn.__name__)
            raise HTTPException(status_code=500, detail=crash_line(e)) from None

    def start(settings: dict = Body(...)):
        return call(api_start, settings)

    def jobs():
        return call(api_jobs)

    def status(job_id: str, since: int = 0):
        return call(api_status, job_id, since)

    def stop(job_id: str):
        return call(api_stop, job_id)

    def outputs():
        return call(api_outputs)

    def compare(body: dict = Body(...)):
        return call(api_compare, body)

    start.__annotations__ = {"settings": dict}
    compare.__annotations__ = {"body": dict}
    status.__annotations__ = {"job_id": str, "since": int}
    stop.__annotations__ = {"job_id": str}
    endpoints = {api_start: start, api_jobs: jobs, api_status: status, api_stop: stop, api_outputs: outputs,
                 api_compare: compare}
    dependencies = []
    if api_credentials():
        def auth(credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
            if credentials_ok(credentials.username, credentials.password):
                return True
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})

        # real annotation objects: this file uses postponed (string) annotations, which FastAPI would try to
        # resolve in the module globals, where HTTPBasicCredentials is not
        auth.__annotations__ = {"credentials": HTTPBasicCredentials}
        dependencies = [Depends(auth)]
    def guard_for(reading: bool):
        def local_only(request: Request):
            refusal = job_route_refusal(request.client.host if request.client else None, reading=reading)
            if refusal:
                raise HTTPException(status_code=403, detail=refusal)
            return True

        local_only.__annotations__ = {"request": Request}
        return local_only

    present = {(getattr(r, "path", None), m) for r in getattr(app, "routes", [])
               for m in (getattr(r, "methods", None) or ())}
    paths = []
    for method, path, handler in ROUTES:   # every route: those that start or stop jobs, and those that read
        if (API_PREFIX + path, method) in present:
            paths.append(API_PREFIX + path)
            continue
        app.add_api_route(API_PREFIX + path, endpoints[handler], methods=[method],
                          dependencies=dependencies + [Depends(guard_for(reading=method == "GET"))])
        paths.append(API_PREFIX + path)
    return paths


def on_app_started(demo, app):
    if api_enabled():
        register_routes(app)


# ---- Reload UI and shutting down -------------------------------------------------------------------------
def on_before_reload():
    """Settings → Reload UI: nothing stops; the job manager is kept (lib_sdtrain.hosts.webui.kept) and the
    reloaded page shows the running job. One console line says so."""
    from lib_sdtrain.hosts.webui import peek

    jobs = peek("jobs")
    run = jobs.running() if jobs is not None else None
    if run is not None:
        print(f"Training Lab: job {run.id} keeps running through the UI reload; the reloaded Training Lab tab "
              "(Monitor) follows and stops it")


def on_before_ui():
    """Before A1111 builds its UI (start-up and each Reload UI): the Reload UI button it is about to build is to
    leave a running training job alone (lib_sdtrain.hosts.webui.reload_keeps_training), and the WebUI's exits
    are to stop one so that it saves its state first (exit_keeps_training_state)."""
    from lib_sdtrain.hosts.webui import exit_keeps_training_state, reload_keeps_training

    reload_keeps_training()
    exit_keeps_training_state()


def stop_jobs():
    """Stop every job and end the worker, and let the next manager() make a new manager (tests; not called on
    Reload UI)."""
    from lib_sdtrain.hosts.webui import forget

    jobs = forget("jobs")
    if jobs is not None:
        jobs.stop_all("the Training Lab job manager is shutting down")
        jobs.shutdown(timeout=5.0)


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
script_callbacks.on_before_ui(on_before_ui)
script_callbacks.on_before_reload(on_before_reload)
