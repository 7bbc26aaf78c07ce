"""[reliability] #36: SIGTERM to ``harmonizer-fast bench`` used to orphan the benchmark it was running. The
report's runner passes the signal on and waits for its child."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_to_the_report_runner_takes_its_child_with_it(tmp_path):
    pidfile = tmp_path / "child.pid"
    child = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = ("import sys; sys.path.insert(0, 'benchmarks'); import report; from pathlib import Path; "
              f"report._run([sys.executable, '-c', {child!r}], Path({str(tmp_path / 'log')!r}))")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.time() < deadline and proc.poll() is None, "the child never started"
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # terminated and reaped: no orphan left running
        os.kill(pid, 0)
