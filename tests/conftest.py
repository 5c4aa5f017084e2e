"""Shared test set-up: the repo root importable (``mrcnn``, ``ui``, ``tests.helpers``) and torch's threads.

scripts/test.sh runs the suite in one pytest-xdist worker per core (``--dist loadgroup``: test by test, except
that the tests marked ``xdist_group("browser")`` all go to one worker); each worker then takes one thread, or
the workers would fight over the cores. The browser tests' server and browser (tests/browser_app.py) come in
here as session fixtures: the browser tests share one of each.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 2) // workers))

from tests.browser_app import browser, server  # noqa: E402,F401 - session fixtures of the browser tests


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` xdist keeps a group on one worker by adding ``@group`` to each grouped
    test's id. pytest 9.2 silently ignores that (pytest-xdist issue 1386): each worker then started its own
    app server and chromium. Refuse to run rather than spread a group again."""
    if not getattr(config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"pytest-xdist could not group {lost[0]} (and {len(lost) - 1} more) with its "
                                f"xdist_group: pin the pytest in requirements-test.txt")
