"""Training engine behind `python -m mrcnn train` (docs/cli.md, docs/training.md).

    python -m mrcnn train --model light --data shapes:100000:0:256 --steps 3000 --batch-size 8 \
        --lr 0.03 --out runs/shapes                       # from scratch on generated scenes
    python -m mrcnn train --model shapes --data DIR --val VAL_DIR --steps 200 --out runs/ft
    python -m mrcnn train ... --out runs/ft --resume       # continue exactly where it stopped
    torchrun --nproc-per-node 2 -m mrcnn train ...        # DDP (gloo on CPU, nccl on CUDA)

    result = train(TrainConfig(model="shapes", data="DIR", steps=100, out="runs/x"),
                   progress=print, should_stop=lambda: False)

Every ``val_every`` steps (and at the end) with ``val``: the validation AP and loss per term in the metrics
row's "val" (validation_losses changes nothing the run goes on with).

The run folder (``out``): config.json, metrics.jsonl (one JSON object per logged step), checkpoint.pt
(docs/checkpoints.md + a ``train_state`` key for --resume) and, at the end, status.json
{"state": "finished"|"cancelled"|"failed", "message": ...}. A file ``out/STOP``, SIGTERM/SIGINT or
``should_stop()`` cancel the run cooperatively: it saves a checkpoint, then returns.

Resume is exact: the batch of step s (images, augmentation) depends only on (seed, s, rank), the
model's own randomness (RPN / RoI sampling) on the RNG state stored in the checkpoint, and the lr
on the step, so a resumed run ends with the same weights as an uninterrupted one.

Mixed precision (``amp``, on by default) is float16 on CUDA and bfloat16 on a CPU with bf16 instructions
(amp_dtype); weights and optimizer stay float32. A step whose loss is not finite in mixed precision is
redone in float32; a loss that is not finite there stops the run, keeping the last good checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from mrcnn.data.sources import first_items, open_data
from mrcnn.data.transforms import train_transforms
from mrcnn.errors import CheckpointError, DatasetError, MrcnnError, TrainingError
from mrcnn.evaluation.evaluate import evaluate
from mrcnn.files import remove_stale_temp_files
from mrcnn.model.architectures import ARCHITECTURES, TORCHVISION_ARCHITECTURES, build_model, light_arch
from mrcnn.model.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from mrcnn.model.zoo import load_model, resolve_device
from mrcnn.training.run_files import truncate_metrics, write_json, write_status

LOSS_TERMS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_LR = 0.02
MAX_STEPS = 10_000_000
MAX_BATCH_SIZE = 256  # images per step per process (Mask R-CNN recipes use 2-16)
MAX_IMAGE_SIZE = 4096
# numpy's seeds end at 2**32; torch's at 2**64, which StepBatches' per-step seed (about seed * 6.4e7) would pass first
MAX_SEED = 2**32 - 1
# The backbone's stages in torchvision's order for ``trainable_backbone_layers``: the first N of these train.
BACKBONE_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")
FINETUNE_TRAINABLE_LAYERS = 3  # torchvision's default for its R50 models started from trained weights


class Interval(NamedTuple):
    """The allowed values of a numeric setting; ``low_open`` / ``high_open`` exclude an end."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = (str(int(end)) if float(end).is_integer() else f"{end:g}" for end in (self.low, self.high))
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


# Every numeric setting's range. Those in OPTIONAL_SETTINGS may also be None (the default).
INTEGER_SETTINGS = {
    "steps": Interval(1, MAX_STEPS), "batch_size": Interval(1, MAX_BATCH_SIZE),
    "warmup_steps": Interval(0, MAX_STEPS), "log_every": Interval(1, MAX_STEPS),
    "val_every": Interval(0, MAX_STEPS), "checkpoint_every": Interval(0, MAX_STEPS),
    "seed": Interval(0, MAX_SEED), "num_workers": Interval(0, 64), "threads": Interval(1, 1024),
    "image_size": Interval(32, MAX_IMAGE_SIZE), "val_num": Interval(1, 10**9),
    "trainable_backbone_layers": Interval(0, len(BACKBONE_STAGES)),
}
FLOAT_SETTINGS = {
    "lr": Interval(0, 10, low_open=True, high_open=True), "momentum": Interval(0, 1, high_open=True),
    "weight_decay": Interval(0, 1, high_open=True), "warmup_factor": Interval(0, 1),
    "min_lr_ratio": Interval(0, 1), "clip_grad_norm": Interval(0, math.inf, high_open=True),  # 0: no clipping
}
OPTIONAL_SETTINGS = {"weights", "arch", "val", "val_num", "lr", "clip_grad_norm", "image_size", "threads", "export",
                     "trainable_backbone_layers"}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class TrainConfig:
    """Everything a run needs; stored as RUN_DIR/config.json and in the checkpoint."""

    model: str = "light"            # zoo name, checkpoint path, or an architecture name (fresh weights)
    data: str = ""                  # COCO folder, .zip, or shapes:N[:seed[:size[:classes]]]
    out: str = "runs/train"
    weights: str | None = None      # weights file for a zoo model (as in `predict --weights`)
    arch: dict | None = None        # architecture overrides for a fresh model (e.g. {"fpn_channels": 32})
    val: str | None = None          # validation data (same forms as ``data``)
    val_num: int | None = None      # use at most this many validation images
    steps: int = 100
    batch_size: int = 4             # images per step per process
    lr: float | None = None         # peak learning rate (None: DEFAULT_LR scaled by batch_size / 8)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    warmup_factor: float = 0.001    # lr at step 0 = lr * warmup_factor, linear up to lr
    schedule: str = "cosine"        # after warm-up: cosine | linear | constant
    min_lr_ratio: float = 0.0       # cosine / linear end at lr * min_lr_ratio
    clip_grad_norm: float | None = 10.0
    image_size: int | None = None   # model input size (shorter side); None: the model's own
    trainable_backbone_layers: int | None = None  # backbone stages that train, 0..5 as torchvision counts them
                                    # (BACKBONE_STAGES); None: 3 for a trained R50 model, else all 5
    augment: bool = False           # flip + scale jitter + colour jitter (mrcnn.data.transforms)
    device: str = "auto"
    amp: bool = True                # mixed precision where it is native: float16 on CUDA, bfloat16 on
                                    # a CPU with bf16 units (AVX512-BF16 / AMX); else float32 (amp_dtype)
    channels_last: bool = True      # NHWC convolutions: faster on CUDA, and 1.12x on the CPU (oneDNN)
    log_every: int = 10
    val_every: int = 0              # 0: validate only at the end (when ``val`` is given)
    checkpoint_every: int = 200
    seed: int = 0
    resume: bool = False
    num_workers: int = 0
    threads: int | None = None      # torch CPU threads (None: torch's default)
    export: str | None = None       # also write the final weights (no train state) here
    export_half: bool = True        # ... in fp16 storage

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise TrainingError naming the first setting of the wrong type or out of its range."""
        for setting in fields(self):
            value = getattr(self, setting.name)
            if not (value is None and setting.name in OPTIONAL_SETTINGS):
                _check_setting(setting.name, setting.type, value)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR * self.batch_size / 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TrainingError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**d)


def _check_setting(name: str, kind: str, value: Any) -> None:
    """One TrainConfig field: ``kind`` is its annotation (``"str | None"``), ``value`` not None."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in INTEGER_SETTINGS:
        if not (is_number and isinstance(value, int) and value in INTEGER_SETTINGS[name]):
            raise TrainingError(f"{name} must be an integer in {INTEGER_SETTINGS[name]}, got {value!r}")
    elif name in FLOAT_SETTINGS:
        if not (is_number and math.isfinite(value) and value in FLOAT_SETTINGS[name]):
            raise TrainingError(f"{name} must be a finite number in {FLOAT_SETTINGS[name]}, got {value!r}")
    elif name == "schedule":
        if value not in SCHEDULES:
            raise TrainingError(f"unknown schedule {value!r}; use one of {', '.join(SCHEDULES)}")
    elif name == "device":
        if not (isinstance(value, str) and DEVICE_PATTERN.fullmatch(value)):
            raise TrainingError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
    elif kind.startswith("bool"):
        if not isinstance(value, bool):
            raise TrainingError(f"{name} must be true or false, got {value!r}")
    elif kind.startswith("dict"):
        if not isinstance(value, dict):
            raise TrainingError(f"{name} must be a JSON object, got {value!r}")
    elif not isinstance(value, str):
        raise TrainingError(f"{name} must be a string, got {value!r}")
    elif name == "data" and not value:
        raise TrainingError("no training data given (--data)")
    elif not value and name not in OPTIONAL_SETTINGS:
        raise TrainingError(f"{name} must not be empty")


@dataclass
class TrainResult:
    state: str                      # finished | cancelled | failed
    message: str
    step: int
    checkpoint: str | None
    metrics: list[dict] = field(default_factory=list)  # the rows logged by this call
    val: dict | None = None         # last validation metrics
    elapsed_s: float = 0.0


# ------------------------------------------------------------------------------------------ schedule

def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up, then decay."""
    if step < cfg.warmup_steps:
        alpha = step / max(cfg.warmup_steps, 1)
        return cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
    return lo + (1 - lo) * (1 - t)


# ------------------------------------------------------------------------------------------ data

class BatchInterrupted(Exception):
    """StepBatches stopped loading a batch because ``interrupted()`` said so."""


class StepBatches(torch.utils.data.Dataset):
    """Item ``s`` = this process's batch for optimizer step ``s``, a pure function of (seed, s, rank).

    Indices come from torch's DistributedSampler (one shuffled permutation per epoch, split between
    ranks); augmentation runs under a RNG seeded from (seed, s, rank). So batches don't depend on
    worker processes or on where a run was resumed. ``interrupted``, asked before each image, ends the
    loading of a batch with BatchInterrupted (a cancel need not wait for a large batch).
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 interrupted: Callable[[], bool] | None = None):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.interrupted = rank, world_size, interrupted
        self._epoch_indices: dict[int, list[int]] = {}

    def _indices(self, epoch: int) -> list[int]:
        if epoch not in self._epoch_indices:
            sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank,
                                                          shuffle=True, seed=self.seed, drop_last=False)
            sampler.set_epoch(epoch)
            self._epoch_indices = {epoch: list(sampler)}  # keep one epoch: the sequence only moves forward
        return self._epoch_indices[epoch]

    def batch_indices(self, step: int) -> list[int]:
        per_epoch = len(self._indices(0))
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(self._indices(k // per_epoch)[k % per_epoch])
        return out

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, step: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + step) * 64 + self.rank)
            items = []
            for i in self.batch_indices(step):
                if self.interrupted is not None and self.interrupted():
                    raise BatchInterrupted(f"the loading of step {step + 1}'s batch was interrupted")
                items.append(self.dataset[i])
        images, targets = zip(*items)
        return list(images), list(targets)


def _loader(batches: StepBatches, start: int, stop: int, num_workers: int):
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, stop),
                                       num_workers=num_workers, generator=torch.Generator(),  # not the global RNG
                                       prefetch_factor=2 if num_workers else None)


# ------------------------------------------------------------------------------------------ model

def remap_class_weights(state_dict: dict, old_categories: list[str], new_categories: list[str],
                        fresh: dict) -> tuple[dict, list[str]]:
    """Class-specific head weights re-indexed by class name: classes both lists have keep their rows,
    the others keep ``fresh``'s (new initialisation). Returns (state dict, names of the new classes)."""
    old_index = {name: i for i, name in enumerate(old_categories)}
    out = dict(state_dict)
    for key, new in fresh.items():
        old = state_dict.get(key)
        if old is None or tuple(old.shape) == tuple(new.shape) and old_categories == new_categories:
            continue
        per_class = _rows_per_class(key)
        if per_class is None:
            continue
        merged = new.clone()
        for j, name in enumerate(new_categories):
            i = old_index.get(name)
            if i is not None:
                merged[j * per_class:(j + 1) * per_class] = old[i * per_class:(i + 1) * per_class].to(new.dtype)
        out[key] = merged
    new_classes = [c for c in new_categories if c not in old_index]
    return out, new_classes


def _rows_per_class(key: str) -> int | None:
    if key.startswith("roi_heads.box_predictor.cls_score."):
        return 1
    if key.startswith("roi_heads.box_predictor.bbox_pred."):
        return 4
    if key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
        return 1
    return None


def _starting_model(cfg: TrainConfig, categories: list[str], log: Callable[[str], None]):
    """(model, arch) for the data's categories, from a zoo model / checkpoint or fresh."""
    if cfg.model in ARCHITECTURES:
        arch = light_arch(**(cfg.arch or {})) if cfg.model == "light" else {"name": cfg.model, **(cfg.arch or {})}
        if cfg.image_size:
            arch.update(min_size=int(cfg.image_size), max_size=max(int(cfg.image_size), int(arch.get("max_size", 0))))
        try:
            return build_model(arch, len(categories)), arch
        except ValueError as err:
            raise TrainingError(f"cannot build architecture {cfg.model!r}: {err}") from None
    loaded = load_model(cfg.model, cfg.weights, device="cpu")
    arch = dict(loaded.arch)
    if cfg.arch:
        raise TrainingError("--arch only applies to a fresh architecture, not to a trained model")
    if cfg.image_size:
        arch.update(min_size=int(cfg.image_size), max_size=max(int(cfg.image_size), int(arch.get("max_size", 1333))))
    model = build_model(arch, len(categories))
    state, new_classes = remap_class_weights(loaded.model.state_dict(), loaded.categories, categories,
                                             model.state_dict())
    load_state_dict_checked(model, state, loaded.source)
    kept = [c for c in categories[1:] if c in loaded.categories]
    if loaded.categories != categories:
        log(f"classes: kept {len(kept)} from {cfg.model} ({', '.join(kept) or 'none'}); "
            f"new: {', '.join(new_classes) or 'none'}")
    return model, arch


def default_trainable_layers(arch_name: str, from_trained_weights: bool) -> int:
    """torchvision's default: 3 backbone stages train when an R50 starts from trained weights; all 5 for a
    fresh model and for the light architecture (small, GroupNorm: cheap to train whole)."""
    if from_trained_weights and arch_name in TORCHVISION_ARCHITECTURES:
        return FINETUNE_TRAINABLE_LAYERS
    return len(BACKBONE_STAGES)


class FrozenStatsBatchNorm2d(torch.nn.BatchNorm2d):
    """A BatchNorm2d that always normalises with its stored statistics, in training too: torchvision's
    FrozenBatchNorm2d's behaviour with BatchNorm2d's state dict (so checkpoints and exports load as before)."""

    def train(self, mode: bool = True) -> FrozenStatsBatchNorm2d:
        return super().train(False)


def freeze_backbone(model: torch.nn.Module, trainable_layers: int, freeze_norms: bool) -> None:
    """torchvision's rule (backbone_utils._resnet_fpn_extractor): only the first ``trainable_layers`` of
    BACKBONE_STAGES train, the stem's norm only with all 5. ``freeze_norms``: the backbone's BatchNorm layers
    keep their statistics and affine weights, as FrozenBatchNorm2d does in torchvision's trained R50 (a batch
    of a few images cannot estimate them)."""
    body = model.backbone.body
    stages = BACKBONE_STAGES[:trainable_layers] + (("bn1",) if trainable_layers == len(BACKBONE_STAGES) else ())
    for name, parameter in body.named_parameters():
        if not name.startswith(stages):
            parameter.requires_grad_(False)
    if freeze_norms:
        for module in body.modules():
            if type(module) is torch.nn.BatchNorm2d:
                module.__class__ = FrozenStatsBatchNorm2d
                module.requires_grad_(False)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def prepare_for_training(model: torch.nn.Module, arch: dict, cfg: TrainConfig) -> int:
    """Freeze what ``cfg`` keeps fixed (before the optimizer is built); returns the trainable stages."""
    from_trained_weights = cfg.model not in ARCHITECTURES
    layers = cfg.trainable_backbone_layers
    if layers is None:
        layers = default_trainable_layers(arch["name"], from_trained_weights)
    freeze_backbone(model, layers, freeze_norms=from_trained_weights)
    return layers


# ------------------------------------------------------------------------------------------ DDP

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """torchrun's environment -> a process group (gloo on the CPU, nccl on CUDA); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return info


# ------------------------------------------------------------------------------------------ the run

def train(config: TrainConfig, progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, verbose: bool = True) -> TrainResult:
    """Run (or resume) training as ``config`` says. Returns a TrainResult; a failure that stops the
    run (non-finite loss, bad data) raises TrainingError / DatasetError after writing status.json."""
    config.validate()  # again: a dataclass can be changed after it was built
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    dist_info = init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    resume_ckpt = _checkpoint_to_resume(config, out / "checkpoint.pt")  # refused before a status is written:
    try:                                                                 # the folder may hold another run
        # caught from the start: a cancel during the setup stops the run at its first step
        with _Stopper(out / "STOP", should_stop) as stopper:
            run = setup_run(config, resume_ckpt, out, device, dist_info, _stderr_log(verbose and dist_info.is_main))
            with _MetricLogger(run, progress, verbose) as metric_logger:
                state, message = train_steps(run, stopper, metric_logger)
            return finish_run(run, state, message, metric_logger.rows)
    except BaseException as err:
        folder_deleted = not out.is_dir()  # then the status would recreate a folder the user deleted
        if dist_info.is_main and not folder_deleted:
            write_status(out, "failed", str(err) if isinstance(err, MrcnnError) else f"{type(err).__name__}: {err}")
        if folder_deleted and not isinstance(err, MrcnnError):
            raise TrainingError(f"the run folder {out} was deleted while training "
                                f"({type(err).__name__}: {err})") from err
        raise


def setup_run(cfg: TrainConfig, resume_ckpt: dict | None, out: Path, device: torch.device, dist: DistInfo,
              log: Callable[[str], None]) -> _Run:
    """Everything before the first step: data, model, optimizer (from ``resume_ckpt`` when resuming), run files."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if dist.is_main:
        (out / "STOP").unlink(missing_ok=True)  # a stale flag from the run being resumed
        for leftover in remove_stale_temp_files(out):  # a write killed mid-way, e.g. a checkpoint's by SIGKILL
            log(f"removed {leftover.name}, left by a write that did not finish")
    if dist.enabled:
        torch.distributed.barrier()

    # data and model (in this order: both draw from the seeded RNG)
    torch.manual_seed(cfg.seed)
    transforms = train_transforms() if cfg.augment else None
    if resume_ckpt is not None:
        categories = list(resume_ckpt["categories"])
        train_ds = open_data(cfg.data, categories, transforms)
        arch = dict(resume_ckpt["arch"])
        model = build_model(arch, len(categories))
        load_state_dict_checked(model, resume_ckpt["state_dict"], out / "checkpoint.pt")
    else:
        train_ds = open_data(cfg.data, None, transforms)
        categories = list(train_ds.categories)
        model, arch = _starting_model(cfg, categories, log)
    if len(train_ds) == 0:
        raise DatasetError(f"training data {cfg.data} has no images")
    val_ds = first_items(open_data(cfg.val, categories), cfg.val_num) if cfg.val and dist.is_main else None
    check_batch_fits(cfg.batch_size, arch, device)
    trainable_layers = prepare_for_training(model, arch, cfg)
    trainable, frozen = count_trainable(model)
    log(f"backbone: {trainable_layers} of {len(BACKBONE_STAGES)} stages train; "
        f"{trainable:,} parameters train, {frozen:,} frozen")

    # the model on its device, the optimizer, and their state when resuming
    autocast_dtype = amp_dtype(device) if cfg.amp else None
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = _sgd(cfg, model)
    run = _Run(cfg, out, device, dist, log, arch, categories, train_ds, val_ds, model, model, optimizer,
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg)),
               # bfloat16 has float32's range: only float16 needs its loss scaled
               scaler=torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16),
               autocast_dtype=autocast_dtype)
    if resume_ckpt is not None:
        run.restore(resume_ckpt)
        log(f"resuming {out} at step {run.step}/{cfg.steps}")
    if dist.enabled:
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    if dist.is_main:
        write_json(out / "config.json", {**cfg.to_dict(), "arch": arch, "categories": categories,
                                          "world_size": dist.world_size, "device": str(device),
                                          "trainable_layers": trainable_layers, "trainable_parameters": trainable,
                                          "frozen_parameters": frozen,
                                          "precision": run.precision})
        truncate_metrics(out / "metrics.jsonl", run.step)
    run.t_start = time.time()
    return run


def train_steps(run: _Run, stopper: _Stopper, metric_logger: _MetricLogger) -> tuple[str, str]:
    """One optimizer step per batch until ``steps`` or a cancel: (state, message). A loss that is not
    finite, or a run folder deleted meanwhile, raises TrainingError."""
    cfg = run.cfg
    for images, targets in _step_batches(run, stopper):
        lr = run.optimizer.param_groups[0]["lr"]
        losses = forward_backward(run, images, targets)

        # every rank takes the same decisions, or the others wait for it forever in the next collective
        stop_reason = stopper.reason()
        not_finite, stop, folder_deleted = any_rank(run.dist, run.device, not losses.finite,
                                                    stop_reason is not None, not run.out.is_dir())
        if folder_deleted:
            raise TrainingError(f"the run folder {run.out} was deleted during step {run.step + 1}; training stopped")
        if not_finite:
            raise TrainingError(_not_finite_message(run, losses))
        optimizer_step(run)

        metric_logger.update(losses, num_images=len(images) * run.dist.world_size)
        validate_now = run.validation_due()
        if run.step % cfg.log_every == 0 or run.step == cfg.steps or validate_now or stop:
            log_step(run, metric_logger, lr, validate_now)
        if stop:
            return "cancelled", (f"cancelled at step {run.step}/{cfg.steps} "
                                 f"({stop_reason or 'stop requested on another process'})")
        maybe_checkpoint(run)
    if run.step < cfg.steps:  # a cancel interrupted the loading of the next batch
        return "cancelled", f"cancelled at step {run.step}/{cfg.steps} ({stopper.reason() or 'stop requested'})"
    return "finished", f"finished {run.step} steps"


@dataclass
class _StepLosses:
    terms: dict[str, torch.Tensor]      # the model's loss terms (LOSS_TERMS)
    total: torch.Tensor
    finite: bool                        # the loss (and the gradient norm, when clipped) on every rank
    grad_norm: torch.Tensor | None = None


def forward_backward(run: _Run, images: list, targets: list) -> _StepLosses:
    """The forward pass in mixed precision (redone in float32 when its loss is not finite there), then,
    when the loss is finite on every rank, the backward pass and gradient clipping."""
    losses = _forward(run, images, targets, mixed=run.autocast_dtype is not None)
    if not losses.finite and run.autocast_dtype is not None:
        # Mixed precision ran out on this batch (bfloat16 did once in the 4000 steps of the bundled
        # recipe): redo it in float32; only a loss that is not finite there stops the run.
        run.float32_retries += 1
        run.log(f"step {run.step + 1}: the loss is not finite in {run.precision}; computing this step in float32")
        losses = _forward(run, images, targets, mixed=False)
    if not losses.finite:
        return losses
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(losses.total).backward()
    if run.cfg.clip_grad_norm:
        run.scaler.unscale_(run.optimizer)
        losses.grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.clip_grad_norm)
        if not run.scaler.is_enabled() and not bool(torch.isfinite(losses.grad_norm)):
            losses.finite = False  # (with float16 the scaler skips such steps by itself)
    return losses


def _forward(run: _Run, images: list, targets: list, mixed: bool) -> _StepLosses:
    with torch.autocast(run.device.type, dtype=run.autocast_dtype, enabled=mixed):
        terms = run.train_model(images, targets)
    total = sum(terms.values())
    # the ranks agree before any backward: one rank skipping it would leave the others waiting in DDP's
    # gradient all-reduce
    (not_finite,) = any_rank(run.dist, run.device, not bool(torch.isfinite(total)))
    return _StepLosses(terms, total, finite=not not_finite)


def any_rank(dist: DistInfo, device: torch.device, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true on any rank: the decisions every rank must take together."""
    if not dist.enabled:
        return flags
    votes = torch.tensor([float(flag) for flag in flags], device=device)
    torch.distributed.all_reduce(votes)
    return tuple(bool(vote > 0) for vote in votes)


def optimizer_step(run: _Run) -> None:
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1


def log_step(run: _Run, metric_logger: _MetricLogger, lr: float, validate_now: bool) -> None:
    """One metrics row: the losses since the last row, and the validation metrics when they are due."""
    row = metric_logger.row(lr)
    if validate_now and run.val_ds is not None:  # only rank 0 holds validation data
        losses = validation_losses(run.model, run.val_ds, run.device, run.cfg.batch_size)
        run.last_val = row["val"] = {**_val_metrics(run.model, run.val_ds, run.device), **losses}
    metric_logger.write(row)


def maybe_checkpoint(run: _Run) -> None:
    every = run.cfg.checkpoint_every
    if every and run.step % every == 0 and run.step < run.cfg.steps:  # the last step's is finish_run's
        run.save()


def finish_run(run: _Run, state: str, message: str, rows: list[dict]) -> TrainResult:
    """The last checkpoint (a cancelled run's too: --resume continues it), the export and status.json."""
    if run.dist.enabled:
        torch.distributed.barrier()
    run.save()
    if state == "finished" and run.cfg.export and run.dist.is_main:
        save_checkpoint(run.cfg.export, run.arch, run.categories, run.model.state_dict(), run.meta(),
                        half=run.cfg.export_half)
    if run.dist.is_main:
        write_status(run.out, state, message)
    run.log(message)
    if run.dist.enabled:
        torch.distributed.barrier()
    return TrainResult(state, message, run.step, str(run.ckpt_path), rows, run.last_val, run.elapsed())


# ------------------------------------------------------------------------------------------ run state and helpers

@dataclass
class _Run:
    """One run between its steps: what torchvision's train_one_epoch gets as arguments, plus the step."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    dist: DistInfo
    log: Callable[[str], None]
    arch: dict
    categories: list[str]
    train_ds: Any
    val_ds: Any                         # None on ranks > 0 and without ``val``
    model: torch.nn.Module              # the bare model: saved and validated
    train_model: torch.nn.Module        # the model or its DDP wrapper: trained
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None  # None: float32
    step: int = 0                       # optimizer steps done
    start_step: int = 0                 # where this call started (resumed)
    elapsed_before: float = 0.0         # training time of the calls this one resumes
    last_val: dict | None = None        # the latest validation metrics
    float32_retries: int = 0            # steps redone in float32 (this call)
    t_start: float = 0.0

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def precision(self) -> str:
        return str(self.autocast_dtype or torch.float32).removeprefix("torch.")

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    def validation_due(self) -> bool:
        """After this step? The same answer on every rank (the logging all-reduces); rank 0 validates."""
        every, step = self.cfg.val_every, self.step
        return bool(self.cfg.val) and bool((every and step % every == 0) or step == self.cfg.steps)

    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint's train state: optimizer, schedule, loss scale, RNG, step, clock."""
        state = ckpt["train_state"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step = self.start_step = int(state["step"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.last_val = ckpt["meta"].get("metrics") or None

    def meta(self) -> dict:
        cfg = self.cfg
        return {"data": cfg.data, "val": cfg.val, "steps": self.step,
                "recipe": {k: v for k, v in cfg.to_dict().items()
                           if k not in ("out", "resume", "device", "num_workers", "export", "threads")},
                "world_size": self.dist.world_size, "metrics": self.last_val or {},
                "training_time_s": round(self.elapsed(), 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def save(self) -> None:
        """The checkpoint with the train state that --resume continues from (rank 0 writes it)."""
        if not self.dist.is_main:
            return
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}, "rng": _rng_state(),
                 "elapsed_s": self.elapsed(), "config": self.cfg.to_dict()}
        save_checkpoint(self.ckpt_path, self.arch, self.categories, self.model.state_dict(), self.meta(),
                        extra={"train_state": state})


def _checkpoint_to_resume(cfg: TrainConfig, ckpt_path: Path) -> dict | None:
    """The checkpoint ``--resume`` continues (None for a new run); refuses to overwrite a run otherwise."""
    if not cfg.resume:
        if ckpt_path.is_file():
            raise TrainingError(f"{ckpt_path.parent} already holds a run (checkpoint.pt); use --resume to "
                                "continue it or choose another --out")
        return None
    if not ckpt_path.is_file():
        raise TrainingError(f"--resume: {ckpt_path} does not exist; nothing to resume")
    ckpt = load_checkpoint(ckpt_path)
    if "train_state" not in ckpt:
        raise TrainingError(f"--resume: {ckpt_path} has no training state (an exported model?)")
    return ckpt


def _sgd(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # norms and biases: no weight decay
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.peak_lr, momentum=cfg.momentum)


def _step_batches(run: _Run, stopper: _Stopper):
    """(images, targets) on the device for each remaining step. In a single process a cancel (signal or
    STOP file) is seen between the images of a batch and ends the batches; with DDP a rank must not
    leave a step alone, so there it is seen once per step (train_steps)."""
    cfg = run.cfg
    between_images = stopper.requested_from_outside if not run.dist.enabled and cfg.num_workers == 0 else None
    batches = StepBatches(run.train_ds, cfg.batch_size, cfg.seed, run.dist.rank, run.dist.world_size,
                          interrupted=between_images)
    try:
        for images, targets in _loader(batches, run.step, cfg.steps, cfg.num_workers):
            yield ([image.to(run.device, non_blocking=True) for image in images],
                   [{k: v.to(run.device, non_blocking=True) for k, v in target.items()} for target in targets])
    except BatchInterrupted:
        return


def _not_finite_message(run: _Run, losses: _StepLosses) -> str:
    terms = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in losses.terms.items())
    grad = f", gradient norm {float(losses.grad_norm):.4g}" if losses.grad_norm is not None else ""
    return (f"training stopped at step {run.step + 1}: the loss is not finite ({terms}{grad}). The last good "
            f"checkpoint ({run.ckpt_path.name}, step {_saved_step(run.ckpt_path)}) is kept. Try a lower --lr "
            f"(now {run.cfg.peak_lr:g}) or more warm-up steps.")


def _saved_step(path: Path) -> int | str:
    if not path.is_file():
        return "none saved yet"
    try:
        return int(load_checkpoint(path, mmap=True)["train_state"]["step"])
    except (CheckpointError, KeyError):
        return "?"


class _MetricLogger:
    """The losses averaged between log steps over all ranks, written by rank 0 as one row per log step
    to metrics.jsonl, the progress bar and the ``progress`` callback."""

    def __init__(self, run: _Run, progress: Callable[[dict], None] | None, verbose: bool):
        self.run, self.progress = run, progress
        self.bar = _Bar(run.cfg.steps, verbose and run.dist.is_main)
        self.rows: list[dict] = []  # the rows written by this call
        self.sums = dict.fromkeys((*LOSS_TERMS, "loss"), 0.0)
        self.num_steps, self.num_images, self.since = 0, 0, time.time()

    def __enter__(self) -> _MetricLogger:
        self.file = (self.run.out / "metrics.jsonl").open("a") if self.run.dist.is_main else None
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()
        self.bar.close()

    def update(self, losses: _StepLosses, num_images: int) -> None:
        for k, v in losses.terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.sums["loss"] += float(losses.total.detach())
        self.num_steps += 1
        self.num_images += num_images

    def row(self, lr: float) -> dict:
        """This step's row: the mean losses since the last row (over all ranks), lr, speed, time."""
        run, now = self.run, time.time()
        avg = {k: v / self.num_steps for k, v in self.sums.items()}
        if run.dist.enabled:
            vec = torch.tensor([avg[k] for k in sorted(avg)], device=run.device)
            torch.distributed.all_reduce(vec)
            avg = {k: float(x) / run.dist.world_size for k, x in zip(sorted(avg), vec)}
        row = {"step": run.step, **{k: round(avg.get(k, 0.0), 6) for k in LOSS_TERMS},
               "loss": round(avg["loss"], 6), "lr": lr,
               "images_per_s": round(self.num_images / max(now - self.since, 1e-9), 3),
               "elapsed": round(run.elapsed_before + now - run.t_start, 2)}
        if run.float32_retries:
            row["float32_retries"] = run.float32_retries  # steps redone in float32 so far (this call)
        if run.step > run.start_step:
            row["eta_s"] = round((now - run.t_start) / (run.step - run.start_step) * (run.cfg.steps - run.step), 1)
        return row

    def write(self, row: dict) -> None:
        if self.run.dist.is_main:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            self.rows.append(row)
            self.bar.update(row["step"], row)
            if self.progress is not None:
                self.progress(row)
        self.sums = dict.fromkeys(self.sums, 0.0)
        self.num_steps, self.num_images, self.since = 0, 0, time.time()


def _stderr_log(enabled: bool) -> Callable[[str], None]:
    if not enabled:
        return lambda message: None
    return lambda message: print(message, file=sys.stderr, flush=True)


class _Stopper:
    """Cancel requests: SIGTERM/SIGINT (main thread only), RUN_DIR/STOP, or a callback."""

    def __init__(self, stop_file: Path, should_stop: Callable[[], bool] | None):
        self.stop_file, self.should_stop, self.signalled = stop_file, should_stop, None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signalled = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested_from_outside(self) -> bool:
        """A signal or the STOP file: cheap enough to ask between images (``should_stop`` is asked once a step)."""
        return self.signalled is not None or self.stop_file.exists()

    def reason(self) -> str | None:
        if self.signalled:
            return f"{self.signalled} received"
        if self.stop_file.exists():
            return "stop file found"
        if self.should_stop is not None and self.should_stop():
            return "stop requested"
        return None


class _Bar:
    """A one-line terminal progress bar on stderr (a plain line per log step when not a terminal)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        frac = step / max(self.total, 1)
        eta = row.get("eta_s")
        text = (f"step {step}/{self.total} loss {row['loss']:.3f} lr {row['lr']:.4f} "
                f"{row['images_per_s']:.1f} img/s" + (f" eta {eta / 60:.1f} min" if eta is not None else ""))
        if "val" in row:
            text += (f" | val loss {row['val']['loss']:.3f} box AP {row['val']['bbox_AP']:.3f} "
                     f"mask AP {row['val']['segm_AP']:.3f}")
        if self.tty:
            bar = "#" * int(frac * 24)
            sys.stderr.write(f"\r[{bar:<24}] {text}\x1b[K")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def amp_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype ``device`` runs natively: float16 on CUDA; bfloat16 on a CPU with bf16
    instructions (AVX512-BF16 or AMX: oneDNN's bf16 convolutions then train the bundled recipe at 1.4-1.5x
    float32's images/s, benchmarks/train_throughput.py); None elsewhere, where bf16 is emulated and slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and _cpu_has_bf16():
        return torch.bfloat16
    return None


def _cpu_has_bf16() -> bool:
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


# A training step keeps at least this many bytes per input pixel for the backward pass (measured peak memory
# growth per image at 256 px: 570 for the tests' smallest architecture, 950 for the light one; 630 at 512 px).
TRAIN_BYTES_PER_PIXEL = 384


def check_batch_fits(batch_size: int, arch: dict, device: torch.device) -> None:
    """Refuse a batch whose training step cannot fit in the memory available now (a lower estimate:
    batch_size images of the model's smallest input size), before any work is done."""
    sizes = arch.get("min_size", 800)
    side = min(sizes) if isinstance(sizes, (list, tuple)) else int(sizes)
    need = batch_size * side * side * TRAIN_BYTES_PER_PIXEL
    if device.type == "cpu":
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's processes share this memory
    available = _available_memory(device)
    if available is not None and need > available:
        raise TrainingError(f"batch size {batch_size} at {side} px needs at least {need / 2**30:.1f} GiB for a "
                            f"training step, but {available / 2**30:.1f} GiB of {device.type} memory is available; "
                            "lower --batch-size or --image-size")


def _available_memory(device: torch.device) -> int | None:
    """Bytes the process can still allocate on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def validation_losses(model: torch.nn.Module, val_ds, device: torch.device, batch_size: int) -> dict[str, float]:
    """{"loss", and each of LOSS_TERMS}: the mean per image over ``val_ds``. torchvision returns losses only in
    training mode, so the pass runs in it, but changes nothing: no gradients; norm layers that keep running
    statistics normalise with them and do not update them; the random stream that the RPN and RoI sampling
    draw from is put back, so the training run goes on as it would have without validation."""
    modes = {module: module.training for module in model.modules()}
    rng = _rng_state()
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    try:
        model.train()
        for module in model.modules():
            if getattr(module, "track_running_stats", False):  # BatchNorm (R50); GroupNorm keeps no statistics
                module.eval()
        with torch.no_grad():
            for start in range(0, len(val_ds), batch_size):
                items = [val_ds[i] for i in range(start, min(start + batch_size, len(val_ds)))]
                images = [image.to(device) for image, _ in items]
                targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in target.items()}
                           for _, target in items]
                for term, value in model(images, targets).items():
                    sums[term] += float(value) * len(items)
    finally:
        for module, training in modes.items():
            module.training = training
        _set_rng_state(rng)
    means = {term: round(total / len(val_ds), 6) for term, total in sums.items()}
    return {"loss": round(sum(means.values()), 6), **means}


def _val_metrics(model, val_ds, device) -> dict:
    result = evaluate(model, val_ds, device=device, categories=val_ds.categories)
    return {"bbox_AP": result.bbox["AP"], "segm_AP": result.segm["AP"],
            "bbox_AP50": result.bbox["AP50"], "segm_AP50": result.segm["AP50"]}


__all__ = ["TrainConfig", "TrainResult", "train", "lr_factor", "remap_class_weights", "StepBatches", "LOSS_TERMS",
           "validation_losses", "count_trainable", "freeze_backbone", "default_trainable_layers",
           "prepare_for_training"]
