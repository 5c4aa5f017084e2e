"""Shared test set-up: the repo root importable (``mrcnn``, ``ui``, ``tests.helpers``) and torch's threads.

scripts/test.sh runs the suite in one pytest-xdist worker per core (whole files per worker, so a module's
server or model is made once); each worker then takes one thread, or the workers would fight over the cores.
The browser tests' server and browser (tests/browser_app.py) come in here as session fixtures: both browser
test files share one of each.
"""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 2) // workers))

from tests.browser_app import browser, server  # noqa: E402,F401 - session fixtures of the browser tests
