"""Many users on one server: 10 sessions, each uploading its own 800-px image to an R50 model (random
weights, made here), then stepping the score slider; the server-wide trace cache keeps them in budget.

    python benchmarks/many_sessions.py                    # one line per session, then the summary
    python benchmarks/many_sessions.py --json --budget-gb 1 --sessions 10

All sessions are AppTest sessions in this one process (as a Streamlit server runs sessions: threads of
one process sharing ``st.cache_resource``: the model and the trace cache). Reported: the process's peak
resident memory next to what it held with the model loaded (as the sessions load it) and before any session,
and after the first session's first run; the trace cache's budget and its bytes at the end, and what the
process holds at the end outside the cache and the model (the sessions' own state and pages, and what the
allocator keeps; the budget does not cover it); what the same traces would hold with no shared budget;
what a network run reserves in the budget for its working memory (bytes per input pixel: the
architecture's first guess, and the figure the runs measured; then the reservation for one of these
images); each session's slider-step latency (median of its steps; an AppTest
step re-runs the whole page, more than a browser's fragment re-run). The target: peak RSS under the budget
plus the process before sessions.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.local_models import R50_NAME, make_r50_models_dir  # noqa: E402
from mrcnn.inference.trace_cache import (architecture_bytes_per_pixel, input_pixels,  # noqa: E402
                                         resident_bytes, trace_nbytes)

# random R50 weights score every class about 1/91: steps around 0.01 bring detections in and out
STEPS = (0.01, 0.02, 0.01, 0.03, 0.01)


def photo(seed: int, h: int = 600, w: int = 800) -> bytes:
    """A different 800-px PNG per session: gradient background and random discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 40 + 20 * seed % 200)], -1)
    for _ in range(12):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(20, 150)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# Every figure in MB of 10^6 bytes, as the budget ($MRCNN_TRACE_CACHE_GB × 10^9 bytes) is counted.
def rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def rss_now_mb() -> float:
    """Resident memory now (Linux)."""
    return resident_bytes() / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--budget-gb", type=float, default=1.0, help="the trace cache's budget ($MRCNN_TRACE_CACHE_GB)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="mrcnn-many-sessions-"))
    os.environ.update(MRCNN_MODELS_DIR=str(make_r50_models_dir(tmp)), MRCNN_RUNS_DIR=str(tmp / "runs"),
                      TORCH_HOME=str(tmp / "torch"), MRCNN_TRACE_CACHE_GB=str(args.budget_gb))
    from streamlit.testing.v1 import AppTest


    from ui import state

    def session() -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
        at.session_state["model_name"] = R50_NAME
        return at.run()

    # the model every session shares, loaded as a session loads it: its default device and precision
    # (st.cache_resource works without a session)
    loaded = state.get_model(R50_NAME, "auto", "auto")
    before_mb = rss_mb()
    sessions = [session()]
    first_run_mb = rss_mb()
    sessions += [session() for _ in range(args.sessions - 1)]
    rows, unshared = [], 0
    for k, at in enumerate(sessions):
        start = time.perf_counter()
        at.file_uploader[0].upload(f"photo-{k}.png", photo(k), "image/png").run()
        upload_s = time.perf_counter() - start
        assert not at.exception, at.exception
        unshared += sum(trace_nbytes(t) for t in at.session_state["traces"].values())
        rows.append({"session": k, "upload_s": round(upload_s, 2), "rss_after_upload_mb": round(rss_now_mb())})
    for k, at in enumerate(sessions):  # every session comes back to its image: the LRU order is mixed
        steps = []
        for score in STEPS:
            start = time.perf_counter()
            at.slider(key="score_thresh").set_value(score).run()
            steps.append((time.perf_counter() - start) * 1000.0)
            assert not at.exception, at.exception
        rows[k]["step_ms"] = round(statistics.median(steps), 1)
        rows[k]["steps_ms"] = [round(s) for s in steps]
    peak_mb, end_mb = rss_mb(), rss_now_mb()
    # every session's live traces: together, the server-wide cache's content
    cached = sum(trace_nbytes(t) for at in sessions for t in at.session_state["traces"].values())
    measured_per_pixel = state.trace_cache().bytes_per_pixel(loaded)
    image_pixels = input_pixels(loaded, (600, 800))
    result = {"sessions": args.sessions, "budget_mb": args.budget_gb * 1000, "before_sessions_mb": round(before_mb),
              "after_first_run_mb": round(first_run_mb),
              "peak_rss_mb": round(peak_mb), "rss_at_end_mb": round(end_mb), "cache_mb_at_end": round(cached / 1e6),
              "outside_cache_at_end_mb": round(end_mb - before_mb - cached / 1e6),
              "traces_without_shared_budget_mb": round(unshared / 1e6),
              "bytes_per_input_pixel": {"architecture_guess": round(architecture_bytes_per_pixel(loaded)),
                                        "measured": round(measured_per_pixel)},
              "run_reservation_mb": round(image_pixels * measured_per_pixel / 1e6),
              "under_budget_plus_before": peak_mb <= before_mb + args.budget_gb * 1000,
              "median_step_ms": round(statistics.median(r["step_ms"] for r in rows), 1), "per_session": rows}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for r in rows:
            print(f"session {r['session']}: upload {r['upload_s']} s (RSS then {r['rss_after_upload_mb']} MB), "
                  f"slider step median {r['step_ms']} ms "
                  f"{r['steps_ms']}")
        print(f"peak RSS {result['peak_rss_mb']} MB, at the end {result['rss_at_end_mb']} MB (before sessions {result['before_sessions_mb']} MB, after the "
              f"first run {result['after_first_run_mb']} MB, "
              f"budget {result['budget_mb']:.0f} MB, traces in the cache {result['cache_mb_at_end']} MB, "
              f"held outside the cache and the model {result['outside_cache_at_end_mb']} MB; "
              f"without a shared budget the traces alone would be {result['traces_without_shared_budget_mb']} MB)")
        per_pixel = result["bytes_per_input_pixel"]
        print(f"a run reserves {result['run_reservation_mb']} MB of the budget for one of these images "
              f"({per_pixel['measured']} bytes per input pixel as measured; the architecture's first guess "
              f"{per_pixel['architecture_guess']}); peak within the budget plus the process before sessions: "
              f"{result['under_budget_plus_before']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
