"""Importing Mask R-CNNs trained elsewhere: torchvision state dicts (v1, v2), references-style and DDP
checkpoints, our own; wrong files refused with the first key or shape that does not fit, nothing written.

Shape-only cases use state dicts of zero-stride tensors (``expand``): full shapes, a few bytes on disk."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from mrcnn.errors import CheckpointError
from mrcnn.model.architectures import build_model
from mrcnn.model.checkpoint import load_checkpoint, save_checkpoint
from mrcnn.model.importer import import_model
from mrcnn.model.zoo import list_models, load_model
from tests.helpers import (CATEGORIES, TINY_LIGHT, fewer_proposals, forward_settings, scene, shaped_state_dict,
                           shown)
from tests.test_app import env, tiny_shapes  # noqa: F401  (fixtures)


@pytest.mark.parametrize("arch_name, num_classes", [("maskrcnn_resnet50_fpn", 3), ("maskrcnn_resnet50_fpn_v2", 5)])
def test_architecture_and_classes_come_from_keys_and_shapes(tmp_path, arch_name, num_classes):
    src = tmp_path / "maskrcnn_resnet50_fpn_v2_misleading_name.pth"  # the file name says nothing true
    torch.save(shaped_state_dict(arch_name, num_classes), src)
    imported = import_model(src, dest_dir=tmp_path / "models")
    ckpt = load_checkpoint(imported.checkpoint)
    assert ckpt["arch"] == {"name": arch_name, "min_size": 800, "max_size": 1333}
    assert ckpt["categories"] == ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]
    assert "--classes" in imported.class_note
    assert imported.card["source"]["file"] == src.name and len(imported.card["source"]["sha256"]) == 64


@pytest.mark.parametrize("wrap", ["references", "ddp"])
def test_references_and_ddp_checkpoints_are_opened(tmp_path, wrap):
    sd = shaped_state_dict("maskrcnn_resnet50_fpn", 3)
    if wrap == "references":
        obj = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {}, "epoch": 25,
               "args": {"lr": 0.02}}
    else:
        obj = {f"module.{k}": v for k, v in sd.items()}
    src = tmp_path / "ckpt.pth"
    torch.save(obj, src)
    imported = import_model(src, classes=["cat", "dog"], name="pets", min_size=512, max_size=800,
                            dest_dir=tmp_path / "models")
    ckpt = load_checkpoint(imported.checkpoint)
    assert ckpt["categories"] == ["__background__", "cat", "dog"] and imported.class_note is None
    assert ckpt["arch"]["min_size"] == 512 and ckpt["arch"]["max_size"] == 800
    assert set(ckpt["state_dict"]) == set(sd) and imported.name == "pets"


def test_class_names_from_coco_annotations_and_sidecars(tmp_path):
    src = tmp_path / "m.pth"
    torch.save(shaped_state_dict("maskrcnn_resnet50_fpn", 3), src)
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps({"categories": [{"id": 7, "name": "dog"}, {"id": 2, "name": "cat"}]}))
    assert import_model(src, classes_from=ann, dest_dir=tmp_path / "a").card["classes"] == ["cat", "dog"]
    (tmp_path / "m.pth.classes.txt").write_text("ant\nbee\n")
    assert import_model(src, dest_dir=tmp_path / "b").card["classes"] == ["ant", "bee"]
    with pytest.raises(CheckpointError, match="2 classes .* but 3 names came from"):
        import_model(src, classes=["a", "b", "c"], dest_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("builder, num_classes, wrap", [(maskrcnn_resnet50_fpn, 3, "ddp"),
                                                       (maskrcnn_resnet50_fpn_v2, 5, "references")])
def test_imported_torchvision_model_detects_exactly_as_torchvision(tmp_path, builder, num_classes, wrap):
    torch.manual_seed(0)
    reference = builder(weights=None, weights_backbone=None, num_classes=num_classes, min_size=128,
                        max_size=160).eval()
    with torch.no_grad():
        reference.roi_heads.box_predictor.cls_score.bias[1:] += 8.0  # random weights, yet detections
    state = reference.state_dict()
    saved = {f"module.{k}": v for k, v in state.items()} if wrap == "ddp" else {"model": state, "epoch": 3}
    src = tmp_path / "tv.pth"
    torch.save(saved, src)
    names = [f"c{i}" for i in range(1, num_classes)]
    imported = import_model(src, classes=names, min_size=128, max_size=160, dest_dir=tmp_path / "models")
    loaded = load_model(str(imported.checkpoint), device="cpu")
    assert loaded.arch["name"] == builder.__name__ and loaded.categories[1:] == names
    assert forward_settings(loaded.model) == forward_settings(reference)
    for model in (loaded.model, reference):  # both alike, after the check above: see fewer_proposals
        fewer_proposals(model)
    image = torch.from_numpy(scene(96, 128, seed=3)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        ours, theirs = loaded.model([image])[0], reference([image])[0]
    assert len(theirs["boxes"]) > 0
    for key in ("boxes", "labels", "scores", "masks"):
        assert torch.equal(ours[key], theirs[key]), key


def test_own_checkpoint_is_accepted_and_can_be_renamed(tmp_path):
    src = save_checkpoint(tmp_path / "own.pt", TINY_LIGHT, CATEGORIES, build_model(TINY_LIGHT, 4).state_dict())
    imported = import_model(src, classes=["o", "p", "q"], dest_dir=tmp_path / "models")
    assert load_checkpoint(imported.checkpoint)["categories"] == ["__background__", "o", "p", "q"]


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def _wrong_files(tmp_path):
    v1 = shaped_state_dict("maskrcnn_resnet50_fpn", 3)
    classifier = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}
    faster = {k: v for k, v in v1.items() if "mask" not in k}
    other = {"roi_heads.box_predictor.cls_score.weight": torch.zeros(3, 1024),
             "roi_heads.mask_predictor.mask_fcn_logits.weight": torch.zeros(3, 256, 1, 1),
             "roi_heads.box_head.fc6.weight": torch.zeros(1024, 12544), "backbone.body.stem.weight": torch.zeros(1)}
    wrong_shape = dict(v1, **{"rpn.head.conv.0.0.weight": torch.zeros(()).expand(128, 256, 3, 3)})
    cases = {"classifier": (classifier, "expected a Mask R-CNN state dict .*'conv1.weight'"),
             "faster_rcnn": (faster, "without a mask head"),
             "other_arch": (other, "expected key 'backbone.body.conv1.weight'"),
             "wrong_shape": (wrong_shape, r"rpn.head.conv.0.0.weight has shape \(128, 256, 3, 3\)")}
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
    full = tmp_path / "good.pth"
    torch.save(v1, full)
    (tmp_path / "truncated.pth").write_bytes(full.read_bytes()[:4000])
    cases["truncated"] = (None, "truncated or corrupt")
    (tmp_path / "pickle.pth").write_bytes(pickle.dumps({"model": _RunsCode()}))
    cases["pickle"] = (None, "not a")
    return {name: (tmp_path / f"{name}.pth", message) for name, (_, message) in cases.items()}


def test_wrong_files_get_one_clear_line_and_nothing_is_written(tmp_path, capsys):
    dest = tmp_path / "models"
    for name, (path, message) in _wrong_files(tmp_path).items():
        with pytest.raises(CheckpointError, match=message) as err:
            import_model(path, dest_dir=dest)
        assert "\n" not in str(err.value) and path.name in str(err.value), (name, str(err.value))
    assert not dest.exists()
    assert "pwned" not in capsys.readouterr().out


def test_imported_model_is_listed_and_loaded_by_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MRCNN_MODELS_DIR", str(tmp_path / "models"))
    src = save_checkpoint(tmp_path / "own.pt", TINY_LIGHT, CATEGORIES, build_model(TINY_LIGHT, 4).state_dict())
    # a slash made a name look like a training run's (its checkpoint's path), a leading '-' a flag of the
    # trainer's command line, brackets a Markdown image on every session's page
    for bad in ("../../evil name", str(tmp_path / "runs" / "r1" / "checkpoint.pt"), "--help",
                "![logo](http://example.invalid/n.png)"):
        with pytest.raises(CheckpointError, match="a model name must be 1 to 64 letters, digits, spaces or"):
            import_model(src, name=bad, classes=["o", "p", "q"])
    assert not (tmp_path / "models").exists()
    import_model(src, name="my pets (v2)", classes=["o", "p", "q"])
    assert [p.name for p in (tmp_path / "models").iterdir()] and all(
        p.name.startswith("imported-") for p in (tmp_path / "models").iterdir()), "the server names the files"
    info = next(i for i in list_models() if i.name == "my pets (v2)")
    assert info.kind == "imported" and info.available and info.classes == ["o", "p", "q"]
    assert load_model("my pets (v2)", device="cpu").categories[1:] == ["o", "p", "q"]
    with pytest.raises(CheckpointError, match="exists already"):
        import_model(save_checkpoint(tmp_path / "other.pt", TINY_LIGHT, CATEGORIES,
                                     build_model(TINY_LIGHT, 4).state_dict()), name="shapes")
    # the same file again under another name would rename the model under everyone using it
    with pytest.raises(CheckpointError, match=r"own.pt is imported already, as the model 'my pets \(v2\)'"):
        import_model(src, name="beta", classes=["o", "p", "q"])
    assert [i.name for i in list_models() if i.kind == "imported"] == ["my pets (v2)"]
    with pytest.raises(CheckpointError, match="class name 2 is 'N/A', which marks an unused class id"):
        import_model(src, name="na", classes=["o", "N/A", "q"])
    with pytest.raises(CheckpointError, match=r"the minimum size \(4096 px\) must not be above the maximum size "
                                              r"\(32 px\)"):
        import_model(src, name="sizes", classes=["o", "p", "q"], min_size=4096, max_size=32)


def test_add_a_model_from_the_sidebar(env, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP

    monkeypatch.setenv("MRCNN_MODELS_DIR", str(env / "models"))
    src = env / "upload.pth"
    torch.save(shaped_state_dict("maskrcnn_resnet50_fpn_v2", 3), src)
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.file_uploader(key="add_model_file").upload("../../../x/my_pets.pth", src.read_bytes(),
                                                  "application/octet-stream").run()
    at.text_input(key="add_model_classes").set_value("cat, dog").run()
    at.number_input(key="add_model_min_size").set_value(64).run()  # the sample scene at 64 px, not 800
    at.number_input(key="add_model_max_size").set_value(64).run()
    at.button(key="add_model").click().run()
    assert not at.exception
    assert any("Added **my_pets**" in s.value for s in at.success), [e.value for e in at.error]
    assert at.selectbox(key="model_name").value == "my_pets"
    assert not at.error and not [w.value for w in at.warning if "No model loaded" in w.value], "it loads"
    assert not (env.parent / "x").exists() and [p.name[:9] for p in (env / "models").iterdir()] == ["imported-"] * 2
    at.file_uploader(key="add_model_file").upload("classifier.pth", _classifier_bytes(env),
                                                  "application/octet-stream").run()
    at.text_input(key="add_model_name").set_value("clf").run()
    at.button(key="add_model").click().run()
    assert any("classifier.pth: expected a Mask R-CNN" in e.value for e in at.error)
    at.file_uploader(key="add_model_file").upload("three.pth", src.read_bytes(), "application/octet-stream").run()
    at.text_input(key="add_model_classes").set_value("a, b, c").run()
    at.text_input(key="add_model_name").set_value("three").run()
    at.button(key="add_model").click().run()
    assert [shown(e.value) for e in at.error if "three.pth" in e.value] == [  # the upload's name, not a server path
        "three.pth: the model has 2 classes (besides the background) but 3 names came from the class names given"]
    assert len(list((env / "models").iterdir())) == 2, "a refused file writes nothing"


def _classifier_bytes(folder) -> bytes:
    path = folder / "clf.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7), "fc.weight": torch.zeros(10, 4)}, path)
    return path.read_bytes()


def test_cli_import_then_use_the_name_everywhere(tmp_path, monkeypatch, capsys):
    """import -> models --json -> predict --model NAME -> export NAME; a wrong file is exit 2, one line."""
    from PIL import Image

    from mrcnn.cli import main

    monkeypatch.setenv("MRCNN_MODELS_DIR", str(tmp_path / "models"))
    src = save_checkpoint(tmp_path / "own.pt", TINY_LIGHT, CATEGORIES, build_model(TINY_LIGHT, 4).state_dict())
    assert main(["import", str(src), "--name", "mine", "--classes", "o,p,q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == ["o", "p", "q"]
    assert main(["models", "--json"]) == 0
    assert any(m["name"] == "mine" and m["kind"] == "imported" for m in json.loads(capsys.readouterr().out))
    Image.fromarray(scene(64, 80)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--model", "mine", "--out", str(tmp_path / "pred")]) == 0
    assert json.loads((tmp_path / "pred" / "a.json").read_text())["model"]["name"] == "mine"
    assert main(["export", "mine", "--format", "torchvision", "--out", str(tmp_path / "tv")]) == 2
    assert "--format onnx" in capsys.readouterr().err
    (tmp_path / "bad.pth").write_bytes(b"not torch")
    assert main(["import", str(tmp_path / "bad.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: bad.pth")


@pytest.mark.parametrize("kind, message", [
    ("sparse", "is a sparse_coo tensor"), ("meta", "holds no values"), ("complex", "has dtype complex64"),
    ("nan", "holds NaN values"), ("inf", "holds infinite values")])
def test_weights_no_model_can_run_are_refused_and_nothing_is_written(tmp_path, kind, message, recwarn):
    """A sparse file was imported and then failed in the app with a traceback; NaN weights were accepted."""
    key = "roi_heads.box_head.fc6.weight"
    sd = shaped_state_dict("maskrcnn_resnet50_fpn", 3)
    shape = sd[key].shape
    sd[key] = {"sparse": torch.zeros(shape).to_sparse(), "meta": torch.empty(shape, device="meta"),
               "complex": torch.zeros((), dtype=torch.complex64).expand(shape),
               "nan": torch.full((), float("nan")).expand(shape),
               "inf": torch.full((), float("-inf")).expand(shape)}[kind]
    src = tmp_path / "broken.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, src)
    with pytest.raises(CheckpointError, match=rf"^broken.pth: state_dict\['{key}'\] {message}"):
        import_model(src, dest_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists()
    assert [str(w.message) for w in recwarn] == []


def test_own_checkpoint_with_broken_weights_or_repeated_names_is_refused(tmp_path):
    sd = build_model(TINY_LIGHT, 4).state_dict()
    nan = dict(sd, **{"rpn.head.conv.0.0.weight": torch.full_like(sd["rpn.head.conv.0.0.weight"], float("nan"))})
    nan_src = save_checkpoint(tmp_path / "nan.pt", TINY_LIGHT, CATEGORIES, nan)
    with pytest.raises(CheckpointError, match=r"^nan.pt: state_dict\['rpn.head.conv.0.0.weight'\] holds NaN"):
        import_model(nan_src, dest_dir=tmp_path / "models")
    dup = save_checkpoint(tmp_path / "dup.pt", TINY_LIGHT, ["__background__", "circle", "circle", "square"], sd)
    with pytest.raises(CheckpointError, match="^dup.pt: category 'circle' is named more than once"):
        import_model(dup, dest_dir=tmp_path / "models")
    for names in (["a", "a", "b"], ["__background__", "__background__", "a", "b"]):
        with pytest.raises(CheckpointError, match="the class names given: class names must be"):
            import_model(dup, classes=names, dest_dir=tmp_path / "models")
    for names, problem in ((["a", "", "b"], "class name 2 is empty"),
                           (["a", "b\tc", "d"], r"class name 2 holds the control character '\\t'")):
        with pytest.raises(CheckpointError, match=f"the class names given: {problem}"):
            import_model(dup, classes=names, dest_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists()
    renamed = import_model(dup, classes=["circle", "ellipse", "square"], dest_dir=tmp_path / "models")
    assert load_checkpoint(renamed.checkpoint)["categories"][1:] == ["circle", "ellipse", "square"]
