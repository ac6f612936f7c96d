"""modules.restart: how the WebUI ends its own process (Extensions → "Apply and restart UI", the API's restart and
kill routes). As the reference describes it: `is_restartable()` is true when the launcher that watches the process
set SD_WEBUI_RESTART; `restart_program()` leaves a `tmp/restart` marker for that launcher and then calls
`stop_program()`, which ends the process at once (os._exit(0): no atexit handlers, daemon threads cut short).

The fake never ends the test process: `stop_program()` records the call in `exits` instead."""

import os
from pathlib import Path

from modules import paths_internal

exits = []


def is_restartable():
    return bool(os.environ.get("SD_WEBUI_RESTART"))


def restart_program():
    folder = Path(paths_internal.script_path) / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "restart").touch()
    stop_program()


def stop_program():
    exits.append("os._exit(0)")
