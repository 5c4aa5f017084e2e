"""Model cards: `python -m mrcnn card` evaluates a checkpoint, times it and writes <stem>.json beside it,
which the model list then shows; the bundled model's card describes the bundled file."""
from __future__ import annotations

import json

import pytest
import torch

from mrcnn.model.architectures import build_model
from mrcnn.files import file_sha256
from mrcnn.model.checkpoint import save_checkpoint
from mrcnn.cli import main
from mrcnn.model.importer import import_model
from mrcnn.training import card
from mrcnn.model.zoo import imported_models, list_models, read_card, weights_dir
from tests.helpers import CATEGORIES as CATS, TINY_LIGHT

# 10 detections an image, not 100: a random-weight model's every proposal is one, and pasting 100 masks onto
# each of the card's nine 512-px timing runs and the evaluations' images was most of a card's time
TINY = dict(TINY_LIGHT, box_detections_per_img=10)


def test_card_cli_writes_metrics_timing_and_training_facts(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    runs = tmp_path / "runs"
    run = runs / "demo"
    meta = {"data": "shapes:100:1:64", "steps": 7, "training_time_s": 12.5, "recipe": {"lr": 0.02}, "world_size": 1}
    ckpt = save_checkpoint(run / "checkpoint.pt", TINY, CATS, build_model(TINY, 4).state_dict(), meta)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "images_per_s": v, "elapsed": s * 2.0}) + "\n"
                                               for s, v in ((1, 3.0), (2, 5.0), (3, 4.0))))
    (run / "config.json").write_text(json.dumps({"device": "cpu", "world_size": 2}))

    assert main(["card", str(ckpt), "--data", "shapes:3:5:64", "--run", str(run)]) == 0
    assert "box AP" in capsys.readouterr().out
    card = json.loads((run / "checkpoint.json").read_text())
    assert card["classes"] == CATS[1:]
    assert card["sha256"] == file_sha256(ckpt)
    assert set(card["metrics"]["bbox"]) >= {"AP", "AP50", "AP75"} and set(card["metrics"]["segm"]) >= {"AP", "AP50"}
    assert card["evaluated_on"] == {"data": "shapes:3:5:64", "images": 3}
    assert card["inference_ms_512px"]["median"] > 0
    assert card["training"]["steps"] == 7 and card["training"]["time_s"] == 12.5
    assert card["training"]["train_images_per_s_median"] == 4.0 and card["training"]["train_processes"] == 2
    assert card["parameters"] == sum(p.numel() for p in build_model(TINY, 4).parameters())

    # the model list (and so the app's sidebar) shows the card, not the bare checkpoint meta
    monkeypatch.setenv("MRCNN_RUNS_DIR", str(runs))
    info = next(i for i in list_models() if i.path == str(ckpt))
    assert info.card["metrics"] == card["metrics"]


def test_a_card_of_an_imported_model_keeps_the_name_it_is_listed_under(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MRCNN_MODELS_DIR", str(tmp_path / "models"))
    source = save_checkpoint(tmp_path / "elsewhere.pt", TINY, CATS, build_model(TINY, 4).state_dict(), {})
    imported = import_model(source, name="pets")
    assert main(["card", str(imported.checkpoint), "--data", "shapes:2:5:64"]) == 0
    card = json.loads(imported.checkpoint.with_suffix(".json").read_text())
    assert card["name"] == "pets" and card["source"] == imported.card["source"] and "metrics" in card
    assert imported_models() == {"pets": imported.checkpoint}  # still listed, under the user's name


def test_card_of_a_missing_or_broken_file_is_one_line(tmp_path, capsys):
    assert main(["card", str(tmp_path / "nope.pt"), "--data", "shapes:1:0:64"]) == 2
    assert "nope.pt: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["card", str(bad), "--data", "shapes:1:0:64"]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "Traceback" not in err



@pytest.mark.parametrize("file, content, words", [
    ("config.json", b"[]", "config.json: must be a JSON object {...}, got list"),
    ("config.json", b"\xff", "config.json: not UTF-8 text (byte 0xff at offset 0)"),
    ("config.json", b'{"device": "cpu", "world_size": "two"}', "world_size must be a whole number"),
    ("metrics.jsonl", b'{"step": 1, "images_per_s": "fast"}\n', "metrics.jsonl line 1: images_per_s must be a number"),
    ("metrics.jsonl", b'{"step": 1, "elapsed": NaN}\n', "metrics.jsonl line 1: elapsed must be a number"),
])
def test_a_bad_run_file_is_one_line_before_the_evaluation(tmp_path, capsys, monkeypatch, file, content, words):
    ckpt = save_checkpoint(tmp_path / "model.pt", TINY, CATS, build_model(TINY, 4).state_dict(), {})
    run = tmp_path / "run"
    run.mkdir()
    (run / file).write_bytes(content)
    (run / "metrics.jsonl").open("ab").write(b'{"step": 2, "images_per_s": 3.0}\n{"step": 3, "ima')  # half a line: fine
    monkeypatch.setattr(card, "evaluate", lambda *a, **k: pytest.fail("evaluated before the run files were checked"))
    assert main(["card", str(ckpt), "--data", "shapes:1:0:64", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err and str(run / file) in err
    assert not (tmp_path / "model.json").exists()


def test_a_missing_run_folder_is_named(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "model.pt", TINY, CATS, build_model(TINY, 4).state_dict(), {})
    assert main(["card", str(ckpt), "--data", "shapes:1:0:64", "--run", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"error: run folder {tmp_path / 'nope'}: no such folder\n"

BUNDLED = weights_dir() / "shapes.pt"


@pytest.mark.skipif(not BUNDLED.is_file(), reason="weights/shapes.pt is missing (bash weights/train_shapes.sh)")
def test_bundled_model_has_a_card_that_describes_it():
    card = read_card(BUNDLED)
    assert card, "weights/shapes.json is missing: python -m mrcnn card weights/shapes.pt --data shapes:500:12345:256"
    assert card["sha256"] == file_sha256(BUNDLED), "the card describes another file: re-run `python -m mrcnn card`"
    assert card["classes"] == ["circle", "square", "triangle"]
    assert BUNDLED.stat().st_size <= 25e6
    assert card["evaluated_on"] == {"data": "shapes:500:12345:256", "images": 500}
    # the bundled model's targets, as `evaluate` measured them for this very file (sha256 above)
    metrics = card["metrics"]
    assert metrics["bbox"]["AP"] >= 0.85 and metrics["segm"]["AP"] >= 0.85 and metrics["segm"]["AP50"] >= 0.97
    assert card["inference_ms_512px"]["median"] <= 300
    assert card["training"]["time_s"] <= 3600
