"""tests/launch.py: a launcher that times out takes its worker processes with it."""

import os
import subprocess
import sys
import time

import pytest

import launch


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed child that nobody reaped yet is a zombie: gone for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX")
def test_a_timeout_kills_the_launcher_and_its_workers(tmp_path):
    pid_file = tmp_path / "worker.pid"
    # a "launcher" that starts a worker and waits for it, as torchrun does
    script = (f"import subprocess, sys; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(w.pid)); w.wait()")
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        launch.run([sys.executable, "-c", script], timeout=3)
    assert time.monotonic() - t0 < 30          # did not wait for the worker's 60 s
    worker = int(pid_file.read_text())
    for _ in range(50):
        if not alive(worker):
            break
        time.sleep(0.1)
    assert not alive(worker)


def test_a_finished_run_returns_its_output_and_code():
    done = launch.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                      timeout=60)
    assert done.returncode == 3 and done.stdout.strip() == "out" and done.stderr.strip() == "err"
