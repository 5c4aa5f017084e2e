"""Shared test set-up: the repo root importable (``mrcnn``, ``ui``, ``tests.helpers``) and torch on 2 threads."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)
