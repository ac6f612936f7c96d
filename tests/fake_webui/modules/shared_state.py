"""Stand-in for `modules.shared_state.State`: the flags A1111's progress bars and Interrupt buttons use.

Attribute names are A1111's (a1111-host.md §2); `begin()` resets the per-job counters and flags, `end()`
clears the job. `history` (test-only) records the job name of every begin().
"""

import time

_PER_JOB = {   # what begin() puts back, attribute → value
    "skipped": False, "interrupted": False, "stopping_generation": False, "job_no": 0, "job_count": -1,
    "processing_has_refined_job_count": False, "sampling_step": 0, "current_latent": None,
    "current_image": None, "current_image_sampling_step": 0, "id_live_preview": 0, "textinfo": None,
}


class State:
    job = ""
    server_command = None
    job_timestamp = "0"
    sampling_steps = 0
    time_start = None

    def __init__(self):
        for name, value in _PER_JOB.items():
            setattr(self, name, value)
        self.job_count = 0
        self.server_start = time.time()
        self.history = []

    def begin(self, job: str = "(unknown)"):
        for name, value in _PER_JOB.items():
            setattr(self, name, value)
        self.job, self.time_start = job, time.time()
        self.job_timestamp = time.strftime("%Y%m%d%H%M%S")
        self.history.append(job)

    def end(self):
        self.job, self.job_count = "", 0

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = self.current_image_sampling_step = 0

    def interrupt(self):
        self.interrupted = True

    def request_restart(self):
        """Settings → Reload UI (the button's function): in A1111 v1.10 it interrupts what runs, then asks the
        server loop for a restart (`server_command`, which the test's reload then acts on)."""
        self.interrupt()
        self.server_command = "restart"

    def skip(self):
        self.skipped = True

    def stop_generating(self):
        self.stopping_generation = True

    def assign_current_image(self, image):
        self.current_image = image
        self.id_live_preview += 1

    def dict(self):
        keys = ("skipped", "interrupted", "stopping_generation", "job", "job_count", "job_timestamp", "job_no",
                "sampling_step", "sampling_steps")
        return {k: getattr(self, k) for k in keys}
