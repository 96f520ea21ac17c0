"""SIGTERM as Ctrl-C, for the command-line tools that write a temporary file or folder and rename it
into place (convert, export, the toy world).

SIGTERM (kill, a batch scheduler's time limit) ends a Python process without unwinding, so the
temporary copy stays behind. Inside `sigterm_as_interrupt()` it raises `Terminated`, a
KeyboardInterrupt, wherever the tool is, so the tool's `finally` blocks delete the copy as on Ctrl-C.
Only the command lines do this: a library caller keeps its own handler.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the tool is."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated`; the previous handler is restored after it."""
    if threading.current_thread() is not threading.main_thread():  # handlers are set there only
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def report_interrupt(error: KeyboardInterrupt) -> int:
    """Say on stderr what stopped the tool; return the shell's status for a process ended by that signal."""
    signum = signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT
    print(f"error: {'terminated (SIGTERM)' if signum == signal.SIGTERM else 'interrupted'}", file=sys.stderr)
    return 128 + signum
