"""AppTest of the Fine-tune page's run across what interrupts a session: Streamlit stopping or rerunning the
script while the run starts (the user leaves the page, reloads, presses Stop), and a reload of a running run."""
from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
from streamlit.runtime.scriptrunner_utils.script_requests import RerunData
from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx
from streamlit.testing.v1 import AppTest

from mrcnn.training import finetune, jobs
from tests.helpers import shown
from tests.test_app import APP, env, tiny_shapes  # noqa: F401  (fixtures)
from tests.test_app_training_pages import FAKE, open_page, texts

THEIRS = "This run was started in another session."


def reload(at: AppTest, page: str = "ui/finetune.py") -> AppTest:
    """A new session on ``page`` with the address ``at`` ended on (as a browser's reload)."""
    fresh = AppTest.from_file(APP, default_timeout=90).run()
    fresh.query_params.update(at.query_params)
    fresh.switch_page(page).run()
    assert not fresh.exception, fresh.exception
    return fresh


def wait_until_ended(run_root: Path, timeout: float = 30.0) -> jobs.Job:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = jobs.current_job(run_root)
        if job is not None and job.state() != "running":
            return job
        time.sleep(0.1)
    raise AssertionError("no run ended")


def start_then(monkeypatch, request_from_the_browser) -> None:
    """start_job runs the stand-in trainer, then a stop or rerun arrives from the browser, as when the user
    leaves, reloads or presses Stop while the page starts the run: Streamlit raises it from the script's next
    st call (session state included)."""
    start = functools.partial(jobs.start_job, trainer=FAKE)

    def start_and_interrupt(*args, **kwargs):
        job = start(*args, **kwargs)
        request_from_the_browser(get_script_run_ctx().script_requests)
        return job

    monkeypatch.setattr(jobs, "start_job", start_and_interrupt)


@pytest.mark.parametrize("request_from_the_browser", [
    pytest.param(lambda requests: requests.request_stop(), id="stop"),
    pytest.param(lambda requests: requests.request_rerun(RerunData()), id="rerun"),
])
def test_leaving_the_page_as_the_run_starts_keeps_the_run(env, monkeypatch, request_from_the_browser):
    start_then(monkeypatch, request_from_the_browser)
    at = open_page("ui/finetune.py")
    at.number_input(key="ft_steps").set_value(3).run()
    at.button(key="ft_start").click().run()
    job = wait_until_ended(env / "runs")
    assert job.status() == {"state": "finished", "message": ""}
    assert (Path(job.run_dir) / "plan.json").is_file(), "the run's records were lost"
    again = reload(at)
    body = texts(again)
    assert "The run failed" not in body and "was deleted" not in body
    assert f"Last run: {Path(job.run_dir).name}" in [h.value for h in again.subheader]
    assert "New checkpoint" in body and again.button(key="ft_eval"), "before vs after needs plan.json"


def test_leaving_the_page_while_the_data_is_prepared_starts_nothing(env, monkeypatch):
    prepare = finetune.prepare_builtin

    def prepare_then_leave(*args, **kwargs):
        plan = prepare(*args, **kwargs)
        get_script_run_ctx().script_requests.request_stop()
        return plan

    monkeypatch.setattr(finetune, "prepare_builtin", prepare_then_leave)
    monkeypatch.setattr(jobs, "start_job", functools.partial(jobs.start_job, trainer=FAKE))
    at = open_page("ui/finetune.py")
    at.number_input(key="ft_steps").set_value(3).run()
    at.button(key="ft_start").click().run()
    assert jobs.current_job(env / "runs") is None, "a run started after the user left"
    assert not list((env / "runs").glob("finetune-*")), "the prepared data was left behind"
    again = reload(at)
    assert again.button(key="ft_start")
    assert not [h.value for h in again.subheader if h.value.startswith(("Run ", "Last run"))]


def test_a_reload_keeps_the_run_its_session_started_as_its_own(env, monkeypatch):
    monkeypatch.setattr(jobs, "start_job", functools.partial(jobs.start_job, trainer=FAKE))
    at = open_page("ui/finetune.py")
    at.number_input(key="ft_steps").set_value(2000).run()  # runs while the test looks: it cancels it
    at.button(key="ft_start").click().run()
    job = jobs.current_job(env / "runs")
    assert job.state() == "running"
    assert THEIRS not in texts(at) and not at.button(key="ft_cancel").disabled
    at.switch_page("ui/detect.py").run()
    assert at.query_params.get("run_owner") == job.owner  # AppTest keeps the address's query: the link could copy it
    links = [c.value for c in at.code if "?" in c.value]  # Detect's "Copy link"
    assert links and not [link for link in links if job.owner in link], "a shared link hands the run over"
    at.query_params.clear()  # the browser's page links carry no query
    at.run()
    assert at.query_params.get("run_owner") == job.owner, "a reload on Detect would lose the run"
    on_detect = reload(at, "ui/detect.py")
    on_detect.query_params.clear()
    on_detect.switch_page("ui/finetune.py").run()
    assert THEIRS not in texts(on_detect), "a reload on another page loses the run"
    again = reload(on_detect)
    assert THEIRS not in texts(again), "the page promises the run survives a reload"
    assert not again.button(key="ft_cancel").disabled
    other_tab = open_page("ui/finetune.py")
    assert THEIRS in texts(other_tab) and other_tab.button(key="ft_cancel").disabled
    again.button(key="ft_cancel").click().run()
    assert job.state() == "cancelled"


def test_a_run_that_cannot_be_recorded_does_not_run(env, monkeypatch):
    """A trainer the job registry does not name is one no page can watch or cancel: start_job stops it, and the
    page says why, with nothing left behind."""
    started = []

    def recorded_popen(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    def disk_full(path, data):
        if Path(path).name == jobs.REGISTRY:
            raise OSError(28, "No space left on device")
        return write(path, data)

    popen, write = jobs.subprocess.Popen, jobs.atomic_write_bytes
    monkeypatch.setattr(jobs.subprocess, "Popen", recorded_popen)
    monkeypatch.setattr(jobs, "atomic_write_bytes", disk_full)
    monkeypatch.setattr(jobs, "start_job", functools.partial(jobs.start_job, trainer=FAKE))
    at = open_page("ui/finetune.py")
    at.number_input(key="ft_steps").set_value(2000).run()
    at.button(key="ft_start").click().run()
    assert not at.exception, at.exception
    assert [shown(e.value) for e in at.error] == [f"the run cannot be recorded in {env / 'runs' / jobs.REGISTRY}: "
                                           "No space left on device"]
    (trainer,) = started
    assert trainer.poll() is not None, "the trainer runs unrecorded"
    assert not list((env / "runs").glob("finetune-*"))
