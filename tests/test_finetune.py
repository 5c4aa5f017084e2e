"""Fine-tune run preparation: built-in data, uploaded zips (validated, split), estimates."""
from __future__ import annotations

import json
import zipfile

import subprocess
import sys

import pytest

from mrcnn.cli import build_parser, config_from_args
from mrcnn.model.architectures import light_arch
from mrcnn.training import finetune, jobs
from mrcnn.data.coco import load_dataset
from mrcnn.errors import DatasetError
from mrcnn.data.shapes import write_dataset
from tests.test_app import write_tiny


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



@pytest.mark.parametrize("config, row", [(b"[]", b'{"images_per_s": 20.0}'), (b"\xff", b'{"images_per_s": 20.0}'),
                                         (b'{"device": "cpu", "image_size": "big"}', b'{"images_per_s": 20.0}'),
                                         (b'{"device": "cpu"}', b'{"images_per_s": "fast"}')])
def test_estimate_skips_run_files_it_cannot_use(runs, config, row):
    run = runs / "odd"
    run.mkdir(parents=True)
    (run / "config.json").write_bytes(config)
    (run / "metrics.jsonl").write_bytes(row + b"\n")
    s = finetune.FinetuneSettings(steps=100, batch_size=4, image_size=256)
    assert finetune.estimate_seconds(s, "cpu") > 0

def test_settings_validated():
    with pytest.raises(ValueError, match="steps"):
        finetune.FinetuneSettings(steps=0)
    with pytest.raises(ValueError, match="learning rate"):
        finetune.FinetuneSettings(lr=2.0)


def test_train_command_carries_image_size_and_trainable_layers(tmp_path):
    s = finetune.FinetuneSettings(steps=5, num_val=2, image_size=96, trainable_backbone_layers=2)
    plan = finetune.prepare_builtin(s, tmp_path / "run")
    args = plan.train_args
    assert args[args.index("--image-size") + 1] == "96"
    cfg = config_from_args(build_parser().parse_args(["train", *args, "--out", str(tmp_path / "out")]))
    assert cfg.trainable_backbone_layers == 2 and cfg.image_size == 96
    with pytest.raises(ValueError, match="trainable backbone layers"):
        finetune.FinetuneSettings(trainable_backbone_layers=6)


def test_all_gpus_start_under_torchrun(tmp_path, runs, monkeypatch):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "mrcnn", "train"]
    # the module torchrun is started as exists and takes these options
    help_text = subprocess.run(torchrun[:3] + ["--help"], capture_output=True, text=True, check=True).stdout
    assert "--nproc-per-node" in help_text and "--standalone" in help_text
    started = []

    class Recorder:
        def __init__(self, command, **kwargs):
            started.append(command)
            self.pid = 4242

    monkeypatch.setattr(jobs.subprocess, "Popen", Recorder)
    s = finetune.FinetuneSettings(steps=5, num_val=2, image_size=96, gpus=2)
    plan = finetune.prepare_builtin(s, tmp_path / "run")
    assert plan.train_args[plan.train_args.index("--device") + 1] == "cuda"
    job = jobs.start_job(plan.train_args, plan.run_dir, s.steps, nproc=s.gpus)
    assert started == [job.command] and job.command == [*torchrun, *plan.train_args, "--out", plan.run_dir]


def test_parameter_counts_follow_trainable_layers():
    r50 = {"name": "maskrcnn_resnet50_fpn"}
    counts = [finetune.parameter_counts(r50, 3, layers) for layers in (0, 3, 5)]
    assert counts[0][0] < counts[1][0] < counts[2][0] and len({sum(c) for c in counts}) == 1
    assert finetune.parameter_counts(r50, 3, None) == counts[1]  # default: 3
    trainable, frozen = finetune.parameter_counts(light_arch(), 4, None)
    assert frozen == 0 and trainable > 0
    assert finetune.default_image_size("maskrcnn_resnet50_fpn_v2") > finetune.default_image_size("light")


def test_estimate_from_the_chosen_models_measured_step(tmp_path):
    ckpt = write_tiny(tmp_path / "tiny.pt")
    seconds = finetune.measure_seconds_per_image(str(ckpt), 96, "cpu")
    assert seconds > 0
    s = finetune.FinetuneSettings(steps=10, batch_size=3, image_size=96)
    assert finetune.estimate_seconds(s, "cpu", seconds_per_image=seconds) == pytest.approx(30 * seconds)
