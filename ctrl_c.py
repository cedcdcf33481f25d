"""
How every tool ends on Ctrl-C: without a traceback, and by SIGINT itself rather than an exit status, so that a shell
running the tool in a script or loop stops there too (after an ordinary exit status, even 130, it goes on to its
next command). Where a run is training, runs.py first saves a checkpoint.

It imports nothing heavy, so a tool installs it before importing torch, which takes seconds.
"""

import contextlib
import os
import signal
import sys


class Interrupted(KeyboardInterrupt):
    """A stop at once by SIGINT or SIGTERM (runs.on_signal). It unwinds as Ctrl-C does and keeps the signal, so that
    a SIGTERM is not reported as a Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_of(interrupt):
    """The signal behind a KeyboardInterrupt: Interrupted's, or SIGINT for Python's own."""
    return getattr(interrupt, "signum", signal.SIGINT)


def exit_status(interrupt):
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + signal_of(interrupt)


def flush_output():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # (closed, or None under `>&-`)
            stream.flush()


def die_by_signal(signum=signal.SIGINT):
    """End the process by signum now, its output flushed. Python's own way for SIGINT, an uncaught
    KeyboardInterrupt, is lost once an exit handler runs a string exec (as on the GPU machine: Python 3.12, CUDA
    torch): the exit status is then 1. Python's clean-up is skipped, which loses nothing: the stack has unwound
    (every with and finally has run), log rows are flushed one by one, checkpoints are renamed into place whole,
    the out-dir's lock goes with the process, and torch's compile workers exit when their parent does.
    Under `python -i` it does nothing, so the prompt comes back."""
    if sys.flags.interactive:
        return
    flush_output()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def excepthook(kind, value, tb):
    if issubclass(kind, KeyboardInterrupt):
        die_by_signal(signal_of(value))
    else:
        sys.__excepthook__(kind, value, tb)


def install():
    """For `python tool.py`: an uncaught Ctrl-C ends the process by SIGINT, without a traceback."""
    sys.excepthook = excepthook
