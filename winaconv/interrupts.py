"""Ctrl-C and SIGTERM stop a conversion at once, and are never lost.

Both signals raise KeyboardInterrupt, so the staging folder unwinds the same way for either. Python drops an
exception raised while it runs a finaliser (`__del__`, a weakref callback: "Exception ignored in ..."), so a
signal that lands there would be swallowed and the conversion would run to its end; the handler therefore also
records the signal, and the pipeline calls `raise_if_interrupted()` between layers."""
from __future__ import annotations

import contextlib
import signal
import threading

_received = threading.Event()


def _on_signal(signum, frame):
    _received.set()
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a signal arrived whose exception may have been swallowed."""
    if _received.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_unwind():
    """Within this block SIGINT and SIGTERM raise KeyboardInterrupt and are recorded (main thread only;
    elsewhere the process's own handlers stay)."""
    _received.clear()
    try:
        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()
