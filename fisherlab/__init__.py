"""fisherlab: how close are KFAC, block-diagonal and two-level KFAC to the exact natural gradient?

Stage 1 (capture): :func:`capture` records per-example layer Jacobians of a mini-batch;
:func:`save` / :func:`load` keep them in HDF5. Stage 2 (offline analysis): operators for the
exact regularized Fisher, its block diagonal, KFAC and two-level KFAC, and their comparison.

Documentation in the repository: ``docs/MATH.md`` (the conventions; every "MATH.md §n" in the
docstrings means that file), ``docs/CLI.md`` (the command line), ``docs/PROTOCOL.md`` (the
released code's departures from the paper). Equation numbers such as (2.30) or (4.6) are those
of Koroko, Anciaux-Sedrakian, Ben Gharbia, Garès, Haddou and Tran, "Analysis and Comparison of
Two-Level KFAC Methods for Training Deep Neural Networks", arXiv:2303.18083 (2023).
"""

import os as _os

# Transparent huge pages for torch's CPU allocator (blocks ≥ 2 MiB). Where the kernel's THP mode is
# "madvise", each fresh block is otherwise faulted in 4 KiB pages, and the analysis allocates
# gigabytes of fresh products: measured (ResNet-18, B = 128, warm `compare`, 2 threads)
# 63.8 → 53.6 s. Torch reads the variable at its first large CPU allocation, so this also holds
# when torch was imported first (not once it has allocated a block ≥ 2 MiB). Never over the
# user's own setting: THP_MEM_ALLOC_ENABLE=0 opts out.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from ._version import __version__
from .capturing import (
    Capture,
    FisherMode,
    LayerCapture,
    Loss,
    NonFiniteError,
    Storage,
    capture,
)
from .layout import LayerKind, LayerSpec, Layout, UnsupportedLayerError
from . import methods
from .damping import Damping, DampingScale
from .metrics import METHODS, ComparisonTable, compare, compare_file
from .operators import KFAC, TKO, BlockDiagonalFisher, DiagonalFisher, ExactFisher, Protocol, TwoLevelKFAC
from .store import load, save

__all__ = [
    "BlockDiagonalFisher",
    "ComparisonTable",
    "Damping",
    "DampingScale",
    "DiagonalFisher",
    "ExactFisher",
    "KFAC",
    "METHODS",
    "Protocol",
    "TKO",
    "TwoLevelKFAC",
    "compare",
    "compare_file",
    "Capture",
    "FisherMode",
    "LayerCapture",
    "LayerKind",
    "LayerSpec",
    "Layout",
    "Loss",
    "NonFiniteError",
    "Storage",
    "UnsupportedLayerError",
    "__version__",
    "capture",
    "load",
    "methods",
    "save",
]
