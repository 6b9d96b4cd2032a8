"""The protocol presets: the paper's equations, or what the paper's released code computes.

One frozen :class:`Protocol` holds every option in which the released code
(Abdoulaye-Koroko/natural-gradients, ``optimizers/twolevel_kfac.py``, ``optimizers/kfac.py``,
``apps/mlp_cnn/train_*.py``) departs from the paper's equations; docs/PROTOCOL.md documents
each one from the code. The operators (:class:`~fisherlab.operators.TwoLevelKFAC`,
:class:`~fisherlab.operators.TKO`) read the operator fields, the optimizers
(:mod:`fisherlab.optim`) the rest; ``protocol="paper"`` (the default everywhere) is fisherlab's
behaviour before the protocol existed, so existing results do not change.

| field | ``paper()`` | ``released_code()`` |
|---|---|---|
| ``coarse_rhs`` | ``"residual"``: R_0 r (3.11) | ``"gradient"``: R_0∇h |
| ``coarse_diagonal`` | ``"exact"``: λR_0R_0ᵀ | ``"layer-size"``: λ·p_i per coarse column of layer i |
| ``coarse_normalization`` | ``"orthonormal"`` (QR) | ``"max-abs"``: each raw column / its largest entry |
| ``coefficient`` | 1 | 1 (stored runs used ``two_level_coeff``; set it explicitly) |
| ``damping_mode`` (KFAC baseline) | ``"pi"`` (2.30) | ``"sqrt"``: (A + √λI) ⊗ (G + √λI) |
| ``fine_damping_mode`` (two-level) | ``"pi"`` | ``"lambda"``: (A + λI) ⊗ (G + λI) |
| ``conv_damping`` | ``"literal"`` | ``"released-code"``: on conv layers (A + TλI) ⊗ (G + λI), baseline (A + √(λT)I) ⊗ (G + √(λ/T)I) |
| ``factor_decay`` | 0 (batch factors) | ``"auto"``: ρ_k = min(1 − 1/k, 0.95) |
| ``coarse_decay`` | 0 (batch coarse matrix) | ``"auto"`` |
| ``factor_update_period`` | 1 | 100 |
| ``inverse_update_period`` | 1 | 100 |
| ``coarse_update_period`` | 1 | 100 |
| ``fisher_subbatch`` | ``None`` (the batch) | 0.25: ⌊B/4⌋ examples drawn with replacement |
| ``weight_decay_mode`` | ``"preconditioned"``: ζ = op⁻¹(∇h + ωθ) | ``"after"``: ζ = op⁻¹∇h + ωθ (torch SGD's) |
| ``kl_clip`` | ``None`` | ``None`` (the code's ``clipping`` is per run: set it) |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, Mapping, Union

__all__ = [
    "Protocol",
    "UNSET",
    "COARSE_RHS",
    "COARSE_DIAGONALS",
    "COARSE_NORMALIZATIONS",
    "AUTO_DECAY_CAP",
    "auto_decay",
    "check_coarse_rhs",
    "check_coarse_diagonal",
    "check_coarse_normalization",
    "check_coefficient",
]

COARSE_RHS = ("residual", "gradient")
COARSE_DIAGONALS = ("exact", "layer-size")
COARSE_NORMALIZATIONS = ("orthonormal", "max-abs")

AUTO_DECAY_CAP = 0.95
"""The cap of the released code's running-average weight, ρ_k = min(1 − 1/k, 0.95) (its ``alpha``)."""

Decay = Union[float, Literal["auto"]]


class _Unset:
    """The default of an option whose ``None`` is a value (``fisher_subbatch=None``: no sub-batch)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Not given: the protocol's value is kept (for the options where ``None`` means something)."""

OPTIONAL_FIELDS = ("fisher_subbatch", "kl_clip")
"""The fields whose ``None`` is a value; elsewhere ``None`` means "not given"."""


def auto_decay(k: int, cap: float = AUTO_DECAY_CAP) -> float:
    """ρ_k = min(1 − 1/k, cap) for the k-th step (0-based, as the released code counts); 0 at k = 0
    (the first update takes the new value)."""
    if k <= 0:
        return 0.0
    return min(1.0 - 1.0 / k, cap)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def check_coarse_rhs(value: Any) -> str:
    """``"residual"`` or ``"gradient"``; a one-line error otherwise."""
    return _choice("coarse_rhs", value, COARSE_RHS)


def check_coarse_diagonal(value: Any) -> str:
    """``"exact"`` or ``"layer-size"``; a one-line error otherwise."""
    return _choice("coarse_diagonal", value, COARSE_DIAGONALS)


def check_coarse_normalization(value: Any) -> str:
    """``"orthonormal"`` or ``"max-abs"``; a one-line error otherwise."""
    return _choice("coarse_normalization", value, COARSE_NORMALIZATIONS)


def check_coefficient(value: Any) -> float:
    """A finite coefficient c of the correction ζ = ζ_KFAC + c·R_0ᵀβ; a one-line error otherwise."""
    try:
        c = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"coefficient must be a finite number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(c):
        raise ValueError(f"coefficient must be a finite number, got {value!r}")
    return c


@dataclass(frozen=True)
class Protocol:
    """Every option in which the released code departs from the paper's equations (module table).

    Attributes:
        name: ``"paper"``, ``"released-code"`` or ``"custom"`` (after overrides).
        coarse_rhs: right-hand side of the coarse system, R_0 r (``"residual"``, (3.11)) or
            R_0∇h (``"gradient"``); multiplicative two-level only (TKO's is R_0w by definition).
        coarse_diagonal: the λ-term of the coarse matrix, λR_0R_0ᵀ (``"exact"``) or λ·p_i on the
            diagonal entry of every coarse column of layer i (``"layer-size"``).
        coarse_normalization: the coarse basis, orthonormal (QR of the raw columns) or each raw
            column divided by its largest absolute entry (``"max-abs"``, not orthogonalised).
        coefficient: c in ζ = ζ_KFAC + c·R_0ᵀβ.
        damping_mode: the one-level KFAC's :class:`~fisherlab.operators.kfac.DampingMode`.
        fine_damping_mode: the fine level's mode in the two-level methods.
        conv_damping: ``"literal"`` or ``"released-code"``: how ``"sqrt"``/``"lambda"`` meet a conv
            layer with T positions (:func:`fisherlab.operators.kfac.released_code_shifts`).
        factor_decay, coarse_decay: running-average weight ρ ∈ [0, 1) or ``"auto"`` (ρ_k).
        factor_update_period, inverse_update_period, coarse_update_period: refresh periods T ≥ 1.
        fisher_subbatch: the factors and coarse matrix from a random sub-batch drawn with
            replacement: a size (int), a fraction of the batch (float in (0, 1]) or ``None``.
        weight_decay_mode: ω inside the preconditioned vector (``"preconditioned"``, fisherlab's)
            or added after preconditioning (``"after"``, as ``torch.optim.SGD(weight_decay=ω)``
            does in the released scripts).
        kl_clip: c of the step rescaling min(1, √(c / Σ|⟨ζ_p, ∇h_p⟩|)) over the Fisher's parameter
            tensors (the released code's ``constraint_norm=True, clipping=c``), or ``None``.
    """

    name: str = "paper"
    coarse_rhs: str = "residual"
    coarse_diagonal: str = "exact"
    coarse_normalization: str = "orthonormal"
    coefficient: float = 1.0
    damping_mode: str = "pi"
    fine_damping_mode: str = "pi"
    conv_damping: str = "literal"
    factor_decay: Decay = 0.0
    coarse_decay: Decay = 0.0
    factor_update_period: int = 1
    inverse_update_period: int = 1
    coarse_update_period: int = 1
    fisher_subbatch: int | float | None = None
    weight_decay_mode: str = "preconditioned"
    kl_clip: float | None = None

    OPERATOR_FIELDS = ("coarse_rhs", "coarse_diagonal", "coarse_normalization", "coefficient")
    """The fields the operators take (the rest are the optimizers')."""

    @classmethod
    def paper(cls) -> "Protocol":
        """The paper's equations (fisherlab's defaults)."""
        return cls()

    @classmethod
    def released_code(cls) -> "Protocol":
        """What the released code computes (docs/PROTOCOL.md)."""
        return cls(
            name="released-code",
            coarse_rhs="gradient",
            coarse_diagonal="layer-size",
            coarse_normalization="max-abs",
            coefficient=1.0,
            damping_mode="sqrt",
            fine_damping_mode="lambda",
            conv_damping="released-code",
            factor_decay="auto",
            coarse_decay="auto",
            factor_update_period=100,
            inverse_update_period=100,
            coarse_update_period=100,
            fisher_subbatch=0.25,
            weight_decay_mode="after",
        )

    @classmethod
    def parse(cls, value: "str | Protocol | None") -> "Protocol":
        """``"paper"`` / ``"released-code"`` / a :class:`Protocol` (``None`` is the paper's)."""
        if value is None:
            return cls.paper()
        if isinstance(value, Protocol):
            return value
        presets = {"paper": cls.paper, "released-code": cls.released_code}
        if value not in presets:
            raise ValueError(f"protocol must be 'paper' or 'released-code' (or a Protocol), got {value!r}")
        return presets[value]()

    def with_options(self, **overrides: Any) -> "Protocol":
        """This protocol with the options given explicitly replaced (:data:`UNSET`, and ``None``
        outside :data:`OPTIONAL_FIELDS`, mean not given); the name becomes ``"custom"`` when
        anything changes."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"Protocol: unknown option(s) {', '.join(unknown)}")
        given = {
            k: v for k, v in overrides.items()
            if v is not UNSET and (v is not None or k in OPTIONAL_FIELDS) and getattr(self, k) != v
        }
        if not given:
            return self
        return replace(self, name="custom", **given)

    def operator_options(self) -> dict[str, Any]:
        """The operator keywords: ``coarse_rhs``, ``coarse_diagonal``, ``coefficient`` (and
        ``coarse_normalization``, which the basis construction takes)."""
        return {k: getattr(self, k) for k in self.OPERATOR_FIELDS}

    def as_dict(self) -> dict[str, Any]:
        """Every field (for records and reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def split_operator_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(protocol fields, the rest)`` of a keyword mapping."""
    names = {f.name for f in fields(Protocol)}
    mine = {k: v for k, v in options.items() if k in names}
    return mine, {k: v for k, v in options.items() if k not in names}
