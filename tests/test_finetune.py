"""Fine-tune run preparation: built-in data, uploaded zips (validated, split), estimates."""
from __future__ import annotations

import json
import zipfile

import pytest

from mrcnn.training import finetune
from mrcnn.data.coco import load_dataset
from mrcnn.errors import DatasetError
from mrcnn.data.shapes import write_dataset


@pytest.fixture(autouse=True)
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MRCNN_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


def _zip_of(folder, path):
    with zipfile.ZipFile(path, "w") as z:
        for f in folder.rglob("*"):
            z.write(f, f.relative_to(folder))
    return path


def test_builtin_plan_has_the_new_shape(tmp_path):
    s = finetune.FinetuneSettings(steps=5, num_val=4, image_size=96)
    plan = finetune.prepare_builtin(s, tmp_path / "run")
    assert plan.classes == ["circle", "square", "triangle", "star"]
    ds = load_dataset(plan.val_dir)
    assert len(ds) == 4 and "star" in ds.categories
    assert plan.train_data.startswith("shapes:") and plan.train_data.endswith("star")
    args = plan.train_args
    assert args[args.index("--steps") + 1] == "5" and args[args.index("--val") + 1] == plan.val_dir


def test_upload_is_split_without_overlap(tmp_path):
    write_dataset(tmp_path / "ds", 10, seed=3, size=64)
    plan = finetune.prepare_upload(_zip_of(tmp_path / "ds", tmp_path / "ds.zip"),
                                   finetune.FinetuneSettings(val_fraction=0.3), tmp_path / "run")
    train, val = load_dataset(plan.train_data), load_dataset(plan.val_dir)
    assert len(train) == 7 and len(val) == 3
    assert not set(train.image_ids) & set(val.image_ids)
    assert plan.classes == ["circle", "square", "triangle"]


def test_broken_upload_names_the_problem(tmp_path):
    write_dataset(tmp_path / "ds", 3, seed=3, size=64)
    ann = json.loads((tmp_path / "ds" / "annotations.json").read_text())
    ann["images"][0]["file_name"] = "missing.png"
    (tmp_path / "ds" / "annotations.json").write_text(json.dumps(ann))
    with pytest.raises(DatasetError, match="missing.png"):
        finetune.prepare_upload(_zip_of(tmp_path / "ds", tmp_path / "bad.zip"), finetune.FinetuneSettings(),
                                tmp_path / "run")


def test_estimate_uses_measured_throughput(runs):
    s = finetune.FinetuneSettings(steps=100, batch_size=4, image_size=256)
    default = finetune.estimate_seconds(s, "cpu")
    assert default == pytest.approx(400 / finetune.DEFAULT_IMAGES_PER_S["cpu"])
    run = runs / "earlier"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"device": "cpu", "image_size": 256}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": i, "images_per_s": 20.0}) for i in range(5)))
    assert finetune.estimate_seconds(s, "cpu") == pytest.approx(20.0)
    assert finetune.estimate_seconds(finetune.FinetuneSettings(steps=100, batch_size=4, image_size=128), "cpu") \
        == pytest.approx(5.0)


def test_settings_validated():
    with pytest.raises(ValueError, match="steps"):
        finetune.FinetuneSettings(steps=0)
    with pytest.raises(ValueError, match="learning rate"):
        finetune.FinetuneSettings(lr=2.0)
