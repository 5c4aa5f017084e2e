"""Predictions out: the prediction JSON (COCO RLE masks, docs/prediction-json.md), a CSV and a PNG overlay."""
from __future__ import annotations

import csv
import io

import numpy as np
from PIL import Image

from mrcnn.data.masks import encode_rle
from mrcnn.inference.structures import Detections, Thresholds


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
                    thresholds: Thresholds, timings_ms: dict[str, float], precision: str = "float32") -> dict:
    """The prediction JSON for one image (docs/prediction-json.md); ``precision``: what the network ran in."""
    h, w = dets.image_size
    return {
        "image": {"file": image_name, "width": int(w), "height": int(h)},
        "model": {"name": model_name, "sha256": model_sha256, "precision": precision},
        "thresholds": thresholds.to_dict(),
        "detections": detection_records(dets),
        "timing_ms": {k: round(float(v), 3) for k, v in timings_ms.items()},
    }


def trace_json(trace, image_name: str) -> dict:
    """prediction_json for a Trace's current detections."""
    return prediction_json(trace.detections, image_name, trace.loaded.name, trace.loaded.sha256,
                           trace.thresholds, trace.timings_ms, trace.precision)


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
