"""The files of a training run folder: config.json, metrics.jsonl, status.json (docs/training.md)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mrcnn.files import atomic_write_bytes


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_status(out: Path, state: str, message: str) -> None:
    write_json(out / "status.json", {"state": state, "message": message})


def read_metrics(path: str | Path) -> list[dict]:
    """Every complete row of a run's metrics.jsonl (none when the file is missing). A line that is not a
    JSON object — the half-written last one of a running or killed trainer — is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after ``step`` (written after the checkpoint a resumed run starts from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())
