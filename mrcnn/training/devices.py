"""Where a training run computes: its processes (torchrun's DDP: gloo on the CPU, nccl on CUDA), the
mixed precision its device runs natively, whether a batch fits in the memory there, and the random
state of every device (what a checkpoint keeps for an exact resume).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mrcnn.errors import TrainingError


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


def launched_rank() -> int:
    """This process's rank as torchrun's environment gives it, known before the process group exists (0 when
    not launched by torchrun)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def init_distributed(device_kind: str) -> DistInfo:
    """torchrun's environment -> a process group (gloo on the CPU, nccl on CUDA); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist
    info = DistInfo(launched_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return info


def any_rank(dist: DistInfo, device: torch.device, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true when it is true on any rank: the decisions every rank must take together."""
    if not dist.enabled:
        return flags
    votes = torch.tensor([float(flag) for flag in flags], device=device)
    torch.distributed.all_reduce(votes)
    return tuple(bool(vote > 0) for vote in votes)


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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["DistInfo", "init_distributed", "any_rank", "amp_dtype", "check_batch_fits", "rng_state", "set_rng_state",
           "TRAIN_BYTES_PER_PIXEL"]
