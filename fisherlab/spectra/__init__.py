"""Spectra of F•, F•KFAC, the KFAC-preconditioned operator and the two-level error operator (MATH.md §7).

* :mod:`~fisherlab.spectra.spectrum` — the result type :class:`Spectrum` (a discrete spectral
  measure: densities, moments, CSV), :class:`SpectrumMethod`, :func:`condition_number`,
  :func:`write_summary_csv`;
* :mod:`~fisherlab.spectra.frontends` — the spectrum of each operator: :func:`fisher_spectrum`,
  :func:`kfac_spectrum`, :func:`preconditioned_spectrum`, :func:`error_spectrum`,
  :func:`operator_spectrum`, :func:`slq`, the bundle :func:`spectra`, :func:`fisher_eigenvectors`.

The operators whose spectra these are live in :mod:`fisherlab.operators` (the derived ones —
:class:`PreconditionedFisher`, :class:`FisherSquareRoot`, :class:`TwoLevelErrorOperator` — in
:mod:`fisherlab.operators.derived`), the Lanczos/SLQ machinery in :mod:`fisherlab.linalg`; both
are re-exported here under their first names.
"""

from ..linalg import SLQ_MEMORY_BYTES, lanczos_extremes, lanczos_tridiagonal, rademacher_probes
from ..operators.derived import FisherSquareRoot, PreconditionedFisher, TwoLevelErrorOperator
from .frontends import (
    DENSE_P_LIMIT,
    GRAM_N_LIMIT,
    error_spectrum,
    fisher_eigenvectors,
    fisher_spectrum,
    kfac_spectrum,
    operator_spectrum,
    preconditioned_spectrum,
    slq,
    spectra,
)
from .spectrum import OPERATOR_LABELS, Spectrum, SpectrumMethod, condition_number, operator_label, write_summary_csv

__all__ = [
    "DENSE_P_LIMIT",
    "GRAM_N_LIMIT",
    "OPERATOR_LABELS",
    "SLQ_MEMORY_BYTES",
    "Spectrum",
    "SpectrumMethod",
    "PreconditionedFisher",
    "TwoLevelErrorOperator",
    "FisherSquareRoot",
    "condition_number",
    "fisher_spectrum",
    "fisher_eigenvectors",
    "kfac_spectrum",
    "preconditioned_spectrum",
    "error_spectrum",
    "operator_spectrum",
    "operator_label",
    "lanczos_extremes",
    "lanczos_tridiagonal",
    "rademacher_probes",
    "slq",
    "spectra",
    "write_summary_csv",
]
