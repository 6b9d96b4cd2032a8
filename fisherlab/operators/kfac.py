"""KFAC (2.25)–(2.31): ``[F•KFAC]_ii = Ã_i ⊗ G̃_i`` through the factor eigenbases.

Per layer, the factors ``A_i [d_in', d_in']`` and ``G_i [d_out, d_out]`` (2.25)/(2.27) are
eigendecomposed once, ``A = Q_A diag(s_A) Q_Aᵀ``, ``G = Q_G diag(s_G) Q_Gᵀ``; products,
inverses, spectra and the spectral coarse space all reuse them. With ``X = MAT(v)``
``[d_out, d_in']`` and ``X̂ = Q_Gᵀ X Q_A``:

* ``"pi"`` (2.30): π_i = √[(tr A/dim A)/(tr G/dim G)], Ã = A + π√λ I, G̃ = G + (√λ/π) I,
  eigenvalues ``(s_G + √λ/π)(s_A + π√λ)ᵀ``;
* ``"tikhonov"``: ``A ⊗ G + λI``, eigenvalues ``s_G s_Aᵀ + λ`` — the exact damping, which
  isolates the Kronecker error from the damping heuristic;
* ``"sqrt"``: ``(A + √λ I) ⊗ (G + √λ I)`` (π off), eigenvalues ``(s_G + √λ)(s_A + √λ)ᵀ`` — the
  KFAC baseline of the paper's released code (docs/PROTOCOL.md);
* ``"lambda"``: ``(A + λI) ⊗ (G + λI)``, eigenvalues ``(s_G + λ)(s_A + λ)ᵀ`` — the fine level of
  the released code's two-level optimizer (docs/PROTOCOL.md).

``(A ⊗ G) vec(X) = vec(G X Aᵀ)``, so every block product is ``Q_G (D ∘ X̂) Q_Aᵀ``.

``conv_damping="released-code"`` applies ``"sqrt"``/``"lambda"`` as the released code does on a
layer with T > 1 positions: its factors are A/T and G (both averaged over B·T) and its step is
divided by T, so on fisherlab's factors its fine level is (A + TλI) ⊗ (G + λI) and its KFAC
baseline (whose λ it divides by T) is (A + √(λT) I) ⊗ (G + √(λ/T) I) (:func:`released_code_shifts`;
the same as ``"literal"`` for T = 1).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

import torch
from torch import Tensor

from ..capturing.record import Capture
from ..damping import resolve_damping
from ..errors import FisherlabError
from ..jacobian import Jacobian, factor_eigh
from ..layout import LayerKind
from .algebra import BlockDiagonal
from .base import FisherOperator, check_damping

__all__ = [
    "KFAC",
    "CONV_DAMPING",
    "DampingMode",
    "KroneckerBlock",
    "factor_eigh",
    "pi_damping",
    "pi_from_traces",
    "released_code_shifts",
]

CONV_DAMPING = ("literal", "released-code")
"""How a factored damping mode meets a layer with T > 1 positions (module docstring)."""


def check_conv_damping(value: str) -> str:
    if value not in CONV_DAMPING:
        raise ValueError(f"conv_damping must be 'literal' or 'released-code', got {value!r}")
    return value


class DampingMode(str, Enum):
    """How λ enters KFAC."""

    PI = "pi"
    """Factored Tikhonov with π-correction (2.30): (A + π√λ I) ⊗ (G + √λ/π I)."""
    TIKHONOV = "tikhonov"
    """Exact Tikhonov: A ⊗ G + λI."""
    SQRT = "sqrt"
    """Factored, π off: (A + √λ I) ⊗ (G + √λ I) (the released code's KFAC baseline)."""
    LAMBDA = "lambda"
    """Factored with λ on each factor: (A + λI) ⊗ (G + λI) (the released code's two-level fine level)."""

    @classmethod
    def parse(cls, value: "str | DampingMode") -> "DampingMode":
        """The mode of ``value``; a one-line error naming the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"damping_mode must be one of {choices}, got {value!r}") from None

    @property
    def factored(self) -> bool:
        """Whether λ enters as shifts of the factors (every mode but ``tikhonov``)."""
        return self is not DampingMode.TIKHONOV

    def factor_shifts(self, damping: float, pi: float = 1.0) -> tuple[float, float]:
        """The shifts ``(a, g)`` with Ã = A + aI, G̃ = G + gI (``(0, 0)`` for ``tikhonov``)."""
        sq = math.sqrt(damping)
        if self is DampingMode.PI:
            return pi * sq, sq / pi
        if self is DampingMode.SQRT:
            return sq, sq
        if self is DampingMode.LAMBDA:
            return damping, damping
        return 0.0, 0.0


def released_code_shifts(mode: "str | DampingMode", damping: float, positions: int) -> tuple[float, float]:
    """The shifts ``(a, g)`` on fisherlab's factors that reproduce the released code on a layer
    with T = ``positions``: (Tλ, λ) for ``"lambda"``, (√(λT), √(λ/T)) for ``"sqrt"`` (module
    docstring); other modes are not in that code (a one-line error)."""
    mode = DampingMode.parse(mode)
    T = int(positions)
    if T < 1:
        raise ValueError(f"positions must be >= 1, got {positions!r}")
    if mode is DampingMode.LAMBDA:
        return T * damping, damping
    if mode is DampingMode.SQRT:
        return math.sqrt(damping * T), math.sqrt(damping / T)
    raise ValueError(f"conv_damping='released-code' is defined for the 'sqrt' and 'lambda' modes, not {mode.value!r}")


NULL_SPACE_MIN_DIM = 256
"""A factor at least this large whose eigenvalues are exactly 0 on at least :data:`NULL_SPACE_MIN_SHARE`
of its dimension (A of a wide conv layer from few rows: :func:`~fisherlab.jacobian.psd_eigh_from_rows`
returns its null space with eigenvalue 0 exactly) has its block products done through the range of
its eigenbasis only (:meth:`KroneckerBlock._apply`); smaller factors keep the plain eigenbasis
products (the suite's tiny cases their exact numbers)."""
NULL_SPACE_MIN_SHARE = 0.25


def _null_count(s: Tensor) -> int:
    """How many of the ascending, clipped eigenvalues ``s`` are exactly 0 (they come first)."""
    return int((s == 0).sum())


def pi_from_traces(trace_A: float, dim_A: int, trace_G: float, dim_G: int) -> float:
    """π = √[(tr A / dim A) / (tr G / dim G)] (2.30); 1 when either trace vanishes."""
    ta, tg = trace_A / dim_A, trace_G / dim_G
    if ta <= 0 or tg <= 0 or not math.isfinite(ta / tg):
        return 1.0
    return math.sqrt(ta / tg)


def pi_damping(A: Tensor, G: Tensor) -> float:
    """π of (2.30) from the factors ``A``, ``G``."""
    return pi_from_traces(float(torch.trace(A)), A.shape[0], float(torch.trace(G)), G.shape[0])


class KroneckerBlock(FisherOperator):
    """One layer's ``Ã ⊗ G̃`` (or ``A ⊗ G + λI``) in its eigenbasis, ``[p_i, p_i]`` (p_i = d_out·d_in').

    The constructor takes ready pieces; :meth:`from_factors` eigendecomposes.

    Args:
        eigh: ``(s_A [d_in'], Q_A, s_G [d_out], Q_G)``, ascending eigenpairs of the undamped factors
            (shared between damping modes, spectra and spectral coarse spaces).
        damping: λ > 0.
        mode: :class:`DampingMode`.
        factors: the undamped ``(A, G)`` when at hand (otherwise rebuilt from ``eigh`` on demand).
        positions: T, the positions the layer sees (1 for Linear); used by ``conv_damping``.
        conv_damping: ``"literal"`` (the mode's shifts on these factors) or ``"released-code"``
            (:func:`released_code_shifts` for ``"sqrt"``/``"lambda"``; the other modes are literal).

    Attributes:
        sA, QA, sG, QG: the eigenpairs (negative round-off eigenvalues clipped to 0).
        pi: π_i (2.30) from the traces tr A = Σ s_A, tr G = Σ s_G (1 for every other mode).
        eig: eigenvalues of the damped block as ``[d_out, d_in']`` (``eig[r, c]`` belongs to the
            eigenvector ``vec(QG[:, r] QA[:, c]ᵀ) = QA[:, c] ⊗ QG[:, r]``).
    """

    def __init__(
        self,
        eigh: tuple[Tensor, Tensor, Tensor, Tensor],
        damping: float,
        mode: str | DampingMode = DampingMode.PI,
        *,
        factors: tuple[Tensor, Tensor] | None = None,
        positions: int = 1,
        conv_damping: str = "literal",
    ) -> None:
        sA, QA, sG, QG = eigh
        self.d_in, self.d_out = QA.shape[0], QG.shape[0]
        super().__init__(self.d_in * self.d_out, QA.dtype)
        self.device = QA.device
        self.damping = check_damping(damping)
        self.mode = DampingMode.parse(mode)
        self.eigh = eigh
        self._factors = factors
        # PSD in theory: clip round-off negatives.
        self.sA, self.QA, self.sG, self.QG = sA.clamp_min(0), QA, sG.clamp_min(0), QG
        if self.mode is DampingMode.PI:
            self.pi = pi_from_traces(float(sA.sum()), self.d_in, float(sG.sum()), self.d_out)
        else:
            self.pi = 1.0
        self.positions = int(positions)
        self.conv_damping = check_conv_damping(conv_damping)
        if self.conv_damping == "released-code" and self.mode in (DampingMode.SQRT, DampingMode.LAMBDA):
            self.shifts = released_code_shifts(self.mode, self.damping, self.positions)
        else:
            self.shifts = self.mode.factor_shifts(self.damping, self.pi)
        if self.mode.factored:
            a, g = self.shifts
            self.sA_damped = self.sA + a
            self.sG_damped = self.sG + g
            self.eig = torch.outer(self.sG_damped, self.sA_damped)
        else:
            self.sA_damped, self.sG_damped = self.sA, self.sG
            self.eig = torch.outer(self.sG, self.sA) + self.damping
        self.null = self._null_side()
        self.name = "kronecker-block"

    def _null_side(self) -> tuple[str, int] | None:
        """``("A", k)`` / ``("G", k)``: the factor whose k leading eigenvalues are exactly 0, when
        the products through its range only are worth it (:data:`NULL_SPACE_MIN_SHARE`); else None.
        On those eigenvectors every eigenvalue of the block depends on the other factor's index only."""
        best = None
        for side, s, n in (("A", self.sA, self.d_in), ("G", self.sG, self.d_out)):
            k = _null_count(s)
            if n >= NULL_SPACE_MIN_DIM and NULL_SPACE_MIN_SHARE * n <= k < n and (best is None or k / n > best[2]):
                best = (side, k, k / n)
        return None if best is None else best[:2]

    def _apply(self, V: Tensor, f) -> Tensor:
        """``Q f(Λ) Qᵀ V`` for ``V [p_i, c]``, f elementwise on the block's eigenvalues ``eig``.

        With a null space of A (k eigenvalues exactly 0, :meth:`_null_side`), on its eigenvectors
        ``eig[r, j] = e0[r]`` for every null j, so with X̃ = Q_GᵀX and the range Q_A,r = Q_A[:, k:]
        the product is ``Q_G [f(e0) ∘ X̃ + ((X̃Q_A,r) ∘ (f(Λ_r) − f(e0))) Q_A,rᵀ]``: 2·d_out·d_in'·r
        flops instead of 2·d_out·d_in'² on the A side (mirrored for a null space of G). Equal to the
        full eigenbasis product up to round-off.
        """
        if self.null is None:
            return self.from_eigenbasis(self.to_eigenbasis(V) * f(self.eig))
        c = V.shape[1]
        X = V.T.reshape(c, self.d_in, self.d_out).mT  # MAT per column: [c, d_out, d_in']
        side, k = self.null
        if side == "A":
            Qr = self.QA[:, k:]
            f0 = f(self.eig[:, :1])  # [d_out, 1]
            Xt = self.QG.T @ X
            Z = f0 * Xt + ((Xt @ Qr) * (f(self.eig[:, k:]) - f0)) @ Qr.T
            Y = self.QG @ Z
        else:
            Qr = self.QG[:, k:]
            f0 = f(self.eig[:1, :])  # [1, d_in']
            Xt = X @ self.QA
            Z = f0 * Xt + Qr @ ((Qr.T @ Xt) * (f(self.eig[k:, :]) - f0))
            Y = Z @ self.QA.T
        return Y.mT.reshape(c, -1).T

    @classmethod
    def from_factors(
        cls, A: Tensor, G: Tensor, damping: float, mode: str | DampingMode = DampingMode.PI, *,
        positions: int = 1, conv_damping: str = "literal",
    ) -> "KroneckerBlock":
        """Eigendecompose ``A [d_in', d_in']`` and ``G [d_out, d_out]`` (2.25)–(2.27) and build the block."""
        return cls(factor_eigh(A, G), damping, mode, factors=(A, G), positions=positions, conv_damping=conv_damping)

    @property
    def A(self) -> Tensor:
        """The undamped A (given, or ``Q_A diag(s_A) Q_Aᵀ``)."""
        return self.factors[0]

    @property
    def G(self) -> Tensor:
        """The undamped G (given, or ``Q_G diag(s_G) Q_Gᵀ``)."""
        return self.factors[1]

    @property
    def factors(self) -> tuple[Tensor, Tensor]:
        if self._factors is None:
            sA, QA, sG, QG = self.eigh
            self._factors = ((QA * sA) @ QA.T, (QG * sG) @ QG.T)
        return self._factors

    @property
    def A_damped(self) -> Tensor:
        """Ã = A + π√λ I (``pi``), A + √λ I (``sqrt``), A + λI (``lambda``); A itself for ``tikhonov``."""
        shift = self.shifts[0]
        return self.A + shift * torch.eye(self.d_in, dtype=self.A.dtype, device=self.A.device)

    @property
    def G_damped(self) -> Tensor:
        """G̃ = G + (√λ/π) I (``pi``), G + √λ I (``sqrt``), G + λI (``lambda``); G itself for ``tikhonov``."""
        shift = self.shifts[1]
        return self.G + shift * torch.eye(self.d_out, dtype=self.G.dtype, device=self.G.device)

    # ---- eigenbasis transforms of [p_i, c] blocks -----------------------------------------
    def to_eigenbasis(self, V: Tensor) -> Tensor:
        """``V [p_i, c] -> X̂ [c, d_out, d_in']`` with ``X̂ = Q_Gᵀ MAT(v) Q_A``."""
        c = V.shape[1]
        X = V.T.reshape(c, self.d_in, self.d_out).mT  # MAT per column: [c, d_out, d_in']
        return self.QG.T @ X @ self.QA

    def from_eigenbasis(self, Xh: Tensor) -> Tensor:
        """``X̂ [c, d_out, d_in'] -> V [p_i, c]`` with ``MAT(v) = Q_G X̂ Q_Aᵀ`` (inverse of :meth:`to_eigenbasis`)."""
        X = self.QG @ Xh @ self.QA.T  # [c, d_out, d_in']
        return X.mT.reshape(X.shape[0], -1).T

    def _matmat(self, V: Tensor) -> Tensor:
        return self._apply(V, lambda e: e)

    def _solve(self, W: Tensor) -> Tensor:
        return self._apply(W, torch.reciprocal)

    def power(self, V: Tensor, k: float) -> Tensor:
        """``[F•KFAC]_ii^k V`` (k may be negative or fractional)."""
        return self._apply(V, lambda e: e.pow(k))

    def eigenvectors(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Kronecker eigenvectors ``QA[:, c] ⊗ QG[:, r]`` as ``[p_i, len(rows)]``."""
        return (self.QA[:, cols].T[:, :, None] * self.QG[:, rows].T[:, None, :]).reshape(len(rows), self.p).T

    def smallest(self, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` smallest eigenpairs of the damped block: values ``[k]``, vectors ``[p_i, k]``."""
        k = min(k, self.p)
        vals, flat = torch.topk(self.eig.reshape(-1), k, largest=False)
        rows, cols = flat // self.d_in, flat % self.d_in
        return vals, self.eigenvectors(rows, cols)


class KFAC(BlockDiagonal):
    """F•KFAC = blockdiag(Ã_i ⊗ G̃_i) (2.28)–(2.31), or blockdiag(A_i ⊗ G_i + λI), ``[p, p]``.

    ``damping_mode`` is any :class:`DampingMode`: ``"pi"`` (2.30, the default), ``"tikhonov"``,
    ``"sqrt"`` or ``"lambda"`` (the released code's baseline and fine level, docs/PROTOCOL.md).

    Constructors:

    * ``KFAC(blocks)`` — ready :class:`KroneckerBlock` per layer (all with one λ and mode);
    * :meth:`KFAC.from_capture` ``(source, damping, damping_mode)`` — the capture's factors,
      eigendecomposed once per Jacobian and shared by both damping modes;
    * :meth:`KFAC.from_factors` ``(factors, damping, damping_mode)`` — external factors (running
      averages kept by an optimizer);
    * ``KFAC(source, damping, damping_mode="pi", *, factors=None)`` — the call of the README,
      forwarded to :meth:`from_capture` (checking ``factors`` against the layers when given).

    An operator built this way is independent of any Jacobian: an optimizer may reuse it as the
    preconditioner of later batches.

    Attributes:
        blocks: the :class:`KroneckerBlock` per layer; factors: ``[(A_i, G_i)]``; pi: ``[π_i]``;
        damping: λ; damping_mode: :class:`DampingMode`.
    """

    def __init__(self, blocks, damping: float | None = None, damping_mode: str | DampingMode = "pi", *, factors=None, dtype: torch.dtype = torch.float64) -> None:
        if isinstance(blocks, (Capture, Jacobian)):  # the README's KFAC(capture, λ, mode)
            damping_mode = DampingMode.parse(damping_mode)
            jac = Jacobian.coerce(blocks, dtype)
            damping = resolve_damping(damping, jac)
            if factors is None:
                blocks = _blocks_of(jac, damping, damping_mode, dtype)
            else:
                _check_factors(factors, jac)
                blocks = [KroneckerBlock.from_factors(A.to(dtype), G.to(dtype), damping, damping_mode) for A, G in factors]
        blocks = list(blocks)
        if not blocks or not all(isinstance(b, KroneckerBlock) for b in blocks):
            raise TypeError("KFAC(blocks): expected a list of KroneckerBlock (or a Capture/Jacobian and λ)")
        if len({(b.damping, b.mode) for b in blocks}) != 1:
            raise ValueError("KFAC: every Kronecker block must have the same damping and mode")
        super().__init__(blocks)
        self.device = blocks[0].device
        self.damping = blocks[0].damping
        self.damping_mode = blocks[0].mode
        self.name = "kfac" if self.damping_mode is DampingMode.PI else f"kfac-{self.damping_mode.value}"

    @classmethod
    def from_capture(
        cls, source: Capture | Jacobian, damping: float, damping_mode: str | DampingMode = "pi", *,
        dtype: torch.dtype = torch.float64, conv_damping: str = "literal",
    ) -> "KFAC":
        """KFAC from a capture's factors (2.25)–(2.27); the eigendecompositions are the
        Jacobian's, computed once and shared by every KFAC built on it. ``conv_damping``: module
        docstring (``"released-code"`` needs the positions of conv layers: factored storage)."""
        jac = Jacobian.coerce(source, dtype)
        return cls(_blocks_of(jac, resolve_damping(damping, jac), damping_mode, dtype, conv_damping))

    @classmethod
    def from_factors(
        cls, factors: Sequence[tuple[Tensor, Tensor]], damping: float, damping_mode: str | DampingMode = "pi", *,
        dtype: torch.dtype = torch.float64, positions: Sequence[int] | None = None, conv_damping: str = "literal",
    ) -> "KFAC":
        """KFAC from given factors ``[(A_i [d_in', d_in'], G_i [d_out, d_out])]`` (e.g. running
        averages); ``positions`` ``[T_i]`` for ``conv_damping="released-code"``."""
        factors = list(factors)
        T = [1] * len(factors) if positions is None else list(positions)
        if len(T) != len(factors):
            raise ValueError(f"KFAC.from_factors: {len(T)} positions for {len(factors)} layers")
        return cls([
            KroneckerBlock.from_factors(A.to(dtype), G.to(dtype), damping, damping_mode, positions=t, conv_damping=conv_damping)
            for (A, G), t in zip(factors, T)
        ])

    @property
    def factors(self) -> list[tuple[Tensor, Tensor]]:
        return [b.factors for b in self.blocks]

    @property
    def pi(self) -> list[float]:
        return [b.pi for b in self.blocks]

    def eigenvalues(self) -> Tensor:
        """All p eigenvalues of F•KFAC (products of the damped factor eigenvalues), unsorted."""
        return torch.cat([b.eig.reshape(-1) for b in self.blocks])

    def power(self, V: Tensor, k: float) -> Tensor:
        """``F•KFAC^k V`` for ``V [p, c]`` (e.g. k = −½ for the preconditioned operator)."""
        return torch.cat([b.power(v, k) for b, v in zip(self.blocks, self.split(V))], dim=0)

    def to_eigenbasis(self, X: Tensor) -> Tensor:
        """``Qᵀ X`` for ``X [p, c]``, ``Q = blockdiag(Q_{A,i} ⊗ Q_{G,i})`` (coordinates of ``vec(X̂_i)``)."""
        out = []
        for b, x in zip(self.blocks, self.split(X)):
            Yh = b.to_eigenbasis(x)  # [c, d_out, d_in']
            out.append(Yh.mT.reshape(Yh.shape[0], -1).T)
        return torch.cat(out, dim=0)

    def from_eigenbasis(self, Y: Tensor) -> Tensor:
        """``Q Y`` for ``Y [p, c]`` in eigenbasis coordinates (inverse of :meth:`to_eigenbasis`)."""
        return torch.cat(
            [b.from_eigenbasis(y.T.reshape(-1, b.d_in, b.d_out).mT) for b, y in zip(self.blocks, self.split(Y))], dim=0
        )


def _check_factors(factors: Sequence[tuple[Tensor, Tensor]], jac: Jacobian) -> None:
    if len(factors) != len(jac.layers):
        raise ValueError(f"KFAC: {len(factors)} factor pairs given for {len(jac.layers)} layers")
    for (A, G), lj in zip(factors, jac.layers):
        if A.shape != (lj.spec.d_in_bar,) * 2 or G.shape != (lj.spec.d_out,) * 2:
            raise ValueError(
                f"KFAC: layer '{lj.spec.name}' needs A [{lj.spec.d_in_bar}, {lj.spec.d_in_bar}] and "
                f"G [{lj.spec.d_out}, {lj.spec.d_out}], got {tuple(A.shape)} and {tuple(G.shape)}"
            )


def layer_positions(jac: Jacobian, conv_damping: str = "released-code") -> list[int]:
    """T per conv layer (1 for every other) for ``conv_damping="released-code"``; a one-line error for a conv layer stored
    as dense rows (which do not record T)."""
    out = []
    for lj in jac.layers:
        if conv_damping == "released-code" and lj.spec.kind is LayerKind.CONV2D and not lj.factored:
            raise FisherlabError(
                f"conv_damping='released-code' needs the positions T of conv layer '{lj.spec.name}', "
                "stored as dense rows: capture with storage='factored'"
            )
        out.append(lj.T if lj.spec.kind is LayerKind.CONV2D else 1)  # the code's Linear layers see one position
    return out


def _blocks_of(
    jac: Jacobian, damping: float, mode: str | DampingMode, dtype: torch.dtype, conv_damping: str = "literal"
) -> list[KroneckerBlock]:
    """The capture's Kronecker blocks, reusing each layer's cached eigendecomposition."""
    check_conv_damping(conv_damping)
    T = layer_positions(jac, conv_damping) if conv_damping == "released-code" else [1] * len(jac.layers)
    blocks = []
    for lj, t in zip(jac.layers, T):
        kw = dict(positions=t, conv_damping=conv_damping)
        eigh = lj.kfac_eigh
        if eigh[1].dtype == dtype:  # the factors themselves only when at hand (a seeded eigh needs none)
            factors = lj.__dict__.get("kfac_factors")
            blocks.append(KroneckerBlock(eigh, damping, mode, factors=factors, **kw))
        else:
            A, G = lj.kfac_factors
            blocks.append(KroneckerBlock.from_factors(A.to(dtype), G.to(dtype), damping, mode, **kw))
    return blocks
