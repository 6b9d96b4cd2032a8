"""Reproduction of the paper's §4 (Figs. 2, 4(a) and 5) with a numeric verdict.

**The paper's settings** (:func:`paper_config`, ``analysis/reproduce_paper.py --settings paper``,
the script's default; issue 13): losses averaged over the outputs (the damped optimizers step on
captures rescaled to those units, :mod:`.units`), B, λ and Fisher sub-batch of the released run
logs per problem (:data:`.config.PAPER_SETTINGS`), three seeds, the paper's equations and the
released code's protocol (``protocol="released-code"``) side by side, the exact natural gradient,
Fig. 5 both ways (:func:`.runner.released_rows`: the true error change against the exact ζ
beside the gap as that code logs it, on the same batches) and a verdict table with one row per
claim (:data:`.verdicts.CLAIMS`) and intervals over seeds and batches (:func:`.verdicts.claim_rows`).
The rest of this docstring describes the earlier single-seed **default settings**
(:func:`default_config`, ``--settings default``).

:func:`reproduce` (:mod:`.runner`) trains, on the CPU and with one seed, each optimizer of the paper's figures
on CPU-sized versions of its problems and writes CSVs of every curve, PNG+PDF figures and a
markdown verdict ``report.md`` into ``out_dir``:

| figure | problem (default run) | optimizers |
|---|---|---|
| Fig. 2 | ``mnist-ae`` at width 0.1 on the embedded MNIST (optionally ``curves-ae`` on ``curves``) | KFAC, NICO, SPECTRAL, KRY-NICO, RESIDU, KRY-RESIDU, TAYLOR, PREVIOUS (TKO), SGD, ADAM |
| Fig. 4(a) | ``deep-linear-64`` (64 Linear layers of width 10 with BatchNorm) on ``fashion-mnist`` when Debian's package is installed, else Tselepidis et al.'s ``random-vectors`` (regression, ``mse``) | the same |
| Fig. 5 | the gap 𝔈(β*) − 𝔈(0) (4.6) and the reduction ratio 𝔈(β*)/𝔈(0) (4.1) of every coarse space and of TKO, on the *KFAC* trajectory of Fig. 2 (one :func:`fisherlab.compare` every ``gap_every`` steps), and each two-level optimizer's own gap (``record_gap``) | — |

Protocol (the paper's §4, shrunk; every choice is a field of :class:`Problem` / :class:`ReproConfig`, :mod:`.config`):

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

Verdict criteria (:class:`Criteria`; pure functions in :mod:`.verdicts`: :func:`overlay_verdict`,
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

Layout: :mod:`.config` (problems, grids, seeds, criteria; the method sets derived from
:mod:`fisherlab.methods`), :mod:`.results` (the run records), :mod:`.runner` (training runs, grid
search, the gap on the KFAC trajectory, :func:`reproduce`), :mod:`.verdicts` (pure functions from
numbers to :class:`Verdict`), :mod:`.report` (CSVs, ``summary.json``, ``report.md``; the figures
are :func:`fisherlab.plots.plot_training_curves` and :func:`fisherlab.plots.plot_gap_trajectories`).
The script is ``analysis/reproduce_paper.py``.
"""

from __future__ import annotations

from .config import (
    BASELINES,
    CURVATURE,
    GAP_METHODS,
    MULTIPLICATIVE_GAP_METHODS,
    PREVIOUS,
    REFERENCE,
    TWO_LEVEL,
    Criteria,
    Problem,
    ReproConfig,
    default_config,
    paper_config,
    summed_units,
    fig4a_data,
    gap_method_of,
    legend,
)
from .report import plot_gaps, plot_training, render_report, write_outputs
from .results import ProblemResult, ReproResult, RunResult
from .runner import reproduce, run_problem, run_training
from .verdicts import (
    Cell,
    Claim,
    Verdict,
    compute_claims,
    baseline_verdict,
    compute_verdicts,
    final_loss,
    gain_verdict,
    gap_verdict,
    overlay_verdict,
)

__all__ = [
    "TWO_LEVEL",
    "CURVATURE",
    "BASELINES",
    "GAP_METHODS",
    "MULTIPLICATIVE_GAP_METHODS",
    "REFERENCE",
    "PREVIOUS",
    "Criteria",
    "Problem",
    "ReproConfig",
    "RunResult",
    "ProblemResult",
    "ReproResult",
    "Verdict",
    "Cell",
    "Claim",
    "compute_claims",
    "default_config",
    "paper_config",
    "summed_units",
    "fig4a_data",
    "legend",
    "gap_method_of",
    "final_loss",
    "overlay_verdict",
    "gain_verdict",
    "gap_verdict",
    "baseline_verdict",
    "compute_verdicts",
    "run_training",
    "run_problem",
    "reproduce",
    "render_report",
    "plot_training",
    "plot_gaps",
    "write_outputs",
]
