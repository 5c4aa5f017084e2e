"""The collection Streamlit runs after every script run (``gc.collect(2)``, slider presses included), in a
process that has imported what the app imports, before and after ``gc.freeze()`` (app.py freezes once).

    python benchmarks/post_run_gc.py            # median ms of 7 collections each way, and the ratio

While it runs it holds the GIL: the server's event loop cannot send the page its messages meanwhile.
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ui.detect  # noqa: E402,F401  the Detect page: torch, torchvision, plotly, pandas, streamlit, the package
import ui.inspect  # noqa: E402,F401


def collection_ms(repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect(2)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    tracked = len(gc.get_objects())
    before = collection_ms()
    gc.freeze()
    after = collection_ms()
    print(f"gc.collect(2) over {tracked} tracked objects: {before:.1f} ms; after gc.freeze(): {after:.2f} ms "
          f"({after / before:.3f}×)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
