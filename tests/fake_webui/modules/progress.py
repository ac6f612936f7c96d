"""modules.progress: the task registry behind /internal/progress."""

current_task = None
pending_tasks = {}
finished_tasks = []


def start_task(id_task):
    global current_task
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    if len(finished_tasks) > 16:
        finished_tasks.pop(0)


def add_task_to_queue(id_job):
    import time

    pending_tasks[id_job] = time.time()
