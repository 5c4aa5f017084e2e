"""Training engine behind `python -m mrcnn train` (docs/cli.md, docs/training.md).

    python -m mrcnn train --model light --data shapes:100000:0:256 --steps 3000 --batch-size 8 \
        --lr 0.03 --out runs/shapes                       # from scratch on generated scenes
    python -m mrcnn train --model shapes --data DIR --val VAL_DIR --steps 200 --out runs/ft
    python -m mrcnn train ... --out runs/ft --resume       # continue exactly where it stopped
    torchrun --nproc-per-node 2 -m mrcnn train ...        # DDP (gloo on CPU, nccl on CUDA)

    result = train(TrainConfig(model="shapes", data="DIR", steps=100, out="runs/x"),
                   progress=print, should_stop=lambda: False)

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

import contextlib
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
from mrcnn.model.architectures import ARCHITECTURES, build_model, light_arch
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
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# Every numeric setting's range. Those in OPTIONAL_SETTINGS may also be None (the default).
INTEGER_SETTINGS = {
    "steps": Interval(1, MAX_STEPS), "batch_size": Interval(1, MAX_BATCH_SIZE),
    "warmup_steps": Interval(0, MAX_STEPS), "log_every": Interval(1, MAX_STEPS),
    "val_every": Interval(0, MAX_STEPS), "checkpoint_every": Interval(0, MAX_STEPS),
    "seed": Interval(0, MAX_SEED), "num_workers": Interval(0, 64), "threads": Interval(1, 1024),
    "image_size": Interval(32, MAX_IMAGE_SIZE), "val_num": Interval(1, 10**9),
}
FLOAT_SETTINGS = {
    "lr": Interval(0, 10, low_open=True, high_open=True), "momentum": Interval(0, 1, high_open=True),
    "weight_decay": Interval(0, 1, high_open=True), "warmup_factor": Interval(0, 1),
    "min_lr_ratio": Interval(0, 1), "clip_grad_norm": Interval(0, math.inf, high_open=True),  # 0: no clipping
}
OPTIONAL_SETTINGS = {"weights", "arch", "val", "val_num", "lr", "clip_grad_norm", "image_size", "threads", "export"}
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

class StepBatches(torch.utils.data.Dataset):
    """Item ``s`` = this process's batch for optimizer step ``s``, a pure function of (seed, s, rank).

    Indices come from torch's DistributedSampler (one shuffled permutation per epoch, split between
    ranks); augmentation runs under a RNG seeded from (seed, s, rank). So batches don't depend on
    worker processes or on where a run was resumed.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
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
            items = [self.dataset[i] for i in self.batch_indices(step)]
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
            text += f" | val box AP {row['val']['bbox_AP']:.3f} mask AP {row['val']['segm_AP']:.3f}"
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


def _val_metrics(model, val_ds, device) -> dict:
    result = evaluate(model, val_ds, device=device, categories=val_ds.categories)
    return {"bbox_AP": result.bbox["AP"], "segm_AP": result.segm["AP"],
            "bbox_AP50": result.bbox["AP50"], "segm_AP50": result.segm["AP50"]}


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
    try:
        return _train(config, out, device, dist_info, progress, should_stop, verbose)
    except MrcnnError as err:
        if dist_info.is_main:
            write_status(out, "failed", str(err))
        raise
    except BaseException as err:
        if dist_info.is_main:
            write_status(out, "failed", f"{type(err).__name__}: {err}")
        raise


def _train(cfg: TrainConfig, out: Path, device: torch.device, di: DistInfo, progress, should_stop,
           verbose: bool) -> TrainResult:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if (verbose and di.is_main) else (lambda msg: None)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    ckpt_path = out / "checkpoint.pt"
    metrics_path = out / "metrics.jsonl"
    stop_file = out / "STOP"

    resume_ckpt = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise TrainingError(f"--resume: {ckpt_path} does not exist; nothing to resume")
        resume_ckpt = load_checkpoint(ckpt_path)
        if "train_state" not in resume_ckpt:
            raise TrainingError(f"--resume: {ckpt_path} has no training state (an exported model?)")
    elif ckpt_path.is_file():
        raise TrainingError(f"{out} already holds a run (checkpoint.pt); use --resume to continue it "
                            "or choose another --out")
    if di.is_main:
        stop_file.unlink(missing_ok=True)  # a stale flag from the run being resumed
        for leftover in remove_stale_temp_files(out):  # a write killed mid-way, e.g. a checkpoint's by SIGKILL
            log(f"removed {leftover.name}, left by a write that did not finish")
    if di.enabled:
        torch.distributed.barrier()

    # data and model ------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    transforms = None
    if cfg.augment:
        transforms = train_transforms()
    if resume_ckpt is not None:
        categories = list(resume_ckpt["categories"])
        train_ds = open_data(cfg.data, categories, transforms)
        arch = dict(resume_ckpt["arch"])
        model = build_model(arch, len(categories))
        load_state_dict_checked(model, resume_ckpt["state_dict"], ckpt_path)
    else:
        train_ds = open_data(cfg.data, None, transforms)
        categories = list(train_ds.categories)
        model, arch = _starting_model(cfg, categories, log)
    if len(train_ds) == 0:
        raise DatasetError(f"training data {cfg.data} has no images")
    val_ds = None
    if cfg.val and di.is_main:
        val_ds = first_items(open_data(cfg.val, categories), cfg.val_num)

    check_batch_fits(cfg.batch_size, arch, device)
    use_cuda = device.type == "cuda"
    autocast_dtype = amp_dtype(device) if cfg.amp else None
    use_amp = autocast_dtype is not None
    use_scaler = autocast_dtype == torch.float16  # bfloat16 has float32's range: nothing to scale
    precision = str(autocast_dtype or torch.float32).removeprefix("torch.")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # norms and biases: no weight decay
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.peak_lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_step, elapsed_before, last_val = 0, 0.0, None
    if resume_ckpt is not None:
        st = resume_ckpt["train_state"]
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        _set_rng_state(st["rng"])
        start_step = int(st["step"])
        elapsed_before = float(st.get("elapsed_s", 0.0))
        last_val = resume_ckpt["meta"].get("metrics") or None
        log(f"resuming {out} at step {start_step}/{cfg.steps}")

    train_model = model
    if di.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if use_cuda else None, find_unused_parameters=True)

    if di.is_main:
        write_json(out / "config.json", {**cfg.to_dict(), "arch": arch, "categories": categories,
                                          "world_size": di.world_size, "device": str(device),
                                          "precision": precision})
        truncate_metrics(metrics_path, start_step)

    def meta(step: int) -> dict:
        return {"data": cfg.data, "val": cfg.val, "steps": step,
                "recipe": {k: v for k, v in cfg.to_dict().items()
                           if k not in ("out", "resume", "device", "num_workers", "export", "threads")},
                "world_size": di.world_size, "metrics": last_val or {},
                "training_time_s": round(elapsed_before + time.time() - t_start, 1),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def save(step: int) -> None:
        if not di.is_main:
            return
        state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if use_scaler else {}, "rng": _rng_state(),
                 "elapsed_s": elapsed_before + time.time() - t_start, "config": cfg.to_dict()}
        save_checkpoint(ckpt_path, arch, categories, model.state_dict(), meta(step), extra={"train_state": state})

    batches = StepBatches(train_ds, cfg.batch_size, cfg.seed, di.rank, di.world_size)
    loader = _loader(batches, start_step, cfg.steps, cfg.num_workers)
    bar = _Bar(cfg.steps, verbose and di.is_main)
    rows: list[dict] = []
    float32_retries = 0

    def forward(images, targets, mixed: bool):
        """(loss terms, loss, whether the loss is finite on every rank). The ranks agree before any
        backward: one rank skipping it would leave the others waiting in DDP's gradient all-reduce."""
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=mixed):
            terms = train_model(images, targets)
        total = sum(terms.values())
        ok = bool(torch.isfinite(total))
        if di.enabled:
            flag = torch.tensor([0.0 if ok else 1.0], device=device)
            torch.distributed.all_reduce(flag)
            ok = flag.item() == 0
        return terms, total, ok

    sums = {k: 0.0 for k in (*LOSS_TERMS, "loss")}
    n_sum, images_since, t_log = 0, 0, time.time()
    t_start = time.time()
    step = start_step
    state, message = "finished", ""

    with _Stopper(stop_file, should_stop) as stopper, (metrics_path.open("a") if di.is_main else
                                                        contextlib.nullcontext()) as mfile:
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            lr = optimizer.param_groups[0]["lr"]
            loss_dict, loss, finite = forward(images, targets, use_amp)
            if not finite and use_amp:
                # Mixed precision ran out on this batch (bfloat16 did once in the 4000 steps of the bundled
                # recipe): redo it in float32; only a loss that is not finite there stops the run.
                float32_retries += 1
                log(f"step {step + 1}: the loss is not finite in {precision}; "
                    "computing this step in float32")
                loss_dict, loss, finite = forward(images, targets, False)
            grad_norm = None
            if finite:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad_norm:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
                    if not use_scaler and not bool(torch.isfinite(grad_norm)):
                        finite = False  # (with float16 the scaler skips such steps by itself)
            stop_reason = stopper.reason()
            if di.enabled:  # every rank must take the same decision, or the others hang
                flags = torch.tensor([0.0 if finite else 1.0, 1.0 if stop_reason else 0.0], device=device)
                torch.distributed.all_reduce(flags)
                finite = finite and flags[0].item() == 0
                if flags[1].item() > 0 and not stop_reason:
                    stop_reason = "stop requested on another process"
            if not finite:
                terms = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in loss_dict.items())
                message = (f"training stopped at step {step + 1}: the loss is not finite ({terms}"
                           f"{', gradient norm ' + format(float(grad_norm), '.4g') if grad_norm is not None else ''})."
                           f" The last good checkpoint ({ckpt_path.name}, step "
                           f"{_saved_step(ckpt_path)}) is kept. Try a lower --lr (now {cfg.peak_lr:g}) or more "
                           "warm-up steps.")
                raise TrainingError(message)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1

            for k, v in loss_dict.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] += float(loss.detach())
            n_sum += 1
            images_since += len(images) * di.world_size

            # the same on every rank (the logging below all-reduces); only rank 0 evaluates
            want_val = bool(cfg.val) and bool((cfg.val_every and step % cfg.val_every == 0) or step == cfg.steps)
            if step % cfg.log_every == 0 or step == cfg.steps or want_val or stop_reason:
                now = time.time()
                avg = {k: v / n_sum for k, v in sums.items()}
                if di.enabled:
                    vec = torch.tensor([avg[k] for k in sorted(avg)], device=device)
                    torch.distributed.all_reduce(vec)
                    avg = {k: float(x) / di.world_size for k, x in zip(sorted(avg), vec)}
                elapsed = elapsed_before + now - t_start
                row = {"step": step, **{k: round(avg.get(k, 0.0), 6) for k in LOSS_TERMS},
                       "loss": round(avg["loss"], 6), "lr": lr,
                       "images_per_s": round(images_since / max(now - t_log, 1e-9), 3),
                       "elapsed": round(elapsed, 2)}
                if float32_retries:
                    row["float32_retries"] = float32_retries  # steps redone in float32 so far (this run)
                if step > start_step:
                    row["eta_s"] = round((now - t_start) / (step - start_step) * (cfg.steps - step), 1)
                if want_val and val_ds is not None:
                    last_val = _val_metrics(model, val_ds, device)
                    row["val"] = last_val
                    model.train()
                if di.is_main:
                    mfile.write(json.dumps(row) + "\n")
                    mfile.flush()
                    rows.append(row)
                    bar.update(step, row)
                    if progress is not None:
                        progress(row)
                sums = {k: 0.0 for k in sums}
                n_sum, images_since, t_log = 0, 0, time.time()
            if stop_reason:
                state, message = "cancelled", f"cancelled at step {step}/{cfg.steps} ({stop_reason})"
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save(step)
        bar.close()
    if di.enabled:
        torch.distributed.barrier()
    save(step)
    if state == "finished":
        message = f"finished {step} steps"
        if cfg.export and di.is_main:
            save_checkpoint(cfg.export, arch, categories, model.state_dict(), meta(step), half=cfg.export_half)
    if di.is_main:
        write_status(out, state, message)
    log(message)
    if di.enabled:
        torch.distributed.barrier()
    return TrainResult(state, message, step, str(ckpt_path), rows, last_val, elapsed_before + time.time() - t_start)


def _saved_step(path: Path) -> int | str:
    if not path.is_file():
        return "none saved yet"
    try:
        return int(load_checkpoint(path, mmap=True)["train_state"]["step"])
    except (CheckpointError, KeyError):
        return "?"


__all__ = ["TrainConfig", "TrainResult", "train", "lr_factor", "remap_class_weights", "StepBatches", "LOSS_TERMS"]
