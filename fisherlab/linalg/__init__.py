"""Generic Krylov linear algebra, with no Fisher knowledge (ARCHITECTURE.md ``linalg/``).

* :mod:`~fisherlab.linalg.lanczos` — :func:`lanczos_tridiagonal` (block Lanczos with full
  reorthogonalization on many starting vectors at once), :func:`gauss_quadrature` (nodes and
  weights of a tridiagonal T), :func:`lanczos_extremes` (extreme eigenvalues by ARPACK, standard or
  generalized), :func:`start_vector` (the seeded ARPACK start);
* :mod:`~fisherlab.linalg.slq` — :func:`rademacher_probes` and :func:`slq_quadrature` (the
  stochastic Lanczos quadrature rule of a symmetric product, as nodes and weights).

Everything takes a product callable ``V [p, c] -> A V`` or a
:class:`scipy.sparse.linalg.LinearOperator`; the spectra of fisherlab's operators are built on this
in :mod:`fisherlab.spectra`.
"""

from .lanczos import gauss_quadrature, lanczos_extremes, lanczos_tridiagonal, start_vector
from .slq import SLQ_MEMORY_BYTES, QuadratureRule, rademacher_probes, slq_quadrature

__all__ = [
    "SLQ_MEMORY_BYTES",
    "QuadratureRule",
    "gauss_quadrature",
    "lanczos_extremes",
    "lanczos_tridiagonal",
    "rademacher_probes",
    "slq_quadrature",
    "start_vector",
]
