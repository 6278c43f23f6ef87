"""torch's threads shared among this machine's training processes (threads.py), with
real processes holding their places."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

from fashion_sweep import threads

pytestmark = pytest.mark.skipif(threads.cores() < 2, reason="needs 2 cores to share")
HOLD = (
    "from fashion_sweep import threads; import time\n"
    "with threads.Share(take=False):\n"
    "    print('holding', flush=True); time.sleep(120)\n"
)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine's folder of places of its own; torch's threads restored after."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield {**os.environ, "TMPDIR": str(tmp_path)}
    torch.set_num_threads(before)


def other_trainer(env: dict) -> subprocess.Popen:
    held = subprocess.Popen(
        [sys.executable, "-c", HOLD], env=env, stdout=subprocess.PIPE, text=True
    )
    assert held.stdout.readline() == "holding\n"
    return held


def test_a_share_is_taken_while_another_process_trains_and_given_back_when_it_is_killed(
    machine,
):
    torch.set_num_threads(threads.cores())
    other = other_trainer(machine)
    try:
        with threads.Share(take=True) as share:
            said = share.fit()
            assert torch.get_num_threads() == threads.cores() // 2
            half, cores = threads.cores() // 2, threads.cores()
            assert said == f"torch threads: {half} of {cores} cores (2 processes train here)"
            assert share.fit() is None  # nothing changed: nothing said
            other.send_signal(signal.SIGKILL)
            other.wait()
            assert share.fit() == f"torch threads: {cores} of {cores} cores (it alone trains here)"
            assert torch.get_num_threads() == threads.cores()
            assert [p.name for p in threads.folder().iterdir()] == [share.place.name]
        assert list(threads.folder().iterdir()) == []  # its place goes with it
    finally:
        other.kill()


def test_a_process_that_takes_no_share_keeps_its_threads_and_says_once_how_to(machine):
    torch.set_num_threads(threads.cores())
    with threads.Share(take=False) as share:
        assert share.fit() is None  # alone: nothing to say
        other = other_trainer(machine)
        try:
            said = share.fit()
            assert said.startswith("1 other process(es) train on this machine's")
            assert "trainer.share_cores=true" in said
            assert share.fit() is None
            assert torch.get_num_threads() == threads.cores()
        finally:
            other.kill()


def test_threads_set_from_outside_are_kept(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(threads.cores())
    other = other_trainer(machine)
    try:
        with threads.Share(take=True) as share:
            assert share.fit() is None
            assert torch.get_num_threads() == threads.cores()
    finally:
        other.kill()


def test_a_temp_folder_that_cannot_hold_places_leaves_torch_as_it_is(machine):
    threads.folder().parent.write_text("not a folder")  # another's, or a stray file
    torch.set_num_threads(threads.cores())
    with threads.Share(take=True) as share:
        said = share.fit()
        assert said.startswith("trainer.share_cores: no place in ")
        assert share.fit() is None  # said once
        assert torch.get_num_threads() == threads.cores()
