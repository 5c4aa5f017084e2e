"""Background job lifecycle with a stand-in trainer (the real trainer is exercised in test_train.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from mrcnn.training.jobs import (REGISTRY, START_LOCK, Job, JobError, current_job, registry_problem,
                                 running_job, start_job)

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


def test_cancel_during_the_trainers_imports_ends_as_cancelled(tmp_path):
    # the trainer catches SIGTERM only once torch is imported; before that SIGTERM ends it (exit -15)
    job = start_job(["--steps", "50", "--startup-s", "30"], tmp_path / "run", steps=50, root=tmp_path, trainer=FAKE)
    job.cancel()
    status = job.status()
    assert status["state"] == "cancelled", status
    assert "before the trainer could save anything" in status["message"]


def test_run_folder_deleted_while_running(tmp_path):
    job = start_job(["--steps", "500"], tmp_path / "run", steps=500, root=tmp_path, trainer=FAKE)
    assert _wait(lambda: job.progress()["step"] >= 2)
    shutil.rmtree(job.run_dir)
    job.cancel()  # once raised FileNotFoundError (the STOP flag's folder is gone)
    assert not job.is_alive()
    assert job.status() == {"state": "failed", "message": "the run folder run was deleted"}
    assert not Path(job.run_dir).exists()  # not recreated by the status of the cancel


def _write_registry(root: Path, data: bytes) -> None:
    (root / REGISTRY).write_bytes(data)


@pytest.mark.parametrize("record, problem", [
    (b"\xff\xfe not utf-8 \xc3", "cannot be read"),
    (b"{not json", "cannot be read"),
    (b"[" * 100_000 + b"]" * 100_000, "cannot be read"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"run_dir": "r", "pid": "123", "command": ["x"], "started": 0, "steps": 1}).encode(), "pid"),
    (json.dumps({"run_dir": "r", "pid": 123, "command": "x", "started": 0, "steps": 1}).encode(), "command"),
    (json.dumps({"run_dir": "r", "pid": 123}).encode(), "expected exactly the fields"),
    *[(json.dumps({"run_dir": "r", "pid": pid, "command": ["x"], "started": 0, "steps": 1}).encode(), "pid")
      for pid in (0, -1, 1, True)],
], ids=lambda value: repr(value[:30]))  # short ids: the test's id reaches its job's environment (PYTEST_CURRENT_TEST)
def test_unreadable_registry_is_no_job_and_says_why(tmp_path, monkeypatch, record, problem):
    signals = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signals.append((pid, sig)))
    _write_registry(tmp_path, record)
    assert current_job(tmp_path) is None and running_job(tmp_path) is None
    assert problem in registry_problem(tmp_path) and REGISTRY in registry_problem(tmp_path)
    assert signals == []
    monkeypatch.undo()
    job = start_job(["--steps", "2"], tmp_path / "run", steps=2, root=tmp_path, trainer=FAKE)  # a new run may start
    assert _wait(lambda: job.state() == "finished")
    assert registry_problem(tmp_path) is None


@pytest.mark.parametrize("pid", [0, -1, 1])
def test_cancel_never_signals_a_pid_below_2(tmp_path, monkeypatch, pid):
    signals = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: signals.append((pid, sig)))  # pid 0 = our own process group
    job = Job(str(tmp_path / "run"), pid, ["x"], 0.0, 1)
    assert not job.is_alive()
    job.cancel(grace_s=0.1)
    assert signals == []


def test_start_lock_released_between_create_and_stat(tmp_path, monkeypatch):
    real_open = os.open
    lock = tmp_path / START_LOCK

    def held_then_released(path, flags, *args):
        if Path(path) == lock and not getattr(held_then_released, "done", False):
            held_then_released.done = True
            raise FileExistsError(path)  # another session held it, and released it before our stat()
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", held_then_released)
    job = start_job(["--steps", "2"], tmp_path / "run", steps=2, root=tmp_path, trainer=FAKE)
    assert _wait(lambda: job.state() == "finished") and not lock.exists()


def test_a_start_lock_held_by_another_session_refuses(tmp_path):
    (tmp_path / START_LOCK).touch()
    with pytest.raises(JobError, match="being started right now"):
        start_job(["--steps", "2"], tmp_path / "run", steps=2, root=tmp_path, trainer=FAKE)


def test_progress_skips_rows_that_are_not_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1}\n5\n{"step": "x"}\n\xff\xfe\n{"step": 2}\n{"st')
    job = Job(str(run), 99999999, ["x"], 0.0, 4)
    assert job.progress()["step"] == 2


def test_metrics_rows_whose_numbers_are_not_numbers_are_left_out(tmp_path):
    """The Fine-tune page formats a row's numbers: "loss": "abc" or null was a traceback there."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "loss": 0.5, "lr": 0.01, "images_per_s": 2.0}, {"step": 2, "loss": "abc", "lr": 0.01},
            {"step": 3, "loss": None}, {"step": 4, "loss": 0.4, "lr": "fast"}, {"step": True, "loss": 0.4},
            {"step": 5, "loss": 0.3, "gpu_mem_mb": None}, {"step": 6, "loss": 0.3, "gpu_mem_mb": "lots"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["step"] for r in Job(str(run), 0, ["x"], 0.0, 6).metrics()] == [1, 5]


def test_a_plan_the_page_did_not_write_is_no_plan(tmp_path):
    from ui.finetune import _plan_of
    run = tmp_path / "run"
    run.mkdir()
    job = Job(str(run), 0, ["x"], 0.0, 1)
    for text in ("[1, 2]", '{"start_model": "shapes"}', '{"start_model": 3, "val_dir": "v"}', "[" * 100_000):
        (run / "plan.json").write_text(text)
        assert _plan_of(job) is None, text
    (run / "plan.json").write_text('{"start_model": "shapes", "val_dir": "v"}')
    assert _plan_of(job) == {"start_model": "shapes", "val_dir": "v"}
