"""SIGTERM and SIGHUP raise like Ctrl-C inside `interrupts()`, and only there; a signal
during the clean-up does not stop it; Ctrl-C at any moment, however often, prints no
traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
            for _ in range(int(sys.argv[2])):  # more of them during the clean-up...
                os.kill(os.getpid(), signal.Signals[sys.argv[1]])
                time.sleep(0.05)
            print("cleaned up", flush=True)  # ...do not stop it
except KeyboardInterrupt as stop:
    signals.exit_like(stop)
"""


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: signal.Signals(s).name
)
def test_the_process_ends_by_the_signal_after_its_clean_up(signum):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, signal.Signals(signum).name, "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # as a terminal's foreground job: it says its note
    )
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signum)
    out, err = child.communicate(timeout=30)
    assert "cleaned up" in out
    assert child.returncode == -signum  # a shell shows 128 + signum: 143, 129, 130
    assert "Traceback" not in err and "Exception ignored" not in err
    if signum == signal.SIGINT:  # pressed again: said once what it is doing
        assert err == "error: ending the runs first (Ctrl-C 2 more times: quit now)\n"


def test_ctrl_c_pressed_again_and_again_during_the_clean_up_quits_at_once():
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "SIGINT", str(1 + signals.QUIT_AFTER)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=30)
    assert out == "" and child.returncode == 130
    assert err.splitlines() == [
        "error: ending the runs first (Ctrl-C 2 more times: quit now)",
        "error: quit before the runs were ended",
    ]


@pytest.mark.parametrize("after", [0.3, 1.5])
def test_ctrl_c_twice_while_the_command_starts_ends_it_in_one_line(tmp_path, after):
    """During torch's import (a KeyboardInterrupt raised inside it aborts the process or
    prints a traceback): noted, and acted on once the imports are done."""
    child = subprocess.Popen(
        [sys.executable, "-m", "fashion_sweep.train", "trainer.epochs=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
    )
    time.sleep(after)
    for _ in range(2):
        os.killpg(child.pid, signal.SIGINT)
        time.sleep(0.05)
    out, err = child.communicate(timeout=60)
    assert (child.returncode, err, out) == (-signal.SIGINT, "error: interrupted\n", "")
    assert not (tmp_path / "mlruns").exists()  # no run was started


def test_a_signal_the_process_was_started_to_ignore_stays_ignored():
    """`nohup` ignores SIGHUP: a closed terminal must not end the run."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.replace("time.sleep(30)", "time.sleep(1)"), "SIGINT", "0"],
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


def test_another_thread_interrupts_the_main_one_with_a_reason_of_its_own():
    """signals.stop: how a trial's watch on its sweep worker ends the trial's runs."""
    import pickle
    import threading

    with pytest.raises(KeyboardInterrupt) as caught, interrupts():
        threading.Thread(target=signals.stop, args=("interrupted: its sweep worker died",)).start()
        threading.Event().wait(30)  # woken by the signal
    assert isinstance(caught.value, Terminated) and caught.value.signum == signal.SIGTERM
    assert signals.reason(caught.value) == "interrupted: its sweep worker died"
    back = pickle.loads(pickle.dumps(caught.value))
    assert signals.reason(back) == "interrupted: its sweep worker died"
    with pytest.raises(KeyboardInterrupt) as plain, interrupts():  # the reason is not kept
        os.kill(os.getpid(), signal.SIGTERM)
    assert signals.reason(plain.value) == "interrupted: SIGTERM"


HELD = """
import os, signal, sys, time
from fashion_sweep import signals
signals.hold()
with signals.interrupts():
    pass
print("done", flush=True)
os.kill(os.getpid(), signal.Signals[sys.argv[1]])
time.sleep(10)
print("still here", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_once_the_work_is_done_a_signal_ends_the_process_quietly(signum):
    """hold()'s noting handlers do not outlive the command's work: a SIGTERM during
    shutdown ends it as before hold(), a Ctrl-C quits without a traceback."""
    child = subprocess.run(
        [sys.executable, "-c", HELD, signal.Signals(signum).name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert child.stdout == "done\n" and child.stderr == ""
    assert child.returncode in (-signum, 128 + signum)
