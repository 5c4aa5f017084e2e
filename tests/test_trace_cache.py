"""The server-wide trace cache: one byte budget across sessions, least recently used first, feature maps
dropped before whole traces, and a trace that lost its features still re-filters and recomputes them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mrcnn.inference.structures import RpnSettings, Thresholds
from mrcnn.inference.trace import run_trace
from mrcnn.inference.trace_cache import BUDGET_ENV, TraceCache, budget_bytes, trace_nbytes
from tests.helpers import scene, tiny_loaded

LOW = Thresholds(score_thresh=0.05)  # random weights score every class low


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded()


def _traces(loaded, n: int, thresholds: Thresholds = Thresholds()):
    """Traces of n different images (at the default score threshold: no masks to compute, quick)."""
    return [run_trace(loaded, scene(80, 96, seed=k), thresholds) for k in range(n)]


def _feature_bytes(trace) -> int:
    return sum(f.numel() * f.element_size() for f in trace.features.values())


def test_size_counts_features_and_shrinks_when_they_are_dropped(loaded):
    trace = _traces(loaded, 1)[0]
    full = trace_nbytes(trace)
    features = _feature_bytes(trace)
    assert full > features > 0
    trace.drop_features()
    assert not trace.has_features
    assert trace_nbytes(trace) <= full - features


def test_budget_holds_across_two_sessions_least_recently_used_first(loaded):
    a1, a2, b1, b2, spare = _traces(loaded, 5)  # same image size: same weights in bytes
    whole = trace_nbytes(spare)
    spare.drop_features()
    dropped = trace_nbytes(spare)
    # room for one whole trace and about two without features
    cache = TraceCache(budget=whole + 2.5 * dropped)
    cache.put("alice", "img1", a1)
    cache.put("bob", "img1", b1)
    cache.put("alice", "img2", a2)
    assert cache.get("alice", "img1") is a1  # now a1 is the newest, b1 the oldest
    cache.put("bob", "img2", b2)
    assert cache.nbytes <= cache.budget
    assert cache.get("bob", "img1") is None  # the least recently used trace went, in another session
    assert "img1" not in cache.session("bob") and list(cache.session("alice")) == ["img1", "img2"]
    assert b2.has_features  # the newest is kept whole


def test_features_go_before_any_whole_trace(loaded):
    traces = _traces(loaded, 3)
    cache = TraceCache(budget=sum(trace_nbytes(t) for t in traces) - 1)
    for k, trace in enumerate(traces):
        cache.put(f"session{k}", "img", trace)
    assert len(cache) == 3  # nobody's detections were forgotten ...
    assert [t.has_features for t in traces] == [False, True, True]  # ... the oldest lost its features
    assert cache.nbytes <= cache.budget


def test_an_evicted_trace_still_refilters_and_recomputes_features_when_asked(loaded):
    reference = _traces(loaded, 1, LOW)[0]
    trace = _traces(loaded, 1, LOW)[0]
    seen = trace.refilter(LOW.replace(score_thresh=0.1))  # masks of these are memoised now
    features = {k: v.clone() for k, v in trace.features.items()}
    trace.drop_features()
    again = trace.refilter(LOW.replace(score_thresh=0.1))
    assert not trace.has_features  # re-filtering within seen masks needs no features
    np.testing.assert_array_equal(again.masks, seen.masks)
    np.testing.assert_array_equal(again.boxes, seen.boxes)
    # what Inspect reads brings them back, with the same values
    for name, value in trace.features.items():
        torch.testing.assert_close(value, features[name])
    assert trace.has_features
    # a new mask (lower threshold) and new RPN knobs after another drop: same as the trace that kept all
    trace.drop_features()
    dets = trace.refilter(LOW)
    np.testing.assert_array_equal(dets.masks, reference.detections.masks)
    trace.drop_features()
    rpn = RpnSettings(post_nms_top_n=50)
    np.testing.assert_allclose(trace.set_rpn(rpn).boxes, reference.set_rpn(rpn).boxes, atol=1e-4)


def test_forget_drops_one_session_only(loaded):
    a, b = _traces(loaded, 2)
    cache = TraceCache(budget=1e12)
    cache.put("alice", "img", a)
    cache.put("bob", "img", b)
    cache.forget("alice")
    assert cache.get("alice", "img") is None and cache.get("bob", "img") is b
    assert cache.nbytes == trace_nbytes(b)


@pytest.mark.parametrize("raw, expected", [(None, 4e9), ("0.5", 0.5e9), ("", 4e9)])
def test_budget_from_the_environment(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv(BUDGET_ENV, raising=False)
    else:
        monkeypatch.setenv(BUDGET_ENV, raw)
    assert budget_bytes() == expected


@pytest.mark.parametrize("raw", ["lots", "-1", "nan"])
def test_a_bad_budget_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(BUDGET_ENV, raw)
    with pytest.raises(ValueError, match=BUDGET_ENV):
        budget_bytes()


def test_the_app_names_a_bad_budget_instead_of_failing(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP

    monkeypatch.setenv(BUDGET_ENV, "lots")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert [e.value for e in at.error] == [f"The server is misconfigured: {BUDGET_ENV} must be a number of "
                                           "gigabytes (0 or more), got 'lots'"]
