"""Mask AP of one checkpoint with its masks pasted at pixel centres vs torchvision's way (same weights,
same process, same held-out scenes): what mrcnn.model.paste's ``centre`` convention is worth.

    python benchmarks/mask_paste.py                                  # the bundled shapes model, 500 scenes
    python benchmarks/mask_paste.py --weights runs/x/checkpoint.pt --data shapes:200:12345:256 --json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mrcnn.model.architectures import build_model  # noqa: E402
from mrcnn.evaluation.evaluate import evaluate  # noqa: E402
from mrcnn.data.sources import open_data  # noqa: E402
from mrcnn.model.zoo import load_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes")
    p.add_argument("--weights", default=None)
    p.add_argument("--data", default="shapes:500:12345:256")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, args.weights, device="cpu")
    dataset = open_data(args.data)
    rows = {}
    for mode in ("centre", "torchvision"):
        model = build_model({**loaded.arch, "mask_paste": mode}, len(loaded.categories))
        model.load_state_dict(loaded.model.state_dict())
        result = evaluate(model.eval(), dataset, categories=loaded.categories, keep_predictions=False)
        rows[mode] = {"mask_AP": round(result.segm["AP"], 4), "mask_AP50": round(result.segm["AP50"], 4),
                      "mask_AP75": round(result.segm["AP75"], 4), "box_AP": round(result.bbox["AP"], 4)}
    out = {"model": loaded.source, "data": args.data, **rows,
           "mask_AP_gain": round(rows["centre"]["mask_AP"] - rows["torchvision"]["mask_AP"], 4)}
    if args.json:
        print(json.dumps(out))
    else:
        print("| paste | mask AP | AP50 | AP75 | box AP |\n|---|---|---|---|---|")
        for mode, r in rows.items():
            print(f"| {mode} | {r['mask_AP']} | {r['mask_AP50']} | {r['mask_AP75']} | {r['box_AP']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
