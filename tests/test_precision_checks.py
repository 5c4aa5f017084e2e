"""Precision checks (mrcnn.evaluation.fidelity.check_precisions): a model with no card — the user's own — is
measured against float32 on images, the record is kept for its weights file, and ``auto`` follows it, on the
command line and in the app's sidebar, for every session. Tiny random-weight models; the CPU's bf16 units are
faked (``cpu_flags``), so bfloat16 is emulated here: slow, but the same code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from mrcnn import cli
from mrcnn.cli import main
from mrcnn.evaluation import fidelity
from mrcnn.evaluation.fidelity import check_precisions
from mrcnn.inference.precision import combine_fidelity
from mrcnn.model.checkpoint import save_checkpoint
from mrcnn.model.zoo import load_model, precision_checks_dir, read_precision_check
from tests.helpers import CATEGORIES, TINY_LIGHT, app_folders, scene, tiny_loaded
from tests.test_app import APP, count, png
from tests.test_precision import cpu_flags


def confident_checkpoint(path):
    """The tiny model with class 1's bias raised: its boxes score above the default 0.5, so there are
    detections to match."""
    loaded = tiny_loaded()
    with torch.no_grad():
        loaded.model.roi_heads.box_predictor.cls_score.bias[1] += 8.0
    return save_checkpoint(path, TINY_LIGHT, CATEGORIES, loaded.model.state_dict(), {"data": "test"})


@pytest.fixture
def models(tmp_path, monkeypatch):
    cpu_flags(monkeypatch, "avx512_bf16")
    monkeypatch.setenv("MRCNN_MODELS_DIR", str(tmp_path / "models"))
    return confident_checkpoint(tmp_path / "mine.pt")


def test_a_check_is_recorded_for_the_weights_and_auto_follows_it(models, monkeypatch, capsys):
    assert load_model(str(models), device="cpu", precision="auto").precision == "bfloat16"  # never checked
    monkeypatch.setattr(fidelity, "MIN_MATCHED_SHARE", 1.01)  # no share can pass: the check must fail
    assert main(["check-precision", str(models), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "in bfloat16:" in out and "MISSED its target: auto runs float32" in out
    sha = load_model(str(models), device="cpu").sha256
    assert [p.name for p in precision_checks_dir().iterdir()] == [f"{sha}.json"]  # the server's name only
    record = read_precision_check(sha)
    assert record["bfloat16"]["ok"] is False and record["bfloat16"]["detections"] > 0
    assert record["data"] == "3 generated 512-px shapes scenes"
    loaded = load_model(str(models), device="cpu", precision="auto")
    assert loaded.precision == "float32" and "bfloat16 missed its fidelity target" in loaded.precision_note
    # the same file under another name is the same model: its record follows it
    copy = models.with_name("copy.pt")
    copy.write_bytes(models.read_bytes())
    assert load_model(str(copy), device="cpu", precision="auto").precision == "float32"
    # checked again on the user's own images, it passes: auto runs bfloat16 again
    monkeypatch.setattr(fidelity, "MIN_MATCHED_SHARE", 0.0)
    image = models.parent / "mine.png"
    image.write_bytes(png(scene(96, 128, seed=3)))
    assert main(["check-precision", str(models), str(image), "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["bfloat16"]["ok"] is True and printed["data"] == "1 image given to check-precision"
    assert load_model(str(models), device="cpu", precision="auto").precision == "bfloat16"


def test_a_failed_measurement_wins_over_a_passed_one():
    card = {"bfloat16": {"ok": True, "summary": "box AP 0.88"}, "float32": {"box_AP": 0.88}, "data": "held out"}
    check = {"bfloat16": {"ok": False, "summary": "50% matched"}, "data": "3 images"}
    assert combine_fidelity(card, check)["bfloat16"]["ok"] is False
    assert combine_fidelity(check, card)["bfloat16"]["ok"] is False
    assert combine_fidelity(card, None)["bfloat16"]["ok"] is True
    assert combine_fidelity(None, "not a record") == {}


def test_no_detections_to_compare_gives_no_verdict_and_auto_keeps_the_fast_precision(tmp_path, monkeypatch):
    cpu_flags(monkeypatch, "avx512_bf16")
    monkeypatch.setenv("MRCNN_MODELS_DIR", str(tmp_path / "models"))
    quiet = tiny_loaded()  # random weights score every class about 1/4: nothing reaches 0.5
    quiet.sha256 = "ab" * 32
    record = check_precisions(quiet, [scene(96, 128, seed=1)], "one image")
    assert record["bfloat16"]["ok"] is None and "nothing to compare" in record["bfloat16"]["summary"]
    assert read_precision_check("ab" * 32) == record
    assert combine_fidelity(record)["bfloat16"]["ok"] is None  # no verdict: not a failure


def test_a_check_stopped_half_way_leaves_no_record(models):
    loaded = load_model(str(models), device="cpu")

    def stop_at_the_third_run(done, total):  # as a page's rerun stops its script at its next element update
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check_precisions(loaded, [scene(96, 128, seed=s) for s in range(2)], progress=stop_at_the_third_run)
    assert read_precision_check(loaded.sha256) is None and not precision_checks_dir().exists()
    with pytest.raises(ValueError, match="compares against float32"):
        check_precisions(load_model(str(models), device="cpu", precision="bfloat16"))


def test_bad_input_is_one_line_and_leaves_no_record(models, capsys, monkeypatch):
    bad = models.parent / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["check-precision", str(models), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "broken.png" in err[0]
    assert main(["check-precision", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert not precision_checks_dir().exists()
    cpu_flags(monkeypatch, "avx2")  # no bf16 units: nothing to check, said before the model is read
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded"))
    assert main(["check-precision", str(models), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cpu runs no reduced precision natively" in err[0]
    with pytest.raises(ValueError, match="not a sha256"):
        read_precision_check("../../etc/passwd")


def test_the_sidebars_check_leaves_out_an_image_too_thin_for_the_model(tmp_path, monkeypatch):
    """A 1000x2 upload stopped the whole check with a line that named no image."""
    cpu_flags(monkeypatch, "avx512_bf16")
    with app_folders(tmp_path, monkeypatch, confident_checkpoint(tmp_path / "ckpt.pt")):
        at = AppTest.from_file(APP, default_timeout=120).run()
        at.file_uploader[0].upload("strip.png", png(np.zeros((2, 1000, 3), np.uint8)), "image/png").run()
        at.sidebar.button(key="precision_check").click().run()
        assert not at.exception and not at.sidebar.error, [e.value for e in at.sidebar.error]
        assert "on an image of a session" in " ".join(c.value for c in at.sidebar.caption)  # the sample alone


def test_the_sidebar_checks_the_model_and_every_session_runs_what_the_check_allows(tmp_path, monkeypatch):
    cpu_flags(monkeypatch, "avx512_bf16")
    monkeypatch.setattr(fidelity, "MIN_MATCHED_SHARE", 1.01)  # whatever matches, the check fails
    with app_folders(tmp_path, monkeypatch, confident_checkpoint(tmp_path / "ckpt.pt")):
        at = AppTest.from_file(APP, default_timeout=120).run()
        caption = " ".join(c.value for c in at.sidebar.caption)
        assert "Runs in **bfloat16** (auto)" in caption
        assert "bfloat16 has not been checked against float32 on this model yet" in caption
        at.sidebar.button(key="precision_check").click().run()
        assert not at.exception and not at.sidebar.error
        caption = " ".join(c.value for c in at.sidebar.caption)
        assert "Runs in **float32** (auto)" in caption and "bfloat16 missed its fidelity target" in caption
        assert "of float32's" in caption and "on an image of a session" in caption  # the sample scene it showed
        assert count(at) >= 0  # Detect drew its page again, from a float32 run
        # another session, and this one on another page and back, get the model as the check left it
        other = AppTest.from_file(APP, default_timeout=120).run()
        assert "Runs in **float32** (auto)" in " ".join(c.value for c in other.sidebar.caption)
        for page in ("ui/inspect.py", "ui/detect.py"):
            at.switch_page(page).run()
            assert not at.exception
            assert "Runs in **float32** (auto)" in " ".join(c.value for c in at.sidebar.caption)
