"""Saliency for one detection (mrcnn.inference.saliency) on the bundled shapes model and generated scenes."""
import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from mrcnn.data.shapes import generate_scene
from mrcnn.inference.saliency import HEAT_COLOURS, heat_overlay, saliency
from mrcnn.inference.trace import run_trace
from mrcnn.model.zoo import load_model
from tests.test_app import env, start, tiny_shapes  # noqa: F401 (fixtures: the app on a tiny model)

SEEDS = range(6)


@pytest.fixture(scope="module")
def loaded():
    return load_model("shapes", device="cpu")


@pytest.fixture(scope="module")
def scenes(loaded):
    return [(scene, run_trace(loaded, scene.image)) for scene in (generate_scene(s) for s in SEEDS)]


def box_density(heat: np.ndarray, box) -> float:
    """Mean of the map per pixel inside a box."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return float(heat[y0:y1 + 1, x0:x1 + 1].mean())


def localised_fraction(scenes, method: str) -> tuple[float, int]:
    """Over confident detections that clearly match one object: the share whose map is at least twice as
    dense inside that object's box as inside any other object's box."""
    hits = total = 0
    for scene, trace in scenes:
        dets = trace.detections
        ious = box_iou(torch.as_tensor(dets.boxes).float(), torch.as_tensor(scene.boxes).float())
        for i, cid in enumerate(dets.candidate_ids):
            best = int(ious[i].argmax())
            if float(dets.scores[i]) < 0.5 or float(ious[i, best]) < 0.8 or len(scene.boxes) < 2:
                continue
            heat = saliency(trace, int(cid), method).heat
            own = box_density(heat, scene.boxes[best])
            others = max(box_density(heat, b) for j, b in enumerate(scene.boxes) if j != best)
            hits += own >= 2 * others
            total += 1
    return hits / max(total, 1), total


def test_element_wise_map_lies_on_the_chosen_object(scenes):
    fraction, total = localised_fraction(scenes, "element-wise")
    assert total >= 20
    assert fraction >= 0.8, f"only {fraction:.0%} of {total} detections"


def test_whole_map_grad_cam_spreads_to_objects_alike(scenes):
    """Why element-wise is the default: Grad-CAM's channel weights light up the other objects too."""
    element_wise, _ = localised_fraction(scenes, "element-wise")
    grad_cam, _ = localised_fraction(scenes, "grad-cam")
    assert grad_cam < element_wise - 0.3


def test_map_has_the_image_size_and_the_pooled_level(loaded):
    image = generate_scene(3, size=256).image[:, :180]  # not square: resizing and padding differ per side
    trace = run_trace(loaded, image)
    assert len(trace.detections.candidate_ids)
    for method in ("element-wise", "grad-cam"):
        sal = saliency(trace, int(trace.detections.candidate_ids[0]), method)
        assert sal.heat.shape == image.shape[:2]
        assert sal.heat.dtype == np.float32 and 0.0 <= sal.heat.min() and sal.heat.max() == pytest.approx(1.0)
        assert sal.level_name == trace.roi_crops(int(trace.detections.candidate_ids[0]))["box"]["level_name"]
        assert sal.label == int(trace.detections.labels[0])


def test_backbone_is_not_run_and_the_shared_model_is_unchanged(loaded, scenes, monkeypatch):
    model = loaded.model
    _, trace = scenes[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = []
    original = model.backbone.forward
    monkeypatch.setattr(model.backbone, "forward", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    features = {k: v.clone() for k, v in trace.features.items()}
    for cid in trace.detections.candidate_ids[:3]:
        saliency(trace, int(cid))
    assert calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    assert all(torch.equal(features[k], v) and not v.requires_grad for k, v in trace.features.items())


def test_heat_overlay_keeps_the_image_where_the_map_is_cold():
    image = np.full((4, 5, 3), 40, np.uint8)
    heat = np.zeros((4, 5), np.float32)
    heat[1, 2] = 1.0
    out = heat_overlay(image, heat, opacity=1.0)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out[heat == 0] == 40).all()
    assert (out[1, 2] == HEAT_COLOURS[-1].round()).all()


def test_unknown_method_is_refused(scenes):
    _, trace = scenes[0]
    with pytest.raises(ValueError, match="unknown saliency method"):
        saliency(trace, int(trace.detections.candidate_ids[0]), "magic")


def test_inspect_shows_the_saliency_of_the_chosen_detection(env, monkeypatch):
    """AppTest on the tiny model: the overlay is drawn for the chosen detection, once per candidate."""
    import mrcnn.inference.saliency as module

    computed = []
    original = module.saliency
    monkeypatch.setattr(module, "saliency", lambda *a: (computed.append(a[1:]), original(*a))[1])
    at = start()
    at.slider(key="score_thresh").set_value(0.05).run()
    at.switch_page("ui/inspect.py").run()
    assert not at.exception, at.exception
    figures = [c for c in at.get("plotly_chart") if c.proto.id and "saliency_fig" in c.proto.id]
    assert len(figures) == 1
    first = at.session_state["insp_det"]
    options = at.selectbox(key="insp_det").options
    assert "Where the model looks" in "\n".join(m.value for m in at.markdown)
    at.selectbox(key="insp_det").select_index(len(options) - 1).run()
    at.radio(key="insp_sal_method").set_value("grad-cam").run()
    at.slider(key="insp_sal_opacity").set_value(0.3).run()  # display only: nothing recomputed
    assert not at.exception, at.exception
    last = at.session_state["insp_det"]
    assert computed[0] == (first, "element-wise") and computed[-1] == (last, "grad-cam")
    assert len(computed) == len(set(computed)) == (3 if last != first else 2)
