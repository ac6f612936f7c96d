"""Stand-in for `modules.progress`: which task id runs, which wait, which finished (the last 16)."""

import time

current_task = None
pending_tasks = {}
finished_tasks = []


def add_task_to_queue(id_job):
    pending_tasks[id_job] = time.time()


def start_task(id_task):
    global current_task
    pending_tasks.pop(id_task, None)
    current_task = id_task


def finish_task(id_task):
    global current_task
    if id_task == current_task:
        current_task = None
    finished_tasks.append(id_task)
    del finished_tasks[:-16]
