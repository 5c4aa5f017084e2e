"""Training engine: exact resume, cancel, non-finite loss, class remapping, schedule, CLI (tiny models)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.models.detection import maskrcnn_resnet50_fpn

from mrcnn.data.shapes import ShapesDataset
from mrcnn.training import config as train_config, devices, engine, starting_model, validation
from mrcnn.model.architectures import build_model, light_arch
from mrcnn.model.checkpoint import load_checkpoint, save_checkpoint
from mrcnn.errors import MrcnnError, TrainingError
from mrcnn.training.config import TrainConfig, lr_factor
from mrcnn.training.engine import train
from mrcnn.training.starting_model import remap_class_weights
from tests.helpers import TINY_TRAIN_ARCH

TINY = TINY_TRAIN_ARCH
DATA = "shapes:12:0:64"


def tiny_config(out, **kw) -> TrainConfig:
    base = dict(model="light", arch=TINY, data=DATA, steps=4, batch_size=2, lr=0.01, warmup_steps=2,
                log_every=1, checkpoint_every=0, out=str(out), device="cpu")
    return TrainConfig(**{**base, **kw})


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def status(run) -> dict:
    return json.loads((run / "status.json").read_text())


def test_resume_equals_uninterrupted_run(tmp_path):
    full = train(tiny_config(tmp_path / "full"), verbose=False)
    assert full.state == "finished" and full.step == 4

    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] >= 2

    part = train(tiny_config(tmp_path / "part"), should_stop=stop_after_two, verbose=False)
    assert part.state == "cancelled" and part.step == 2
    assert status(tmp_path / "part")["state"] == "cancelled"
    resumed = train(tiny_config(tmp_path / "part", resume=True), verbose=False)
    assert resumed.state == "finished" and resumed.step == 4

    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == 4
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    mom_a = a["train_state"]["optimizer"]["state"]
    mom_b = b["train_state"]["optimizer"]["state"]
    assert all(torch.equal(mom_a[k]["momentum_buffer"], mom_b[k]["momentum_buffer"]) for k in mom_a)
    rows_a, rows_b = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["loss"] == rb["loss"] and ra["lr"] == rb["lr"]


def test_metrics_rows_and_checkpoint_format(tmp_path):
    run = tmp_path / "run"
    seen = []
    result = train(tiny_config(run, steps=2, val="shapes:2:5:64"), progress=seen.append, verbose=False)
    rows = metrics(run)
    assert len(rows) == 2 and seen == rows == result.metrics
    for key in ("step", "loss", "lr", "images_per_s", "elapsed", *train_config.LOSS_TERMS):
        assert key in rows[0]
    assert set(rows[-1]["val"]) >= {"bbox_AP", "segm_AP"}
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["format"] == "mrcnn-checkpoint" and ckpt["categories"][0] == "__background__"
    assert ckpt["meta"]["steps"] == 2 and ckpt["meta"]["data"] == DATA and "created" in ckpt["meta"]
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 2 and config["categories"] == ["__background__", "circle", "square", "triangle"]
    assert status(run) == {"state": "finished", "message": "finished 2 steps"}


def test_mixed_precision_is_the_devices_native_one(monkeypatch):
    assert devices.amp_dtype("cuda") == torch.float16
    monkeypatch.setattr(devices, "_cpu_has_bf16", lambda: True)
    assert devices.amp_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(devices, "_cpu_has_bf16", lambda: False)  # emulated bf16 is slower than float32
    assert devices.amp_dtype("cpu") is None


@pytest.mark.parametrize("amp, has_bf16, expected", [(True, True, torch.bfloat16), (False, True, torch.float32),
                                                     (True, False, torch.float32)])
def test_cpu_training_convolves_in_bfloat16_when_the_cpu_has_it(tmp_path, monkeypatch, amp, has_bf16, expected):
    monkeypatch.setattr(devices, "_cpu_has_bf16", lambda: has_bf16)
    seen = []
    real_build = starting_model.build_model

    def build_and_watch(arch, num_classes):
        model = real_build(arch, num_classes)
        model.backbone.body.conv1.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(starting_model, "build_model", build_and_watch)
    run = tmp_path / "run"
    result = train(tiny_config(run, steps=2, amp=amp), verbose=False)
    assert result.state == "finished"
    assert seen == [expected, expected]
    assert json.loads((run / "config.json").read_text())["precision"] == str(expected).removeprefix("torch.")
    # the weights and the optimizer stay in float32: only the arithmetic is mixed
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert all(all(math.isfinite(r[k]) for k in train_config.LOSS_TERMS) for r in metrics(run))


def test_stop_file_cancels_and_saves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    def touch_stop_file(row):
        (run / "STOP").touch()

    result = train(tiny_config(run), progress=touch_stop_file, verbose=False)
    # seen while step 2's batch loads: step 2 is not computed
    assert result.state == "cancelled" and result.step == 1 and "stop file found" in result.message
    assert load_checkpoint(run / "checkpoint.pt")["train_state"]["step"] == 1
    # resuming removes the stale flag and finishes
    assert train(tiny_config(run, resume=True), verbose=False).state == "finished"


def test_resume_removes_what_a_killed_checkpoint_write_left(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, steps=1), verbose=False)
    # what a SIGKILL during a checkpoint or metrics write leaves: mkstemp's names, as mrcnn.files makes them
    leftovers = [Path(tempfile.mkstemp(dir=run, prefix=f".{name}.", suffix=".tmp")[1])
                 for name in ("checkpoint.pt", "metrics.jsonl")]
    others = [run / name for name in ("notes.tmp", ".hidden.tmp", ".checkpoint.pt.tmp", "checkpoint.pt.abcd1234.tmp")]
    for path in others:
        path.write_text("not ours")
    assert train(tiny_config(run, steps=2, resume=True), verbose=False).state == "finished"
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in others)


class _CallsOnItem(torch.utils.data.Dataset):
    """Wraps a dataset; calls ``action()`` when item number ``at`` (1-based, over the whole run) is loaded."""

    def __init__(self, ds, at: int, action):
        self.ds, self.categories, self.at, self.action, self.loaded = ds, ds.categories, at, action, 0

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.loaded += 1
        if self.loaded == self.at:
            self.action()
        return self.ds[i]


@pytest.fixture
def sigterm_caught_by_the_test():
    """A SIGTERM handler of the test's own, so that a trainer that does not catch SIGTERM fails the test
    instead of ending pytest; the trainer's handler replaces it while it runs."""
    previous = signal.signal(signal.SIGTERM, lambda *a: None)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_while_a_batch_loads_cancels_within_the_step(tmp_path, monkeypatch, sigterm_caught_by_the_test):
    real_open = engine.open_data
    opened = []

    def open_slow_data(*args, **kwargs):  # a 16-image batch whose 3rd image brings the SIGTERM
        opened.append(_CallsOnItem(real_open(*args, **kwargs), 3, lambda: os.kill(os.getpid(), signal.SIGTERM)))
        return opened[-1]

    monkeypatch.setattr(engine, "open_data", open_slow_data)
    run = tmp_path / "run"
    result = train(tiny_config(run, batch_size=16), verbose=False)
    assert result.state == "cancelled" and result.step == 0 and "SIGTERM" in result.message
    assert opened[0].loaded == 3  # the other 13 images of the batch were never loaded
    assert status(run)["state"] == "cancelled"
    assert load_checkpoint(run / "checkpoint.pt")["train_state"]["step"] == 0  # --resume starts over exactly


def test_run_folder_deleted_while_training_fails_with_one_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_open = engine.open_data
    monkeypatch.setattr(engine, "open_data",
                        lambda *a, **k: _CallsOnItem(real_open(*a, **k), 3, lambda: shutil.rmtree(run)))
    with pytest.raises(TrainingError, match="the run folder .* was deleted during step 2"):
        train(tiny_config(run, checkpoint_every=1), verbose=False)
    assert not run.exists()  # neither the checkpoint nor the status recreated it


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny_config(tmp_path / "none", resume=True), verbose=False)
    train(tiny_config(tmp_path / "run", steps=1), verbose=False)
    with pytest.raises(TrainingError, match="--resume"):
        train(tiny_config(tmp_path / "run", steps=1), verbose=False)
    assert status(tmp_path / "run")["state"] == "finished"  # the run that is there keeps its status


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_open = engine.open_data

    class PoisonAfter(torch.utils.data.Dataset):
        """Items turn to NaN images after the first two steps' worth (4 items)."""

        def __init__(self, ds):
            self.ds, self.categories, self.calls = ds, ds.categories, 0

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            self.calls += 1
            image, target = self.ds[i]
            return (image * float("nan") if self.calls > 4 else image), target

    monkeypatch.setattr(engine, "open_data", lambda *a, **k: PoisonAfter(real_open(*a, **k)))
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="not finite") as err:
        train(tiny_config(run, checkpoint_every=1), verbose=False)
    assert "step 3" in str(err.value) and "step 2" in str(err.value)  # failed step, kept checkpoint
    assert status(run)["state"] == "failed" and "not finite" in status(run)["message"]
    assert load_checkpoint(run / "checkpoint.pt")["train_state"]["step"] == 2


def test_a_loss_that_overflows_mixed_precision_is_redone_in_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "_cpu_has_bf16", lambda: True)
    real_build = starting_model.build_model
    calls = []

    def build_overflowing_once(arch, num_classes):
        model = real_build(arch, num_classes)

        def overflow(module, inputs, losses):  # step 2's first forward (in bfloat16) goes non-finite
            calls.append(torch.is_autocast_enabled("cpu"))
            if len(calls) == 2:
                return {k: v * float("inf") for k, v in losses.items()}

        model.register_forward_hook(overflow)
        return model

    monkeypatch.setattr(starting_model, "build_model", build_overflowing_once)
    run = tmp_path / "run"
    result = train(tiny_config(run, steps=3), verbose=False)
    assert result.state == "finished" and result.step == 3
    assert calls == [True, True, False, True]  # step 2 ran again with autocast off
    rows = metrics(run)
    assert "float32_retries" not in rows[0] and rows[1]["float32_retries"] == rows[2]["float32_retries"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_class_remap_keeps_classes_by_name(tmp_path):
    torch.manual_seed(0)
    old_cats = ["__background__", "circle", "square"]
    new_cats = ["__background__", "square", "triangle", "circle"]
    old = build_model(light_arch(**TINY), len(old_cats)).state_dict()
    fresh = build_model(light_arch(**TINY), len(new_cats)).state_dict()
    merged, new = remap_class_weights(old, old_cats, new_cats, fresh)
    assert new == ["triangle"]
    w_old, w = old["roi_heads.box_predictor.cls_score.weight"], merged["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(w[0], w_old[0]) and torch.equal(w[1], w_old[2]) and torch.equal(w[3], w_old[1])
    assert torch.equal(w[2], fresh["roi_heads.box_predictor.cls_score.weight"][2])
    b_old, b = old["roi_heads.box_predictor.bbox_pred.weight"], merged["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(b[4:8], b_old[8:12]) and torch.equal(b[12:16], b_old[4:8])
    m_old, m = (old["roi_heads.mask_predictor.mask_fcn_logits.weight"],
                merged["roi_heads.mask_predictor.mask_fcn_logits.weight"])
    assert torch.equal(m[3], m_old[1]) and m.shape[0] == 4
    assert torch.equal(merged["backbone.body.conv1.weight"], old["backbone.body.conv1.weight"])


def test_fine_tune_from_checkpoint_with_other_classes(tmp_path):
    torch.manual_seed(0)
    arch = light_arch(**TINY)
    start = build_model(arch, 3)
    path = save_checkpoint(tmp_path / "start.pt", arch, ["__background__", "circle", "square"], start.state_dict())
    run = tmp_path / "run"
    result = train(tiny_config(run, model=str(path), arch=None, data="shapes:6:0:64:circle,triangle", steps=1,
                               lr=1e-9), verbose=False)
    assert result.state == "finished"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["categories"] == ["__background__", "circle", "triangle"]
    w = ckpt["state_dict"]["roi_heads.box_predictor.cls_score.weight"]
    w0 = start.state_dict()["roi_heads.box_predictor.cls_score.weight"]
    assert torch.allclose(w[1], w0[1], atol=1e-5)  # circle kept (lr ~ 0)
    assert not torch.allclose(w[2], w0[2], atol=1e-3)  # triangle is new, not square's row


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(data="x", steps=110, warmup_steps=10, warmup_factor=0.0)
    assert lr_factor(0, cfg) == 0.0
    assert lr_factor(5, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_bad_settings_are_named():
    with pytest.raises(TrainingError, match="schedule"):
        TrainConfig(data="x", schedule="zigzag")
    with pytest.raises(TrainingError, match="steps"):
        TrainConfig(data="x", steps=0)
    with pytest.raises(TrainingError, match="unknown training settings: bogus"):
        TrainConfig.from_dict({"data": "x", "bogus": 1})
    with pytest.raises(TrainingError, match=r"seed must be an integer in \[0, 4294967295\], got 4294967296"):
        TrainConfig(data="x", seed=2**32)
    with pytest.raises(TrainingError, match=r"clip_grad_norm must be a finite number in \[0, inf\), got -1"):
        TrainConfig(data="x", clip_grad_norm=-1)


@pytest.mark.parametrize("name, value", [
    ("momentum", float("nan")), ("momentum", float("inf")), ("momentum", -0.1), ("momentum", 1.0), ("momentum", "0.9"),
    ("lr", float("nan")), ("lr", 0.0), ("lr", -0.01), ("lr", float("inf")), ("lr", 10),
    ("weight_decay", float("nan")), ("weight_decay", -1e-4), ("clip_grad_norm", float("nan")),
    ("clip_grad_norm", -1.0), ("clip_grad_norm", float("inf")), ("min_lr_ratio", float("nan")),
    ("min_lr_ratio", 2.0), ("warmup_factor", float("-inf")), ("warmup_factor", 1.5),
    ("image_size", -5), ("image_size", 0), ("image_size", 1_000_000), ("image_size", 64.5),
    ("threads", -1), ("threads", 0), ("num_workers", -1), ("num_workers", 10_000),
    ("seed", 2**64), ("seed", 2**32), ("seed", -1), ("seed", True),
    ("steps", 0), ("steps", 10**12), ("steps", "100"), ("batch_size", 0), ("batch_size", 1_000_000_000),
    ("warmup_steps", -1), ("log_every", 0), ("val_every", -1), ("checkpoint_every", -1), ("val_num", 0),
    ("schedule", "zigzag"), ("device", "gpu"), ("device", 0), ("amp", "no"), ("augment", 1),
    ("arch", [1]), ("model", ""), ("out", ""), ("val", 5),
])
def test_every_setting_is_checked_with_its_range_named(name, value):
    with pytest.raises(TrainingError, match=name):
        TrainConfig(data="x", **{name: value})
    with pytest.raises(TrainingError, match=name):  # a --config file goes the same way
        TrainConfig.from_dict({"data": "x", name: value})


def test_train_checks_a_config_changed_after_it_was_built(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.momentum = float("nan")  # once trained 'successfully' into a checkpoint of NaN weights
    with pytest.raises(TrainingError, match=r"momentum must be a finite number in \[0, 1\), got nan"):
        train(cfg, verbose=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_every_numeric_setting_has_a_range():
    numeric = {f.name for f in fields(TrainConfig) if f.type.split(" ")[0] in ("int", "float")}
    assert numeric == set(train_config.INTEGER_SETTINGS) | set(train_config.FLOAT_SETTINGS)


def test_a_batch_that_cannot_fit_is_refused_before_any_step(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "_available_memory", lambda device: 100 * 2**20)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="batch size 16 at 256 px needs at least 0.4 GiB .* 0.1 GiB"):
        train(tiny_config(run, batch_size=16, image_size=256), should_stop=lambda: True, verbose=False)
    assert not run.exists()  # refused before its first step: no folder left behind
    run.mkdir()  # a folder that was there (the app's run folder) records why in status.json
    with pytest.raises(TrainingError, match="batch size 16"):
        train(tiny_config(run, batch_size=16, image_size=256), should_stop=lambda: True, verbose=False)
    assert not (run / "metrics.jsonl").exists() and status(run)["state"] == "failed"
    train(tiny_config(run, steps=1), verbose=False)  # that status does not stop the next try
    assert status(run)["state"] == "finished"


def _coco_without_categories(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return root


def _coco_with_a_thin_image(root: Path) -> Path:
    """One 1000x1 strip: any of the tiny model's sizes scales it to 0 px high."""
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (1000, 1)).save(root / "images" / "strip.png")
    (root / "annotations.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "strip.png", "width": 1000, "height": 1}], "annotations": [],
        "categories": [{"id": 1, "name": "circle"}]}))
    return root


@pytest.mark.parametrize("problem, words", [
    ("no categories", "has no categories"), ("missing data", "nope"), ("bad model", "bad.pt"),
    ("thin training image", r"thin: image 7 \(strip.png\): 1000x1 px would be scaled to \d+x0 px"),
    ("thin validation image", r"thin: image 7 \(strip.png\): 1000x1 px .* too thin for this model")])
def test_a_run_refused_before_its_first_step_leaves_no_folder_it_created(tmp_path, problem, words):
    out = tmp_path / "new" / "deeper" / "run"
    kw = {"no categories": dict(data=str(_coco_without_categories(tmp_path / "nocats"))),
          "thin training image": dict(data=str(_coco_with_a_thin_image(tmp_path / "train" / "thin"))),
          "thin validation image": dict(val=str(_coco_with_a_thin_image(tmp_path / "val" / "thin"))),
          "missing data": dict(data=str(tmp_path / "nope")),
          "bad model": dict(model=str(tmp_path / "bad.pt"), arch=None)}[problem]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MrcnnError, match=words):
        train(tiny_config(out, **kw), verbose=False)
    assert not (tmp_path / "new").exists()


def test_under_torchrun_rank_0_alone_makes_the_run_folder(tmp_path, monkeypatch):
    """Each rank made the folder and judged whether it had been there: a rank that made it first left rank 0
    taking it for the user's own folder, so a run refused before its first step left it behind. Now rank 0
    alone makes it before the ranks meet, and removes it on a refusal."""
    out = tmp_path / "new" / "run"
    there_at_rendezvous = {}

    def rendezvous(device_kind):  # where torchrun's ranks meet; the other rank never comes
        there_at_rendezvous[os.environ["RANK"]] = out.is_dir()
        raise TrainingError("the other rank never came")

    monkeypatch.setattr(engine, "init_distributed", rendezvous)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(TrainingError, match="never came"):
            train(tiny_config(out), verbose=False)
    assert there_at_rendezvous == {"1": False, "0": True}
    assert not (tmp_path / "new").exists()


def test_resume_refuses_a_checkpoint_whose_training_state_is_broken(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, steps=1), verbose=False)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    for broken, words in (({}, "has no optimizer, scheduler, rng, step"), ({**ckpt["train_state"], "step": "2"},
                                                                           "'step' must be a int, got str")):
        torch.save({**ckpt, "train_state": broken}, run / "checkpoint.pt")
        with pytest.raises(TrainingError, match=f"--resume: .*checkpoint.pt: the training state {words}"):
            train(tiny_config(run, resume=True), verbose=False)
        assert status(run)["state"] == "finished"  # the run's own files are left as they were


def test_resume_drops_metrics_lines_that_are_not_rows(tmp_path):
    run = tmp_path / "run"
    assert train(tiny_config(run), should_stop=lambda: True, verbose=False).step == 1
    with (run / "metrics.jsonl").open("ab") as f:
        f.write(b"5\n\xff\xfe\n{\"step\": \"x\"}\n{\"step\": 3, \"lo")  # a line of another kind, bytes, a half row
    assert train(tiny_config(run, resume=True), verbose=False).state == "finished"
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]


def test_a_new_run_does_not_overwrite_files_that_are_not_a_run(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "metrics.jsonl").write_text("my numbers\n")
    with pytest.raises(TrainingError, match="already holds config.json, metrics.jsonl, which a new run would"):
        train(tiny_config(mine, steps=1), verbose=False)
    assert (mine / "config.json").read_text() == '{"my": "settings"}' and sorted(os.listdir(mine)) == [
        "config.json", "metrics.jsonl"]
    (tmp_path / "odd" / "metrics.jsonl").mkdir(parents=True)
    for resume in (False, True):  # once an IsADirectoryError after the setup
        with pytest.raises(TrainingError, match="odd: metrics.jsonl is not a file"):
            train(tiny_config(tmp_path / "odd", steps=1, resume=resume), verbose=False)
    # the app's run folder holds its data and log before the run starts
    app_run = tmp_path / "app_run"
    (app_run / "val").mkdir(parents=True)
    (app_run / "train.log").write_text("starting\n")
    assert train(tiny_config(app_run, steps=1), verbose=False).state == "finished"


def test_export_onto_the_runs_own_files_is_refused(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="is the run's own checkpoint.pt"):
        train(tiny_config(run, steps=1, export=str(run / "checkpoint.pt")), verbose=False)
    assert not run.exists()
    assert train(tiny_config(run, steps=2), should_stop=lambda: True, verbose=False).state == "cancelled"
    (tmp_path / "link.pt").symlink_to(run / "checkpoint.pt")
    for export in (run / "checkpoint.pt", run / "metrics.jsonl", tmp_path / "link.pt"):
        with pytest.raises(TrainingError, match="--export .* is the run's own"):
            train(tiny_config(run, steps=2, resume=True, export=str(export)), verbose=False)
    assert "train_state" in load_checkpoint(run / "checkpoint.pt")  # still resumable
    assert train(tiny_config(run, steps=2, resume=True, export=str(run / "model.pt")), verbose=False).state == "finished"


def test_cli_train_with_config_file(tmp_path, capsys):
    from mrcnn.cli import main
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"arch": TINY, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 0}))
    run = tmp_path / "run"
    rc = main(["train", "--model", "light", "--data", DATA, "--steps", "1", "--batch-size", "1",
               "--out", str(run), "--config", str(cfg), "--device", "cpu"])
    assert rc == 0 and status(run)["state"] == "finished"
    assert json.loads((run / "config.json").read_text())["batch_size"] == 1
    rc = main(["train", "--model", "light", "--data", "shapes:0", "--steps", "1", "--out", str(tmp_path / "r2")])
    assert rc == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("arch_name", ["maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"])
def test_both_r50_predictors_keep_the_rows_of_shared_classes(arch_name):
    old_cats, new_cats = ["__background__", "cat", "dog"], ["__background__", "dog", "bird"]
    torch.manual_seed(0)
    with torch.device("meta"):
        old_keys = build_model({"name": arch_name}, len(old_cats)).state_dict()
        new_keys = build_model({"name": arch_name}, len(new_cats)).state_dict()
    per_class = ("cls_score", "bbox_pred", "mask_fcn_logits")
    keys = [k for k in old_keys if k.startswith("roi_heads.") and k.split(".")[2] in per_class]
    old = {k: torch.randn(old_keys[k].shape) for k in keys}
    fresh = {k: torch.zeros(new_keys[k].shape) for k in keys}
    merged, new = remap_class_weights(old, old_cats, new_cats, fresh)
    assert new == ["bird"] and len(fresh) == 6  # weight and bias of each
    for key in fresh:
        rows = 4 if "bbox_pred" in key else 1
        torch.testing.assert_close(merged[key][rows:2 * rows], old[key][2 * rows:3 * rows])  # dog kept
        assert not merged[key][2 * rows:].any()  # bird: fresh


def test_trainable_backbone_layers_counted_as_torchvision_does():
    with pytest.raises(TrainingError, match=r"trainable_backbone_layers must be an integer in \[0, 5\], got 6"):
        TrainConfig(data=DATA, trainable_backbone_layers=6)
    counts = []
    for layers in (0, 3, 5):
        with torch.device("meta"):
            model = build_model({"name": "maskrcnn_resnet50_fpn"}, 3)
        starting_model.freeze_backbone(model, layers, freeze_norms=True)
        trainable = {n.split(".")[2] for n, p in model.named_parameters() if n.startswith("backbone.body.")
                     and p.requires_grad}
        assert trainable == {0: set(), 3: {"layer2", "layer3", "layer4"}, 5: {"conv1", "layer1", "layer2", "layer3",
                                                                              "layer4"}}[layers]
        counts.append(starting_model.count_trainable(model))
    assert counts[0][0] < counts[1][0] < counts[2][0] and len({sum(c) for c in counts}) == 1


# ---- validation loss -------------------------------------------------------------------------------------
def test_validation_rows_hold_the_loss_per_term(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, steps=4, val="shapes:2:5:64", val_every=2), verbose=False)
    val_rows = [r for r in metrics(run) if "val" in r]
    assert [r["step"] for r in val_rows] == [2, 4]
    for row in val_rows:
        val = row["val"]
        assert {"bbox_AP", "segm_AP", "loss", *train_config.LOSS_TERMS} <= set(val)
        assert all(math.isfinite(val[k]) and val[k] >= 0 for k in ("loss", *train_config.LOSS_TERMS))
        assert val["loss"] == pytest.approx(sum(val[k] for k in train_config.LOSS_TERMS), abs=1e-5)


def test_validation_changes_nothing_in_the_run(tmp_path):
    plain = train(tiny_config(tmp_path / "plain"), verbose=False)
    validated = train(tiny_config(tmp_path / "validated", val="shapes:2:5:64", val_every=1), verbose=False)
    assert [r["loss"] for r in plain.metrics] == [r["loss"] for r in validated.metrics]
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "validated" / "checkpoint.pt")["state_dict"]
    assert all(torch.equal(value, b[key]) for key, value in a.items())


def test_validation_losses_leave_batchnorm_statistics_modes_and_random_stream_alone():
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=64, max_size=64)
    model.eval()
    model.roi_heads.train()  # a mix of modes, to see each one put back
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    losses = validation.validation_losses(model, ShapesDataset(3, seed=5, size=64), torch.device("cpu"), 2)
    assert set(losses) == {"loss", *train_config.LOSS_TERMS} and math.isfinite(losses["loss"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # running stats included
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
