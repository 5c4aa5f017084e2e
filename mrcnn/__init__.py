"""Mask R-CNN Explorer's package: models, staged inference, data, training and evaluation. No UI code here."""

__version__ = "0.1.0"
