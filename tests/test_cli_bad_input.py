"""Bad input on the command line: one line "error: ..." naming the problem and exit status 2, never a
traceback; skipped annotations are one "warning: ..." line each; a .zip leaves nothing in the temp folder.

Every case but one calls mrcnn.cli.main in-process (a subprocess costs seconds here); one runs `python -m mrcnn`.
"""
from __future__ import annotations

import json
import string
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from mrcnn.cli import main
from mrcnn.data.shapes import write_dataset
from mrcnn.model.architectures import build_model
from mrcnn.model.checkpoint import FORMAT, VERSION, save_checkpoint
from tests.helpers import CATEGORIES, TINY_LIGHT, scene

REPO = Path(__file__).resolve().parent.parent
DATA = "shapes:2:0:64"


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """The files the cases name, written once per test under tmp_path."""
    f = {"file": tmp_path / "a-file.txt", "image": tmp_path / "img.png"}
    f["file"].write_text("not a folder")
    Image.fromarray(scene(48, 48)).save(f["image"])
    f["latin1_config"] = tmp_path / "latin1.json"
    f["latin1_config"].write_bytes('{"schedule": "cosine", "note": "caf\xe9"}'.encode("latin-1"))
    f["deep_config"] = tmp_path / "deep.json"
    f["deep_config"].write_text("[" * 100_000 + "]" * 100_000)
    f["string_config"] = tmp_path / "string.json"
    f["string_config"].write_text(json.dumps({"momentum": "fast"}))
    for name, arch in {"huge_fpn": dict(TINY_LIGHT, fpn_channels=2_000_000),
                       "negative_fpn": dict(TINY_LIGHT, fpn_channels=-4),
                       "big_min_size": dict(TINY_LIGHT, min_size="big")}.items():
        f[name] = save_checkpoint(tmp_path / f"{name}.pt", arch, CATEGORIES, {"w": torch.zeros(1)})
    f["string_tensor"] = tmp_path / "string_tensor.pt"
    torch.save({"format": FORMAT, "version": VERSION, "arch": TINY_LIGHT, "categories": CATEGORIES,
                "state_dict": {"backbone.body.conv1.weight": "not a tensor"}, "meta": {}}, f["string_tensor"])
    f["deep_dataset"] = tmp_path / "deep-ds"
    (f["deep_dataset"] / "images").mkdir(parents=True)
    (f["deep_dataset"] / "annotations.json").write_text("{\"images\": " + "[" * 100_000 + "]" * 100_000 + "}")
    return f


TRAIN = ["train", "--model", "light", "--data", DATA, "--steps", "1"]

# (argv with $name standing for files[name] and $tmp for tmp_path, words the error line must hold)
CASES = {
    "predict --out a file": (["predict", "$image", "--out", "$file"], ["--out", "a-file.txt", "not a folder"]),
    "predict --out under a file": (["predict", "$image", "--out", "$file/sub"], ["--out", "not a folder"]),
    "predict --out unwritable": (["predict", "$image", "--out", "/proc/mrcnn-out"], ["--out", "cannot write"]),
    "train --out a file": (TRAIN + ["--out", "$file"], ["--out", "a-file.txt", "not a folder"]),
    "train --out unwritable": (TRAIN + ["--out", "/proc/mrcnn-run"], ["--out", "cannot write"]),
    "train --export a folder": (TRAIN + ["--out", "$tmp/run", "--export", "$tmp"], ["--export", "is a folder"]),
    "train --config not UTF-8": (TRAIN + ["--out", "$tmp/run", "--config", "$latin1_config"],
                                 ["--config", "latin1.json", "not UTF-8"]),
    "train --config nested deep": (TRAIN + ["--out", "$tmp/run", "--config", "$deep_config"],
                                   ["--config", "deep.json", "nested too deeply"]),
    "train --config string for a number": (TRAIN + ["--out", "$tmp/run", "--config", "$string_config"],
                                           ["momentum", "'fast'"]),
    "train --arch fpn_channels -1": (TRAIN + ["--out", "$tmp/run", "--arch", '{"fpn_channels": -1}'],
                                     ["--arch", "fpn_channels", "-1"]),
    "train --arch a list": (TRAIN + ["--out", "$tmp/run", "--arch", "[1]"], ["--arch", "JSON object"]),
    "train --arch unknown key": (TRAIN + ["--out", "$tmp/run", "--arch", '{"bogus": 1}'], ["--arch", "bogus"]),
    "train --data huge size": (["train", "--model", "light", "--data", "shapes:8:0:100000", "--steps", "1",
                                "--out", "$tmp/run"], ["shapes:8:0:100000", "image size", "100000"]),
    "shapes --size huge": (["shapes", "--out", "$tmp/s", "--num", "1", "--size", "100000"], ["image size", "100000"]),
    "shapes --num huge": (["shapes", "--out", "$tmp/s", "--num", "1000000000000"], ["number of images"]),
    "shapes --seed huge": (["shapes", "--out", "$tmp/s", "--num", "1", "--seed", str(2**64)], ["seed"]),
    "evaluate --data huge size": (["evaluate", "--model", "shapes", "--data", "shapes:8:0:100000"],
                                  ["shapes:8:0:100000", "image size"]),
    "evaluate --data huge count": (["evaluate", "--model", "shapes", "--data", "shapes:1000000000000:0:128"],
                                   ["shapes:1000000000000:0:128", "number of images"]),
    "evaluate --score-thresh nan": (["evaluate", "--model", "shapes", "--data", DATA, "--score-thresh", "nan"],
                                    ["score_thresh", "nan"]),
    "evaluate --max-detections huge": (["evaluate", "--model", "shapes", "--data", DATA,
                                        "--max-detections", "100000000"], ["max_detections"]),
    "evaluate --num 0": (["evaluate", "--model", "shapes", "--data", DATA, "--num", "0"], ["--num"]),
    "evaluate annotations nested deep": (["evaluate", "--model", "shapes", "--data", "$deep_dataset"],
                                         ["annotations.json", "nested too deeply"]),
    "predict --mask-thresh inf": (["predict", "$image", "--out", "$tmp/o", "--mask-thresh", "inf"],
                                  ["mask_thresh"]),
    "predict --class-thresh a class twice": (["predict", "$image", "--out", "$tmp/o", "--class-thresh",
                                              "circle=0.5,circle=0.7"], ["--class-thresh", "'circle'", "twice"]),
    "checkpoint fpn_channels 2,000,000": (["predict", "$image", "--model", "$huge_fpn", "--out", "$tmp/o"],
                                          ["huge_fpn.pt", "fpn_channels", "2000000"]),
    "checkpoint fpn_channels -4": (["predict", "$image", "--model", "$negative_fpn", "--out", "$tmp/o"],
                                   ["negative_fpn.pt", "fpn_channels", "-4"]),
    "checkpoint min_size 'big'": (["predict", "$image", "--model", "$big_min_size", "--out", "$tmp/o"],
                                  ["big_min_size.pt", "min_size", "'big'"]),
    "checkpoint string tensor": (["predict", "$image", "--model", "$string_tensor", "--out", "$tmp/o"],
                                 ["string_tensor.pt", "backbone.body.conv1.weight", "not a tensor"]),
    "weights of another architecture": (["predict", "$image", "--model", "coco-r50-fpn", "--weights",
                                         str(REPO / "weights" / "shapes.pt"), "--out", "$tmp/o"],
                                        ["shapes.pt", "'light'", "coco-r50-fpn", "maskrcnn_resnet50_fpn"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_exit_2(case, files, tmp_path, capsys):
    argv, words = CASES[case]
    argv = [string.Template(a).substitute(tmp=tmp_path, **files) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(w in lines[0] for w in words), (words, lines[0])


def test_nothing_is_written_when_out_is_refused(files, tmp_path, capsys):
    assert main(TRAIN + ["--out", str(tmp_path / "run"), "--arch", "[1]"]) == 2
    assert main(["predict", str(files["image"]), "--out", str(tmp_path / "o"), "--score-thresh", "2"]) == 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mrcnn", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    res = run_cli(*TRAIN, "--out", tmp_path / "run", "--arch", '{"fpn_channels": -1}')
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["error: --arch: fpn_channels must be an integer in 1..512, got -1"]


def tiny_dataset(root: Path, num: int = 2) -> Path:
    return write_dataset(root, num, seed=0, size=64)


def tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(path, TINY_LIGHT, CATEGORIES, build_model(TINY_LIGHT, len(CATEGORIES)).state_dict())


def test_skipped_annotations_are_one_warning_line_each(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "ds")
    data = json.loads((root / "annotations.json").read_text())
    first = data["annotations"][0]
    x, y = first["bbox"][:2]
    data["annotations"] += [
        dict(first, id=1007, bbox=[x, y, 0, 5]),                        # zero width
        dict(first, id=1008, segmentation=[[10.0, 10.0] * 3]), ]        # three identical points
    del data["annotations"][-1]["bbox"]
    (root / "annotations.json").write_text(json.dumps(data))
    rc = main(["evaluate", "--model", str(tiny_checkpoint(tmp_path / "tiny.pt")), "--data", str(root), "--json"])
    err = capsys.readouterr().err
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, err
    assert "annotations.json: annotation 1007 (image 1): zero-width box" in warnings[0]
    assert warnings[0].endswith("skipped") and str(root) in warnings[0]
    assert "annotation 1008 (image 1): empty mask: its polygon encloses no pixel" in warnings[1]


def test_a_zip_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch, capsys):
    root = tiny_dataset(tmp_path / "ds", num=1)
    z = tmp_path / "ds.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in root.rglob("*"):
            zf.write(p, p.relative_to(root).as_posix())
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # what TMPDIR sets for a fresh process
    for _ in range(2):
        assert main(["evaluate", "--model", str(ckpt), "--data", str(z), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["num_images"] == 1
        assert list(temp.iterdir()) == [], "the extracted zip is removed"

def thin_image(path: Path) -> Path:
    """1000x1 px: a model's transform scales its shorter side to 0 px (torch's resize then fails)."""
    Image.new("RGB", (1000, 1)).save(path)
    return path


def test_an_image_too_thin_for_the_model_is_one_line_in_check_precision(tmp_path, monkeypatch, capsys):
    import mrcnn.cli

    monkeypatch.setattr(mrcnn.cli, "precisions_to_check", lambda device: ["bfloat16"])  # any CPU has a check
    thin = thin_image(tmp_path / "thin.png")
    assert main(["check-precision", str(tiny_checkpoint(tmp_path / "tiny.pt")), str(thin)]) == 2
    # TINY_LIGHT: shorter side to 96, longer at most 128
    assert capsys.readouterr().err.splitlines() == [
        f"error: {thin}: 1000x1 px would be scaled to 128x0 px for the network (shorter side to 96, longer side at "
        f"most 128): too thin for this model"]


def test_a_dataset_holding_an_image_too_thin_for_the_model_is_refused_naming_it(tmp_path, capsys):
    root = tiny_dataset(tmp_path / "ds")
    thin_image(root / "images" / "w1000.png")
    data = json.loads((root / "annotations.json").read_text())
    data["images"].append({"id": 99, "file_name": "w1000.png", "width": 1000, "height": 1})
    (root / "annotations.json").write_text(json.dumps(data))
    assert main(["evaluate", "--model", str(tiny_checkpoint(tmp_path / "tiny.pt")), "--data", str(root)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("evaluating")]
    assert lines == ["error: w1000.png (image 3 of the dataset): 1000x1 px would be scaled to 128x0 px for the "
                     "network (shorter side to 96, longer side at most 128): too thin for this model"]
