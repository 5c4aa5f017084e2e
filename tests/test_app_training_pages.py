"""AppTest for the Fine-tune and Evaluate pages with tiny models and a stand-in trainer."""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from mrcnn.training import jobs
from tests.test_app import APP, env, tiny_shapes, write_tiny  # noqa: F401  (fixtures)

FAKE = [sys.executable, str(Path(__file__).parent / "fakes" / "fake_trainer.py")]


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90).run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "success", "error", "warning")
             for e in at.get(kind) if isinstance(getattr(e, "value", None), str)]
    return "\n".join(parts)


@pytest.fixture
def fake_trainer(monkeypatch):
    """start_job runs the stand-in trainer (fast, honours STOP, can crash) instead of the real one."""
    monkeypatch.setattr(jobs, "start_job", functools.partial(jobs.start_job, trainer=FAKE))


def _wait_state(run_root: Path, state: str, timeout=30.0) -> jobs.Job:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = jobs.current_job(run_root)
        if job is not None and job.state() == state:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job never reached {state}")


def test_finetune_page_shows_settings_and_an_estimate(env):
    at = open_page("ui/finetune.py")
    assert "Estimated training time" in texts(at)
    assert at.button(key="ft_start")
    at.number_input(key="ft_steps").set_value(400).run()
    assert not at.exception


def test_finetune_run_starts_reports_and_finishes(env, fake_trainer):
    at = open_page("ui/finetune.py")
    at.number_input(key="ft_steps").set_value(20).run()
    at.button(key="ft_start").click().run()
    assert not at.exception, at.exception
    job = jobs.current_job(env / "runs")
    assert job is not None and "--steps" in job.command and "20" in job.command
    assert (Path(job.run_dir) / "val" / "annotations.json").is_file()  # validation scenes written
    # a reload (a new session) finds the same job
    _wait_state(env / "runs", "finished")
    at2 = open_page("ui/finetune.py")
    body = texts(at2)
    assert "New checkpoint" in body and Path(job.run_dir).name in body
    assert at2.button(key="ft_eval")


def test_failed_run_shows_the_reason(env, monkeypatch):
    monkeypatch.setattr(jobs, "start_job", functools.partial(jobs.start_job, trainer=[*FAKE, "--crash-at", "2"]))
    at = open_page("ui/finetune.py")
    at.number_input(key="ft_steps").set_value(20).run()
    at.button(key="ft_start").click().run()
    _wait_state(env / "runs", "failed")
    at2 = open_page("ui/finetune.py")
    assert any("simulated crash" in e.value for e in at2.error)


def test_running_job_can_be_cancelled_from_another_session(env, fake_trainer):
    job = jobs.start_job(["--steps", "2000"], env / "runs" / "long", steps=2000)
    at = open_page("ui/finetune.py")
    assert "ft_start" not in [b.key for b in at.button]  # one job at a time: no second start
    at.button(key="ft_cancel").click().run()
    assert job.state() == "cancelled"
