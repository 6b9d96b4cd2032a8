"""Argument checks with one-line errors: string enums, positive integers, bounded numbers, the damping.

Every check returns the parsed value and raises a :class:`~fisherlab.errors.FisherlabError`
subclass that is also a :class:`ValueError` (:class:`~fisherlab.errors.ConfigError`, or
:class:`~fisherlab.errors.DampingError` for λ), whose message names ``what`` was wrong and the
value given. ``what`` is the user's name of the thing checked (``"--batch-size"``,
``"training config: 'lr'"``, ``"solver"``).

>>> parse_enum("cg", ["auto", "woodbury", "cg"], "solver")
'cg'
>>> positive_int(3, "k", max=8)
3
>>> bounded(0.5, "decay", 0.0, 1.0, hi_open=True)
0.5
"""

from __future__ import annotations

import enum
import math
import numbers
from typing import Any, Iterable, TypeVar

from .errors import ConfigError, DampingError

__all__ = ["parse_enum", "positive_int", "nonnegative_int", "bounded", "damping", "same_damping", "available_device"]

E = TypeVar("E", bound=enum.Enum)

DAMPING_RTOL = 1e-15
"""Two dampings are the same when they differ by at most this relative amount (float round-off
of one λ passed through ``float``, never a different λ)."""


def parse_enum(value: Any, enum_or_choices: type[E] | Iterable[str], what: str) -> Any:
    """``value`` as a member of a (str) enum, or as one of a collection of string choices.

    Args:
        value: a member, or the string value of one (``"mc"``; case-sensitive).
        enum_or_choices: an :class:`enum.Enum` class (returns the member) or an iterable of
            strings, e.g. a list or the keys of a registry (returns the string).
        what: what is being chosen, for the message.

    Raises:
        ConfigError: ``"<what> must be one of a, b, c; got 'x'"``.
    """
    if isinstance(enum_or_choices, type) and issubclass(enum_or_choices, enum.Enum):
        if isinstance(value, enum_or_choices):
            return value
        for member in enum_or_choices:
            if value == member.value or (isinstance(value, str) and value == member.name):
                return member
        choices = [str(m.value) for m in enum_or_choices]
    else:
        choices = [str(c) for c in enum_or_choices]
        if isinstance(value, str) and value in choices:
            return value
    raise ConfigError(f"{what} must be one of {', '.join(choices)}; got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value: Any, what: str, *, max: int | None = None) -> int:  # noqa: A002 - the brief's name
    """``value`` as an ``int`` ≥ 1 (and ≤ ``max`` when given); bools and floats are refused.

    Raises:
        ConfigError: ``"<what> must be a positive integer, got 0"`` or ``"… ≤ max, got …"``.
    """
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    if max is not None and value > max:
        raise ConfigError(f"{what} must be a positive integer <= {max}, got {value!r}")
    return int(value)


def nonnegative_int(value: Any, what: str) -> int:
    """``value`` as an ``int`` ≥ 0; bools and floats are refused.

    Raises:
        ConfigError: ``"<what> must be an integer >= 0, got -1"``.
    """
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{what} must be an integer >= 0, got {value!r}")
    return int(value)


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    if math.isinf(hi) and hi > 0:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if math.isinf(lo) and lo < 0:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def bounded(
    value: Any,
    what: str,
    lo: float = -math.inf,
    hi: float = math.inf,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` in the interval from ``lo`` to ``hi``.

    Args:
        value: a real number (bools and strings are refused).
        what: the name in the message.
        lo, hi: the bounds (infinite: unbounded on that side).
        lo_open, hi_open: exclude the bound itself (``lo_open=True, lo=0``: ``> 0``).

    Raises:
        ConfigError: ``"<what> must be a finite number > 0, got -1.0"``.
    """
    rng = _interval(lo, hi, lo_open, hi_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{what} must be a finite number {rng}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        raise ConfigError(f"{what} must be a finite number {rng}, got {value!r}")
    return v


DAMPING_MIN = 1e-150
DAMPING_MAX = 1e150
"""Absolute dampings outside [1e-150, 1e150] are refused: ζ = F•⁻¹∇h then over- or underflows in
float64 for any ∇h of ordinary size (a denormal λ gave ζ = ±inf, 1e300 gave ζ = 0)."""


def damping(value: Any) -> float:
    """An absolute λ as a float; a one-line :class:`DampingError` unless it is finite, > 0 and
    within [:data:`DAMPING_MIN`, :data:`DAMPING_MAX`]. The one check behind
    :func:`fisherlab.operators.check_damping` and :func:`fisherlab.damping.resolve_damping`.
    """
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise DampingError(f"damping must be a number > 0 or a fisherlab.Damping, got {value!r}") from None
    if not math.isfinite(lam) or lam <= 0:
        raise DampingError(f"damping λ must be finite and > 0 (the regularized Fisher F + λI), got {value!r}")
    if not DAMPING_MIN <= lam <= DAMPING_MAX:
        raise DampingError(
            f"damping λ = {lam!r} is outside [{DAMPING_MIN:g}, {DAMPING_MAX:g}]: F•⁻¹ = λ⁻¹… would over- or underflow "
            "float64 (every ζ ±inf or 0); state it in the Fisher's scale, e.g. Damping(1e-3, 'max')"
        )
    return lam


def same_damping(a: float, b: float, what: str) -> float:
    """``a`` when the dampings ``a`` and ``b`` agree to :data:`DAMPING_RTOL`.

    Args:
        a: the λ expected (checked by :func:`damping`).
        b: the λ of ``what`` (checked too).
        what: the thing whose λ is ``b``, e.g. ``"the exact operator"``.

    Raises:
        DampingError: ``"<what> has damping 0.1, expected 0.01"``.
    """
    la, lb = damping(a), damping(b)
    if abs(la - lb) > DAMPING_RTOL * max(la, lb):
        raise DampingError(f"{what} has damping {lb:g}, expected {la:g}")
    return la


def available_device(value: Any, what: str = "device") -> Any:
    """A torch device that exists on this machine (``None`` passes through); one line otherwise,
    e.g. ``cuda`` where there is no GPU (torch itself raises an ``AssertionError`` deep inside).
    ``what``: a CLI flag (``"--device"``) or a keyword (``"device"``), as the user wrote it."""
    if value is None:
        return None
    import torch

    flag = what.startswith("-")
    shown, cpu = (str(value), f"{what} cpu") if flag else (f"{value!r}", f"{what}='cpu'")
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{what} {shown}: not a torch device (cpu, cuda, cuda:1, mps …)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {shown}: CUDA is not available on this machine; use {cpu}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{what} {shown}: there are {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{what} {shown}: MPS is not available on this machine; use {cpu}")
    return value
