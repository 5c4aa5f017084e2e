"""Detect's picture (ui/overlay_view.py): what the browser gets, what the page sends ahead, and in chromium the
hover, the zoom and the picture shown on the key press itself.

The browser tests use tests/browser_app.py's server and browser (one of each for every browser test file).
"""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from mrcnn.inference.structures import Detections
from mrcnn.model.checkpoint import save_checkpoint
from tests.browser_app import BROWSER_MARKS, detection_count, script_runs, wait_for_idle, wait_for_rerun
from tests.browser_app import tab  # noqa: F401 - the fixture: the browser tests' shared page
from tests.helpers import CATEGORIES, TINY_LIGHT, app_folders, nested_detections, scene, tiny_loaded
from ui import overlay_view

APP = str(Path(__file__).resolve().parent.parent / "app.py")
PICTURE = '[data-testid="stMain"] img.mrcnn-ov-picture'
VIEW = '[data-testid="stMain"] .mrcnn-ov'


def in_browser(test):
    """The browser tests' marks (their xdist group, skipped without chromium) on this test only."""
    for mark in BROWSER_MARKS:
        test = mark(test)
    return test


def points(region: dict) -> np.ndarray:
    return np.array([[float(v) for v in p.split(",")] for p in region["points"].split()])


def picture_size(src: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size


# ---- what the browser gets ----------------------------------------------------------------------------------
def test_one_outline_per_instance_smallest_on_top_with_its_numbers():
    dets = nested_detections(3)
    data = overlay_view.view_data(np.zeros((60, 80, 3), np.uint8), dets, highlight=1, image_key="img")
    assert (data["width"], data["height"]) == (80, 60)
    assert [r["index"] for r in data["regions"]] == [2, 1, 0]  # drawn last = on top: the smallest gets the hover
    first = next(r for r in data["regions"] if r["index"] == 0)
    assert first["lines"] == ["#0 circle", "score 0.900", "box [5, 5, 40, 30]", f"area {int(dets.masks[0].sum())} px"]
    # the outline follows the mask's pixel edges: x 5..39, y 5..29 -> -0.5 .. +0.5 around them
    xy = points(first)
    assert xy[:, 0].min() == 4.5 and xy[:, 0].max() == 39.5 and xy[:, 1].min() == 4.5 and xy[:, 1].max() == 29.5
    assert [r["chosen"] for r in data["regions"]] == [False, True, False]


def test_without_detections_the_picture_alone():
    empty = Detections.empty(CATEGORIES, (60, 80), with_masks=False)
    data = overlay_view.view_data(np.zeros((60, 80, 3), np.uint8), empty)
    assert data["regions"] == [] and data["src"].startswith("data:image/png;base64,")
    assert data["shown_height"] == overlay_view.SHOWN_HEIGHT[0]  # a small picture is shown larger


def test_a_large_picture_is_sent_shrunk_and_its_outlines_stay_in_its_own_pixels():
    h, w = 1000, 3300
    dets = Detections(np.array([[3000, 900, 3200, 990]], np.float32), np.array([0.8], np.float32),
                      np.array([1]), None, np.array([0]), CATEGORIES, (h, w))
    data = overlay_view.view_data(np.zeros((h, w, 3), np.uint8), dets)
    assert picture_size(data["src"]) == (1100, 333)
    assert (data["width"], data["height"]) == (w, h)
    assert points(data["regions"][0]).max(axis=0).tolist() == [3200, 990]  # the box, no mask


def test_the_signature_changes_with_what_is_shown():
    image = np.zeros((60, 80, 3), np.uint8)
    dets = nested_detections(3)
    same = overlay_view.view_data(image, dets, highlight=1, image_key="a")["signature"]
    assert overlay_view.view_data(image, dets, highlight=1, image_key="a")["signature"] == same
    assert overlay_view.view_data(image, dets, highlight=2, image_key="a")["signature"] != same
    assert overlay_view.view_data(image, dets, highlight=1, image_key="b")["signature"] != same
    assert overlay_view.view_data(image + 40, dets, highlight=1, image_key="a")["signature"] != same


# ---- the Detect page, headless ----------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path, monkeypatch):
    """The app's folders with a tiny random-weight shapes.pt."""
    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(checkpoint, TINY_LIGHT, CATEGORIES, tiny_loaded(seed=0).model.state_dict(),
                    {"data": "random weights (test)"}, half=True)
    with app_folders(tmp_path, monkeypatch, checkpoint) as folder:
        yield folder


def component_data(at: AppTest, key: str) -> dict:
    element = next(e for e in at.get("bidi_component") if e.proto.id.endswith(f"-{key}"))
    return json.loads(element.proto.json)


def test_detect_sends_ahead_the_pictures_its_next_score_steps_show(env, monkeypatch):
    monkeypatch.setattr(overlay_view, "AHEAD_MAX_INSTANCES", 1000)  # random weights: many instances at 0.05
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.slider(key="score_thresh").set_value(0.05).run()
    assert not at.exception, at.exception
    shown = component_data(at, "overlay")
    count = int(re.search(r"### (\d+) detections", "\n".join(m.value for m in at.markdown)).group(1))
    assert len(shown["regions"]) == count
    ahead = component_data(at, "overlay_next")["next"]
    assert ahead["slider"] == "Score threshold" and ahead["shown"] == shown["signature"]
    assert sorted(ahead["pictures"]) == ["0.04", "0.06"]
    for value in ("0.06", "0.04"):  # what the page then draws is the very picture sent ahead
        at.slider(key="score_thresh").set_value(float(value)).run()
        assert component_data(at, "overlay") == ahead["pictures"][value]
        at.slider(key="score_thresh").set_value(0.05).run()
    assert "network not re-run" in "\n".join(c.value for c in at.caption)



def test_no_pictures_are_sent_ahead_for_a_picture_of_many_instances(env, monkeypatch):
    """Two more draws per press are worth it only while a draw is cheap (ui.overlay_view.AHEAD_MAX_INSTANCES)."""
    monkeypatch.setattr(overlay_view, "AHEAD_MAX_INSTANCES", 2)
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.slider(key="score_thresh").set_value(0.05).run()
    assert not at.exception, at.exception
    assert len(component_data(at, "overlay")["regions"]) > 2  # the picture itself is drawn as ever
    assert component_data(at, "overlay_next")["next"]["pictures"] == {}

# ---- in chromium ----------------------------------------------------------------------------------------
def open_detect(server, page, score: str = "0.05"):
    url, tmp = server
    image = tmp / "overlay-view.png"
    Image.fromarray(scene(150, 200, seed=3)).save(image)
    page.goto(f"{url}/detect?score_thresh={score}", wait_until="domcontentloaded")
    detection_count(page)
    page.locator('[data-testid="stMain"] input[type="file"]').first.set_input_files(str(image))
    page.get_by_text(re.compile(r"overlay-view\.png · 200×150 px")).first.wait_for(timeout=60_000)
    page.locator(PICTURE).first.wait_for(timeout=60_000)
    page.locator(PICTURE).first.scroll_into_view_if_needed()


# A point inside an instance's outline where that outline is the topmost element (in page pixels), and its index.
TOPMOST_POINT = """() => {
  const polygons = [...document.querySelectorAll('.mrcnn-ov-regions polygon')].reverse();
  for (const p of polygons) {
    const box = p.getBBox(), ctm = p.getScreenCTM();
    for (let fy = 0.5; fy < 1; fy += 0.1) for (let fx = 0.5; fx < 1; fx += 0.1) {
      const svgPoint = new DOMPoint(box.x + box.width * fx, box.y + box.height * fy);
      if (!p.isPointInFill(svgPoint)) continue;
      const screen = svgPoint.matrixTransform(ctm);
      if (document.elementFromPoint(screen.x, screen.y) === p) return [screen.x, screen.y, p.dataset.index];
    }
  }
  return null;
}"""


@in_browser
def test_hover_names_the_instance_and_the_picture_zooms(server, tab):
    page = tab.page
    open_detect(server, page, "0.00")  # every candidate: random weights score low
    assert detection_count(page) > 0
    point = page.evaluate(TOPMOST_POINT)
    assert point is not None, "no instance outline can be hovered"
    x, y, index = point
    page.mouse.move(x, y)
    tip = page.locator(".mrcnn-ov-tip")
    tip.wait_for(state="visible", timeout=10_000)
    assert re.match(rf"#{index} \w+\s+score \d\.\d{{3}}\s+box \[", tip.inner_text())

    view = page.locator(VIEW).first
    box = view.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -400)  # scroll up: zoom in around the cursor
    page.wait_for_function(f"document.querySelector('{VIEW}').dataset.zoom > 1.5", timeout=10_000)
    page.mouse.dblclick(box["x"] + 10, box["y"] + 10)
    page.wait_for_function(f"document.querySelector('{VIEW}').dataset.zoom === '1.000'", timeout=10_000)
    # a rectangle a quarter of the picture wide zooms in about four times
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + 20 + box["width"] / 4, box["y"] + 20 + box["height"] / 4, steps=5)
    page.mouse.up()
    zoom = float(view.get_attribute("data-zoom"))
    assert 3.5 < zoom < 4.5, zoom
    assert page.locator(PICTURE).first.evaluate("img => img.complete && img.naturalWidth") == 200


WATCH_PICTURES = """() => {
  window.__pictures = [];
  const img = document.querySelector('%s');
  new MutationObserver(() => {
    const src = img.getAttribute('src');
    if (window.__pictures[window.__pictures.length - 1] !== src) window.__pictures.push(src);
  }).observe(img, {attributes: true, attributeFilter: ['src']});
}""" % PICTURE


@in_browser
def test_an_arrow_key_shows_the_picture_sent_ahead_and_the_rerun_keeps_it(server, tab):
    page = tab.page
    open_detect(server, page, "0.29")  # random weights score ~0.27-0.30: each step changes the picture
    page.locator(".mrcnn-ov-ahead").first.wait_for(state="attached", timeout=30_000)
    wait_for_idle(page)  # the upload's run, and the pictures it sent ahead, are in (and decoded)
    page.wait_for_timeout(150)
    changed = 0
    for key in ("ArrowRight", "ArrowLeft", "ArrowLeft"):
        page.evaluate(WATCH_PICTURES)
        before = page.locator(PICTURE).first.get_attribute("src")
        thumb = page.get_by_role("slider", name="Score threshold")
        thumb.focus()
        runs = script_runs(page)
        thumb.press(key)
        wait_for_rerun(page, runs)  # the rerun for the new score, and the pictures it sent ahead, are in
        # one new picture at most (none when the step changed nothing), shown from the pictures sent
        # ahead, and the rerun's is that same picture (it would be shown from the server otherwise)
        pictures = page.evaluate("window.__pictures")
        assert len(pictures) <= 1, f"{len(pictures)} pictures after one key press"
        assert (pictures or [before])[-1] == page.locator(PICTURE).first.get_attribute("src")
        if pictures:
            assert page.locator(VIEW).first.get_attribute("data-shown-from") == "ahead"
        assert page.locator(".mrcnn-ov-regions polygon").count() == detection_count(page)
        changed += len(pictures)
    assert changed, "no key press changed the picture: the test saw nothing sent ahead"
