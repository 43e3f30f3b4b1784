"""Helpers of the kill-and-resume tests: a ``pairforge run`` driver in a
process session of its own (so that a SIGKILL takes its local Ray with it),
started as a user starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from pairforge.pipeline.raystart import loopback_env


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever it started (its local Ray), by session id."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
    for line in ps:
        parts = line.split()
        if len(parts) == 2 and int(parts[1]) == proc.pid:
            try:
                os.kill(int(parts[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def default_sigint() -> None:
    """In the child: SIGINT as a terminal delivers it. Earlier tests of the
    session can leave the pytest process with SIGINT blocked or ignored, and
    a child inherits both (a Python started with SIGINT ignored never raises
    KeyboardInterrupt)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_driver(job_yaml, stderr) -> subprocess.Popen:
    """``pairforge run JOB`` in a process session of its own."""
    env = {**os.environ, **loopback_env(), "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "pairforge.cli", "run", str(job_yaml)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
        start_new_session=True,
        preexec_fn=default_sigint,
    )
