"""Curvature operators with one protocol (``@``, ``solve``, ``to_dense``, ``to_scipy``, ``shape``).

* :class:`ExactFisher` — F• = F + λI (Woodbury or KFAC-preconditioned CG);
* :class:`BlockDiagonalFisher` — its exact diagonal blocks (3.7);
* :class:`KFAC` — blockdiag(Ã ⊗ G̃) (2.30) or blockdiag(A ⊗ G + λI);
* :class:`TwoLevelKFAC` — the multiplicative coarse correction (3.9)–(3.15);
* :class:`TKO` — the additive correction (4.7), exact or Kronecker (3.18) F_coarse.
"""

from .base import BlockDiagonalOperator, FisherOperator, InverseOperator, check_damping
from .coarse import (
    COARSE_SPACES,
    LEGEND,
    CoarseSpace,
    make_coarse_space,
    orthonormalize,
)
from .exact import BlockDiagonalFisher, ExactFisher, as_jacobian
from .kfac import KFAC, DampingMode, KroneckerBlock, pi_damping
from .twolevel import TKO, CoarseCorrection, TwoLevelKFAC

__all__ = [
    "BlockDiagonalFisher",
    "BlockDiagonalOperator",
    "COARSE_SPACES",
    "CoarseCorrection",
    "CoarseSpace",
    "DampingMode",
    "ExactFisher",
    "FisherOperator",
    "InverseOperator",
    "KFAC",
    "KroneckerBlock",
    "LEGEND",
    "TKO",
    "TwoLevelKFAC",
    "as_jacobian",
    "check_damping",
    "make_coarse_space",
    "orthonormalize",
    "pi_damping",
]
