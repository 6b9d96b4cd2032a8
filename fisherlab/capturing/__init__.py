"""Capture: per-example layer Jacobians of a mini-batch (MATH.md §2)."""

from .losses import Loss
from .record import Capture, FisherMode, LayerCapture, Storage
from .run import NonFiniteError, capture, default_device

__all__ = ["Capture", "FisherMode", "LayerCapture", "Loss", "NonFiniteError", "Storage", "capture", "default_device"]
