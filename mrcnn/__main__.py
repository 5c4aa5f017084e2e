"""`python -m mrcnn ...`: see mrcnn/cli.py."""
import sys

from mrcnn.cli import main

sys.exit(main())
