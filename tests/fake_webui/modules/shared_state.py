"""modules.shared_state.State: the job/progress/interrupt flags every progress bar reads."""

import datetime
import time


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None
    server_start = None

    def __init__(self):
        self.server_start = time.time()
        self.history = []           # fake only: (job, job_count) of every begin(), for tests

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True

    def stop_generating(self):
        self.stopping_generation = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def dict(self):
        return {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": self.stopping_generation,
                "job": self.job, "job_count": self.job_count, "job_timestamp": self.job_timestamp,
                "job_no": self.job_no, "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}

    def begin(self, job: str = "(unknown)"):
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        self.history.append(job)

    def end(self):
        self.job = ""
        self.job_count = 0

    def assign_current_image(self, image):
        self.current_image = image
        self.id_live_preview += 1
