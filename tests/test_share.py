"""Shareable views: a link built in one session restores the view in a fresh one (AppTest); bad values in a
link are one warning and the defaults, never a traceback."""
from __future__ import annotations

from collections import OrderedDict
from urllib.parse import parse_qsl, unquote, urlsplit

from streamlit.testing.v1 import AppTest

import ui.state
from tests.test_app import APP, count, env, start, tiny_shapes, write_tiny  # noqa: F401  (fixtures)
from ui import share

SET_ON_DETECT = {"slider": {"score_thresh": 0.05, "nms_thresh": 0.3, "opacity": 0.8},
                 "toggle": {"agnostic_nms": True, "show_labels": False}, "radio": {"color_by": "class"}}


def shared_link(at: AppTest) -> str:
    links = [c.value for c in at.code if "?" in c.value]
    assert len(links) == 1, [c.value for c in at.code]
    return links[0]


def open_link(link: str, page: str | None = None) -> AppTest:
    """A fresh session opening ``link`` (AppTest's address is unknown: links are relative there)."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params = dict(parse_qsl(urlsplit(link).query))
    at.run()
    assert not at.exception, at.exception
    return at


def test_the_pages_choices_are_the_ones_links_accept():
    assert share.SAMPLE_SIZES == tuple(ui.state.SAMPLE_SIZES)
    assert share.FEATURE_MODES == tuple(ui.state.FEATURE_MODES)


def test_a_link_from_detect_restores_the_view_in_a_fresh_session(env):
    other = str(env / "runs" / "other" / "checkpoint.pt")
    write_tiny(env / "runs" / "other" / "checkpoint.pt", seed=5)
    at = start()
    at.number_input(key="sample_seed").set_value(3).run()
    for kind, values in SET_ON_DETECT.items():  # one run for all: each run costs a redraw
        for key, value in values.items():
            getattr(at, kind)(key=key).set_value(value)
    at.session_state["class_thresh::shapes"] = {"triangle": 0.3}  # what an edit of the class table stores
    at.session_state["det_table"] = {"selection": {"rows": [1], "columns": [], "cells": []}}
    at.selectbox(key="compare_with").select(other).run()
    assert not at.exception, at.exception
    n, highlight = count(at), at.session_state["highlight"]
    assert n > 1 and highlight is not None
    link = shared_link(at)
    assert link.startswith("/detect?model=shapes&seed=3&size=256&highlight=")

    fresh = open_link(link)
    assert not fresh.warning
    for kind, values in SET_ON_DETECT.items():
        for key, value in values.items():
            assert getattr(fresh, kind)(key=key).value == value, key
    assert fresh.session_state["class_thresh::shapes"] == {"triangle": 0.3}
    assert fresh.session_state["compare_with"] == other
    entry = fresh.session_state["images"][fresh.session_state["current_image"]]
    assert entry.name == "sample-3.png" and entry.width == 256
    assert count(fresh) == n
    assert fresh.session_state["highlight"] == highlight
    assert fresh.query_params == {}  # the address bar no longer shows the link's values
    assert shared_link(fresh) == link


def test_a_link_reopens_the_scene_drawn_for_another_model(env):
    """A sample scene is drawn from the shapes of the model it was made for: the link opened another picture
    (of the link's model's shapes) under the same name, and its highlight pointed at another detection."""
    stars = str(write_tiny(env / "runs" / "stars" / "checkpoint.pt", ["__background__", "circle", "star"], seed=5))
    at = start()  # the sample scene of the bundled model: circles, squares and triangles
    at.sidebar.selectbox(key="model_name").select(stars).run()
    sent = at.session_state["images"][at.session_state["current_image"]]
    link = shared_link(at)
    assert 'shapes=["circle","square","triangle"]' in unquote(link)
    fresh = open_link(link)
    assert not fresh.warning
    opened = fresh.session_state["images"][fresh.session_state["current_image"]]
    assert opened.id == sent.id and opened.name == sent.name == "sample-0.png"
    assert shared_link(fresh) == link
    # the same seed made for this model: another picture, under another name
    at.number_input(key="sample_seed").set_value(1).run()
    at.number_input(key="sample_seed").set_value(0).run()
    names = [e.name for e in at.session_state["images"].values()]
    assert names == ["sample-0.png", "sample-1-circle-star.png", "sample-0-circle-star.png"]
    assert "shapes=" not in shared_link(at)  # drawn from the model's own shapes
    assert "not valid" in open_link(link.replace("%22triangle%22", "%22dog%22")).warning[0].value


def test_a_link_from_inspect_follows_the_same_detection(env):
    at = start()
    at.slider(key="score_thresh").set_value(0.05).run()
    n = count(at)
    assert n > 1  # the last detection, not the one Inspect starts on
    at.session_state["det_table"] = {"selection": {"rows": [n - 1], "columns": [], "cells": []}}
    at.run()
    at.switch_page("ui/inspect.py").run()
    chosen = at.session_state["insp_det"]
    assert chosen == at.session_state["highlight"]  # Inspect follows the row chosen on Detect
    assert "rpn_" not in shared_link(at)  # knobs at the model's own settings
    at.slider(key="rpn_nms_thresh").set_value(0.8)
    at.button[[b.label for b in at.button].index("Re-run RPN")].click().run()
    chosen = at.session_state["insp_det"]
    link = shared_link(at)
    assert link.startswith("/inspect?") and f"highlight={chosen}" in link
    assert "rpn_nms_thresh=0.8" in link and "rpn_pre_nms_top_n" not in link  # only the knob the user changed

    fresh = AppTest.from_file(APP, default_timeout=60).run()  # a session that has just opened the link:
    fresh.session_state["share_restored"] = False  # AppTest starts on Detect; the link opens Inspect
    fresh.session_state["images"] = OrderedDict()
    fresh.query_params = dict(parse_qsl(urlsplit(link).query))
    fresh.switch_page("ui/inspect.py").run()
    assert not fresh.exception, fresh.exception
    assert fresh.session_state["insp_det"] == chosen
    assert fresh.session_state["score_thresh"] == 0.05
    assert fresh.session_state["rpn_overrides"] == {"rpn_nms_thresh": 0.8}
    assert fresh.slider(key="rpn_nms_thresh").value == 0.8


def test_bad_values_in_a_link_are_one_warning_and_the_defaults(env):
    at = open_link("/detect?model=nope&score_thresh=nan&nms_thresh=0.3&max_detections=5000&color_by=purple"
                   "&agnostic_nms=yes&seed=-1&size=100&class_thresh={bad&classes=[\"dog\"]&highlight=x"
                   "&compare=shapes&opacity=0.8&rpn_post_nms_top_n=0")
    assert len(at.warning) == 1
    warning = at.warning[0].value
    for name in ("model 'nope'", "score_thresh", "max_detections", "color_by", "agnostic_nms", "seed", "size",
                 "class_thresh", "classes", "highlight", "compare", "rpn_post_nms_top_n"):
        assert name in warning, name
    ss = at.session_state
    assert ss["model_name"] == "shapes"
    assert (ss["score_thresh"], ss["max_detections"], ss["color_by"], ss["agnostic_nms"]) == (0.5, 100, "instance",
                                                                                            False)
    assert (ss["nms_thresh"], ss["opacity"]) == (0.3, 0.8)  # the valid values are kept
    assert ss["sample_seed"] == 0 and ss["compare_with"] is None and not ss.get("rpn_overrides")
    count(at)


def test_a_class_given_twice_in_a_link_is_one_warning(env):
    at = open_link('/detect?classes=["circle","circle"]&opacity=0.8')
    assert not at.exception, at.exception
    assert len(at.warning) == 1 and "classes" in at.warning[0].value
    assert at.session_state["opacity"] == 0.8


def test_deeply_nested_json_in_a_link_is_one_warning(env):
    deep = "[" * 1000 + "]" * 1000  # json.loads recurses once per bracket
    at = open_link(f"/detect?class_thresh={deep}&classes={deep}&opacity=0.8")
    assert not at.exception, at.exception
    assert len(at.warning) == 1 and "class_thresh" in at.warning[0].value and "classes" in at.warning[0].value
    assert at.session_state["opacity"] == 0.8


def test_an_uploaded_image_is_not_in_the_link_and_the_page_says_so(env):
    from tests.test_app import png
    from tests.helpers import scene

    at = start()
    assert not any("not in links" in w.value for w in at.warning)
    at.file_uploader[0].upload("mine.png", png(scene(80, 100, seed=1)), "image/png").run()
    at.slider(key="score_thresh").set_value(0.05).run()
    at.session_state["det_table"] = {"selection": {"rows": [0], "columns": [], "cells": []}}
    at.run()
    assert any("Uploaded images are not in links" in w.value for w in at.warning)
    link = shared_link(at)
    assert "mine" not in link and "highlight=" not in link and "seed=0&size=256" in link
