"""The server-wide trace cache: one byte budget across sessions, least recently used first, feature maps
dropped before whole traces, and a trace that lost its features still re-filters and recomputes them.
Network runs: room made in the budget for their working memory first, at most so many at once."""
from __future__ import annotations

import contextlib
import gc
import os
import threading

import numpy as np
import pytest
import torch

from mrcnn.errors import SettingError
from mrcnn.inference.structures import RpnSettings, Thresholds
from mrcnn.inference.trace import run_trace
from mrcnn.inference.trace_cache import (BUDGET_ENV, MAX_RUNS_ENV, TraceCache, architecture_bytes_per_pixel,
                                         budget_bytes, input_pixels, max_concurrent_runs, trace_nbytes)
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
    with pytest.raises(SettingError, match=BUDGET_ENV):
        budget_bytes()


def test_the_app_names_a_bad_budget_instead_of_failing(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP

    monkeypatch.setenv(BUDGET_ENV, "lots")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert [e.value for e in at.error] == [f"The server is misconfigured: {BUDGET_ENV} must be a number of "
                                           "gigabytes (0 or more), got 'lots'"]


# ---- network runs: their working memory in the budget, a bounded number at once ----------------------------
SHAPE = (80, 96, 3)  # the scenes of _traces
WAIT_S = 5  # a bound on waits between the threads below, so a broken bound fails instead of hanging


def _estimate(loaded) -> float:
    """What a first run of ``loaded`` on a SHAPE image reserves: its architecture's guess."""
    return input_pixels(loaded, SHAPE) * architecture_bytes_per_pixel(loaded)


def test_input_pixels_are_those_of_the_resized_padded_network_input(loaded):
    assert input_pixels(loaded, SHAPE) == np.prod(_traces(loaded, 1)[0].padded_size)


def test_a_run_makes_room_for_its_working_memory_before_it_starts(loaded):
    traces = _traces(loaded, 2)
    reservation = _estimate(loaded)
    cache = TraceCache(budget=sum(trace_nbytes(t) for t in traces) + reservation - 1)
    for k, trace in enumerate(traces):
        cache.put(f"session{k}", "img", trace)
    assert all(t.has_features for t in traces)  # they fit while nothing runs
    with cache.network_run(loaded, SHAPE) as held:
        assert held.nbytes == cache.reserved_bytes() == pytest.approx(reservation)
        assert cache.nbytes + cache.reserved_bytes() <= cache.budget
        assert [t.has_features for t in traces] == [False, True]  # the oldest's features went first
        new = run_trace(loaded, np.zeros(SHAPE, np.uint8))
        cache.put("session2", "img", new, held)
        assert cache.reserved_bytes() == 0  # the trace took the reservation's place
    assert cache.reserved_bytes() == 0 and len(cache) == 3 and cache.nbytes <= cache.budget


def test_a_run_that_fails_leaves_no_reservation_and_frees_its_slot(loaded):
    cache = TraceCache(budget=1e12, max_runs=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        with cache.network_run(loaded, SHAPE):
            assert cache.reserved_bytes() > 0
            raise RuntimeError("out of memory")
    assert cache.reserved_bytes() == 0

    def slot_taken():
        raise AssertionError("the failed run kept its slot")

    with cache.network_run(loaded, SHAPE, waiting=slot_taken):
        pass
    assert cache.reserved_bytes() == 0  # ended without a put: released all the same


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory is measured on Linux")
def test_a_run_measures_its_peak_and_the_cache_remembers_the_largest(loaded):
    # Earlier tests' garbage (this xdist worker ran them) freed by the collector during the run would lower the
    # resident memory the run is measured against; once in ~10 suite runs it cut the growth seen from 64 MB to 23.
    gc.collect()
    cache = TraceCache(budget=1e12)
    pixels = input_pixels(loaded, SHAPE)
    assert cache.bytes_per_pixel(loaded) is None
    working = 192_000_000  # large against what other threads of the worker may free meanwhile (~10 MB seen)
    with cache.network_run(loaded, SHAPE) as first:
        assert first.nbytes == pytest.approx(_estimate(loaded))  # before any measurement: the guess
        scratch = torch.ones(working // 4)  # pages written: resident
    del scratch
    measured = cache.bytes_per_pixel(loaded)
    assert measured >= 0.9 * working / pixels
    with cache.network_run(loaded, SHAPE) as second:  # a run that needs less keeps the larger figure
        assert second.nbytes == pytest.approx(measured * pixels)
    assert cache.bytes_per_pixel(loaded) == measured


def test_a_run_that_does_not_learn_starts_no_sampler_and_keeps_freed_memory(loaded, monkeypatch):
    """A clip's later frames: the sampler thread woke every few ms through each run (~15% of a frame's time).
    Freed memory given back to the system before each run made the run fault its working memory in again."""
    import mrcnn.inference.trace_cache as trace_cache
    cache = TraceCache(budget=1e12)
    monkeypatch.setattr(trace_cache, "_PeakGrowth", lambda device: pytest.fail("sampled a run that does not learn"))
    monkeypatch.setattr(trace_cache, "_return_freed_memory", lambda: pytest.fail("trimmed for a run that does not "
                                                                                 "learn, with nothing evicted"))
    with cache.network_run(loaded, SHAPE, learn=False) as held:
        assert held.nbytes == pytest.approx(_estimate(loaded)) and cache.reserved_bytes() == held.nbytes
    assert cache.reserved_bytes() == 0 and cache.bytes_per_pixel(loaded) == _estimate(loaded) / input_pixels(
        loaded, SHAPE)


def test_an_evaluations_rounds_learn_once_per_image_shape_and_count(loaded, monkeypatch):
    """round_slots (what the Evaluate page's rounds take): the first round of each kind learns, after giving
    freed memory back so that its growth shows; the rounds after it neither trim nor sample."""
    import mrcnn.inference.trace_cache as trace_cache
    cache = TraceCache(budget=1e12)
    calls = []
    real_growth = trace_cache._PeakGrowth
    monkeypatch.setattr(trace_cache, "_return_freed_memory", lambda: calls.append("trim"))
    monkeypatch.setattr(trace_cache, "_PeakGrowth", lambda device: calls.append("sample") or real_growth(device))
    slot = cache.round_slots(loaded)
    rounds = [(SHAPE, 2), (SHAPE, 2), (SHAPE, 2), ((64, 48, 3), 2), (SHAPE, 1), ((64, 48, 3), 2)]
    learned = []
    for shape, images in rounds:
        calls.clear()
        with slot(shape, images):
            pass
        assert calls in ([], ["trim", "sample"]), calls
        learned.append(bool(calls))
    assert learned == [True, False, False, True, True, False]
    assert cache.reserved_bytes() == 0
    fresh = cache.round_slots(loaded)  # another evaluation learns again
    calls.clear()
    with fresh(SHAPE, 2):
        pass
    assert calls == ["trim", "sample"]


def test_one_network_run_at_a_time_by_default(loaded, monkeypatch):
    monkeypatch.delenv(MAX_RUNS_ENV, raising=False)
    cache = TraceCache(budget=1e12, max_runs=max_concurrent_runs())
    first_running, first_may_end, second_waited = threading.Event(), threading.Event(), threading.Event()
    order = []

    def first():
        with cache.network_run(loaded, SHAPE):
            order.append("first starts")
            first_running.set()
            first_may_end.wait(WAIT_S)
            order.append("first ends")

    def waiting():
        second_waited.set()
        first_may_end.set()
        return contextlib.nullcontext()  # the app shows a spinner meanwhile

    def second():
        first_running.wait(WAIT_S)
        with cache.network_run(loaded, SHAPE, waiting=waiting):
            order.append("second starts")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert second_waited.is_set()  # it was told to wait ...
    assert order == ["first starts", "first ends", "second starts"]  # ... and started once the first ended
    assert cache.reserved_bytes() == 0


def test_more_runs_at_once_when_the_server_allows(loaded, monkeypatch):
    monkeypatch.setenv(MAX_RUNS_ENV, "2")
    cache = TraceCache(budget=1e12, max_runs=max_concurrent_runs())
    both_in = threading.Barrier(2, timeout=WAIT_S)

    def run():
        with cache.network_run(loaded, SHAPE, waiting=lambda: pytest.fail("waited with a free slot")):
            both_in.wait()  # breaks (and the test fails) unless both are inside at once

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not both_in.broken


def test_a_backbone_rerun_of_dropped_features_is_a_network_run_too(loaded):
    trace = _traces(loaded, 1)[0]
    cache = TraceCache(budget=1e12)
    cache.put("alice", "img", trace)
    trace.drop_features()
    cache.get("alice", "img")  # the cache sees it smaller
    during = []
    backbone = trace._network_features

    def watched_backbone(image_list):
        during.append(cache.reserved_bytes())
        return backbone(image_list)

    trace._network_features = watched_backbone
    trace.features  # what Inspect reads
    assert during and during[0] > 0  # it ran under a reservation ...
    assert cache.reserved_bytes() == 0 and cache.nbytes == trace_nbytes(trace)  # ... and the maps count at once


@pytest.mark.parametrize("raw, expected", [(None, 1), ("", 1), ("3", 3), (" 2 ", 2)])
def test_max_concurrent_runs_from_the_environment(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv(MAX_RUNS_ENV, raising=False)
    else:
        monkeypatch.setenv(MAX_RUNS_ENV, raw)
    assert max_concurrent_runs() == expected


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5"])
def test_a_bad_max_concurrent_runs_is_one_message_naming_the_variable(monkeypatch, raw):
    from ui.state import server_settings_problem

    monkeypatch.delenv(BUDGET_ENV, raising=False)
    monkeypatch.setenv(MAX_RUNS_ENV, raw)
    assert server_settings_problem() == f"{MAX_RUNS_ENV} must be a whole number of runs (1 or more), got {raw!r}"


def test_a_deferred_download_keeps_no_detections_alive_and_computes_them_again_once_they_are_gone():
    """Detect's JSON and CSV downloads are made when clicked: until then they hold the detections weakly."""
    import gc
    import weakref

    from ui import state

    loaded = tiny_loaded(seed=3)
    entry = state.make_entry(scene(96, 128, seed=1), "x.png", "upload")
    trace = run_trace(loaded, entry.array, LOW)
    name = trace.detections.label_names[0]
    later, one_class = (state.detections_later(loaded, entry, trace, names) for names in ([], [name]))
    assert later() is trace.detections  # while the trace holds them: the very same, nothing run
    boxes, names = trace.detections.boxes.copy(), trace.detections.label_names
    assert set(one_class().label_names) == {name} and len(one_class()) == names.count(name) < len(names)
    original = weakref.ref(trace.detections)
    del trace  # the cache let the trace go: so do the downloads
    gc.collect()
    assert original() is None
    again = later()
    assert np.allclose(again.boxes, boxes) and again.label_names == names
    assert set(one_class().label_names) == {name} and len(one_class()) == names.count(name)
