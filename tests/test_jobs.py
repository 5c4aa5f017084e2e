"""Background job lifecycle with a stand-in trainer (the real trainer is exercised in test_train.py)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from mrcnn.training.jobs import JobError, current_job, running_job, start_job

FAKE = [sys.executable, str(Path(__file__).parent / "fakes" / "fake_trainer.py")]


def _wait(pred, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_start_progress_finish(tmp_path):
    job = start_job(["--steps", "10"], tmp_path / "run1", steps=10, root=tmp_path, trainer=FAKE)
    assert job.state() == "running"
    assert _wait(lambda: job.state() == "finished")
    assert job.progress()["step"] == 10 and job.progress()["fraction"] == 1.0
    assert [m["step"] for m in job.metrics()] == list(range(1, 11))
    assert current_job(tmp_path).run_dir == job.run_dir  # a reload finds it again
    assert running_job(tmp_path) is None


def test_second_start_refused_while_running(tmp_path):
    job = start_job(["--steps", "200"], tmp_path / "a", steps=200, root=tmp_path, trainer=FAKE)
    with pytest.raises(JobError, match="already in progress"):
        start_job(["--steps", "5"], tmp_path / "b", steps=5, root=tmp_path, trainer=FAKE)
    job.cancel()
    assert not (tmp_path / "b").exists()


def test_cancel_saves_and_reports(tmp_path):
    job = start_job(["--steps", "500"], tmp_path / "run", steps=500, root=tmp_path, trainer=FAKE)
    assert _wait(lambda: job.progress()["step"] >= 3)
    job.cancel()
    status = job.status()
    assert status["state"] == "cancelled" and "cancelled at step" in status["message"]
    assert (Path(job.run_dir) / "checkpoint.pt").exists()
    # once it has ended, a new job may start
    nxt = start_job(["--steps", "2"], tmp_path / "next", steps=2, root=tmp_path, trainer=FAKE)
    assert _wait(lambda: nxt.state() == "finished")


def test_crash_is_reported_with_the_reason(tmp_path):
    job = start_job(["--steps", "50", "--crash-at", "3"], tmp_path / "run", steps=50, root=tmp_path, trainer=FAKE)
    assert _wait(lambda: job.state() != "running")
    status = job.status()
    assert status["state"] == "failed" and "simulated crash" in status["message"]


def test_killed_process_is_reported(tmp_path):
    job = start_job(["--steps", "500"], tmp_path / "run", steps=500, root=tmp_path, trainer=FAKE)
    assert _wait(lambda: job.progress()["step"] >= 2)
    os.kill(job.pid, signal.SIGKILL)
    assert _wait(lambda: job.state() == "failed")
    assert "ended unexpectedly" in job.status()["message"]
