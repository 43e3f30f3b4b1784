"""The ``pairforge`` command's own signal handling: a stack dump on
SIGUSR2 and a bound on how long Ctrl-C may take.

Why: a run on a cluster that seems stuck should say what it waits for
without a debugger, and Ctrl-C lands anywhere in Ray's and Ray Data's
driver code, where the KeyboardInterrupt can be lost or leaving can hang
(``tests/pipeline/test_resume.py`` interrupts the command at several
moments beside a CPU burner: about one run in ten, the interrupt 0.5 s
into the per-row pass was lost in a finaliser and the run went on to its
end). Installed by :func:`pairforge.cli.main` only for the
process's own command line (a caller's process keeps its handlers).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

from pairforge.pipeline.outcome import EXIT_INTERRUPTED

#: seconds the command may take to leave after Ctrl-C before it is ended with 130 anyway
LEAVE_AFTER_INTERRUPT_S = 30.0
#: seconds after which an interrupt the command has not taken in hand is delivered again
REDELIVER_S = 2.0

_leaving = threading.Event()


def leaving() -> None:
    """The command has the KeyboardInterrupt in hand and is leaving: deliver
    it no more (the watchdog still bounds how long leaving may take)."""
    _leaving.set()


def install(interrupts: bool) -> None:
    """For the process's own command line, not where ``main()`` is called in
    a caller's process:

    * ``kill -USR2 PID`` prints every thread's Python stack to stderr and the
      command goes on (as Scrapy's SIGUSR2 does): what a run that seems stuck
      waits for, without a debugger.
    * ``interrupts`` (``run``, ``demo``): Ctrl-C raises KeyboardInterrupt as
      Python's own handler does, and starts a watchdog. A KeyboardInterrupt
      raised inside a finaliser or a fork hook is printed as "Exception
      ignored" and lost, and the run went on to its end (exit 0) in
      ``tests/pipeline/test_resume.py``; so until the command calls
      :func:`leaving`, the watchdog delivers the interrupt again every
      :data:`REDELIVER_S`, and such a lost interrupt is not reported. If the
      process is still there :data:`LEAVE_AFTER_INTERRUPT_S` after Ctrl-C
      (leaving hangs), it prints the stacks and ends with 130; so does a
      second Ctrl-C while leaving, at once. Every file of a run is written
      under a temporary name and renamed, so ``--resume`` finishes such a run
      as any interrupted one."""
    if hasattr(signal, "SIGUSR2"):  # POSIX
        faulthandler.register(signal.SIGUSR2, all_threads=True)
    if not interrupts or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # SIGINT ignored or taken by whoever started us: leave it so

    def watchdog() -> None:
        deadline = time.monotonic() + LEAVE_AFTER_INTERRUPT_S
        while (left := deadline - time.monotonic()) > 0:
            if _leaving.is_set():
                time.sleep(left)
            elif not _leaving.wait(min(REDELIVER_S, left)):
                # the last one was lost: again, as a signal to the main thread, so that a blocking call returns
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        args = sys.argv[1:]
        resume = f"; finish with: pairforge {' '.join(args)} --resume" if args[:1] == ["run"] else ""
        try:
            faulthandler.dump_traceback(all_threads=True)  # where it was
            print(f"pairforge: interrupted, and still running {LEAVE_AFTER_INTERRUPT_S:.0f} s after Ctrl-C "
                  f"(its stacks are above): left now{resume}", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            os._exit(EXIT_INTERRUPTED)

    default_hook = sys.unraisablehook

    def quiet_lost_interrupts(unraisable) -> None:
        # a KeyboardInterrupt raised in a finaliser or a fork hook (logging's
        # _releaseLock, as Ray starts its processes) is lost: the watchdog
        # delivers it again, so Python's "Exception ignored" report is noise
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            return
        default_hook(unraisable)

    sys.unraisablehook = quiet_lost_interrupts

    def on_sigint(signum, frame):
        if _leaving.is_set():  # a second Ctrl-C while leaving: now
            os._exit(EXIT_INTERRUPTED)
        if not any(t.name == "pairforge-interrupt-watchdog" for t in threading.enumerate()):
            threading.Thread(target=watchdog, name="pairforge-interrupt-watchdog", daemon=True).start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
