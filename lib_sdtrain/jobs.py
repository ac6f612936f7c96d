"""JobManager: training runs in a background thread, one at a time, watched by polling.

The UI (A1111 tab or the standalone app) never runs training on its request thread: it calls `start()`, gets a
job id back at once, and then polls `status(job_id, since)` for new events, the loss series, saved files and
control pictures. Jobs run strictly one after another on one worker thread (a GPU trains one model at a time);
later ones wait in a queue of at most `max_queued` and can be cancelled there.

Core module: no gradio, no A1111. A host (`host_factory()`, called once per job on the worker thread) is the
only thing that knows where the model lives. `around_job(job)` may wrap a run in a context manager, e.g. the
A1111 adapter taking its GPU lock and filling `shared.state` (a1111-host.md §2: threads started by an
extension must take `queue_lock` themselves).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from .errors import UserError
from .events import Event, EventLog, Events, StoppedBeforeStart, StopToken
from .methods import METHODS

_log = logging.getLogger("training_lab")

STATES = ("queued", "running", "finished", "failed", "stopped")
ACTIVE = ("queued", "running")


@dataclass
class Job:
    """One training run and everything a UI shows about it."""

    id: str
    settings: Any                                  # TrainSettings
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    stop: StopToken = field(default_factory=StopToken)
    log: EventLog = field(default_factory=lambda: EventLog(maxlen=20_000))
    events: Events = field(default_factory=Events)
    phase: str = ""                                # last status text
    progress: dict[str, Any] = field(default_factory=dict)   # last training progress event
    cache_progress: dict[str, Any] = field(default_factory=dict)
    plan_text: str = ""
    losses: list[tuple[int, float, float | None]] = field(default_factory=list)   # (step, loss, ema)
    validation: list[tuple[int, float]] = field(default_factory=list)   # (step, held-out loss)
    saved: list[dict[str, Any]] = field(default_factory=list)   # {"path", "step", "epoch", "final"}
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"label", "step", "epoch", "paths", "change"}
    warnings: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)          # status and warning lines, newest last (≤ 200)
    error: str = ""
    traceback: str = ""
    run_dir: Path | None = None
    result: Any = None                             # TrainResult when the loop returned

    @property
    def method(self) -> str:
        return getattr(self.settings, "method", "")

    @property
    def name(self) -> str:
        return getattr(self.settings, "name", "")


def _plain(value: Any) -> Any:
    """Event data as JSON-friendly values (pictures become their count; paths become strings)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def sample_paths(run_dir: Path, label: str, step: int, count: int, indices: list[int] | None = None) -> list[str]:
    """Where `train.loop.ControlPictures` writes one round of set `label` (A or B): its `count` pictures, or the
    pictures of the request `indices` its samples event names (a round whose host skipped a picture has a gap)."""
    numbers = [int(i) for i in indices] if indices is not None else range(count)
    return [str(run_dir / "samples" / label / f"step{step:06d}-{i:02d}.png") for i in numbers]


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class JobManager:
    """Runs training jobs one at a time on a worker thread; everything else is polling.

    Args:
        host_factory: makes the Host a job trains with (called on the worker thread, once per job).
        train_fn: the training entry point, `train(cfg, host, events, stop) -> TrainResult` (default:
            `train.loop.train`).
        around_job: optional `job -> context manager` wrapped around each run (host locks, progress mirroring).
        max_queued: jobs allowed to wait behind the running one; more are refused with a UserError.
        max_ended: ended jobs kept for the Monitor and the API (their logs and events); a new job forgets the oldest
            beyond that, so that a long session (or a client starting and stopping jobs in a loop) does not grow
            without end. Their files stay on disk.
    """

    def __init__(self, host_factory: Callable[[], Any], *, train_fn: Callable[..., Any] | None = None,
                 around_job: Callable[[Job], ContextManager[Any]] | None = None, max_queued: int = 4,
                 max_ended: int = 200) -> None:
        self.host_factory = host_factory
        self.train_fn = train_fn
        self.around_job = around_job
        self.max_queued = max_queued
        self.max_ended = max_ended
        self._jobs: dict[str, Job] = {}
        self._queue: list[str] = []
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None
        self._closed = False

    # ---- starting and stopping ------------------------------------------------------------------------
    def start(self, settings: Any) -> str:
        """Validate `settings` (a dict or TrainSettings), queue the job and return its id at once.

        Raises UserError for invalid settings, a full queue, or an output name an unfinished job already uses.
        """
        from .train.settings import TrainSettings

        if isinstance(settings, dict) and settings.get("resume") and not settings.get("data"):
            from .config import coerce
            from .train.state import read_state_settings   # {"resume": RUN} alone: the run's own settings

            # the setting's own check first: a list or a number is refused with its name, not a TypeError
            info = next(s for s in TrainSettings.settings() if s.name == "resume")
            resume = coerce(info, settings["resume"], "resume")
            base = read_state_settings(resume)
            settings = {**base, **{k: {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                                   for k, v in settings.items()}}
        if isinstance(settings, dict):
            cfg = TrainSettings.from_dict(settings)
        elif isinstance(settings, TrainSettings):
            settings.validate()
            cfg = settings
        else:
            raise UserError(f"expected training settings, got {type(settings).__name__}")
        if self.train_fn is None:   # the real loop: refuse what its preflight would refuse, before queueing
            from .train.preflight import preflight

            preflight(cfg, self.host_factory())
        with self._lock:
            if self._closed:
                raise UserError("the job manager is shut down")
            for other in self._jobs.values():
                if other.state in ACTIVE and other.name == cfg.name and \
                        getattr(other.settings, "output", "") == cfg.output:
                    raise UserError(f"job {other.id} ({other.state}) already writes the output name "
                                    f"'{cfg.name}'; choose another name")
            if len(self._queue) >= self.max_queued:
                raise UserError(f"{len(self._queue)} jobs are already waiting; stop one or wait for it to start")
            job = Job(id=f"job-{next(self._ids):04d}-{cfg.name}", settings=cfg)
            job.events.subscribe(job.log)
            job.events.subscribe(lambda e, job=job: self._record(job, e))
            self._jobs[job.id] = job
            self._queue.append(job.id)
            ended = [j.id for j in self._jobs.values() if j.state not in ACTIVE]   # oldest first (insertion order)
            for old_id in ended[:max(0, len(ended) - self.max_ended)]:
                del self._jobs[old_id]
            if self.running() is not None:
                job.phase = f"queued behind {self.running().id}"
            else:
                job.phase = "queued"
            self._ensure_worker()
            self._wake.notify_all()
        return job.id

    def stop(self, job_id: str, reason: str = "stopped by the user") -> str:
        """Ask a job to stop: a queued job is cancelled, a running one stops after its current step and keeps
        a resumable state. Returns the job's state afterwards."""
        with self._lock:
            job = self._get(job_id)
            if job.state == "queued":
                self._queue.remove(job.id)
                job.state, job.ended, job.phase = "stopped", time.time(), "cancelled before it started"
            elif job.state == "running":
                job.stop.request(reason)
                # before its first step (loading, caching, waiting for the host's queue) there is no step to
                # finish and nothing to resume from yet
                job.phase = "stopping after the current step" if job.progress else "stopping"
            return job.state

    def stop_all(self, reason: str = "stopped") -> None:
        with self._lock:
            ids = [j.id for j in self._jobs.values() if j.state in ACTIVE]
        for job_id in ids:
            self.stop(job_id, reason)

    def wait(self, job_id: str, timeout: float | None = None) -> str:
        """Block until the job is no longer queued or running (tests, CLI); returns its state."""
        deadline = None if timeout is None else time.time() + timeout
        with self._lock:
            job = self._get(job_id)
            while job.state in ACTIVE:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    break
                self._wake.wait(timeout=0.5 if left is None else min(0.5, left))
            return job.state

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop everything and let the worker end (A1111 script unload, app exit)."""
        with self._lock:
            self._closed = True
        self.stop_all("the application is closing")
        with self._lock:
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    # ---- reading ------------------------------------------------------------------------------------
    def running(self) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs.values() if j.state == "running"), None)

    def job(self, job_id: str) -> Job:
        with self._lock:
            return self._get(job_id)

    def latest_id(self) -> str | None:
        """The running job, else the newest one (what a freshly opened Monitor tab shows)."""
        with self._lock:
            run = self.running()
            if run is not None:
                return run.id
            return next(reversed(self._jobs), None) if self._jobs else None

    def status(self, job_id: str, since: int = 0) -> dict[str, Any]:
        """Everything a monitor shows, with the events after cursor `since` (pass back `cursor` next time)."""
        with self._lock:
            job = self._get(job_id)
            cursor, new = job.log.since(since)
            p = dict(job.progress)
            now = time.time()
            elapsed = (job.ended or now) - job.started if job.started else 0.0
            out = {
                "id": job.id, "name": job.name, "method": job.method, "state": job.state, "phase": job.phase,
                "plan": job.plan_text,
                "step": p.get("step", 0), "total": p.get("total", 0),
                "fraction": (p.get("step", 0) / p["total"]) if p.get("total") else 0.0,
                "epoch": p.get("epoch"), "loss": p.get("loss"), "ema": p.get("ema"), "lr": p.get("lr"),
                "steps_per_s": p.get("steps_per_s"), "eta_s": p.get("eta_s") if job.state == "running" else None,
                "elapsed_s": elapsed,
                "cache": dict(job.cache_progress),
                "losses": [list(x) for x in job.losses],
                "validation": [list(x) for x in job.validation],
                "saved": [dict(s) for s in job.saved],
                "samples": [dict(s, paths=list(s["paths"]), indices=list(s["indices"])) for s in job.samples],
                "warnings": list(job.warnings),
                "log": list(job.messages),
                "error": job.error,
                "traceback": job.traceback,
                "run_dir": str(job.run_dir) if job.run_dir else "",
                "tensorboard_dir": str(job.run_dir / "tensorboard") if job.run_dir else "",
                "events": [self._event_dict(job, e) for e in new],
                "cursor": cursor,
                "queue_position": self._queue.index(job.id) + 1 if job.id in self._queue else 0,
            }
            out["progress_text"] = progress_text(out)
            return out

    def list_jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"id": j.id, "name": j.name, "method": j.method, "state": j.state, "phase": j.phase,
                     "created": j.created, "started": j.started, "ended": j.ended,
                     "step": j.progress.get("step", 0), "total": j.progress.get("total", 0),
                     "run_dir": str(j.run_dir) if j.run_dir else "", "error": j.error}
                    for j in self._jobs.values()]

    def list_outputs(self) -> list[dict[str, Any]]:
        """Files written by this session's runs that still exist: trained files, configs, logs, pictures."""
        out: list[dict[str, Any]] = []
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            spec = METHODS.get(job.method)   # the kind of file it wrote (the method decides the real folder)
            kind = spec.output_kind if spec is not None else job.method
            for s in job.saved:
                out.append({"job": job.id, "kind": kind, "role": "final" if s.get("final") else "intermediate",
                            "path": s["path"], "step": s.get("step"), "epoch": s.get("epoch")})
            if job.run_dir is not None:
                extras = [("config", job.run_dir / "config.toml"), ("loss_csv", job.run_dir / "loss.csv"),
                          ("tensorboard", job.run_dir / "tensorboard"), ("state", job.run_dir / "state")]
                for role, path in extras:
                    out.append({"job": job.id, "kind": role, "role": role, "path": str(path)})
            for s in job.samples:
                for p in s["paths"]:
                    out.append({"job": job.id, "kind": "sample", "role": f"set {s['label']}", "path": p,
                                "step": s["step"], "epoch": s.get("epoch")})
        return [o for o in out if Path(o["path"]).exists()]

    # ---- internals ----------------------------------------------------------------------------------
    def _get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise UserError(f"no job with id {job_id!r}")
        return job

    @staticmethod
    def _event_dict(job: Job, event: Event) -> dict[str, Any]:
        data = dict(event.data)
        if event.kind == "samples":   # pictures travel as the files the loop wrote, not as PIL objects
            images = data.pop("images", None) or []
            data["images"] = sample_paths(job.run_dir, data.get("label", "A"), int(data.get("step", 0)),
                                          len(images), data.get("indices")) if job.run_dir is not None else []
        return {"kind": event.kind, "time": event.time, **_plain(data)}

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="training-lab-jobs", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue and not self._closed:
                    self._wake.wait(timeout=2.0)
                if not self._queue:   # idle (or shut down): end; the next start() makes a new worker
                    self._worker = None
                    return
                job = self._jobs[self._queue.pop(0)]
                job.state, job.started, job.phase = "running", time.time(), "starting"
                for queued_id in self._queue:
                    self._jobs[queued_id].phase = f"queued behind {job.id}"
            self._run(job)

    def _run(self, job: Job) -> None:
        train_fn = self.train_fn
        if train_fn is None:
            from .train.loop import train as train_fn
        state, error, trace = "failed", "", ""
        try:
            host = self.host_factory()
            try:
                job.run_dir = Path(host.output_dir("runs")) / job.name
            except Exception:  # noqa: BLE001 - a host without a runs folder still trains
                job.run_dir = None
            around = self.around_job(job) if self.around_job else contextlib.nullcontext()
            with around:
                result = train_fn(job.settings, host, job.events, job.stop)
            job.result = result
            if getattr(result, "run_dir", None):
                job.run_dir = Path(result.run_dir)
            stopped = getattr(result, "stopped", "")
            if stopped == "diverged":
                state, error = "failed", "the loss diverged; the last good save is kept"
            elif stopped or job.stop.requested:
                state = "stopped"
            else:
                state = "finished"
        except StoppedBeforeStart:
            # stopped while the host kept it waiting (A1111's queue): it never ran and wrote nothing, like a
            # job cancelled in this manager's own queue
            state, job.run_dir = "stopped", None
        except UserError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - a crashed run must show its error, not kill the worker
            error, trace = crash_line(e), traceback.format_exc()
            _log.error("Training Lab job %s failed:\n%s", job.id, trace)   # the console log (A1111's too)
        finally:
            # the last event goes out before the state changes, so whoever waits for the state sees it
            job.events.status(f"job {state}" + (f": {error}" if error else ""))
            with self._lock:
                if trace:
                    job.messages.append("traceback:\n" + trace.rstrip())
                job.state, job.error, job.traceback, job.ended = state, error, trace, time.time()
                job.phase = {"finished": "finished", "stopped": job.stop.reason or "stopped",
                             "failed": f"failed: {error}" if error else "failed"}[state]
                self._wake.notify_all()

    def _record(self, job: Job, event: Event) -> None:
        d = event.data
        with self._lock:
            if event.kind == "progress":
                if d.get("phase") == "cache":
                    job.cache_progress = {"done": d.get("step", 0), "total": d.get("total", 0)}
                    job.phase = f"caching latents {d.get('step', 0)}/{d.get('total', 0)}"
                else:
                    job.progress = dict(d)
            elif event.kind == "status":
                text = str(d.get("text", ""))
                self._message(job, event, text)
                if " per epoch" in text and "steps" in text and not job.plan_text:
                    job.plan_text = text
                if job.state == "running" and not job.stop.requested:
                    job.phase = text
            elif event.kind == "loss":
                job.losses.append((int(d["step"]), float(d["loss"]), d.get("ema")))
            elif event.kind == "validation":
                job.validation.append((int(d["step"]), float(d["loss"])))
            elif event.kind == "saved":
                epoch = d.get("epoch") if d.get("epoch") is not None else job.progress.get("epoch")
                job.saved.append({"path": str(d["path"]), "step": d.get("step"), "epoch": epoch,
                                  "final": bool(d.get("final"))})
            elif event.kind == "samples":
                images = d.get("images") or []
                indices = [int(i) for i in d["indices"]] if d.get("indices") is not None else \
                    list(range(len(images)))
                paths = sample_paths(job.run_dir, d.get("label", "A"), int(d.get("step", 0)), len(images), indices) \
                    if job.run_dir is not None else []
                job.samples.append({"label": d.get("label", "A"), "step": int(d.get("step", 0)),
                                    "epoch": d.get("epoch"), "paths": paths, "indices": indices,
                                    "change": d.get("change")})
            elif event.kind == "warning":
                job.warnings.append(str(d.get("text", "")))
                self._message(job, event, "warning: " + str(d.get("text", "")))

    @staticmethod
    def _message(job: Job, event: Event, text: str) -> None:
        job.messages.append(time.strftime("%H:%M:%S ", time.localtime(event.time)) + text)
        del job.messages[:-200]


def crash_line(e: BaseException) -> str:
    """The one-line message of an unexpected exception (a bug or a host failure, not a setting)."""
    return (f"unexpected error {type(e).__name__}: {e} (the full traceback is in the console log and at the end "
            "of this job's log)")


def progress_text(status: dict[str, Any]) -> str:
    """One line: state, step/total, epoch, loss, speed and time left."""
    state = status["state"]
    if state == "queued":
        return f"{status['name']}: {status['phase']}"
    parts = [f"{status['name']}: {state}"]
    if status.get("total"):
        parts.append(f"step {status['step']}/{status['total']} ({100 * status['fraction']:.0f}%)")
    if status.get("epoch"):
        parts.append(f"epoch {status['epoch']}")
    if status.get("ema") is not None:
        parts.append(f"loss {status['ema']:.4f}")
    if status.get("steps_per_s"):
        rate = status["steps_per_s"]
        parts.append(f"{rate:.2f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step")
    if state == "running":
        if status.get("eta_s") is not None:
            parts.append(f"ETA {format_duration(status['eta_s'])}")
        if not status.get("total"):
            parts.append(status.get("phase", ""))
    parts.append(f"elapsed {format_duration(status.get('elapsed_s'))}")
    if status.get("error"):
        parts.append(status["error"])
    return " · ".join(p for p in parts if p)
