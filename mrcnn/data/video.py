"""Video clips in and out through PyAV (FFmpeg): frames stream through as (H, W, 3) uint8 RGB arrays.

    clip = open_clip("walk.mp4")                     # a path or the file's bytes; checked against the limits
    clip.info.fps, clip.info.frames, clip.info.width, clip.info.height
    for frame in clip.frames():                      # a generator: one decoded frame in memory at a time
        frame.index, frame.time_s, frame.array
    with ClipWriter("out.mp4", clip.info.rate, clip.info.width, clip.info.height) as out:
        out.write(array)                             # H.264 in MP4; the file appears whole at the end, or not at all

Limits (checked on opening, and again while decoding, since a header can lie): length
$MRCNN_MAX_VIDEO_SECONDS (default 60 s), file size $MRCNN_MAX_VIDEO_MB (default 200 MB) and per frame the
image pixel limit ($MRCNN_MAX_PIXELS, mrcnn.data.images). A clip that cannot be decoded, has no video
stream, is over a limit or is truncated raises VideoError with one line that starts with the clip's name.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import av
import numpy as np
from PIL import Image

from mrcnn.data.images import MAX_PIXELS_ENV, max_pixels_from_env
from mrcnn.env_settings import env_number
from mrcnn.errors import VideoError
from mrcnn.files import atomic_writer

DEFAULT_MAX_SECONDS = 60.0
DEFAULT_MAX_MB = 200.0
MAX_SECONDS_ENV = "MRCNN_MAX_VIDEO_SECONDS"
MAX_MB_ENV = "MRCNN_MAX_VIDEO_MB"
# What the uploader and the CLI take as clips; an animated GIF is a clip too (see is_clip).
CLIP_EXTENSIONS = ("mp4", "webm", "mov", "m4v", "mkv", "avi")
FALLBACK_FPS = Fraction(25)  # a stream that states no rate at all

# FFmpeg's own log lines are dropped (PyAV's default, said here so nothing turns it on): any level hooks a
# Python callback that FFmpeg's decoder threads must take the GIL to call, and a threaded decoder freed while
# this thread holds the GIL (a clip's generator collected mid-run) then waits on them forever.
av.logging.set_level(None)

ClipSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


@dataclass(frozen=True)
class VideoLimits:
    max_seconds: float = DEFAULT_MAX_SECONDS
    max_mb: float = DEFAULT_MAX_MB
    max_pixels: int = 40_000_000

    @classmethod
    def from_env(cls) -> "VideoLimits":
        """$MRCNN_MAX_VIDEO_SECONDS, $MRCNN_MAX_VIDEO_MB and $MRCNN_MAX_PIXELS where set, else the defaults."""
        return cls(env_number(MAX_SECONDS_ENV, DEFAULT_MAX_SECONDS, "seconds"),
                   env_number(MAX_MB_ENV, DEFAULT_MAX_MB, "megabytes"), max_pixels_from_env())


@dataclass(frozen=True)
class VideoInfo:
    """What the clip's header says. ``frames`` is the stated (or, when unstated, estimated) count: the
    decoded count is what ``Clip.frames()`` yields."""

    name: str
    rate: Fraction  # frames per second
    frames: int
    width: int
    height: int
    duration_s: float | None

    @property
    def fps(self) -> float:
        return float(self.rate)


@dataclass
class Frame:
    index: int
    time_s: float  # from the first frame
    pts: int | None  # the stream's timestamp: what Clip.frame_at seeks to
    array: np.ndarray  # (H, W, 3) uint8 RGB


def is_clip(name: str, source: str | os.PathLike | bytes | None = None) -> bool:
    """Whether a file goes the video way: a video extension, or a GIF with more than one frame (``source``,
    its path or bytes, given; a single-frame GIF is an image)."""
    ext = Path(name).suffix.lower().lstrip(".")
    if ext in CLIP_EXTENSIONS:
        return True
    if ext != "gif" or source is None:
        return False
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
            return getattr(im, "n_frames", 1) > 1
    except Exception:  # noqa: BLE001 - not a readable GIF: the image path says why
        return False


def open_clip(source: ClipSource, name: str | None = None, limits: VideoLimits | None = None) -> "Clip":
    """Check a clip (size, container, video stream, length, frame size) and return it ready to decode."""
    return Clip(source, name, limits or VideoLimits.from_env())


class Clip:
    """One checked clip; see the module docstring. Decoding reads the source again each time."""

    def __init__(self, source: ClipSource, name: str | None, limits: VideoLimits):
        self.limits = limits
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.data, self.path = bytes(source), None
            self.label = name or "clip"
            size = len(self.data)
        elif isinstance(source, (str, os.PathLike)):
            self.data, self.path = None, Path(source)
            self.label = name or str(source)
            if not self.path.is_file():
                raise VideoError(f"{self.label}: file not found" if not self.path.exists()
                                 else f"{self.label}: not a file")
            size = self.path.stat().st_size
        else:
            raise TypeError(f"open_clip expects a path or bytes, got {type(source).__name__}")
        if size == 0:
            raise VideoError(f"{self.label}: file is empty")
        if size > limits.max_mb * 1e6:
            raise VideoError(f"{self.label}: file is too large ({size / 1e6:.1f} MB; the limit is "
                             f"{limits.max_mb:g} MB, raise it with {MAX_MB_ENV})")
        with self._open() as container:
            self.info = self._read_info(container, name or (self.path.name if self.path else self.label))

    def _open(self):
        try:
            return av.open(io.BytesIO(self.data) if self.data is not None else str(self.path), "r")
        except av.FFmpegError as err:
            raise VideoError(f"{self.label}: {self._unreadable(err)}") from None

    def _unreadable(self, err: Exception) -> str:
        if self.data is not None:
            head = self.data[:12]
        else:
            with self.path.open("rb") as f:
                head = f.read(12)
        if head[4:8] == b"ftyp":  # an MP4/MOV whose index (written last) is missing
            return "file is truncated or damaged (its MP4/MOV index is missing)"
        return f"not a readable video file ({_reason(err)})"

    def _read_info(self, container, name: str) -> VideoInfo:
        if not container.streams.video:
            raise VideoError(f"{self.label}: has no video stream")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        if width < 1 or height < 1:
            raise VideoError(f"{self.label}: video stream has no frame size")
        if width * height > self.limits.max_pixels:
            raise VideoError(f"{self.label}: frames have too many pixels ({width}x{height} = {width * height:,}; "
                             f"the limit is {self.limits.max_pixels:,}, raise it with {MAX_PIXELS_ENV})")
        rate = stream.average_rate or stream.guessed_rate or FALLBACK_FPS
        rate = Fraction(rate).limit_denominator(1001)
        duration = _duration_s(container, stream)
        if duration is not None and duration > self.limits.max_seconds:
            raise VideoError(self._too_long(duration))
        self._frames_stated = int(stream.frames) > 0
        frames = int(stream.frames) or (round(duration * rate) if duration else 0)
        return VideoInfo(name, rate, frames, width, height, duration)

    def _too_long(self, seconds: float) -> str:
        return (f"{self.label}: clip is too long ({seconds:.1f} s; the limit is {self.limits.max_seconds:g} s, "
                f"raise it with {MAX_SECONDS_ENV})")

    def frames(self) -> Iterator[Frame]:
        """Decode every frame in order, one at a time. Raises VideoError when decoding fails, the clip runs
        past the length limit, or it ends before its stated length (a truncated file)."""
        with self._open() as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            first_pts, index, last_time = None, 0, 0.0
            try:
                for av_frame in container.decode(stream):
                    if first_pts is None:
                        first_pts = av_frame.pts
                    time_s = self._time_of(av_frame, first_pts, index)
                    if time_s > self.limits.max_seconds:
                        raise VideoError(self._too_long(time_s))
                    if (av_frame.width, av_frame.height) != (self.info.width, self.info.height):
                        raise VideoError(f"{self.label}: frame {index} is {av_frame.width}x{av_frame.height}, "
                                         f"not {self.info.width}x{self.info.height} like the clip")
                    yield Frame(index, time_s, av_frame.pts, av_frame.to_ndarray(format="rgb24"))
                    index, last_time = index + 1, time_s
            except av.FFmpegError as err:
                raise VideoError(f"{self.label}: file is truncated or corrupt (could not decode frame {index}: "
                                 f"{_reason(err)})") from None
        if index == 0:
            raise VideoError(f"{self.label}: no frame could be decoded (file truncated or corrupt)")
        self._check_complete(index, last_time)

    def _time_of(self, av_frame, first_pts: int | None, index: int) -> float:
        if av_frame.pts is None or first_pts is None or av_frame.time_base is None:
            return round(index / self.info.fps, 6)
        return round(float((av_frame.pts - first_pts) * av_frame.time_base), 6)

    def _check_complete(self, decoded: int, last_time: float) -> None:
        """A file cut short decodes fine up to the cut: compare with the frame count the header states or,
        where it states none (WebM), with its duration (a last frame may be shown a while, not 2 frames)."""
        if self._frames_stated:
            cut = decoded < self.info.frames
        else:
            cut = self.info.duration_s is not None and last_time + 2.0 / self.info.fps < self.info.duration_s
        if cut:
            raise VideoError(f"{self.label}: file is truncated (decoded {decoded} of {self.info.frames} frames)")

    def frame_at(self, index: int, pts: int | None) -> np.ndarray:
        """One frame again (the app's scrubber), found by its timestamp from ``frames()``: seek to the
        keyframe before it and decode forward; by counting from the start where the stream cannot seek."""
        with self._open() as container:
            stream = container.streams.video[0]
            try:
                if pts is not None:
                    try:
                        container.seek(pts, stream=stream, backward=True)
                    except av.FFmpegError:
                        pass  # decoding from the start finds it too
                    else:
                        for av_frame in container.decode(stream):
                            if av_frame.pts is not None and av_frame.pts >= pts:
                                return av_frame.to_ndarray(format="rgb24")
                        container.seek(0, stream=stream)
                for n, av_frame in enumerate(container.decode(stream)):
                    if n == index or (pts is not None and av_frame.pts == pts):
                        return av_frame.to_ndarray(format="rgb24")
            except av.FFmpegError as err:
                raise VideoError(f"{self.label}: could not decode frame {index} ({_reason(err)})") from None
        raise VideoError(f"{self.label}: has no frame {index}")


class ClipWriter:
    """Frames (H, W, 3) uint8 RGB -> an H.264 MP4 at ``rate`` frames per second, as a context manager.

    ``target``: a path (written atomically: a temp file beside it, renamed at the end, removed on any
    error) or a binary file object. Odd widths and heights are padded by one edge pixel (H.264's 4:2:0
    needs even sizes); the frame count and rate are the ones written.
    """

    def __init__(self, target: str | os.PathLike | BinaryIO, rate: Fraction, width: int, height: int):
        self.target, self.rate = target, Fraction(rate)
        self.width, self.height = int(width), int(height)
        self.frames_written = 0

    def __enter__(self) -> "ClipWriter":
        self._file_cm = atomic_writer(self.target) if isinstance(self.target, (str, os.PathLike)) else None
        file = self._file_cm.__enter__() if self._file_cm is not None else self.target
        try:
            self._container = av.open(file, "w", format="mp4")
            self._stream = self._container.add_stream("libx264", rate=self.rate,
                                                      options={"preset": "veryfast", "crf": "23"})
            self._stream.width, self._stream.height = self.width + self.width % 2, self.height + self.height % 2
            self._stream.pix_fmt = "yuv420p"
        except BaseException as err:
            if self._file_cm is not None:
                self._file_cm.__exit__(type(err), err, err.__traceback__)
            raise
        return self

    def write(self, array: np.ndarray) -> None:
        if array.shape != (self.height, self.width, 3) or array.dtype != np.uint8:
            raise ValueError(f"expected a ({self.height}, {self.width}, 3) uint8 frame, got {array.dtype} "
                             f"{array.shape}")
        padded = np.pad(array, ((0, self.height % 2), (0, self.width % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(padded), format="rgb24")
        frame.pts = self.frames_written
        frame.time_base = 1 / self.rate
        self._container.mux(self._stream.encode(frame))
        self.frames_written += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._container.mux(self._stream.encode())  # flush the encoder's delayed frames
            self._container.close()
        except BaseException as err:
            if self._file_cm is not None:
                self._file_cm.__exit__(type(err), err, err.__traceback__)  # removes the temp file
            if exc_type is None:
                raise
        else:
            if self._file_cm is not None:
                self._file_cm.__exit__(exc_type, exc, tb)  # renames it into place, or removes it
        return False


def _duration_s(container, stream) -> float | None:
    """The video stream's length; the container's when the stream states none and is the only stream."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err).strip()
    return text or type(err).__name__


__all__ = ["CLIP_EXTENSIONS", "Clip", "ClipWriter", "Frame", "VideoInfo", "VideoLimits", "is_clip", "open_clip"]
