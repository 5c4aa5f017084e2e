"""Inference precision (mrcnn/inference/precision.py): what each device runs natively, what ``auto`` picks and
why, refusals on one line, reduced-precision traces that keep float32 stages, and fidelity records that keep
``auto`` from a precision that missed its target. Tiny random-weight models; CUDA is absent here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from mrcnn import bench
from mrcnn.cli import build_parser, main
from mrcnn.errors import MrcnnError
from mrcnn.data.shapes import generate_scene
from mrcnn.data.sources import open_data
from mrcnn.evaluation import fidelity
from mrcnn.evaluation.evaluate import evaluate
from mrcnn.evaluation.fidelity import detection_fidelity, in_precision, matched_share
from mrcnn.inference import precision
from mrcnn.inference.export import trace_json
from mrcnn.inference.precision import choose_precision, stage_autocast
from mrcnn.inference.structures import Detections, Thresholds
from mrcnn.inference.trace import run_trace
from mrcnn.model.checkpoint import save_checkpoint
from mrcnn.model import zoo
from mrcnn.model.zoo import load_model, read_card, weights_dir
from mrcnn.training.card import write_card
from tests.helpers import CATEGORIES, TINY_LIGHT, app_folders, scene, shaped_state_dict, tiny_loaded
from tests.test_app import APP

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
LOW = Thresholds(score_thresh=0.05)  # random weights score about 1/C: a low threshold gives detections


def cpu_flags(monkeypatch, *flags: str) -> None:
    monkeypatch.setattr(precision, "read_cpu_flags", lambda: frozenset(flags))


@pytest.fixture(scope="module")
def tiny_pair():
    """The same tiny model in float32 and in bfloat16, and an image."""
    loaded = tiny_loaded()
    return loaded, in_precision(loaded, "bfloat16"), scene(96, 128, seed=1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return save_checkpoint(path, TINY_LIGHT, CATEGORIES, tiny_loaded().model.state_dict(), {"data": "test"})


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse avx2 amx_bf16 amx_tile\n")
    monkeypatch.setattr(precision, "CPUINFO", info)
    assert {"avx2", "amx_bf16"} <= precision.read_cpu_flags()
    assert precision.cpu_has_native_bf16() and precision.cpu_model_name() == "Test CPU"
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
    assert precision.read_cpu_flags() == frozenset() and not precision.cpu_has_native_bf16()


@pytest.mark.parametrize("flags, expected", [(("avx512_bf16",), "bfloat16"), (("amx_bf16",), "bfloat16"),
                                             (("avx2", "avx512f"), "float32"), ((), "float32")])
def test_auto_picks_bfloat16_only_on_a_cpu_with_bf16_units(monkeypatch, flags, expected):
    cpu_flags(monkeypatch, *flags)
    choice = choose_precision("auto", CPU)
    assert choice.precision == expected
    if expected == "float32":  # and it says why
        assert "avx512_bf16" in choice.note and "amx_bf16" in choice.note
    else:
        assert choice.note == ""


def test_cuda_runs_float16_natively(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.native_precisions(CUDA) == ["float32", "float16"]
    assert choose_precision("auto", CUDA).precision == "float16"
    assert choose_precision("float32", CUDA).precision == "float32"


def test_precisions_the_device_lacks_are_refused_in_one_line(monkeypatch):
    cpu_flags(monkeypatch, "avx2")
    with pytest.raises(MrcnnError, match="float16 runs natively only on a CUDA device"):
        choose_precision("float16", CPU)
    with pytest.raises(MrcnnError, match="bfloat16 is not native on this CPU .*avx512_bf16.*use auto or float32"):
        choose_precision("bfloat16", CPU)
    with pytest.raises(MrcnnError, match="unknown precision 'half'"):
        choose_precision("half", CPU)
    cpu_flags(monkeypatch, "avx512_bf16")
    assert choose_precision("bfloat16", CPU).precision == "bfloat16"


def test_a_failed_fidelity_check_keeps_auto_from_that_precision(monkeypatch):
    cpu_flags(monkeypatch, "avx512_bf16")
    failed = {"bfloat16": {"ok": False, "summary": "box AP 0.80 against float32's 0.88"}}
    choice = choose_precision("auto", CPU, failed)
    assert choice.precision == "float32"
    assert "bfloat16 missed its fidelity target" in choice.note and "0.80" in choice.note
    assert choose_precision("auto", CPU, {"bfloat16": {"ok": True}}).precision == "bfloat16"
    # asked for by name, it still runs, with the caveat
    explicit = choose_precision("bfloat16", CPU, failed)
    assert explicit.precision == "bfloat16" and "missed" in explicit.note


def test_a_bfloat16_trace_keeps_what_the_user_looks_at_in_float32(tiny_pair):
    loaded, reduced, image = tiny_pair
    trace = run_trace(reduced, image, LOW)
    assert trace.precision == "bfloat16" and len(trace.detections) > 0
    assert all(f.dtype == torch.float32 for f in trace.features.values())
    assert all(m.dtype == torch.float32 for m in trace.objectness_maps + trace.delta_maps)
    assert trace.candidates.probs.dtype == torch.float32 and trace.candidates.boxes.dtype == torch.float32
    assert trace.mask_probs_28(trace.detections.candidate_ids[:3]).dtype == torch.float32
    assert trace_json(trace, "x.png")["model"]["precision"] == "bfloat16"
    # the shared float32 model is untouched: no hooks, its own weights' layout
    assert not loaded.model.backbone._forward_hooks
    assert loaded.model.backbone.body.conv1.weight.is_contiguous()
    assert reduced.model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_bfloat16_traces_mask_probabilities_are_its_mask_heads_own(tiny_pair):
    """The trace casts only each candidate's own class map to float32, skipping the hook that casts every
    class's map for torchvision's forward: the probabilities are the same as through the hook."""
    _, reduced, image = tiny_pair
    trace = run_trace(reduced, image, LOW)
    ids = [int(i) for i in trace.detections.candidate_ids]
    heads = reduced.model.roi_heads
    with torch.inference_mode():
        pooled = trace._pool(heads.mask_roi_pool, trace.candidate_boxes(ids))
        with stage_autocast("bfloat16", torch.device("cpu")):
            logits = heads.mask_predictor(heads.mask_head(pooled))  # through the float32 hook
    assert logits.dtype == torch.float32
    hooked = logits[torch.arange(len(ids)), torch.tensor([i % trace.num_classes for i in ids])].sigmoid()
    assert torch.equal(trace.mask_probs_28(ids), hooked)


def test_a_bfloat16_trace_largely_finds_float32s_detections():
    """On a trained model, the bundled one: a random-weight model's detections are near-ties that any
    rounding reorders (its share swung from 89% to 100% between CPUs with and without bf16 units)."""
    loaded = load_model("shapes", device="cpu", precision="float32")
    reduced = in_precision(loaded, "bfloat16")
    images = [generate_scene(seed, size=256).image for seed in range(8)]
    counts = [matched_share(run_trace(loaded, image).detections, run_trace(reduced, image).detections)
              for image in images]
    matched, total = (sum(c) for c in zip(*counts))
    assert total > 30 and matched / total >= 0.9
    assert trace_json(run_trace(loaded, images[0]), "x.png")["model"]["precision"] == "float32"


def test_evaluate_runs_the_network_in_the_models_precision(tiny_pair):
    _, reduced, _ = tiny_pair
    seen = []  # autocast is per thread: evaluate's worker threads must set it themselves
    hook = reduced.model.backbone.body.conv1.register_forward_hook(
        lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"), o.dtype)))
    try:
        evaluate(reduced, open_data("shapes:2:5:64"), workers=2, keep_predictions=False)
    finally:
        hook.remove()
    assert seen and all(s == (True, torch.bfloat16) for s in seen)


def test_matched_share_needs_label_box_and_score():
    def dets(boxes, labels, scores):
        return Detections(boxes=np.array(boxes, np.float32).reshape(-1, 4), scores=np.array(scores, np.float32),
                          labels=np.array(labels, np.int64), masks=None, candidate_ids=np.arange(len(labels)),
                          categories=CATEGORIES, image_size=(100, 100))

    ref = dets([[0, 0, 50, 50]] * 4, [1, 1, 1, 1], [0.9, 0.8, 0.7, 0.6])
    other = dets([[0, 0, 50, 50], [0, 0, 50, 50], [0, 0, 50, 40], [0, 0, 50, 50]], [1, 2, 1, 1],
                 [0.91, 0.8, 0.7, 0.5])
    # 1st matches; 2nd: other label; 3rd: IoU 0.8; 4th: score off by 0.1 (and the 1st's partner is taken)
    assert matched_share(ref, other) == (1, 4)
    assert matched_share(ref, dets([], [], [])) == (0, 4)


def test_load_model_reads_the_fidelity_record_of_the_card(tmp_path, monkeypatch, tiny_checkpoint):
    cpu_flags(monkeypatch, "avx512_bf16")
    path = tmp_path / "m.pt"
    path.write_bytes(tiny_checkpoint.read_bytes())
    assert load_model(str(path), device="cpu", precision="auto").precision == "bfloat16"
    path.with_suffix(".json").write_text(json.dumps({"precision_fidelity": {
        "bfloat16": {"ok": False, "summary": "mask AP 0.70 against float32's 0.80"}}}))
    loaded = load_model(str(path), device="cpu", precision="auto")
    assert loaded.precision == "float32" and "missed its fidelity target" in loaded.precision_note
    assert not loaded.model.backbone._forward_hooks  # float32: exactly the model as loaded


def test_card_measures_ap_per_precision_and_auto_follows_it(tmp_path, monkeypatch, tiny_checkpoint):
    cpu_flags(monkeypatch, "avx512_bf16")
    path = tmp_path / "m.pt"
    path.write_bytes(tiny_checkpoint.read_bytes())
    monkeypatch.setattr(fidelity, "AP_TOLERANCE", -1.0)  # no precision can pass: auto must fall back
    card = write_card(path, "shapes:2:5:64", fidelity_num=2, timing_repeats=1)
    record = card["precision_fidelity"]
    assert record["images"] == 2 and set(record["float32"]) == {"box_AP", "mask_AP"}
    assert record["bfloat16"]["ok"] is False and "box AP" in record["bfloat16"]["summary"]
    assert load_model(str(path), device="cpu", precision="auto").precision == "float32"


@pytest.mark.skipif(not (weights_dir() / "shapes.pt").is_file(), reason="weights/shapes.pt is missing")
def test_bundled_card_records_ap_per_precision_within_target():
    record = read_card(weights_dir() / "shapes.pt")["precision_fidelity"]
    assert record["images"] == 200 and "shapes:500:12345:256" in record["data"]
    for name in ("bfloat16", "float16"):
        entry = record[name]
        assert entry["ok"] is True
        assert record["float32"]["box_AP"] - entry["box_AP"] <= 0.005
        assert record["float32"]["mask_AP"] - entry["mask_AP"] <= 0.005


def test_r50_fidelity_counts_matched_detections(monkeypatch):
    # the bench's R50 check on the tiny model (same code): shares per precision, ok at 97%
    record = detection_fidelity(tiny_loaded(), [scene(96, 128, seed=2)], ["float16"], LOW)
    assert record["float16"]["detections"] > 0 and 0.9 <= record["float16"]["matched"] <= 1.0
    assert record["float16"]["ok"] == (record["float16"]["matched"] >= 0.97)


def test_bench_measures_r50s_fidelity_on_torchvisions_coco_weights_when_they_are_here(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(bench, "detection_fidelity",
                        lambda loaded, images, precisions: measured.append(loaded) or {"images": len(images)})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MRCNN_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert "random weights" in bench.r50_fidelity(CPU, "bfloat16", scenes=1)["weights"]
    assert measured.pop().source == "<random weights>"
    # a locally made state dict of the architecture, under torchvision's file name, stands in for the COCO file
    folder = tmp_path / "weights"
    folder.mkdir()
    coco = folder / zoo.TORCHVISION_MODELS["coco-r50-fpn"].filename
    torch.save(shaped_state_dict("maskrcnn_resnet50_fpn", 91), coco)
    assert bench.r50_fidelity(CPU, "bfloat16", scenes=1) == {"images": 1, "weights": "torchvision's COCO weights"}
    assert measured.pop().source == str(coco)


def test_precision_flags_parse_and_bad_values_exit_2(capsys, monkeypatch):
    parser = build_parser()
    assert parser.parse_args(["predict", "a.png", "--out", "o"]).precision == "auto"
    assert parser.parse_args(["evaluate", "--model", "m", "--data", "d", "--precision", "float32"]).precision == "float32"
    args = parser.parse_args(["bench", "--device", "cuda", "--precision", "float16"])
    assert (args.device, args.precision) == ("cuda", "float16")
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["predict", "a.png", "--out", "o", "--precision", "half"])
    assert exit_.value.code == 2 and "invalid choice: 'half'" in capsys.readouterr().err
    cpu_flags(monkeypatch, "avx2")
    assert main(["predict", "a.png", "--out", "o", "--precision", "float16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float16 runs natively only on a CUDA device" in err[0]


def test_bench_refuses_before_it_runs(monkeypatch, capsys):
    cpu_flags(monkeypatch, "avx2")
    monkeypatch.setattr(bench, "bench_r50", lambda **kw: pytest.fail("ran"))
    assert main(["bench", "--precision", "bfloat16"]) == 2
    assert "bfloat16 is not native on this CPU" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err


def test_sidebar_offers_the_precisions_the_device_runs_and_says_why_not_the_others(tmp_path, monkeypatch,
                                                                                    tiny_checkpoint):
    cpu_flags(monkeypatch, "avx2")
    with app_folders(tmp_path, monkeypatch, tiny_checkpoint):
        at = AppTest.from_file(APP, default_timeout=60).run()
        select = at.sidebar.selectbox(key="precision")
        assert select.options == ["auto", "float32"]
        assert "bfloat16 is not native on this CPU" in select.help and "float16 runs natively only on a CUDA" in select.help
        caption = " ".join(c.value for c in at.sidebar.caption)
        assert "Runs in **float32** (auto)" in caption and "no native bfloat16" in caption
        # a choice this CPU cannot run (a link, another device's setting) falls back to auto and says why;
        # the pages keep their model (it used to leave every page, Fine-tune too, with none)
        at = AppTest.from_file(APP, default_timeout=60)
        at.session_state["precision"] = "float16"
        at.switch_page("ui/finetune.py").run()
        assert any("float16 is not available" in w.value and "CUDA" in w.value for w in at.sidebar.warning)
        assert at.sidebar.selectbox(key="precision").value == "auto" and not at.sidebar.error
        assert "Runs in **float32** (auto)" in " ".join(c.value for c in at.sidebar.caption)
        assert not at.exception and not at.main.warning and at.main.button(key="ft_start")
        at.run()  # said once: the next rerun runs auto without it
        assert not at.sidebar.warning
        cpu_flags(monkeypatch, "avx512_bf16")
        at.run()
        assert at.sidebar.selectbox(key="precision").options == ["auto", "float32", "bfloat16"]


def test_bench_light_reports_the_bundled_models_matched_detections_in_the_fast_precision():
    light = bench.bench_light(repeats=3, fast="bfloat16", fidelity_scenes=2, matched_scenes=2)
    matched = light["shapes_matched"]
    assert matched["images"] == 2 and matched["bfloat16"]["detections"] > 0
    assert light["shapes_fast_trace_ms_512"] > 0
    assert light["shapes_fast_trace_over_forward_512"] == pytest.approx(
        light["shapes_fast_trace_ms_512"] / light["shapes_forward_ms_512"])
    table = bench.format_table({
        "torchvision_forward_ms": 100.0, "trace_ms": 101.0, "trace_over_torchvision": 1.01,
        "fast_precision": "bfloat16", "fast_trace_ms": 40.0, "fast_trace_over_torchvision": 0.4,
        "r50_fidelity": {"bfloat16": {"summary": "3.00% of float32's 100 detections matched"}},
        "refilter_ms_r50": 10.0, "refilter_speedup_r50": 10.0, "refilter_cold_ms_r50": 50.0,
        "peak_rss_mb": 1000.0, **light})
    assert "3.00% of float32's 100 detections matched" in table
    assert f"{matched['bfloat16']['summary']} | target ≥ 97%" in table
    assert f"{light['shapes_fast_trace_over_forward_512']:.2f}× the float32 forward" in table
