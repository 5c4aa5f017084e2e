"""Mask R-CNN Explorer's package: models, staged inference, data, training and evaluation. No UI code here."""
import numpy as _np

__version__ = "0.1.0"

# numpy advises the kernel to back every array of 4 MB or more with transparent huge pages. Where THP defrag
# is "madvise" (as on this machine), a fresh array then often waits for the kernel to compact memory: a
# trace's 85 MB of full-size masks for 100 detections took 100-300 ms instead of ~15 ms. And a huge page counts
# whole in the resident memory however little of it a mask touches. The cost of ordinary pages, one fault
# per mask row touched, is in docs/trace.md ("Precision").
_multiarray = getattr(getattr(_np, "_core", None), "multiarray", None)
if hasattr(_multiarray, "_set_madvise_hugepage"):
    _multiarray._set_madvise_hugepage(False)
