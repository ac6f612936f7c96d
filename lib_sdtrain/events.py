"""Events and the stop token: the core's only ways to talk to whoever runs it.

The core never prints to a UI or reads a button; it emits typed events on an `Events` channel and checks a
`StopToken`. The CLI, the standalone app and the A1111 adapter each subscribe in their own way (a progress
bar, a polled log, `shared.state`), in the spirit of OneTrainer's TrainCallbacks / TrainCommands.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Event:
    kind: str                      # "progress" | "status" | "loss" | "samples" | "saved" | "warning"
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


Listener = Callable[[Event], None]


class Events:
    """A fan-out channel. Listener failures are swallowed so a broken UI can never kill a training run."""

    def __init__(self, *listeners: Listener) -> None:
        self._listeners: list[Listener] = list(listeners)
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> Listener:
        with self._lock:
            self._listeners.append(listener)
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def emit(self, kind: str, /, **data: Any) -> None:
        event = Event(kind, data)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener must not break the producer
                pass

    # Named helpers keep call sites short and the payloads consistent.
    def progress(self, step: int, total: int, **info: Any) -> None:
        self.emit("progress", step=step, total=total, **info)

    def status(self, text: str) -> None:
        self.emit("status", text=text)

    def loss(self, step: int, loss: float, **info: Any) -> None:
        self.emit("loss", step=step, loss=loss, **info)

    def validation(self, step: int, loss: float) -> None:
        """The held-out pictures' loss measured after `step` (train/validation.py)."""
        self.emit("validation", step=step, loss=loss)

    def samples(self, step: int, images: list, label: str, **info: Any) -> None:
        self.emit("samples", step=step, images=images, label=label, **info)

    def saved(self, path: str, **info: Any) -> None:
        self.emit("saved", path=path, **info)

    def warning(self, text: str, **info: Any) -> None:
        self.emit("warning", text=text, **info)


class EventLog:
    """A listener that keeps the most recent events, for UIs that poll (thread-safe)."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self._events: deque[tuple[int, Event]] = deque(maxlen=maxlen)
        self._counter = 0
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._counter += 1
            self._events.append((self._counter, event))

    def since(self, cursor: int = 0) -> tuple[int, list[Event]]:
        """Events newer than `cursor`, and the new cursor."""
        with self._lock:
            new = [e for i, e in self._events if i > cursor]
            return self._counter, new

    def last(self, kind: str) -> Event | None:
        with self._lock:
            for _, e in reversed(self._events):
                if e.kind == kind:
                    return e
        return None


class StopToken:
    """Set by a stop button, Ctrl-C or A1111's Interrupt; checked by long jobs between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str = "stopped by the user") -> None:
        self.reason = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def reset(self) -> None:
        self.reason = ""
        self._event.clear()


class StoppedBeforeStart(Exception):
    """A job's own stop token was requested while it still waited to start (A1111: for the queue lock, while
    another generation or job ran): nothing of it ran. A host's `job_context` raises it instead of entering the
    job's block; whoever runs the job ends it as stopped (a training job "stopped" with nothing written, a
    comparison stopped with no grid, class pictures stopped with none drawn)."""
