"""The Fine-tune page's default run, end to end as the app does it: time and AP on the new class.

    python benchmarks/finetune_default.py            # prints one table row
    python benchmarks/finetune_default.py --json
    python benchmarks/finetune_default.py --device cuda   # on a GPU (float16 AMP); the default is the page's, auto

Prepares the built-in "teach it a new shape" data (mrcnn.training.finetune.prepare_builtin with the page's
default settings), runs the train CLI as a background job (mrcnn.training.jobs, as the page does), waits for
it, then compares the starting model and the new checkpoint on the same validation scenes
(mrcnn.training.finetune.compare_before_after). Wall times: the training job, and everything (prepare +
train + before/after comparison) — the issue's budget is 3 minutes on the 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrcnn.errors import MrcnnError  # noqa: E402
from mrcnn.model.zoo import resolve_device  # noqa: E402
from mrcnn.training import finetune, jobs  # noqa: E402


def run(settings: finetune.FinetuneSettings) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        plan = finetune.prepare_builtin(settings, root / "run")
        t_train = time.perf_counter()
        job = jobs.start_job(plan.train_args, plan.run_dir, settings.steps, root=root)
        while job.is_alive():
            time.sleep(0.5)
        train_s = time.perf_counter() - t_train
        status = job.status()
        if status["state"] != "finished":
            raise SystemExit(f"the fine-tuning run ended {status['state']}: {status['message']}\n{job.log_tail()}")
        result = finetune.compare_before_after(settings.model, Path(plan.run_dir) / "checkpoint.pt", plan.val_dir,
                                               device=settings.device)
        total_s = time.perf_counter() - t0
    new = finetune.NEW_SHAPE
    row = {"device": str(resolve_device(settings.device)), "steps": settings.steps,
           "batch_size": settings.batch_size, "image_size": settings.image_size,
           "train_s": round(train_s, 1), "total_s": round(total_s, 1)}
    for key in ("before", "after"):
        r = result[key]
        row[f"{new}_segm_AP_{key}"] = r["per_class"].get(new, {}).get("segm_AP", 0.0)
        row[f"{new}_bbox_AP_{key}"] = r["per_class"].get(new, {}).get("bbox_AP", 0.0)
        row[f"segm_AP_{key}"] = r["segm"]["AP"]
        row[f"bbox_AP_{key}"] = r["bbox"]["AP"]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--steps", type=int, default=None, help="default: the page's default")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (the page's default): CUDA when there is a GPU, else the CPU")
    args = p.parse_args()
    try:
        resolve_device(args.device)  # no CUDA here: one line before anything runs
    except MrcnnError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = finetune.FinetuneSettings(device=args.device)
    if args.steps:
        settings.steps = args.steps
    row = run(settings)
    if args.json:
        print(json.dumps(row))
    else:
        new = finetune.NEW_SHAPE
        print(f"| {row['device']} | {row['steps']} steps × {row['batch_size']} | train {row['train_s']} s "
              f"| total {row['total_s']} s "
              f"| {new} mask AP {row[f'{new}_segm_AP_before']:.3f} → {row[f'{new}_segm_AP_after']:.3f} "
              f"| {new} box AP {row[f'{new}_bbox_AP_before']:.3f} → {row[f'{new}_bbox_AP_after']:.3f} "
              f"| all mask AP {row['segm_AP_before']:.3f} → {row['segm_AP_after']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
