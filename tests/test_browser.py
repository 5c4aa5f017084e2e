"""End to end in a real browser: `streamlit run app.py` on 127.0.0.1 driven by Debian's chromium
through Python Playwright (never a downloaded browser).

Uploads an image, waits for the detections, moves the score slider with the keyboard and sees the
count change, opens Inspect; compares two models and opens a shared link in a fresh browser. Screenshots
go to test-artifacts/ (and the README's to docs/images/). Skipped when /usr/bin/chromium is
missing (CI installs it: apt-get install chromium).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from mrcnn.model.checkpoint import save_checkpoint
from tests.helpers import CATEGORIES, TINY_LIGHT, scene, tiny_loaded

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
COUNT = re.compile(r"(\d+) detections")
COMPARE_RUN = "compare-b"
# The README's screenshots are rewritten only when asked (MRCNN_DOC_IMAGES=1): a test run changes no tracked file.
DOC_IMAGES = ROOT / "docs" / "images" if os.environ.get("MRCNN_DOC_IMAGES") == "1" else ARTIFACTS

# CI sets MRCNN_REQUIRE_BROWSER=1: there a missing browser is a failure, not a skip.
if not Path(CHROMIUM).exists() and os.environ.get("MRCNN_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"{CHROMIUM} is missing and MRCNN_REQUIRE_BROWSER=1 (apt-get install chromium)")
pytestmark = [
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free port, with a tiny random-weight shapes.pt so it needs neither the real model
    nor the network."""
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
    env = dict(os.environ, MRCNN_WEIGHTS_DIR=str(weights), MRCNN_RUNS_DIR=str(tmp / "runs"),
               MRCNN_MODELS_DIR=str(tmp / "models"),
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


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
            "--disable-gpu"])
        yield b
        b.close()


def detection_count(page) -> int:
    heading = page.locator("h3").filter(has_text=COUNT).first
    heading.wait_for(timeout=60_000)
    return int(COUNT.search(heading.inner_text()).group(1))


def wait_count_change(page, old: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            new = detection_count(page)
        except Exception:  # the heading is re-rendered mid-read
            new = old
        if new != old:
            return new
        page.wait_for_timeout(250)
    return old


def test_upload_detect_slide_and_inspect(server, browser):
    url, tmp = server
    image = tmp / "upload.png"
    Image.fromarray(scene(150, 200, seed=7)).save(image)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        page.goto(url, wait_until="domcontentloaded")
        detection_count(page)  # the starting sample scene

        page.locator('[data-testid="stMain"] input[type="file"]').first.set_input_files(str(image))
        page.get_by_text(re.compile(r"upload\.png · 200×150 px")).first.wait_for(timeout=60_000)
        at_default = detection_count(page)  # score 0.50

        thumb = page.get_by_role("slider", name="Score threshold")
        thumb.focus()
        thumb.press("Home")  # 0.50 -> 0.00 in one key press (45 arrow presses made 45 reruns)
        at_low = wait_count_change(page, at_default)
        assert at_low != at_default, f"count stayed at {at_default} after moving the score slider to 0"
        assert at_low > at_default
        page.get_by_text("network not re-run").first.wait_for(timeout=30_000)
        page.set_viewport_size({"width": 1400, "height": 2200})
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "detect.png"), full_page=True)
        page.set_viewport_size({"width": 1400, "height": 1000})

        page.get_by_role("link", name="Inspect").first.click()
        page.get_by_text("10 Where the time went").first.wait_for(timeout=60_000)
        page.get_by_text("Kept (proposals)").first.wait_for(timeout=30_000)
        # Streamlit scrolls inside its own container: a tall viewport gets the whole page in the picture.
        page.set_viewport_size({"width": 1400, "height": 7000})
        page.wait_for_timeout(1500)
        page.screenshot(path=str(ARTIFACTS / "inspect.png"), full_page=True)
        assert not page.get_by_text("Traceback").count()
        assert not errors, errors
    finally:
        page.close()


def test_finetune_run_from_the_browser_shows_its_loss_curve(server, browser):
    """Start a short real training run (the train CLI in the background) and watch its loss curve."""
    url, tmp = server
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        page.goto(f"{url}/finetune", wait_until="domcontentloaded")
        steps = page.get_by_label("Steps")
        steps.wait_for(timeout=60_000)
        steps.fill("4")
        steps.press("Enter")
        batch = page.get_by_label("Batch size")
        batch.fill("2")
        batch.press("Enter")
        validations = page.get_by_role("spinbutton", name="Validations per run")  # once, at the end
        validations.fill("0")
        validations.press("Enter")
        page.get_by_text("Estimated training time").first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Start fine-tuning").click()
        # the loss chart is drawn from metrics.jsonl while (or once) the job runs
        page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
        page.get_by_text("New checkpoint").first.wait_for(timeout=180_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "finetune.png"), full_page=True)
        assert list((tmp / "runs").glob("finetune-*/checkpoint.pt")), "the run wrote no checkpoint"
        assert not page.get_by_text("Traceback").count()
        assert not errors, errors
    finally:
        page.close()


PAGE_TITLES = {"detect": "Detect", "inspect": "Inspect", "finetune": "Fine-tune", "evaluate": "Evaluate"}


def test_every_page_answers_at_its_own_link(server, browser):
    """Once `/detect` answered "Page not found": the default page was served at `/` only."""
    url, _ = server
    for path, title in PAGE_TITLES.items():
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{url}/{path}", wait_until="domcontentloaded")
            page.locator("h1").filter(has_text=title).first.wait_for(timeout=60_000)
            page.wait_for_timeout(500)  # the "Page not found" dialog comes with the first run
            assert not page.get_by_text("Page not found").count(), path
            assert page.url == f"{url}/{path}"
        finally:
            page.close()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(url, wait_until="domcontentloaded")
        detection_count(page)
        assert page.url == f"{url}/detect"  # the root opens Detect at its own link
        assert not page.get_by_text("Page not found").count()
    finally:
        page.close()


def slider_value(page, label: str) -> float:
    return float(page.get_by_role("slider", name=label).first.input_value())  # an <input type="range">


def move_slider(page, label: str, presses: int) -> None:
    """Arrow keys: one step per press (negative: to the left)."""
    thumb = page.get_by_role("slider", name=label).first
    thumb.focus()
    for _ in range(abs(presses)):
        thumb.press("ArrowRight" if presses > 0 else "ArrowLeft")


def toggle_states(page, labels) -> dict[str, bool]:
    return {label: page.get_by_role("switch", name=label).first.is_checked() for label in labels}


def flip_toggle(page, label: str) -> None:
    # the switch itself is a visually hidden input: click its label, as a user does
    page.locator("label").filter(has=page.get_by_role("switch", name=label)).first.click()


def open_page(page, name: str, title: str) -> None:
    page.get_by_role("link", name=name).first.click()
    page.locator("h1").filter(has_text=title).first.wait_for(timeout=60_000)


def test_shared_controls_and_detections_survive_a_walk_through_every_page(server, browser):
    """Detect → Inspect → Fine-tune → Evaluate → Detect: every control shared between pages keeps its value
    (a change made on Inspect included) and Detect shows the same detections."""
    url, _ = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        page.goto(url, wait_until="domcontentloaded")
        at_default = detection_count(page)
        move_slider(page, "Score threshold", -45)  # 0.50 -> 0.05: detections for Inspect to follow
        count = wait_count_change(page, at_default)
        move_slider(page, "NMS IoU (per class)", 4)  # 0.50 -> 0.70
        move_slider(page, "Max detections", -60)  # 100 -> 40
        move_slider(page, "Mask opacity", 3)  # 0.50 -> 0.65
        for label in ("Labels", "Outlines"):
            flip_toggle(page, label)
        page.wait_for_timeout(1500)
        count = detection_count(page)
        expected = {label: slider_value(page, label) for label in
                    ("Score threshold", "NMS IoU (per class)", "Max detections", "Mask opacity", "Mask threshold")}
        assert expected == {"Score threshold": 0.05, "NMS IoU (per class)": 0.7, "Max detections": 40,
                            "Mask opacity": 0.65, "Mask threshold": 0.5}
        toggles = toggle_states(page, ("Masks", "Boxes", "Labels", "Outlines", "RPN proposals overlay"))
        assert toggles == {"Masks": True, "Boxes": True, "Labels": False, "Outlines": True,
                           "RPN proposals overlay": False}

        open_page(page, "Inspect", "Inspect")
        page.get_by_text("9 Masks").first.wait_for(timeout=60_000)
        assert slider_value(page, "Mask threshold") == 0.5
        page.get_by_text(re.compile(r"pixels above 0\.50")).first.wait_for(timeout=30_000)
        move_slider(page, "Mask threshold", 2)  # 0.50 -> 0.60, to be seen on Detect
        page.get_by_text(re.compile(r"pixels above 0\.60")).first.wait_for(timeout=30_000)
        expected["Mask threshold"] = 0.6

        open_page(page, "Fine-tune", "Fine-tune")
        open_page(page, "Evaluate", "Evaluate")
        open_page(page, "Detect", "Detect")
        assert detection_count(page) == count
        page.wait_for_timeout(1000)
        assert {label: slider_value(page, label) for label in expected} == expected
        assert toggle_states(page, toggles) == toggles
        assert detection_count(page) == count  # not re-drawn from defaults after a late rerun
        assert not page.get_by_text("Traceback").count()
        assert not errors, errors
    finally:
        page.close()


def test_add_a_model_from_the_sidebar_and_detect_with_it(server, browser):
    """Upload a checkpoint under a hostile name, name its classes, add it: it is picked and detects."""
    url, tmp = server
    upload = tmp / "upload.pt"
    save_checkpoint(upload, TINY_LIGHT, CATEGORIES, tiny_loaded(seed=3).model.state_dict())
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        page.goto(f"{url}/detect", wait_until="domcontentloaded")
        detection_count(page)
        sidebar = page.locator('[data-testid="stSidebar"]')
        sidebar.get_by_text("Add a model").first.click()
        sidebar.locator('input[type="file"]').set_input_files(
            files=[{"name": "../../my-shapes.pt", "mimeType": "application/octet-stream",
                    "buffer": upload.read_bytes()}])
        sidebar.get_by_label("Class names, comma-separated").fill("disc, box, wedge")
        sidebar.get_by_label("Class names, comma-separated").press("Enter")
        page.wait_for_timeout(500)
        sidebar.get_by_role("button", name="Add", exact=True).click()
        sidebar.get_by_text(re.compile(r"Added my-shapes")).first.wait_for(timeout=60_000)
        detection_count(page)  # the page runs the new model
        assert not page.get_by_text("No model loaded").count()
        assert [p.name[:9] for p in (tmp / "models").iterdir()] == ["imported-"] * 2
        assert not (tmp.parent / "my-shapes.pt").exists()
        assert not page.get_by_text("Traceback").count()
        assert not errors, errors
    finally:
        page.close()


def save_doc_image(png: bytes, name: str, width: int = 800) -> None:
    """A README screenshot: scaled to ``width`` and reduced to 128 colours (under 150 kB)."""
    import io

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    DOC_IMAGES.mkdir(parents=True, exist_ok=True)
    image.quantize(128).save(DOC_IMAGES / name, optimize=True)


def test_compare_two_models_and_open_a_shared_link_in_a_fresh_browser(server, browser):
    """Detect compares the sidebar's model with a second one; its "Copy link" opened in a new browser
    context (no cookies, a new session) shows the same detections, sliders and comparison."""
    url, _ = server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    fresh = None
    try:
        page.goto(f"{url}/detect", wait_until="domcontentloaded")
        at_default = detection_count(page)
        move_slider(page, "Score threshold", -22)  # 0.50 -> 0.28: a few detections of the random-weight models
        count = wait_count_change(page, at_default)
        move_slider(page, "Mask opacity", 4)  # 0.50 -> 0.70
        page.get_by_text("Compare with another model").first.scroll_into_view_if_needed()
        page.get_by_role("combobox", name="Compare with").first.click()
        page.get_by_role("option", name=re.compile(f"run {COMPARE_RUN}")).first.click()
        matched = page.get_by_text(re.compile(r"\d+ matched \(same class")).first
        matched.wait_for(timeout=60_000)
        summary = matched.inner_text().split(" · ")[0]
        page.set_viewport_size({"width": 1400, "height": 2600})  # the whole section in sight
        page.wait_for_timeout(1000)
        top = page.get_by_text("Compare with another model").first.bounding_box()
        table = page.locator('[data-testid="stDataFrame"]').last.bounding_box()  # matched / only A / only B
        save_doc_image(page.screenshot(clip={"x": top["x"] - 8, "y": top["y"] - 8, "width": table["width"] + 16,
                                             "height": table["y"] + table["height"] - top["y"] + 16}), "compare.png")

        page.get_by_role("button", name="Copy link").first.click()
        code = page.locator('[data-testid="stCode"] code').filter(has_text="/detect?").first
        code.wait_for(timeout=30_000)
        link = code.inner_text().strip()
        assert link.startswith(f"{url}/detect?model=shapes&") and "compare=" in link, link
        page.wait_for_timeout(500)
        save_doc_image(page.locator('[data-testid="stPopoverBody"]').first.screenshot(), "share.png", width=700)
        expected = {label: slider_value(page, label) for label in ("Score threshold", "Mask opacity")}
        assert expected == {"Score threshold": 0.28, "Mask opacity": 0.7}

        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        fresh = context.new_page()
        fresh.on("pageerror", lambda err: errors.append(str(err)))
        fresh.goto(link, wait_until="domcontentloaded")
        assert detection_count(fresh) == count
        fresh.get_by_text(summary).first.wait_for(timeout=60_000)  # B ran, and the same pairs matched
        assert {label: slider_value(fresh, label) for label in expected} == expected
        assert not fresh.get_by_text("Traceback").count()
        assert not errors, errors
    finally:
        page.close()
        if fresh is not None:
            fresh.context.close()
