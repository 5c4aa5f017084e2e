"""Inference precision: ``float32`` (exact), ``bfloat16``, ``float16``, or ``auto`` (the fastest one the
device runs natively, unless it missed its fidelity target on the model).

    choice = choose_precision("auto", device, fidelity=card.get("precision_fidelity"))
    prepare_model(model, choice.precision)        # at load time, on the model's own copy
    with stage_autocast(choice.precision, device):  # around each network stage
        features = model.backbone(images)           # float32 out, whatever ran inside

Native means the hardware has the units: CUDA runs float16 (and bfloat16 where the GPU has it); a CPU runs
bfloat16 when it has AVX512-BF16 or AMX (``avx512_bf16`` / ``amx_bf16`` in /proc/cpuinfo). Elsewhere
bfloat16 is emulated: on this 2-core AMD EPYC (AVX2 only) the bundled model took about 3x float32's time,
R50 25x, so it is refused with the reason instead of being run.

Only the network stages (convolutions and linear layers) run in the reduced precision; every stage hands
back float32 (``prepare_model``'s output casts), so what the user looks at (feature maps, probabilities)
and everything computed from it (box decoding, NMS, mask pasting) stays float32. The trace takes the
backbone's maps before that cast, hands them to the RPN head as they are and keeps its own float32 copy
(docs/trace.md, "Precision"). A reduced-precision model also gets channels_last weights: NHWC convolutions
are oneDNN's and cuDNN's fast path for bfloat16/float16 (the issue's R50 on an AVX512-BF16 CPU: 0.45x
float32's time with autocast, 0.41x with channels_last too). float32 leaves the model exactly as it was loaded.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from mrcnn.errors import MrcnnError

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
REDUCED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")
# Fidelity targets (issue 17): AP may drop at most this much below float32's ...
AP_TOLERANCE = 0.005
# ... and this share of float32's detections must be matched (same label, box IoU >= 0.95, score within 0.02).
MIN_MATCHED_SHARE = 0.97


def read_cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where there is none."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_model_name() -> str:
    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return "unknown CPU"


def cpu_has_native_bf16() -> bool:
    return bool(CPU_BF16_FLAGS & read_cpu_flags())


def native_precisions(device: torch.device) -> list[str]:
    """The precisions ``device`` runs natively, fastest last."""
    if device.type == "cuda":
        return ["float32"] + (["bfloat16"] if torch.cuda.is_bf16_supported() else []) + ["float16"]
    return ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else [])


def fast_precision(device: torch.device) -> str:
    """The fastest precision ``device`` runs natively: float16 on CUDA, bfloat16 on a CPU with bf16 units."""
    return native_precisions(device)[-1]


def unavailable_reason(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` is not run on ``device`` (one line), or None when it is."""
    if precision in ("auto", "float32") or precision in native_precisions(device):
        return None
    if precision == "float16":
        return f"float16 runs natively only on a CUDA device; this model runs on {device}"
    if device.type == "cuda":
        return f"bfloat16 is not supported by this GPU ({torch.cuda.get_device_name(device)})"
    return (f"bfloat16 is not native on this CPU ({cpu_model_name()}: neither avx512_bf16 nor amx_bf16 in "
            f"{CPUINFO}); emulated it is slower than float32")


def fidelity_failure(fidelity: dict | None, precision: str) -> str | None:
    """Why ``precision`` missed its fidelity target on a model, from the model's fidelity record
    (mrcnn.evaluation.fidelity), or None when it met it or was not measured."""
    entry = (fidelity or {}).get(precision) if isinstance(fidelity, dict) else None
    if isinstance(entry, dict) and entry.get("ok") is False:
        return f"{precision} missed its fidelity target on this model ({entry.get('summary', 'see its card')})"
    return None


def combine_fidelity(*records: dict | None) -> dict:
    """One fidelity record from several (a model card's AP per precision, a precision check's matched
    detections): per precision, an entry that missed its target wins, so ``auto`` avoids a precision that
    any measurement failed."""
    combined: dict = {}
    for record in records:
        for name, entry in (record.items() if isinstance(record, dict) else ()):
            if isinstance(entry, dict) and (name not in combined or entry.get("ok") is False):
                combined[name] = entry
    return combined


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # float32 | bfloat16 | float16: what runs
    requested: str  # what was asked for (auto included)
    note: str = ""  # why auto did not pick the device's fast precision, or a caveat of an explicit choice


def check_precision_name(precision: str) -> str:
    if precision not in PRECISIONS:
        raise MrcnnError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    return precision


def choose_precision(requested: str, device: torch.device, fidelity: dict | None = None) -> PrecisionChoice:
    """What runs for ``requested`` on ``device``. An explicit precision the device lacks is refused with
    the reason (MrcnnError); ``auto`` takes the fast precision unless the model's fidelity record says it
    missed its target, and then says so in ``note``."""
    check_precision_name(requested)
    reason = unavailable_reason(requested, device)
    if reason is not None:
        raise MrcnnError(f"precision {requested}: {reason} (use auto or float32)")
    if requested != "auto":
        return PrecisionChoice(requested, requested, fidelity_failure(fidelity, requested) or "")
    fast = fast_precision(device)
    if fast == "float32":
        why = (f"this CPU ({cpu_model_name()}) has no native bfloat16 (avx512_bf16 or amx_bf16)"
               if device.type == "cpu" else f"{device} has no faster native precision")
        return PrecisionChoice("float32", "auto", why)
    failed = fidelity_failure(fidelity, fast)
    if failed is not None:
        return PrecisionChoice("float32", "auto", failed)
    return PrecisionChoice(fast, "auto")


def stage_autocast(precision: str, device: torch.device):
    """The context a network stage runs in: autocast to the reduced dtype, or nothing for float32."""
    dtype = REDUCED_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_float32(value):
    """Tensors (in lists, tuples and dicts, as the stages return them) as contiguous float32; the rest
    unchanged. Contiguous in the same copy: torchvision's RoIAlign copied channels_last feature maps once
    per call otherwise (eight calls per R50 run, ~100 ms here)."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.float32, memory_format=torch.contiguous_format) if value.is_floating_point() else value
    if isinstance(value, OrderedDict):
        return OrderedDict((k, to_float32(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def _float32_output(module, inputs, output):
    return to_float32(output)


def stage_outputs(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose outputs leave the network's computing parts: backbone+FPN (the feature maps),
    RPN head (objectness and deltas), box predictor (class logits and box deltas), mask predictor (mask
    logits). What runs between them is bookkeeping (anchors, decoding, NMS, RoIAlign) and stays float32."""
    heads = model.roi_heads
    stages = [model.backbone, model.rpn.head, heads.box_predictor]
    if getattr(heads, "mask_predictor", None) is not None:
        stages.append(heads.mask_predictor)
    return stages


def prepare_model(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Make a freshly loaded model (not yet shared) ready for ``precision``: for a reduced one,
    channels_last weights and float32 outputs from each network stage (so torchvision's own forward
    under ``stage_autocast`` decodes boxes in float32, as the trace does). float32: unchanged."""
    if precision not in REDUCED_DTYPES:
        return model
    model.to(memory_format=torch.channels_last)
    for stage in stage_outputs(model):
        stage.register_forward_hook(_float32_output)
    return model
