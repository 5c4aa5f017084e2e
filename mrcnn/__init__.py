"""Mask R-CNN Explorer's package: models, staged inference, data, training and evaluation. No UI code here."""
import numpy as _np

__version__ = "0.1.0"

# numpy advises the kernel to back every array of 4 MB or more with transparent huge pages. Where THP defrag
# is "madvise" (Debian's default, and this machine's), each fresh array then waits for the kernel to compact
# memory: a trace's 85 MB of full-size masks for 100 detections took 180-300 ms to allocate instead of ~10 ms,
# on most runs and most re-filters. Ordinary pages cost nothing measurable here.
_set_huge_pages = getattr(getattr(_np, "_core", None), "multiarray", None)
if hasattr(_set_huge_pages, "_set_madvise_hugepage"):
    _set_huge_pages._set_madvise_hugepage(False)
