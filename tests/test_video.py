"""Video clips (mrcnn.data.video, mrcnn.inference.video, `predict` on clips): clips made here with PyAV from
shapes scenes, 8 frames of 128x128, a tiny random-weight model at a low score threshold."""
from __future__ import annotations

import io
import json
import re
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from mrcnn.cli import main
from mrcnn.data.shapes import generate_scene
from mrcnn.data.video import ClipWriter, is_clip, open_clip
from mrcnn.errors import VideoError
from mrcnn.inference.export import detection_records
from mrcnn.inference.structures import RpnSettings, Thresholds
from mrcnn.inference.trace import run_trace
from mrcnn.inference.video import ClipCancelled, FrameCandidates, annotate_clip, detect_frames, predict_clip
from mrcnn.model.checkpoint import save_checkpoint
from mrcnn.model.zoo import load_model
from tests.helpers import CATEGORIES, TINY_LIGHT, app_folders, tiny_loaded

FRAMES, SIZE, FPS = 8, 128, 10
LOW = Thresholds(score_thresh=0.3, max_detections=20)


def scenes(n: int = FRAMES, size: int = SIZE) -> list[np.ndarray]:
    return [generate_scene(seed, size=size).image for seed in range(n)]


def encode(frames: list[np.ndarray], fmt: str = "mp4", codec: str = "libx264", fps: int = FPS) -> bytes:
    """A clip made with PyAV directly (not with our ClipWriter)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for array in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        out.mux(stream.encode())
    return buf.getvalue()


def audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return buf.getvalue()


def decoded_frames(path_or_bytes) -> tuple[int, float]:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    with av.open(source) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(stream)), float(stream.average_rate)


@pytest.fixture(scope="module")
def clip_bytes() -> bytes:
    return encode(scenes())


@pytest.fixture(scope="module")
def loaded():
    """Random weights, with class scores spread out and mostly background: a few confident candidates per
    frame, as a trained model has (uniform ~0.25 scores would keep thousands)."""
    loaded = tiny_loaded(seed=0)
    cls_score = loaded.model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls_score.weight.mul_(20.0)
        cls_score.bias[0] += 6.0
    return loaded


@pytest.fixture(scope="module")
def results(loaded, clip_bytes) -> list:
    """One pass over the clip, keeping the candidates, and the progress reports it made."""
    progress = []
    frames = list(detect_frames(loaded, open_clip(clip_bytes, name="walk.mp4"), LOW, keep_candidates=True,
                                progress=lambda *a: progress.append(a)))
    return frames, progress


def same_detections(a, b, half_masks: bool = False) -> None:
    """Equal detections; ``half_masks``: masks pasted from float16 probabilities (a frame's stored
    candidates) may differ in pixels whose probability lies at the threshold."""
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=1e-4)
    if not half_masks:
        np.testing.assert_array_equal(a.masks, b.masks)
    for m_a, m_b in zip(a.masks, b.masks):
        assert (m_a != m_b).sum() <= max(2, 0.01 * m_b.sum())


def test_every_frame_gets_the_image_paths_detections_and_refilters_like_a_trace(loaded, clip_bytes, results):
    clip = open_clip(clip_bytes, name="walk.mp4")
    assert (clip.info.frames, clip.info.fps, clip.info.width, clip.info.height) == (FRAMES, FPS, SIZE, SIZE)
    frames, progress = results
    assert [r.index for r in frames] == list(range(FRAMES))
    assert [r.time_s for r in frames] == pytest.approx([n / FPS for n in range(FRAMES)])
    assert [p[:2] for p in progress] == [(n, FRAMES) for n in range(1, FRAMES + 1)] and progress[-1][2] == 0.0
    stricter = LOW.replace(score_thresh=0.5, nms_thresh=0.3, max_detections=3, mask_thresh=0.7)
    looser = LOW.replace(score_thresh=0.25, agnostic_nms=True, class_thresh={"circle": 0.6})
    for result in frames:
        image_trace = run_trace(loaded, result.array, LOW)  # the image path on the same decoded frame
        same_detections(result.detections, image_trace.detections)
        # the stored candidates re-filter as the full trace does, at the clip's thresholds and at others
        same_detections(result.candidates.refilter(LOW), image_trace.detections, half_masks=True)
        for t in (stricter, looser):
            same_detections(result.candidates.refilter(t), image_trace.refilter(t), half_masks=True)
        assert result.candidates.exact_for(looser) and not result.candidates.exact_for(Thresholds(0.1))
    assert sum(len(r.detections) for r in frames) > 0


def test_frames_run_with_the_rpn_settings_each_inside_its_own_around_run(loaded, clip_bytes, monkeypatch):
    rpn = RpnSettings(post_nms_top_n=5)
    events = []

    @contextmanager
    def around_run(array):
        events.append(("enter", array.shape))
        yield
        events.append(("exit", array.shape))

    def counted_run_trace(*args, **kwargs):
        events.append(("run", None))
        return run_trace(*args, **kwargs)
    monkeypatch.setattr("mrcnn.inference.video.run_trace", counted_run_trace)
    frames = []
    for result in detect_frames(loaded, open_clip(clip_bytes, name="walk.mp4"), LOW, rpn, keep_candidates=True,
                                around_run=around_run):
        assert events[-1][0] == "exit"  # no frame is handed on while its run context is held
        frames.append(result)
    assert events == [("enter", (SIZE, SIZE, 3)), ("run", None), ("exit", (SIZE, SIZE, 3))] * FRAMES
    monkeypatch.undo()
    default_rpn = 0
    for result in frames:  # what an image of the frame gets under the same RPN settings
        same_detections(result.detections, run_trace(loaded, result.array, LOW, rpn).detections)
        default_rpn += len(run_trace(loaded, result.array, LOW).detections)
    assert sum(len(r.detections) for r in frames) < default_rpn  # the settings made a difference


def test_what_a_frame_keeps_is_small(results):
    cand = max((r.candidates for r in results[0]), key=lambda c: len(c.ids))
    assert isinstance(cand, FrameCandidates) and len(cand.ids) > 0
    assert cand.nbytes == len(cand.ids) * (8 + 4 + 16 + 28 * 28 * 2)


def test_frame_at_finds_a_frame_again(clip_bytes):
    clip = open_clip(clip_bytes)
    frames = list(clip.frames())
    for index in (0, 5, FRAMES - 1):
        np.testing.assert_array_equal(clip.frame_at(index, frames[index].pts), frames[index].array)


def test_predict_clip_writes_json_and_an_annotated_clip_of_the_same_length(loaded, clip_bytes, results, tmp_path):
    clip = open_clip(clip_bytes, name="walk.mp4")
    record = predict_clip(loaded, clip, LOW, tmp_path / "walk.json", tmp_path / "walk.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["walk.json", "walk.mp4"]
    assert json.loads((tmp_path / "walk.json").read_text()) == json.loads(json.dumps(record))
    assert record["video"] == {"file": "walk.mp4", "fps": FPS, "frames": FRAMES, "width": SIZE, "height": SIZE}
    assert [f["index"] for f in record["frames"]] == list(range(FRAMES))
    assert record["model"]["precision"] == "float32"  # what the network ran in, as for an image
    assert [f["detections"] for f in record["frames"]] == [detection_records(r.detections) for r in results[0]]
    assert decoded_frames(tmp_path / "walk.mp4") == (FRAMES, FPS)


def test_writer_pads_odd_sizes_and_keeps_frame_count_and_rate(tmp_path):
    with ClipWriter(tmp_path / "odd.mp4", Fraction(30000, 1001), 65, 47) as out:
        for array in scenes(5, 65):
            out.write(array[:47])
    clip = open_clip(tmp_path / "odd.mp4")
    assert (clip.info.width, clip.info.height) == (66, 48)
    assert decoded_frames(tmp_path / "odd.mp4") == (5, pytest.approx(30000 / 1001))


@pytest.mark.parametrize("kind", ["mp4", "webm", "mov", "gif"])
def test_containers_the_app_takes_decode(kind):
    frames = scenes(4, 64)
    if kind == "gif":
        buf = io.BytesIO()
        Image.fromarray(frames[0]).save(buf, format="GIF", save_all=True,
                                        append_images=[Image.fromarray(f) for f in frames[1:]], duration=100)
        data = buf.getvalue()
    else:
        data = encode(frames, fmt=kind, codec={"webm": "libvpx", "mov": "mpeg4"}.get(kind, "libx264"))
    assert is_clip(f"x.{kind}", data)
    decoded = list(open_clip(data).frames())
    assert len(decoded) == 4 and decoded[0].array.shape == (64, 64, 3)


def test_a_gif_whose_last_frame_lingers_is_whole():
    frames = [Image.fromarray(f) for f in scenes(4, 32)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=[100, 100, 100, 2000])
    assert len(list(open_clip(buf.getvalue()).frames())) == 4


def test_a_single_frame_gif_is_an_image():
    buf = io.BytesIO()
    Image.fromarray(scenes(1, 32)[0]).save(buf, format="GIF")
    assert not is_clip("still.gif", buf.getvalue())
    assert not is_clip("photo.png") and is_clip("CLIP.MP4")


def bad_clips(clip_bytes: bytes) -> dict[str, tuple[bytes, str]]:
    webm = encode(scenes(4, 64), fmt="webm", codec="libvpx")
    return {
        "garbage": (b"not a video at all " * 50, "not a readable video file"),
        "no video stream": (audio_only(), "has no video stream"),
        "mp4 cut short": (clip_bytes[: len(clip_bytes) // 2], "truncated"),
        "webm cut short": (webm[: int(len(webm) * 0.7)], "truncated"),
        "empty": (b"", "file is empty"),
    }


@pytest.mark.parametrize("case", ["garbage", "no video stream", "mp4 cut short", "webm cut short", "empty"])
def test_bad_clips_are_one_line_and_leave_nothing(case, loaded, clip_bytes, tmp_path):
    data, says = bad_clips(clip_bytes)[case]
    with pytest.raises(VideoError) as err:
        predict_clip(loaded, open_clip(data, name="bad.mp4"), LOW, tmp_path / "bad.json", tmp_path / "bad.mp4")
    message = str(err.value)
    assert message.startswith("bad.mp4: ") and says in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("env,value,says", [("MRCNN_MAX_VIDEO_SECONDS", "0.5", "clip is too long (0.8 s"),
                                            ("MRCNN_MAX_VIDEO_MB", "0.001", "file is too large"),
                                            ("MRCNN_MAX_PIXELS", "10000", "frames have too many pixels (128x128")])
def test_limits_come_from_the_environment(env, value, says, clip_bytes, monkeypatch):
    open_clip(clip_bytes)
    monkeypatch.setenv(env, value)
    with pytest.raises(VideoError, match=rf"^clip: {re.escape(says)}.*raise it with {env}\)$"):
        open_clip(clip_bytes)


def test_a_cancel_stops_and_leaves_nothing(loaded, clip_bytes, tmp_path):
    calls = []
    with pytest.raises(ClipCancelled, match="stopped after 2 of 8 frames"):
        predict_clip(loaded, open_clip(clip_bytes), LOW, tmp_path / "c.json", tmp_path / "c.mp4",
                     should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, loaded) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", TINY_LIGHT, CATEGORIES,
                           loaded.model.state_dict())


def test_cli_predicts_images_and_clips_in_one_call(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "walk.mp4").write_bytes(encode(scenes(4)))
    Image.fromarray(scenes(1)[0]).save(tmp_path / "still.png")
    out = tmp_path / "out"
    code = main(["predict", str(tmp_path / "still.png"), str(tmp_path / "walk.mp4"), "--model", str(tiny_checkpoint),
                 "--score-thresh", "0.3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["still.json", "still.png", "walk.json", "walk.mp4"]
    record = json.loads((out / "walk.json").read_text())
    assert record["video"]["frames"] == 4 and len(record["frames"]) == 4
    assert json.loads((out / "still.json").read_text())["image"]["file"] == "still.png"
    assert decoded_frames(out / "walk.mp4") == (4, FPS)
    assert "walk.mp4: 4 frames" in capsys.readouterr().out


def test_cli_bad_clip_is_one_line_exit_2_and_leaves_nothing(tiny_checkpoint, clip_bytes, tmp_path, capsys):
    (tmp_path / "cut.mp4").write_bytes(clip_bytes[:3000])
    out = tmp_path / "out"
    code = main(["predict", str(tmp_path / "cut.mp4"), "--model", str(tiny_checkpoint), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"error: {tmp_path / 'cut.mp4'}: file is truncated or damaged "
                                        "(its MP4/MOV index is missing)"]
    assert not out.exists()  # the folder predict made for it is removed too


# ---- the app ------------------------------------------------------------------------------------------
APP = str(Path(__file__).resolve().parent.parent / "app.py")


@pytest.fixture
def app_env(tmp_path, monkeypatch, tiny_checkpoint):
    with app_folders(tmp_path, monkeypatch, tiny_checkpoint) as folder:
        yield folder


def shown_count(at: AppTest) -> int:
    found = [int(m.group(1)) for md in at.markdown if (m := re.search(r"### (\d+) detections", md.value))]
    assert len(found) == 1, [md.value for md in at.markdown]
    return found[0]


def test_app_processes_a_clip_once_then_scrubs_and_refilters_without_the_network(app_env, clip_bytes, monkeypatch):
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.slider(key="score_thresh").set_value(0.3).run()
    at.file_uploader[0].upload("walk.mp4", clip_bytes, "video/mp4").run()
    assert not at.exception, at.exception
    clip = at.session_state["video"]
    assert len(clip.candidates) == FRAMES and "walk.mp4" in "\n".join(md.value for md in at.markdown)

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran again")
    monkeypatch.setattr("mrcnn.inference.video.run_trace", no_network)
    counts = []
    for index, score in ((5, 0.3), (5, 0.6), (2, 0.3)):
        at.slider(key="score_thresh").set_value(score)
        at.slider(key="video_frame").set_value(index).run()
        assert not at.exception, at.exception
        expected = clip.candidates[index].refilter(LOW.replace(score_thresh=score, max_detections=100))
        assert shown_count(at) == len(expected)
        counts.append(len(expected))
    assert counts[0] >= counts[1]

    next(b for b in at.button if b.label == "Make the annotated clip").click().run()
    assert not at.exception, at.exception
    assert decoded_frames(at.session_state["video_download"][1]) == (FRAMES, FPS)

    next(b for b in at.button if b.label == "Open this frame in Inspect").click().run()
    assert not at.exception, at.exception
    entry = at.session_state["images"][at.session_state["current_image"]]
    assert entry.name == "walk-frame2.png" and entry.array.shape == (SIZE, SIZE, 3)


def test_app_bad_clip_is_a_message_and_keeps_nothing(app_env):
    at = AppTest.from_file(APP, default_timeout=60).run()
    at.file_uploader[0].upload("broken.mp4", b"\x00\x00\x00\x18ftypisom" + b"\x00" * 100, "video/mp4").run()
    assert not at.exception, at.exception
    assert any("broken.mp4" in e.value and "truncated or damaged" in e.value for e in at.error)
    assert "video" not in at.session_state


def test_app_takes_an_animated_gif_as_a_clip_and_reprocesses_below_the_floor(app_env):
    frames = scenes(3, 64)
    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="GIF", save_all=True,
                                    append_images=[Image.fromarray(f) for f in frames[1:]], duration=100)
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.file_uploader[0].upload("spin.gif", buf.getvalue(), "image/gif").run()
    assert not at.exception, at.exception
    clip = at.session_state["video"]
    assert len(clip.candidates) == 3 and clip.candidates[0].floor == 0.25
    at.slider(key="score_thresh").set_value(0.1).run()
    next(b for b in at.button if b.label == "Process the clip again at this threshold").click().run()
    assert not at.exception, at.exception
    assert at.session_state["video"].candidates[0].floor == pytest.approx(0.1)
    assert not [b for b in at.button if b.label == "Process the clip again at this threshold"]


def test_ffmpeg_logging_stays_off_so_decoder_threads_never_wait_for_the_gil():
    # With any level PyAV hooks a Python log callback; a CI run hung in avcodec_free_context when a clip's
    # decoder was collected mid-run while its threads waited to log.
    assert av.logging.get_level() is None


# ---- the app: what a kept clip result is keyed by, and the server's run slots ----------------------------
def other_model(folder: Path) -> str:
    """A second model (other random weights) in the app's runs folder; its name in the sidebar."""
    path = save_checkpoint(folder / "runs" / "other" / "checkpoint.pt", TINY_LIGHT, CATEGORIES,
                           tiny_loaded(seed=5).model.state_dict())
    return str(path)


@pytest.fixture
def offered_downloads(monkeypatch) -> dict[str, bytes]:
    """file name -> the bytes the page's download buttons give, filled as each run draws them."""
    from streamlit.runtime.media_file_manager import MediaFileManager
    offered: dict[str, bytes] = {}
    add = MediaFileManager.add

    def recording_add(self, data, mimetype, coordinates, file_name=None, **kwargs):
        if file_name is not None:
            offered[file_name] = data
        return add(self, data, mimetype, coordinates, file_name, **kwargs)
    monkeypatch.setattr(MediaFileManager, "add", recording_add)
    return offered


def click(at: AppTest, label: str) -> AppTest:
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception, at.exception
    return at


def button_labels(at: AppTest) -> list[str]:
    return [b.label for b in at.button] + [d.label for d in at.get("download_button")]


def annotated(clip_bytes: bytes, candidates: list, thresholds: Thresholds) -> bytes:
    """The annotated clip drawn from these frame candidates with the app's default display settings."""
    from ui.state import DEFAULTS
    from ui.video import DISPLAY_KEYS
    buf = io.BytesIO()
    annotate_clip(open_clip(clip_bytes, name="walk.mp4"), lambda i: candidates[i].refilter(thresholds), buf,
                  **{k: DEFAULTS[k] for k in DISPLAY_KEYS})
    return buf.getvalue()


def test_app_download_after_a_model_switch_is_the_new_models_clip(app_env, clip_bytes, offered_downloads):
    other = other_model(app_env)
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["device"] = "cpu"  # where the expected clip is computed (a CUDA machine offers both)
    at.session_state["precision"] = "float32"  # as it is computed (auto runs bfloat16 on a CPU with bf16 units)
    at.run()
    at.slider(key="score_thresh").set_value(0.3).run()
    at.file_uploader[0].upload("walk.mp4", clip_bytes, "video/mp4").run()
    click(at, "Make the annotated clip")
    first = offered_downloads.pop("walk-detections.mp4")

    at.sidebar.selectbox(key="model_name").select(other).run()
    assert not at.exception, at.exception
    # the clip is processed again with the other model; the first model's drawing is not offered
    assert "Download the annotated clip" not in button_labels(at) and "walk-detections.mp4" not in offered_downloads
    click(at, "Make the annotated clip")
    made = offered_downloads["walk-detections.mp4"]
    thresholds = LOW.replace(max_detections=100)
    expected = [r.candidates for r in detect_frames(tiny_loaded(seed=5), open_clip(clip_bytes, name="walk.mp4"),
                                                    thresholds, keep_candidates=True)]
    assert made != first and made == annotated(clip_bytes, expected, thresholds)
    assert decoded_frames(made) == (FRAMES, FPS)


def test_app_precision_switch_processes_the_clip_again(app_env, clip_bytes, tiny_checkpoint, monkeypatch,
                                                       offered_downloads):
    monkeypatch.setattr("mrcnn.inference.precision.cpu_has_native_bf16", lambda: True)  # offered on any CPU
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["device"] = "cpu"  # where the expected candidates are computed
    at.run()
    at.sidebar.selectbox(key="precision").select("float32").run()
    at.slider(key="score_thresh").set_value(0.3).run()
    at.file_uploader[0].upload("walk.mp4", clip_bytes, "video/mp4").run()
    click(at, "Make the annotated clip")
    assert "walk-detections.mp4" in offered_downloads
    offered_downloads.clear()

    at.sidebar.selectbox(key="precision").select("bfloat16").run()
    assert not at.exception, at.exception
    thresholds = LOW.replace(max_detections=100)
    kept = at.session_state["video"].candidates
    by_precision = {p: [r.candidates for r in detect_frames(load_model(str(tiny_checkpoint), device="cpu", precision=p),
                                                            open_clip(clip_bytes, name="walk.mp4"), thresholds,
                                                            keep_candidates=True)]
                    for p in ("float32", "bfloat16")}
    assert any(not torch.equal(a.scores, b.scores) for a, b in zip(*by_precision.values()))  # they differ
    for frame, expected in zip(kept, by_precision["bfloat16"]):
        torch.testing.assert_close(frame.scores, expected.scores, rtol=0, atol=0)
    assert shown_count(at) == len(by_precision["bfloat16"][0].refilter(thresholds))
    assert "Download the annotated clip" not in button_labels(at) and not offered_downloads


def test_app_clip_frames_use_inspects_rpn_knobs_as_the_frame_as_an_image_does(app_env, clip_bytes):
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["rpn_overrides"] = {"rpn_post_nms_top_n": 5}  # as Inspect's RPN knobs leave it
    at.run()
    at.slider(key="score_thresh").set_value(0.3).run()
    at.file_uploader[0].upload("walk.mp4", clip_bytes, "video/mp4").run()
    at.slider(key="video_frame").set_value(2).run()
    assert not at.exception, at.exception
    assert any("RPN knobs set on Inspect are in use" in c.value and "post-NMS top-N 5" in c.value
               for c in at.caption)
    as_clip_frame = shown_count(at)

    click(at, "Open this frame in Inspect")
    at.switch_page("ui/detect.py").run()
    click(at, "Close clip")
    assert at.session_state["images"][at.session_state["current_image"]].name == "walk-frame2.png"
    assert shown_count(at) == as_clip_frame


def test_app_clip_asks_before_processing_again_for_new_rpn_knobs_and_keeps_earlier_processings(
        app_env, clip_bytes, monkeypatch):
    """Inspect's RPN knobs are turned while looking at one frame; processing the clip again takes minutes, so
    Detect asks first and shows the frames as processed until then. Going back to earlier knobs shows their
    frames at once."""
    frames_run = []

    def counted_run_trace(*args, **kwargs):
        frames_run.append(1)
        return run_trace(*args, **kwargs)
    monkeypatch.setattr("mrcnn.inference.video.run_trace", counted_run_trace)
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["device"], at.session_state["precision"] = "cpu", "float32"  # as the expected frame runs
    at.run()
    at.slider(key="score_thresh").set_value(0.3).run()
    at.file_uploader[0].upload("walk.mp4", clip_bytes, "video/mp4").run()
    at.slider(key="video_frame").set_value(2).run()
    own_knobs = shown_count(at)
    assert len(frames_run) == FRAMES

    at.session_state["rpn_overrides"] = {"rpn_post_nms_top_n": 5}  # as Inspect's knobs leave it
    at.run()
    assert not at.exception, at.exception
    offer = [md.value for md in at.markdown if "processed with other RPN knobs" in md.value]
    assert offer and "Inspect's are now pre-NMS top-N" in offer[0] and "post-NMS top-N 5," in offer[0]
    assert len(frames_run) == FRAMES and shown_count(at) == own_knobs  # the frames as processed, no network
    assert not [c for c in at.caption if "RPN knobs set on Inspect are in use" in c.value]

    click(at, "Process the clip with the current RPN knobs")
    assert len(frames_run) == 2 * FRAMES
    assert not [md for md in at.markdown if "processed with other RPN knobs" in md.value]
    assert any("RPN knobs set on Inspect are in use" in c.value for c in at.caption)
    clip = at.session_state["video"]
    first, now = clip.processings.values()
    assert now is clip.shown and now.rpn.post_nms_top_n == 5 and first.rpn.post_nms_top_n > 5
    assert all(len(set((c.ids // c.num_classes).tolist())) <= 5 for c in now.candidates)  # 5 proposals a frame
    assert any(len(set((c.ids // c.num_classes).tolist())) > 5 for c in first.candidates)
    assert shown_count(at) == len(now.candidates[2].refilter(LOW.replace(score_thresh=0.3, max_detections=100)))
    assert shown_count(at) < own_knobs  # the knobs made a difference

    at.session_state["rpn_overrides"] = {}  # Inspect's "Defaults"
    at.run()
    assert len(frames_run) == 2 * FRAMES and shown_count(at) == own_knobs  # kept: shown at once
    assert not [md for md in at.markdown if "processed with other RPN knobs" in md.value]


def test_app_clip_takes_a_run_slot_per_frame(app_env, clip_bytes, monkeypatch):
    import ui.state
    slot, events, learns = ui.state.network_slot, [], []

    @contextmanager
    def counted_slot(loaded, image_shape, learn=True):
        events.append("take")
        learns.append(learn)
        with slot(loaded, image_shape, learn) as reservation:
            yield reservation
        events.append("free")

    def checked_run_trace(*args, **kwargs):
        # inside the server's slot, with the run's memory reserved in the trace cache's budget
        events.append("run" if ui.state.trace_cache().reserved_bytes() > 0 else "run outside the budget")
        return run_trace(*args, **kwargs)
    monkeypatch.setattr(ui.state, "network_slot", counted_slot)
    monkeypatch.setattr("mrcnn.inference.video.run_trace", checked_run_trace)
    at = AppTest.from_file(APP, default_timeout=120).run()
    events.clear()  # the sample image's run
    learns.clear()
    at.file_uploader[0].upload("walk.mp4", clip_bytes, "video/mp4").run()
    assert not at.exception, at.exception
    assert len(at.session_state["video"].candidates) == FRAMES
    assert events == ["take", "run", "free"] * FRAMES  # one slot per frame: another session waits one frame
    assert learns == [True] + [False] * (FRAMES - 1)  # the first frame measures the memory a run takes
