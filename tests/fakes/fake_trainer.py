"""Stands in for `python -m mrcnn train` in job tests: logs steps, honours STOP/SIGTERM, can crash.

usage: fake_trainer.py --steps N [--crash-at K] [--step-s S] [--startup-s S] [--val-every K] --out RUN_DIR

--val-every: rows with validation metrics ("val": loss terms and AP) every K steps and at the last step.

--startup-s: seconds before the SIGTERM handler is installed, as the real trainer spends importing
torch (a SIGTERM then ends the process with the default action, exit -15).
"""
import argparse
import json
import signal
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(allow_abbrev=False)  # the real "--val DIR" is not "--val-every"
parser.add_argument("--steps", type=int)
parser.add_argument("--crash-at", type=int, default=-1)
parser.add_argument("--step-s", type=float, default=0.05)
parser.add_argument("--startup-s", type=float, default=0.0)
parser.add_argument("--val-every", type=int, default=0)
parser.add_argument("--out")
args, _ = parser.parse_known_args()  # the real trainer's other options are accepted and ignored
out = Path(args.out)
time.sleep(args.startup_s)
stop = {"flag": False}
signal.signal(signal.SIGTERM, lambda *a: stop.update(flag=True))


def status(state, message=""):
    (out / "status.json").write_text(json.dumps({"state": state, "message": message}))


with open(out / "metrics.jsonl", "a") as f:
    for step in range(1, args.steps + 1):
        if step == args.crash_at:
            print("Traceback: RuntimeError: simulated crash in the trainer", file=sys.stderr)
            sys.exit(1)
        if not out.is_dir():  # as the real trainer: one line, no traceback
            print(f"error: the run folder {out} was deleted during step {step}", file=sys.stderr)
            sys.exit(2)
        if stop["flag"] or (out / "STOP").exists():
            (out / "checkpoint.pt").write_text("saved")
            status("cancelled", f"cancelled at step {step - 1}")
            sys.exit(0)
        time.sleep(args.step_s)
        row = {"step": step, "loss": 1.0 / step}
        if step == args.steps or (args.val_every and step % args.val_every == 0):
            row["val"] = {"loss": 1.0 + step / 100, "loss_classifier": 0.5, "bbox_AP": step / (step + 1),
                          "segm_AP": step / (step + 2)}
        f.write(json.dumps(row) + "\n")
        f.flush()
(out / "checkpoint.pt").write_text("saved")
status("finished")
