"""Detection over a clip: every frame goes the image's way (``run_trace``), one frame in memory at a time.

    for result in detect_frames(loaded, clip, thresholds, rpn, keep_candidates=True, progress=cb):
        result.index, result.time_s, result.detections    # the detections an image of that frame gets
        result.candidates.refilter(Thresholds(...))        # new thresholds later, without the network
    record = predict_clip(loaded, clip, thresholds, "out/walk.json", "out/walk.mp4")   # the CLI's outputs

Nothing of a frame's trace outlives the frame (its feature maps are hundreds of times the frame's
candidates). What can be kept per frame to re-filter it later is ``FrameCandidates``: the foreground
candidates scoring above a floor, with their 28×28 mask-head probabilities in float16 — about 1.6 KB per
candidate whatever the frame size; masks are pasted at full size only for the frame being looked at.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import torch
from torchvision.models.detection.transform import resize_boxes

from mrcnn.data.video import Clip, ClipWriter
from mrcnn.errors import MrcnnError
from mrcnn.files import atomic_write_bytes
from mrcnn.inference.draw import draw_detections
from mrcnn.inference.export import detection_records
from mrcnn.inference.input_size import check_input_size
from mrcnn.inference.structures import Detections, RpnSettings, Thresholds
from mrcnn.inference.trace import run_trace, select_candidates
from mrcnn.model.paste import paste_masks_cropped, paste_mode
from mrcnn.model.zoo import LoadedModel

# A frame keeps the candidates scoring above min(CANDIDATE_FLOOR, the lowest threshold it was run with):
# re-filtering is exact for every threshold at or above that floor. The cap bounds a frame's memory.
CANDIDATE_FLOOR = 0.25
MAX_CANDIDATES_PER_FRAME = 300

Progress = Callable[[int, int, float | None], None]  # (frames done, frames in all (0: unknown), seconds left)
AroundRun = Callable[[np.ndarray], AbstractContextManager]  # the frame -> a context entered around its run


class ClipCancelled(MrcnnError):
    """Processing of a clip stopped because the caller asked (``should_stop``)."""


@dataclass(eq=False)
class FrameCandidates:
    """A frame's candidates above ``floor``, enough to re-filter it like ``Trace.refilter`` does.

    ids: int64 (K,) candidate ids (proposal * C + class), ascending; scores: float32 (K,);
    boxes: float32 (K, 4) in network-input pixels; mask_probs: float16 (K, M, M) or None (no mask head).
    Half precision halves a clip's memory; a mask pixel whose probability lies within ~1e-3 of the mask
    threshold may come out the other way than in the image's float32 trace (boxes, scores and labels
    are exact).
    """

    ids: torch.Tensor
    scores: torch.Tensor
    boxes: torch.Tensor
    mask_probs: torch.Tensor | None
    floor: float
    num_classes: int
    categories: list[str]
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    paste: str

    @classmethod
    def from_trace(cls, trace, floor: float, max_candidates: int = MAX_CANDIDATES_PER_FRAME) -> "FrameCandidates":
        probs, boxes = trace.candidates.probs, trace.candidates.boxes
        num_props, num_classes = probs.shape
        # (P, C) -> foreground only, flat: the layout Trace._select works on
        ids = torch.arange(num_props * num_classes, device=probs.device).view(num_props, num_classes)
        ids, scores, boxes = ids[:, 1:].reshape(-1), probs[:, 1:].reshape(-1), boxes[:, 1:].reshape(-1, 4)
        keep = torch.where(scores > floor)[0]
        if len(keep) > max_candidates:
            keep = keep[scores[keep].topk(max_candidates).indices].sort().values  # ids stay ascending
        ids, scores, boxes = ids[keep], scores[keep], boxes[keep]
        mask_probs = trace.mask_probs_28(ids.tolist(), boxes).half().cpu() if trace.loaded.has_masks else None
        return cls(ids.cpu(), scores.float().cpu(), boxes.float().cpu(), mask_probs, float(floor), int(num_classes),
                   list(trace.categories), trace.input_size, trace.original_size, paste_mode(trace.model))

    def exact_for(self, t: Thresholds) -> bool:
        """Whether ``refilter(t)`` is what the full trace would give (every threshold at or above the floor)."""
        return min([t.score_thresh, *dict(t.class_thresh).values()]) >= self.floor

    def refilter(self, t: Thresholds) -> Detections:
        """The frame's detections at ``t``, without the network (see ``exact_for``)."""
        t.check_classes(self.categories)
        ids, scores, boxes = select_candidates(self.ids, self.scores, self.boxes, self.num_classes,
                                               self.categories, t)
        boxes_orig = resize_boxes(boxes, self.input_size, self.original_size)
        masks = None
        if self.mask_probs is not None:
            h, w = self.original_size
            masks = np.zeros((len(ids), h, w), dtype=bool)
            if len(ids):
                probs = self.mask_probs[torch.searchsorted(self.ids, ids)].float()
                for n, (y0, x0, crop) in enumerate(paste_masks_cropped(probs, boxes_orig, self.original_size,
                                                                       self.paste)):
                    masks[n, y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop > t.mask_thresh
        return Detections(boxes=boxes_orig.numpy().astype(np.float32).reshape(-1, 4),
                          scores=scores.numpy().astype(np.float32), labels=(ids % self.num_classes).numpy(),
                          masks=masks, candidate_ids=ids.numpy().astype(np.int64), categories=self.categories,
                          image_size=self.original_size)

    @property
    def nbytes(self) -> int:
        tensors = [self.ids, self.scores, self.boxes] + ([self.mask_probs] if self.mask_probs is not None else [])
        return sum(int(x.numel() * x.element_size()) for x in tensors)


@dataclass(eq=False)
class FrameResult:
    index: int
    time_s: float
    pts: int | None  # the frame's timestamp in the clip (Clip.frame_at finds it again)
    array: np.ndarray  # the decoded frame; dropped with the result
    detections: Detections  # at the thresholds the clip was run with: what an image of this frame gets
    candidates: FrameCandidates | None


def candidate_floor(t: Thresholds) -> float:
    return min([CANDIDATE_FLOOR, t.score_thresh, *dict(t.class_thresh).values()])


def detect_frames(loaded: LoadedModel, clip: Clip, thresholds: Thresholds, rpn: RpnSettings | None = None,
                  keep_candidates: bool = False, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None,
                  around_run: AroundRun | None = None) -> Iterator[FrameResult]:
    """Run the model on every frame, in order, with ``rpn`` (None: the model's own) as an image gets them; each
    frame's trace is dropped before the next is decoded.

    ``progress(done, total, seconds_left)`` after each frame (total 0 and seconds_left None when the clip
    does not say how many frames it has, or said too few); ``should_stop()`` before each frame: True raises
    ClipCancelled. ``around_run(frame_array)``: a context entered around each frame's run alone and left before
    the frame is yielded (the app's server-wide run slot and memory reservation: another session waits at
    most one frame). VideoError when the clip turns out truncated or undecodable; ImageError (before any
    frame) when its frames are too thin for the model.
    """
    check_input_size(loaded.model, clip.info.height, clip.info.width, clip.label)  # named, before any frame
    total, done, start = clip.info.frames, 0, time.perf_counter()
    floor = candidate_floor(thresholds)
    for frame in clip.frames():
        if should_stop is not None and should_stop():
            raise ClipCancelled(f"{clip.label}: stopped after {done} of {total or '?'} frames")
        with (around_run or _no_context)(frame.array):
            trace = run_trace(loaded, frame.array, thresholds, rpn)
            candidates = FrameCandidates.from_trace(trace, floor) if keep_candidates else None
            detections = trace.detections
            del trace  # its feature maps, the bulk of a frame's memory, go before the run's slot does
        result = FrameResult(frame.index, frame.time_s, frame.pts, frame.array, detections, candidates)
        done += 1
        _report(progress, done, total, start)
        yield result


def _no_context(array: np.ndarray) -> AbstractContextManager:
    return nullcontext()


def _report(progress: Progress | None, done: int, total: int, start: float) -> None:
    """progress(done, total, seconds left at the pace so far); a clip that said too few frames has said 0."""
    if progress is not None:
        left = (time.perf_counter() - start) / done * (total - done) if total >= done else None
        progress(done, total if total >= done else 0, left)


def clip_record(clip: Clip, loaded: LoadedModel, thresholds: Thresholds, frames: list[dict]) -> dict:
    """The clip's prediction JSON (docs/prediction-json.md): ``frames`` are {"index", "time_s", "detections"}."""
    info = clip.info
    return {
        "video": {"file": info.name, "fps": round(info.fps, 6), "frames": len(frames), "width": info.width,
                  "height": info.height},
        "model": {"name": loaded.name, "sha256": loaded.sha256, "precision": loaded.precision},
        "thresholds": thresholds.to_dict(),
        "frames": frames,
    }


def frame_record(result: FrameResult) -> dict:
    return {"index": result.index, "time_s": result.time_s,
            "detections": detection_records(result.detections)}


def predict_clip(loaded: LoadedModel, clip: Clip, thresholds: Thresholds, json_path: str | os.PathLike,
                 video_path: str | os.PathLike, progress: Progress | None = None,
                 should_stop: Callable[[], bool] | None = None, **draw_options) -> dict:
    """Detect on every frame and write the clip's JSON and its annotated MP4 (same frame count and rate).

    The MP4 is written as the frames come, to a temp file that is renamed at the end; on any error
    (a truncated clip found at its end included) neither file is left behind. Returns the JSON record."""
    check_input_size(loaded.model, clip.info.height, clip.info.width, clip.label)  # before the writer starts
    frames: list[dict] = []
    with ClipWriter(video_path, clip.info.rate, clip.info.width, clip.info.height) as out:
        for result in detect_frames(loaded, clip, thresholds, progress=progress, should_stop=should_stop):
            out.write(draw_detections(result.array, result.detections, **draw_options))
            frames.append(frame_record(result))
    record = clip_record(clip, loaded, thresholds, frames)
    try:
        atomic_write_bytes(json_path, json.dumps(record, indent=1).encode())
    except BaseException:
        Path(video_path).unlink(missing_ok=True)
        raise
    return record


def annotate_clip(clip: Clip, detections_of: Callable[[int], Detections], target: str | os.PathLike | BinaryIO,
                  progress: Progress | None = None, **draw_options) -> int:
    """Re-decode ``clip`` and write it with ``detections_of(frame_index)`` drawn on each frame (the app's
    download, at its current thresholds and display settings). Returns the number of frames written."""
    total, start = clip.info.frames, time.perf_counter()
    with ClipWriter(target, clip.info.rate, clip.info.width, clip.info.height) as out:
        for frame in clip.frames():
            out.write(draw_detections(frame.array, detections_of(frame.index), **draw_options))
            _report(progress, out.frames_written, total, start)
        return out.frames_written


__all__ = ["CANDIDATE_FLOOR", "MAX_CANDIDATES_PER_FRAME", "ClipCancelled", "FrameCandidates", "FrameResult",
           "annotate_clip", "candidate_floor", "clip_record", "detect_frames", "frame_record", "predict_clip"]
