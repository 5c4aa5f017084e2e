"""The Evaluate page (AppTest, tiny models, 5 scenes at 128 px): what it keeps is the model's under the sidebar's
precision and device, its runs take the server's run slots a round at a time, and the Model B pick survives
the sidebar visiting that model."""
from __future__ import annotations

import re
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext

import pytest
import torch

from mrcnn.evaluation import evaluate as coco_metrics
from mrcnn.inference.trace_cache import TraceCache
from tests.helpers import shown_option, tiny_loaded
from tests.test_app import env, tiny_shapes, write_tiny  # noqa: F401  (fixtures)
from tests.test_app_training_pages import count_calls, open_page, texts
from ui import state

SCENES, SIZE = 5, 128


def evaluated(at):
    """Evaluate the sidebar's model on 5 generated 128-px scenes."""
    at.number_input(key="ev_num").set_value(SCENES)
    at.select_slider(key="ev_size").set_value(SIZE).run()
    at.button(key="ev_go").click().run()
    assert not at.exception, at.exception
    return at


def runs_in(at) -> str:
    """The precision the sidebar's model runs in, as its caption says ("Runs in **bfloat16** (auto)")."""
    return next(m.group(1) for c in at.sidebar.caption if (m := re.search(r"Runs in \*\*(\w+)\*\*", c.value)))


def other_precision(at) -> str:
    """A precision the sidebar offers that runs the model otherwise than now; skip where there is none."""
    now = runs_in(at)
    choice = next((p for p in at.sidebar.selectbox(key="precision").options if p not in ("auto", now)), None)
    if choice is None:
        pytest.skip(f"this device runs no precision but {now}")
    return choice


def ab_captions(at) -> list[str]:
    return [c.value for c in at.caption if c.value.startswith(("**A**", "**B**"))]


def table_captions(at) -> list[str]:
    return [c.value for c in at.caption if re.search(r"\((float32|bfloat16|float16), \w+\)", c.value)]


# ---- 1. a precision switch ---------------------------------------------------------------------------------
def test_a_precision_switch_labels_the_kept_numbers_until_evaluate_measures_them_again(env, monkeypatch):
    """Evaluate showed the bfloat16 AP, unlabelled, after the sidebar switched to float32."""
    at = evaluated(open_page("ui/evaluate.py"))
    before = runs_in(at)
    assert table_captions(at) == [f"shapes ({before}, cpu) on {SCENES} generated scenes: {SCENES} images"]
    kept = at.session_state["ev_evaluation"].result
    calls = Counter()
    count_calls(monkeypatch, coco_metrics, "evaluate", calls)

    after = other_precision(at)
    at.sidebar.selectbox(key="precision").select(after).run()
    assert not at.exception, at.exception
    assert calls["evaluate"] == 0, "a sidebar switch evaluated without the user's press"
    assert table_captions(at) == [f"shapes ({before}, cpu) on {SCENES} generated scenes: {SCENES} images"]
    warning = " ".join(w.value for w in at.warning)
    assert f"Measured in {before}, cpu" in warning and f"now runs shapes in {after}, cpu" in warning
    assert "Press Evaluate" in warning
    assert at.dataframe[0].value.loc["box", "AP"] == pytest.approx(kept["bbox"]["AP"])  # the old numbers, labelled
    # what runs the model now (B, the browser) would mix the two precisions: not offered until evaluated again
    assert "ev_compare_with" not in [s.key for s in at.selectbox] and "ev_img" not in [s.key for s in at.select_slider]

    at.button(key="ev_go").click().run()
    assert calls["evaluate"] == 1
    assert table_captions(at) == [f"shapes ({after}, cpu) on {SCENES} generated scenes: {SCENES} images"]
    assert not at.warning
    assert at.session_state["ev_evaluation"].model_key[2:] == ("cpu", after)
    # a user comparing precisions sees both, each named by its precision
    now = at.session_state["ev_evaluation"].result
    both = next(d.value for d in at.dataframe if d.value.index.name == "precision, device")
    assert list(both.index) == [f"{after}, cpu", f"{before}, cpu"]
    assert list(both["box AP"]) == pytest.approx([now["bbox"]["AP"], kept["bbox"]["AP"]])
    assert list(both["mask AP50"]) == pytest.approx([now["segm"]["AP50"], kept["segm"]["AP50"]])


def test_model_b_measured_in_another_precision_is_measured_again(env):
    """B's kept numbers (keyed by name and weights only) were shown beside A's in another precision."""
    other = str(env / "runs" / "other" / "checkpoint.pt")
    write_tiny(env / "runs" / "other" / "checkpoint.pt", seed=5)
    at = evaluated(open_page("ui/evaluate.py"))
    before = runs_in(at)
    at.selectbox(key="ev_compare_with").select(other).run()
    at.button(key="ev_compare_go").click().run()
    assert not at.exception, at.exception
    assert ab_captions(at) == [f"**A**: shapes ({before}, cpu)", f"**B**: {state.literal(other)} ({before}, cpu)"]
    after = other_precision(at)
    at.sidebar.selectbox(key="precision").select(after).run()
    at.button(key="ev_go").click().run()  # A again, on the same data, in the new precision
    assert not at.exception, at.exception
    assert ab_captions(at) == [], "B's old precision shown beside A's new one"
    assert at.button(key="ev_compare_go").label == f"Evaluate {other} on the same data"
    at.button(key="ev_compare_go").click().run()
    assert ab_captions(at) == [f"**A**: shapes ({after}, cpu)", f"**B**: {state.literal(other)} ({after}, cpu)"]


# ---- 2. the server's run slots -----------------------------------------------------------------------------
def test_evaluation_runs_take_the_servers_slot_one_round_at_a_time(env, monkeypatch):
    """An evaluation ran outside the server's one-run-at-a-time limit: another session's Detect ran beside it,
    or, had it held the slot throughout, would have waited for the whole evaluation. Here another session
    asks for the slot as the evaluation's first round starts (one image per worker, side by side): it gets it
    between two of the evaluation's rounds, and the evaluation's next round waits for it, saying so."""
    at = open_page("ui/evaluate.py")
    cache = state.trace_cache()
    assert cache.max_runs == 1
    events, learned, in_flight, most = [], [], Counter(), Counter()
    lock = threading.Lock()
    original = TraceCache.network_run

    def recording(self, loaded, image_shape, waiting=None, learn=True, images=1):
        who = "other session" if threading.current_thread().name == "other-session" else "evaluation"

        @contextmanager
        def noted_waiting():
            events.append((who, "waits"))
            with waiting():
                yield

        @contextmanager
        def run():
            with original(self, loaded, image_shape, waiting=noted_waiting, learn=learn, images=images):
                with lock:
                    in_flight["runs"] += 1
                    most["runs"] = max(most["runs"], in_flight["runs"])
                    events.append((who, tuple(image_shape[:2]), images))
                    learned.append(learn)
                    first = sum(1 for e in events if e[0] == "evaluation" and e[1] != "waits") == 1
                if who == "evaluation" and first:  # another session's Detect asks for a run now
                    other.start()
                    while not any(e == ("other session", "waits") for e in events):
                        other.join(0.01)
                with lock:
                    in_flight["runs"] -= 1
                yield

        return run()

    def another_sessions_run():
        with cache.network_run(tiny_loaded(), (SIZE, SIZE, 3), waiting=nullcontext):
            deadline = time.monotonic() + 30  # held until the evaluation's next round asks (it may not yet)
            while ("evaluation", "waits") not in events and time.monotonic() < deadline:
                time.sleep(0.01)

    other = threading.Thread(target=another_sessions_run, name="other-session")
    monkeypatch.setattr(TraceCache, "network_run", recording)
    evaluated(at)
    other.join(30)
    runs = [e for e in events if e[1] != "waits"]
    evaluation_runs = [i for i, e in enumerate(runs) if e[0] == "evaluation"]
    *rounds, browsers = [runs[i] for i in evaluation_runs]  # the evaluation's rounds, then the browser's image
    assert {r[1] for r in rounds} == {(SIZE, SIZE)} and sum(r[2] for r in rounds) == SCENES
    assert len(rounds) == -(-SCENES // torch.get_num_threads())  # a round: one image per worker (a thread each)
    assert browsers == ("evaluation", (SIZE, SIZE), 1)
    # a round's memory is learned on the first of its kind only (learning trims the process's freed memory first)
    learns = [learned[i] for i in evaluation_runs[:-1]]
    assert learns == [i == 0 or rounds[i] not in rounds[:i] for i in range(len(rounds))]
    assert learns.count(False) >= 1
    assert most["runs"] == 1, "two runs at once under MRCNN_MAX_CONCURRENT_RUNS=1"
    assert runs.index(("other session", (SIZE, SIZE), 1)) < evaluation_runs[-2], \
        "the other session waited for the whole evaluation"
    assert ("evaluation", "waits") in events
    assert f"on {SCENES} generated scenes" in texts(at)


# ---- 3. the Model B pick -----------------------------------------------------------------------------------
def test_the_model_b_pick_comes_back_after_the_sidebar_visits_that_model(env):
    """Evaluating B as the sidebar's model (B then not offered as B) dropped "Model B, on the same data" to none."""
    other = str(env / "runs" / "other" / "checkpoint.pt")
    write_tiny(env / "runs" / "other" / "checkpoint.pt", seed=5)
    at = evaluated(open_page("ui/evaluate.py"))
    at.selectbox(key="ev_compare_with").select(other).run()
    at.sidebar.selectbox(key="model_name").select(other).run()
    at.button(key="ev_go").click().run()  # B as A, on the same data
    assert not at.exception, at.exception
    assert at.selectbox(key="ev_compare_with").value is None  # B is the sidebar's model: not offered now
    assert shown_option(at.selectbox(key="ev_compare_with")) == "none"
    at.sidebar.selectbox(key="model_name").select("shapes").run()
    at.button(key="ev_go").click().run()
    assert at.selectbox(key="ev_compare_with").value == other
    assert shown_option(at.selectbox(key="ev_compare_with")) == "run other (training run)"
    assert at.button(key="ev_compare_go").label == f"Evaluate {other} on the same data"
    # an explicit "none" is kept the same way (state.keep_model_pick: tests/test_compare.py, Detect's picker)
