"""Command line: `python -m mrcnn {models,predict,shapes,train,evaluate,card,bench} ...` (contract in DESIGN.md).

Each sub-command's work lives in the module that owns it; this file only parses arguments and turns
user-facing errors (MrcnnError) into one line on stderr and exit status 2 — never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from mrcnn.errors import MrcnnError


def _add_thresholds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--nms-thresh", type=float, default=0.5)
    p.add_argument("--mask-thresh", type=float, default=0.5)
    p.add_argument("--max-detections", type=int, default=100)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mrcnn", description="Mask R-CNN Explorer command line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list models and whether they are available")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("predict", help="detect objects in images; writes DIR/<stem>.json and .png")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default="shapes", help="model name or checkpoint path")
    p.add_argument("--weights", default=None, help="weights file (raw torchvision state dict or checkpoint)")
    _add_thresholds(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, metavar="DIR")

    p = sub.add_parser("shapes", help="write a synthetic shapes dataset in COCO layout")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--num", type=int, required=True, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, metavar="PX")
    p.add_argument("--classes", default="circle,square,triangle", help="comma-separated shape names")
    p.add_argument("--nested", type=float, default=0.0, metavar="P",
                   help="probability that a shape is placed inside an earlier one (default 0)")
    p.add_argument("--overlap", type=float, default=0.0, metavar="P",
                   help="probability that a shape is placed across the edge of an earlier one (default 0)")

    p = sub.add_parser("train", help="train or fine-tune a model on a COCO dataset")
    p.add_argument("--model", required=True, help="model name or checkpoint path to start from")
    p.add_argument("--weights", default=None)
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--val", default=None, metavar="DIR")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=None, help="images per step (per process); default 4")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--config", default=None, help="JSON file with further TrainConfig fields")
    # further TrainConfig fields (mrcnn.train); unset ones keep the config file's or the default value
    p.add_argument("--arch", default=None, help='architecture overrides for a fresh model, JSON (e.g. \'{"fpn_channels": 32}\')')
    p.add_argument("--val-every", type=int, default=None)
    p.add_argument("--val-num", type=int, default=None, help="validate on at most N images")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--schedule", default=None, choices=["cosine", "linear", "constant"])
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--clip-grad-norm", type=float, default=None)
    p.add_argument("--image-size", type=int, default=None, help="model input size (shorter side)")
    p.add_argument("--augment", action="store_true", default=None, help="flip, scale and colour jitter")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--export", default=None, metavar="FILE", help="also write the final weights (fp16) here")
    p.add_argument("--no-amp", action="store_true",
                   help="train in float32 (default: float16 on CUDA, bfloat16 on a CPU with bf16 instructions)")

    p = sub.add_parser("evaluate", help="COCO box and mask AP of a model on a dataset")
    p.add_argument("--model", required=True)
    p.add_argument("--weights", default=None)
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--num", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--score-thresh", type=float, default=0.05, help="detections kept for AP (default 0.05)")
    p.add_argument("--max-detections", type=int, default=100)

    p = sub.add_parser("card", help="evaluate a checkpoint on held-out data and write its model card")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="held-out data: COCO folder, .zip or shapes:N:seed:size")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="the training run (adds its throughput)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("bench", help="run the benchmarks and print the table")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "models":
            from mrcnn.zoo import cli_models as run
        elif args.command == "predict":
            from mrcnn.predict import cli_predict as run
        elif args.command == "shapes":
            from mrcnn.shapes import cli_shapes as run
        elif args.command == "train":
            from mrcnn.train import cli_train as run
        elif args.command == "evaluate":
            from mrcnn.evaluate import cli_evaluate as run
        elif args.command == "card":
            from mrcnn.card import cli_card as run
        else:
            from mrcnn.bench import cli_bench as run
        return int(run(args) or 0)
    except MrcnnError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
