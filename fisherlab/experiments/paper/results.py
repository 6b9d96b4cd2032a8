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
        seed: the run's seed (model initialisation, batch order, MC draws).
        protocol: ``"paper"`` or ``"released-code"`` (:data:`~fisherlab.experiments.paper.config.PROTOCOLS`).
        options: the optimizer options in fisherlab's units (lr, weight decay, damping, protocol …).
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
    seed: int = 0
    protocol: str = "paper"
    options: dict = field(default_factory=dict)


@dataclass
class ProblemResult:
    """A problem's grid search and final runs.

    Attributes:
        problem: the :class:`~fisherlab.experiments.paper.config.Problem`.
        grid: one row per grid run (optimizer, lr, damping, final, diverged).
        selected: optimizer → (lr, damping) used for its final run.
        runs: optimizer → its final :class:`RunResult` (the first seed, the paper's protocol).
        replicas: every final run (all seeds and protocols), ``runs``' included.
    """

    problem: Problem
    grid: list[dict]
    selected: dict[str, tuple[float, float | None]]
    runs: dict[str, RunResult]
    replicas: list[RunResult] = field(default_factory=list)

    def finals_by_seed(self, protocol: str = "paper") -> dict[str, dict[int, float]]:
        """Optimizer → seed → final loss under ``protocol``; an optimizer the protocol leaves
        unchanged (:data:`~fisherlab.experiments.paper.config.RELEASED_CODE_OPTIMIZERS`) falls
        back to its paper-protocol runs."""
        out: dict[str, dict[int, float]] = {}
        for r in self.replicas or list(self.runs.values()):
            if r.protocol == protocol:
                out.setdefault(r.optimizer, {})[r.seed] = r.final
        own = set(out)
        for r in self.replicas:
            if r.protocol == "paper" and r.optimizer not in own:
                out.setdefault(r.optimizer, {})[r.seed] = r.final
        return out

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
        fig5: the Fig.-5-only problems' results (cuda-convnet).
        load: the machine's 1-min load average at the start and at the end (``None``: unknown).
        claims: the verdict table's :class:`~fisherlab.experiments.paper.verdicts.Claim` rows.
    """

    config: ReproConfig
    fig2: list[ProblemResult]
    fig4a: ProblemResult | None
    verdicts: dict  # str → Verdict
    seconds: float
    threads: int
    files: list[Path] = field(default_factory=list)
    fig5: list[ProblemResult] = field(default_factory=list)
    claims: list = field(default_factory=list)
    load: tuple[float, float] | None = None

    @property
    def problems(self) -> list[ProblemResult]:
        """Fig. 2's results, then Fig. 4(a)'s (when run), then the Fig.-5-only ones."""
        return list(self.fig2) + ([self.fig4a] if self.fig4a is not None else []) + list(self.fig5)

    @property
    def gap_problems(self) -> list[ProblemResult]:
        """The problems with Fig. 5 rows (Fig. 2's and the Fig.-5-only ones)."""
        return [pr for pr in list(self.fig2) + list(self.fig5) if pr.problem.gap_every]
