"""Command line: `python -m mrcnn {models,predict,shapes,train,evaluate,card,import,check-precision,export,bench}
...` (docs/cli.md).

Every command's argument handling lives here; the modules it calls return data and never print. User-facing
errors (MrcnnError) become one line on stderr and exit status 2 — never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from mrcnn import bench
from mrcnn.data.images import load_image
from mrcnn.data.shapes import check_classes, write_dataset
from mrcnn.data.sources import first_items, open_data
from mrcnn.data.video import VideoLimits, is_clip, open_clip
from mrcnn.errors import ImageError, MrcnnError, TrainingError
from mrcnn.evaluation.compare import ap_difference
from mrcnn.evaluation.evaluate import METRIC_KEYS, evaluate
from mrcnn.evaluation.fidelity import check_precisions, precisions_to_check
from mrcnn.files import atomic_write_bytes, removing_new_empty_folders
from mrcnn.inference.draw import draw_detections
from mrcnn.inference.export import png_bytes, trace_json
from mrcnn.inference.input_size import check_input_size
from mrcnn.inference.model_export import FORMATS as EXPORT_FORMATS, export_model
from mrcnn.inference.precision import PRECISIONS
from mrcnn.inference.structures import Thresholds
from mrcnn.inference.trace import run_trace
from mrcnn.inference.video import predict_clip
from mrcnn.model.architectures import ARCHITECTURES, check_arch
from mrcnn.model.importer import import_model
from mrcnn.model.zoo import list_models, load_model, resolve_device
from mrcnn.training.card import card_path, write_card
from mrcnn.training.config import TrainConfig
from mrcnn.training.engine import train
from mrcnn.training.run_files import json_object


def _add_thresholds(p: argparse.ArgumentParser) -> None:
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--nms-thresh", type=float, default=0.5)
    p.add_argument("--mask-thresh", type=float, default=0.5)
    p.add_argument("--max-detections", type=int, default=100)


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="what the network runs in: auto (default: the fastest the device runs natively and the "
                        "model passed its fidelity check in), float32 (exact), bfloat16 (CPUs with bf16 units), "
                        "float16 (CUDA)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mrcnn", description="Mask R-CNN Explorer command line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list models and whether they are available")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("predict", help="detect objects in images and video clips; writes DIR/<stem>.json and "
                                       ".png (.mp4 for a clip: every frame annotated)")
    p.add_argument("images", nargs="+", metavar="IMAGE|CLIP")
    p.add_argument("--model", default="shapes", help="model name or checkpoint path")
    p.add_argument("--weights", default=None, help="weights file (raw torchvision state dict or checkpoint)")
    _add_thresholds(p)
    p.add_argument("--agnostic-nms", action="store_true", help="one NMS over all classes' boxes, not one per class")
    p.add_argument("--class-thresh", default="", metavar="NAME=VALUE,...",
                   help="score thresholds of single classes; the others use --score-thresh")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _add_precision(p)
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
    # further TrainConfig fields (mrcnn.training.config); unset ones keep the config file's or the default value
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
    p.add_argument("--trainable-backbone-layers", type=int, default=None, metavar="N",
                   help="backbone stages that train, 0..5 as torchvision counts them (default: 3 for a trained R50, "
                        "else all 5)")
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
    _add_precision(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--num", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--score-thresh", type=float, default=0.05, help="detections kept for AP (default 0.05)")
    p.add_argument("--max-detections", type=int, default=100)
    p.add_argument("--compare", default=None, metavar="MODEL",
                   help="also evaluate MODEL (name or checkpoint) on the same data and print B − A")

    p = sub.add_parser("card", help="evaluate a checkpoint on held-out data and write its model card")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="held-out data: COCO folder, .zip or shapes:N:seed:size")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="the training run (adds its throughput)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("import", help="bring in a Mask R-CNN trained elsewhere (torchvision state dict or "
                                      "checkpoint, DDP, this app's); it then has a name in every command")
    p.add_argument("file", metavar="FILE")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--classes", default=None, help="comma-separated class names, background excluded")
    names.add_argument("--classes-from", default=None, metavar="ANNOTATIONS_JSON",
                       help="class names from a COCO annotations file's categories (sorted by id)")
    p.add_argument("--name", default=None, help="the name to list it under (default: the file's stem)")
    p.add_argument("--min-size", type=int, default=None, help="input transform's shorter side (default 800)")
    p.add_argument("--max-size", type=int, default=None, help="input transform's longer-side cap (default 1333)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("check-precision", help="match a model's reduced-precision detections against float32's on "
                                               "images and record it: auto then avoids a precision that missed")
    p.add_argument("model", metavar="MODEL", help="model name or checkpoint path")
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="images to check on (default: generated shapes scenes); the model's own kind of images "
                        "make the check meaningful")
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="write a model as a torchvision state dict or ONNX (checked with onnxruntime)")
    p.add_argument("model", metavar="MODEL", help="model name or checkpoint path")
    p.add_argument("--format", default="torchvision", choices=list(EXPORT_FORMATS))
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--size", default=None, metavar="HxW", help="ONNX input size (default: the model's own)")
    p.add_argument("--weights", default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="run the benchmarks and print the table")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    _add_precision(p)
    return parser


def cli_models(args) -> int:
    infos = list_models()
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    for info in infos:
        status = "available" if info.available else "unavailable"
        print(f"{info.name:<20} {info.kind:<12} {len(info.classes):>3} classes  {status}")
        if info.available:
            print(f"    {info.path}")
        else:
            print(f"    {info.reason}")
    return 0


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 2
    while stem in used:
        stem, n = f"{path.stem}-{n}", n + 1
    used.add(stem)
    return stem


def _thresholds(**settings) -> Thresholds:
    try:
        return Thresholds(**settings)
    except ValueError as err:
        raise MrcnnError(str(err)) from None


def _check_folder_writable(flag: str, value: str) -> Path:
    """``value`` as a Path once it is known to be, or to be able to become, a folder we can write in.
    Checked before any work, so that a run does not fail at its end for want of a place to put the result."""
    path = Path(value)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise MrcnnError(f"{flag} {value}: {existing} exists and is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise MrcnnError(f"{flag} {value}: cannot write in {existing} ({err.strerror or err})") from None
    return path


def _check_file_writable(flag: str, value: str) -> Path:
    path = Path(value)
    if path.is_dir():
        raise MrcnnError(f"{flag} {value}: is a folder; name the file to write")
    _check_folder_writable(flag, str(path.parent))
    return path


def _class_thresh(value: str) -> dict[str, float]:
    """``NAME=VALUE,NAME=VALUE`` -> {name: value} (ranges are checked by Thresholds)."""
    pairs = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, number = (part.strip() for part in item.partition("="))
        try:
            if not (sep and name):
                raise ValueError
            threshold = float(number)
        except ValueError:
            raise MrcnnError(f"--class-thresh {value}: expected NAME=VALUE,NAME=VALUE, got {item!r}") from None
        if name in pairs:  # which one was meant is anyone's guess
            raise MrcnnError(f"--class-thresh {value}: {name!r} is given twice")
        pairs[name] = threshold
    return pairs


def cli_predict(args) -> int:
    thresholds = _thresholds(score_thresh=args.score_thresh, nms_thresh=args.nms_thresh,
                             max_detections=args.max_detections, mask_thresh=args.mask_thresh,
                             agnostic_nms=args.agnostic_nms, class_thresh=_class_thresh(args.class_thresh))
    VideoLimits.from_env()  # every limit predict applies (pixels, a clip's length and size): checked before any work
    out_dir = _check_folder_writable("--out", args.out)
    plan = _predict_plan([Path(name) for name in args.images], out_dir)
    _check_inputs_kept(plan, args.out)
    loaded = load_model(args.model, weights=args.weights, device=args.device, precision=args.precision)
    try:
        thresholds.check_classes(loaded.categories)
    except ValueError as err:
        raise MrcnnError(f"--class-thresh: {err}") from None
    with removing_new_empty_folders(out_dir):  # a run that wrote nothing leaves no folder
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MrcnnError(f"--out {args.out}: cannot create the folder ({err.strerror or err})") from None
        failed = 0
        for path, clip, outputs in plan:
            try:
                _check_not_folders(path, outputs)
                (_predict_clip if clip else _predict_image)(loaded, path, thresholds, *outputs)
            except MrcnnError as err:  # one line for this file; the others still run
                print(f"error: {err}", file=sys.stderr)
                failed += 1
    return 2 if failed else 0


def _predict_plan(paths: list[Path], out_dir: Path) -> list[tuple[Path, bool, tuple[Path, Path]]]:
    """(input, whether it is a clip, (its JSON, its overlay PNG or annotated MP4)) per input, in order. Names
    are given before any input is read, so that a bad input changes no other input's names."""
    used: set[str] = set()
    plan = []
    for path in paths:
        stem, clip = _unique_stem(path, used), is_clip(path.name, path)
        plan.append((path, clip, (out_dir / f"{stem}.json", out_dir / f"{stem}.{'mp4' if clip else 'png'}")))
    return plan


def _check_inputs_kept(plan: list[tuple[Path, bool, tuple[Path, Path]]], out_value: str) -> None:
    """MrcnnError, before any work, when an output would replace an input (e.g. --out the image's own
    folder: scene.png's overlay is scene.png). Same file = same device and inode: links count too."""
    inputs = {}
    for path, _, _ in plan:
        try:
            st = path.stat()
        except OSError:
            continue  # a missing input is its own error line later
        inputs[(st.st_dev, st.st_ino)] = path
    for _, _, outputs in plan:
        for target in outputs:
            try:
                st = target.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in inputs:
                raise MrcnnError(f"--out {out_value}: writing {target} would replace the input "
                                 f"{inputs[(st.st_dev, st.st_ino)]}; choose another folder")


def _check_not_folders(path: Path, outputs: tuple[Path, ...]) -> None:
    """A file in an output's place is replaced (as documented); a folder cannot be: say so before the work."""
    for target in outputs:
        if target.is_dir() and not target.is_symlink():
            raise MrcnnError(f"{path}: cannot write {target}: a folder has that name")


def _predict_image(loaded, path: Path, thresholds: Thresholds, json_path: Path, png_path: Path) -> None:
    """One image of `predict`: its JSON and overlay, both or neither. MrcnnError naming it when it failed."""
    image = load_image(path)
    try:
        trace = run_trace(loaded, image.array, thresholds)
    except ImageError as err:  # e.g. too thin for the model: the trace does not know the file's name
        raise ImageError(f"{path}: {err}") from None
    record = trace_json(trace, path.name)
    written = []
    try:
        for target, data in ((json_path, json.dumps(record, indent=1).encode()),
                             (png_path, png_bytes(draw_detections(image.array, trace.detections)))):
            atomic_write_bytes(target, data)
            written.append(target)
    except OSError as err:
        for target in written:  # a JSON without its overlay would look like a finished image
            target.unlink(missing_ok=True)
        raise MrcnnError(f"{path}: cannot write {target} ({err.strerror or err})") from None
    print(f"{path}: {len(trace.detections)} detections -> {json_path}")


def _predict_clip(loaded, path: Path, thresholds: Thresholds, json_path: Path, video_path: Path) -> None:
    """One clip of `predict`: its JSON and the annotated MP4, both or neither. MrcnnError naming it when it
    failed."""
    bar = _Progress(path.name)
    clip = open_clip(path)
    try:
        record = predict_clip(loaded, clip, thresholds, json_path, video_path,
                              progress=lambda done, total, _seconds_left: bar(done, total))
    except OSError as err:  # predict_clip has removed what it wrote
        raise MrcnnError(f"{path}: cannot write {json_path.name} and {video_path.name} in {json_path.parent} "
                         f"({err.strerror or err})") from None
    found = sum(len(frame["detections"]) for frame in record["frames"])
    print(f"{path}: {len(record['frames'])} frames, {found} detections -> {json_path}, .mp4")


def cli_shapes(args) -> int:
    """`python -m mrcnn shapes --out DIR --num N [--seed S] [--size PX] [--classes a,b,c] [--nested P]
    [--overlap P]`."""
    classes = check_classes(args.classes)
    out = write_dataset(args.out, args.num, seed=args.seed, size=args.size, classes=classes,
                        nested=args.nested, overlap=args.overlap)
    data = json.loads((out / "annotations.json").read_text())
    print(f"wrote {len(data['images'])} images, {len(data['annotations'])} objects "
          f"({', '.join(classes)}; {args.size} px, seed {args.seed}) to {out}")
    return 0


def config_from_args(args) -> TrainConfig:
    """TrainConfig from the parsed `train` arguments: --config JSON first, flags given over it."""
    base: dict[str, Any] = {}
    if getattr(args, "config", None):
        base = _read_json_object("--config", args.config, Path(args.config))
    names = {f.name for f in fields(TrainConfig)} - {"arch", "resume", "amp"}
    flags = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if getattr(args, "resume", False):
        flags["resume"] = True
    if getattr(args, "no_amp", False):
        flags["amp"] = False
    if getattr(args, "arch", None):
        flags["arch"] = _read_json_object("--arch", args.arch)
    cfg = TrainConfig.from_dict({**base, **flags})
    if isinstance(cfg.arch, dict) and cfg.model in ARCHITECTURES:  # checked now, before any work is done
        if "name" in cfg.arch:
            raise TrainingError(f"--arch: 'name' is set by --model ({cfg.model})")
        try:
            check_arch({"name": cfg.model, **cfg.arch})
        except ValueError as err:
            raise TrainingError(f"--arch: {err}") from None
    return cfg


def _read_json_object(flag: str, value: str, path: Path | None = None) -> dict:
    """The JSON object in ``value``, or in the file ``path`` when given; TrainingError naming ``flag`` otherwise."""
    if path is not None:
        return json_object(f"{flag} {value}", path.read_bytes)
    return json_object(flag, lambda: value)


def cli_train(args) -> int:
    """Exit status: 0 finished, 3 cancelled (checkpoint saved; --resume continues), 2 failed (via MrcnnError)."""
    cfg = config_from_args(args)
    _check_folder_writable("--out", cfg.out)
    if cfg.export:
        _check_file_writable("--export", cfg.export)
    try:
        result = train(cfg)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0 if result.state == "finished" else 3


class _Progress:
    def __init__(self, label: str):
        self.label, self.tty = label, sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            bar = "#" * int(24 * done / max(total, 1))
            sys.stderr.write(f"\r{self.label} [{bar:<24}] {done}/{total}")
            if done == total:
                sys.stderr.write("\n")
        elif done == total or done % max(total // 10, 1) == 0:
            sys.stderr.write(f"{self.label}: {done}/{total}\n")
        sys.stderr.flush()


def cli_evaluate(args) -> int:
    """`python -m mrcnn evaluate --model NAME|PATH --data DIR|ZIP|shapes:N:... [--json]`."""
    thresholds = _thresholds(score_thresh=args.score_thresh, max_detections=args.max_detections)
    if args.num is not None and args.num < 1:
        raise MrcnnError(f"--num must be at least 1, got {args.num}")
    loaded = load_model(args.model, args.weights, device=args.device, precision=args.precision)
    dataset = first_items(open_data(args.data), args.num)
    other = (load_model(args.compare, device=args.device, precision=args.precision)
             if args.compare else None)  # fail before the long part
    result = evaluate(loaded, dataset, progress=_Progress("evaluating"), score_thresh=thresholds.score_thresh,
                      max_detections=thresholds.max_detections, keep_predictions=False)
    compared = None
    if other is not None:
        compared = evaluate(other, dataset, progress=_Progress(f"evaluating {other.name}"),
                            score_thresh=thresholds.score_thresh, max_detections=thresholds.max_detections,
                            keep_predictions=False).to_dict()
    if args.json:
        record = {"bbox": result.bbox, "segm": result.segm, "per_class": result.per_class,
                  "classes_not_in_model": result.classes_not_in_model, "num_images": result.num_images, "model": loaded.name, "precision": loaded.precision,
                  "data": str(args.data)}
        if compared is not None:
            record["compare"] = {"model": other.name, **{k: compared[k] for k in (
                "bbox", "segm", "per_class", "classes_not_in_model")}}
            record["difference"] = ap_difference(result.to_dict(), compared)
        print(json.dumps(record))
        return 0
    print(f"{loaded.name} on {args.data} ({result.num_images} images, {result.seconds:.1f} s, {loaded.precision})")
    print(f"{'':6}" + "".join(f"{k:>8}" for k in METRIC_KEYS))
    for iou_type, name in (("bbox", "box"), ("segm", "mask")):
        m = getattr(result, iou_type)
        print(f"{name:6}" + "".join(f"{m[k]:8.3f}" for k in METRIC_KEYS))
    for cls, v in result.per_class.items():
        print(f"  {cls:<16} box AP {v.get('bbox_AP', 0):.3f}  mask AP {v.get('segm_AP', 0):.3f}")
    for cls in result.classes_not_in_model:
        print(f"  {cls:<16} not a class of {loaded.name}: its objects count as missed")
    if compared is not None:
        _print_difference(other.name, loaded.name, ap_difference(result.to_dict(), compared))
    return 0


def _print_difference(name_b: str, name_a: str, difference: dict) -> None:
    def signed(value) -> str:
        return f"{value:+8.3f}" if value is not None else f"{'—':>8}"

    print(f"B − A: {name_b} minus {name_a}")
    for iou_type, name in (("bbox", "box"), ("segm", "mask")):
        print(f"{name:6}" + "".join(signed(difference[iou_type][k]) for k in METRIC_KEYS))
    for cls, v in difference["per_class"].items():
        print(f"  {cls:<16} box AP {signed(v['bbox_AP']).strip()}  mask AP {signed(v['segm_AP']).strip()}")


def cli_card(args) -> int:
    """`python -m mrcnn card CHECKPOINT --data DATA [--run RUN_DIR]`: prints the card's headline numbers."""

    card = write_card(args.checkpoint, args.data, args.run, device=args.device, progress=_Progress("evaluating"))
    box, mask = card["metrics"]["bbox"], card["metrics"]["segm"]
    print(f"wrote {card_path(args.checkpoint)}: box AP {box['AP']:.3f} (AP50 {box['AP50']:.3f}), "
          f"mask AP {mask['AP']:.3f} (AP50 {mask['AP50']:.3f}) on {card['evaluated_on']['images']} images; "
          f"{card['file_mb']} MB; {card['inference_ms_512px']['median']} ms per 512x512 image")
    return 0


def cli_import(args) -> int:
    """`python -m mrcnn import FILE [--classes a,b | --classes-from annotations.json] [--name NAME]`."""
    classes = [c.strip() for c in args.classes.split(",")] if args.classes is not None else None
    imported = import_model(args.file, classes=classes, classes_from=args.classes_from, name=args.name,
                            min_size=args.min_size, max_size=args.max_size)
    if imported.class_note:
        print(f"warning: {imported.class_note}", file=sys.stderr)
    if args.json:
        print(json.dumps({**imported.card, "checkpoint": str(imported.checkpoint)}))
        return 0
    card = imported.card
    print(f"imported {args.file} as {imported.name!r}: {card['architecture']['name']}, "
          f"{len(card['classes'])} classes ({', '.join(card['classes'][:8])}"
          f"{', …' if len(card['classes']) > 8 else ''}) -> {imported.checkpoint}")
    return 0


def cli_check_precision(args) -> int:
    """`python -m mrcnn check-precision MODEL [IMAGE ...]`: every image is read before anything runs."""
    precisions_to_check(resolve_device(args.device))  # before the weights are read
    images = [load_image(Path(name)).array for name in args.images]
    loaded = load_model(args.model, args.weights, device=args.device, precision="float32")
    for name, image in zip(args.images, images):  # all of them before anything runs, as a bad file is
        check_input_size(loaded.model, image.shape[0], image.shape[1], name)
    data = f"{len(images)} image{'s' if len(images) > 1 else ''} given to check-precision" if images else ""
    record = check_precisions(loaded, images, data, progress=_Progress("checking"))
    if args.json:
        print(json.dumps(record))
        return 0
    for precision, entry in record.items():
        if isinstance(entry, dict) and "summary" in entry:
            verdict = {True: "meets its target", False: "MISSED its target: auto runs float32",
                       None: "no verdict"}[entry["ok"]]
            print(f"{loaded.name} in {precision}: {entry['summary']} on {record['data']}; {verdict}")
    return 0


def _export_size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    h, sep, w = value.lower().partition("x")
    if not sep or not h.strip().isdigit() or not w.strip().isdigit():
        raise MrcnnError(f"--size {value!r}: use HxW in pixels, e.g. 512x512")
    return int(h), int(w)


def cli_export(args) -> int:
    """`python -m mrcnn export MODEL --format torchvision|onnx --out DIR [--size HxW]`."""
    size = _export_size(args.size)
    out = _check_folder_writable("--out", args.out)
    report = export_model(load_model(args.model, args.weights, device="cpu"), out, args.format, size)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    print(f"wrote {', '.join(report.files)} to {report.folder}")
    if report.check is not None:
        c = report.check
        print(f"checked with onnxruntime on {c.images} images: {c.detections} detections matched, boxes within "
              f"{c.max_box_px:.3g} px, scores within {c.max_score_diff:.2g}, mask IoU >= {c.min_mask_iou:.4f}")
    return 0


def cli_bench(args) -> int:
    results = bench.run_benchmarks(quick=args.quick, device=args.device, precision=args.precision)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"machine: {results['machine']}")
        print(bench.format_table(results))
    return 0


class _WarningLines(logging.Handler):
    """What mrcnn logs at warning level (e.g. an annotation skipped), as one ``warning: ...`` line on stderr."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warning: {record.getMessage()}", file=sys.stderr)  # sys.stderr now: tests swap it


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"models": cli_models, "predict": cli_predict, "shapes": cli_shapes, "train": cli_train,
                "evaluate": cli_evaluate, "card": cli_card, "import": cli_import, "export": cli_export,
                "check-precision": cli_check_precision,
                "bench": cli_bench}
    logger, handler = logging.getLogger("mrcnn"), _WarningLines()
    logger.addHandler(handler)
    try:
        return int(commands[args.command](args) or 0)
    except MrcnnError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
