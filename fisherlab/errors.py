"""Errors with one-line messages that say what and where. The CLI prints them without a traceback."""

from __future__ import annotations

__all__ = ["FisherlabError", "UnsupportedLayerError", "NonFiniteError", "StoreError", "DampingError"]


class FisherlabError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for the user."""


class UnsupportedLayerError(FisherlabError, ValueError):
    """A module cannot be part of the Fisher in the way it is configured."""


class NonFiniteError(FisherlabError, ValueError):
    """NaN or Inf in activations, gradients or stored data."""


class StoreError(FisherlabError, ValueError):
    """An HDF5 capture file is missing, not a fisherlab file, newer, incomplete or inconsistent."""


class DampingError(FisherlabError, ValueError):
    """The damping λ must be a finite number > 0."""


class ConfigError(FisherlabError, ValueError):
    """A bad option, argument or configuration value (a name not among the choices, a number out
    of range, a missing required setting, an unreadable config or checkpoint file)."""


__all__ += ["ConfigError"]


class MissingFileError(FisherlabError, FileNotFoundError, ValueError):
    """A file the user named (a checkpoint, a config, a sidecar) does not exist."""


__all__ += ["MissingFileError"]


class MemoryBudgetError(FisherlabError, ValueError):
    """A planned allocation (a capture, a dense matrix) would exceed the memory budget: refused
    before allocating, naming the size and the option to change."""


__all__ += ["MemoryBudgetError"]


class MeasurementWarning(RuntimeWarning):
    """A measurement to read with care: a method worse than the zero step, a gap that breaks its
    family's bound, an inaccurate exact solve. Every such warning is also in the table's notes."""


__all__ += ["MeasurementWarning"]
