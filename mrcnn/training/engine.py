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
(mrcnn.training.devices.amp_dtype); weights and optimizer stay float32. A step whose loss is not finite in
mixed precision is redone in float32; a loss that is not finite there stops the run, keeping the last good
checkpoint.

Its parts, in the order a run uses them: config (TrainConfig), devices (processes, precision, memory),
batches (StepBatches), starting_model (weights and what trains), validation; this module runs the steps.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mrcnn.data.sources import first_items, open_data
from mrcnn.data.transforms import train_transforms
from mrcnn.errors import CheckpointError, DatasetError, MrcnnError, TrainingError
from mrcnn.files import remove_stale_temp_files, removing_new_empty_folders
from mrcnn.inference.input_size import check_input_size
from mrcnn.model.architectures import build_model
from mrcnn.model.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from mrcnn.model.zoo import resolve_device
from mrcnn.training.batches import BatchInterrupted, StepBatches, step_loader
from mrcnn.training.config import BACKBONE_STAGES, LOSS_TERMS, TrainConfig, TrainResult, lr_factor
from mrcnn.training.devices import (DistInfo, amp_dtype, any_rank, check_batch_fits, init_distributed,
                                    launched_rank, rng_state, set_rng_state)
from mrcnn.training.run_files import (RUN_FILES, is_number, is_run_status, truncate_metrics, write_json,
                                      write_status)
from mrcnn.training.starting_model import count_trainable, prepare_for_training, starting_model
from mrcnn.training.validation import validation_losses, validation_metrics


def train(config: TrainConfig, progress: Callable[[dict], None] | None = None,
          should_stop: Callable[[], bool] | None = None, verbose: bool = True) -> TrainResult:
    """Run (or resume) training as ``config`` says. Returns a TrainResult; a failure that stops the
    run (non-finite loss, bad data) raises TrainingError / DatasetError after writing status.json. A run
    refused before its first step removes the folders it created instead (a folder that was there gets
    the status: the app's page reads it)."""
    config.validate()  # again: a dataclass can be changed after it was built
    out = Path(config.out)
    # refused before anything is written: the folder may hold another run, or the user's own files
    _check_run_folder(config, out)
    resume_ckpt = _checkpoint_to_resume(config, out / "checkpoint.pt")
    # Under torchrun rank 0 alone makes (and on a refusal removes) the folder, before the ranks meet: were
    # each rank to look, a rank that made it first would leave rank 0 taking it for the user's own folder.
    main_process = launched_rank() == 0
    created = main_process and not out.exists()  # a run refused before its first step removes it
    with removing_new_empty_folders(out) if main_process else nullcontext():  # and the parents it made
        if main_process:
            out.mkdir(parents=True, exist_ok=True)
        stepping = False
        try:
            device = resolve_device(config.device)
            dist_info = init_distributed(device.type)
        except BaseException:
            if created:
                _remove_run_files(out)
            raise
        if dist_info.enabled and device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
            torch.cuda.set_device(device)
        try:
            # caught from the start: a cancel during the setup stops the run at its first step
            with _Stopper(out / "STOP", should_stop) as stopper:
                run = setup_run(config, resume_ckpt, out, device, dist_info,
                                _stderr_log(verbose and dist_info.is_main))
                stepping = True
                with _MetricLogger(run, progress, verbose) as metric_logger:
                    state, message = train_steps(run, stopper, metric_logger)
                return finish_run(run, state, message, metric_logger.rows)
        except BaseException as err:
            folder_deleted = not out.is_dir()  # then the status would recreate a folder the user deleted
            if dist_info.is_main and not stepping and created:
                # refused before its first step (bad data, settings that do not fit): nothing to keep or resume
                _remove_run_files(out)
            elif dist_info.is_main and not folder_deleted:
                write_status(out, "failed", str(err) if isinstance(err, MrcnnError) else f"{type(err).__name__}: {err}")
            if folder_deleted and not isinstance(err, MrcnnError):
                raise TrainingError(f"the run folder {out} was deleted while training "
                                    f"({type(err).__name__}: {err})") from err
            raise


def _check_image_sizes(model: torch.nn.Module, data: str | None, ds) -> None:
    """Before the first step: an image the model's resize would make 0 px on a side (a 1000x1 strip) is one
    line naming it, not a torch error mid-run. Generated scenes are square and have no sizes to check."""
    base = getattr(ds, "dataset", ds)  # first_items' Subset holds the dataset
    sizes = base.image_sizes() if hasattr(base, "image_sizes") else []
    for name, height, width in sizes[:len(ds)]:
        check_input_size(model, height, width, f"{data}: {name}", training=True)


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
        if len(categories) < 2:  # the background alone: nothing to learn (build_model would raise ValueError)
            raise DatasetError(f"training data {cfg.data} has no categories: a model needs at least one class to learn")
        model, arch = starting_model(cfg, categories, log)
    if len(train_ds) == 0:
        raise DatasetError(f"training data {cfg.data} has no images")
    val_ds = first_items(open_data(cfg.val, categories), cfg.val_num) if cfg.val and dist.is_main else None
    for data, ds in ((cfg.data, train_ds), (cfg.val, val_ds)):
        if ds is not None:
            _check_image_sizes(model, data, ds)
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
        run.last_val = row["val"] = {**validation_metrics(run.model, run.val_ds, run.device), **losses}
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
        state = ckpt["train_state"]  # its keys and their types: _checkpoint_to_resume
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:  # e.g. other trainable layers than the run's
            raise TrainingError(f"--resume: the training state in {self.ckpt_path} does not fit this model and "
                                f"these settings ({type(err).__name__}: {err}); resume with the run's own settings") from None
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
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}, "rng": rng_state(),
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
    problem = _train_state_problem(ckpt["train_state"], ckpt["meta"])
    if problem:
        raise TrainingError(f"--resume: {ckpt_path}: the training state {problem}")
    return ckpt


def _train_state_problem(state: Any, meta: dict) -> str | None:
    """What is wrong with a checkpoint's ``train_state`` (as _Run.save writes it), or None."""
    if not isinstance(state, dict):
        return f"must be a dict, got {type(state).__name__}"
    kinds = {"optimizer": dict, "scheduler": dict, "rng": dict, "step": int}
    missing = [key for key in kinds if key not in state]
    if missing:
        return f"has no {', '.join(missing)}"
    for key, kind in (*kinds.items(), ("scaler", dict)):
        if key in state and (not isinstance(state[key], kind) or isinstance(state[key], bool)):
            return f"'{key}' must be a {kind.__name__}, got {type(state[key]).__name__}"
    if state["step"] < 0:
        return f"'step' must be >= 0, got {state['step']}"
    if not isinstance(state["rng"].get("torch"), torch.Tensor):
        return "'rng' has no torch generator state"
    if not is_number(state.get("elapsed_s", 0.0)):
        return f"'elapsed_s' must be a number, got {state['elapsed_s']!r}"
    if not isinstance(meta.get("metrics") or {}, dict):
        return f"comes with meta 'metrics' that is not a dict ({type(meta['metrics']).__name__})"
    return None


def _check_run_folder(cfg: TrainConfig, out: Path) -> None:
    """Refuse an --export onto one of the run's own files (it would replace the checkpoint --resume needs),
    and a new run in a folder holding files it would overwrite that are not a run's (a run is refused by
    _checkpoint_to_resume: --resume continues it)."""
    if cfg.export:
        export = Path(os.path.realpath(cfg.export))
        own = {Path(os.path.realpath(out / name)): name for name in RUN_FILES}
        if export in own:
            raise TrainingError(f"--export {cfg.export} is the run's own {own[export]}; name a file outside the "
                                f"run's files, e.g. {out / 'model.pt'}")
    if not out.is_dir():
        return
    in_the_way = [name for name in RUN_FILES if (out / name).exists() and not (out / name).is_file()]
    if in_the_way:  # e.g. a folder named config.json: the run could not write its own file there
        raise TrainingError(f"--out {out}: {', '.join(in_the_way)} is not a file; choose another --out")
    if cfg.resume or (out / "checkpoint.pt").exists():  # a run: _checkpoint_to_resume
        return
    theirs = [name for name in ("config.json", "metrics.jsonl", "status.json")
              if (out / name).exists() and not (name == "status.json" and is_run_status(out / name))]
    if theirs:
        raise TrainingError(f"--out {out} already holds {', '.join(theirs)}, which a new run would overwrite; "
                            "choose another --out")


def _remove_run_files(out: Path) -> None:
    """Remove what a run refused before its first step wrote (removing_new_empty_folders then removes the
    folders it made, only when empty: someone else's file keeps its folder)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    if out.is_dir():
        remove_stale_temp_files(out)


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
        for images, targets in step_loader(batches, run.step, cfg.steps, cfg.num_workers):
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


__all__ = ["train", "setup_run", "train_steps", "forward_backward", "finish_run"]
