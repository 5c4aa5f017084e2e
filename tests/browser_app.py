"""What the browser tests share: `streamlit run app.py` on 127.0.0.1 with tiny random-weight models, Debian's
chromium through Python Playwright (never a downloaded browser), and the page helpers.

``server`` and ``browser`` are session fixtures (tests/conftest.py brings them in): tests/test_browser.py and
tests/test_browser_video.py run on one pytest-xdist worker (their ``xdist_group``) against one server and one
browser, started once.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from mrcnn.model.checkpoint import save_checkpoint
from tests.helpers import CATEGORIES, TINY_LIGHT, tiny_loaded

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
COUNT = re.compile(r"(\d+) detections")
COMPARE_RUN = "compare-b"
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.xdist_group("browser"),  # one worker runs them all: one server at a time, one browser
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"streamlit did not become healthy in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The app on a free port, with a tiny random-weight shapes.pt so it needs neither the real model
    nor the network. Yields (url, folder holding weights/, runs/ and models/)."""
    tmp = tmp_path_factory.mktemp("browser")
    weights = tmp / "weights"
    loaded = tiny_loaded(seed=0)
    save_checkpoint(weights / "shapes.pt", TINY_LIGHT, CATEGORIES, loaded.model.state_dict(),
                    {"data": "random weights (browser test)"}, half=True)
    # a second model to compare with, listed as a training run
    save_checkpoint(tmp / "runs" / COMPARE_RUN / "checkpoint.pt", TINY_LIGHT, CATEGORIES,
                    tiny_loaded(seed=5).model.state_dict(), {"data": "random weights (browser test)"}, half=True)
    ARTIFACTS.mkdir(exist_ok=True)
    log = ARTIFACTS / "streamlit.log"
    port = free_port()
    # OMP_NUM_THREADS: the server and the training runs it starts take this worker's share of the cores
    # (tests/conftest.py), not every core beside the other workers
    env = dict(os.environ, MRCNN_WEIGHTS_DIR=str(weights), MRCNN_RUNS_DIR=str(tmp / "runs"),
               MRCNN_MODELS_DIR=str(tmp / "models"), OMP_NUM_THREADS=str(torch.get_num_threads()),
               TORCH_HOME=str(tmp / "torch"), STREAMLIT_BROWSER_GATHER_USAGE_STATS="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
             "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/_stcore/health", proc, log)
        yield f"http://127.0.0.1:{port}", tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
            "--disable-gpu"])
        yield b
        b.close()


# Counts the script runs a page sees start (its app root's data-test-script-state leaving "notRunning") and
# notes when that state last changed: a run that starts and ends between two looks is still counted, and a
# rerun that follows another at once ("notRunning" for a moment between them) is not taken for the end.
RUN_COUNTER = """(() => {
  window.__mrcnnRuns = 0;
  window.__mrcnnStateChanged = performance.now();
  new MutationObserver((records) => {
    for (const r of records) {
      window.__mrcnnStateChanged = performance.now();
      if (r.target.getAttribute("data-test-script-state") !== "notRunning") window.__mrcnnRuns++;
    }
  }).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-test-script-state"]});
})();"""
IDLE = """(quietMs) => {
  const app = document.querySelector('[data-testid="stApp"]');
  return app !== null && app.dataset.testScriptState === "notRunning"
    && performance.now() - window.__mrcnnStateChanged >= quietMs;
}"""


def new_page(browser, height: int = 1000, errors: list[str] | None = None):
    """A page in a browser context of its own (no cookies, a new session of the app), 1400 px wide, counting
    its script runs (``script_runs``); its JavaScript errors go to ``errors``."""
    page = browser.new_page(viewport={"width": 1400, "height": height})
    page.add_init_script(RUN_COUNTER)
    if errors is not None:
        page.on("pageerror", lambda err: errors.append(str(err)))
    return page


@dataclass
class Tab:
    page: Any  # Playwright's Page
    errors: list[str]  # the page's JavaScript errors while the test had it


# The one page the browser tests take turns in, per browser (a fixture of its own would be one per test file).
# Going to the app's address starts a new session of the app there, as in a page of its own, in half the time
# (its renderer and caches are kept: a page of its own showed the first detections in 2.4 s, this one in
# 1.2 s). The page keeps the browser's own state between tests: cookies, and localStorage, where the app
# keeps nothing but the sidebar's width.
_TABS: dict[int, Any] = {}


@pytest.fixture
def tab(browser):
    """The browser tests' shared page for one test, 1400 × 1000 px, its JavaScript errors in ``errors``; left
    on a blank page (the app's session there ends, as a closed page's does)."""
    page = _TABS.get(id(browser))
    if page is None or page.is_closed():
        page = _TABS[id(browser)] = new_page(browser)
    errors: list[str] = []

    def record(err) -> None:
        errors.append(str(err))

    page.set_viewport_size({"width": 1400, "height": 1000})
    page.on("pageerror", record)
    try:
        yield Tab(page, errors)
    finally:
        page.remove_listener("pageerror", record)
        page.mouse.move(0, 0)  # hovering nothing
        page.goto("about:blank")


def detection_count(page) -> int:
    heading = page.locator("h3").filter(has_text=COUNT).first
    heading.wait_for(timeout=60_000)
    return int(COUNT.search(heading.inner_text()).group(1))


def wait_count(page, accept, timeout: float = 30.0) -> int | None:
    """The detection count once ``accept(count)`` holds; else, after ``timeout`` s, the last count read."""
    deadline = time.monotonic() + timeout
    count = None
    while time.monotonic() < deadline:
        try:
            count = detection_count(page)
        except Exception:  # the heading is re-rendered mid-read
            pass
        else:
            if accept(count):
                return count
        page.wait_for_timeout(250)
    return count


def wait_count_change(page, old: int, timeout: float = 30.0) -> int:
    new = wait_count(page, lambda count: count != old, timeout)
    return old if new is None else new


def script_runs(page) -> int:
    """How many script runs this page has seen start (RUN_COUNTER, from ``new_page``): take it before an
    action, give it to ``wait_for_rerun`` after."""
    return page.evaluate("window.__mrcnnRuns")


def wait_for_idle(page, quiet_ms: int = 150, timeout: float = 30.0) -> None:
    """Until no script run is going: the app root's ``data-test-script-state`` is "notRunning" and has not
    changed for ``quiet_ms`` (a page from ``new_page``)."""
    page.wait_for_function(IDLE, arg=quiet_ms, polling=50, timeout=timeout * 1000)


def wait_for_rerun(page, since: int, timeout: float = 30.0) -> None:
    """Wait until the script run an action started has ended: a run started after ``since`` (``script_runs``
    before the action) and none is going, then a moment for what it sent to be drawn (300 ms after the run
    ended in all). Where no run is seen start (none came) the wait for one gives up after a second."""
    try:
        page.wait_for_function(f"window.__mrcnnRuns > {since}", timeout=1_000)
    except Exception:  # noqa: BLE001 - Playwright's TimeoutError: no run seen
        pass
    wait_for_idle(page, timeout=timeout)
    page.wait_for_timeout(150)


def screenshot(page, name: str, height: int | None = None) -> None:
    """The whole page in test-artifacts/``name``. Streamlit scrolls inside its own container: for a page
    taller than the window the window is made ``height`` px tall for the picture, then put back."""
    size = page.viewport_size
    if height is not None:
        page.set_viewport_size({"width": size["width"], "height": height})
    settle(page)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    if height is not None:
        page.set_viewport_size(size)


def settle(page) -> None:
    """Until the page's pictures are loaded and two frames are drawn: what a resize re-laid out is painted."""
    page.wait_for_function("() => [...document.images].every((img) => img.complete)", timeout=10_000)
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")


def pick_file_named(page, file_input, path: Path, name: str) -> None:
    """Give ``file_input`` the file at ``path`` under the name ``name`` (one no file on disk has, such as
    "../x.pt"), as a crafted upload would. Playwright takes a file as bytes only under a name of our own,
    and passes 10 MB of bytes in 2 s: the file goes in by its path to an input of our own, and the browser
    renames it and hands it on, with the events Playwright sends itself."""
    page.evaluate("""() => {
      const picker = document.createElement("input");
      Object.assign(picker, {type: "file", id: "mrcnn-test-picker", hidden: true});
      document.body.append(picker);
    }""")
    page.locator("#mrcnn-test-picker").set_input_files(str(path))
    file_input.evaluate("""(input, name) => {
      const picker = document.getElementById("mrcnn-test-picker");
      const renamed = new DataTransfer();
      renamed.items.add(new File([picker.files[0]], name, {type: "application/octet-stream"}));
      picker.remove();
      input.files = renamed.files;
      input.dispatchEvent(new Event("input", {bubbles: true, composed: true}));
      input.dispatchEvent(new Event("change", {bubbles: true}));
    }""", name)


def slider_value(page, label: str) -> float:
    return float(page.get_by_role("slider", name=label).first.input_value())  # an <input type="range">


def press_keys(page, label: str, *keys: str) -> None:
    """Move a slider with the keyboard, as a user can: an arrow is one step, PageUp/PageDown a tenth of the
    range, Home/End the ends. Each press reruns the page, so few presses keep a test quick."""
    thumb = page.get_by_role("slider", name=label).first
    thumb.focus()
    for key in keys:
        thumb.press(key)
