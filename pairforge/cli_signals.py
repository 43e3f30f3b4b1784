"""The ``pairforge`` command's own signal handling: a stack dump on
SIGUSR2 and a bound on how long Ctrl-C may take.

Why: a run on a cluster that seems stuck should say what it waits for
without a debugger, and Ctrl-C lands anywhere in Ray's and Ray Data's
driver code, which can catch the KeyboardInterrupt or hang while leaving
(``tests/pipeline/test_resume.py`` interrupts the command at several
moments beside a CPU burner; once, in a full suite, it was still running
60 s later). Installed by :func:`pairforge.cli.main` only for the
process's own command line (a caller's process keeps its handlers).
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time

#: seconds the command may take to leave after Ctrl-C before it is ended with 130 anyway
LEAVE_AFTER_INTERRUPT_S = 30.0


def install() -> None:
    """For the process's own command line, not where ``main()`` is called in
    a caller's process:

    * ``kill -USR2 PID`` prints every thread's Python stack to stderr and the
      command goes on (as Scrapy's SIGUSR2 does): what a run that seems stuck
      waits for, without a debugger.
    * Ctrl-C raises KeyboardInterrupt as Python's own handler does, and also
      starts a watchdog: if the process is still there
      :data:`LEAVE_AFTER_INTERRUPT_S` later (Ray or Ray Data code caught the
      interrupt, or leaving hangs), it prints the stacks and ends with 130.
      Every file of a run is written under a temporary name and renamed, so
      ``--resume`` finishes such a run as any interrupted one."""
    if hasattr(signal, "SIGUSR2"):  # POSIX
        faulthandler.register(signal.SIGUSR2, all_threads=True)
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # SIGINT ignored or taken by whoever started us: leave it so

    def watchdog() -> None:
        time.sleep(LEAVE_AFTER_INTERRUPT_S)
        from pairforge.pipeline.outcome import EXIT_INTERRUPTED

        args = sys.argv[1:]
        resume = f"; finish with: pairforge {' '.join(args)} --resume" if args[:1] == ["run"] else ""
        try:
            faulthandler.dump_traceback(all_threads=True)  # where it was
            print(f"pairforge: interrupted, and still running {LEAVE_AFTER_INTERRUPT_S:.0f} s after Ctrl-C "
                  f"(its stacks are above): left now{resume}", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            os._exit(EXIT_INTERRUPTED)

    def on_sigint(signum, frame):
        if not any(t.name == "pairforge-interrupt-watchdog" for t in threading.enumerate()):
            threading.Thread(target=watchdog, name="pairforge-interrupt-watchdog", daemon=True).start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
