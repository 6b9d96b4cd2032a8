"""THE method registry: every curvature approximation fisherlab compares, in one table.

A method is one :class:`Method` record — key, legend (the paper's Table 1 names, extended),
:class:`Family`, builder, options with defaults, colour, marker, optimizer name — in
:data:`METHODS`. Everything else derives from it: :func:`fisherlab.compare` (rows, gap rule and
sign check by family), the CLI's choices, the optimizers (``kfac-2l-<key>`` for every
multiplicative correction, a generic optimizer for every other method), the plots' colours,
markers and legends, the paper reproduction's method lists, and the tests' parametrization.

Adding a method: write its operator (one file in :mod:`fisherlab.operators`) and add one
``Method(...)`` entry below. ``diagonal`` was added that way.

| key | legend | family | operator |
|---|---|---|---|
| ``zero`` | ZERO | baseline | none: the zero step, 𝔈 = ‖ζ‖²_F• (a row of compare) |
| ``exact`` | EXACT | exact | :class:`~fisherlab.operators.ExactFisher` (ζ itself; not in compare's default) |
| ``block-diagonal`` | BLOCK-DIAG | exact | :class:`~fisherlab.operators.BlockDiagonalFisher` (3.7) |
| ``kfac`` | KFAC | one-level | :class:`~fisherlab.operators.KFAC`, π-damping (2.30) — the reference of every ratio |
| ``kfac-tikhonov`` | KFAC-TIKHONOV | one-level | :class:`~fisherlab.operators.KFAC`, A ⊗ G + λI |
| ``diagonal`` | DIAGONAL | one-level | :class:`~fisherlab.operators.DiagonalFisher`, diag(F) + λI |
| ``nicolaides`` … ``taylor`` | NICO … TAYLOR | multiplicative | :class:`~fisherlab.operators.TwoLevelKFAC` (3.9)–(3.15) |
| ``tko``, ``tko-kronecker`` | PREVIOUS, PREVIOUS-KRON | additive | :class:`~fisherlab.operators.TKO` (4.7), (3.18) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from .capturing.record import Capture
from .damping import Damping, resolve_damping
from .errors import FisherlabError
from .jacobian import Jacobian
from .operators import (
    GAP_RTOL,
    KFAC,
    TKO,
    BlockDiagonalFisher,
    CoarseContext,
    DiagonalFisher,
    EKFAC,
    ExactFisher,
    FOOF,
    KFACReduce,
    KFOC,
    KPSVD,
    SubBlockFisher,
    FisherOperator,
    TwoLevelKFAC,
    cg_preconditioner_rule,
    check_damping,
)

__all__ = [
    "BASELINES",
    "Family",
    "Method",
    "METHODS",
    "Pieces",
    "UnknownMethodError",
    "build",
    "colour",
    "default_keys",
    "composed_keys",
    "get",
    "keys",
    "legend",
    "marker",
    "method_of_optimizer",
    "optimizer_names",
    "practical",
]


class UnknownMethodError(FisherlabError, ValueError):
    """A method key (or one of its options) that the registry does not know."""


class Family(str, Enum):
    """What kind of approximation a method is; it fixes how its gap is computed and checked."""

    EXACT = "exact"
    """Exact references (F• itself, its exact block diagonal): nobody trains with them; kept apart
    from practical methods in headlines and plots."""
    ONE_LEVEL = "one-level"
    """Practical one-level approximations (KFAC, diagonal, …). Gap by the ζ-free identity
    xᵀF•x − yᵀF•y − 2⟨x − y, ∇h⟩ against y = ζ_KFAC."""
    MULTIPLICATIVE = "multiplicative"
    """Consistent two-level corrections (3.9): gap (4.6) = −(R_0r)ᵀF_coarse⁻¹(R_0r) ≤ 0."""
    ADDITIVE = "additive"
    """Additive corrections (TKO, (4.7)): gap (4.6), which may be positive."""
    BASELINE = "baseline"
    """Reference rows without an operator: the zero step (𝔈 = ‖ζ‖²_F•; a method whose error
    exceeds it is worse than not moving at all)."""

    @property
    def coarse(self) -> bool:
        """Whether the method is a coarse correction of a one-level operator (gap by (4.6))."""
        return self in (Family.MULTIPLICATIVE, Family.ADDITIVE)

    @property
    def gap_nonpositive(self) -> bool:
        """Whether theory bounds the gap by 0 (then the sign is checked)."""
        return self is Family.MULTIPLICATIVE

    def gap_violation(self, gap: float, scale: float) -> bool:
        """Whether ``gap`` breaks the family's bound beyond round-off: ``gap > GAP_RTOL · scale``
        for multiplicative corrections (``scale``: the size of the terms the gap is a difference
        of, 𝔈_KFAC + ‖ζ‖²_F•); never for the others."""
        return self.gap_nonpositive and gap > GAP_RTOL * scale


@dataclass
class Pieces:
    """What the builders share for one capture and one λ: the Jacobian, the right-hand side, the
    exact F• and the one-level KFAC operators (built once, on first use).

    Args:
        jac: the :class:`Jacobian`.
        damping: λ > 0.
        rhs: ∇h ``[p]`` (needed by the coarse corrections).
        exact: a ready :class:`ExactFisher` to share (default: built by the ``exact`` method's rule).
        kfac: a ready π-damped :class:`KFAC` to share (e.g. an optimizer's running-average KFAC).
    """

    jac: Jacobian
    damping: float
    rhs: Tensor | None = None
    exact: ExactFisher | None = None
    kfac: KFAC | None = None
    _one_level: dict = field(default_factory=dict)
    _contexts: dict = field(default_factory=dict)

    @classmethod
    def of(cls, source: Capture | Jacobian, damping: float | Damping, *, rhs: Tensor | None = None, **kw) -> "Pieces":
        jac = Jacobian.coerce(source)
        if rhs is None and isinstance(source, Capture):
            rhs = source.grad
        return cls(jac, resolve_damping(damping, jac), None if rhs is None else rhs.to(torch.float64).reshape(-1), **kw)

    def fisher(self) -> ExactFisher:
        """The shared exact F• (Woodbury or CG by :class:`ExactFisher`'s automatic rule)."""
        if self.exact is None:
            self.exact = ExactFisher(self.jac, self.damping)
        return self.exact

    def one_level(self, key: str = "kfac", **options: Any) -> FisherOperator:
        """The shared one-level operator of method ``key`` (the fine level of a coarse correction)."""
        if key == "kfac" and self.kfac is not None and not options:
            return self.kfac
        cache_key = (key, tuple(sorted(options.items())))
        if cache_key not in self._one_level:
            method = get(key)
            if method.builder is None or (method.family is not Family.ONE_LEVEL and key != "block-diagonal"):
                raise UnknownMethodError(f"'{key}' is not a one-level method (a coarse correction needs one as its base)")
            self._one_level[cache_key] = method.builder(self, **method.resolve_options(options))  # type: ignore[misc]
        return self._one_level[cache_key]

    def coarse_context(self, base: FisherOperator, key: str = "coarse") -> CoarseContext:
        """The shared :class:`CoarseContext` of the one-level operator ``base`` (built by
        :meth:`one_level`), F• and ∇h: ζ_base = base⁻¹∇h and the residual r = ∇h − F•ζ_base are
        computed once for every coarse correction over that base."""
        ctx = self._contexts.get(id(base))
        if ctx is None or ctx.base is not base:
            ctx = CoarseContext(base, self.fisher(), self.right_hand_side(key).to(torch.float64))  # type: ignore[arg-type]
            self._contexts[id(base)] = ctx
        return ctx

    def right_hand_side(self, key: str) -> Tensor:
        if self.rhs is None:
            raise FisherlabError(f"method '{key}' needs the right-hand side ∇h: pass rhs= (or a Capture)")
        return self.rhs


Builder = Callable[..., FisherOperator]


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        key: the name in tables, the CLI and the API (``"nicolaides"``).
        legend: the figure/table name (``"NICO"``).
        family: :class:`Family`.
        builder: ``builder(pieces, **options) -> FisherOperator`` (``None`` for a baseline row).
        options: option name → default (``{"m": 2}``); :func:`build` refuses others.
        colour, marker: fixed across every figure.
        optimizer: the optimizer's name in :mod:`fisherlab.optim` (``None``: no optimizer).
        optimizer_legend: the optimizer's legend when it differs from ``legend``.
        default: whether :func:`fisherlab.compare` runs it by default.
        description: one line for help texts.
        scale_covariant: whether its relative errors are the same in every loss scaling.
    """

    key: str
    legend: str
    family: Family
    builder: Builder | None
    colour: str
    marker: str
    options: Mapping[str, Any] = field(default_factory=dict)
    optimizer: str | None = None
    optimizer_legend: str | None = None
    default: bool = True
    description: str = ""
    storage: str = "auto"
    """The capture storage the method needs (``"factored"``: per-position factors ā, g, e.g.
    KFAC-reduce); an optimizer of the method captures with it."""
    scale_covariant: bool = True
    """Whether the operator scales with F when the loss is rescaled (then every relative error is
    the same in summed and mean-loss units). FOOF's A ⊗ I does not: its errors depend on the units."""

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults updated by ``given``; a one-line error for an option the method lacks."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "no options"
            raise UnknownMethodError(f"method '{self.key}' has no option {', '.join(unknown)} (it takes {takes})")
        return {**self.options, **given}


# ---- builders -------------------------------------------------------------------------------


def _exact(pieces: Pieces, *, solver: str = "auto", preconditioner: str | None = "auto") -> ExactFisher:
    if solver == "auto" and preconditioner == "auto":
        return pieces.fisher()
    jac, lam = pieces.jac, pieces.damping
    rule = cg_preconditioner_rule(jac.N, jac.p) if preconditioner == "auto" else preconditioner
    pc = KFAC.from_capture(jac, lam, "pi") if rule == "kfac" else None
    if rule not in ("kfac", None):
        raise UnknownMethodError(f"exact: preconditioner must be 'auto', 'kfac' or None, got {preconditioner!r}")
    return ExactFisher(jac, lam, solver=solver, preconditioner=pc)  # type: ignore[arg-type]


def _kfac(mode: str) -> Builder:
    def build(pieces: Pieces) -> KFAC:
        if mode == "pi" and pieces.kfac is not None:
            return pieces.kfac
        return KFAC.from_capture(pieces.jac, pieces.damping, mode)

    return build


def _two_level(space: str) -> Builder:
    def build(pieces: Pieces, *, base: str = "kfac", **sizes: int) -> TwoLevelKFAC:
        one = pieces.one_level(base)
        return TwoLevelKFAC.from_capture(
            pieces.jac, pieces.damping, space, base=one, exact=pieces.fisher(),
            rhs=pieces.right_hand_side(space), context=pieces.coarse_context(one, space), **sizes,
        )

    return build


def _tko(coarse_operator: str) -> Builder:
    def build(pieces: Pieces, *, base: str = "kfac", coarse: str = "nicolaides", **sizes: int) -> TKO:
        one = pieces.one_level(base)
        return TKO.from_capture(
            pieces.jac, pieces.damping, coarse, base=one, exact=pieces.fisher(),
            rhs=pieces.right_hand_side("tko"), coarse_operator=coarse_operator,
            context=pieces.coarse_context(one, "tko"), **sizes,
        )

    return build


def _palette() -> list[str]:
    """matplotlib's tab20 (pairs of dark/light hues), as hex."""
    return [
        "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
        "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7",
        "#bcbd22", "#dbdb8d", "#17becf", "#9edae5",
    ]


_P = _palette()
_COARSE_OPTS = {"base": "kfac"}

_ENTRIES = [
    Method("zero", "ZERO", Family.BASELINE, None, _P[11], "", description="the zero step (no update), the baseline: 𝔈 = ‖ζ‖²_F•"),
    Method("exact", "EXACT", Family.EXACT, _exact, "#000000", "", {"solver": "auto", "preconditioner": "auto"},
           optimizer="ngd", optimizer_legend="NGD", default=False,
           description="the exact regularized natural gradient ζ = F•⁻¹w, F• = F + λI (3.2), by Woodbury (or CG)"),
    Method("block-diagonal", "BLOCK-DIAG", Family.EXACT, lambda pc: BlockDiagonalFisher(pc.jac, pc.damping), _P[16], "P",
           optimizer="ngd-block", optimizer_legend="NGD-BLOCK", description="block-diagonal Fisher: the exact diagonal blocks [F•]_ii of F• (3.7)"),
    Method("kfac", "KFAC", Family.ONE_LEVEL, _kfac("pi"), _P[14], "s", optimizer="kfac",
           description="KFAC, Kronecker-factored blocks Ã_i ⊗ G̃_i with π-damping (2.30)"),
    Method("kfac-tikhonov", "KFAC-TIKHONOV", Family.ONE_LEVEL, _kfac("tikhonov"), _P[15], "D", optimizer="kfac-tikhonov",
           description="KFAC with exact Tikhonov damping A ⊗ G + λI"),
    Method("diagonal", "DIAGONAL", Family.ONE_LEVEL, lambda pc: DiagonalFisher.from_capture(pc.jac, pc.damping), _P[3], "d",
           optimizer="diagonal", description="the exact diagonal diag(F) + λI"),
    Method("foof", "FOOF", Family.ONE_LEVEL,
           lambda pc, damping_mode: FOOF.from_capture(pc.jac, pc.damping, damping_mode), _P[9], "h",
           {"damping_mode": "tikhonov"}, optimizer="foof",
           description="FOOF (Benzing 2022): KFAC with G = I, (A + λI) ⊗ I", scale_covariant=False),
    Method("ekfac", "EKFAC", Family.ONE_LEVEL, lambda pc: EKFAC.from_capture(pc.jac, pc.damping), _P[10], "p",
           optimizer="ekfac",
           description="EKFAC (George et al. 2018): KFAC eigenbasis, diagonal re-fitted to the Jacobian rows, + λI"),
    Method("kfac-reduce", "KFAC-REDUCE", Family.ONE_LEVEL,
           lambda pc, damping_mode: KFACReduce.from_capture(pc.jac, pc.damping, damping_mode), _P[12], "X",
           {"damping_mode": "pi"}, optimizer="kfac-reduce", default=False, storage="factored",
           description="KFAC-reduce (Eschenhagen et al. 2023; kfac is the expand variant); factored storage only"),
    Method("unit-wise", "UNIT-WISE", Family.ONE_LEVEL, lambda pc: SubBlockFisher.from_capture(pc.jac, pc.damping), _P[13], "1",
           optimizer="unit-wise", default=False,
           description="exact sub-block of each output unit's row [W | b][r, :], + λI"),
    Method("mini-block", "MINI-BLOCK", Family.ONE_LEVEL,
           lambda pc, size: SubBlockFisher.from_capture(pc.jac, pc.damping, size), _P[17], "2",
           {"size": 16}, optimizer="mini-block", default=False,
           description="exact sub-blocks of `size` columns of each output unit's row, + λI"),
    Method("kfoc", "KFOC", Family.ONE_LEVEL,
           lambda pc, damping_mode: KFOC.from_capture(pc.jac, pc.damping, damping_mode), _P[18], "H",
           {"damping_mode": "pi"}, optimizer="kfoc", default=False,  # its Lanczos alone takes 175 s on ResNet-18 at B = 128 (kfoc_bench.py)
           description="KFOC: the Frobenius-optimal A ⊗ G of each exact block (top Kronecker SVD term), damped as KFAC"),
    Method("kpsvd", "KPSVD", Family.ONE_LEVEL, lambda pc, r: KPSVD.from_capture(pc.jac, pc.damping, r), _P[19], "8",
           {"r": 2}, optimizer="kpsvd", default=False,
           description="KPSVD: the top r Kronecker SVD terms of each exact block + λI (CG for r ≥ 2)"),
    Method("nicolaides", "NICO", Family.MULTIPLICATIVE, _two_level("nicolaides"), _P[0], "o", dict(_COARSE_OPTS),
           optimizer="kfac-2l-nicolaides", description="two-level KFAC, Nicolaides coarse space: V_i = 1 per layer (3.24)"),
    Method("spectral", "SPECTRAL", Family.MULTIPLICATIVE, _two_level("spectral"), _P[2], "v", {**_COARSE_OPTS, "k": 1},
           optimizer="kfac-2l-spectral", description="two-level KFAC, spectral coarse space: the smallest Kronecker eigenvectors (3.28)"),
    Method("krylov-nicolaides", "KRY-NICO", Family.MULTIPLICATIVE, _two_level("krylov-nicolaides"), _P[1], "<",
           {**_COARSE_OPTS, "m": 2}, optimizer="kfac-2l-krylov-nicolaides", description="two-level KFAC, Krylov-Nicolaides coarse space: Krylov directions from V_i = 1 (3.29)"),
    Method("residuals", "RESIDU", Family.MULTIPLICATIVE, _two_level("residuals"), _P[4], "^", dict(_COARSE_OPTS),
           optimizer="kfac-2l-residuals", description="two-level KFAC, residuals coarse space: [F•KFAC]_ii⁻¹ r[i] (3.32)"),
    Method("krylov-residuals", "KRY-RESIDU", Family.MULTIPLICATIVE, _two_level("krylov-residuals"), _P[5], ">",
           {**_COARSE_OPTS, "m": 2}, optimizer="kfac-2l-krylov-residuals", description="two-level KFAC, Krylov-residuals coarse space: Krylov directions from the residual"),
    Method("taylor", "TAYLOR", Family.MULTIPLICATIVE, _two_level("taylor"), _P[8], "*", {**_COARSE_OPTS, "q": 2},
           optimizer="kfac-2l-taylor", description="two-level KFAC, Taylor coarse space: Taylor/Neumann series directions (3.37)–(3.38)"),
    Method("tko", "PREVIOUS", Family.ADDITIVE, _tko("exact"), _P[6], "x", {**_COARSE_OPTS, "coarse": "nicolaides"},
           optimizer="tko", description="TKO, the additive two-level correction of Tselepidis et al. (4.7), exact F_coarse"),
    Method("tko-kronecker", "PREVIOUS-KRON", Family.ADDITIVE, _tko("kronecker"), _P[7], "+",
           {**_COARSE_OPTS, "coarse": "nicolaides"}, optimizer="tko-kronecker",
           description="TKO, additive, with the Kronecker-factored F_coarse (3.18); Linear layers only"),
]

METHODS: Mapping[str, Method] = MappingProxyType({m.key: m for m in _ENTRIES})
"""Key → :class:`Method`, in table order (iterating gives the keys)."""

BASELINES: Mapping[str, tuple[str, str, str]] = MappingProxyType({
    "sgd": ("SGD", "#8c564b", "."),
    "adam": ("ADAM", "#e377c2", "."),
    "two-level-kfac": ("KFAC-2L", _P[0], "o"),
})
"""Names that are not methods but appear in figures (optimizers without an operator of their own,
and the generic two-level optimizer): name → (legend, colour, marker)."""


# ---- queries --------------------------------------------------------------------------------


def get(key: str) -> Method:
    """The :class:`Method` of ``key`` — a key of :data:`METHODS` or a composed key
    ``<base>+<coarse>`` (:func:`composed_keys`); a one-line error listing the choices."""
    try:
        return METHODS[key]
    except KeyError:
        pass
    if "+" in key:
        return _composed(key)
    raise UnknownMethodError(
        f"unknown method '{key}' (choose from {', '.join(METHODS)}, or <one-level>+<coarse correction>)"
    ) from None


def composed_keys() -> list[str]:
    """The composed keys ``<base>+<coarse>``: a coarse correction (multiplicative or additive, e.g.
    ``residuals``, ``tko``) over a one-level method other than ``kfac`` (e.g. ``ekfac+residuals``;
    ``kfac+residuals`` is accepted too and is ``residuals`` itself). Not in :data:`METHODS` (that
    holds the base entries); :func:`get` and :func:`build` resolve them, so :func:`fisherlab.compare`
    takes them like any key. A composed method has the coarse method's family, options (less
    ``base``) plus the base's options, colour and gap rule; its legend is ``<BASE>+<COARSE>``."""
    bases = [k for k in keys(Family.ONE_LEVEL) if k != "kfac"]
    coarse = [k for k, m in METHODS.items() if m.family.coarse]
    return [f"{b}+{c}" for b in bases for c in coarse]


_COMPOSED: dict[str, Method] = {}


def _composed(key: str) -> Method:
    """The :class:`Method` of a composed key (built once per key)."""
    if key in _COMPOSED:
        return _COMPOSED[key]
    base_key, coarse_key = key.split("+", 1)
    base, coarse = METHODS.get(base_key), METHODS.get(coarse_key)
    if base is None or base.builder is None or (base.family is not Family.ONE_LEVEL and base_key != "block-diagonal"):
        raise UnknownMethodError(
            f"unknown method '{key}': '{base_key}' is not a one-level method "
            f"(choose from {', '.join(keys(Family.ONE_LEVEL))})"
        )
    if coarse is None or coarse.builder is None or not coarse.family.coarse:
        raise UnknownMethodError(
            f"unknown method '{key}': '{coarse_key}' is not a coarse correction "
            f"(choose from {', '.join(k for k, m in METHODS.items() if m.family.coarse)})"
        )
    base_opts = dict(base.options)
    coarse_opts = {k: v for k, v in coarse.options.items() if k != "base"}
    clash = sorted(set(base_opts) & set(coarse_opts))
    if clash:  # pragma: no cover - no registered pair clashes
        raise UnknownMethodError(f"method '{key}': options {', '.join(clash)} belong to both parts")
    coarse_builder = coarse.builder

    def build_composed(pieces: Pieces, **opts: Any) -> FisherOperator:
        b_opts = {k: v for k, v in opts.items() if k in base_opts}
        c_opts = {k: v for k, v in opts.items() if k not in base_opts}
        return _with_base(pieces, base_key, b_opts, coarse_builder, c_opts)

    method = Method(
        key, f"{base.legend}+{coarse.legend}", coarse.family, build_composed, coarse.colour, base.marker or coarse.marker,
        {**coarse_opts, **base_opts}, default=False,
        description=f"{coarse.description or coarse_key}, over {base_key} instead of KFAC",
    )
    _COMPOSED[key] = method
    return method


def _with_base(pieces: Pieces, base_key: str, base_opts: dict, coarse_builder: Builder, coarse_opts: dict) -> FisherOperator:
    """The coarse builder with ``base=base_key``; the base's options reach :meth:`Pieces.one_level`
    through a view of ``pieces`` whose ``one_level(base_key)`` is the configured one."""
    if not base_opts:
        return coarse_builder(pieces, base=base_key, **coarse_opts)
    op = pieces.one_level(base_key, **base_opts)
    view = Pieces(pieces.jac, pieces.damping, pieces.rhs, exact=pieces.fisher(), kfac=pieces.kfac)
    view._one_level = {**pieces._one_level, (base_key, ()): op}
    view._contexts = pieces._contexts  # the corrections over op share its context with the parent's
    return coarse_builder(view, base=base_key, **coarse_opts)


def practical(key: str) -> bool:
    """Whether ``key`` is a method one would train with (not an exact reference or a baseline row):
    what headlines rank."""
    return get(key).family in (Family.ONE_LEVEL, Family.MULTIPLICATIVE, Family.ADDITIVE)


def keys(family: Family | str | Iterable[Family | str] | None = None) -> list[str]:
    """Keys in table order, of one family or several (all when ``None``)."""
    if family is None:
        return list(METHODS)
    fams = {Family(family)} if isinstance(family, (str, Family)) else {Family(f) for f in family}
    return [k for k, m in METHODS.items() if m.family in fams]


def default_keys() -> list[str]:
    """The methods :func:`fisherlab.compare` runs by default, in table order."""
    return [k for k, m in METHODS.items() if m.default]


def optimizer_names() -> dict[str, str]:
    """Optimizer name → method key, for every method with an optimizer."""
    return {m.optimizer: k for k, m in METHODS.items() if m.optimizer}


def method_of_optimizer(name: str) -> str | None:
    """The method key behind optimizer ``name`` (``"kfac-2l-residuals"`` → ``"residuals"``), or None."""
    return optimizer_names().get(name)


def _lookup(key: str) -> tuple[str, str, str] | None:
    if key in METHODS:
        m = METHODS[key]
        return m.legend, m.colour, m.marker
    if "+" in key:
        try:
            m = get(key)
        except UnknownMethodError:
            pass
        else:
            return m.legend, m.colour, m.marker
    if key.startswith("error-") and key[len("error-") :] in METHODS:  # spectra: error operator of a method
        return _lookup(key[len("error-") :])
    method = method_of_optimizer(key)
    if method is not None:
        m = METHODS[method]
        return m.optimizer_legend or m.legend, m.colour, m.marker
    if key in BASELINES:
        return BASELINES[key]
    for m in METHODS.values():  # a legend maps to itself
        if key in (m.legend, m.optimizer_legend):
            return key, m.colour, m.marker
    for lg, c, mk in BASELINES.values():
        if key == lg:
            return lg, c, mk
    return None


def legend(key: str) -> str:
    """Legend of a method key, optimizer name, baseline or legend (unknown keys: upper-cased)."""
    found = _lookup(key)
    return found[0] if found else key.upper()


def colour(key: str, default: str = "#444444") -> str:
    """The fixed colour of a method, optimizer, baseline or legend name."""
    found = _lookup(key)
    return found[1] if found else default


def marker(key: str, default: str = "o") -> str:
    """The fixed marker of a method, optimizer, baseline or legend name."""
    found = _lookup(key)
    return found[2] if found else default


def build(
    key: str,
    capture: Capture | Jacobian | Pieces,
    damping: float | Damping | None = None,
    *,
    rhs: Tensor | None = None,
    exact: ExactFisher | None = None,
    kfac: KFAC | None = None,
    **options: Any,
) -> FisherOperator:
    """The operator of method ``key`` for a capture (or Jacobian with ``rhs``) at damping λ.

    Args:
        key: a key of :data:`METHODS`.
        capture: a :class:`Capture`, a :class:`Jacobian`, or ready :class:`Pieces` (shared between calls).
        damping: λ > 0 (not needed with ``Pieces``).
        rhs: ∇h ``[p]`` for the coarse corrections (default ``capture.grad``).
        exact, kfac: ready operators to share.
        options: the method's options (:attr:`Method.options`, e.g. ``m=3`` for Krylov spaces,
            ``base="diagonal"`` for a coarse correction over another one-level operator).
    """
    method = get(key)
    if method.builder is None:
        raise UnknownMethodError(f"'{key}' ({method.description}) is a reference row of compare and has no operator")
    opts = method.resolve_options(options)
    if isinstance(capture, Pieces):
        pieces = capture
    else:
        if damping is None or (isinstance(damping, float) and math.isnan(damping)):
            raise FisherlabError(f"method '{key}': the damping λ is required")
        pieces = Pieces.of(capture, damping, rhs=rhs, exact=exact, kfac=kfac)
    return method.builder(pieces, **opts)
