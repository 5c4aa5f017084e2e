"""Exports: a torchvision state dict that torchvision's own builder loads strictly, and ONNX files that
onnxruntime runs to the same detections as PyTorch (light architecture, and R50 at 160 px)."""
from __future__ import annotations

import json

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from mrcnn.errors import ExportError
from mrcnn.inference import model_export
from mrcnn.inference.model_export import export_model
from tests.helpers import CATEGORIES, scene, shaped_state_dict, tiny_loaded
from tests.test_app import env, tiny_shapes  # noqa: F401  (fixtures)


def detecting(loaded, boost: float = 6.0):
    """Random weights with the class scores raised, and the mask logits away from 0: a model that finds
    things to compare, with masks that a rounding error cannot flip (random ones sit at p = 0.5)."""
    with torch.no_grad():
        loaded.model.roi_heads.box_predictor.cls_score.bias[1:] += boost
        loaded.model.roi_heads.mask_predictor.mask_fcn_logits.bias += 4.0
    return loaded


def r50_loaded(size: int = 320, **settings):
    return detecting(tiny_loaded({"name": "maskrcnn_resnet50_fpn", "min_size": size, "max_size": size, **settings}))


# 100 proposals and 10 detections, not 1000 and 100: with the class scores raised every proposal is a
# detection, and the heads' work on them was most of each forward. Settings, not weights: no part of an export
FEWER = {"rpn_post_nms_top_n_test": 100, "box_detections_per_img": 10}


def test_torchvision_export_loads_strictly_in_plain_torchvision(tmp_path):
    loaded = r50_loaded(160, **FEWER)
    report = export_model(loaded, tmp_path / "out", "torchvision")
    assert sorted(report.files) == ["README.md", "classes.json", "model.pt"]
    classes = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert classes == CATEGORIES
    plain = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=len(classes), min_size=160,
                                  max_size=160, **FEWER)
    plain.load_state_dict(torch.load(tmp_path / "out" / "model.pt", weights_only=True), strict=True)
    image = torch.from_numpy(scene(120, 160, seed=4)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        ours, theirs = loaded.model([image])[0], plain.eval()([image])[0]
    assert len(theirs["boxes"]) and torch.equal(ours["boxes"], theirs["boxes"])
    assert "load_state_dict" in (tmp_path / "out" / "README.md").read_text()


def test_torchvision_format_refuses_the_light_architecture(tmp_path):
    with pytest.raises(ExportError, match="--format onnx"):
        export_model(tiny_loaded(), tmp_path / "out", "torchvision")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["light", "r50"])
def test_onnx_export_matches_pytorch_in_onnxruntime(tmp_path, capfd, which):
    # R50 with FEWER proposals and detections: the same graph, a tenth of the heads' work in each of the
    # check's PyTorch and onnxruntime runs
    loaded = detecting(tiny_loaded()) if which == "light" else r50_loaded(160, **FEWER)
    report = export_model(loaded, tmp_path / "out", "onnx")
    check = report.check
    assert check.passed and check.images == 3 and check.detections > 0
    assert check.max_box_px <= 0.5 and check.max_score_diff <= 1e-3 and check.min_mask_iou >= 0.99
    assert (tmp_path / "out" / "model.onnx").stat().st_size > 0
    assert report.input_size == model_export.default_input_size(loaded)
    # onnxruntime's own log (C++, straight to stderr) once printed a line per detection count of R50's runs
    assert capfd.readouterr().err == ""


def test_a_failed_check_fails_loudly_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(model_export, "MAX_BOX_PX", -1.0)  # no export can be this exact
    with pytest.raises(ExportError, match="does not reproduce PyTorch: image 1: detection 0 differs"):
        export_model(detecting(tiny_loaded()), tmp_path / "out", "onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_settings_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_model(tiny_loaded(), tmp_path / "file", "onnx")
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(tiny_loaded(), tmp_path / "out", "tflite")
    with pytest.raises(ExportError, match="32 to 4096"):
        export_model(tiny_loaded(), tmp_path / "out", "onnx", size=(10, 100000))


def test_model_card_offers_an_export_download(env):
    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP

    at = AppTest.from_file(APP, default_timeout=180).run()
    assert at.radio(key="export_format").options == ["onnx"], "the light model has no torchvision export"
    at.button(key="export_prepare").click().run()
    assert not at.exception and not at.error
    assert any("onnxruntime matched" in c.value for c in at.caption)
    assert not list(env.glob("**/model.onnx")), "the export was zipped in memory, nothing left on disk"


def test_export_zip_holds_the_files(tmp_path):
    import io
    import zipfile

    loaded = tiny_loaded({"name": "maskrcnn_resnet50_fpn"})
    # zeros: the weights do not matter here, and 170 MB of zeros zip in a second where random floats take ten
    loaded.model.load_state_dict(shaped_state_dict("maskrcnn_resnet50_fpn", len(CATEGORIES)))
    data, report = model_export.export_zip(loaded, "torchvision")
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == sorted(report.files)


def test_an_output_name_taken_by_a_folder_is_refused_before_exporting(tmp_path, monkeypatch):
    (tmp_path / "out" / "model.onnx").mkdir(parents=True)

    def no_export(*args):
        raise AssertionError("exported before the check")

    monkeypatch.setattr(model_export, "_write_onnx", no_export)
    with pytest.raises(ExportError, match=r"cannot write model.onnx there: a folder has that name"):
        export_model(tiny_loaded(), tmp_path / "out", "onnx")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model.onnx"]


def test_a_failed_export_leaves_no_folder_it_made(tmp_path):
    with pytest.raises(ExportError, match="--format onnx"):
        export_model(tiny_loaded(), tmp_path / "new" / "b" / "c", "torchvision")
    assert list(tmp_path.iterdir()) == []
