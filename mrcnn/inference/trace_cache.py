"""One memory budget for the traces of every session on a server, and for the network runs that make them:
least recently used first, feature maps before detections.

    cache = TraceCache(budget_bytes(), max_concurrent_runs())   # $MRCNN_TRACE_CACHE_GB (default 4 GB),
                                                                # $MRCNN_MAX_CONCURRENT_RUNS (default 1)
    trace = cache.get(session_id, key)            # None when absent or evicted
    with cache.network_run(loaded, image.shape) as reservation:   # waits for a run slot, makes room
        trace = run_trace(loaded, image)
        cache.put(session_id, key, trace, reservation)          # the trace takes the reservation's place
    cache.session(session_id)                     # that session's live traces, key -> Trace

A trace is mostly its FPN feature maps (torchvision's R50 at 800×1066: about 75 MB of 100 MB). Over
budget, the cache first drops the feature maps of the least recently used traces, whoever they belong
to (``Trace.drop_features``: their detections still re-filter at once, and the maps come back,
recomputed by the backbone alone, when a page needs them: new masks, RPN knobs, Inspect's views); only
then does it forget whole traces, again least recently used first. The trace used last is never
touched, so a single trace larger than the budget still works.

A network run needs memory too, beyond the trace it leaves: R50 on an 800-px image peaks 500–700 MB above
what the process held before, its trace of ~150 MB included (measured on a CPU). So before a run
(``network_run``; and before a backbone re-run of dropped features, which ``put`` routes through the same
path by ``Trace.backbone_rerun``) the cache reserves an estimate of that run's peak and evicts, by the same
policy, until cached bytes + every reservation in flight ≤ budget; the reservation goes when the trace is
put (it then counts as itself) or when the run ends otherwise, an error included. The estimate is the
network input's pixels (the image resized and padded as the model's transform does) times a figure per
model, device and precision: bytes per input pixel. Its first guess comes from the architecture: every
tensor the backbone, FPN and RPN head output, as if all were held at once, counted on the meta device (no
memory, no compute; R50: 2048 bytes per pixel, 2.5–3.5 times what its runs measure). Each run then
measures its peak growth and the figure becomes the largest measured: the CUDA allocator's peak on a GPU;
elsewhere the resident memory, sampled every few milliseconds (Linux; other systems keep the first guess).
The sample is of the whole process, so what other sessions allocate meanwhile counts as well: on the safe side.
Not in the budget: the models, and each session's own state and pages (benchmarks/many_sessions.py reports
what they hold).

At most ``max_runs`` network runs are in flight at once (``$MRCNN_MAX_CONCURRENT_RUNS``, default 1: one
CPU forward already keeps every core busy, as one GPU forward keeps the GPU, so a second one at once only
shares them and doubles the working memory); a run waits for a slot, ``network_run(waiting=...)`` says
so meanwhile. Runs are not re-entrant: a thread holding a slot must not ask for another.

Sizes are measured on every ``get`` and ``put`` (masks memoised by re-filtering and recomputed feature
maps count from then on). Thread-safe: each session of a Streamlit server runs in its own thread; a
session that holds a trace's feature maps while they are dropped keeps its own reference until it is done.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
import os
import sys
import threading
from collections import OrderedDict
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Callable, Hashable, Iterator

import numpy as np
import torch
from torchvision.models.detection.image_list import ImageList

from mrcnn.env_settings import env_number
from mrcnn.inference.input_size import network_input_size
from mrcnn.inference.trace import Trace
from mrcnn.model.architectures import build_model
from mrcnn.model.zoo import LoadedModel

BUDGET_ENV = "MRCNN_TRACE_CACHE_GB"
DEFAULT_BUDGET_GB = 4.0
MAX_RUNS_ENV = "MRCNN_MAX_CONCURRENT_RUNS"
DEFAULT_MAX_RUNS = 1
# What a trace refers to but does not own: the shared model and the caller's image.
_NOT_OWNED = frozenset({"loaded", "model", "image", "device", "categories"})
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None
_STATM = "/proc/self/statm"
_SAMPLE_SECONDS = 0.004  # resident-memory sampling during a run: a conv layer at 800 px takes longer


def _return_freed_memory() -> None:
    """glibc keeps freed blocks for later allocations, in one arena per thread (feature maps are tens of MB,
    under its adaptive mmap threshold once it has risen), and every session runs in its own thread: give
    them back to the system, or dropped features and a finished run's working memory stay in the RSS."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def budget_bytes() -> float:
    """The server-wide budget: ``$MRCNN_TRACE_CACHE_GB`` gigabytes, else 4 GB. SettingError naming the
    variable for a value that is not a number of 0 or more."""
    return env_number(BUDGET_ENV, DEFAULT_BUDGET_GB, "gigabytes", zero=True) * 1e9


def max_concurrent_runs() -> int:
    """How many network runs the server lets be in flight at once: ``$MRCNN_MAX_CONCURRENT_RUNS``, else 1.
    SettingError naming the variable for a value that is not a whole number of 1 or more."""
    return env_number(MAX_RUNS_ENV, DEFAULT_MAX_RUNS, "runs", whole=True)


def trace_nbytes(trace: Trace) -> int:
    """Bytes held by a trace's tensors and arrays (each storage once), not counting the shared model
    nor the image it was given."""
    seen: set[int] = set()
    total = 0
    # list(...) copies in one C call, under the GIL: the owner's thread may be adding masks meanwhile
    stack = [value for name, value in list(vars(trace).items()) if name not in _NOT_OWNED]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, np.ndarray):
            owner = value if value.base is None else value.base
            if id(owner) not in seen:
                seen.add(id(owner))
                total += owner.nbytes if isinstance(owner, np.ndarray) else value.nbytes
        elif isinstance(value, dict):
            stack.extend(list(value.values()))
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, ImageList):
            stack.append(value.tensors)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            stack.extend(getattr(value, f.name) for f in dataclasses.fields(value))
    return total


# ---- a run's working memory ----------------------------------------------------------------------------
def input_pixels(loaded: LoadedModel, image_shape: tuple[int, ...]) -> int:
    """Pixels of the network input for an image of ``image_shape`` (H, W, ...): resized and padded as the
    model's transform does (torchvision's GeneralizedRCNNTransform at inference)."""
    height, width = network_input_size(loaded.model, image_shape[0], image_shape[1])
    divisor = int(loaded.model.transform.size_divisible)
    return math.ceil(height / divisor) * divisor * math.ceil(width / divisor) * divisor


def architecture_bytes_per_pixel(loaded: LoadedModel) -> float:
    """A conservative first guess of a run's peak memory per input pixel: every tensor the backbone, its FPN
    and the RPN head output, as if all were held at once. Counted on a copy built on the meta device (shapes
    only: no memory, no compute), so the shared model is never touched."""
    side = 256
    with torch.device("meta"):
        model = build_model(loaded.arch, loaded.num_classes).eval()
        image = torch.zeros(1, 3, side, side)
    outputs: dict[int, torch.Tensor] = {}  # by id: an in-place module hands back its input

    def keep_outputs(module, inputs, output) -> None:
        stack = [output]
        while stack:
            value = stack.pop()
            if isinstance(value, torch.Tensor):
                outputs[id(value)] = value
            elif isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)

    for module in (*model.backbone.modules(), *model.rpn.head.modules()):
        module.register_forward_hook(keep_outputs)
    with torch.inference_mode():
        features = model.backbone(image)
        model.rpn.head(list(features.values()))
    return sum(t.numel() * t.element_size() for t in outputs.values()) / side ** 2


def resident_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm)."""
    with open(_STATM) as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakGrowth:
    """How far memory rose above where it was, over a ``with`` block: ``nbytes`` after it, None where it
    cannot be measured. The CUDA allocator's peak on a GPU; elsewhere the process's resident memory,
    sampled by a thread (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.nbytes: float | None = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> "_PeakGrowth":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif os.path.exists(_STATM):
            self._start = self._peak = resident_bytes()
            self._sampler = threading.Thread(target=self._sample, name="trace-cache-rss", daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            self._peak = max(self._peak, resident_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.nbytes = float(torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.nbytes = float(max(self._peak, resident_bytes()) - self._start)


@dataclasses.dataclass
class Reservation:
    """Bytes set aside in the budget for one network run in flight (see ``TraceCache.network_run``)."""

    nbytes: float
    released: bool = False


# ---- the cache -----------------------------------------------------------------------------------------
class TraceCache:
    """Every session's traces, and the network runs in flight, under one byte budget. See the module docstring."""

    def __init__(self, budget: float, max_runs: int = DEFAULT_MAX_RUNS):
        if not (math.isfinite(float(budget)) and budget >= 0):
            raise ValueError(f"the trace cache budget must be 0 or more bytes, got {budget!r}")
        if int(max_runs) < 1:
            raise ValueError(f"at least one network run must be allowed at a time, got {max_runs!r}")
        self.budget = float(budget)
        self.max_runs = int(max_runs)
        self._lock = threading.Lock()
        self._run_slots = threading.BoundedSemaphore(self.max_runs)
        self._sessions: dict[str, OrderedDict[Hashable, Trace]] = {}
        self._sizes: OrderedDict[tuple[str, Hashable], int] = OrderedDict()  # least recently used first
        self._reserved = 0.0  # every reservation in flight
        # model key -> a run's peak per input pixel: the architecture's guess until a run is measured
        self._bytes_per_pixel: dict[tuple, float] = {}
        self._measured: set[tuple] = set()

    def session(self, session_id: str) -> OrderedDict[Hashable, Trace]:
        """That session's live traces (the same dict every time; eviction removes from it)."""
        with self._lock:
            return self._sessions.setdefault(session_id, OrderedDict())

    def get(self, session_id: str, key: Hashable) -> Trace | None:
        with self._lock:
            trace = self._sessions.get(session_id, {}).get(key)
            if trace is not None:
                self._sizes[(session_id, key)] = trace_nbytes(trace)
                self._sizes.move_to_end((session_id, key))
                self._enforce()
            return trace

    def put(self, session_id: str, key: Hashable, trace: Trace, reservation: Reservation | None = None) -> None:
        """Keep a new trace (just run: its network's working memory is handed back too), in place of the
        reservation made for its run. Its feature maps, once dropped, are recomputed through
        ``network_run`` as well."""
        trace.backbone_rerun = partial(self._backbone_rerun, session_id, key)  # not the trace: no cycle
        with self._lock:
            if reservation is not None:
                self._release(reservation)
            self._sessions.setdefault(session_id, OrderedDict())[key] = trace
            self._sizes[(session_id, key)] = trace_nbytes(trace)
            self._sizes.move_to_end((session_id, key))
            self._enforce(always_return_memory=True)

    def forget(self, session_id: str) -> None:
        """Drop every trace of one session (its images were cleared)."""
        with self._lock:
            traces = self._sessions.get(session_id)
            for key in list(traces or ()):
                del self._sizes[(session_id, key)]
            if traces is not None:
                traces.clear()

    @contextmanager
    def network_run(self, loaded: LoadedModel, image_shape: tuple[int, ...],
                    waiting: Callable[[], AbstractContextManager] = nullcontext,
                    learn: bool = True, images: int = 1) -> Iterator[Reservation]:
        """Around one network run of ``loaded`` on an image of ``image_shape`` (or ``images`` such runs side
        by side, an evaluation's round): wait for a run slot (inside ``waiting()`` when none is free at once),
        reserve the run's estimated peak and evict until cached bytes + reservations ≤ budget, then run the
        block. On the way out, every path included, the reservation goes (unless ``put`` took it) and the slot
        is freed; with ``learn``, the run's measured peak updates the model's figure."""
        if not self._run_slots.acquire(blocking=False):
            with waiting():
                self._run_slots.acquire()
        try:
            model_key = loaded.run_key  # a run's memory per pixel: the network, its dtype and layout, the device
            pixels = input_pixels(loaded, image_shape) * max(int(images), 1)
            if model_key not in self._bytes_per_pixel:
                guess = architecture_bytes_per_pixel(loaded)
                self._bytes_per_pixel.setdefault(model_key, guess)
            with self._lock:
                reservation = Reservation(pixels * self._bytes_per_pixel[model_key])
                self._reserved += reservation.nbytes
                # a run that learns gives back what was freed first, or it reuses those blocks and its growth
                # hides; one that does not learn keeps them (its working memory comes back without page faults)
                self._enforce(always_return_memory=learn)
            try:
                with _PeakGrowth(loaded.device) if learn else nullcontext() as growth:  # no sampler thread
                    yield reservation
            finally:
                with self._lock:
                    self._release(reservation)
            if learn and growth.nbytes is not None:
                measured = growth.nbytes / pixels
                with self._lock:  # the first measurement replaces the guess; a larger one raises the figure
                    if model_key in self._measured:
                        measured = max(measured, self._bytes_per_pixel[model_key])
                    self._measured.add(model_key)
                    self._bytes_per_pixel[model_key] = measured
        finally:
            self._run_slots.release()

    def round_slots(self, loaded: LoadedModel, waiting: Callable[[], AbstractContextManager] = nullcontext
                    ) -> Callable[..., AbstractContextManager[Reservation]]:
        """``evaluate``'s ``run_slot`` for many rounds of ``loaded``'s runs: ``slot(image_shape, images)`` is a
        ``network_run`` that learns the run's memory on the first round of each image shape and count only.
        Learning returns freed memory to the system before the run, and the run then faults its working memory
        back in page by page: before every round, the bundled model's evaluation ran at 11.0 images/s instead
        of 14.4 (benchmarks/evaluation_throughput.py, the page's way)."""
        learned: set[tuple] = set()

        def slot(image_shape: tuple[int, ...], images: int = 1) -> AbstractContextManager[Reservation]:
            kind = (tuple(image_shape), int(images))
            first = kind not in learned
            learned.add(kind)
            return self.network_run(loaded, image_shape, waiting=waiting, learn=first, images=images)

        return slot

    def reserved_bytes(self) -> float:
        """Bytes set aside for the runs in flight."""
        with self._lock:
            return self._reserved

    def bytes_per_pixel(self, loaded: LoadedModel) -> float | None:
        """The figure a run of ``loaded`` reserves by, per input pixel (None before its first run)."""
        with self._lock:
            return self._bytes_per_pixel.get(loaded.run_key)

    @property
    def nbytes(self) -> int:
        """Bytes of every cached trace, as last measured."""
        with self._lock:
            return sum(self._sizes.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    @contextmanager
    def _backbone_rerun(self, session_id: str, key: Hashable, trace: Trace) -> Iterator[None]:
        """Around the backbone re-computing a trace's dropped features: a network run like any other;
        the trace's new size counts as the reservation goes."""
        with self.network_run(trace.loaded, trace.image.shape, learn=False) as reservation:
            yield
            with self._lock:
                self._release(reservation)
                if self._sessions.get(session_id, {}).get(key) is trace:
                    self._sizes[(session_id, key)] = trace_nbytes(trace)

    def _release(self, reservation: Reservation) -> None:
        """Call with the lock held; a reservation is released once."""
        if not reservation.released:
            reservation.released = True
            self._reserved -= reservation.nbytes

    def _enforce(self, always_return_memory: bool = False) -> None:
        """Feature maps first, then whole traces, least recently used first, until the cached traces and
        the reservations fit; the newest is kept whole."""
        room = self.budget - self._reserved
        total = sum(self._sizes.values())
        if total <= room or not self._sizes:
            if always_return_memory:
                _return_freed_memory()
            return
        newest = next(reversed(self._sizes))
        for entry in list(self._sizes)[:-1]:
            if total <= room:
                break
            trace = self._sessions[entry[0]][entry[1]]
            if trace.has_features:
                trace.drop_features()
                smaller = trace_nbytes(trace)
                total -= self._sizes[entry] - smaller
                self._sizes[entry] = smaller
        for entry in list(self._sizes):
            if total <= room or entry == newest:
                break
            total -= self._sizes.pop(entry)
            del self._sessions[entry[0]][entry[1]]
        _return_freed_memory()


__all__ = ["BUDGET_ENV", "DEFAULT_BUDGET_GB", "DEFAULT_MAX_RUNS", "MAX_RUNS_ENV", "Reservation", "TraceCache",
           "architecture_bytes_per_pixel", "budget_bytes", "input_pixels", "max_concurrent_runs", "resident_bytes",
           "trace_nbytes"]
