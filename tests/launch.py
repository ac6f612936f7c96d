"""Start multi-process launchers (torchrun, accelerate launch) from tests so that a timeout ends all of them.

Killing a launcher alone leaves its worker processes behind: a hung worker then keeps the output pipes open,
the test waits on them, and later tests find the machine's cores busy. The launcher runs in its own session
(process group) here, and on a timeout the whole group is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess


def start(cmd: list[str], **kwargs) -> subprocess.Popen:
    """`cmd` in the background, in its own process group, its output captured as text."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:      # already gone
        pass


def wait(proc: subprocess.Popen, timeout: float) -> tuple[str, str, bool]:
    """(stdout, stderr, timed_out): waits up to `timeout` seconds, then kills the launcher and its workers."""
    try:
        out, err = proc.communicate(timeout=timeout)
        return out, err, False
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        return out, err, True


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Like `subprocess.run(cmd, capture_output=True, text=True, timeout=...)`, but a timeout kills the whole
    process group and raises `subprocess.TimeoutExpired` after that."""
    proc = start(cmd, **kwargs)
    out, err, timed_out = wait(proc, timeout)
    if timed_out:
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
