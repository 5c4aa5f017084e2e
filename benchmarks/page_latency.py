"""The Detect page as a person feels it: from a score-slider key press to the new picture on screen, in
a real browser (Debian's /usr/bin/chromium through Python Playwright; nothing is downloaded).

    python benchmarks/page_latency.py                 # one line per model: median and every press, ms
    python benchmarks/page_latency.py --json --presses 20
    python benchmarks/page_latency.py --baseline /tmp/old-checkout     # the same presses, alternated, on both
    python benchmarks/page_latency.py --round-trip    # the picture from the server's rerun (see below)

`streamlit run app.py` on 127.0.0.1 with the bundled model (weights/shapes.pt) and an R50-FPN with random
weights made here (benchmarks/local_models.py). For each model: a 640×480 upload, the score threshold
set (by the page's link) where one more key press changes the detections, then Right and Left presses
in turn, so every press changes the picture. A press is timed inside the page: from the keydown to the
second animation frame after the overlay's picture changed and was decoded (the new picture painted).
Target (issue 17): median ≤ 100 ms for both models.

The page sends, with each picture, the pictures one score step either side (ui/overlay_view.py), so an
arrow-key press shows its picture without waiting for the server. ``--round-trip`` turns that off in the
page (``window.mrcnnOverlayAhead = false``): the picture then comes from the server's rerun, as it does for a
slider dragged with the mouse or any other control.

With ``--baseline`` a second server runs another checkout of the app and each press goes to both in turn, so
that load from other processes hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.local_models import R50_NAME, make_r50_models_dir  # noqa: E402
from mrcnn.data.shapes import generate_scene  # noqa: E402
from mrcnn.inference.structures import Thresholds  # noqa: E402
from mrcnn.inference.trace import run_trace  # noqa: E402
from mrcnn.model.zoo import load_model  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
PRESS_TIMEOUT_MS = 30_000
# Detect's picture: the overlay view's <img> (ui/overlay_view.py); a checkout from before it (--baseline)
# drew a plotly figure, whose picture is an SVG <image>.
OVERLAY = ('[data-testid="stMain"] img.mrcnn-ov-picture, '
           '[data-testid="stMain"] .js-plotly-plot image')

# In the page: the keydown time, then a promise for the moment the overlay shows another picture, painted:
# its src (an <img>) or href (an SVG <image>) changed, the picture decoded, then two animation frames.
ARM = """() => {
  const picture = () => document.querySelector(%r);
  const source = (el) => el ? (el.getAttribute('src') || el.getAttribute('href')) : null;
  const before = source(picture());
  window.__pressed = null;
  document.addEventListener('keydown', () => { window.__pressed = performance.now(); }, {capture: true, once: true});
  window.__shown = new Promise(resolve => {
    const obs = new MutationObserver(() => {
      const el = picture();
      if (window.__pressed === null || source(el) === null || source(el) === before) return;
      obs.disconnect();
      const decoded = el.decode ? el.decode().catch(() => {}) : Promise.resolve();
      decoded.then(() => requestAnimationFrame(() => requestAnimationFrame(
        () => resolve(performance.now() - window.__pressed))));
    });
    obs.observe(document.body, {subtree: true, childList: true, attributes: true,
                                attributeFilter: ['href', 'src']});
  });
}""" % OVERLAY


def test_image() -> np.ndarray:
    """640×480: a shapes scene (the bundled model finds things in it; the R50's weights are random)."""
    return np.ascontiguousarray(generate_scene(7, size=640).image[:480])


def boundary_threshold(name: str, image: np.ndarray) -> float:
    """A slider value t (0.01 steps) where t and t + 0.01 give different detections, both non-empty when
    possible: every press between them changes the picture. Found in the precision the app runs by default
    (auto): a float32 boundary of the bundled model was none in bfloat16, and every press waited forever."""
    trace = run_trace(load_model(name, device="cpu", precision="auto"), image, Thresholds(score_thresh=0.01))
    counts = {t: len(trace.refilter(Thresholds(score_thresh=t / 100))) for t in range(1, 99)}
    changes = [t for t in range(1, 98) if counts[t] != counts[t + 1]]
    if not changes:
        raise RuntimeError(f"{name}: no score threshold changes the detections on the test image")
    both = [t for t in changes if counts[t + 1] > 0]
    return (both or changes)[len(both or changes) // 2] / 100


def start_server(root: Path, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address",
         "127.0.0.1", "--server.headless", "true", "--server.fileWatcherType", "none",
         "--browser.gatherUsageStats", "false"],
        cwd=root, env=dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))),
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError("streamlit did not start in 120 s")


def open_detect(browser, url: str, name: str, threshold: float, upload: Path, round_trip: bool = False):
    """A Detect page on ``name`` with ``upload`` shown at the score ``threshold``."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    if round_trip:
        page.add_init_script("window.mrcnnOverlayAhead = false;")
    page.goto(f"{url}/detect?model={name}&score_thresh={threshold:.2f}", wait_until="domcontentloaded")
    page.locator("h3").filter(has_text="detections").first.wait_for(timeout=300_000)
    page.locator('[data-testid="stMain"] input[type="file"]').first.set_input_files(str(upload))
    page.get_by_text(f"{upload.name} · 640×480 px").first.wait_for(timeout=300_000)
    page.locator(OVERLAY).first.wait_for(timeout=60_000)
    return page


def press(page, key: str) -> float:
    """ms from the key press on the score slider to the new picture painted."""
    page.evaluate(ARM)
    page.get_by_role("slider", name="Score threshold").focus()
    page.keyboard.press(key)
    shown = page.evaluate("Promise.race([window.__shown, new Promise(r => setTimeout(() => r(null), %d))])"
                          % PRESS_TIMEOUT_MS)
    if shown is None:
        raise RuntimeError(f"the picture did not change within {PRESS_TIMEOUT_MS} ms of a {key} press")
    page.wait_for_timeout(300)  # let the page settle: presses a person makes are apart
    return shown


def measure(browser, urls: dict[str, str], name: str, threshold: float, upload: Path,
            presses: int, round_trip: bool = False) -> dict[str, list[float]]:
    """Presses alternated Right/Left on each server's page in turn; the first two bring each side's masks
    once and are not timed."""
    pages = {which: open_detect(browser, url, name, threshold, upload, round_trip) for which, url in urls.items()}
    times = {which: [] for which in urls}
    try:
        for k in range(presses + 2):
            for which, page in pages.items():
                shown = press(page, "ArrowRight" if k % 2 == 0 else "ArrowLeft")
                if k >= 2:
                    times[which].append(shown)
        return times
    finally:
        for page in pages.values():
            page.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presses", type=int, default=12)
    ap.add_argument("--models", default=f"shapes,{R50_NAME}")
    ap.add_argument("--baseline", type=Path, default=None, metavar="CHECKOUT",
                    help="another checkout of the app to measure alongside (e.g. from git archive)")
    ap.add_argument("--round-trip", action="store_true",
                    help="time the server's rerun alone: the page does not show the pictures sent ahead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="mrcnn-page-latency-"))
    names = args.models.split(",")
    from mrcnn.model.zoo import weights_dir

    env = dict(os.environ, MRCNN_RUNS_DIR=str(tmp / "runs"), TORCH_HOME=str(tmp / "torch"),
               MRCNN_WEIGHTS_DIR=str(weights_dir()), STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    if R50_NAME in names:
        env["MRCNN_MODELS_DIR"] = os.environ["MRCNN_MODELS_DIR"] = str(make_r50_models_dir(tmp))
    image = test_image()
    upload = tmp / "upload.png"
    Image.fromarray(image).save(upload)
    thresholds = {name: boundary_threshold(name, image) for name in names}
    roots = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    servers = {which: start_server(root, env, tmp / f"streamlit-{which}.log") for which, root in roots.items()}
    results = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                "--disable-gpu"])
            for name in names:
                times = measure(browser, {which: url for which, (_, url) in servers.items()}, name,
                                thresholds[name], upload, args.presses, args.round_trip)
                results[name] = {which: {"median_ms": round(statistics.median(t), 1),
                                         "presses_ms": [round(x) for x in t]}
                                 for which, t in times.items()}
                results[name]["threshold"] = thresholds[name]
                results[name]["round_trip"] = args.round_trip
            browser.close()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=20)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for name, r in results.items():
            for which in roots:
                mode = ", round trip" if args.round_trip else ""
                print(f"{name} ({which}{mode}): median {r[which]['median_ms']} ms (score {r['threshold']:.2f} <-> "
                      f"{r['threshold'] + 0.01:.2f}) {r[which]['presses_ms']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
