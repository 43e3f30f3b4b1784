"""The ``pairforge`` command's signal handling (``pairforge.cli_signals``), in
a process of its own as the command is: ``kill -USR2`` prints every thread's
stack and the command goes on; a Ctrl-C that code swallows still ends the
command with 130 and the resume advice."""

import signal
import subprocess
import sys
import time

import pytest

CHILD = """
import os, signal, threading, time
from pairforge.cli_signals import install
install()
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


SWALLOWED = """
import os, signal, sys, time
from pairforge import cli_signals
cli_signals.LEAVE_AFTER_INTERRUPT_S = 1.0
sys.argv = ["pairforge", "run", "job.yaml"]
cli_signals.install()
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)
except KeyboardInterrupt:
    pass  # as library code that catches it and carries on
def still_busy():
    time.sleep(60)
still_busy()
print("ran to the end")
"""


def test_an_interrupt_that_code_swallows_still_ends_the_command_with_130():
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SWALLOWED], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert done.returncode == 130 and "ran to the end" not in done.stdout, (done.returncode, done.stderr)
    assert took < 30, took  # the watchdog's 1 s, not the 60 s of sleep
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pairforge: interrupted") and "pairforge run job.yaml --resume" in last, done.stderr
    assert "still_busy" in done.stderr  # the stacks say where it was
