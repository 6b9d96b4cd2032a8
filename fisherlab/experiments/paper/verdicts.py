"""The verdict criteria: pure functions from numbers to :class:`Verdict` records (no I/O, no torch).

(i) :func:`overlay_verdict` — every two-level method ends within ``rtol`` of KFAC's final loss;
(ii) :func:`gain_verdict` — the median relative gain over KFAC is small but positive;
(iii) :func:`gap_verdict` — no recorded gap (4.6) of a multiplicative method exceeds ``atol``;
and :func:`baseline_verdict`, the paper's side observation that KFAC beats SGD and Adam.
:func:`compute_verdicts` applies them to a reproduction's results (one seed, one protocol).

The verdict table (:func:`claim_rows`: one :class:`Claim` per claim of the paper, :data:`CLAIMS`,
one :class:`Cell` per protocol) judges numbers with their intervals over seeds and batches
(:mod:`fisherlab.intervals`): :func:`overlay_claim` (i), :func:`gain_claim` (ii),
:func:`gap_sign_claim` (iii), :func:`closeness_claim` (iv), :func:`ngd_claim` (v);
:func:`claim_data` extracts their inputs from a reproduction.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ...intervals import Interval, mean_interval

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
    "CLAIMS",
    "Cell",
    "Claim",
    "overlay_claim",
    "gain_claim",
    "gap_sign_claim",
    "closeness_claim",
    "ngd_claim",
    "claim_rows",
    "claim_data",
    "compute_claims",
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


# ---- the verdict table: one row per claim, one cell per protocol, intervals over seeds/batches ----


CLAIMS: dict[str, str] = {
    "i": "two-level ≈ KFAC in training on the autoencoders (Fig. 2: the curves are overlaid)",
    "ii": "a small gain of two-level over KFAC on the deep linear network (Fig. 4(a))",
    "iii": "𝔈(β*) − 𝔈(0) ≤ 0 throughout training, every two-level method and TKO (Fig. 5)",
    "iv": "two-level increments are 'much closer' to ζ than KFAC's, in the F•-norm (§5)",
    "v": "KFAC beats the exact natural gradient in training (§4.1, after Benzing)",
}
"""The paper's claims judged by the verdict table (its statement, in short)."""


@dataclass
class Cell:
    """One cell of the verdict table: the deciding number with its interval, and whether the
    claim holds on it (``None``: undecided, e.g. not run)."""

    holds: bool | None
    value: Interval
    text: str

    @property
    def label(self) -> str:
        return {True: "holds", False: "does not hold", None: "undecided"}[self.holds]


@dataclass
class Claim:
    """One row of the verdict table: the claim's key, the paper's statement, and a :class:`Cell`
    per protocol (``"paper"``, ``"released-code"``)."""

    key: str
    statement: str
    cells: dict[str, Cell]


def _na(why: str) -> Cell:
    return Cell(None, mean_interval([]), why)


def _pct(iv: Interval) -> str:
    """An interval of a fraction as percentages (``+3.1 % ± 2.0 %``)."""
    if iv.n == 0 or math.isnan(iv.mean):
        return "n/a"
    if not math.isfinite(iv.mean):
        return percent(iv.mean)
    hw = "" if iv.n < 2 or math.isnan(iv.half_width) else f" ± {100 * iv.half_width:.2g} %"
    return f"{100 * iv.mean:+.3g} %{hw}"


def _diff_by_seed(finals: Mapping[str, Mapping[int, float]], method: str, reference: str) -> list[float]:
    ref, own = finals.get(reference, {}), finals.get(method, {})
    return [relative_change(own[s], ref[s]) for s in sorted(set(ref) & set(own)) if math.isfinite(ref[s])]


def overlay_claim(finals: Mapping[str, Mapping[str, Mapping[int, float]]], *, reference: str = REFERENCE,
                  methods: Sequence[str] = _JUDGED, rtol: float = 0.05) -> Cell:
    """(i) per problem and two-level method, the relative difference (L_m − L_KFAC)/L_KFAC of the
    final losses per seed, as an interval over seeds; holds when every mean lies within ±rtol.
    The cell shows the worst (problem, method). A diverged method is +∞ (not ≈ KFAC).

    Args:
        finals: problem → optimizer → seed → final loss.
    """
    stats = []
    for prob, fin in finals.items():
        for m in methods:
            d = _diff_by_seed(fin, m, reference)
            if d:
                iv = Interval(math.inf, math.nan, len(d)) if any(not math.isfinite(v) for v in d) else mean_interval(d)
                stats.append((prob, m, iv))
    if not stats:
        return _na(f"{legend(reference)} diverged or no two-level run")
    inside = sum(abs(iv.mean) <= rtol for _, _, iv in stats)
    prob, m, worst = max(stats, key=lambda t: abs(t[2].mean))
    text = (f"worst {legend(m)} on {prob}: {_pct(worst)} (n = {worst.n} seeds); "
            f"{inside}/{len(stats)} (problem, method) means within ±{rtol:.0%}")
    return Cell(inside == len(stats), worst, text)


def gain_claim(finals: Mapping[str, Mapping[int, float]], *, reference: str = REFERENCE, methods: Sequence[str] = _JUDGED,
               gain_min: float = 0.01, gain_max: float = 0.25) -> Cell:
    """(ii) per seed the median over the two-level methods of the gain (L_KFAC − L_m)/L_KFAC, as an
    interval over seeds; holds when its mean lies in [gain_min, gain_max] (a diverged method's
    gain is −∞)."""
    ref = finals.get(reference, {})
    per_seed = []
    for s in sorted(ref):
        if not math.isfinite(ref[s]):
            continue
        g = [-relative_change(finals[m][s], ref[s]) for m in methods if m in finals and s in finals[m]]
        if g:
            per_seed.append(statistics.median(g))
    if not per_seed:
        return _na(f"{legend(reference)} diverged or no two-level run")
    iv = Interval(-math.inf, math.nan, len(per_seed)) if any(not math.isfinite(v) for v in per_seed) else mean_interval(per_seed)
    holds = gain_min <= iv.mean <= gain_max
    return Cell(holds, iv, f"median gain over KFAC {_pct(iv)} (n = {iv.n} seeds); a small gain is [{gain_min:.0%}, {gain_max:.0%}]")


def gap_sign_claim(gaps: Mapping[str, Sequence[tuple[int, float]]], *, logged: Mapping[str, Sequence[tuple[int, float]]] | None = None,
                   atol: float = 0.0) -> Cell:
    """(iii) the share of recorded gaps ≤ atol, per seed over every method and batch, as an
    interval over seeds; holds when every gap is ≤ atol (a missing gap is a violation). With
    ``logged`` (the released code's logged gaps of the same steps) its share is given beside.

    Args:
        gaps: method → (seed, true gap 𝔈(β) − 𝔈(0)) per recorded batch.
        logged: method → (seed, logged gap), optional.
    """
    def shares(d: Mapping[str, Sequence[tuple[int, float]]]) -> tuple[Interval, int, int, float]:
        by_seed: dict[int, list[bool]] = {}
        finite = []
        for vals in d.values():
            for s, v in vals:
                ok = v is not None and math.isfinite(v)
                by_seed.setdefault(s, []).append(ok and v <= atol)
                if ok:
                    finite.append(v)
        flat = [b for bs in by_seed.values() for b in bs]
        iv = mean_interval([sum(bs) / len(bs) for bs in by_seed.values()])
        return iv, sum(flat), len(flat), max(finite) if finite else math.nan

    iv, good, total, worst = shares(gaps)
    if total == 0:
        return _na("no gap recorded")
    bad = [m for m, vals in gaps.items() if any(not (v is not None and math.isfinite(v) and v <= atol) for _, v in vals)]
    text = f"{100 * iv.mean:.1f} %" + ("" if iv.n < 2 or math.isnan(iv.half_width) else f" ± {100 * iv.half_width:.2g} %")
    text += f" of the true gaps ≤ {atol:g} ({good}/{total}; max {worst:.3g}"
    text += f"; > 0 for {', '.join(legend(m) for m in bad)})" if bad else ")"
    if logged:
        liv, lgood, ltotal, lworst = shares(logged)
        if ltotal:
            text += f"; logged gap ≤ {atol:g}: {lgood}/{ltotal} (max {lworst:.3g})"
    return Cell(good == total, iv, text)


def closeness_claim(ratios: Mapping[str, Sequence[float]], *, closeness_max: float = 0.5) -> Cell:
    """(iv) per method the reduction ratio 𝔈(β)/𝔈(0) (the squared F•-error of the two-level
    increment relative to KFAC's) as an interval over batches and seeds; holds when every
    method's mean is ≤ closeness_max. The cell shows the median method's interval and the worst.

    Args:
        ratios: method → ratio per (batch, seed).
    """
    stats = [(m, mean_interval(v)) for m, v in ratios.items()]
    stats = [(m, iv) for m, iv in stats if iv.n]
    if not stats:
        return _na("no ratio recorded")
    ordered = sorted(stats, key=lambda t: t[1].mean)
    med_m, med = ordered[len(ordered) // 2]
    worst_m, worst = ordered[-1]
    inside = sum(iv.mean <= closeness_max for _, iv in stats)
    text = (f"median method {legend(med_m)} 𝔈(β)/𝔈(0) = {med.format('.3g')}; worst {legend(worst_m)} {worst.format('.3g')} "
            f"(n = {worst.n} batches × seeds); {inside}/{len(stats)} methods ≤ {closeness_max:g}")
    return Cell(inside == len(stats), med, text)


def ngd_claim(finals: Mapping[str, Mapping[str, Mapping[int, float]]], *, reference: str = REFERENCE, ngd: str = "ngd") -> Cell:
    """(v) per problem, (L_NG − L_KFAC)/L_KFAC of the final losses per seed, as an interval over
    seeds; holds when KFAC ends lower (mean > 0) on every problem. The cell shows the problem
    least favourable to KFAC."""
    stats = []
    for prob, fin in finals.items():
        d = _diff_by_seed(fin, ngd, reference)
        if d:
            iv = Interval(math.inf, math.nan, len(d)) if any(not math.isfinite(v) for v in d) else mean_interval(d)
            stats.append((prob, iv))
    if not stats:
        return _na("no exact natural-gradient run (or KFAC diverged)")
    prob, worst = min(stats, key=lambda t: t[1].mean)
    wins = sum(iv.mean > 0 for _, iv in stats)
    others = "; ".join(f"{p}: {_pct(iv)}" for p, iv in stats if p != prob)
    text = f"(L_NG − L_KFAC)/L_KFAC on {prob}: {_pct(worst)} (n = {worst.n} seeds)" + (f"; {others}" if others else "")
    text += f"; KFAC lower on {wins}/{len(stats)} problems"
    return Cell(wins == len(stats), worst, text)


def claim_rows(data: Mapping[str, Mapping[str, Any]], criteria: Criteria) -> list[Claim]:
    """The verdict table from plain data, per protocol: ``data[protocol]`` has ``fig2_finals``
    (problem → optimizer → seed → final), ``fig4a_finals`` (optimizer → seed → final, or
    ``None``), ``gaps`` and ``logged`` (method → [(seed, gap)]), ``ratios`` (method → [ratio])."""
    out = []
    for key, statement in CLAIMS.items():
        cells: dict[str, Cell] = {}
        for protocol, d in data.items():
            if key == "i":
                cells[protocol] = overlay_claim(d["fig2_finals"], rtol=criteria.overlay_rtol) if d.get("fig2_finals") else _na("not run")
            elif key == "ii":
                cells[protocol] = gain_claim(d["fig4a_finals"], gain_min=criteria.gain_min, gain_max=criteria.gain_max) if d.get("fig4a_finals") else _na("not run")
            elif key == "iii":
                cells[protocol] = gap_sign_claim(d.get("gaps") or {}, logged=d.get("logged"), atol=criteria.gap_atol)
            elif key == "iv":
                cells[protocol] = closeness_claim(d.get("ratios") or {}, closeness_max=criteria.closeness_max)
            else:
                finals = dict(d.get("fig2_finals") or {})
                if d.get("fig4a_finals"):
                    finals["deep-linear-64"] = d["fig4a_finals"]
                cells[protocol] = ngd_claim(finals)
        out.append(Claim(key, statement, cells))
    return out


def claim_data(result: Any) -> dict[str, dict[str, Any]]:
    """The plain data of :func:`claim_rows` from a :class:`~fisherlab.experiments.paper.results.ReproResult`
    (every protocol of its configuration). Gaps: on the KFAC trajectory (paper-equation rows and
    released-code rows of the same batches) and on each method's own trajectory; ratios on the
    KFAC trajectory."""
    protocols = tuple(result.config.protocols) or ("paper",)
    out: dict[str, dict[str, Any]] = {}
    for protocol in protocols:
        gaps: dict[str, list[tuple[int, float]]] = {m: [] for m in GAP_METHODS}
        logged: dict[str, list[tuple[int, float]]] = {m: [] for m in GAP_METHODS}
        ratios: dict[str, list[float]] = {m: [] for m in GAP_METHODS}
        for pr in result.gap_problems:
            for run in pr.replicas or pr.runs.values():
                if run.optimizer == REFERENCE and run.protocol == "paper":
                    for r in run.gap_rows:
                        if r.get("protocol", "paper") == protocol and r["method"] in gaps:
                            gaps[r["method"]].append((run.seed, r["gap"]))
                            logged[r["method"]].append((run.seed, r.get("logged_gap", r["gap"])))
                            ratios[r["method"]].append(r["reduction_ratio"])
                m = gap_method_of(run.optimizer)
                if m is not None and run.protocol == protocol:
                    for r in run.rows:
                        gaps[m].append((run.seed, r["gap"]))
                        logged[m].append((run.seed, r.get("logged_gap", r["gap"])))
        out[protocol] = {
            "fig2_finals": {pr.problem.key: pr.finals_by_seed(protocol) for pr in result.fig2},
            "fig4a_finals": result.fig4a.finals_by_seed(protocol) if result.fig4a is not None else None,
            "gaps": {m: v for m, v in gaps.items() if v},
            "logged": {m: v for m, v in logged.items() if v} if protocol != "paper" else None,
            "ratios": {m: v for m, v in ratios.items() if v},
        }
    return out


def compute_claims(result: Any) -> list[Claim]:
    """The verdict table of a reproduction (:func:`claim_data` then :func:`claim_rows`)."""
    return claim_rows(claim_data(result), result.config.criteria)
