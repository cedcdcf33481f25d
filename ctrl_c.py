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


def die_by_sigint():
    """End the process by SIGINT now, its output flushed. Python's own way, an uncaught KeyboardInterrupt, is lost
    once an exit handler runs a string exec (as with the CUDA build of torch): the exit status is then 1."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def excepthook(kind, value, tb):
    if issubclass(kind, KeyboardInterrupt):
        die_by_sigint()
    else:
        sys.__excepthook__(kind, value, tb)


def install():
    """For `python tool.py`: an uncaught Ctrl-C ends the process by SIGINT, without a traceback."""
    sys.excepthook = excepthook
