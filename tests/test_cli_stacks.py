"""The ``pairforge`` command's signal handling (``pairforge.cli_signals``), in
a process of its own as the command is: ``kill -USR2`` prints every thread's
stack and the command goes on; a Ctrl-C that code swallows is delivered
again; a command that hangs while leaving still ends with 130, its stacks
and the resume advice."""

import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="POSIX signals")

STACKS = """
import os, signal, threading, time
from pairforge.cli_signals import install
install(interrupts=False)
def waiting_for_the_server():
    time.sleep(30)
threading.Thread(target=waiting_for_the_server, daemon=True).start()
time.sleep(0.2)
os.kill(os.getpid(), signal.SIGUSR2)
time.sleep(0.2)
print("still running")
"""

# as the CLI: a KeyboardInterrupt in hand calls leaving(); code that catches
# it loses the first one, a finaliser the second
SWALLOWED = """
import os, signal, sys, time
from pairforge import cli_signals
cli_signals.LEAVE_AFTER_INTERRUPT_S, mode = float(sys.argv[1]), sys.argv[2]
cli_signals.REDELIVER_S = 0.5
sys.argv = ["pairforge", "run", "job.yaml"]
cli_signals.install(interrupts=True)
class Finalised:
    def __del__(self):  # the interrupt lands in a finaliser: Python reports it and loses it
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)
except KeyboardInterrupt:
    print("lost", flush=True)
Finalised()
def still_busy():
    time.sleep(60)
try:
    still_busy()
except KeyboardInterrupt:
    cli_signals.leaving()
    print("in hand", flush=True)
    if mode == "hang":
        time.sleep(60)  # leaving hangs
    os._exit(130)
"""


def run_child(code: str, *args: str):
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=90)
    return done, time.monotonic() - t0


def test_sigusr2_prints_every_threads_stack_and_the_command_goes_on():
    done, _ = run_child(STACKS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "still running"
    assert "waiting_for_the_server" in done.stderr and "Current thread" in done.stderr, done.stderr


def test_a_lost_interrupt_is_delivered_again():
    done, took = run_child(SWALLOWED, "30", "leave")
    assert done.returncode == 130 and done.stdout.splitlines() == ["lost", "in hand"], (done.stdout, done.stderr)
    assert took < 15, took  # the redelivery after 0.5 s, not the 60 s of still_busy
    assert "still running" not in done.stderr  # left by itself, not through the watchdog
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_hang_while_leaving_ends_with_130_its_stacks_and_the_resume_advice():
    done, took = run_child(SWALLOWED, "3", "hang")
    assert done.returncode == 130 and done.stdout.splitlines() == ["lost", "in hand"], (done.stdout, done.stderr)
    assert took < 30, took
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pairforge: interrupted") and "pairforge run job.yaml --resume" in last, done.stderr
    assert "<module>" in done.stderr and "Current thread" in done.stderr  # the stacks say where it was
