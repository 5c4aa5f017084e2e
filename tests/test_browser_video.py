"""A clip in a real browser: upload a short generated clip on Detect, wait for every frame to be processed,
scrub to a frame with the keyboard and see that frame's detection count (computed here with the same
weights and code). Uses tests/browser_app.py's server and browser, shared with tests/test_browser.py; a
screenshot goes to test-artifacts/.
"""
from __future__ import annotations

import re

from mrcnn.data.video import open_clip
from mrcnn.inference.structures import Thresholds
from mrcnn.inference.video import detect_frames
from mrcnn.model.zoo import load_model
from tests.browser_app import BROWSER_MARKS, detection_count, press_keys, screenshot, wait_count
from tests.browser_app import tab  # noqa: F401 - the fixture: the browser tests' shared page
from tests.test_video import encode, scenes

FRAMES, TARGET = 4, 3
SCORE = Thresholds(score_thresh=0.27)  # the random-weight model's class scores sit around 0.25
pytestmark = BROWSER_MARKS


def test_upload_a_clip_scrub_to_a_frame_and_see_its_detections(server, tab):
    url, tmp = server
    clip_path = tmp / "walk.mp4"
    clip_path.write_bytes(encode(scenes(FRAMES)))
    # the precision the app runs by default (auto: bfloat16 on a CPU with bf16 units), or counts near the
    # threshold differ by one
    loaded = load_model(str(tmp / "weights" / "shapes.pt"), device="cpu", precision="auto")
    expected = [len(r.detections) for r in detect_frames(loaded, open_clip(clip_path), SCORE)]

    page, errors = tab.page, tab.errors
    page.goto(url, wait_until="domcontentloaded")
    detection_count(page)  # the starting sample scene
    # 0.50 -> 0.30 -> 0.27, before the clip is processed
    press_keys(page, "Score threshold", "PageDown", "PageDown", *["ArrowLeft"] * 3)
    page.get_by_text("0.27").first.wait_for(timeout=30_000)

    page.locator('[data-testid="stMain"] input[type="file"]').first.set_input_files(str(clip_path))
    page.get_by_text(re.compile(rf"Frame 1 of {FRAMES} ")).first.wait_for(timeout=120_000)
    assert detection_count(page) == expected[0]

    press_keys(page, "Frame", *["ArrowRight"] * TARGET)
    page.get_by_text(re.compile(rf"Frame {TARGET + 1} of {FRAMES} ")).first.wait_for(timeout=30_000)
    # the frame's count follows its caption; a wrong one is the last read after 30 s
    assert wait_count(page, lambda count: count == expected[TARGET]) == expected[TARGET], expected
    screenshot(page, "detect-clip.png", height=1800)
    assert not page.get_by_text("Traceback").count()
    assert not errors, errors
