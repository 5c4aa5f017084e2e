"""Two models side by side: the one-to-one matcher (crafted detections) and the Detect and Evaluate pages
comparing two tiny models (AppTest)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from mrcnn.cli import main
from mrcnn.data import coco
from mrcnn.evaluation.compare import ap_difference
from mrcnn.inference.compare import compare_detections, counts_by_class
from mrcnn.inference.structures import Detections, Thresholds
from mrcnn.inference.trace import Trace
from mrcnn.model.checkpoint import save_checkpoint
from tests.helpers import CATEGORIES, TINY_LIGHT, shown_option, tiny_loaded
from tests.test_app import count, env, start, tiny_shapes, write_tiny  # noqa: F401  (fixtures)
from tests.test_app_training_pages import count_calls, open_page

CLASSES = ["__background__", "circle", "square", "triangle"]


def dets(rows, categories=CLASSES) -> Detections:
    """Detections from (class name, score, x0, y0, x1, y1) rows."""
    rows = list(rows)
    return Detections(np.array([r[2:] for r in rows], np.float32).reshape(-1, 4),
                      np.array([r[1] for r in rows], np.float32),
                      np.array([categories.index(r[0]) for r in rows], np.int64), None,
                      np.arange(len(rows), dtype=np.int64), list(categories), (100, 100))


def test_same_detections_all_match():
    a = dets([("circle", 0.9, 0, 0, 10, 10), ("square", 0.8, 20, 20, 40, 40), ("square", 0.7, 22, 22, 40, 40)])
    c = compare_detections(a, a)
    assert sorted(map(tuple, c.pairs.tolist())) == [(0, 0), (1, 1), (2, 2)]
    assert c.counts == {"matched": 3, "only A": 0, "only B": 0}
    assert np.allclose(c.ious, 1.0)


def test_class_iou_and_one_to_one():
    a = dets([("circle", 0.9, 0, 0, 10, 10),     # matches B0 (IoU 0.81)
              ("circle", 0.8, 1, 1, 11, 11),     # B0 is taken by the better pair: only A
              ("square", 0.9, 50, 50, 60, 60),   # B2 is a triangle there: only A
              ("triangle", 0.6, 80, 80, 90, 90)])  # B3 overlaps by IoU 1/3 < 0.5: only A
    b = dets([("circle", 0.7, 0, 0, 9, 9),
              ("square", 0.9, 30, 30, 40, 40),   # nothing of A there: only B
              ("triangle", 0.8, 50, 50, 60, 60),
              ("triangle", 0.8, 85, 80, 95, 90)])
    c = compare_detections(a, b)
    assert c.pairs.tolist() == [[0, 0]]
    assert c.only_a.tolist() == [1, 2, 3] and c.only_b.tolist() == [1, 2, 3]
    assert counts_by_class(c, a, b) == {"circle": {"matched": 1, "only A": 1, "only B": 0},
                                        "square": {"matched": 0, "only A": 1, "only B": 1},
                                        "triangle": {"matched": 0, "only A": 1, "only B": 2}}


def test_highest_iou_wins_and_swapping_models_swaps_the_result():
    # A0 overlaps B0 a little more than A1 does; greedy by A's score alone would give B0 to A1
    a = dets([("circle", 0.5, 0, 0, 10, 10), ("circle", 0.9, 0, 0, 10, 12)])
    b = dets([("circle", 0.8, 0, 0, 10, 10)])
    c = compare_detections(a, b)
    assert c.pairs.tolist() == [[0, 0]] and c.only_a.tolist() == [1]
    swapped = compare_detections(b, a)
    assert swapped.pairs.tolist() == [[0, 0]] and swapped.only_b.tolist() == [1]


def test_classes_match_by_name_across_label_orders():
    other = ["__background__", "triangle", "circle"]  # an imported model's own order
    a = dets([("circle", 0.9, 0, 0, 10, 10)])
    b = dets([("circle", 0.9, 0, 0, 10, 10)], other)
    assert compare_detections(a, b).counts == {"matched": 1, "only A": 0, "only B": 0}


def test_empty_sides_and_bad_threshold():
    a = dets([("circle", 0.9, 0, 0, 10, 10)])
    empty = dets([])
    assert compare_detections(a, empty).counts == {"matched": 0, "only A": 1, "only B": 0}
    assert compare_detections(empty, a).counts == {"matched": 0, "only A": 0, "only B": 1}
    assert compare_detections(empty, empty).pairs.shape == (0, 2)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="iou_thresh"):
            compare_detections(a, a, iou_thresh=bad)


def test_ap_difference_is_b_minus_a_where_both_have_a_number():
    a = {"bbox": {"AP": 0.5, "AP50": 0.7, "AP75": 0.4, "APs": -1.0, "APm": 0.3, "APl": 0.2},
         "segm": {"AP": 0.4, "AP50": 0.6, "AP75": 0.3, "APs": -1.0, "APm": 0.2, "APl": 0.1},
         "per_class": {"circle": {"bbox_AP": 0.5, "bbox_AP50": 0.7, "segm_AP": 0.4, "segm_AP50": -1.0},
                       "square": {"bbox_AP": 0.2, "bbox_AP50": 0.3, "segm_AP": 0.1, "segm_AP50": 0.2}}}
    b = {"bbox": {**a["bbox"], "AP": 0.75}, "segm": {**a["segm"], "AP50": 0.5},
         "per_class": {"circle": {"bbox_AP": 0.25, "bbox_AP50": 0.7, "segm_AP": 0.4, "segm_AP50": 0.9},
                       "star": {"bbox_AP": 0.9, "bbox_AP50": 0.9, "segm_AP": 0.9, "segm_AP50": 0.9}}}
    d = ap_difference(a, b)
    assert d["bbox"]["AP"] == 0.25 and d["segm"]["AP50"] == -0.1 and d["bbox"]["AP75"] == 0.0
    assert d["bbox"]["APs"] is None  # -1 on both sides: no ground truth of that size
    assert d["per_class"]["circle"] == {"bbox_AP": -0.25, "bbox_AP50": 0.0, "segm_AP": 0.0, "segm_AP50": None}
    assert list(d["per_class"]) == ["circle", "square", "star"]
    assert set(d["per_class"]["square"].values()) == {None} == set(d["per_class"]["star"].values())

# ---- Detect: "Compare with" ------------------------------------------------------------------------
def comparison_counts(at) -> dict:
    table = next(d.value for d in at.dataframe if "only A" in d.value.columns)
    return table.loc["all classes"].to_dict()


def test_compare_with_a_twin_matches_everything(env):
    write_tiny(env / "runs" / "twin" / "checkpoint.pt", seed=0)  # the same weights as shapes.pt
    at = start()
    at.slider(key="score_thresh").set_value(0.05).run()
    n = count(at)
    assert n > 0
    at.selectbox(key="compare_with").select(str(env / "runs" / "twin" / "checkpoint.pt")).run()
    assert not at.exception, at.exception
    assert comparison_counts(at) == {"matched": n, "only A": 0, "only B": 0}
    captions = [c for image in at.image for c in image.captions]
    assert captions == [f"A: shapes — {n} detections, 0 only here",
                        f"B: run twin (training run) — {n} detections, 0 only here"]


def test_compare_two_models_counts_are_the_matchers_and_sliders_run_no_network(env, monkeypatch):
    runs = []
    original = Trace._run_network
    monkeypatch.setattr(Trace, "_run_network", lambda self: (runs.append(1), original(self))[1])
    other = str(env / "runs" / "other" / "checkpoint.pt")
    write_tiny(env / "runs" / "other" / "checkpoint.pt", seed=5)
    at = start()
    at.selectbox(key="compare_with").select(other).run()
    assert len(runs) == 2
    for score in (0.05, 0.2):
        at.slider(key="score_thresh").set_value(score).run()
        assert not at.exception, at.exception
        traces = {key[0]: trace for key, trace in at.session_state["traces"].items()}
        a, b = (traces[name].refilter(Thresholds(score_thresh=score)) for name in ("shapes", other))
        expected = compare_detections(a, b).counts
        assert comparison_counts(at) == expected
        assert expected["only A"] + expected["only B"] > 0  # two random models disagree somewhere
    assert len(runs) == 2, "a slider ran a network again"
    at.selectbox(key="compare_with").select(None).run()
    assert not any("only A" in d.value.columns for d in at.dataframe)


def test_the_compare_pick_comes_back_after_the_sidebar_visits_that_model(env):
    """Switching the sidebar to model B and back dropped "Compare with" to none."""
    other = str(env / "runs" / "other" / "checkpoint.pt")
    write_tiny(env / "runs" / "other" / "checkpoint.pt", seed=5)
    at = start()
    at.selectbox(key="compare_with").select(other).run()
    at.sidebar.selectbox(key="model_name").select(other).run()
    assert not at.exception, at.exception
    assert shown_option(at.selectbox(key="compare_with")) == "none"  # B is the sidebar's model: not offered now
    at.sidebar.selectbox(key="model_name").select("shapes").run()
    assert at.selectbox(key="compare_with").value == other
    assert any("only A" in d.value.columns for d in at.dataframe)
    at.selectbox(key="compare_with").select(None).run()  # "none" picked is kept the same way
    at.sidebar.selectbox(key="model_name").select(other).run()
    at.sidebar.selectbox(key="model_name").select("shapes").run()
    assert at.selectbox(key="compare_with").value is None and shown_option(at.selectbox(key="compare_with")) == "none"


# ---- Evaluate: a second model on the same data -------------------------------------------------------
def difference(at, what: str):
    return next(d.value for d in at.dataframe if d.value.index.name == f"B − A {what}")


def test_evaluate_a_second_model_on_the_same_data_shows_b_minus_a(env, monkeypatch):
    """A twin (the same weights) differs by nothing; another model by B − A, class by class. Neither scans
    the dataset again."""
    twin, other = (str(env / "runs" / name / "checkpoint.pt") for name in ("twin", "other"))
    write_tiny(env / "runs" / "twin" / "checkpoint.pt", seed=0)
    write_tiny(env / "runs" / "other" / "checkpoint.pt", seed=5)
    at = open_page("ui/evaluate.py")
    at.number_input(key="ev_num").set_value(5)
    at.select_slider(key="ev_size").set_value(128).run()
    at.button(key="ev_go").click().run()
    scans = Counter()
    count_calls(monkeypatch, coco.CocoDataset, "__init__", scans)

    at.selectbox(key="ev_compare_with").select(twin).run()
    at.button(key="ev_compare_go").click().run()
    assert not at.exception, at.exception
    for what in ("overall", "per class"):
        table = difference(at, what)
        assert len(table) and (table.fillna(0) == 0).all().all(), table
    assert list(difference(at, "per class").columns) == ["box AP", "box AP50", "mask AP", "mask AP50"]

    at.selectbox(key="ev_compare_with").select(other).run()
    at.button(key="ev_compare_go").click().run()
    assert not at.exception, at.exception
    a = at.session_state["ev_evaluation"].result["per_class"]
    b = at.session_state["ev_compare"][1]["per_class"]
    shown = difference(at, "per class")
    assert list(shown.index) == list(a)
    for name in a:
        for column, key in (("box AP", "bbox_AP"), ("mask AP50", "segm_AP50")):
            if a[name][key] >= 0 and b[name][key] >= 0:
                assert shown.loc[name, column] == pytest.approx(b[name][key] - a[name][key])
    assert not (shown.fillna(0) == 0).all().all(), "two random models score the same everywhere"
    assert scans["__init__"] == 0, "the dataset was scanned again for model B"


# ---- CLI: evaluate --compare -------------------------------------------------------------------------
def test_cli_evaluate_compare_prints_b_minus_a(tmp_path, capsys):
    a, b = (save_checkpoint(tmp_path / f"{name}.pt", TINY_LIGHT, CATEGORIES, tiny_loaded(seed=seed).model.state_dict())
            for name, seed in (("a", 0), ("b", 5)))
    args = ["evaluate", "--model", str(a), "--data", "shapes:2:0:64", "--device", "cpu", "--compare", str(b)]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compare"]["model"] == str(b)
    assert out["difference"] == ap_difference(out, out["compare"])
    assert main(args) == 0
    assert f"B − A: {b} minus {a}" in capsys.readouterr().out
    assert main([*args[:-1], "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no-such-model" in err and "evaluating" not in err


def test_a_class_model_b_lacks_has_no_row_and_no_difference(env, tmp_path, capsys):
    """B's table showed 0.000 for a class B cannot predict, and B − A a loss there."""
    lacking = write_tiny(env / "runs" / "two_classes" / "checkpoint.pt", [c for c in CATEGORIES if c != "square"])
    at = open_page("ui/evaluate.py")
    at.number_input(key="ev_num").set_value(5)
    at.select_slider(key="ev_size").set_value(128).run()
    at.button(key="ev_go").click().run()
    at.selectbox(key="ev_compare_with").select(str(lacking)).run()
    at.button(key="ev_compare_go").click().run()
    assert not at.exception, at.exception
    assert "square" not in at.session_state["ev_compare"][1]["per_class"]
    assert "square" in at.session_state["ev_evaluation"].result["per_class"]
    assert any("Not classes of this model: square" in c.value for c in at.caption)
    assert difference(at, "per class").loc["square"].isna().all()

    args = ["evaluate", "--model", "shapes", "--data", "shapes:2:0:64", "--device", "cpu", "--compare", str(lacking)]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes_not_in_model"] == [] and out["compare"]["classes_not_in_model"] == ["square"]
    assert main(["evaluate", "--model", str(lacking), "--data", "shapes:2:0:64", "--device", "cpu"]) == 0
    assert f"square           not a class of {lacking}: its objects count as missed" in capsys.readouterr().out
