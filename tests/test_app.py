"""The Streamlit app driven headless with AppTest: both pages, uploads, controls, model switching.

Models are tiny random-weight checkpoints written to temp folders (MRCNN_WEIGHTS_DIR / MRCNN_RUNS_DIR),
so nothing depends on the real bundled model or on the network.
"""
from __future__ import annotations

import gc
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import streamlit as st
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest
from torchvision.ops import box_iou

from mrcnn.model.checkpoint import save_checkpoint
from mrcnn.errors import ImageError, ModelUnavailable
from tests.helpers import CATEGORIES, TINY_LIGHT, app_folders, scene, shown, tiny_loaded
from ui.state import MAX_IMAGES, MAX_SAMPLE_SEED

APP = str(Path(__file__).resolve().parent.parent / "app.py")
COUNT = re.compile(r"### (\d+) detections")


def write_tiny(path: Path, categories=CATEGORIES, seed: int = 0, arch: dict = TINY_LIGHT) -> Path:
    loaded = tiny_loaded(arch, seed=seed, categories=categories)
    save_checkpoint(path, arch, categories, loaded.model.state_dict(),
                    {"data": "random weights (test)", "metrics": {"bbox": {"AP": 0.0}}}, half=True)
    return path


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("weights") / "shapes.pt")


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_shapes):
    """A weights folder holding a tiny shapes.pt, empty runs, models and torch-hub folders; fresh caches."""
    with app_folders(tmp_path, monkeypatch, tiny_shapes) as folder:
        yield folder


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def start() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def count(at: AppTest) -> int:
    found = [int(m.group(1)) for md in at.markdown if (m := COUNT.search(md.value))]
    assert len(found) == 1, [md.value for md in at.markdown]
    return found[0]


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


def test_detect_page_starts_on_a_sample_scene(env):
    at = start()
    assert at.session_state["model_name"] == "shapes"
    assert count(at) >= 0
    assert "network ran once for this image" in captions(at)
    assert any(e.proto.id.endswith("-overlay") for e in at.get("bidi_component"))  # the picture (ui/overlay_view)
    assert len(at.get("download_button")) == 3
    assert "Device: **cpu**" in "\n".join(c.value for c in at.sidebar.caption)


def test_controls_refilter_without_running_the_network(env, monkeypatch):
    from mrcnn.inference.trace import Trace

    runs = []
    original = Trace._run_network
    monkeypatch.setattr(Trace, "_run_network", lambda self: (runs.append(1), original(self))[1])
    at = start()
    assert len(runs) == 1
    at.slider(key="score_thresh").set_value(0.05).run()
    low = count(at)
    at.slider(key="score_thresh").set_value(0.5).run()
    high = count(at)
    assert low > high
    assert "network not re-run" in captions(at)
    at.slider(key="score_thresh").set_value(0.05).run()
    at.slider(key="max_detections").set_value(3).run()
    assert count(at) == min(low, 3)
    at.toggle(key="show_masks").set_value(False).run()
    assert "thresholds unchanged, nothing to re-filter" in captions(at)
    at.toggle(key="show_proposals").set_value(True).run()
    at.radio(key="color_by").set_value("class").run()
    assert not at.exception
    at.multiselect(key="class_filter::shapes").set_value(["circle"]).run()
    filtered = count(at)
    assert filtered <= min(low, 3)
    assert len(runs) == 1, "a control change ran the network again"


def shown_detections(at: AppTest) -> pd.DataFrame:
    return next(d.value for d in at.dataframe if "x0" in d.value.columns)


def max_box_iou(table: pd.DataFrame) -> float:
    boxes = torch.tensor(table[["x0", "y0", "x1", "y1"]].to_numpy(), dtype=torch.float32)
    iou = box_iou(boxes, boxes).fill_diagonal_(0)
    return float(iou.max()) if len(table) > 1 else 0.0


def test_agnostic_nms_and_class_thresholds_refilter_without_running_the_network(env, monkeypatch):
    from mrcnn.inference.trace import Trace

    runs = []
    original = Trace._run_network
    monkeypatch.setattr(Trace, "_run_network", lambda self: (runs.append(1), original(self))[1])
    at = start()
    at.slider(key="score_thresh").set_value(0.05).run()
    per_class = shown_detections(at)
    assert max_box_iou(per_class) > 0.6, "boxes of different classes overlap before agnostic NMS"
    at.toggle(key="agnostic_nms").set_value(True).run()
    agnostic = shown_detections(at)
    # the table rounds boxes to 0.1 px, so the IoU may pass the threshold by a hair
    assert max_box_iou(agnostic) <= 0.5 + 0.01 and not agnostic.equals(per_class)
    at.toggle(key="agnostic_nms").set_value(False).run()
    assert shown_detections(at).equals(per_class)
    assert "circle" in set(per_class["class"])
    at.session_state["class_thresh::shapes"] = {"circle": 1.0}  # what an edit of the class table stores
    at.run()
    assert not at.exception
    assert "circle" not in set(shown_detections(at)["class"])
    assert len(runs) == 1, "re-filtering ran the network again"


def test_class_table_edit_keeps_only_thresholds_that_differ_from_the_global_one(monkeypatch):
    import ui.detect

    ss = {"model_name": "shapes", "score_thresh": 0.5, "class_thresh::shapes": {"square": 0.8},
          "table": {"edited_rows": {0: {"score threshold": 0.9}, 1: {"score threshold": 0.5}},
                    "added_rows": [], "deleted_rows": []}}
    monkeypatch.setattr(st, "session_state", ss)
    ui.detect._store_class_edits(["circle", "square", "triangle"], "table")
    assert ss["class_thresh::shapes"] == {"circle": 0.9}  # square set back to the global value follows it
    assert ss["class_thresh_gen"] == 1  # the table starts again from the stored values


def test_table_row_highlights_that_instance(env):
    at = start()
    at.slider(key="score_thresh").set_value(0.05).run()
    assert count(at) > 1
    at.session_state["det_table"] = {"selection": {"rows": [1], "columns": [], "cells": []}}
    at.run()
    assert not at.exception
    assert at.session_state["highlight"] is not None


def test_the_chosen_row_outlives_a_visit_to_another_page_and_follows_its_detection(env):
    """Back from Inspect, the table's selection is empty (Streamlit re-creates it) and the highlight was lost."""
    at = start()
    at.slider(key="score_thresh").set_value(0.05).run()
    assert count(at) > 3
    at.session_state["det_table"] = {"selection": {"rows": [2], "columns": [], "cells": []}}
    at.run()
    chosen = at.session_state["highlight"]
    assert chosen is not None
    at.switch_page("ui/inspect.py").run()
    assert at.session_state["insp_det"] == chosen
    at.switch_page("ui/detect.py").run()
    assert not at.exception, at.exception
    assert at.session_state["highlight"] == chosen
    at.slider(key="score_thresh").set_value(0.06).run()  # the next press keeps it: the empty table is no choice
    assert at.session_state["highlight"] == chosen
    assert any(f"highlight={chosen}" in c.value for c in at.code)  # the page's link names it too
    at.session_state["det_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()  # another row chosen, then deselected: nothing is highlighted
    assert at.session_state["highlight"] not in (None, chosen)
    at.session_state["det_table"] = {"selection": {"rows": [], "columns": [], "cells": []}}
    at.run()
    assert at.session_state["highlight"] is None


def test_detects_timing_line_speaks_only_of_its_own_network_runs(env):
    """A run made on Inspect (a model switched there) was reported on Detect as its own, later."""
    other = str(write_tiny(env / "runs" / "other" / "checkpoint.pt", seed=5))
    at = start()
    at.switch_page("ui/inspect.py").run()
    at.sidebar.selectbox(key="model_name").select(other).run()  # the network runs here, on Inspect
    at.switch_page("ui/detect.py").run()
    assert not at.exception, at.exception
    assert "network not re-run" in captions(at) and "network ran once" not in captions(at)


def test_upload_png_adds_it_and_a_thumbnail_strip(env):
    at = start()
    at.file_uploader[0].upload("gradient.png", png(scene(120, 160, seed=4)), "image/png").run()
    assert not at.exception, at.exception
    assert "gradient.png" in captions(at)
    assert at.session_state["current_image"] in at.session_state["images"]
    assert len(at.session_state["images"]) == 2  # the starting sample + the upload
    assert any(b.label == "Show" for b in at.button)  # the strip lets the sample be picked again
    at.slider(key="score_thresh").set_value(0.05).run()
    assert count(at) > 0


def test_the_same_picture_uploaded_again_takes_its_new_name_and_is_the_newest(env):
    """It kept the first name it came with, in the caption and in the names of its downloads."""
    at = start()
    sample = at.session_state["images"][at.session_state["current_image"]]
    picture = png(scene(90, 110, seed=6))
    at.file_uploader[0].upload("first.png", picture, "image/png").run()
    at.file_uploader[0].upload("other.png", png(scene(90, 110, seed=7)), "image/png").run()
    at.file_uploader[0].upload("renamed.png", picture, "image/png").run()
    assert not at.exception, at.exception
    images = at.session_state["images"]
    assert [e.name for e in images.values()] == [sample.name, "other.png", "renamed.png"]
    assert at.session_state["current_image"] == list(images)[-1]
    assert "renamed.png ·" in captions(at) and "first.png" not in captions(at)
    # the sample scene's pixels uploaded under a name of the user's: an upload now (a link cannot carry it)
    at.file_uploader[0].upload("mine.png", png(sample.array), "image/png").run()
    assert not at.exception, at.exception
    assert (images[sample.id].name, images[sample.id].source) == ("mine.png", "upload")
    assert "mine.png ·" in captions(at)


def test_bad_uploads_show_a_message_and_the_app_keeps_working(env):
    at = start()
    good = png(scene(100, 100, seed=2))
    at.file_uploader[0].upload("notes.png", b"this is not an image", "image/png")
    at.file_uploader[0].upload("cut.png", good[: len(good) // 2], "image/png").run()
    assert not at.exception, at.exception
    errors = "\n".join(e.value for e in at.error)
    assert "notes.png" in errors and "cut.png" in errors
    assert len(at.session_state["images"]) == 1  # only the sample
    at.file_uploader[0].upload("fine.png", good, "image/png").run()
    assert not at.exception
    assert "fine.png" in captions(at)
    count(at)


def test_a_name_that_is_markdown_is_shown_as_text(env):
    """An upload named as a Markdown image showed as one in its error, fetched by every browser showing it."""
    name = "![a](http://example.invalid/f.png).png"
    at = start()
    at.file_uploader[0].upload(name, b"this is not an image", "image/png").run()
    error = next(e.value for e in at.error if "example.invalid" in e.value)
    assert "![a](" not in error and f"**{name}** was not added: {name}: not an image file" in shown(error)


def test_the_strip_says_when_older_images_leave_it(env):
    """Uploading more images than the strip keeps dropped the oldest without a word."""
    at = start()  # the strip holds the sample scene
    for i in range(MAX_IMAGES):
        at.file_uploader[0].upload(f"img{i}.png", png(scene(40, 48, seed=i)), "image/png")
    at.run()
    assert not at.exception, at.exception
    assert len(at.session_state["images"]) == MAX_IMAGES
    assert f"The strip keeps the {MAX_IMAGES} most recent images: 1 earlier one left it." in captions(at)


def test_too_many_pixels_is_refused(monkeypatch):
    import ui.detect

    monkeypatch.setenv("MRCNN_MAX_PIXELS", str(50 * 50))
    with pytest.raises(ImageError):
        ui.detect.ingest_upload("big.png", png(scene(100, 100)))
    assert ui.detect.ingest_upload("small.png", png(scene(40, 40))).array.shape == (40, 40, 3)


def test_new_sample_button_makes_another_scene(env):
    at = start()
    first = at.session_state["current_image"]
    at.button(key="new_sample").click().run()
    assert not at.exception
    assert at.session_state["current_image"] != first
    assert at.session_state["sample_seed"] == 1
    at.number_input(key="sample_seed").set_value(7).run()
    assert not at.exception
    assert at.session_state["images"][at.session_state["current_image"]].name == "sample-7.png"
    # from the largest seed to 0: past it, the box showed 0 under sample-1000000001 and links refused it
    at.number_input(key="sample_seed").set_value(MAX_SAMPLE_SEED).run()
    at.button(key="new_sample").click().run()
    assert not at.exception and at.number_input(key="sample_seed").value == 0
    assert at.session_state["images"][at.session_state["current_image"]].name == "sample-0.png"


def test_model_switch_to_a_training_run_and_to_an_unavailable_model(env, monkeypatch):
    write_tiny(env / "runs" / "r1" / "checkpoint.pt", ["__background__", "circle", "star"], seed=5)
    at = start()
    picker = at.sidebar.selectbox(key="model_name")
    run_name = next(o for o in picker.options if "run r1" in o)
    picker.select(str(env / "runs" / "r1" / "checkpoint.pt")).run()
    assert not at.exception, at.exception
    assert "run r1" in run_name
    assert "circle, star" in "\n".join(m.value for m in at.sidebar.markdown)
    count(at)

    def offline(name, progress=None, **kwargs):
        progress(10, 100)
        raise ModelUnavailable(f"cannot download {name}: offline (copy the file instead)")

    monkeypatch.setattr("mrcnn.model.zoo.download_weights", offline)
    at.sidebar.selectbox(key="model_name").select("coco-r50-fpn").run()
    assert not at.exception, at.exception
    assert any("not available" in w.value for w in at.sidebar.warning)
    assert any("No model loaded" in w.value for w in at.main.warning)
    at.sidebar.button(key="download_coco-r50-fpn").click().run()
    assert any("offline" in e.value for e in at.sidebar.error)
    at.sidebar.selectbox(key="model_name").select("shapes").run()
    assert not at.exception
    count(at)


def test_a_broken_run_checkpoint_is_named_once_in_the_reason(env):
    broken = write_tiny(env / "runs" / "r3" / "checkpoint.pt", ["__background__", "circle", "circle"])
    at = start()
    at.sidebar.selectbox(key="model_name").select(str(broken)).run()
    assert not at.exception, at.exception
    warning = shown(next(w.value for w in at.main.warning if "No model loaded" in w.value))
    assert "named more than once" in warning and warning.count(str(broken)) == 1, warning


def test_missing_bundled_model_starts_on_another_and_says_so(env):
    (env / "weights" / "shapes.pt").unlink()
    write_tiny(env / "runs" / "r2" / "checkpoint.pt")
    at = start()
    assert "r2" in at.session_state["model_name"]
    assert "shapes.pt is missing" in "\n".join(c.value for c in at.sidebar.caption)
    count(at)


def test_no_model_at_all_is_a_message_not_a_crash(env):
    (env / "weights" / "shapes.pt").unlink()
    at = start()
    assert any("No model loaded" in w.value for w in at.main.warning)
    assert any("missing" in w.value for w in at.sidebar.warning)


def test_inspect_page_walks_every_stage(env, monkeypatch):
    from mrcnn.inference.trace import Trace

    runs = []
    original = Trace._run_network
    monkeypatch.setattr(Trace, "_run_network", lambda self: (runs.append(1), original(self))[1])
    at = start()
    at.slider(key="score_thresh").set_value(0.05).run()
    at.switch_page("ui/inspect.py").run()
    assert not at.exception, at.exception
    titles = [h.value for h in at.subheader]
    assert [t.split()[0] for t in titles] == [str(i) for i in range(1, 11)], titles
    assert len(at.get("plotly_chart")) >= 14
    assert at.session_state["score_thresh"] == 0.05  # kept across the page switch

    kept = next(m for m in at.metric if m.label == "Kept (proposals)")
    at.number_input(key="rpn_post_nms_top_n").set_value(20)
    at.button[[b.label for b in at.button].index("Re-run RPN")].click().run()
    assert not at.exception, at.exception
    kept_after = next(m for m in at.metric if m.label == "Kept (proposals)")
    assert int(kept_after.value.replace(",", "")) <= 20 <= int(kept.value.replace(",", ""))
    assert "backbone not re-run" in captions(at)

    at.selectbox(key="insp_anchor_level").select(0).run()
    at.radio(key="insp_feat_mode").set_value("one channel").run()
    at.selectbox(key="insp_det").select_index(len(at.selectbox(key="insp_det").options) - 1).run()
    assert not at.exception, at.exception
    assert len(runs) == 1, "the Inspect page ran the network again"

    at.switch_page("ui/detect.py").run()
    assert not at.exception
    assert at.slider(key="score_thresh").value == 0.05
    assert "RPN knobs set on Inspect are in use" in captions(at)


def test_a_model_failure_is_a_message_on_the_page(env, monkeypatch):
    from mrcnn.inference.trace import Trace

    def boom(self):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Trace, "_run_network", boom)
    at = start()
    assert any("Could not run shapes" in e.value and "out of memory" in e.value for e in at.error)
    at.switch_page("ui/inspect.py").run()
    assert not at.exception
    assert any("out of memory" in e.value for e in at.error)


def test_inspect_opened_first_makes_its_own_sample(env):
    from collections import OrderedDict

    at = start()
    at.session_state["images"] = OrderedDict()
    at.session_state["traces"] = OrderedDict()
    at.switch_page("ui/inspect.py").run()
    assert not at.exception, at.exception
    assert len(at.session_state["images"]) == 1
    assert len(at.subheader) == 7  # steps 6, 7 and 9 follow a detection: none at score 0.5 here
    assert any("No detections" in i.value for i in at.info)


def test_inspect_controls_survive_a_smaller_image(env):
    at = start()
    at.file_uploader[0].upload("wide.png", png(scene(120, 300, seed=1)), "image/png").run()
    at.switch_page("ui/inspect.py").run()
    at.slider(key="insp_anchor_x").set_value(290).run()
    at.radio(key="insp_feat_mode").set_value("one channel").run()
    at.number_input(key="insp_feat_channel").set_value(15).run()
    at.switch_page("ui/detect.py").run()
    at.file_uploader[0].upload("small.png", png(scene(64, 80, seed=2)), "image/png").run()
    assert "small.png" in captions(at)
    at.switch_page("ui/inspect.py").run()
    assert not at.exception, at.exception
    assert at.slider(key="insp_anchor_x").value == 79


def labelled(at: AppTest, kind: str, label: str):
    """The one widget of this kind with this label on the page."""
    found = [w for w in at.get(kind) if w.label == label]
    assert len(found) == 1, [w.label for w in at.get(kind)]
    return found[0]


def test_mask_threshold_survives_a_visit_to_inspect(env):
    """Once the Inspect slider showed 0.00 and wrote it back: Detect's masks then filled their boxes."""
    at = start()
    labelled(at, "slider", "Score threshold").set_value(0.05).run()  # step 9 needs a detection to follow
    assert labelled(at, "slider", "Mask threshold").value == 0.5
    at.switch_page("ui/inspect.py").run()
    assert not at.exception, at.exception
    assert labelled(at, "slider", "Mask threshold").value == 0.5
    assert "pixels above 0.50" in captions(at)
    at.switch_page("ui/detect.py").run()
    assert labelled(at, "slider", "Mask threshold").value == 0.5
    assert at.session_state["mask_thresh"] == 0.5


# Every control more than one page uses, with a value other than its default.
DETECT_CONTROLS = {"slider": {"score_thresh": 0.05, "nms_thresh": 0.3, "max_detections": 40, "opacity": 0.8},
                   "toggle": {"show_masks": False, "show_labels": False, "show_outlines": True, "show_proposals": True},
                   "radio": {"color_by": "class"}}


def test_shared_controls_keep_their_values_through_every_page(env):
    at = start()
    for kind, values in DETECT_CONTROLS.items():
        for key, value in values.items():
            getattr(at, kind)(key=key).set_value(value).run()
    at.slider(key="proposals_k").set_value(20).run()  # drawn once the overlay is on
    assert not at.exception, at.exception

    at.switch_page("ui/inspect.py").run()
    assert at.slider(key="mask_thresh").value == 0.5
    at.slider(key="mask_thresh").set_value(0.7).run()  # a value set here shows on Detect
    at.number_input(key="rpn_post_nms_top_n").set_value(300)
    at.slider(key="rpn_nms_thresh").set_value(0.6)
    at.button[[b.label for b in at.button].index("Re-run RPN")].click().run()
    at.slider(key="insp_prop_k").set_value(30).run()
    assert not at.exception, at.exception

    for page in ("ui/finetune.py", "ui/evaluate.py", "ui/detect.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, at.exception)
    for kind, values in DETECT_CONTROLS.items():
        for key, value in values.items():
            assert getattr(at, kind)(key=key).value == value, key
    assert at.slider(key="proposals_k").value == 20
    assert at.slider(key="mask_thresh").value == 0.7
    assert "post-NMS top-N 300, NMS IoU 0.60" in captions(at)

    at.switch_page("ui/inspect.py").run()
    assert at.slider(key="mask_thresh").value == 0.7
    assert "pixels above 0.70" in captions(at)
    assert at.number_input(key="rpn_post_nms_top_n").value == 300
    assert at.slider(key="rpn_nms_thresh").value == 0.6
    assert at.slider(key="insp_prop_k").value == 30
    assert "score ≥ 0.05, NMS IoU 0.30 (set on Detect), mask ≥ 0.70" in captions(at)


def test_rpn_defaults_button_resets_the_knobs(env):
    at = start()
    at.switch_page("ui/inspect.py").run()
    at.number_input(key="rpn_pre_nms_top_n").set_value(200)
    at.button[[b.label for b in at.button].index("Re-run RPN")].click().run()
    assert at.session_state["rpn_pre_nms_top_n"] == 200
    at.button[[b.label for b in at.button].index("Defaults")].click().run()
    assert not at.exception, at.exception
    assert at.number_input(key="rpn_pre_nms_top_n").value == 1000
    assert at.session_state["rpn_pre_nms_top_n"] == 1000


def test_rpn_knobs_start_at_each_models_own_settings_and_a_change_follows_the_user(env):
    """The knobs (and the runs) used torchvision's 1000/1000 whatever the model's own test-time settings, so a
    trace differed from the model's forward; now a knob left alone follows the model, a changed one the user."""
    few = str(write_tiny(env / "runs" / "few" / "checkpoint.pt", seed=5,
                         arch={**TINY_LIGHT, "rpn_pre_nms_top_n_test": 60, "rpn_post_nms_top_n_test": 40}))
    at = start()
    at.switch_page("ui/inspect.py").run()
    knobs = lambda: (at.number_input(key="rpn_pre_nms_top_n").value, at.number_input(key="rpn_post_nms_top_n").value)
    kept = lambda: int(next(m for m in at.metric if m.label == "Kept (proposals)").value.replace(",", ""))
    assert knobs() == (1000, 1000) and kept() > 40

    at.sidebar.selectbox(key="model_name").select(few).run()
    assert not at.exception, at.exception
    assert knobs() == (60, 40) and kept() <= 40
    assert "other than the model's own" not in captions(at)

    at.number_input(key="rpn_post_nms_top_n").set_value(20)
    at.button[[b.label for b in at.button].index("Re-run RPN")].click().run()
    assert knobs() == (60, 20) and kept() <= 20
    at.sidebar.selectbox(key="model_name").select("shapes").run()  # the change goes along, the rest follows
    assert knobs() == (1000, 20) and kept() <= 20
    assert "other than the model's own" in captions(at)
    at.switch_page("ui/detect.py").run()
    assert "post-NMS top-N 20" in captions(at)

    at.switch_page("ui/inspect.py").run()
    at.button[[b.label for b in at.button].index("Defaults")].click().run()
    assert knobs() == (1000, 1000) and kept() > 40
    at.sidebar.selectbox(key="model_name").select(few).run()
    assert knobs() == (60, 40)


def test_stage_timings_are_drawn_only_while_their_expander_is_open(env):
    at = start()
    assert not any("network total" in c.value for c in at.caption)  # closed: nothing re-sent on each press
    at.session_state["det_timings_open"] = True
    at.slider(key="score_thresh").set_value(0.3).run()
    assert any("network total" in c.value for c in at.caption)


def test_the_app_freezes_what_its_imports_made_so_streamlits_collection_after_each_run_skips_it(env, monkeypatch):
    # Streamlit runs gc.collect(2) after every run, slider presses included; without the freeze it walked the
    # ~400k objects torch, torchvision and plotly make at import, ~200 ms holding the GIL on every press.
    import ui
    gc.unfreeze()
    ui.imports_frozen = False  # as in a new server process
    start()
    assert gc.get_freeze_count() > 100_000 and ui.imports_frozen
    frozen = gc.get_freeze_count()
    count = gc.get_freeze_count
    # a second run (another session, a rerun) does not freeze what the sessions made since, nor count the
    # frozen objects (a walk over all of them, ~40 ms of every run)
    monkeypatch.setattr(gc, "get_freeze_count", lambda: pytest.fail("a run counted the frozen objects"))
    start()
    assert count() <= frozen  # frozen objects can still die by their reference count
