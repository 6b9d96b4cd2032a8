"""Spectra of F•, F•KFAC, the KFAC-preconditioned operator and the two-level error operator (MATH.md §7).

Four operators, each ``[p, p]``:

* **F• = F + λI** (2.17). ``F = UUᵀ`` and ``K = UᵀU`` (``[N, N]``) share their nonzero
  eigenvalues, so the whole spectrum is exact from the Gram: ``eig(K) + λ`` and ``p − N``
  eigenvalues equal to λ (when N < p). The eigenvector of F for ``Ku = μu`` is ``Uu/√μ``.
* **F•KFAC** = blockdiag(Ã_i ⊗ G̃_i) (2.28)–(2.30): its eigenvalues are products of the damped
  factor eigenvalues (or ``s_G s_Aᵀ + λ`` for Tikhonov damping), exact from
  :meth:`fisherlab.operators.KFAC.eigenvalues`.
* **The KFAC-preconditioned operator** ``S = F•KFAC^{-1/2} F• F•KFAC^{-1/2}`` (symmetric, with the
  eigenvalues of F•KFAC⁻¹F•): dense for tiny nets, Lanczos extremes or SLQ otherwise.
* **The two-level error operator** ``E = (I − Π)(I − F•KFAC⁻¹F•)``, ``Π = R_0ᵀF_coarse⁻¹R_0F•``
  (3.16). E is not symmetric, but its spectrum is real: ``P = I − Π`` is an F•-orthogonal
  projection and ``M = I − F•KFAC⁻¹F•`` is F•-self-adjoint, and ``eig(PM) = eig(MP) = eig(PMP)``
  (``P² = P``) with multiplicities; ``PMP`` is F•-self-adjoint, so
  ``(F•PMP) x = μ F• x`` is a symmetric-definite generalized eigenproblem (``F•PMP =
  Pᵀ(F• − F•F•KFAC⁻¹F•)P``). Dense for tiny nets (``scipy.linalg.eigh(A, F•)``), Lanczos extremes
  through ``scipy.sparse.linalg.eigsh(A, M=F•, Minv=F•⁻¹)`` otherwise. E has at least m zero
  eigenvalues (one per coarse direction); its spectral radius governs the two-level iteration.

Methods (:class:`SpectrumMethod`): ``exact`` (closed forms above), ``dense`` (``eigvalsh`` of the
dense matrix; p ≤ :data:`DENSE_P_LIMIT`), ``lanczos`` (extreme eigenvalues by ARPACK) and ``slq``
(stochastic Lanczos quadrature: a spectral density from Rademacher probes). Every result is a
:class:`Spectrum`: a discrete spectral measure ``Σ_j w_j δ(x − x_j)`` normalised by p (exact and
dense: each eigenvalue weighs 1/p; SLQ: Gauss-quadrature weights averaged over probes; Lanczos:
the few extreme Ritz values, 1/p each).

Nothing here forms a p × p matrix outside the ``dense`` method. The operators are in
:mod:`fisherlab.operators` (the derived ones in :mod:`fisherlab.operators.derived`), the Krylov
methods in :mod:`fisherlab.linalg`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from ..capturing.record import Capture
from .._system import available_memory
from ..errors import FisherlabError
from ..jacobian import ROWS_MEMORY_SHARE, Jacobian
from ..planning import plan_spectra
from ..linalg import SLQ_MEMORY_BYTES, lanczos_extremes, slq_quadrature, start_vector
from ..operators import KFAC, ExactFisher, FisherOperator, TwoLevelKFAC, check_damping
from ..operators.derived import PreconditionedFisher, TwoLevelErrorOperator
from .spectrum import Spectrum, condition_number, parse_method

__all__ = [
    "DENSE_P_LIMIT",
    "GRAM_N_LIMIT",
    "error_spectrum",
    "fisher_eigenvectors",
    "fisher_spectrum",
    "kfac_spectrum",
    "operator_spectrum",
    "preconditioned_spectrum",
    "slq",
    "spectra",
]

DENSE_P_LIMIT = 3000
"""``method="auto"`` uses dense eigenvalue routines up to this p (the error and preconditioned operators)."""

GRAM_N_LIMIT = 8192
"""``method="auto"`` takes F•'s exact spectrum from the N × N Gram up to this N, Lanczos beyond."""


def slq(
    op: FisherOperator,
    *,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
    operator: str | None = None,
    damping: float = float("nan"),
    memory_bytes: int = SLQ_MEMORY_BYTES,
) -> Spectrum:
    """Stochastic Lanczos quadrature density of a symmetric operator
    (:func:`fisherlab.linalg.slq_quadrature` on ``op.apply``).

    For each Rademacher probe z (``[p]``, seeded) and ``q = z/√p``, m Lanczos steps with full
    reorthogonalization give ``T_m = S diag(θ) Sᵀ``; the Gauss rule ``Σ_j S_{0j}² f(θ_j)``
    approximates ``qᵀf(A)q`` (exactly for polynomials of degree ≤ 2m − 1), whose expectation
    is ``tr f(A)/p``. The measure averages these rules over the probes (weights sum to 1).

    Args:
        op: a symmetric :class:`FisherOperator` (``apply`` on ``[p, c]``).
        n_probes: number of probes.
        n_steps: m, Lanczos steps per probe (capped at p).
        seed: seeds the probes (:func:`~fisherlab.linalg.rademacher_probes`).
        operator, damping: recorded in the result (default ``op.name``).
        memory_bytes: the Lanczos bases ``[c, m, p]`` of c probes run together stay under this.

    Returns:
        A :class:`Spectrum` with method ``"slq"``; ``condition_number`` from the extreme Ritz values.
    """
    if not op.symmetric:
        raise ValueError(f"slq needs a symmetric operator; '{op.name}' is not (use the dense or lanczos method)")
    rule = slq_quadrature(op.apply, op.p, n_probes=n_probes, n_steps=n_steps, seed=seed, dtype=op.dtype, memory_bytes=memory_bytes)
    return Spectrum(operator or op.name, "slq", rule.nodes, rule.weights, damping, op.p, condition_number(rule.nodes), info=rule.info)


def _exact_operator(source: Capture | Jacobian | ExactFisher, damping: float | None) -> ExactFisher:
    if isinstance(source, ExactFisher):
        if damping is not None and abs(check_damping(damping) - source.damping) > 1e-15 * source.damping:
            raise ValueError(f"damping {damping:g} differs from the operator's λ = {source.damping:g}")
        return source
    if damping is None:
        raise ValueError("damping is required unless an operator is given")
    return ExactFisher(Jacobian.coerce(source), damping)


def _kfac_operator(source: Capture | Jacobian | KFAC, damping: float | None, damping_mode: str) -> KFAC:
    if isinstance(source, KFAC):
        if damping is not None and abs(check_damping(damping) - source.damping) > 1e-15 * source.damping:
            raise ValueError(f"damping {damping:g} differs from the operator's λ = {source.damping:g}")
        return source
    if damping is None:
        raise ValueError("damping is required unless an operator is given")
    return KFAC.from_capture(source, damping, damping_mode)


def _uniform(values: np.ndarray, p: int) -> np.ndarray:
    return np.full(values.shape, 1.0 / p)


def operator_spectrum(
    op: FisherOperator,
    method: str = "dense",
    *,
    k: int = 6,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
    operator: str | None = None,
    damping: float = float("nan"),
    memory_bytes: int = SLQ_MEMORY_BYTES,
) -> Spectrum:
    """Spectrum of a symmetric :class:`FisherOperator` by ``"dense"``, ``"lanczos"`` or ``"slq"``.

    Args:
        op: the operator ``[p, p]`` (``to_dense`` for dense, ``to_scipy`` for Lanczos).
        method: ``"dense"`` (all p eigenvalues; p ≤ a few thousand), ``"lanczos"`` (k per end),
            ``"slq"`` (density).
        k: eigenvalues per end for Lanczos.
        n_probes, n_steps, seed: SLQ parameters (see :func:`slq`).
        operator, damping: recorded in the result.
    """
    name = operator or op.name
    method = parse_method(method)
    if method == "dense":
        D = op.to_dense().double()
        vals = torch.linalg.eigvalsh((D + D.T) / 2).numpy()
        return Spectrum(name, "dense", vals, _uniform(vals, op.p), damping, op.p, condition_number(vals))
    if method == "lanczos":
        vals, info = lanczos_extremes(op.to_scipy(), k, seed=seed)
        return Spectrum(name, "lanczos", vals, _uniform(vals, op.p), damping, op.p, condition_number(vals), info=dict(info, k=k))
    if method == "slq":
        return slq(op, n_probes=n_probes, n_steps=n_steps, seed=seed, operator=name, damping=damping, memory_bytes=memory_bytes)
    raise ValueError(f"operator_spectrum: method must be 'dense', 'lanczos' or 'slq', got {method!r}")


def fisher_eigenvectors(jac: Jacobian, k: int, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The k largest eigenpairs of F = UUᵀ from the Gram: ``Ku = μu`` ⇒ ``F(Uu/√μ) = μ(Uu/√μ)``.

    Returns:
        ``(μ [k] descending, vectors [p, k])`` with unit-norm columns (eigenvalues of F, no λ).
    """
    mu, W = torch.linalg.eigh(jac.gram.to(dtype))
    k = min(k, int((mu > 0).sum()))
    mu, W = mu.flip(0)[:k], W.flip(1)[:, :k]
    return mu, jac.matmat(W) / mu.sqrt()


def fisher_spectrum(
    source: Capture | Jacobian | ExactFisher,
    damping: float | None = None,
    *,
    method: str = "auto",
    n_vectors: int = 0,
    k: int = 6,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
    memory_bytes: int = SLQ_MEMORY_BYTES,
) -> Spectrum:
    """Spectrum of F• = F + λI (2.17).

    ``exact`` (the default up to N = :data:`GRAM_N_LIMIT`): ``eig(UᵀU) + λ`` from the
    N × N Gram and ``p − N`` eigenvalues λ (stored once, weight ``(p − N)/p``); the N × N
    eigendecomposition is the only cubic step. ``dense``/``lanczos``/``slq`` through the
    operator (:func:`operator_spectrum`).

    Args:
        source: a :class:`Capture`, :class:`Jacobian` (its cached Grams are reused) or
            :class:`ExactFisher`.
        damping: λ > 0 (taken from the operator when one is given).
        method: ``"auto"``, ``"exact"``, ``"dense"``, ``"lanczos"`` or ``"slq"``.
        n_vectors: with ``exact``, also return the top eigenvectors ``Uu/√μ`` ``[p, n_vectors]``.
        k, n_probes, n_steps, seed: Lanczos and SLQ parameters.

    Returns:
        A :class:`Spectrum` with operator ``"fisher"``; ``condition_number = (μ_max + λ)/(μ_min + λ)``.
    """
    F = _exact_operator(source, damping)
    lam, jac = F.damping, F.jac
    if method == "auto":
        method = "exact" if jac.N <= GRAM_N_LIMIT else "lanczos"
    p, N = jac.p, jac.N
    if method == "lanczos" and N < p:
        # the smallest eigenvalue is λ, (p − N)-fold: a degenerate end that ARPACK resolves
        # slowly, known exactly; Lanczos runs for the largest end only
        vals, linfo = lanczos_extremes(F.to_scipy(), k, which="largest", seed=seed)
        values = np.concatenate([[lam], vals])
        weights = np.concatenate([[(p - N) / p], np.full(vals.shape, 1.0 / p)])
        return Spectrum("fisher", "lanczos", values, weights, lam, p, condition_number(values), info=dict(linfo, k=k, N=N))
    if method != "exact":
        return operator_spectrum(F, method, k=k, n_probes=n_probes, n_steps=n_steps, seed=seed, operator="fisher", damping=lam,
                                 memory_bytes=memory_bytes)
    mu = torch.linalg.eigvalsh(jac.gram).clamp_min(0).numpy()
    r = min(N, p)
    top = mu[N - r :] + lam
    if p > r:
        values = np.concatenate([[lam], top])
        weights = np.concatenate([[(p - r) / p], np.full(r, 1.0 / p)])
    else:
        values, weights = top, np.full(r, 1.0 / p)
    vecs = fisher_eigenvectors(jac, n_vectors)[1] if n_vectors > 0 else None
    info = {"N": N, "rank_bound": r}
    return Spectrum("fisher", "exact", values, weights, lam, p, condition_number(values), vecs, info)


def kfac_spectrum(
    source: Capture | Jacobian | KFAC,
    damping: float | None = None,
    damping_mode: str = "pi",
    *,
    method: str = "exact",
    **kw,
) -> Spectrum:
    """Spectrum of F•KFAC (2.28)–(2.30): per layer, the products ``(s_G + √λ/π)(s_A + π√λ)``
    of the damped factor eigenvalues (``s_G s_A + λ`` with Tikhonov damping), exact.

    Args:
        source: a :class:`Capture`, :class:`Jacobian` or ready :class:`KFAC`.
        damping: λ > 0 (taken from the operator when one is given).
        damping_mode: ``"pi"`` or ``"tikhonov"`` (ignored for a ready operator).
        method: ``"exact"`` (default) or ``"dense"``/``"lanczos"``/``"slq"`` through the operator.
        **kw: Lanczos/SLQ parameters of :func:`operator_spectrum`.

    Returns:
        A :class:`Spectrum` with operator ``"kfac"`` or ``"kfac-tikhonov"`` (p values, 1/p each).
    """
    K = _kfac_operator(source, damping, damping_mode)
    if method != "exact":
        return operator_spectrum(K, method, operator=K.name, damping=K.damping, **kw)
    vals = K.eigenvalues().double().numpy()
    return Spectrum(K.name, "exact", vals, _uniform(vals, K.p), K.damping, K.p, condition_number(vals), info={"pi_mean": float(np.mean(K.pi))})


def preconditioned_spectrum(
    source: Capture | Jacobian | None = None,
    damping: float | None = None,
    *,
    kfac: KFAC | None = None,
    exact: ExactFisher | None = None,
    damping_mode: str = "pi",
    method: str = "auto",
    rows_free: int | None = None,
    **kw,
) -> Spectrum:
    """Spectrum of ``F•KFAC^{-1/2} F• F•KFAC^{-1/2}`` (= eig(F•KFAC⁻¹F•)), the KFAC-preconditioned F•.

    Args:
        source, damping: the capture (or Jacobian) and λ, unless ``kfac`` and ``exact`` are given.
        kfac, exact: ready operators to reuse (they must share λ).
        damping_mode: KFAC damping when ``kfac`` is built here.
        method: ``"auto"`` (dense for p ≤ :data:`DENSE_P_LIMIT`, else SLQ: ARPACK on the small
            end of this wide spectrum converges only after minutes),
            ``"dense"``, ``"lanczos"`` or ``"slq"``.
        rows_free: bytes of which the rotated Jacobian may hold dense rows for its products
            (:class:`PreconditionedFisher`; ``None``: none).
        **kw: ``k``, ``n_probes``, ``n_steps``, ``seed``.
    """
    if kfac is None:
        if source is None:
            raise ValueError("preconditioned_spectrum: give a source or a KFAC operator")
        kfac = _kfac_operator(Jacobian.coerce(source) if exact is None else exact.jac, damping, damping_mode)
    if exact is None:  # a KFAC operator is independent of any Jacobian: F• comes from the source
        if source is None:
            raise ValueError("preconditioned_spectrum: give a source, or the exact operator with the KFAC operator")
        exact = ExactFisher(Jacobian.coerce(source), kfac.damping)
    if abs(exact.damping - kfac.damping) > 1e-15 * kfac.damping:
        raise ValueError(f"KFAC has λ = {kfac.damping:g}, F• has λ = {exact.damping:g}")
    S = PreconditionedFisher(kfac, exact, rows_free=rows_free)
    if method == "auto":  # ARPACK on the small end of this wide, dense spectrum takes minutes: SLQ
        method = "dense" if S.p <= DENSE_P_LIMIT else "slq"
    out = operator_spectrum(S, method, operator="preconditioned", damping=kfac.damping, **kw)
    out.info["kfac"] = kfac.name
    return out


def error_spectrum(
    two_level: TwoLevelKFAC,
    *,
    method: str = "auto",
    k: int = 6,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
    tol: float = 1e-10,
    memory_bytes: int = SLQ_MEMORY_BYTES,
) -> Spectrum:
    """Spectrum of the two-level error operator ``E = (I − Π)(I − F•KFAC⁻¹F•)`` (3.16).

    Real: E has the spectrum of ``PMP``, which is F•-self-adjoint (see the module notes).

    Args:
        two_level: a :class:`TwoLevelKFAC` (its coarse space, KFAC and F•).
        method: ``"auto"`` (dense for p ≤ :data:`DENSE_P_LIMIT`, else SLQ when the Gram fits,
            else Lanczos), ``"dense"`` (all
            p eigenvalues of the symmetric-definite pencil, ``scipy.linalg.eigh(F•PMP, F•)``),
            ``"lanczos"`` (k per end) or ``"slq"``. Lanczos and SLQ run on the symmetric
            ``F•^{1/2}PMPF•^{-1/2}`` (:class:`FisherSquareRoot`, N ≤ :data:`GRAM_N_LIMIT`);
            beyond that Lanczos solves ``eigsh(F•PMP, M=F•, Minv=F•⁻¹)`` (slower).
        k, n_probes, n_steps, seed, tol: Lanczos and SLQ parameters.

    Returns:
        A :class:`Spectrum` with operator ``"error-<space>"``; ``condition_number`` is NaN (E is
        singular: at least m zero eigenvalues), see ``spectral_radius``.
    """
    E = TwoLevelErrorOperator(two_level)
    F = two_level.exact
    if method == "auto":
        method = "dense" if E.p <= DENSE_P_LIMIT else ("slq" if F.jac.N <= GRAM_N_LIMIT else "lanczos")
    method = parse_method(method)
    info: dict = {"coarse_dim": two_level.coarse_dim, "coarse": two_level.name}
    gram_ok = F.jac.N <= GRAM_N_LIMIT
    if method == "dense":
        if E.p > 4 * DENSE_P_LIMIT:
            raise FisherlabError(f"error_spectrum: p = {E.p:,} is too large for the dense method; use 'lanczos'")
        I = torch.eye(E.p, dtype=E.dtype)
        A = E.symmetric_form(I).double().numpy()
        Fd = F.apply(I).double().numpy()
        vals = scipy.linalg.eigh((A + A.T) / 2, (Fd + Fd.T) / 2, eigvals_only=True)
    elif method == "slq" and gram_ok:
        out = slq(E.symmetrized(), n_probes=n_probes, n_steps=n_steps, seed=seed, operator=E.name, damping=two_level.damping,
                  memory_bytes=memory_bytes)
        out.condition_number = float("nan")
        out.info.update(info)
        return out
    elif method == "lanczos" and gram_ok:
        S = E.symmetrized(deflate=True)
        Z = S.null_basis
        v0 = torch.as_tensor(start_vector(E.p, seed))[:, None].to(E.dtype)
        v0 = (v0 if Z is None else v0 - Z @ (Z.T @ v0))[:, 0].double().numpy()
        vals, linfo = lanczos_extremes(S.to_scipy(), k, tol=tol, v0=v0)
        m = two_level.coarse_dim
        # the m zero eigenvalues of the null space F•^{1/2}R_0ᵀ, removed from the Lanczos run
        weights = np.concatenate([np.full(vals.shape, 1.0 / E.p), [m / E.p] if m else []])
        vals = np.concatenate([vals, [0.0] if m else []])
        info.update(linfo, k=k, deflated=m)
        return Spectrum(E.name, method, vals, weights, two_level.damping, E.p, float("nan"), info=info)
    elif method == "lanczos":
        A = E.fpmp.to_scipy()
        vals, linfo = lanczos_extremes(A, k, M=F.to_scipy(), Minv=F.inverse().to_scipy(), tol=tol, seed=seed)
        info.update(linfo, k=k, generalized=True)
    else:
        raise ValueError(
            f"error_spectrum: method {method!r} needs the symmetrized operator, i.e. the N × N Gram "
            f"(N = {F.jac.N:,} > {GRAM_N_LIMIT:,}); use 'lanczos'"
        )
    return Spectrum(E.name, method, vals, _uniform(vals, E.p), two_level.damping, E.p, float("nan"), info=info)


def spectra(
    source: Capture | Jacobian,
    damping: float,
    *,
    operators: Sequence[str] = ("fisher", "kfac", "preconditioned"),
    coarse: Sequence[str] = (),
    damping_mode: str = "pi",
    method: str = "auto",
    rhs: Tensor | None = None,
    k: int = 6,
    n_probes: int = 16,
    n_steps: int = 64,
    seed: int = 0,
    device: torch.device | str | None = None,
    memory: int | str | None = None,
) -> dict[str, Spectrum]:
    """Spectra of several operators of one capture, sharing the Jacobian, F• and KFAC.

    Args:
        source: a :class:`Capture` (or a :class:`Jacobian` with ``rhs`` when ``coarse`` is set).
        damping: λ > 0.
        operators: any of ``"fisher"``, ``"kfac"``, ``"kfac-tikhonov"``, ``"preconditioned"``.
        coarse: coarse spaces whose two-level error operators to add (``"error-<space>"``).
        damping_mode: KFAC damping of the preconditioned and error operators.
        method: ``"auto"`` or one method (``"dense"``, ``"lanczos"``, ``"slq"``) for the
            preconditioned and error operators (``"slq"`` gives densities). F•KFAC is always
            exact; F• is exact whenever N ≤ :data:`GRAM_N_LIMIT`, else Lanczos (or SLQ when
            ``method="slq"``).
        rhs: right-hand side for the residual-based coarse spaces (default ``capture.grad``).
        k, n_probes, n_steps, seed: Lanczos and SLQ parameters.
        device: where the algebra runs (default: the capture's device; float64).
        memory: a budget (bytes or ``"8GiB"``, :mod:`fisherlab.planning`): planned before any
            setup and refused in one line naming ``memory=`` / ``--memory`` when it cannot fit;
            the SLQ bases are sized to what the plan leaves (fewer steps, with a warning).
            Without a budget, the factored layers seen at many positions hold dense rows for the
            products (:meth:`fisherlab.jacobian.Jacobian.hold_rows`) within half of the memory one
            Lanczos basis leaves available — U's own where its products are needed (F• by
            Lanczos, the error operators), then those of U rotated into KFAC's eigenbasis
            (:class:`PreconditionedFisher`) with what is left; under a budget, within half of
            what the plan leaves after the full bases (none when the bases are cut to fit).

    Returns:
        ``{operator key: Spectrum}`` in the order requested.
    """
    lam = check_damping(damping)
    known = {"fisher", "kfac", "kfac-tikhonov", "preconditioned"}
    bad = [o for o in operators if o not in known]
    if bad:
        raise ValueError(f"unknown operator(s) {', '.join(bad)} (choose from {', '.join(sorted(known))})")
    jac = Jacobian.coerce(source, device=device)
    lk_mem = {}
    rows_free = None
    # the layers seen at many positions hold dense rows for the products, within a share of what one
    # Lanczos basis of n_steps vectors leaves (Jacobian.hold_rows; the same numbers to round-off): of
    # the budget's plan, which serves the bases first, or of the memory available
    if memory is not None:
        _, free = plan_spectra(jac, memory=memory, n_steps=n_steps, operators=operators)
        lk_mem = {"memory_bytes": free}
    else:
        free = available_memory(jac.device)
    if free is not None and free > min(n_steps, jac.p) * jac.p * 8:
        rows_free = free - min(n_steps, jac.p) * jac.p * 8
    # U's own rows serve only products with U: F• by Lanczos (N > GRAM_N_LIMIT) and the error operators
    own = bool(coarse) or ("fisher" in operators and jac.N > GRAM_N_LIMIT)
    held = jac.hold_rows(rows_free) if own else []
    pre_free = None if rows_free is None else rows_free - int(sum(lj.rows_bytes for lj in jac.layers
                                                                   if lj.spec.name in held) / ROWS_MEMORY_SHARE)
    try:
        return _spectra(jac, source, lam, operators, coarse, damping_mode, method, rhs, k, n_probes, n_steps, seed, lk_mem,
                        pre_free)
    finally:
        jac.release_rows(held)


def _spectra(jac: Jacobian, source, lam: float, operators, coarse, damping_mode: str, method: str, rhs, k: int,
             n_probes: int, n_steps: int, seed: int, lk_mem: dict, pre_free: int | None = None) -> dict[str, Spectrum]:
    """:func:`spectra` once the Jacobian is built and its rows held; ``pre_free``: the bytes the
    preconditioned operator's rows may take a share of."""
    exact = ExactFisher(jac, lam)
    kfacs: dict[str, KFAC] = {}

    def kf(mode: str) -> KFAC:
        if mode not in kfacs:
            kfacs[mode] = KFAC.from_capture(jac, lam, mode)
        return kfacs[mode]

    lk = dict(k=k, n_probes=n_probes, n_steps=n_steps, seed=seed, **lk_mem)
    out: dict[str, Spectrum] = {}
    for o in operators:
        if o == "fisher":
            fm = "exact" if jac.N <= GRAM_N_LIMIT else ("lanczos" if method in ("auto", "dense") else method)
            out[o] = fisher_spectrum(exact, method=fm, **lk)
        elif o in ("kfac", "kfac-tikhonov"):
            out[o] = kfac_spectrum(kf("pi" if o == "kfac" else "tikhonov"))
        else:
            out[o] = preconditioned_spectrum(kfac=kf(damping_mode), exact=exact, method=method,
                                             rows_free=pre_free, **lk)
    if coarse:
        if rhs is None and not isinstance(source, Capture):
            raise ValueError("spectra: rhs is required for coarse spaces when the source is a Jacobian")
        for space in coarse:
            tl = TwoLevelKFAC(source if isinstance(source, Capture) else jac, lam, space, kfac=kf(damping_mode), exact=exact, rhs=rhs)
            s = error_spectrum(tl, method=method, k=k, n_probes=n_probes, n_steps=n_steps, seed=seed, **lk_mem)
            out[s.operator] = s
    return out
