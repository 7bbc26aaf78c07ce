"""Kill `harmonizer-fast train` at every file operation of its saves, then resume it (tests/test_faults.py).

    python tests/fault_driver.py SPEC.json

SPEC: ``{"args": [train arguments without --out], "ref": DIR, "runs": DIR, "jobs": 2}``. The driver first
trains ``ref`` uninterrupted while counting the file operations of harmonizer_fast._io (every write, fsync,
rename and delete of checkpoints and logs go through it). Then, for each operation i, it trains ``runs/i``
with a fault at operation i: the process ends with os._exit(KILLED) right there, as a SIGKILL would end it
(a write is first torn: half of its bytes reach the file). Then it runs ``--resume`` on ``runs/i`` to the
end. It prints a JSON summary: the operations, and each kill's and resume's exit status.

Runs are forked from this process, which has imported torch but run no torch op (so forking is safe and
each run skips the import): one fork per point, which forks the killed run, then the resume.
"""

from __future__ import annotations

import json
import os
import sys

import harmonizer_fast._io as hio
from harmonizer_fast.cli import main as cli

KILLED = 75


class FaultyOS:
    """``os`` for harmonizer_fast._io, numbering each write, fsync, replace and unlink; the one numbered
    ``kill_at`` does not complete."""

    def __init__(self, kill_at: int = -1) -> None:
        self.kill_at, self.count, self.ops = kill_at, 0, []

    def __getattr__(self, name: str):
        return getattr(os, name)

    def _reached(self, kind: str, what: str) -> bool:
        self.ops.append(f"{kind} {what}")
        self.count += 1
        return self.count - 1 == self.kill_at

    def write(self, fd: int, data) -> int:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if self._reached("write", name):
            os.write(fd, bytes(data)[: len(data) // 2])
            os._exit(KILLED)
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self._reached("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))):
            os._exit(KILLED)
        os.fsync(fd)

    def replace(self, src, dst) -> None:
        if self._reached("replace", os.path.basename(dst)):
            os._exit(KILLED)
        os.replace(src, dst)

    def unlink(self, path) -> None:
        if self._reached("unlink", os.path.basename(path)):
            os._exit(KILLED)
        os.unlink(path)


def in_child(run, log_path: str) -> int:
    """Run ``run()`` in a forked child with its output in ``log_path``; returns the child's exit status."""
    pid = os.fork()
    if pid == 0:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            rc = run()
        except BaseException as exc:  # the child must never return into the driver
            print(f"{type(exc).__name__}: {exc}", flush=True)
            rc = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def train(args: list[str], out: str, faults: FaultyOS, extra: tuple[str, ...] = ()):
    def run() -> int:
        hio.os = faults
        rc = cli([*args, "--out", out, *extra])
        if faults.kill_at < 0:
            with open(os.path.join(out, "ops.json"), "w") as f:
                json.dump(faults.ops, f)
        return rc

    return run


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    args, ref, runs = spec["args"], spec["ref"], spec["runs"]
    os.makedirs(runs, exist_ok=True)
    rc = in_child(train(args, ref, FaultyOS()), os.path.join(runs, "ref.log"))
    if rc != 0:
        print(json.dumps({"error": f"the uninterrupted run failed ({rc}), see {runs}/ref.log"}))
        return
    ops = json.loads(open(os.path.join(ref, "ops.json")).read())
    os.remove(os.path.join(ref, "ops.json"))

    def point(i: int):
        def run() -> int:
            out, log = os.path.join(runs, str(i)), os.path.join(runs, f"{i}.log")
            killed = in_child(train(args, out, FaultyOS(i)), log)
            resumed = in_child(train(args, out, FaultyOS(), ("--resume",)), log)
            os.remove(os.path.join(out, "ops.json"))
            return 0 if (killed, resumed) == (KILLED, 0) else 10 + (killed != KILLED) + 2 * (resumed != 0)

        return run

    results, pending = {}, {}
    todo = list(range(len(ops)))
    while todo or pending:
        while todo and len(pending) < spec.get("jobs", 2):
            i = todo.pop(0)
            pid = os.fork()
            if pid == 0:
                os._exit(point(i)())
            pending[pid] = i
        pid, status = os.wait()
        results[pending.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps({"ops": ops, "results": [results[i] for i in range(len(ops))]}))


if __name__ == "__main__":
    main()
