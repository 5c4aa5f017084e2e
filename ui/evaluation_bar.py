"""The progress bar of an evaluation a page runs (Evaluate, Fine-tune's before vs after), and the server's
run slots its network runs take.

``run_slot`` is what ``mrcnn.evaluation.evaluate`` enters around each round of network runs (one batch per
worker, side by side, in the page's own thread): one of the server's run slots and room in its memory budget
for the round's images (``TraceCache.round_slots``: a ``network_run`` each, as Detect's runs take), so
another session's run waits one round, not a whole evaluation. While a round waits, the bar says so
(``state.network_slot``'s spinner would land below whatever the page drew last).
"""
from __future__ import annotations

from contextlib import contextmanager

import streamlit as st

from ui import state

IMAGES_PER_BATCH = 1  # a round is then one image per worker: another session waits one image's time


class EvaluationBar:
    def __init__(self, first: str):
        self.bar = st.progress(0.0, text=first)
        self.loaded, self.label, self.fraction = None, "", 0.0

    def model(self, loaded, label: str) -> "EvaluationBar":
        """The model evaluated from now on, and the bar's text before "3/50" ("Evaluating image")."""
        self.loaded, self.label, self.fraction = loaded, label, 0.0
        self._slots = state.trace_cache().round_slots(loaded, waiting=self._waiting)
        return self

    def images(self, done: int, total: int) -> None:
        self.fraction = done / max(total, 1)
        self.bar.progress(self.fraction, text=f"{self.label} {done}/{total}")

    def run_slot(self, image_shape: tuple[int, ...], images: int = 1):
        return self._slots(image_shape, images)

    @contextmanager
    def _waiting(self):
        self.bar.progress(self.fraction, text=f"Waiting for another session's model run to finish before running "
                                              f"{state.literal(self.loaded.name)}…")
        yield

    def empty(self) -> None:
        self.bar.empty()
