"""The verdict criteria: pure functions from numbers to :class:`Verdict` records (no I/O, no torch).

(i) :func:`overlay_verdict` — every two-level method ends within ``rtol`` of KFAC's final loss;
(ii) :func:`gain_verdict` — the median relative gain over KFAC is small but positive;
(iii) :func:`gap_verdict` — no recorded gap (4.6) of a multiplicative method exceeds ``atol``;
and :func:`baseline_verdict`, the paper's side observation that KFAC beats SGD and Adam.
:func:`compute_verdicts` applies them to a reproduction's results.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .config import BASELINES, GAP_METHODS, MULTIPLICATIVE_GAP_METHODS, PREVIOUS, REFERENCE, TWO_LEVEL, Criteria, gap_method_of, legend
from .results import ProblemResult

__all__ = [
    "Verdict",
    "final_loss",
    "relative_change",
    "percent",
    "overlay_verdict",
    "gain_verdict",
    "gap_verdict",
    "baseline_verdict",
    "combine",
    "gap_trajectories_verdict",
    "gaps_by_method",
    "compute_verdicts",
]


@dataclass
class Verdict:
    """A finding's verdict.

    Attributes:
        holds: ``True``/``False``, or ``None`` when it cannot be decided (e.g. KFAC diverged).
        summary: one sentence with the deciding numbers.
        rows: per-method details (for the report's tables).
    """

    holds: bool | None
    summary: str
    rows: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``"holds"``, ``"does not hold"`` or ``"undecided"``."""
        return {True: "holds", False: "does not hold", None: "undecided"}[self.holds]


def final_loss(losses: Sequence[float], window: int, *, diverged: bool = False) -> float:
    """The mean of the last ``window`` losses; ``inf`` for a diverged run or a non-finite mean."""
    if diverged or not losses:
        return math.inf
    tail = [float(v) for v in losses[-max(1, window):]]
    m = sum(tail) / len(tail)
    return m if math.isfinite(m) else math.inf


def relative_change(a: float, ref: float) -> float:
    """(a − ref)/|ref| (``inf`` when a is not finite)."""
    if not math.isfinite(a):
        return math.inf
    return (a - ref) / abs(ref) if ref != 0 else (0.0 if a == ref else math.inf)


def percent(x: float) -> str:
    """``x`` as a signed percentage (``+4.90 %``); ``diverged`` / ``−∞ (diverged)`` when not finite."""
    if not math.isfinite(x):
        return "diverged" if x > 0 else "−∞ (diverged)"
    return f"{100 * x:+.2f} %"


_JUDGED = TWO_LEVEL + (PREVIOUS,)


def overlay_verdict(final: Mapping[str, float], *, reference: str = REFERENCE, methods: Sequence[str] = _JUDGED, rtol: float = 0.05) -> Verdict:
    """(i) Two-level ≈ KFAC: every method's final loss is within ``rtol`` (relative) of KFAC's.

    Args:
        final: optimizer → final loss (``inf`` when diverged).
        reference: the one-level method.
        methods: the two-level methods judged (those absent from ``final`` are skipped).
        rtol: the tolerance (0.05 = 5 %).
    """
    ref = final.get(reference, math.inf)
    judged = [m for m in methods if m in final]
    if not math.isfinite(ref) or not judged:
        return Verdict(None, f"undecided: {legend(reference)} diverged or no two-level run")
    rows = []
    for m in judged:
        d = relative_change(final[m], ref)
        rows.append({"method": m, "legend": legend(m), "final": final[m], "rel_diff": d, "within": abs(d) <= rtol})
    inside = sum(r["within"] for r in rows)
    worst = max(rows, key=lambda r: abs(r["rel_diff"]))
    holds = inside == len(rows)
    summary = (
        f"{inside}/{len(rows)} two-level methods end within ±{rtol:.0%} of KFAC's final loss {ref:.4g}; "
        f"largest deviation {worst['legend']} {percent(worst['rel_diff'])}"
    )
    return Verdict(holds, summary, rows)


def gain_verdict(final: Mapping[str, float], *, reference: str = REFERENCE, methods: Sequence[str] = _JUDGED, gain_min: float = 0.01, gain_max: float = 0.25) -> Verdict:
    """(ii) A small gain over KFAC: gain_min ≤ median_m (L_KFAC − L_m)/L_KFAC ≤ gain_max.

    A diverged method has gain −∞. Args as in :func:`overlay_verdict`.
    """
    ref = final.get(reference, math.inf)
    judged = [m for m in methods if m in final]
    if not math.isfinite(ref) or not judged:
        return Verdict(None, f"undecided: {legend(reference)} diverged or no two-level run")
    rows = []
    for m in judged:
        g = -relative_change(final[m], ref)
        rows.append({"method": m, "legend": legend(m), "final": final[m], "gain": g})
    gains = sorted(r["gain"] for r in rows)
    med = statistics.median(gains)
    better = sum(g > 0 for g in gains)
    holds = gain_min <= med <= gain_max
    if med < gain_min:
        why = f"below the {gain_min:.0%} needed for a gain"
    elif med > gain_max:
        why = f"above the {gain_max:.0%} bound of a *small* gain"
    else:
        why = f"within [{gain_min:.0%}, {gain_max:.0%}]"
    summary = (
        f"median gain of the two-level methods over KFAC (final loss {ref:.4g}) is {percent(med)}, {why}; "
        f"{better}/{len(rows)} methods end below KFAC"
    )
    return Verdict(holds, summary, rows)


def gap_verdict(gaps: Mapping[str, Sequence[float]], *, methods: Sequence[str] = MULTIPLICATIVE_GAP_METHODS, atol: float = 0.0) -> Verdict:
    """(iii) No recorded gap (4.6) of a multiplicative method exceeds ``atol`` (0: all ≤ 0).

    The theorem is 𝔈(β*) − 𝔈(0) = −(R_0r)ᵀF_coarse⁻¹(R_0r) ≤ 0, with equality only when R_0r = 0
    (the coarse space sees nothing of the residual, e.g. a spectral space orthogonal to it); so a
    gap of exactly 0 (or −1e-30) is no violation but no reduction either — the reduction ratio
    shows which. A missing (NaN) gap counts as a violation.

    Args:
        gaps: method → its recorded gaps.
        methods: the methods judged (the others in ``gaps``, e.g. ``tko``, are reported only).
        atol: the threshold.
    """
    rows = []
    for m, vals in gaps.items():
        finite = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
        n_bad = sum(v > atol for v in finite)
        rows.append(
            {
                "method": m,
                "legend": legend(m),
                "judged": m in methods,
                "n": len(finite),
                "n_missing": len(vals) - len(finite),
                "n_negative": sum(v < 0 for v in finite),
                "n_violations": n_bad,
                "max_gap": max(finite) if finite else math.nan,
                "median_gap": statistics.median(finite) if finite else math.nan,
            }
        )
    judged = [r for r in rows if r["judged"]]
    if not judged or any(r["n"] == 0 for r in judged):
        return Verdict(None, "undecided: no gap recorded for some multiplicative method", rows)
    viol = sum(r["n_violations"] + r["n_missing"] for r in judged)
    total = sum(r["n"] + r["n_missing"] for r in judged)
    worst = max(judged, key=lambda r: r["max_gap"])
    holds = viol == 0
    summary = (
        f"{total - viol}/{total} recorded gaps of the {len(judged)} multiplicative methods are ≤ {atol:g}; "
        f"the largest is {worst['max_gap']:.3g} ({worst['legend']})"
    )
    return Verdict(holds, summary, rows)


def baseline_verdict(final: Mapping[str, float], *, reference: str = REFERENCE, baselines: Sequence[str] = BASELINES) -> Verdict:
    """The paper's first observation on Fig. 2: KFAC ends below every first-order baseline."""
    ref = final.get(reference, math.inf)
    present = [b for b in baselines if b in final]
    if not present:
        return Verdict(None, "undecided: no baseline run")
    best = min(present, key=lambda b: final[b])
    holds = math.isfinite(ref) and ref < final[best]
    summary = (
        f"KFAC {ref:.4g} vs best baseline {legend(best)} {final[best]:.4g} "
        f"({percent(relative_change(ref, final[best])) if math.isfinite(final[best]) else 'baseline diverged'})"
    )
    return Verdict(holds, summary, [{"method": b, "final": final[b]} for b in present])


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """One verdict over several problems: holds when each holds, undecided when any is."""
    if len(verdicts) == 1:
        return verdicts[0]
    holds: bool | None = None if any(v.holds is None for v in verdicts) else all(v.holds for v in verdicts)
    return Verdict(holds, " | ".join(v.summary for v in verdicts), [r for v in verdicts for r in v.rows])


def gap_trajectories_verdict(on_kfac: Mapping[str, Sequence[float]], own: Mapping[str, Sequence[float]], *, atol: float = 0.0) -> Verdict:
    """(iii) over both trajectories: :func:`gap_verdict` on the KFAC trajectory and on each
    optimizer's own (methods without own gaps are left out); rows tagged ``trajectory``
    ``"KFAC"`` / ``"own"``. Undecided when the KFAC trajectory is; own gaps can only fail it."""
    v_kfac = gap_verdict(on_kfac, atol=atol)
    v_own = gap_verdict({m: g for m, g in own.items() if g}, atol=atol)
    for r in v_kfac.rows:
        r["trajectory"] = "KFAC"
    for r in v_own.rows:
        r["trajectory"] = "own"
    holds = None if v_kfac.holds is None else (v_kfac.holds and v_own.holds is not False)
    return Verdict(holds, f"KFAC trajectory: {v_kfac.summary}. Own trajectories: {v_own.summary}.", v_kfac.rows + v_own.rows)


def gaps_by_method(fig2: Sequence[ProblemResult]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(gaps on the KFAC trajectory, gaps on each optimizer's own trajectory), by compare name."""
    on_kfac: dict[str, list[float]] = {m: [] for m in GAP_METHODS}
    own: dict[str, list[float]] = {m: [] for m in GAP_METHODS}
    for pr in fig2:
        kfac = pr.runs.get(REFERENCE)
        if kfac is not None:
            for r in kfac.gap_rows:
                on_kfac[r["method"]].append(r["gap"])
        for o, run in pr.runs.items():
            m = gap_method_of(o)
            if m is not None:
                own[m].extend(r["gap"] for r in run.rows)
    return on_kfac, own


def compute_verdicts(fig2: Sequence[ProblemResult], fig4a: ProblemResult | None, criteria: Criteria) -> dict[str, Verdict]:
    """The three verdicts (and the baseline observation) from the results."""
    out: dict[str, Verdict] = {}
    if fig2:
        out["i"] = combine([overlay_verdict(p.finals, rtol=criteria.overlay_rtol) for p in fig2])
        out["baselines"] = combine([baseline_verdict(p.finals) for p in fig2])
    else:
        out["i"] = Verdict(None, "not run")
    if fig4a is not None:
        out["ii"] = gain_verdict(fig4a.finals, gain_min=criteria.gain_min, gain_max=criteria.gain_max)
    else:
        out["ii"] = Verdict(None, "not run")
    on_kfac, own = gaps_by_method(fig2)
    out["iii"] = gap_trajectories_verdict(on_kfac, own, atol=criteria.gap_atol)
    return out
