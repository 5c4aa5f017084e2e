"""`predict` and `models` (docs/cli.md): JSON + overlay per image, bad files named on stderr, exit 2."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from mrcnn.cli import main
from mrcnn.model.architectures import build_model
from mrcnn.model.checkpoint import save_checkpoint
from mrcnn.data.masks import decode_rle
from tests.helpers import CATEGORIES, TINY_LIGHT, scene



def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI in-process (tests/test_cli_bad_input.py runs one real process): exit status, stdout, stderr."""
    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_predict_writes_json_and_png_and_names_bad_files(tmp_path, capsys):
    torch.manual_seed(3)
    ckpt = save_checkpoint(tmp_path / "tiny.pt", TINY_LIGHT, CATEGORIES, build_model(TINY_LIGHT, 4).state_dict())
    good = tmp_path / "good.png"
    Image.fromarray(scene(90, 120, seed=1)).save(good)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    status, _, stderr = run_cli(capsys, "predict", tmp_path / "broken.jpg", good, tmp_path / "empty.png",
                                "--model", ckpt, "--score-thresh", "0.05", "--out", out)
    assert status == 2, stderr
    err_lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(err_lines) == 2
    assert "broken.jpg" in err_lines[0] and "empty.png" in err_lines[1]
    record = json.loads((out / "good.json").read_text())
    assert record["image"] == {"file": "good.png", "width": 120, "height": 90}
    assert record["model"]["name"].endswith("tiny.pt") and len(record["model"]["sha256"]) == 64
    assert record["thresholds"]["score_thresh"] == 0.05
    assert record["detections"], "random weights at 0.05 give detections"
    for det in record["detections"]:
        assert set(det) == {"label", "category_id", "score", "box", "area", "mask"}
        assert det["label"] == CATEGORIES[det["category_id"]] and det["score"] > 0.05
        mask = decode_rle(det["mask"])
        assert mask.shape == (90, 120) and mask.sum() == det["area"]
        x0, y0, x1, y1 = det["box"]
        assert 0 <= x0 <= x1 <= 120 and 0 <= y0 <= y1 <= 90
    assert {"backbone", "rpn_head", "box_head", "masks"} <= set(record["timing_ms"])
    overlay = np.asarray(Image.open(out / "good.png"))
    assert overlay.shape == (90, 120, 3)
    assert not (out / "broken.json").exists()


def test_predict_unknown_model_is_one_line(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(scene(40, 40)).save(img)
    status, _, stderr = run_cli(capsys, "predict", img, "--model", tmp_path / "missing.pt", "--out", tmp_path / "o")
    assert status == 2 and "missing.pt" in stderr and len(stderr.strip().splitlines()) == 1


def test_models_json_lists_all(capsys):
    status, stdout, _ = run_cli(capsys, "models", "--json")
    assert status == 0
    names = [m["name"] for m in json.loads(stdout)]
    assert {"shapes", "coco-r50-fpn", "coco-r50-fpn-v2"} <= set(names)


def tiny_checkpoint(folder) -> str:
    torch.manual_seed(3)
    return save_checkpoint(folder / "tiny.pt", TINY_LIGHT, CATEGORIES, build_model(TINY_LIGHT, 4).state_dict())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_predict_never_replaces_an_input(tmp_path, capsys):
    folder = tmp_path / "same"
    folder.mkdir()
    Image.fromarray(scene(40, 60)).save(folder / "scene.png")
    (folder / "clip.mp4").write_bytes(b"a clip's bytes")  # refused before anything reads it
    kept = {p.name: p.read_bytes() for p in folder.iterdir()}
    for name in ("scene.png", "clip.mp4"):
        status, _, stderr = run_cli(capsys, "predict", folder / name, "--model", tiny_checkpoint(tmp_path),
                                    "--out", folder)
        assert status == 2, stderr
        assert error_lines(stderr) == [f"error: --out {folder}: writing {folder / name} would replace the input "
                                       f"{folder / name}; choose another folder"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept, "nothing changed, nothing written"


def test_a_thin_image_is_one_line_and_the_others_still_run(tmp_path, capsys):
    Image.new("RGB", (1000, 1)).save(tmp_path / "thin.png")
    Image.fromarray(scene(40, 60)).save(tmp_path / "good.png")
    out = tmp_path / "out"
    status, stdout, stderr = run_cli(capsys, "predict", tmp_path / "thin.png", tmp_path / "good.png",
                                     "--model", tiny_checkpoint(tmp_path), "--out", out)
    assert status == 2
    # TINY_LIGHT: shorter side to 96, longer at most 128, so a scale of 0.128
    assert error_lines(stderr) == [f"error: {tmp_path / 'thin.png'}: 1000x1 px would be scaled to 128x0 px for the "
                                   f"network (shorter side to 96, longer side at most 128): too thin for this model"]
    assert "good.png" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["good.json", "good.png"]


def test_an_output_name_taken_by_a_folder_is_one_line_and_the_others_still_run(tmp_path, capsys):
    for name in ("taken.png", "free.png"):
        Image.fromarray(scene(40, 60)).save(tmp_path / name)
    (tmp_path / "clip.mp4").write_bytes(b"refused before it is read")
    out = tmp_path / "out"
    (out / "taken.json").mkdir(parents=True)
    (out / "clip.mp4").mkdir()
    status, _, stderr = run_cli(capsys, "predict", tmp_path / "taken.png", tmp_path / "clip.mp4",
                                tmp_path / "free.png", "--model", tiny_checkpoint(tmp_path), "--out", out)
    assert status == 2
    assert error_lines(stderr) == [
        f"error: {tmp_path / 'taken.png'}: cannot write {out / 'taken.json'}: a folder has that name",
        f"error: {tmp_path / 'clip.mp4'}: cannot write {out / 'clip.mp4'}: a folder has that name"]
    assert sorted(p.name for p in out.iterdir()) == ["clip.mp4", "free.json", "free.png", "taken.json"]
    assert not list((out / "taken.json").iterdir()) and not (out / "taken.png").exists()


def test_a_run_that_writes_nothing_leaves_no_folder(tmp_path, capsys):
    (tmp_path / "empty.png").write_bytes(b"")
    status, _, stderr = run_cli(capsys, "predict", tmp_path / "empty.png", "--model", tiny_checkpoint(tmp_path),
                                "--out", tmp_path / "new" / "a")
    assert status == 2 and "empty.png" in stderr
    assert not (tmp_path / "new").exists()
