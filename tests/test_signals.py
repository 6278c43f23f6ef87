"""SIGTERM and SIGHUP raise like Ctrl-C inside `interrupts()`, and only there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fashion_sweep import signals
from fashion_sweep.signals import Terminated, interrupts


@pytest.mark.parametrize("signum", signals.TERMINATING, ids=lambda s: signal.Signals(s).name)
def test_a_terminating_signal_raises_a_keyboard_interrupt_naming_it(signum):
    before = signal.getsignal(signum)
    with pytest.raises(KeyboardInterrupt) as caught, interrupts():
        os.kill(os.getpid(), signum)
    assert isinstance(caught.value, Terminated) and caught.value.signum == signum
    assert signals.reason(caught.value) == f"interrupted: {signal.Signals(signum).name}"
    assert signal.getsignal(signum) is before  # restored when the block ends


def test_ctrl_c_keeps_its_reason_and_nesting_restores_once():
    assert signals.reason(KeyboardInterrupt()) == "interrupted"
    with interrupts():
        with interrupts():
            pass
        assert signal.getsignal(signal.SIGTERM) is signals._raise  # the outer block's
    assert signal.getsignal(signal.SIGTERM) is not signals._raise


CHILD = """
import os, signal, sys, time
from fashion_sweep import signals
try:
    with signals.interrupts():
        try:
            print("ready", flush=True)
            time.sleep(30)
        finally:
            if sys.argv[1] != "SIGINT":  # a second one during the clean-up...
                os.kill(os.getpid(), signal.Signals[sys.argv[1]])
            print("cleaned up", flush=True)  # ...does not stop it
except KeyboardInterrupt as stop:
    signals.exit_like(stop)
"""


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: signal.Signals(s).name
)
def test_the_process_ends_by_the_signal_after_its_clean_up(signum):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, signal.Signals(signum).name],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signum)
    out = child.communicate(timeout=30)[0]
    assert "cleaned up" in out
    assert child.returncode == -signum  # a shell shows 128 + signum: 143, 129, 130


def test_a_signal_the_process_was_started_to_ignore_stays_ignored():
    """`nohup` ignores SIGHUP: a closed terminal must not end the run."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.replace("time.sleep(30)", "time.sleep(1)"), "SIGINT"],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGHUP)
    assert child.communicate(timeout=30)[0] == "cleaned up\n"
    assert child.returncode == 0


def test_terminated_crosses_a_process_boundary():
    """A launcher's worker process sends its exception to the sweep's, pickled."""
    import pickle

    back = pickle.loads(pickle.dumps(Terminated(signal.SIGTERM)))
    assert isinstance(back, Terminated) and back.signum == signal.SIGTERM
