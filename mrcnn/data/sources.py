"""Where training and evaluation data come from: a COCO folder, a .zip of one, or a ``shapes:...`` spec.

    open_data("data/shapes")                      # COCO folder: annotations.json + images/
    open_data("upload.zip")                       # the same layout, zipped
    open_data("shapes:500:12345:256")             # generated scenes: N, seed, size (docs/datasets.md)
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from mrcnn.data.coco import load_dataset
from mrcnn.data.shapes import ShapesDataset
from mrcnn.errors import DatasetError

log = logging.getLogger(__name__)
MAX_LOGGED_WARNINGS = 50  # a dataset with thousands of bad annotations should not bury the run's own output


def parse_shapes_spec(spec: str) -> dict:
    """``shapes:N[:seed[:size[:classes]]][:nested=P][:overlap=P]`` -> ShapesDataset kwargs.

    ``nested=P``, ``overlap=P`` (fields anywhere after N) place shapes inside, or across the edge of,
    earlier ones with probability P."""
    usage = "use shapes:N[:seed[:size[:a,b,c]]][:nested=P][:overlap=P]"
    fields = spec.split(":")
    options = [f for f in fields[1:] if "=" in f]
    parts = [f for f in fields if "=" not in f]
    if parts[0] != "shapes" or len(parts) < 2 or len(parts) > 5:
        raise DatasetError(f"bad shapes data spec {spec!r}: {usage}")
    try:
        kwargs: dict[str, Any] = {"num": int(parts[1])}
        if len(parts) > 2 and parts[2]:
            kwargs["seed"] = int(parts[2])
        if len(parts) > 3 and parts[3]:
            kwargs["size"] = int(parts[3])
    except ValueError:
        raise DatasetError(f"bad shapes data spec {spec!r}: N, seed and size are integers") from None
    if len(parts) > 4 and parts[4]:
        kwargs["classes"] = tuple(c.strip() for c in parts[4].split(",") if c.strip())
    for option in options:
        key, _, value = (f.strip() for f in option.partition("="))
        if key not in ("nested", "overlap"):
            raise DatasetError(f"bad shapes data spec {spec!r}: unknown option {key!r}; {usage}")
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise DatasetError(f"bad shapes data spec {spec!r}: {key} is a probability, got {value!r}") from None
    return kwargs


def open_data(spec: str, categories: list[str] | None = None, transforms=None):
    """A dataset from a COCO folder, a .zip or a ``shapes:...`` spec (DatasetError when unusable).
    A COCO dataset's warnings (annotations it skips, and why) and notes go to the ``mrcnn`` logger, one line
    each."""
    spec = str(spec)
    if spec.startswith("shapes:"):
        kwargs = parse_shapes_spec(spec)
        try:
            return ShapesDataset(**kwargs, categories=categories, transforms=transforms)
        except DatasetError as err:  # a value out of range: say which spec it came from
            raise DatasetError(f"shapes data spec {spec!r}: {err}") from None
    ds = load_dataset(spec, categories)
    ds.transforms = transforms
    _log_warnings(spec, ds.report.warnings)
    for note in ds.report.notes:  # how something was read that a person may not expect (EXIF orientation)
        log.warning("%s: %s: %s", spec, note.where, note.message)
    return ds


def _log_warnings(spec: str, issues: list) -> None:
    """One log line per skipped annotation (the CLI prints them), at most MAX_LOGGED_WARNINGS of them."""
    for issue in issues[:MAX_LOGGED_WARNINGS]:
        log.warning("%s: annotations.json: %s: %s", spec, issue.where, issue.message)
    if len(issues) > MAX_LOGGED_WARNINGS:
        log.warning("%s: annotations.json: and %d more like these", spec, len(issues) - MAX_LOGGED_WARNINGS)


def first_items(ds, n: int | None):
    if n is None or n >= len(ds):
        return ds
    sub = torch.utils.data.Subset(ds, range(n))
    sub.categories = ds.categories  # what evaluate needs besides the items
    return sub
