"""One memory budget for the traces of every session on a server: least recently used first, feature
maps before detections.

    cache = TraceCache(budget_bytes())           # $MRCNN_TRACE_CACHE_GB, default 4 GB
    trace = cache.get(session_id, key)            # None when absent or evicted
    cache.put(session_id, key, run_trace(...))    # then the budget is enforced
    cache.session(session_id)                     # that session's live traces, key -> Trace

A trace is mostly its FPN feature maps (torchvision's R50 at 800×1066: about 75 MB of 100 MB). Over
budget, the cache first drops the feature maps of the least recently used traces, whoever they belong
to (``Trace.drop_features``: their detections still re-filter at once, and the maps come back,
recomputed by the backbone alone, when a page needs them: new masks, RPN knobs, Inspect's views); only
then does it forget whole traces, again least recently used first. The trace used last is never
touched, so a single trace larger than the budget still works.

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
from typing import Hashable

import numpy as np
import torch
from torchvision.models.detection.image_list import ImageList

from mrcnn.inference.trace import Trace

BUDGET_ENV = "MRCNN_TRACE_CACHE_GB"
DEFAULT_BUDGET_GB = 4.0
# What a trace refers to but does not own: the shared model and the caller's image.
_NOT_OWNED = frozenset({"loaded", "model", "image", "device", "categories"})
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None


def _return_freed_memory() -> None:
    """glibc keeps freed blocks for later allocations, in one arena per thread (feature maps are tens of MB,
    under its adaptive mmap threshold once it has risen), and every session runs in its own thread: give
    them back to the system, or dropped features and a finished run's working memory stay in the RSS."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def budget_bytes() -> float:
    """The server-wide budget: ``$MRCNN_TRACE_CACHE_GB`` gigabytes, else 4 GB. ValueError naming the
    variable for a value that is not a non-negative number."""
    raw = os.environ.get(BUDGET_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_BUDGET_GB * 1e9
    try:
        gigabytes = float(raw)
    except ValueError:
        gigabytes = math.nan
    if not (math.isfinite(gigabytes) and gigabytes >= 0):
        raise ValueError(f"{BUDGET_ENV} must be a number of gigabytes (0 or more), got {raw!r}")
    return gigabytes * 1e9


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


class TraceCache:
    """Every session's traces under one byte budget. See the module docstring."""

    def __init__(self, budget: float):
        if not (math.isfinite(float(budget)) and budget >= 0):
            raise ValueError(f"the trace cache budget must be 0 or more bytes, got {budget!r}")
        self.budget = float(budget)
        self._lock = threading.Lock()
        self._sessions: dict[str, OrderedDict[Hashable, Trace]] = {}
        self._sizes: OrderedDict[tuple[str, Hashable], int] = OrderedDict()  # least recently used first

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

    def put(self, session_id: str, key: Hashable, trace: Trace) -> None:
        """Keep a new trace (just run: its network's working memory is handed back too)."""
        with self._lock:
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

    @property
    def nbytes(self) -> int:
        """Bytes of every cached trace, as last measured."""
        with self._lock:
            return sum(self._sizes.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    def _enforce(self, always_return_memory: bool = False) -> None:
        """Feature maps first, then whole traces, least recently used first; the newest is kept whole."""
        total = sum(self._sizes.values())
        if total <= self.budget:
            if always_return_memory:
                _return_freed_memory()
            return
        newest = next(reversed(self._sizes))
        for entry in list(self._sizes)[:-1]:
            if total <= self.budget:
                break
            trace = self._sessions[entry[0]][entry[1]]
            if trace.has_features:
                trace.drop_features()
                smaller = trace_nbytes(trace)
                total -= self._sizes[entry] - smaller
                self._sizes[entry] = smaller
        for entry in list(self._sizes):
            if total <= self.budget or entry == newest:
                break
            total -= self._sizes.pop(entry)
            del self._sessions[entry[0]][entry[1]]
        _return_freed_memory()


__all__ = ["BUDGET_ENV", "DEFAULT_BUDGET_GB", "TraceCache", "budget_bytes", "trace_nbytes"]
