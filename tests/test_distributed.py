"""DDP through torchrun on the CPU: gloo backend, 2 processes, a tiny model, 2 steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mrcnn.model.checkpoint import load_checkpoint
from tests.helpers import TINY_TRAIN_ARCH

ROOT = Path(__file__).resolve().parent.parent
TINY = TINY_TRAIN_ARCH


def test_torchrun_two_processes_gloo(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mrcnn", "train", "--model", "light", "--arch", json.dumps(TINY), "--data", "shapes:8:0:64",
           "--steps", "2", "--batch-size", "1", "--lr", "0.01", "--warmup-steps", "1", "--log-every", "1",
           "--device", "cpu", "--threads", "1", "--out", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # rank 0 logs, once per step
    assert all(r["images_per_s"] > 0 for r in rows)
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["train_state"]["step"] == 2 and ckpt["meta"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])  # the bare model is saved
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert proc.stderr.count("finished 2 steps") == 1  # rank 0 alone reports
