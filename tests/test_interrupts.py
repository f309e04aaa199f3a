"""A Ctrl-C is never lost (winaconv/interrupts.py): one that lands in a finaliser, where Python swallows the
KeyboardInterrupt, still stops the conversion at the next layer boundary."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import gc, os, signal, sys, time
    from winaconv.interrupts import interrupts_unwind, raise_if_interrupted

    class SignalsWhileFinalised:
        def __del__(self):
            os.kill(os.getpid(), signal.{sig})
            time.sleep(0.05)  # the handler runs here, inside the finaliser: its exception is dropped

    with interrupts_unwind():
        SignalsWhileFinalised()
        gc.collect()
        print("still running", flush=True)
        try:
            raise_if_interrupted()
        except KeyboardInterrupt:
            sys.exit(130)
    sys.exit(0)
""")


def _run(sig: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(sig=sig)], capture_output=True, text=True,
                          env=os.environ, timeout=60)


def test_a_signal_swallowed_by_a_finaliser_is_raised_at_the_next_check():
    for sig in ("SIGINT", "SIGTERM"):
        done = _run(sig)
        assert "still running" in done.stdout and "Exception ignored" in done.stderr, done.stderr
        assert done.returncode == 130, (sig, done.stderr)


def test_an_earlier_signal_does_not_stop_the_next_conversion_and_handlers_are_restored():
    import signal
    import time

    import pytest

    from winaconv.interrupts import interrupts_unwind, raise_if_interrupted

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupts_unwind():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
    with interrupts_unwind():
        raise_if_interrupted()  # the earlier run's signal is not this run's
