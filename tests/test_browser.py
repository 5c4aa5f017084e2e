"""End to end in a real browser: `streamlit run app.py` on 127.0.0.1 driven by Debian's chromium
through Python Playwright (never a downloaded browser); the server and browser are tests/browser_app.py's.

Uploads an image, waits for the detections, moves the score slider with the keyboard and sees the
count change, opens Inspect; compares two models and opens a shared link in a fresh browser. Screenshots
go to test-artifacts/ (and the README's to docs/images/). Skipped when /usr/bin/chromium is
missing (CI installs it: apt-get install chromium).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from PIL import Image

from mrcnn.model.checkpoint import save_checkpoint
from tests.browser_app import (ARTIFACTS, BROWSER_MARKS, CHROMIUM, COMPARE_RUN, ROOT, detection_count, new_page,
                               pick_file_named, press_keys, screenshot, script_runs, settle, slider_value,
                               wait_count, wait_count_change, wait_for_idle, wait_for_rerun)
from tests.browser_app import tab  # noqa: F401 - the fixture: the browser tests' shared page
from tests.helpers import CATEGORIES, TINY_LIGHT, scene, tiny_loaded

# The README's screenshots are rewritten only when asked (MRCNN_DOC_IMAGES=1): a test run changes no tracked file,
# and takes its pictures of them as they come, to test-artifacts/.
MAKING_DOC_IMAGES = os.environ.get("MRCNN_DOC_IMAGES") == "1"
DOC_IMAGES = ROOT / "docs" / "images" if MAKING_DOC_IMAGES else ARTIFACTS

# CI sets MRCNN_REQUIRE_BROWSER=1: there a missing browser is a failure, not a skip.
if not Path(CHROMIUM).exists() and os.environ.get("MRCNN_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"{CHROMIUM} is missing and MRCNN_REQUIRE_BROWSER=1 (apt-get install chromium)")
pytestmark = BROWSER_MARKS


def test_upload_detect_slide_and_inspect(server, tab):
    url, tmp = server
    image = tmp / "upload.png"
    Image.fromarray(scene(150, 200, seed=7)).save(image)
    page, errors = tab.page, tab.errors
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
    screenshot(page, "detect.png", height=2200)

    page.get_by_role("link", name="Inspect").first.click()
    page.get_by_text("10 Where the time went").first.wait_for(timeout=60_000)
    page.get_by_text("Kept (proposals)").first.wait_for(timeout=30_000)
    screenshot(page, "inspect.png", height=7000)
    assert not page.get_by_text("Traceback").count()
    assert not errors, errors


def test_finetune_run_from_the_browser_shows_its_loss_curve(server, tab):
    """Start a short real training run (the train CLI in the background) and watch its loss curve. The form's
    smallest settings keep it quick: 2 steps of 1 image at 128 px, validated once (40 scenes) at the end."""
    url, tmp = server
    page, errors = tab.page, tab.errors
    page.set_viewport_size({"width": 1400, "height": 1400})
    page.goto(f"{url}/finetune", wait_until="domcontentloaded")
    steps = page.get_by_label("Steps")
    steps.wait_for(timeout=60_000)
    steps.fill("2")
    steps.press("Enter")
    batch = page.get_by_label("Batch size")
    batch.fill("1")
    batch.press("Enter")
    press_keys(page, "Image size", "Home")  # 256 -> 128 px: the run and its validation scenes
    validations = page.get_by_role("spinbutton", name="Validations per run")  # once, at the end
    validations.fill("0")
    validations.press("Enter")
    page.get_by_text("Estimated training time").first.wait_for(timeout=30_000)
    page.get_by_role("button", name="Start fine-tuning").click()
    # the loss chart is drawn from metrics.jsonl while (or once) the job runs
    page.locator(".js-plotly-plot").first.wait_for(timeout=120_000)
    page.get_by_text("New checkpoint").first.wait_for(timeout=180_000)
    screenshot(page, "finetune.png")
    assert list((tmp / "runs").glob("finetune-*/checkpoint.pt")), "the run wrote no checkpoint"
    assert '"image_size": 128' in next((tmp / "runs").glob("finetune-*/config.json")).read_text()
    assert not page.get_by_text("Traceback").count()
    assert not errors, errors


PAGE_TITLES = {"detect": "Detect", "inspect": "Inspect", "finetune": "Fine-tune", "evaluate": "Evaluate"}


def toggle_states(page, labels) -> dict[str, bool]:
    return {label: page.get_by_role("switch", name=label).first.is_checked() for label in labels}


def flip_toggle(page, label: str) -> None:
    # the switch itself is a visually hidden input: click its label, as a user does
    page.locator("label").filter(has=page.get_by_role("switch", name=label)).first.click()


def open_page(page, url: str, path: str) -> None:
    """Through the page's own navigation link: the page comes, at its own address."""
    page.get_by_role("link", name=PAGE_TITLES[path]).first.click()
    page.locator("h1").filter(has_text=PAGE_TITLES[path]).first.wait_for(timeout=60_000)
    page.wait_for_url(f"{url}/{path}", timeout=30_000)


def open_link(page, url: str, path: str) -> None:
    """Typed into the address bar (a new session): the page answers there, not "Page not found".
    Once `/detect` answered "Page not found": the default page was served at `/` only."""
    page.goto(f"{url}/{path}", wait_until="domcontentloaded")
    page.locator("h1").filter(has_text=PAGE_TITLES[path]).first.wait_for(timeout=60_000)
    # the "Page not found" dialog comes with the first run, before its page: in once the run has ended, or
    # (a long run, Inspect's) half a second after the page's title (seen 0.05-0.5 s before it)
    try:
        wait_for_idle(page, timeout=0.5)
    except Exception:  # noqa: BLE001 - Playwright's TimeoutError: a run longer than that
        pass
    assert not page.get_by_text("Page not found").count(), path
    assert page.url == f"{url}/{path}"


def test_shared_controls_and_detections_survive_a_walk_through_every_page(server, tab):
    """Detect → Inspect → Fine-tune → Evaluate → Detect: every control shared between pages keeps its value
    (a change made on Inspect included), Detect shows the same detections, and each page is at its own
    address. Then every page answers at its own link, opened directly, as the root does with Detect."""
    url, _ = server
    page, errors = tab.page, tab.errors
    page.goto(url, wait_until="domcontentloaded")
    at_default = detection_count(page)
    assert page.url == f"{url}/detect"  # the root opens Detect at its own link
    assert not page.get_by_text("Page not found").count()
    # 0.50 -> 0.00 -> 0.05: detections for Inspect to follow
    press_keys(page, "Score threshold", "Home", *["ArrowRight"] * 5)
    wait_count_change(page, at_default)
    press_keys(page, "NMS IoU (per class)", "PageUp", "PageUp")  # 0.50 -> 0.70 (a page: a tenth of the range)
    press_keys(page, "Max detections", "PageDown", "PageDown")  # 100 -> 40 (pages of 30)
    press_keys(page, "Mask opacity", "PageUp", "ArrowRight")  # 0.50 -> 0.65
    flip_toggle(page, "Labels")
    runs = script_runs(page)
    flip_toggle(page, "Outlines")
    # the presses' reruns may lag behind the keys: once the last one's run has ended, this count is the
    # one of every setting above
    wait_for_rerun(page, runs)
    count = wait_count(page, lambda n: n <= 40)
    assert count <= 40, "Max detections 40 did not cap the count"
    expected = {label: slider_value(page, label) for label in
                ("Score threshold", "NMS IoU (per class)", "Max detections", "Mask opacity", "Mask threshold")}
    assert expected == {"Score threshold": 0.05, "NMS IoU (per class)": 0.7, "Max detections": 40,
                        "Mask opacity": 0.65, "Mask threshold": 0.5}
    toggles = toggle_states(page, ("Masks", "Boxes", "Labels", "Outlines", "RPN proposals overlay"))
    assert toggles == {"Masks": True, "Boxes": True, "Labels": False, "Outlines": True,
                       "RPN proposals overlay": False}

    open_page(page, url, "inspect")
    page.get_by_text("9 Masks").first.wait_for(timeout=60_000)
    assert slider_value(page, "Mask threshold") == 0.5
    page.get_by_text(re.compile(r"pixels above 0\.50")).first.wait_for(timeout=30_000)
    press_keys(page, "Mask threshold", "PageUp")  # 0.50 -> 0.60, to be seen on Detect
    page.get_by_text(re.compile(r"pixels above 0\.60")).first.wait_for(timeout=30_000)
    expected["Mask threshold"] = 0.6

    open_page(page, url, "finetune")
    open_page(page, url, "evaluate")
    open_page(page, url, "detect")
    assert detection_count(page) == count
    wait_for_idle(page, quiet_ms=500)  # a rerun the page's first run would set off has come and gone
    assert {label: slider_value(page, label) for label in expected} == expected
    assert toggle_states(page, toggles) == toggles
    assert detection_count(page) == count  # not re-drawn from defaults after a late rerun
    assert not page.get_by_text("Traceback").count()

    for path in PAGE_TITLES:
        open_link(page, url, path)
        assert not page.get_by_text("Traceback").count(), path
    assert not errors, errors


def test_add_a_model_from_the_sidebar_and_detect_with_it(server, tab):
    """Upload a checkpoint under a hostile name, name its classes, add it: it is picked and detects."""
    url, tmp = server
    upload = tmp / "upload.pt"
    save_checkpoint(upload, TINY_LIGHT, CATEGORIES, tiny_loaded(seed=3).model.state_dict(), half=True)  # 10 MB
    page, errors = tab.page, tab.errors
    page.set_viewport_size({"width": 1400, "height": 1200})
    page.goto(f"{url}/detect", wait_until="domcontentloaded")
    detection_count(page)
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.get_by_text("Add a model").first.click()
    pick_file_named(page, sidebar.locator('input[type="file"]'), upload, "../../my-shapes.pt")
    sidebar.get_by_label("Class names, comma-separated").fill("disc, box, wedge")
    runs = script_runs(page)
    sidebar.get_by_label("Class names, comma-separated").press("Enter")
    wait_for_rerun(page, runs)  # the names are in the page's state before Add is pressed
    sidebar.get_by_role("button", name="Add", exact=True).click()
    sidebar.get_by_text(re.compile(r"Added my-shapes")).first.wait_for(timeout=60_000)
    detection_count(page)  # the page runs the new model
    assert not page.get_by_text("No model loaded").count()
    assert [p.name[:9] for p in (tmp / "models").iterdir()] == ["imported-"] * 2
    assert not (tmp.parent / "my-shapes.pt").exists()
    assert not page.get_by_text("Traceback").count()
    assert not errors, errors


def settle_for_doc_image(page, wait_ms: int) -> None:
    """Until what is to be pictured is drawn; for the README, ``wait_ms`` more, to the last pixel (tables'
    canvases, a popover's fade)."""
    settle(page)
    if MAKING_DOC_IMAGES:
        page.wait_for_timeout(wait_ms)


def save_doc_image(png: bytes, name: str, width: int = 800) -> None:
    """A README screenshot: scaled to ``width`` and reduced to 128 colours (under 150 kB); in test-artifacts/
    as it is."""
    import io

    if not MAKING_DOC_IMAGES:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / name).write_bytes(png)
        return
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    DOC_IMAGES.mkdir(parents=True, exist_ok=True)
    image.quantize(128).save(DOC_IMAGES / name, optimize=True)


def test_compare_two_models_and_open_a_shared_link_in_a_fresh_browser(server, browser, tab):
    """Detect compares the sidebar's model with a second one; its "Copy link" opened in a new browser
    context (no cookies, a new session) shows the same detections, sliders and comparison."""
    url, _ = server
    page, errors = tab.page, tab.errors
    page.goto(f"{url}/detect", wait_until="domcontentloaded")
    at_default = detection_count(page)
    # 0.50 -> 0.30 -> 0.28: a few detections of the random-weight models
    press_keys(page, "Score threshold", "PageDown", "PageDown", "ArrowLeft", "ArrowLeft")
    wait_count_change(page, at_default)
    press_keys(page, "Mask opacity", "PageUp", "PageUp")  # 0.50 -> 0.70
    page.get_by_text("Compare with another model").first.scroll_into_view_if_needed()
    page.get_by_role("combobox", name="Compare with").first.click()
    page.get_by_role("option", name=re.compile(f"run {COMPARE_RUN}")).first.click()
    matched = page.get_by_text(re.compile(r"\d+ matched \(same class")).first
    matched.wait_for(timeout=60_000)
    summary = matched.inner_text().split(" · ")[0]
    count = detection_count(page)  # drawn with the comparison, after every score key's rerun
    page.set_viewport_size({"width": 1400, "height": 2600})  # the whole section in sight
    settle_for_doc_image(page, 1000)
    top = page.get_by_text("Compare with another model").first.bounding_box()
    table = page.locator('[data-testid="stDataFrame"]').last.bounding_box()  # matched / only A / only B
    save_doc_image(page.screenshot(clip={"x": top["x"] - 8, "y": top["y"] - 8, "width": table["width"] + 16,
                                         "height": table["y"] + table["height"] - top["y"] + 16}), "compare.png")

    page.get_by_role("button", name="Copy link").first.click()
    code = page.locator('[data-testid="stCode"] code').filter(has_text="/detect?").first
    code.wait_for(timeout=30_000)
    link = code.inner_text().strip()
    assert link.startswith(f"{url}/detect?model=shapes&") and "compare=" in link, link
    settle_for_doc_image(page, 500)
    save_doc_image(page.locator('[data-testid="stPopoverBody"]').first.screenshot(), "share.png", width=700)
    expected = {label: slider_value(page, label) for label in ("Score threshold", "Mask opacity")}
    assert expected == {"Score threshold": 0.28, "Mask opacity": 0.7}

    fresh = new_page(browser, errors=errors)  # a browser context of its own
    try:
        fresh.goto(link, wait_until="domcontentloaded")
        assert detection_count(fresh) == count
        fresh.get_by_text(summary).first.wait_for(timeout=60_000)  # B ran, and the same pairs matched
        assert {label: slider_value(fresh, label) for label in expected} == expected
        assert not fresh.get_by_text("Traceback").count()
    finally:
        fresh.close()
    assert not errors, errors
