"""A training run's settings (TrainConfig, checked on creation: one line naming the first bad setting), what a
run returns (TrainResult), and the learning rate per step they give (lr_factor). docs/cli.md lists them;
RUN_DIR/config.json and every checkpoint store them.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

from mrcnn.errors import TrainingError

# torchvision's Mask R-CNN loss terms: every metrics row and validation report each of them
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


__all__ = ["TrainConfig", "TrainResult", "lr_factor", "LOSS_TERMS", "BACKBONE_STAGES", "SCHEDULES",
           "INTEGER_SETTINGS", "FLOAT_SETTINGS"]
