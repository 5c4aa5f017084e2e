"""Evaluation images/s of the bundled model, the way `evaluate` runs by default (batched images on worker
threads, one intra-op thread each) and the way the Evaluate page runs it (the same, each batch in one of the
server's run slots: TraceCache.network_run, one run at a time by default), against one image at a time on the
caller's threads, alternated in one process.

    python benchmarks/evaluation_throughput.py               # 50 generated 256-px scenes, 3 rounds
    python benchmarks/evaluation_throughput.py --scenes 20 --rounds 2

Scenes are generated as they are read, alike for both ways. Both must give the same AP to 4 decimals:
the script says so, or exits 1.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrcnn.data.shapes import ShapesDataset  # noqa: E402
from mrcnn.evaluation.evaluate import evaluate  # noqa: E402
from mrcnn.inference.trace_cache import TraceCache, max_concurrent_runs  # noqa: E402
from mrcnn.model.zoo import load_model  # noqa: E402
from ui.evaluation_bar import IMAGES_PER_BATCH as PAGE_BATCH  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    loaded = load_model("shapes", device="cpu")
    dataset = ShapesDataset(args.scenes, seed=12345, size=256, classes=tuple(loaded.categories[1:]),
                            categories=loaded.categories)
    cache = TraceCache(budget=4e9, max_runs=max_concurrent_runs())  # the server's, as the page gets it
    ways = {"one image at a time": {"batch_size": 1, "workers": 1}, "batched, worker threads": {},
            "the Evaluate page's (run slots)": {"batch_size": PAGE_BATCH, "run_slot": None}}
    rates, aps = {way: [] for way in ways}, {}
    for _ in range(args.rounds):
        for way, options in ways.items():
            if "run_slot" in options:  # what the Evaluate page gives each evaluation (ui/evaluation_bar.py)
                options["run_slot"] = cache.round_slots(loaded)
            start = time.perf_counter()
            result = evaluate(loaded, dataset, keep_predictions=False, **options)
            rates[way].append(args.scenes / (time.perf_counter() - start))
            aps[way] = (round(result.bbox["AP"], 4), round(result.segm["AP"], 4))
    base, new, page = (statistics.median(rates[way]) for way in ways)
    for way in ways:
        print(f"{way}: median {statistics.median(rates[way]):.2f} images/s {[round(r, 2) for r in rates[way]]}, "
              f"AP box/mask {aps[way]}")
    print(f"ratio {new / base:.2f}× (batched), {page / base:.2f}× (the page's)")
    same = len(set(aps.values())) == 1
    print("same AP to 4 decimals" if same else "AP differs")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
