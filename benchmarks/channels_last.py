"""Does channels_last help inference in a precision? `python benchmarks/channels_last.py [--precision P] [--model M]`

Times the traced run of one model on one image with contiguous (NCHW) and with channels_last (NHWC) weights, in
one process, runs interleaved so that machine load hits both alike; prints the medians and their ratio.
mrcnn.inference.precision.prepare_model gives reduced precisions channels_last; float32 stays as loaded (exact).

    --model r50 (default): maskrcnn_resnet50_fpn, random weights, an 800×1066 scene
    --model shapes:        the bundled model, a 512×512 scene
    --precision:           float32, bfloat16 or float16 (run even where it is emulated: the figure then says
                           little about a machine with the units)
"""
import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrcnn.bench import _loaded, _scene  # noqa: E402
from mrcnn.data.shapes import generate_scene  # noqa: E402
from mrcnn.inference.precision import prepare_model  # noqa: E402
from mrcnn.inference.structures import Thresholds  # noqa: E402
from mrcnn.inference.trace import run_trace  # noqa: E402
from mrcnn.model.zoo import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--model", default="r50", choices=["r50", "shapes"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.model == "r50":
        base, image = _loaded({"name": "maskrcnn_resnet50_fpn"}, 91, "r50"), _scene(800, 1066)
    else:
        base, image = load_model("shapes", device="cpu"), generate_scene(11, size=512).image
    models = {}
    for layout in (torch.contiguous_format, torch.channels_last):  # prepare_model's output casts, either layout
        model = prepare_model(copy.deepcopy(base.model), args.precision).to(memory_format=layout)
        models[str(layout).removeprefix("torch.")] = dataclasses.replace(base, model=model, precision=args.precision)
    t = Thresholds(score_thresh=0.05)
    times = {name: [] for name in models}
    for loaded in models.values():
        run_trace(loaded, image, t)  # warm-up
    for _ in range(args.repeats):
        for name, loaded in models.items():
            start = time.perf_counter()
            run_trace(loaded, image, t)
            times[name].append((time.perf_counter() - start) * 1000.0)
    medians = {name: statistics.median(v) for name, v in times.items()}
    print(f"{args.model}, {args.precision}, {torch.get_num_threads()} threads, {args.repeats} runs each:")
    for name, ms in medians.items():
        print(f"  {name:<14} {ms:8.0f} ms  ({', '.join(f'{v:.0f}' for v in times[name])})")
    print(f"  channels_last / contiguous = {medians['channels_last'] / medians['contiguous_format']:.3f}")


if __name__ == "__main__":
    main()
