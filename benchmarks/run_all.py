"""Run the inference benchmarks and print the README table: `.venv/bin/python benchmarks/run_all.py [--json]`.

Same as `python -m mrcnn bench`; kept here so every benchmark lives in benchmarks/.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrcnn.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
