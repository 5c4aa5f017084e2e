"""Evaluation: COCO metrics of a perfect model are 1, classes matched by name, the model is not mutated,
no detections give zeros, CLI --json keys (docs/cli.md)."""
from __future__ import annotations

import contextlib
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from mrcnn.model.architectures import build_model, light_arch
from mrcnn.model.checkpoint import save_checkpoint
from mrcnn.evaluation.evaluate import METRIC_KEYS, _same_size_runs, evaluate
from mrcnn.data.shapes import ShapesDataset, write_dataset
from mrcnn.errors import DatasetError
from tests.helpers import CATEGORIES, TINY_TRAIN_ARCH, tiny_loaded


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.score_thresh, self.detections_per_img = 0.5, 100


def _fingerprint(image: torch.Tensor) -> bytes:
    return image.numpy().tobytes()


class OracleModel(nn.Module):
    """Answers each image (recognised by its pixels: batches come in any order) with its ground truth,
    labels renamed into ``categories``."""

    def __init__(self, dataset, categories, drop_all: bool = False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.roi_heads = _Heads()
        # what evaluate reads of a real model's input transform: its sizes (to refuse an image scaled to 0 px)
        self.transform = GeneralizedRCNNTransform(800, 1333, [0.0] * 3, [1.0] * 3)
        self.answers, self.calls = {}, 0
        for i in range(len(dataset)):
            image, t = dataset[i]
            labels = torch.tensor([categories.index(dataset.categories[int(k)]) for k in t["labels"]])
            n = 0 if drop_all else len(labels)
            self.answers[_fingerprint(image)] = {"boxes": t["boxes"][:n], "labels": labels[:n],
                                                 "scores": torch.linspace(0.99, 0.9, len(labels))[:n],
                                                 "masks": t["masks"][:n, None].float()}

    def forward(self, images):
        self.calls += 1
        return [self.answers[_fingerprint(image)] for image in images]


def test_perfect_predictions_score_one_on_generated_scenes():
    ds = ShapesDataset(4, seed=3, size=64)
    result = evaluate(OracleModel(ds, ds.categories), ds, categories=ds.categories)
    assert result.bbox["AP"] == pytest.approx(1.0) and result.segm["AP"] == pytest.approx(1.0)
    assert set(result.bbox) == set(METRIC_KEYS) == set(result.segm)
    assert set(result.per_class) <= {"circle", "square", "triangle"} and result.per_class
    for values in result.per_class.values():
        assert values["bbox_AP"] == pytest.approx(1.0) and values["segm_AP"] == pytest.approx(1.0)
    curve = next(iter(result.pr_curves["segm"].values()))
    assert len(curve["recall"]) == len(curve["precision"]) and max(curve["precision"]) == 1.0
    assert len(result.predictions) == 4 and isinstance(result.predictions[0]["labels"][0], str)
    assert json.dumps(result.to_dict())  # plain JSON for the app


def test_batched_threaded_evaluation_equals_one_by_one():
    """Batches of two on two worker threads give the same detections and AP (4 decimals) as one image at
    a time on the caller's thread (float32, a tiny random-weight model scoring low everywhere)."""
    loaded = tiny_loaded()
    ds = ShapesDataset(4, seed=4, size=64)
    one = evaluate(loaded, ds, batch_size=1, workers=1)
    many = evaluate(loaded, ds, batch_size=2, workers=2)
    assert sum(len(p["scores"]) for p in one.predictions) > 0
    for iou_type in ("bbox", "segm"):
        assert {k: round(v, 4) for k, v in getattr(one, iou_type).items()} == \
               {k: round(v, 4) for k, v in getattr(many, iou_type).items()}
    for a, b in zip(one.predictions, many.predictions, strict=True):
        assert a["image_id"] == b["image_id"] and a["labels"] == b["labels"]
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=0.02)
        np.testing.assert_allclose(a["scores"], b["scores"], atol=2e-4)


def test_run_slot_is_held_around_each_round_of_network_runs_alone(monkeypatch):
    """A server's run slot (ui.state.network_slot) is taken per round (one batch per worker, side by side:
    a slot per batch left the other cores idle), with the round's largest image shape and number of images;
    the networks run inside it, loading outside; the AP is the same as without one."""
    ds = ShapesDataset(5, seed=3, size=64)
    events, one_at_a_time, in_slot = [], threading.Lock(), threading.Event()
    forward, getitem = OracleModel.forward, ShapesDataset.__getitem__
    monkeypatch.setattr(OracleModel, "forward", lambda self, images: (
        events.append("network" if in_slot.is_set() else "network outside the slot"), forward(self, images))[1])
    monkeypatch.setattr(ShapesDataset, "__getitem__", lambda self, i: (
        events.append("loaded inside the slot") if in_slot.is_set() else None, getitem(self, i))[1])

    @contextlib.contextmanager
    def run_slot(shape, images):
        with one_at_a_time:
            events.append((shape, images))
            in_slot.set()
            yield
            in_slot.clear()
            events.append("slot freed")

    oracle = OracleModel(ds, ds.categories)
    result = evaluate(oracle, ds, categories=ds.categories, batch_size=1, workers=2, run_slot=run_slot)
    # 5 images, one per batch, two workers: rounds of 2, 2 and 1
    assert events == [((64, 64, 3), 2), "network", "network", "slot freed"] * 2 + [
        ((64, 64, 3), 1), "network", "slot freed"]
    assert result.bbox["AP"] == pytest.approx(1.0) and result.segm["AP"] == pytest.approx(1.0)


def test_an_evaluation_leaves_new_threads_with_the_callers_thread_count():
    """Its workers' torch.set_num_threads(1) became every later thread's default: on the app's server each
    page run after an evaluation (a new script thread) ran its network, and the next evaluation, on one core."""
    ds = ShapesDataset(4, seed=3, size=64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as a server's (the suite's workers run one thread each)
    try:
        evaluate(OracleModel(ds, ds.categories), ds, categories=ds.categories, batch_size=1, workers=2)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_only_consecutive_images_of_one_size_share_a_batch():
    images = [torch.zeros(3, 64, 64), torch.zeros(3, 64, 64), torch.zeros(3, 64, 80), torch.zeros(3, 64, 64)]
    assert _same_size_runs(images) == [slice(0, 2), slice(2, 3), slice(3, 4)]


def test_classes_matched_by_name_on_coco_folder(tmp_path):
    write_dataset(tmp_path / "ds", 3, seed=1, size=64)
    from mrcnn.data.coco import load_dataset
    ds = load_dataset(tmp_path / "ds")
    model_categories = ["__background__", "triangle", "star", "circle", "square"]  # other order, one extra
    result = evaluate(OracleModel(ds, model_categories), ds, categories=model_categories)
    assert result.bbox["AP"] == pytest.approx(1.0) and result.segm["AP"] == pytest.approx(1.0)
    assert "star" not in result.per_class


def test_a_class_the_model_lacks_has_no_row_and_counts_as_missed(tmp_path, capsys):
    """It showed as a per-class AP of 0.000, read as measured; and as B − A on Evaluate's comparison."""
    from mrcnn.data.coco import load_dataset
    write_dataset(tmp_path / "ds", 4, seed=1, size=64)
    ds = load_dataset(tmp_path / "ds")
    assert "square" in {ds.categories[int(k)] for i in range(len(ds)) for k in ds[i][1]["labels"]}
    oracle = OracleModel(ds, ["__background__", "triangle", "circle", "square"])
    for answer in oracle.answers.values():  # a model without "square": it never answers one
        keep = answer["labels"] != 3
        answer.update({k: v[keep] for k, v in answer.items()})
    result = evaluate(oracle, ds, categories=["__background__", "triangle", "circle"])
    assert result.classes_not_in_model == ["square"]
    assert set(result.per_class) == {"triangle", "circle"} and "square" not in result.pr_curves["segm"]
    assert all(v["segm_AP"] == pytest.approx(1.0) for v in result.per_class.values())
    assert result.segm["AP"] < 0.9  # the squares it cannot find are missed, as COCO counts them


def test_a_dataset_with_nothing_the_model_could_find_is_one_line(tmp_path):
    """AP 0.000 in every table, without a word, for data holding no object of the model's classes."""
    from mrcnn.data.coco import load_dataset
    write_dataset(tmp_path / "other", 2, seed=1, size=64, classes=("star", "ring"))
    other = load_dataset(tmp_path / "other")
    with pytest.raises(DatasetError, match=r"none of the dataset's classes \(star, ring\) is one of the model's "
                                           r"\(circle, square, triangle\): AP cannot be measured"):
        evaluate(OracleModel(other, other.categories), other, categories=CATEGORIES)
    write_dataset(tmp_path / "empty", 2, seed=1, size=64)
    annotations = json.loads((tmp_path / "empty" / "annotations.json").read_text())
    (tmp_path / "empty" / "annotations.json").write_text(json.dumps({**annotations, "annotations": []}))
    empty = load_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="the dataset has no annotated object of the model's classes"):
        evaluate(OracleModel(empty, empty.categories), empty, categories=empty.categories)


def test_no_detections_give_zero_and_model_is_not_mutated():
    ds = ShapesDataset(2, seed=0, size=64)
    model = OracleModel(ds, ds.categories, drop_all=True)
    seen = []
    result = evaluate(model, ds, progress=lambda done, total: seen.append((done, total)), categories=ds.categories)
    assert result.bbox["AP"] == 0.0 and result.segm["AP"] == 0.0
    assert seen == [(1, 2), (2, 2)]
    assert model.roi_heads.score_thresh == 0.5 and model.calls == 0  # a copy ran, not the model


def test_cli_evaluate_json(tmp_path, capsys):
    from mrcnn.cli import main
    torch.manual_seed(0)
    arch, cats = light_arch(**TINY_TRAIN_ARCH), CATEGORIES
    path = save_checkpoint(tmp_path / "m.pt", arch, cats, build_model(arch, 4).state_dict())
    write_dataset(tmp_path / "ds", 2, seed=2, size=64)
    assert main(["evaluate", "--model", str(path), "--data", str(tmp_path / "ds"), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("bbox", "segm"):
        assert set(out[key]) >= set(METRIC_KEYS)
        assert all(isinstance(v, float) for v in out[key].values())
    assert main(["evaluate", "--model", str(path), "--data", "shapes:2:0:64", "--device", "cpu"]) == 0
    assert "mask" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(path), "--data", str(tmp_path / "nope"), "--device", "cpu"]) == 2


# ------------------------------------------------------------------ the bundled model on shapes drawn by other code

from mrcnn.model.zoo import weights_dir  # noqa: E402

WEIGHTS = weights_dir() / "shapes.pt"


def _alpha(draw_fn, size: int, ss: int = 4) -> np.ndarray:
    """Coverage in 0..1 of a shape drawn by PIL at ``ss``x supersampling (anti-aliased edges)."""
    big = Image.new("L", (size * ss, size * ss), 0)
    draw_fn(ImageDraw.Draw(big), ss)
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), np.float32) / 255.0


def foreign_scene(size: int = 256):
    """A scene unlike mrcnn.data.shapes': gradient background, gradient / flat fills, anti-aliased edges,
    a rotated square and a circle cut by the border. Returns (uint8 HxWx3, [(label, mask bool HxW)])."""
    s = size / 256
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.stack([40 + 150 * yy, 70 + 90 * xx, 160 - 100 * yy], -1)

    def hgrad(c0, c1, x0, x1):  # colour ramp across the shape's own extent
        t = np.clip((xx * 256 - x0) / (x1 - x0), 0, 1)[..., None]
        return np.asarray(c0, np.float32) * (1 - t) + np.asarray(c1, np.float32) * t

    rot = lambda cx, cy, r, a, n: [(cx + r * np.cos(a + 2 * np.pi * i / n),  # noqa: E731
                                    cy + r * np.sin(a + 2 * np.pi * i / n)) for i in range(n)]
    shapes = [
        ("circle", lambda d, k: d.ellipse([k * s * 38, k * s * 38, k * s * 102, k * s * 102], fill=255),
         hgrad((200, 30, 30), (250, 230, 40), 38, 102)),
        ("square", lambda d, k: d.polygon([(x * k, y * k) for x, y in rot(180 * s, 75 * s, 42 * s, 0.35, 4)], fill=255),
         hgrad((20, 20, 110), (90, 170, 250), 138, 222)),
        ("triangle", lambda d, k: d.polygon([(x * k, y * k) for x, y in rot(85 * s, 185 * s, 45 * s, -np.pi / 2, 3)],
                                            fill=255), np.full((size, size, 3), (40, 200, 80), np.float32)),
        ("circle", lambda d, k: d.ellipse([k * s * 215, k * s * 160, k * s * 295, k * s * 240], fill=255),
         np.full((size, size, 3), (250, 250, 250), np.float32)),  # a third of it outside the right border
    ]
    truth = []
    for label, draw_fn, fill in shapes:
        a = _alpha(draw_fn, size)[..., None]
        image = image * (1 - a) + fill * a
        truth.append((label, a[..., 0] > 0.5))
    return np.clip(image.round(), 0, 255).astype(np.uint8), truth


@pytest.mark.skipif(not WEIGHTS.is_file(), reason="weights/shapes.pt is missing (bash weights/train_shapes.sh)")
@pytest.mark.parametrize("size", [256, 384])
def test_bundled_model_finds_shapes_drawn_by_other_code(size):
    from mrcnn.model.zoo import load_model
    loaded = load_model("shapes", device="cpu")
    image, truth = foreign_scene(size)
    with torch.inference_mode():
        out = loaded.model([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    keep = out["scores"] >= 0.5
    labels = [loaded.categories[int(k)] for k in out["labels"][keep]]
    scores = out["scores"][keep].tolist()
    masks = (out["masks"][keep, 0] > 0.5).numpy()
    matched = set()
    for label, gt in truth:
        ious = [float((m & gt).sum() / max((m | gt).sum(), 1)) for m in masks]
        overlapping = [j for j, iou in enumerate(ious) if iou >= 0.5]
        assert overlapping, f"{label} missed (best mask IoU {max(ious, default=0):.2f})"
        top = max(overlapping, key=lambda j: scores[j])  # what a user sees first on this object
        assert labels[top] == label, f"{label} detected as {labels[top]} ({scores[top]:.2f})"
        assert ious[top] >= 0.75, f"{label}: mask IoU {ious[top]:.2f}"
        matched.update(overlapping)
    spurious = [labels[j] for j in range(len(labels)) if j not in matched]
    assert len(spurious) <= 1, f"confident detections on the background: {spurious}"


@pytest.mark.parametrize("settings", [{"score_thresh": float("nan")}, {"mask_thresh": 1.5},
                                      {"max_detections": 10**9}])
def test_thresholds_out_of_range_are_refused_before_any_image(settings):
    ds = ShapesDataset(1, seed=0, size=64)
    with pytest.raises(ValueError, match=next(iter(settings))):
        evaluate(OracleModel(ds, ds.categories), ds, categories=ds.categories, **settings)
