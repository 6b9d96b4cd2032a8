"""Curvature operators with one protocol (``@``, ``solve``, ``to_dense``, ``to_scipy``, ``shape``)
and an algebra (``A @ B``, ``A + B``, ``c * A``, ``A.T``, ``A.inverse()``).

* :class:`ExactFisher` — F• = F + λI (Woodbury or CG);
* :class:`BlockDiagonalFisher` — its exact diagonal blocks (3.7);
* :class:`DiagonalFisher` — its exact diagonal diag(F•);
* :class:`KFAC` — blockdiag(Ã ⊗ G̃) (2.30) or blockdiag(A ⊗ G + λI);
* :class:`TwoLevelKFAC` — the multiplicative coarse correction (3.9)–(3.15);
* :class:`TKO` — the additive correction (4.7), exact or Kronecker (3.18) F_coarse;
* :mod:`~fisherlab.operators.algebra` — Identity, Composition, Sum, Scaled, Adjoint, Inverse,
  BlockDiagonal, Matrix; :class:`CoarseBasis` — R_0 as an m × p operator;
* :mod:`~fisherlab.operators.derived` — PreconditionedFisher, FisherSquareRoot / FisherPower,
  TwoLevelErrorOperator and its symmetric forms, Symmetric.

Which method is which operator, its legend and options: :mod:`fisherlab.methods`.
"""

from ..jacobian import Jacobian
from .algebra import Adjoint, BlockDiagonal, Composition, Identity, Inverse, Matrix, Scaled, Sum, spd_cholesky
from .base import FisherOperator, NotInvertibleError, check_damping
from .coarse import (
    COARSE_SPACES,
    CoarseBasis,
    CoarseContext,
    CoarseSpace,
    make_coarse_space,
    orthonormalize,
)
from .derived import FisherPower, FisherSquareRoot, PreconditionedFisher, Symmetric, TwoLevelErrorOperator
from .diagonal import DiagonalFisher
from .exact import BlockDiagonalFisher, ExactBlock, ExactFisher, cg_preconditioner_rule
from .kfac import KFAC, DampingMode, KroneckerBlock, pi_damping
from .twolevel import GAP_RTOL, TKO, CoarseCorrection, TwoLevelKFAC, coarse_matrix
from .protocol import Protocol
from .foof import FOOF
from .ekfac import EKFAC, EKFACBlock
from .kfac_reduce import KFACReduce
from .unitwise import SubBlockFisher, SubBlockLayer
from .kfoc import KFOC, KroneckerSVD, kronecker_svd
from .kpsvd import KPSVD, KPSVDBlock

as_jacobian = Jacobian.coerce
"""Kept for callers of the first API: use :meth:`fisherlab.jacobian.Jacobian.coerce`."""

BlockDiagonalOperator = BlockDiagonal
InverseOperator = Inverse

__all__ = [
    "EKFAC",
    "EKFACBlock",
    "FOOF",
    "KFACReduce",
    "KFOC",
    "KPSVD",
    "KPSVDBlock",
    "KroneckerSVD",
    "SubBlockFisher",
    "SubBlockLayer",
    "kronecker_svd",
    "Adjoint",
    "BlockDiagonal",
    "BlockDiagonalFisher",
    "BlockDiagonalOperator",
    "COARSE_SPACES",
    "CoarseBasis",
    "CoarseContext",
    "CoarseCorrection",
    "CoarseSpace",
    "Composition",
    "DampingMode",
    "DiagonalFisher",
    "ExactBlock",
    "ExactFisher",
    "FisherOperator",
    "FisherPower",
    "FisherSquareRoot",
    "GAP_RTOL",
    "Identity",
    "Inverse",
    "InverseOperator",
    "KFAC",
    "KroneckerBlock",
    "Matrix",
    "NotInvertibleError",
    "PreconditionedFisher",
    "Protocol",
    "Scaled",
    "Sum",
    "Symmetric",
    "TKO",
    "TwoLevelErrorOperator",
    "TwoLevelKFAC",
    "as_jacobian",
    "cg_preconditioner_rule",
    "check_damping",
    "coarse_matrix",
    "make_coarse_space",
    "orthonormalize",
    "pi_damping",
    "spd_cholesky",
]
