"""Checkpoints in the format of docs/checkpoints.md, written atomically and read with ``weights_only=True``.

``{"format": "mrcnn-checkpoint", "version": 1, "arch": {...}, "categories": [...],
"state_dict": {...}, "meta": {...}}`` — tensors and plain Python types only, never pickled objects.
"""
from __future__ import annotations

import math
import pickle
import threading
import unicodedata
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrcnn.errors import CheckpointError
from mrcnn.files import atomic_torch_save
from mrcnn.model.architectures import check_arch

FORMAT = "mrcnn-checkpoint"
VERSION = 1

# warnings.catch_warnings swaps process-wide state: two threads (app sessions) inside it at once could leave
# every warning of the process silenced, so loads take turns.
_QUIET_LOAD = threading.Lock()


def make_checkpoint(arch: dict, categories: list[str], state_dict: dict, meta: dict | None = None,
                    half: bool = False) -> dict:
    """Assemble a checkpoint dict; ``half`` stores floating tensors as fp16 (they load back as fp32)."""
    if not categories or categories[0] != "__background__":
        raise ValueError("categories must start with '__background__'")
    sd = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        sd[k] = v.half() if half and v.is_floating_point() else v.clone()
    return {"format": FORMAT, "version": VERSION, "arch": dict(arch), "categories": list(categories),
            "state_dict": sd, "meta": dict(meta or {})}


def save_checkpoint(path: str | Path, arch: dict, categories: list[str], state_dict: dict,
                    meta: dict | None = None, half: bool = False, extra: dict | None = None) -> Path:
    """Save atomically. ``extra`` adds keys (e.g. optimizer state for resuming) beside the format's keys."""
    ckpt = make_checkpoint(arch, categories, state_dict, meta, half)
    if extra:
        ckpt.update(extra)
    atomic_torch_save(ckpt, path)
    return Path(path)


def read_torch_file(path: str | Path, mmap: bool = False) -> Any:
    """torch.load(weights_only=True) with every failure turned into one CheckpointError naming the file.
    ``mmap`` maps tensors lazily instead of reading them: cheap when only the metadata is wanted."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    try:
        # torch warns on stderr about what the checks below refuse with one line anyway (an old pickle
        # protocol, sparse tensors it validates): a user should see only that line
        with _QUIET_LOAD, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch.load raises many kinds on garbage; all mean "not readable"
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            # weights_only refuses pickled objects: a foreign or unsafe file
            detail = next((line for line in str(err).splitlines() if "Unsupported" in line), msg)
            reason = f"not a safe checkpoint (it holds pickled Python objects: {detail.strip()[:160]})"
        elif "central directory" in msg or isinstance(err, EOFError) or _starts_like_zip(path):
            reason = f"file is truncated or corrupt ({msg[:160]})"
        else:
            reason = f"not a PyTorch checkpoint file ({type(err).__name__}: {msg[:160]})"
        raise CheckpointError(f"{path}: {reason}") from None


def _starts_like_zip(path: Path) -> bool:
    """torch.save writes zip archives: a file that starts like one but does not parse was cut short."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def is_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Read and check a checkpoint (docs/checkpoints.md); raises CheckpointError naming the file and the problem.
    ``mmap`` (the metadata wanted, not the weights) skips the one check that reads every weight: finite values."""
    return check_checkpoint(read_torch_file(path, mmap=mmap), path, values=not mmap)


def check_checkpoint(obj: Any, path: str | Path, values: bool = True) -> dict:
    """``obj`` (what read_torch_file returned for ``path``) as a checkpoint, or a CheckpointError naming ``path``
    and the problem. ``values``: also require finite weights (check_tensors)."""
    if not is_checkpoint(obj):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(
                f"{path}: a raw state dict, not an mrcnn checkpoint; name its architecture "
                "(e.g. --model coco-r50-fpn --weights FILE)")
        raise CheckpointError(f"{path}: not an mrcnn checkpoint (no 'format': '{FORMAT}' key)")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {obj.get('version')!r} is not supported (expected {VERSION})")
    for key, kind in (("arch", dict), ("categories", list), ("state_dict", dict)):
        if not isinstance(obj.get(key), kind):
            raise CheckpointError(f"{path}: checkpoint is missing '{key}' or it is not a {kind.__name__}")
    check_categories(obj["categories"], path)
    if not isinstance(obj.setdefault("meta", {}), dict):
        raise CheckpointError(f"{path}: 'meta' must be a dict")
    try:
        check_arch(obj["arch"])
    except ValueError as err:
        raise CheckpointError(f"{path}: bad architecture: {err}") from None
    check_tensors(obj["state_dict"], path, values=values)
    return obj


def class_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a class, or None: it must show something and hold no control or format
    characters (a newline in a class name broke the one-line messages and the CSV rows that name it)."""
    if not name.strip():
        return "is empty"
    odd = next((ch for ch in name if unicodedata.category(ch)[0] == "C"), None)
    return f"holds the control character {odd!r}" if odd is not None else None


def check_categories(categories: list, path: str | Path) -> None:
    """Background first, then distinct names: results, filters and training match classes by name."""
    if not categories or categories[0] != "__background__":
        raise CheckpointError(f"{path}: categories must start with '__background__'")
    if not all(isinstance(c, str) for c in categories):
        raise CheckpointError(f"{path}: categories must be names (strings)")
    for i, name in enumerate(categories):
        problem = class_name_problem(name)
        if problem is not None:
            raise CheckpointError(f"{path}: the name of category {i} {problem}")
    seen = set()
    for name in categories:
        if name in seen:
            raise CheckpointError(f"{path}: category {name!r} is named more than once; class names must be distinct")
        seen.add(name)


def check_tensors(state_dict: dict, path: str | Path, values: bool = True) -> None:
    """Every entry a dense tensor of real numbers that holds data and, with ``values``, only finite ones; else a
    CheckpointError naming the first key that is not. load_state_dict fails on sparse or meta tensors with a
    traceback, casts complex ones to real, and NaN or infinite weights run but detect nothing."""
    for key, tensor in state_dict.items():
        where = f"{path}: state_dict[{key!r}]"
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{where} is a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided:
            raise CheckpointError(f"{where} is a {str(tensor.layout).removeprefix('torch.')} tensor; "
                                  "weights must be dense tensors")
        if tensor.is_meta:
            raise CheckpointError(f"{where} holds no values (a meta tensor: a shape without data)")
        if tensor.is_complex() or tensor.is_quantized:
            raise CheckpointError(f"{where} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                  "weights must be real numbers")
        if values and tensor.is_floating_point() and not _all_finite(tensor):
            kind = "NaN" if bool(tensor.float().isnan().any()) else "infinite"
            raise CheckpointError(f"{where} holds {kind} values; the weights are broken")


def _all_finite(tensor: torch.Tensor) -> bool:
    """NaN and inf carry through a sum: one vectorised pass with no copy (isfinite would allocate a mask).
    float32/64 by numpy's sum, on one thread: torch's splits a tensor among threads that wait on each other when
    the cores are busy (R50's weights: ~20 ms either way on an idle core, torch's 0.15-1 s on two loaded ones).
    float16 by torch's (numpy's is ~15x slower). Only a non-finite sum is looked at element by element:
    finite fp16 values can overflow one."""
    tensor = tensor.detach()  # a saved Parameter: no autograd
    if tensor.dtype in (torch.float32, torch.float64) and tensor.device.type == "cpu":
        with np.errstate(all="ignore"):  # inf - inf is NaN here, no warning: the answer is the same
            total = np.add.reduce(tensor.numpy(), axis=None)
    else:
        try:
            total = tensor.sum()
        except (NotImplementedError, RuntimeError):  # float8 has no sum on a CPU: a rare file, copied
            total = tensor.float().sum()
    if math.isfinite(total):
        return True
    return bool(torch.isfinite(tensor.float()).all())


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict, source: str | Path) -> None:
    """load_state_dict(strict) with a clear error: missing/unexpected keys and shape mismatches, first few named."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source}: weights do not match the architecture: " + "; ".join(parts))
    bad = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
           if tuple(state_dict[k].shape) != tuple(v.shape)]
    if bad:
        first = ", ".join(f"{k} {a} vs model {b}" for k, a, b in bad[:3])
        hint = ""
        if any("cls_score" in k or "mask_fcn_logits" in k for k, _, _ in bad):
            hint = " (the number of classes differs)"
        raise CheckpointError(f"{source}: {len(bad)} tensors have the wrong shape{hint}: {first}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)
