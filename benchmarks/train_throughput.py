"""Training throughput (images/s) of the real engine (mrcnn.training.engine) at the bundled model's recipe.

    python benchmarks/train_throughput.py                      # CPU, recipe settings (256-352 px, batch 8)
    python benchmarks/train_throughput.py --device cuda        # GPU: AMP + channels_last (the engine's defaults)
    python benchmarks/train_throughput.py --compare-layout     # channels_last vs contiguous, same process
    python benchmarks/train_throughput.py --compare-precision  # mixed precision (bf16 on a CPU) vs float32
    python benchmarks/train_throughput.py --json --steps 6 --warmup 2

Runs ``warmup + steps`` optimizer steps on generated scenes (data generation included, as in a real
run) and reports the images/s of the measured steps only, from the run's metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mrcnn.data.sources import parse_shapes_spec  # noqa: E402
from mrcnn.training.config import TrainConfig  # noqa: E402
from mrcnn.training.engine import train  # noqa: E402
from mrcnn.model.zoo import read_card, resolve_device, weights_dir  # noqa: E402


def bundled_recipe() -> dict:
    """The recipe that made the bundled model, as its card records it (weights/train_shapes.sh runs it as
    two 1-thread processes on a CPU; this measures one process, for comparison and for the GPU settings)."""
    card = weights_dir() / "shapes.json"
    recipe = read_card(weights_dir() / "shapes.pt").get("training", {}).get("recipe")
    if not recipe:
        raise SystemExit(f"no training recipe in {card}: run `bash weights/train_shapes.sh` to rebuild the model "
                         "and its card")
    return recipe


def data_spec(recipe: dict, image_size: int | None) -> str:
    """The recipe's training scenes (same generator options), at ``image_size`` when one is given."""
    spec = parse_shapes_spec(recipe["data"])
    options = "".join(f":{name}={spec[name]}" for name in ("nested", "overlap") if spec.get(name))
    return f"shapes:100000:{spec.get('seed', 0)}:{image_size or spec.get('size', 256)}{options}"


def measure(recipe: dict, device: str, steps: int, warmup: int, batch_size: int, image_size: int | None,
            threads: int | None, amp: bool, channels_last: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(model=recipe["model"], arch=recipe["arch"], augment=recipe["augment"],
                          data=data_spec(recipe, image_size),
                          steps=warmup + steps, batch_size=batch_size, lr=0.02, warmup_steps=warmup + steps,
                          log_every=1, image_size=image_size, checkpoint_every=0, device=device, amp=amp,
                          channels_last=channels_last, threads=threads, out=tmp)
        t0 = time.time()
        train(cfg, verbose=False)
        wall = time.time() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        precision = json.loads((Path(tmp) / "config.json").read_text())["precision"]  # what the run used
    measured = rows[warmup:]
    seconds = sum(batch_size / r["images_per_s"] for r in measured)
    dev = resolve_device(device)
    return {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "precision": precision,
            "channels_last": channels_last, "image_size": image_size or "256-352", "batch_size": batch_size,
            "steps_measured": len(measured), "images_per_s": round(batch_size * len(measured) / seconds, 2),
            "s_per_step": round(seconds / len(measured), 3), "wall_s": round(wall, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=None,
                   help="one fixed input size (default: the recipe's multi-scale 256..352)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--compare-layout", action="store_true",
                   help="also measure contiguous (NCHW) weights and report the channels_last speed-up")
    p.add_argument("--compare-precision", action="store_true",
                   help="also measure float32 and report the mixed-precision speed-up")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    base = (not args.no_channels_last, not args.no_amp)  # (channels_last, amp)
    runs = {"base": base}
    if args.compare_layout:
        runs["contiguous"] = (False, base[1])
    if args.compare_precision:
        runs["float32"] = (base[0], False)
    recipe = bundled_recipe()
    results = {name: measure(recipe, args.device, args.steps, args.warmup, args.batch_size, args.image_size,
                             args.threads, amp, channels_last=cl) for name, (cl, amp) in runs.items()}
    for result in results.values():
        if args.json:
            print(json.dumps(result))
            continue
        print(f"| {result['device_name']} | {result['threads']} threads | {result['precision']} "
              f"| {'channels_last' if result['channels_last'] else 'contiguous'} | {result['image_size']} px "
              f"| batch {result['batch_size']} | {result['images_per_s']} images/s | {result['s_per_step']} s/step |")
    speedups = {f"speedup_over_{name}": round(results["base"]["images_per_s"] / r["images_per_s"], 3)
                for name, r in results.items() if name != "base"}
    for key, ratio in speedups.items():
        print(json.dumps({key: ratio}) if args.json else f"{key.replace('_', ' ')}: {ratio}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
