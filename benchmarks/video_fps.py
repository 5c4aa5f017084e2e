"""Clips: frames per second of the bundled model end to end, and what the app keeps per frame.

    python benchmarks/video_fps.py                    # 640x480, 12 frames, 3 runs: the median fps
    python benchmarks/video_fps.py --json --frames 24 --runs 5
    python benchmarks/video_fps.py --memory           # also: KB kept per 1280x720 frame -> a 60 s 30 fps clip

End to end is `python -m mrcnn predict clip.mp4` without the process start: decode (PyAV), detect
(run_trace, default thresholds), draw, encode (H.264) and the JSON, on a clip of shapes scenes
(weights/shapes.pt, "shapes") made here. The memory figure is the app's: the per-frame candidates
(mrcnn.inference.video.FrameCandidates) at the default thresholds, averaged over a few 720p frames.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mrcnn.data.shapes import generate_scene  # noqa: E402
from mrcnn.data.video import ClipWriter, open_clip  # noqa: E402
from mrcnn.inference.structures import Thresholds  # noqa: E402
from mrcnn.inference.video import detect_frames, predict_clip  # noqa: E402
from mrcnn.model.zoo import load_model  # noqa: E402

FPS = 30


def make_clip(path: Path, frames: int, width: int, height: int) -> Path:
    """Shapes scenes (a new one each frame), cropped to width x height."""
    with ClipWriter(path, Fraction(FPS), width, height) as out:
        for seed in range(frames):
            out.write(generate_scene(seed, size=max(width, height)).image[:height, :width].copy())
    return path


def fps_end_to_end(loaded, clip_path: Path, out_dir: Path, runs: int) -> list[float]:
    rates = []
    for run in range(runs):
        start = time.perf_counter()
        record = predict_clip(loaded, open_clip(clip_path), Thresholds(), out_dir / f"{run}.json",
                              out_dir / f"{run}.mp4")
        rates.append(len(record["frames"]) / (time.perf_counter() - start))
    return rates


def kept_per_frame(loaded, clip_path: Path) -> float:
    kept = [r.candidates.nbytes for r in detect_frames(loaded, open_clip(clip_path), Thresholds(),
                                                       keep_candidates=True)]
    return statistics.mean(kept)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="also measure what the app keeps per 720p frame")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    loaded = load_model("shapes", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip = make_clip(tmp / "clip-640x480.mp4", args.frames, 640, 480)
        rates = fps_end_to_end(loaded, clip, tmp, args.runs)
        row = {"model": loaded.name, "size": "640x480", "frames": args.frames, "runs": args.runs,
               "median_fps": round(statistics.median(rates), 2), "fps": [round(r, 2) for r in rates],
               "torch_threads": torch.get_num_threads()}
        if args.memory:
            per_frame = kept_per_frame(loaded, make_clip(tmp / "clip-720p.mp4", 5, 1280, 720))
            row["kept_kb_per_720p_frame"] = round(per_frame / 1e3, 1)
            row["kept_mb_60s_30fps_720p"] = round(per_frame * 60 * FPS / 1e6, 1)
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{row['model']} at 640x480, end to end (decode, detect, draw, encode): median "
              f"{row['median_fps']} frames/s over {args.runs} runs of {args.frames} frames "
              f"({', '.join(map(str, row['fps']))}; {row['torch_threads']} torch threads)")
        if args.memory:
            print(f"kept per 1280x720 frame: {row['kept_kb_per_720p_frame']} KB -> a 60 s clip at {FPS} fps: "
                  f"{row['kept_mb_60s_30fps_720p']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
