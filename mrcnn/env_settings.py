"""Limits a server takes from environment variables, each read by one parser that names the variable when
its value cannot be used (the app shows that line instead of its pages; the CLI prints it and exits 2).

    limit = env_number("MRCNN_MAX_PIXELS", 40_000_000, "pixels", whole=True)   # SettingError for "lots", "0"
"""
from __future__ import annotations

import math
import os

from mrcnn.errors import SettingError


def env_number(name: str, default: float, unit: str, *, whole: bool = False, zero: bool = False) -> float:
    """``$name`` as a number of ``unit`` (``whole``: an integer), above 0 (``zero``: 0 or more); ``default``
    when it is unset or blank. SettingError naming the variable for anything else (text, NaN, infinity)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
        kind = "whole number" if whole else "number"
        bound = "0 or more" if zero else "1 or more" if whole else "above 0"
        raise SettingError(f"{name} must be a {kind} of {unit} ({bound}), got {raw!r}")
    return value


__all__ = ["env_number"]
