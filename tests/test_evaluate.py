"""Evaluation: COCO metrics of a perfect model are 1, classes matched by name, the model is not mutated,
no detections give zeros, CLI --json keys (DESIGN)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mrcnn.architectures import build_model, light_arch
from mrcnn.checkpoint import save_checkpoint
from mrcnn.evaluate import METRIC_KEYS, evaluate
from mrcnn.shapes import ShapesDataset, write_dataset


class _Heads(nn.Module):
    def __init__(self):
        super().__init__()
        self.score_thresh, self.detections_per_img = 0.5, 100


class OracleModel(nn.Module):
    """Answers each image (in order) with its ground truth, labels renamed into ``categories``."""

    def __init__(self, dataset, categories, drop_all: bool = False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.roi_heads = _Heads()
        self.answers, self.calls = [], 0
        for i in range(len(dataset)):
            _, t = dataset[i]
            labels = torch.tensor([categories.index(dataset.categories[int(k)]) for k in t["labels"]])
            n = 0 if drop_all else len(labels)
            self.answers.append({"boxes": t["boxes"][:n], "labels": labels[:n],
                                 "scores": torch.linspace(0.99, 0.9, len(labels))[:n],
                                 "masks": t["masks"][:n, None].float()})

    def forward(self, images):
        out = [self.answers[self.calls]]
        self.calls += 1
        return out


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


def test_classes_matched_by_name_on_coco_folder(tmp_path):
    write_dataset(tmp_path / "ds", 3, seed=1, size=64)
    from mrcnn.coco import load_dataset
    ds = load_dataset(tmp_path / "ds")
    model_categories = ["__background__", "triangle", "star", "circle", "square"]  # other order, one extra
    result = evaluate(OracleModel(ds, model_categories), ds, categories=model_categories)
    assert result.bbox["AP"] == pytest.approx(1.0) and result.segm["AP"] == pytest.approx(1.0)
    assert "star" not in result.per_class


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
    arch = light_arch(depths=[1, 1, 1, 1], fpn_channels=16, gn_groups=4, box_head_dim=32, mask_head_channels=[16],
                      min_size=64, max_size=96)
    cats = ["__background__", "circle", "square", "triangle"]
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
