"""The files of a training run folder: config.json, metrics.jsonl, status.json (docs/training.md)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from mrcnn.errors import TrainingError
from mrcnn.files import atomic_write_bytes

# What `train` writes in its --out folder (besides the temp files of its atomic writes)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "status.json", "STOP")
RUN_STATES = ("finished", "cancelled", "failed")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_status(out: Path, state: str, message: str) -> None:
    write_json(out / "status.json", {"state": state, "message": message})


def is_run_status(path: Path) -> bool:
    """Is ``path`` a status.json as write_status writes it (not some other file of that name)?"""
    try:
        status = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8 or not JSON
        return False
    return isinstance(status, dict) and status.get("state") in RUN_STATES and set(status) == {"state", "message"}


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; TrainingError naming the file when it is not one."""
    return json_object(str(path), path.read_bytes)


def json_object(where: str, read: Callable[[], bytes | str]) -> dict:
    """The JSON object in what ``read()`` returns (UTF-8 bytes or text); TrainingError naming ``where``
    (a file, a command-line flag) with what is wrong when it is not one."""
    try:
        data = read()
        obj = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except OSError as err:
        raise TrainingError(f"{where}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise TrainingError(f"{where}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
    except json.JSONDecodeError as err:
        raise TrainingError(f"{where}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise TrainingError(f"{where}: nested too deeply") from None
    if not isinstance(obj, dict):
        raise TrainingError(f"{where}: must be a JSON object {{...}}, got {type(obj).__name__}")
    return obj


def is_number(value: Any) -> bool:
    """A finite int or float (a JSON true/false is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numbered_metrics(path: str | Path) -> list[tuple[int, dict]]:
    """(line number from 1, row) of every complete row of a run's metrics.jsonl (none when the file is
    missing). A line that is not a JSON object in UTF-8 — the half-written last one of a running or killed
    trainer — is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        row = _metrics_row(line)
        if row is not None:
            rows.append((number, row))
    return rows


def read_metrics(path: str | Path) -> list[dict]:
    """Every complete row of a run's metrics.jsonl (numbered_metrics without the line numbers)."""
    return [row for _, row in numbered_metrics(path)]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after ``step`` (written after the checkpoint a resumed run starts from), and the lines that
    are not rows (read_metrics skips them too): the resumed run appends its rows after the ones kept."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_bytes().splitlines():
        row = _metrics_row(line)
        row_step = None if row is None else row.get("step", 0)
        if is_number(row_step) and row_step <= step:
            keep.append(line + b"\n")
    atomic_write_bytes(path, b"".join(keep))


def _metrics_row(line: bytes) -> dict | None:
    try:
        row = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON
        return None
    return row if isinstance(row, dict) else None
