"""Fine-tuning runs started from the app: data preparation, the train command, time estimates and
the before/after comparison. The run itself is a background job (mrcnn.training.jobs) running the train CLI.

    settings = FinetuneSettings(model="shapes", steps=100)
    plan = prepare_builtin(settings, run_dir)   # or prepare_upload(zip_path, settings, run_dir, display_name)
    job = jobs.start_job(plan.train_args, run_dir, settings.steps, nproc=settings.gpus)
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mrcnn.data.coco import load_dataset
from mrcnn.data.coco_checks import validate_coco
from mrcnn.data.shapes import generate_scene, write_dataset
from mrcnn.data.uploads import naming_upload
from mrcnn.data.zips import safe_extract_zip
from mrcnn.errors import DatasetError, TrainingError
from mrcnn.evaluation.evaluate import evaluate
from mrcnn.files import atomic_write_bytes
from mrcnn.model.architectures import TORCHVISION_ARCHITECTURES, build_model
from mrcnn.model.zoo import load_model, resolve_device, runs_dir
from mrcnn.training.config import BACKBONE_STAGES
from mrcnn.training.starting_model import count_trainable, default_trainable_layers, freeze_backbone
from mrcnn.training.run_files import is_number, read_json_object, read_metrics

# The built-in "teach it a new shape" set: the bundled model's classes plus one it has never seen.
NEW_SHAPE = "star"
BUILTIN_CLASSES = ("circle", "square", "triangle", NEW_SHAPE)
# Training throughput of the bundled model's architecture on this project's 2-core CPU (its multi-scale
# inputs, 256-352 px: benchmarks/train_throughput.py, benchmarks/finetune_default.py), images/s; used
# until a run on this server has measured its own (the default fine-tune here: 7.1 in bfloat16, 5.5 in
# float32 as on a CPU without bf16 instructions). The CUDA figure is a guess: no GPU was measured.
DEFAULT_IMAGES_PER_S = {"cpu": 6.5, "cuda": 120.0}
# Image sizes that fit a fine-tune on a CPU: R50 costs about 10x the light architecture per pixel.
DEFAULT_IMAGE_SIZE = {"light": 256}
R50_IMAGE_SIZE = 320
SETTINGS_FILE = "finetune_settings.json"  # TrainConfig fields the train command reads with --config


def default_image_size(arch_name: str) -> int:
    return DEFAULT_IMAGE_SIZE.get(arch_name, R50_IMAGE_SIZE)


def has_backbone_choice(arch_name: str) -> bool:
    """Whether trainable_backbone_layers is the user's to choose: the light architecture trains whole."""
    return arch_name in TORCHVISION_ARCHITECTURES


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
    trainable_backbone_layers: int | None = None  # None: the engine's default (3 for R50, all for light)
    gpus: int = 1  # > 1: one process per GPU through torchrun (DDP)
    validations: int = 5  # validation loss and AP this many times per run (every steps // validations); 0: at the end

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "image_size", "num_train", "num_val"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not (0 < self.lr < 1):
            raise ValueError("learning rate must be between 0 and 1")
        if not (0 < self.val_fraction < 1):
            raise ValueError("validation fraction must be between 0 and 1")
        layers = self.trainable_backbone_layers
        if layers is not None and not 0 <= layers <= len(BACKBONE_STAGES):
            raise ValueError(f"trainable backbone layers must be between 0 and {len(BACKBONE_STAGES)}")
        if self.validations < 0:
            raise ValueError("validations per run must be at least 0")
        if self.gpus < 1:
            raise ValueError("gpus must be at least 1")


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


def _train_args(s: FinetuneSettings, train_data: str, val_dir: str, run_dir: Path) -> list[str]:
    """The train command's arguments; settings without a flag of their own go in a --config file."""
    # --model=NAME: a name (an imported model's, from older versions) starting with '-' is not read as a flag
    args = [f"--model={s.model}", "--data", train_data, "--val", val_dir, "--steps", str(s.steps),
            "--batch-size", str(s.batch_size), "--lr", str(s.lr), "--image-size", str(s.image_size),
            "--device", "cuda" if s.gpus > 1 else s.device,
            "--val-every", str(max(s.steps // s.validations, 1) if s.validations else 0)]
    if s.trainable_backbone_layers is not None:
        settings = run_dir / SETTINGS_FILE
        atomic_write_bytes(settings, json.dumps({"trainable_backbone_layers": s.trainable_backbone_layers}).encode())
        args += ["--config", str(settings)]
    return args


def prepare_builtin(s: FinetuneSettings, run_dir: str | Path) -> RunPlan:
    """Generated scenes with a shape the bundled model does not know. Training scenes are generated on
    the fly by the trainer; the validation scenes are written so both models are judged on the same files."""

    run_dir = Path(run_dir)
    val_dir = run_dir / "val"
    write_dataset(val_dir, s.num_val, seed=s.seed + 7919, size=s.image_size, classes=BUILTIN_CLASSES)
    train = f"shapes:{s.num_train}:{s.seed}:{s.image_size}:{','.join(BUILTIN_CLASSES)}"
    return RunPlan(str(run_dir), train, str(val_dir), list(BUILTIN_CLASSES),
                   _train_args(s, train, str(val_dir), run_dir))


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
                   _train_args(s, dirs["train"], dirs["val"], run_dir), report.to_dict())


def measured_images_per_s(device: str) -> float:
    """Throughput of the most recent finished run on this server with the same device, else the default."""

    best = None
    for metrics in sorted(runs_dir().glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            config = read_json_object(metrics.parent / "config.json")
        except TrainingError:  # a run folder this estimate cannot use: the next one may do
            continue
        if str(config.get("device", "cpu")).split(":")[0] != device:
            continue
        image_size = config.get("image_size")
        scale = (image_size if is_number(image_size) and image_size > 0 else 256) ** 2 / 256 ** 2
        rates = [row["images_per_s"] * scale for row in read_metrics(metrics)
                 if is_number(row.get("images_per_s")) and row["images_per_s"] > 0]
        if rates:
            best = float(np.median(rates))
            break
    return best or DEFAULT_IMAGES_PER_S.get(device, DEFAULT_IMAGES_PER_S["cpu"])


def estimate_seconds(s: FinetuneSettings, device: str, seconds_per_image: float | None = None) -> float:
    """Training time: from ``seconds_per_image`` of the chosen model at ``s.image_size`` when measured
    (measure_seconds_per_image), else from earlier runs' throughput scaled by image area."""
    if seconds_per_image is not None:
        return s.steps * s.batch_size * seconds_per_image
    ips_at_256 = measured_images_per_s(device)
    ips = ips_at_256 * (256 / s.image_size) ** 2
    return s.steps * s.batch_size / ips


def parameter_counts(arch: dict, num_classes: int, trainable_layers: int | None) -> tuple[int, int]:
    """(trainable, frozen) parameters when fine-tuning a trained ``arch`` model with ``trainable_layers``
    backbone stages (None: the default); counted on the structure alone (meta device: no memory, no weights)."""
    with torch.device("meta"):
        model = build_model(arch, num_classes)
    if trainable_layers is None:
        trainable_layers = default_trainable_layers(arch["name"], from_trained_weights=True)
    freeze_backbone(model, trainable_layers, freeze_norms=True)
    return count_trainable(model)


def measure_seconds_per_image(model_name: str, image_size: int, device: str = "auto",
                              trainable_layers: int | None = None) -> float:
    """Seconds one training image of ``image_size`` px takes with ``model_name`` on ``device``, on this
    machine: a forward and backward pass of a copy of the model set up as the run would set it up, timed
    after one untimed pass (the first pays for allocations and kernel choices)."""
    loaded = load_model(model_name, device="cpu")
    arch = dict(loaded.arch, min_size=int(image_size), max_size=int(image_size))
    model = build_model(arch, loaded.num_classes)
    model.load_state_dict(loaded.model.state_dict())
    if trainable_layers is None:
        trainable_layers = default_trainable_layers(arch["name"], from_trained_weights=True)
    freeze_backbone(model, trainable_layers, freeze_norms=True)
    dev = resolve_device(device)
    model.to(dev).train()
    scene = generate_scene(0, size=int(image_size))
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float().div(255).to(dev)
    target = {"boxes": torch.from_numpy(scene.boxes).to(dev),
              "labels": torch.ones(len(scene), dtype=torch.int64, device=dev),  # any class the model has
              "masks": torch.from_numpy(scene.masks).to(torch.uint8).to(dev)}
    elapsed = 0.0
    for _ in range(2):
        started = time.perf_counter()
        sum(model([image], [target]).values()).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - started
    return elapsed


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
           "measure_seconds_per_image", "parameter_counts", "default_image_size", "has_backbone_choice",
           "compare_before_after", "new_run_dir", "BUILTIN_CLASSES", "NEW_SHAPE"]
