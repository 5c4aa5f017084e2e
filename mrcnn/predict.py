"""Predictions out: the DESIGN prediction JSON (COCO RLE masks), a CSV, and `python -m mrcnn predict`."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mrcnn.checkpoint import atomic_write_bytes
from mrcnn.errors import ImageError
from mrcnn.structures import Detections, Thresholds


def encode_rle(mask: np.ndarray) -> dict:
    """A bool (H, W) mask as COCO compressed RLE with a str ``counts``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def detection_records(dets: Detections) -> list[dict]:
    areas = dets.areas
    records = []
    for i in range(len(dets)):
        rec = {
            "label": dets.categories[int(dets.labels[i])],
            "category_id": int(dets.labels[i]),
            "score": round(float(dets.scores[i]), 6),
            "box": [round(float(v), 3) for v in dets.boxes[i]],
            "area": int(areas[i]),
        }
        if dets.masks is not None:
            rec["mask"] = encode_rle(dets.masks[i])
        records.append(rec)
    return records


def prediction_json(dets: Detections, image_name: str, model_name: str, model_sha256: str,
                    thresholds: Thresholds, timings_ms: dict[str, float]) -> dict:
    """The DESIGN prediction JSON for one image."""
    h, w = dets.image_size
    return {
        "image": {"file": image_name, "width": int(w), "height": int(h)},
        "model": {"name": model_name, "sha256": model_sha256},
        "thresholds": thresholds.to_dict(),
        "detections": detection_records(dets),
        "timing_ms": {k: round(float(v), 3) for k, v in timings_ms.items()},
    }


def trace_json(trace, image_name: str) -> dict:
    """prediction_json for a Trace's current detections."""
    return prediction_json(trace.detections, image_name, trace.loaded.name, trace.loaded.sha256,
                           trace.thresholds, trace.timings_ms)


def detections_csv(dets: Detections) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["index", "label", "category_id", "score", "x0", "y0", "x1", "y1", "area"])
    for i, rec in enumerate(detection_records(dets)):
        writer.writerow([i, rec["label"], rec["category_id"], f"{rec['score']:.4f}",
                         *(f"{v:.1f}" for v in rec["box"]), rec["area"]])
    return out.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 2
    while stem in used:
        stem, n = f"{path.stem}-{n}", n + 1
    used.add(stem)
    return stem


def cli_predict(args) -> int:
    from mrcnn.draw import draw_detections
    from mrcnn.images import load_image
    from mrcnn.trace import run_trace
    from mrcnn.zoo import load_model

    try:
        thresholds = Thresholds(args.score_thresh, args.nms_thresh, args.max_detections, args.mask_thresh)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    loaded = load_model(args.model, weights=args.weights, device=args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed, used = 0, set()
    for name in args.images:
        path = Path(name)
        try:
            image = load_image(path)
        except ImageError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        trace = run_trace(loaded, image.array, thresholds)
        stem = _unique_stem(path, used)
        record = trace_json(trace, path.name)
        atomic_write_bytes(out_dir / f"{stem}.json", json.dumps(record, indent=1).encode())
        atomic_write_bytes(out_dir / f"{stem}.png", png_bytes(draw_detections(image.array, trace.detections)))
        print(f"{path}: {len(trace.detections)} detections -> {out_dir / stem}.json")
    return 2 if failed else 0
