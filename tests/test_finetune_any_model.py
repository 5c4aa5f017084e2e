"""Fine-tune from any listed model (issue 15, point 2): an imported torchvision R50 learns new classes with
its first backbone stages frozen, and the result exports to plain torchvision (same detections)."""
from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from mrcnn.data.shapes import write_dataset
from mrcnn.inference.model_export import export_model
from mrcnn.model.checkpoint import load_checkpoint
from mrcnn.model.importer import import_model
from mrcnn.model.zoo import load_model
from mrcnn.training.config import TrainConfig
from mrcnn.training.engine import train
from tests.helpers import fewer_proposals, forward_settings, scene

FROZEN_STAGES = ("backbone.body.conv1.", "backbone.body.layer1.")  # 3 trainable stages: layer4, layer3, layer2
TRAINED_STAGE = "backbone.body.layer4."


@pytest.fixture
def imported_r50(tmp_path, monkeypatch):
    """torchvision's maskrcnn_resnet50_fpn with random weights and 3 classes, imported as 'my-r50'."""
    monkeypatch.setenv("MRCNN_MODELS_DIR", str(tmp_path / "models"))
    torch.manual_seed(0)
    source = tmp_path / "my_r50.pth"
    torch.save(maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).state_dict(), source)
    return import_model(source, classes=["circle", "star"], name="my-r50", min_size=128, max_size=128)


def test_imported_r50_finetunes_on_new_classes_and_exports_to_torchvision(tmp_path, imported_r50):
    write_dataset(tmp_path / "data", 4, seed=5, size=128, classes=("star", "ring"))
    # one step shows what trains and what stays frozen; no threads setting: train() would keep it for the
    # rest of this process (threads=2 made one of the suite's two workers take both cores for every later test)
    cfg = TrainConfig(model="my-r50", data=str(tmp_path / "data"), steps=1, batch_size=1, lr=0.01,
                      warmup_steps=0, image_size=128, checkpoint_every=0, log_every=1, device="cpu",
                      out=str(tmp_path / "run"))
    result = train(cfg, verbose=False)
    assert result.state == "finished", result.message

    before = load_checkpoint(imported_r50.checkpoint)["state_dict"]
    loaded = load_model(result.checkpoint, device="cpu")  # the run's checkpoint, read once
    assert loaded.categories == ["__background__", "star", "ring"]
    changed = {k for k, v in loaded.model.state_dict().items() if k in before and before[k].shape == v.shape
               and not torch.equal(before[k].float(), v.float())}
    assert not [k for k in changed if k.startswith(FROZEN_STAGES)]
    assert not [k for k in changed if k.startswith("backbone.body.") and "bn" in k.split(".")[-2]]  # frozen norms
    assert any(k.startswith(TRAINED_STAGE) for k in changed) and any(k.startswith("roi_heads.") for k in changed)

    export = export_model(loaded, tmp_path / "export", "torchvision")
    plain = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=128,
                                  max_size=loaded.arch["max_size"])
    plain.load_state_dict(torch.load(export.folder / "model.pt", weights_only=True), strict=True)
    assert forward_settings(loaded.model) == forward_settings(plain)
    for model in (loaded.model, plain):
        fewer_proposals(model)
    image = torch.from_numpy(scene(128, 128, seed=3)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        ours, theirs = loaded.model([image])[0], plain.eval()([image])[0]
    assert len(ours["boxes"]) > 0
    for key in ("boxes", "labels", "scores", "masks"):
        torch.testing.assert_close(ours[key], theirs[key])
