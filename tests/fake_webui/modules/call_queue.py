"""modules.call_queue: the one GPU lock every generation, API call and training run takes (non-reentrant)."""

import threading

from modules import shared

queue_lock = threading.Lock()     # A1111: fifo_lock.FIFOLock, also non-reentrant


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    def f(*args, **kwargs):
        with queue_lock:
            shared.state.begin(job=str(args[0]) if args and isinstance(args[0], str) else "(unknown)")
            try:
                return func(*args, **kwargs)
            finally:
                shared.state.end()

    return f
