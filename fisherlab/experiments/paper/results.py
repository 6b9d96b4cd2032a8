"""The records of a reproduction: one training run, one problem, the whole run (data only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import Problem, ReproConfig

__all__ = ["RunResult", "ProblemResult", "ReproResult"]


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
        final: the final loss (:func:`~fisherlab.experiments.paper.verdicts.final_loss`).
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


@dataclass
class ProblemResult:
    """A problem's grid search and final runs.

    Attributes:
        problem: the :class:`~fisherlab.experiments.paper.config.Problem`.
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


@dataclass
class ReproResult:
    """What :func:`~fisherlab.experiments.paper.reproduce` returns.

    Attributes:
        config: the configuration.
        fig2: one :class:`ProblemResult` per autoencoder problem.
        fig4a: the deep linear problem's result (``None`` when skipped).
        verdicts: ``"i"``, ``"ii"``, ``"iii"`` (and ``"baselines"``) →
            :class:`~fisherlab.experiments.paper.verdicts.Verdict`; with several Fig. 2
            problems, (i) holds when it holds on each.
        seconds: total wall time.
        threads: torch's intra-op threads during the run.
        files: the files written.
    """

    config: ReproConfig
    fig2: list[ProblemResult]
    fig4a: ProblemResult | None
    verdicts: dict  # str → Verdict
    seconds: float
    threads: int
    files: list[Path] = field(default_factory=list)

    @property
    def problems(self) -> list[ProblemResult]:
        """Fig. 2's results, then Fig. 4(a)'s (when run)."""
        return list(self.fig2) + ([self.fig4a] if self.fig4a is not None else [])
