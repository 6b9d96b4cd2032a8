"""Memory plans: the big allocations of an analysis, counted before anything is computed.

``compare(..., memory="8GiB")`` (CLI ``--memory 8GiB``) plans, from the Jacobian's shapes alone:

| stage | bytes (float64) | kept |
|---|---|---|
| the Jacobian's factors / dense rows | Σ_i numel · 8 | resident |
| per-layer Grams K_i, K, its eigenvectors W, the Woodbury Cholesky (Woodbury path only) | (ℓ + 3)·N²·8 | resident |
| a conv layer's Gram temporaries: dense rows ``N × p_i`` or the ``(N·T)²`` pair Gram | max over layers | transient |
| KFAC factors and eigenbases | Σ_i 2·(d_in'² + d_out²)·8 | resident |
| p-sized vectors (∇h, ζ, ζ_KFAC, a method's increment and error, temporaries) | 8·p·8 | resident |
| Lanczos / SLQ bases ``[c, m, p]`` (spectra) | c·m·p·8 | transient |

A plan whose peak (resident + the largest transient) exceeds the budget is refused with one line
naming the flag (:class:`~fisherlab.errors.MemoryBudgetError`); a Lanczos/SLQ basis is sized to
what the budget leaves (:func:`slq_steps_within`). The counts are the allocations fisherlab makes
itself — torch's allocator, the capture in float32 and the interpreter come on top — so leave a
margin (the planner refuses at 100 % of the budget).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from .errors import MemoryBudgetError
from .jacobian import Jacobian, conv_gram_path
from .operators.exact import GRAM_BUDGET_BYTES

__all__ = ["parse_bytes", "Stage", "Plan", "plan_compare", "plan_spectra", "slq_steps_within", "MIN_SLQ_STEPS"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

MIN_SLQ_STEPS = 8
"""Fewest Lanczos steps per probe a budget-sized SLQ may run (fewer: refused)."""


def parse_bytes(memory: int | float | str) -> int:
    """Bytes from ``8589934592``, ``"8GiB"``, ``"512 MiB"``, ``"16GB"`` (a one-line error otherwise)."""
    if isinstance(memory, bool):
        raise MemoryBudgetError(f"memory must be bytes or a size like '8GiB', got {memory!r}")
    if isinstance(memory, (int, float)):
        value = float(memory)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(memory))
        if not m or m.group(2).lower() not in _UNITS:
            raise MemoryBudgetError(f"memory must be bytes or a size like '8GiB', '512MiB', '16GB', got {memory!r}")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise MemoryBudgetError(f"memory must be a positive size, got {memory!r}")
    return int(value)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


@dataclass(frozen=True)
class Stage:
    """One planned allocation: ``name``, ``bytes``, ``resident`` (kept to the end) or transient."""

    name: str
    bytes: int
    resident: bool = True


@dataclass
class Plan:
    """The planned allocations of one analysis against ``budget`` bytes.

    ``peak`` = Σ resident + the largest transient; :meth:`check` refuses a plan over budget.
    """

    what: str
    budget: int
    stages: list[Stage] = field(default_factory=list)

    @property
    def resident(self) -> int:
        return sum(s.bytes for s in self.stages if s.resident)

    @property
    def peak(self) -> int:
        return self.resident + max((s.bytes for s in self.stages if not s.resident), default=0)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    @property
    def largest(self) -> Stage:
        return max(self.stages, key=lambda s: s.bytes)

    def check(self) -> "Plan":
        """This plan; a one-line :class:`MemoryBudgetError` naming ``--memory`` when it does not fit."""
        if not self.fits:
            big = self.largest
            raise MemoryBudgetError(
                f"{self.what} needs ~{_gib(self.peak)} but the memory budget is {_gib(self.budget)} "
                f"(largest: {big.name}, {_gib(big.bytes)}); raise --memory (memory=) or use a smaller batch"
            )
        return self

    def table(self) -> str:
        """The stages, one per line, with the peak and the budget."""
        lines = [f"{s.name:<58} {_gib(s.bytes):>12} {'resident' if s.resident else 'transient'}" for s in self.stages]
        lines.append(f"{'peak':<58} {_gib(self.peak):>12} of {_gib(self.budget)}")
        return "\n".join(lines)


def _woodbury(jac: Jacobian) -> bool:
    """The ``solver="auto"`` rule of :class:`~fisherlab.operators.ExactFisher` (Woodbury or CG)."""
    N, p = jac.N, jac.p
    return (N * N * 8 <= GRAM_BUDGET_BYTES and N < p) or N <= 2048


def _base_stages(jac: Jacobian, vectors: int) -> list[Stage]:
    N, p = jac.N, jac.p
    item = 8
    held = 0
    for lj in jac.layers:
        for t in (lj.a, lj.g, lj.dense, lj.A_stored, lj.G_stored):
            held += 0 if t is None else t.numel() * t.element_size()
    stages = [Stage("Jacobian factors / dense rows", held)]
    if _woodbury(jac):
        stages.append(Stage(f"N × N Grams K_i (ℓ = {len(jac.layers)}), K, eigh, Cholesky (N = {N:,})",
                            (len(jac.layers) + 3) * N * N * item))
        temp, name = 0, ""
        for lj in jac.layers:
            if lj.a is None or lj.T == 1:
                continue
            B, K, T = lj.B, lj.K, lj.T
            d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
            if conv_gram_path(B, K, T, d_in, d_out) == "dense":
                b = N * lj.p * item
                what = f"dense rows N × p_i of '{lj.spec.name}' for its Gram"
            else:
                b = ((B * T) ** 2 + 2 * (N * T) ** 2) * item
                what = f"(N·T)² pair Grams of '{lj.spec.name}'"
            if b > temp:
                temp, name = b, what
        if temp:
            stages.append(Stage(name, temp, resident=False))
    stages.append(Stage("KFAC factors and eigenbases",
                        sum(2 * (lj.spec.d_in_bar ** 2 + lj.spec.d_out ** 2) * item for lj in jac.layers)))
    stages.append(Stage(f"{vectors} p-sized vectors (p = {p:,})", vectors * p * item))
    return stages


def plan_compare(jac: Jacobian, methods: Sequence[str] = (), *, memory: int | str) -> Plan:
    """The plan of :func:`fisherlab.compare` on ``jac`` (``methods`` for the message only)."""
    what = f"compare ({len(methods)} methods)" if methods else "compare"
    return Plan(what, parse_bytes(memory), _base_stages(jac, vectors=8))


def slq_steps_within(free: int, p: int, n_steps: int, *, itemsize: int = 8) -> int:
    """The Lanczos steps per probe (≤ ``n_steps``) whose basis ``[m, p]`` fits ``free`` bytes."""
    return max(0, min(n_steps, p, free // max(p * itemsize, 1)))


def plan_spectra(jac: Jacobian, *, memory: int | str, n_steps: int) -> tuple[Plan, int]:
    """The plan of :func:`fisherlab.spectra.spectra` and the SLQ/Lanczos basis bytes it leaves:
    refused when fewer than :data:`MIN_SLQ_STEPS` steps of one probe fit."""
    plan = Plan("spectra", parse_bytes(memory), _base_stages(jac, vectors=8))
    free = plan.budget - plan.peak
    m = slq_steps_within(max(free, 0), jac.p, n_steps)
    need = min(MIN_SLQ_STEPS, n_steps, jac.p)
    plan.stages.append(Stage(f"one Lanczos basis ({max(m, need)} steps × p)", max(m, need) * jac.p * 8, resident=False))
    plan.check()
    return plan, max(free, 0)
