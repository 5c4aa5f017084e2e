"""AppTest for the Fine-tune and Evaluate pages with tiny models and a stand-in trainer."""
from __future__ import annotations

import base64
import contextlib
import functools
import json
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from mrcnn.data import coco
from mrcnn.data.shapes import write_dataset
from mrcnn.evaluation import evaluate as coco_metrics
from mrcnn.inference.trace import Trace
from mrcnn.inference.trace_cache import TraceCache
from mrcnn.model.importer import import_model
from mrcnn.training import finetune, jobs
from tests.test_app import APP, env, tiny_shapes, write_tiny  # noqa: F401  (fixtures)
from tests.helpers import nested_detections, shaped_state_dict
from ui import state, tables

FAKE = [sys.executable, str(Path(__file__).parent / "fakes" / "fake_trainer.py")]


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=90).run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "success", "error", "warning")
             for e in at.get(kind) if isinstance(getattr(e, "value", None), str)]
    return "\n".join(parts)


@pytest.fixture
def fake_trainer(monkeypatch):
    """start_job runs the stand-in trainer (fast, honours STOP, can crash) instead of the real one."""
    monkeypatch.setattr(jobs, "start_job", functools.partial(jobs.start_job, trainer=FAKE))


def _wait_state(run_root: Path, state: str, timeout=30.0) -> jobs.Job:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = jobs.current_job(run_root)
        if job is not None and job.state() == state:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job never reached {state}")


def test_finetune_page_shows_settings_and_an_estimate(env):
    at = open_page("ui/finetune.py")
    assert "Estimated training time" in texts(at)
    assert at.button(key="ft_start")
    at.number_input(key="ft_steps").set_value(400).run()
    assert not at.exception


def test_finetune_run_starts_reports_and_finishes(env, fake_trainer):
    at = open_page("ui/finetune.py")
    at.number_input(key="ft_steps").set_value(20).run()
    at.button(key="ft_start").click().run()
    assert not at.exception, at.exception
    job = jobs.current_job(env / "runs")
    assert job is not None and "--steps" in job.command and "20" in job.command
    assert (Path(job.run_dir) / "val" / "annotations.json").is_file()  # validation scenes written
    # a reload (a new session) finds the same job
    _wait_state(env / "runs", "finished")
    at2 = open_page("ui/finetune.py")
    body = texts(at2)
    assert "New checkpoint" in body and Path(job.run_dir).name in body
    assert at2.button(key="ft_eval")


def test_live_curves_draw_validation_loss_and_ap_five_times_per_run(env, fake_trainer):
    at = open_page("ui/finetune.py")
    at.number_input(key="ft_steps").set_value(10).run()
    at.button(key="ft_start").click().run()
    job = _wait_state(env / "runs", "finished")
    assert job.command[job.command.index("--val-every") + 1] == "2"  # the default: 5 times per run
    at2 = open_page("ui/finetune.py")
    chart = next(c for c in at2.get("plotly_chart") if "ft_loss_chart" in c.proto.id)
    traces = {t["name"]: t for t in json.loads(chart.proto.spec)["data"]}
    assert {"loss", "val loss", "val box AP", "val mask AP"} <= set(traces)
    assert traces["val loss"]["x"] == [2, 4, 6, 8, 10]
    assert traces["val mask AP"]["y"] == pytest.approx([s / (s + 2) for s in (2, 4, 6, 8, 10)])


def test_failed_run_shows_the_reason(env, monkeypatch):
    monkeypatch.setattr(jobs, "start_job", functools.partial(jobs.start_job, trainer=[*FAKE, "--crash-at", "2"]))
    at = open_page("ui/finetune.py")
    at.number_input(key="ft_steps").set_value(20).run()
    at.button(key="ft_start").click().run()
    _wait_state(env / "runs", "failed")
    at2 = open_page("ui/finetune.py")
    assert any("simulated crash" in e.value for e in at2.error)


@pytest.mark.parametrize("record", ["with an owner", "as written before jobs had owners"])
def test_running_job_can_be_cancelled_from_another_session_when_asked_for(env, fake_trainer, record):
    job = jobs.start_job(["--steps", "2000"], env / "runs" / "long", steps=2000, owner="another-session")
    if record != "with an owner":
        registry = env / "runs" / jobs.REGISTRY
        registry.write_text(json.dumps({k: v for k, v in json.loads(registry.read_text()).items() if k != "owner"}))
    at = open_page("ui/finetune.py")
    assert not at.warning, "the job's record was refused"
    assert "ft_start" not in [b.key for b in at.button]  # one job at a time: no second start
    assert "This run was started in another session." in texts(at)
    assert at.button(key="ft_cancel").disabled  # a click meant for one's own run does not stop someone else's
    at.checkbox(key="ft_cancel_theirs").check().run()
    at.button(key="ft_cancel").click().run()
    assert job.state() == "cancelled"


# ---- the pages keep what they computed; one naming scheme for metrics ------------------------------------
METRIC_HEADER = re.compile(r"^((box|mask) )?AP(50|75|s|m|l)?( before| after)?$")


def count_calls(monkeypatch, owner, name: str, calls: Counter) -> None:
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[name] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


def count_slotted_images(monkeypatch, calls: Counter) -> None:
    """calls["slotted images"]: the images whose network runs took one of the server's run slots (an evaluation's
    round of runs takes one slot for its images)."""
    original = TraceCache.network_run

    def counted(self, loaded, image_shape, *args, images=1, **kwargs):
        calls["slotted images"] += images
        return original(self, loaded, image_shape, *args, images=images, **kwargs)

    monkeypatch.setattr(TraceCache, "network_run", counted)


def metric_headers(at: AppTest) -> list[str]:
    return [str(c) for table in at.dataframe for c in [*table.value.columns, table.value.index.name]
            if "AP" in str(c)]


def test_pages_use_the_sidebars_model(env, fake_trainer):
    evaluate_page = open_page("ui/evaluate.py")
    assert "ev_model" not in [s.key for s in evaluate_page.selectbox]
    at = open_page("ui/finetune.py")
    assert "ft_model" not in [s.key for s in at.selectbox]
    assert "Starts from `shapes`" in texts(at)
    at.number_input(key="ft_steps").set_value(2).run()
    at.button(key="ft_start").click().run()
    job = _wait_state(env / "runs", "finished")
    assert "--model=shapes" in job.command


def test_evaluate_reruns_redraw_from_what_was_computed(env, monkeypatch):
    calls = Counter()
    count_calls(monkeypatch, coco_metrics, "evaluate", calls)
    count_calls(monkeypatch, coco.CocoDataset, "__init__", calls)  # the dataset scan
    count_calls(monkeypatch, coco.CocoDataset, "__getitem__", calls)  # an image and its masks decoded
    count_calls(monkeypatch, Trace, "_run_network", calls)
    count_slotted_images(monkeypatch, calls)  # the evaluation's and the browser's runs take the server's run slots
    at = open_page("ui/evaluate.py")
    at.number_input(key="ev_num").set_value(5).run()
    at.select_slider(key="ev_size").set_value(128).run()
    calls.clear()  # the app opened on Detect, which ran the network once
    at.button(key="ev_go").click().run()
    assert not at.exception, at.exception
    assert calls["evaluate"] == 1 and calls["__init__"] == 1 and calls["_run_network"] == 1
    assert at.get("plotly_chart")
    after_evaluation = dict(calls)
    for score in (0.3, 0.9, 0.05):
        at.slider(key="ev_score").set_value(score).run()
        assert not at.exception, at.exception
    at.run()
    assert dict(calls) == after_evaluation, "a threshold move or a rerun recomputed"
    at.select_slider(key="ev_img").set_value(1).run()  # another image: decoded and run once
    assert calls["__getitem__"] == after_evaluation["__getitem__"] + 1
    assert calls["_run_network"] == 2 and calls["evaluate"] == 1 and calls["__init__"] == 1
    assert calls["slotted images"] == 5 + 2  # the evaluation's and the browser's two images
    at.button(key="ev_go").click().run()  # the same data again: evaluated, not scanned again
    assert calls["evaluate"] == 2 and calls["__init__"] == 1


def image_captions(at: AppTest) -> list[str]:
    return [caption for image in at.image for caption in image.captions]


def test_browser_steps_through_the_images_with_a_miss_a_false_positive_or_a_confusion(env):
    at = open_page("ui/evaluate.py")
    at.number_input(key="ev_num").set_value(6).run()
    at.select_slider(key="ev_size").set_value(128).run()
    at.button(key="ev_go").click().run()
    at.slider(key="ev_score").set_value(0.05).run()  # the random-weight model's scores sit low
    assert at.select_slider(key="ev_img").options == [str(i) for i in range(6)]
    seen = {}
    for show, counted in (("with a miss", r"(\d+) missed"), ("with a false positive", r"(\d+) false positives?")):
        at.selectbox(key="ev_show").set_value(show).run()
        assert not at.exception, at.exception
        shown = [int(o) for o in at.select_slider(key="ev_img").options]
        for idx in shown[-2:]:  # an image the filter keeps shows what it was kept for (two: each is a run)
            at.select_slider(key="ev_img").set_value(idx).run()
            caption = next(c for c in image_captions(at) if "correct" in c)
            assert int(re.search(counted, caption).group(1)) >= 1, (show, idx, caption)
            assert caption.startswith(f"{idx:06d}.png: ")  # the image's file, as annotations.json names it
        seen[show] = shown
    # a class confusion: its images hold as many confusions as the matrix's cell counts
    confusions = [o for o in at.selectbox(key="ev_show").options if o.startswith("true ")]
    assert confusions, "the random-weight model confuses no class at 0.05: the test needs one"
    true, predicted = re.match(r"true (\w+), predicted (\w+) \((\d+) images?\)", confusions[0]).groups()[:2]
    heatmap = next(t for c in at.get("plotly_chart") for t in json.loads(c.proto.spec)["data"] if "z" in t)
    z = heatmap["z"]  # plotly sends a numpy array as base64 bytes
    if "bdata" in z:
        z = np.frombuffer(base64.b64decode(z["bdata"]), z["dtype"]).reshape([int(n) for n in z["shape"].split(",")])
    cell = z[heatmap["y"].index(true)][heatmap["x"].index(predicted)]
    at.selectbox(key="ev_show").set_value(f"true {true}, predicted {predicted}").run()
    count = int(re.search(r"\((\d+) images?\)", confusions[0]).group(1))
    assert 1 <= count <= cell  # a cell counts objects; an image may hold several
    if count > 1:
        assert len(at.select_slider(key="ev_img").options) == count
    else:
        assert f"The one image to show (true {true}, predicted {predicted})" in texts(at)
    at.slider(key="ev_score").set_value(0.1).run()  # a threshold move keeps the choice
    assert at.selectbox(key="ev_show").value == f"true {true}, predicted {predicted}"
    # the filter keeps the image when it can, else moves to the next image it keeps
    at.selectbox(key="ev_show").set_value("every image").run()
    at.slider(key="ev_score").set_value(0.05).run()
    at.select_slider(key="ev_img").set_value(seen["with a false positive"][0]).run()
    at.selectbox(key="ev_show").set_value("with a false positive").run()
    assert int(at.select_slider(key="ev_img").value) == seen["with a false positive"][0]
    at.slider(key="ev_score").set_value(0.95).run()  # nothing scores this high: no false positive anywhere
    assert not at.exception, at.exception
    assert "No image to show (with a false positive) at score threshold 0.95." in texts(at)
    at.selectbox(key="ev_show").set_value("every image").run()
    assert at.select_slider(key="ev_img").options == [str(i) for i in range(6)]


def test_the_browsers_picture_enlarges_a_small_image_with_its_boxes_and_keeps_a_large_one():
    from ui.evaluate import FP_COLOR, MISS_COLOR, TP_COLOR, browser_picture
    dets = nested_detections(2)  # xyxy boxes (5, 5, 40, 30) and (6, 6, 43, 32) on 60x80
    missed = np.array([[50, 40, 70, 55]], np.float32)
    image = np.full((60, 80, 3), 128, np.uint8)
    picture = browser_picture(image, dets, np.array([True, False]), missed, ["missed circle"])
    assert picture.shape == (60 * 7, 80 * 7, 3)  # 7: the least whole factor that makes 80 px at least 512
    # each box's bottom edge, on the last pixel row the box covers once enlarged 7 times
    assert tuple(picture[30 * 7 - 1, 20 * 7]) == TP_COLOR and tuple(picture[32 * 7 - 1, 20 * 7]) == FP_COLOR
    assert tuple(picture[55 * 7 - 1, 60 * 7]) == MISS_COLOR
    assert (picture[7 * 12:7 * 25, 7 * 10:7 * 35] == 128).all()  # inside the boxes: the image's own pixels
    large = np.full((600, 800, 3), 128, np.uint8)
    assert browser_picture(large, dets, np.array([True, False]), missed, ["missed circle"]).shape == large.shape


def test_evaluate_and_finetune_settings_survive_a_walk_through_the_other_pages(env):
    at = open_page("ui/evaluate.py")
    at.number_input(key="ev_num").set_value(5).run()
    at.number_input(key="ev_seed").set_value(3).run()
    at.select_slider(key="ev_size").set_value(128).run()
    at.button(key="ev_go").click().run()
    at.slider(key="ev_score").set_value(0.3).run()
    at.selectbox(key="ev_show").set_value("with a miss").run()
    image = int(at.select_slider(key="ev_img").options[-1])
    at.select_slider(key="ev_img").set_value(image).run()
    at.switch_page("ui/finetune.py").run()
    finetune_values = {"ft_steps": 33, "ft_batch": 2, "ft_lr": 0.02, "ft_validations": 2}
    for key, value in finetune_values.items():
        at.number_input(key=key).set_value(value).run()
    at.select_slider(key="ft_size_light").set_value(192).run()
    for page in ("ui/detect.py", "ui/inspect.py", "ui/evaluate.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
    assert [at.number_input(key=k).value for k in ("ev_num", "ev_seed")] == [5, 3]
    assert at.select_slider(key="ev_size").value == 128
    assert at.slider(key="ev_score").value == 0.3 and at.selectbox(key="ev_show").value == "with a miss"
    assert at.select_slider(key="ev_img").value == image
    at.switch_page("ui/finetune.py").run()
    assert {key: at.number_input(key=key).value for key in finetune_values} == finetune_values
    assert at.select_slider(key="ft_size_light").value == 192


def test_metric_headers_follow_one_scheme(env):
    at = open_page("ui/evaluate.py")
    at.number_input(key="ev_num").set_value(5).run()
    at.select_slider(key="ev_size").set_value(128).run()
    at.button(key="ev_go").click().run()
    headers = metric_headers(at)
    assert {"box AP", "box AP50", "mask AP", "mask AP50"} <= set(headers)
    assert [h for h in headers if not METRIC_HEADER.match(h)] == []
    per_class = tables.per_class_table({"circle": {"segm_AP50": 0.5, "bbox_AP": 0.2, "segm_AP": 0.1,
                                                   "bbox_AP50": 0.4}})
    assert list(per_class.columns) == ["box AP", "box AP50", "mask AP", "mask AP50"]


def test_evaluate_shows_what_each_error_costs(env):
    at = open_page("ui/evaluate.py")
    at.number_input(key="ev_num").set_value(5).run()
    at.select_slider(key="ev_size").set_value(128).run()
    at.button(key="ev_go").click().run()
    assert not at.exception, at.exception
    assert "What each error costs" in [h.value for h in at.subheader]
    costs = next(t.value for t in at.dataframe if t.value.index.name == "error type")
    assert list(costs.index) == ["classification", "localisation", "both", "duplicate", "background", "missed"]
    assert {"box", "mask"} <= set(costs.columns)
    assert any("(#per-image-browser)" in c.value for c in at.caption)
    assert at.session_state["ev_evaluation"].error_costs["segm"]["AP50"] == pytest.approx(
        at.session_state["ev_evaluation"].result["segm"]["AP50"], abs=1e-4)


@pytest.fixture
def finished_run(env, fake_trainer) -> Path:
    """A finished fine-tune run with a loadable (tiny) checkpoint and three validation scenes."""
    run_dir = env / "runs" / "finetune-done"
    jobs.start_job(["--steps", "2"], run_dir, steps=2)
    _wait_state(env / "runs", "finished")
    write_tiny(run_dir / "checkpoint.pt", seed=1)
    val_dir = write_dataset(run_dir / "val", 3, seed=5, size=64, classes=finetune.BUILTIN_CLASSES)
    (run_dir / "plan.json").write_text(json.dumps({"val_dir": str(val_dir), "start_model": "shapes"}))
    return run_dir


def test_finetune_comparison_is_computed_once(env, finished_run, monkeypatch):
    calls = Counter()
    count_calls(monkeypatch, coco_metrics, "evaluate", calls)
    count_calls(monkeypatch, Trace, "_run_network", calls)
    count_slotted_images(monkeypatch, calls)  # before/after take the server's run slots
    at = open_page("ui/finetune.py")
    calls.clear()  # the app opened on Detect, which ran the network once
    at.button(key="ft_eval").click().run()
    assert not at.exception, at.exception
    # each model's evaluation of the three validation images, and each model's run on image 0
    assert calls["evaluate"] == 2 and calls["slotted images"] == 2 * 3 + 2
    assert calls["_run_network"] == 2  # before and after, image 0
    headers = metric_headers(at)
    assert "mask AP before" in headers and [h for h in headers if not METRIC_HEADER.match(h)] == []
    at.slider(key="ft_val_idx").set_value(1).run()
    assert calls["_run_network"] == 4
    at.slider(key="ft_val_idx").set_value(0).run()
    at.run()
    assert calls["evaluate"] == 2 and calls["_run_network"] == 4, "a rerun ran a network again"
    assert calls["slotted images"] == 2 * 3 + 4


def test_before_vs_after_takes_the_servers_run_slot_a_round_at_a_time(env, finished_run, monkeypatch):
    """Before vs after ran outside the server's one-run-at-a-time limit (MRCNN_MAX_CONCURRENT_RUNS). Here another
    session asks for the slot as the comparison's first round of runs starts: it gets it between two of the
    comparison's rounds, not after both evaluations, and the comparison's next round waits for it."""
    at = open_page("ui/finetune.py")
    cache = state.trace_cache()
    assert cache.max_runs == 1
    events, in_flight, most, slotted = [], Counter(), Counter(), Counter()
    original = TraceCache.network_run

    def recording(self, loaded, image_shape, waiting=contextlib.nullcontext, learn=True, images=1):
        who = "other session" if threading.current_thread().name == "other-session" else "comparison"

        @contextlib.contextmanager
        def noted_waiting():
            events.append((who, "waits"))
            with waiting():
                yield

        @contextlib.contextmanager
        def run():
            with original(self, loaded, image_shape, waiting=noted_waiting, learn=learn, images=images):
                in_flight["runs"] += 1
                most["runs"] = max(most["runs"], in_flight["runs"])
                events.append((who, "runs"))
                slotted[who] += images
                if who == "comparison" and events.count(("comparison", "runs")) == 1:
                    other.start()  # another session's Detect asks for a run now
                    while ("other session", "waits") not in events:
                        other.join(0.01)
                in_flight["runs"] -= 1
                yield

        return run()

    def another_sessions_run():
        with cache.network_run(state.get_model("shapes"), (64, 64, 3)):
            deadline = time.time() + 30
            while ("comparison", "waits") not in events and time.time() < deadline:  # its next image asks
                time.sleep(0.01)

    other = threading.Thread(target=another_sessions_run, name="other-session")
    monkeypatch.setattr(TraceCache, "network_run", recording)
    at.button(key="ft_eval").click().run()
    other.join(30)
    assert not at.exception, at.exception
    runs = [who for who, what in events if what == "runs"]
    assert slotted["comparison"] == 2 * 3 + 2  # both models on the three validation images, then image 0
    assert most["runs"] == 1, "two runs at once under MRCNN_MAX_CONCURRENT_RUNS=1"
    assert runs.index("other session") < 3, "the other session waited for the whole comparison"
    assert ("comparison", "waits") in events
    assert "mask AP before" in metric_headers(at)


def test_unreadable_job_registry_is_no_job_and_the_page_says_so(env, fake_trainer):
    """One bad registry on the page (tests/test_jobs.py reads every kind of bad one)."""
    runs = env / "runs"
    runs.mkdir(exist_ok=True)
    (runs / jobs.REGISTRY).write_bytes(b'{"pid": -1, "run_dir": "x", "command": [], "started": 0}')
    at = open_page("ui/finetune.py")
    assert "current_job.json" in "\n".join(w.value for w in at.warning)
    assert at.button(key="ft_start"), "the Start button is there"
    at.number_input(key="ft_steps").set_value(2).run()
    at.button(key="ft_start").click().run()
    assert not at.exception
    _wait_state(runs, "finished")


PARAMETER_COUNTS = re.compile(r"\*\*([\d,]+)\*\* parameters train, \*\*([\d,]+)\*\* frozen")


def parameter_counts(at: AppTest) -> tuple[int, int]:
    trainable, frozen = PARAMETER_COUNTS.search(texts(at)).groups()
    return int(trainable.replace(",", "")), int(frozen.replace(",", ""))


@pytest.fixture
def imported_r50(env, monkeypatch):
    """A torchvision R50 (its keys and shapes, zero weights) imported as 'my-r50'; the step timing stubbed
    (an R50 training step takes seconds on this CPU; finetune's own tests time a real one)."""
    monkeypatch.setenv("MRCNN_MODELS_DIR", str(env / "models"))
    source = env / "r50.pth"
    torch.save(shaped_state_dict("maskrcnn_resnet50_fpn", 3), source)
    # at 64 px, not 800: the app runs it on Detect's sample scene before the Fine-tune page opens
    import_model(source, classes=["cat", "dog"], name="my-r50", min_size=64, max_size=64)
    monkeypatch.setattr(finetune, "measure_seconds_per_image", lambda *args: 0.5)
    return "my-r50"


def test_finetune_page_shows_the_r50_backbone_layers_and_parameter_counts(env, imported_r50):
    at = AppTest.from_file(APP, default_timeout=90).run()
    at.selectbox(key="model_name").set_value(imported_r50).run()
    at.switch_page("ui/finetune.py").run()
    assert not at.exception, at.exception
    assert at.number_input(key="ft_trainable_layers").value == 3
    assert at.select_slider(key="ft_size_r50").value == 320  # the CPU default for R50
    trainable, frozen = parameter_counts(at)
    assert frozen > 0
    assert "about 3 min 20 s" in texts(at)  # 100 steps x 4 images x the measured 0.5 s
    at.number_input(key="ft_trainable_layers").set_value(5).run()
    more_trainable, less_frozen = parameter_counts(at)
    assert more_trainable > trainable and less_frozen < frozen and more_trainable + less_frozen == trainable + frozen


def test_finetune_page_light_model_trains_whole(env):
    at = open_page("ui/finetune.py")
    assert "ft_trainable_layers" not in [n.key for n in at.number_input]
    assert "every layer trains" in texts(at) and parameter_counts(at)[1] == 0
    assert at.select_slider(key="ft_size_light").value == 256


def test_finetune_page_offers_all_gpus_through_torchrun(env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(finetune, "measure_seconds_per_image", lambda *args: 0.1)
    started = []
    monkeypatch.setattr(jobs, "start_job", lambda args, run_dir, steps, nproc=1, owner="": started.append((args, nproc)))
    at = open_page("ui/finetune.py")
    at.radio(key="ft_gpus").set_value("all 2 GPUs").run()
    assert "on 2 GPUs" in texts(at)
    at.button(key="ft_start").click().run()
    assert not at.exception, at.exception
    (args, nproc), = started
    assert nproc == 2 and args[args.index("--device") + 1] == "cuda"
