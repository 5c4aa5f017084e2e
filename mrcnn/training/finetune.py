"""Fine-tuning runs started from the app: data preparation, the train command, time estimates and
the before/after comparison. The run itself is a background job (mrcnn.training.jobs) running the train CLI.

    settings = FinetuneSettings(model="shapes", steps=100)
    plan = prepare_builtin(settings, run_dir)   # or prepare_upload(zip_path, settings, run_dir, display_name)
    job = jobs.start_job(plan.train_args, run_dir, settings.steps)
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mrcnn.data.coco import load_dataset, safe_extract_zip, validate_coco
from mrcnn.data.shapes import write_dataset
from mrcnn.data.uploads import naming_upload
from mrcnn.errors import DatasetError
from mrcnn.evaluation.evaluate import evaluate
from mrcnn.files import atomic_write_bytes
from mrcnn.model.zoo import load_model, runs_dir
from mrcnn.training.run_files import read_metrics

# The built-in "teach it a new shape" set: the bundled model's classes plus one it has never seen.
NEW_SHAPE = "star"
BUILTIN_CLASSES = ("circle", "square", "triangle", NEW_SHAPE)
# Training throughput of the bundled model's architecture on this project's 2-core CPU (its multi-scale
# inputs, 256-352 px: benchmarks/train_throughput.py, benchmarks/finetune_default.py), images/s; used
# until a run on this server has measured its own (the default fine-tune here: 7.1 in bfloat16, 5.5 in
# float32 as on a CPU without bf16 instructions). The CUDA figure is a guess: no GPU was measured.
DEFAULT_IMAGES_PER_S = {"cpu": 6.5, "cuda": 120.0}


@dataclass
class FinetuneSettings:
    model: str = "shapes"  # starting model: name or checkpoint path
    steps: int = 100
    batch_size: int = 4
    image_size: int = 256
    lr: float = 0.01
    device: str = "auto"
    num_train: int = 400  # generated scenes (built-in data)
    num_val: int = 40
    val_fraction: float = 0.2  # uploaded data
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "image_size", "num_train", "num_val"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not (0 < self.lr < 1):
            raise ValueError("learning rate must be between 0 and 1")
        if not (0 < self.val_fraction < 1):
            raise ValueError("validation fraction must be between 0 and 1")


@dataclass
class RunPlan:
    run_dir: str
    train_data: str  # a COCO folder or a shapes:... spec
    val_dir: str
    classes: list[str]
    train_args: list[str]
    report: dict = field(default_factory=dict)  # dataset validation report (uploads)


def new_run_dir(prefix: str = "finetune") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = runs_dir() / f"{prefix}-{stamp}"
    n = 2
    while path.exists():
        path = runs_dir() / f"{prefix}-{stamp}-{n}"
        n += 1
    return path


def _train_args(s: FinetuneSettings, train_data: str, val_dir: str) -> list[str]:
    return ["--model", s.model, "--data", train_data, "--val", val_dir, "--steps", str(s.steps),
            "--batch-size", str(s.batch_size), "--lr", str(s.lr), "--device", s.device]


def prepare_builtin(s: FinetuneSettings, run_dir: str | Path) -> RunPlan:
    """Generated scenes with a shape the bundled model does not know. Training scenes are generated on
    the fly by the trainer; the validation scenes are written so both models are judged on the same files."""

    run_dir = Path(run_dir)
    val_dir = run_dir / "val"
    write_dataset(val_dir, s.num_val, seed=s.seed + 7919, size=s.image_size, classes=BUILTIN_CLASSES)
    train = f"shapes:{s.num_train}:{s.seed}:{s.image_size}:{','.join(BUILTIN_CLASSES)}"
    return RunPlan(str(run_dir), train, str(val_dir), list(BUILTIN_CLASSES), _train_args(s, train, str(val_dir)))


def prepare_upload(zip_path: str | Path, s: FinetuneSettings, run_dir: str | Path,
                   display_name: str | None = None) -> RunPlan:
    """Extract and validate an uploaded COCO .zip, then split its images into train and validation
    folders (same images/ folder, two annotation files). Raises DatasetError with the report.

    Messages name the upload as ``display_name`` (the name the user gave it; default: the zip's own
    name), never the server's paths. On an error, ``run_dir`` is removed if this call created it."""

    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        with naming_upload(display_name or Path(zip_path).name, zip_path, run_dir / "upload"):
            return _split_upload(zip_path, s, run_dir)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _split_upload(zip_path: str | Path, s: FinetuneSettings, run_dir: Path) -> RunPlan:
    root = safe_extract_zip(zip_path, run_dir / "upload")
    report = validate_coco(root)
    if not report.ok:
        raise DatasetError("the uploaded dataset has problems:\n" + report.summary())
    data = json.loads((root / "annotations.json").read_text())
    images = sorted(data["images"], key=lambda im: im["id"])
    if len(images) < 2:
        raise DatasetError("the uploaded dataset needs at least 2 images (some for training, some for validation)")
    rng = np.random.default_rng(s.seed)
    order = rng.permutation(len(images))
    num_val = min(max(1, int(round(len(images) * s.val_fraction))), len(images) - 1)
    val_ids = {images[i]["id"] for i in order[:num_val]}
    dirs = {}
    for split, keep in (("train", lambda i: i not in val_ids), ("val", lambda i: i in val_ids)):
        folder = run_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        subset = dict(data, images=[im for im in images if keep(im["id"])],
                      annotations=[a for a in data.get("annotations", []) if keep(a["image_id"])])
        atomic_write_bytes(folder / "annotations.json", json.dumps(subset).encode())
        link = folder / "images"
        if not link.exists():
            os.symlink((root / "images").resolve(), link, target_is_directory=True)
        dirs[split] = str(folder)
    classes = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    return RunPlan(str(run_dir), dirs["train"], dirs["val"], classes,
                   _train_args(s, dirs["train"], dirs["val"]), report.to_dict())


def measured_images_per_s(device: str) -> float:
    """Throughput of the most recent finished run on this server with the same device, else the default."""

    best = None
    for metrics in sorted(runs_dir().glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            config = json.loads((metrics.parent / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if str(config.get("device", "cpu")).split(":")[0] != device:
            continue
        scale = (config.get("image_size") or 256) ** 2 / 256 ** 2
        rates = [float(row["images_per_s"]) * scale for row in read_metrics(metrics) if row.get("images_per_s")]
        if rates:
            best = float(np.median(rates))
            break
    return best or DEFAULT_IMAGES_PER_S.get(device, DEFAULT_IMAGES_PER_S["cpu"])


def estimate_seconds(s: FinetuneSettings, device: str) -> float:
    """Training time from measured throughput, scaled by image area (cost grows with pixels)."""
    ips_at_256 = measured_images_per_s(device)
    ips = ips_at_256 * (256 / s.image_size) ** 2
    return s.steps * s.batch_size / ips


def compare_before_after(before_model: str, after_checkpoint: str | Path, val_dir: str | Path,
                         device: str = "auto", progress=None) -> dict:
    """Box and mask AP of the starting model and the fine-tuned one on the same validation set,
    overall and per class. Classes the starting model does not know score 0 before."""

    # the dataset keeps its own categories: predictions are matched to them by name, so a class
    # the starting model does not know simply scores 0 before
    dataset = load_dataset(val_dir)
    out = {}
    for key, name in (("before", before_model), ("after", str(after_checkpoint))):
        out[key] = evaluate(load_model(name, device=device), dataset, progress=progress).to_dict()
    return out


__all__ = ["FinetuneSettings", "RunPlan", "prepare_builtin", "prepare_upload", "estimate_seconds",
           "compare_before_after", "new_run_dir", "BUILTIN_CLASSES", "NEW_SHAPE"]
