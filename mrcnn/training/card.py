"""Model cards: the JSON beside a checkpoint (``<stem>.json``) that `models` and the app's sidebar show.

    python -m mrcnn card weights/shapes.pt --data shapes:500:12345:256 --run runs/shapes-bundled

    card = write_card("weights/shapes.pt", data="shapes:500:12345:256", run_dir="runs/shapes-bundled")

A card says what the model is (classes, architecture, parameters, file size), how it was made (the
training data, recipe, steps and time stored in the checkpoint's ``meta``, and the run's measured
throughput when the run folder is given), how good it is (COCO box and mask metrics on held-out data,
measured here by mrcnn.evaluation.evaluate), how close its reduced precisions come to float32
(``precision_fidelity``: box and mask AP in each reduced precision the device runs natively, on the first
``fidelity_num`` images, mrcnn.evaluation.fidelity; ``auto`` does not pick a precision that missed its target) and how fast it runs
(median forward time on a 512×512 scene).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mrcnn.data.sources import first_items, open_data
from mrcnn.data.shapes import DEFAULT_CLASSES, SHAPE_NAMES, generate_scene
from mrcnn.errors import TrainingError
from mrcnn.evaluation.evaluate import evaluate
from mrcnn.evaluation.fidelity import ap_fidelity, reduced_native_precisions
from mrcnn.files import atomic_write_bytes
from mrcnn.model.architectures import count_parameters
from mrcnn.model.checkpoint import load_checkpoint
from mrcnn.inference.precision import stage_autocast
from mrcnn.model.zoo import load_model, read_card
from mrcnn.training.run_files import is_number, numbered_metrics, read_json_object

KEPT_FROM_IMPORT = ("source", "imported")  # mrcnn.model.importer's card keys that a new card keeps


def card_path(checkpoint: str | Path) -> Path:
    """Where the card of ``checkpoint`` lives (zoo.read_card reads it from there)."""
    return Path(checkpoint).with_suffix(".json")


def median_forward_ms(model: torch.nn.Module, image: np.ndarray, repeats: int = 7, warmup: int = 2,
                      precision: str = "float32") -> float:
    """Median wall time of ``model([image])`` in eval mode, on the model's device, in ``precision`` (a
    model prepared for it: mrcnn.inference.precision); the first ``warmup`` runs are not counted."""
    device = next(model.parameters()).device
    tensor = torch.from_numpy(image).to(device).permute(2, 0, 1).float().div(255.0)
    times = []
    with torch.inference_mode(), stage_autocast(precision, device):
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model([tensor])
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def run_throughput(run_dir: str | Path) -> dict:
    """Median images/s and wall time of a training run, from its metrics.jsonl and config.json; a run
    folder or file the card cannot use raises TrainingError naming it (checked before any evaluation)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TrainingError(f"run folder {run_dir}: no such folder")
    out: dict = {}
    config = run_dir / "config.json"
    if config.is_file():
        cfg = read_json_object(config)
        device, world_size = cfg.get("device"), cfg.get("world_size")
        if device is not None and not isinstance(device, str):
            raise TrainingError(f"{config}: device must be a string, got {device!r}")
        if world_size is not None and not (isinstance(world_size, int) and not isinstance(world_size, bool)
                                           and world_size >= 1):
            raise TrainingError(f"{config}: world_size must be a whole number of processes, got {world_size!r}")
        out["train_device"], out["train_processes"] = device, world_size
    metrics = run_dir / "metrics.jsonl"
    rows = numbered_metrics(metrics)
    for number, row in rows:
        for key in ("images_per_s", "elapsed"):
            if key in row and not (is_number(row[key]) and row[key] >= 0):
                raise TrainingError(f"{metrics} line {number}: {key} must be a number >= 0, got {row[key]!r}")
    speeds = [row["images_per_s"] for _, row in rows if row.get("images_per_s")]
    if speeds:
        out["train_images_per_s_median"] = round(statistics.median(speeds), 2)
    if rows:
        out["train_wall_s"] = rows[-1][1].get("elapsed")
    return out


def write_card(checkpoint: str | Path, data: str, run_dir: str | Path | None = None, device: str = "cpu",
               progress: Callable[[int, int], None] | None = None, timing_repeats: int = 7,
               fidelity_num: int = 200, fidelity_precisions: list[str] | None = None) -> dict:
    """Evaluate ``checkpoint`` on ``data`` (COCO folder, .zip or shapes spec), measure its reduced precisions
    (``fidelity_precisions``, default: those the device runs natively) on the first ``fidelity_num``
    images of it, time it, and write its card."""

    path = Path(checkpoint)
    ckpt = load_checkpoint(path, mmap=True)
    run_facts = run_throughput(run_dir) if run_dir else {}  # a bad run file is refused before the evaluation
    meta = dict(ckpt.get("meta") or {})
    loaded = load_model(str(path), device=device)
    dataset = open_data(data)
    result = evaluate(loaded, dataset, progress=progress, keep_predictions=False)
    precisions = reduced_native_precisions(loaded.device) if fidelity_precisions is None else fidelity_precisions
    fidelity = ap_fidelity(loaded, first_items(dataset, fidelity_num), precisions,
                           data_name=f"the first {min(fidelity_num, len(dataset))} images of {data}") if precisions else {}
    # a scene of the model's own shapes when it knows some (any scene times the same network)
    scene = generate_scene(2024, size=512, classes=[c for c in loaded.categories[1:] if c in SHAPE_NAMES]
                           or DEFAULT_CLASSES)
    forward_ms = median_forward_ms(loaded.model, scene.image, repeats=timing_repeats)

    previous = read_card(path)  # an imported model's card: its display name and source stay
    card = {
        "name": previous.get("name") if isinstance(previous.get("name"), str) else path.stem,
        **{k: previous[k] for k in KEPT_FROM_IMPORT if k in previous},
        "classes": list(loaded.categories[1:]),
        "architecture": dict(ckpt["arch"]),
        "parameters": count_parameters(loaded.model),
        "file_mb": round(path.stat().st_size / 1e6, 2),
        "sha256": loaded.sha256,
        "metrics": {"bbox": result.bbox, "segm": result.segm,
                    "per_class": result.per_class},
        "evaluated_on": {"data": str(data), "images": result.num_images},
        **({"precision_fidelity": fidelity} if fidelity else {}),
        "inference_ms_512px": {"median": round(forward_ms, 1), "device": str(loaded.device),
                               "threads": torch.get_num_threads()},
        "training": {
            "data": meta.get("data"), "validation": meta.get("val"), "steps": meta.get("steps"),
            "time_s": meta.get("training_time_s"),
            "validation_metrics": meta.get("metrics"), "recipe": meta.get("recipe"),
            "processes": meta.get("world_size"), "created": meta.get("created"),
            **run_facts,
        },
    }
    atomic_write_bytes(card_path(path), (json.dumps(card, indent=2) + "\n").encode())
    return card
