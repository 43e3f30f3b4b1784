"""``kill -USR2`` on the ``pairforge`` command prints every thread's Python
stack and the command goes on (``pairforge.cli._stacks_on_signal``): what a
run that seems stuck waits for. A process of its own, as the command is."""

import signal
import subprocess
import sys

import pytest

CHILD = """
import os, signal, threading, time
from pairforge.cli import _stacks_on_signal
_stacks_on_signal()
def waiting_for_the_server():
    time.sleep(30)
threading.Thread(target=waiting_for_the_server, daemon=True).start()
time.sleep(0.2)
os.kill(os.getpid(), signal.SIGUSR2)
time.sleep(0.2)
print("still running")
"""


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")
def test_sigusr2_prints_every_threads_stack_and_the_command_goes_on():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "still running"
    assert "waiting_for_the_server" in done.stderr and "Current thread" in done.stderr, done.stderr
