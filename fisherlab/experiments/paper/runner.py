"""Training runs, the grid search, the gap on the KFAC trajectory, and the whole reproduction.

:func:`run_training` trains one optimizer on one problem (recording, with ``gap_every``, Fig. 5's
:func:`fisherlab.compare` rows along the way); :func:`run_problem` grid-searches then trains
every optimizer of a problem; :func:`reproduce` runs every problem under one progress bar,
computes the verdicts (:mod:`.verdicts`) and writes the outputs (:mod:`.report`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from ...io.progress import tqdm

from ... import capture, compare
from ...errors import FisherlabError
from ...train import OPTIMIZERS, TrainConfig, train
from .config import BASELINES, CURVATURE, GAP_METHODS, REFERENCE, Problem, ReproConfig, legend, resolved_tune
from .report import write_outputs
from .results import ProblemResult, ReproResult, RunResult
from .verdicts import compute_verdicts, final_loss

__all__ = ["run_training", "run_problem", "reproduce", "n_runs"]


def _training_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The :data:`fisherlab.train.OPTIMIZERS` factory ``factory(params, config, *, model)`` of ``name``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (registered: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name]


def _compare_rows(model: nn.Module, x: Tensor, y: Tensor, *, loss: str, damping: float, generator: torch.Generator, step: int, fisher: str, n_samples: int) -> list[dict]:
    """Fig. 5: :func:`fisherlab.compare` of KFAC, every coarse space and TKO on one batch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap = capture(model, x.detach().cpu(), y.detach().cpu(), loss=loss, fisher=fisher, n_samples=n_samples,
                      generator=generator, device="cpu", dtype=torch.float64)
        table = compare(cap, damping, [REFERENCE, *GAP_METHODS])
    notes = "; ".join(sorted({str(w.message).split(";")[0] for w in caught if issubclass(w.category, RuntimeWarning)}))
    out = []
    for r in table.rows:
        if r["method"] == REFERENCE:
            continue
        out.append(
            {
                "step": step,
                "method": r["method"],
                "legend": legend(r["method"]),
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
        optimizer: a training-registry name (:data:`.config.CURVATURE` or :data:`.config.BASELINES`).
        lr: learning rate.
        damping: λ of the curvature methods (``None`` for SGD/Adam).
        steps: number of updates.
        cfg: seed, weight decay and curvature options.
        window: losses averaged into the final loss (default ``problem.final_window``).
        gap_every: Fig. 5 on this trajectory every this many steps (``None``: off).
    """
    curvature = optimizer in CURVATURE
    opts: dict[str, Any] = {}
    if curvature:
        if damping is None:
            raise ValueError(f"optimizer {optimizer!r} needs a damping")
        opts = {**cfg.curvature_options, "damping": float(damping), "record_gap": optimizer != REFERENCE}
    tc = TrainConfig(
        model=problem.model, data=problem.data, n=problem.n, data_seed=cfg.seed, batch_size=problem.batch_size,
        steps=steps, optimizer=optimizer, lr=float(lr), weight_decay=cfg.weight_decay, optimizer_options=opts,
        seed=cfg.seed, checkpoint_final=False, device="cpu", progress=False, plot=False,
    )
    base = _training_factory(optimizer)
    holder: dict[str, Any] = {}
    spent = [0.0]
    rows: list[dict] = []
    gap_rows: list[dict] = []
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    loss_name = tc.resolved(check_optimizer=False).loss

    def factory(params: list[nn.Parameter], config: Any, *, model: nn.Module) -> torch.optim.Optimizer:
        opt = base(params, config, model=model)
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
        optimizer=optimizer, legend=legend(optimizer), lr=float(lr),
        damping=None if damping is None else float(damping), rows=rows, diverged=diverged, error=error,
        seconds=seconds, gap_rows=gap_rows,
        final=final_loss(losses, window if window is not None else problem.final_window, diverged=diverged),
    )


# ---- one problem: grid search, then the final runs ------------------------------------------


def _grid_key(optimizer: str) -> str:
    """The key of ``Problem.lrs`` for ``optimizer``: ``"curvature"`` or its own name."""
    return "curvature" if optimizer in CURVATURE else optimizer


def _grid_plan(problem: Problem, tune: str) -> list[tuple[str, float, float | None]]:
    tuned = [o for o in problem.optimizers if o in BASELINES or o == REFERENCE or (tune == "all" and o in CURVATURE)]
    plan = []
    for o in tuned:
        lams: Sequence[float | None] = problem.dampings if o in CURVATURE else (None,)
        for lr in problem.lrs[_grid_key(o)]:
            for lam in lams:
                plan.append((o, lr, lam))
    return plan


def _needs_grid(problem: Problem, optimizer: str) -> bool:
    n = len(problem.lrs[_grid_key(optimizer)]) * (len(problem.dampings) if optimizer in CURVATURE else 1)
    return n > 1


def _hp(lr: float, lam: float | None) -> str:
    return f"lr={lr:g}" + ("" if lam is None else f" λ={lam:g}")


def run_problem(problem: Problem, cfg: ReproConfig, bar: Any = None) -> ProblemResult:
    """Grid search (short runs) then the final run of every optimizer of ``problem``.

    Args:
        problem: the problem.
        cfg: the configuration (seed, weight decay, curvature options, ``tune``).
        bar: a tqdm bar advanced once per run (optional).
    """
    tune = resolved_tune(problem, cfg)
    grid: list[dict] = []
    best: dict[str, tuple[float, float, float | None]] = {}
    for o, lr, lam in _grid_plan(problem, tune):
        if not _needs_grid(problem, o):
            best[o] = (math.nan, lr, lam)
            continue
        if bar is not None:
            bar.set_postfix_str(f"{problem.key} grid {legend(o)} {_hp(lr, lam)}")
        r = run_training(problem, o, lr, lam, problem.grid_steps, cfg, window=max(1, problem.grid_steps // 4))
        grid.append({"problem": problem.key, "optimizer": o, "legend": r.legend, "lr": lr, "damping": lam,
                     "steps": problem.grid_steps, "final": r.final, "diverged": r.diverged, "seconds": r.seconds})
        if o not in best or r.final < best[o][0]:
            best[o] = (r.final, lr, lam)
        if bar is not None:
            bar.update(1)
    selected: dict[str, tuple[float, float | None]] = {}
    for o in problem.optimizers:
        src = o if o in best else REFERENCE
        if src not in best:
            raise ValueError(f"no hyper-parameters for {o!r}: KFAC must be among the optimizers when tune='kfac'")
        selected[o] = (best[src][1], best[src][2])
    runs: dict[str, RunResult] = {}
    for o in problem.optimizers:
        lr, lam = selected[o]
        if bar is not None:
            bar.set_postfix_str(f"{problem.key} {legend(o)} {_hp(lr, lam)}")
        runs[o] = run_training(problem, o, lr, lam, problem.steps, cfg, gap_every=problem.gap_every if o == REFERENCE else None)
        if bar is not None:
            bar.update(1)
    return ProblemResult(problem, grid, selected, runs)


def n_runs(problem: Problem, cfg: ReproConfig) -> int:
    """The training runs :func:`run_problem` makes for ``problem`` (grid runs + final runs)."""
    tune = resolved_tune(problem, cfg)
    return sum(_needs_grid(problem, o) for o, _, _ in _grid_plan(problem, tune)) + len(problem.optimizers)


# ---- the whole reproduction -------------------------------------------------------------------


def reproduce(config: ReproConfig, out_dir: str | os.PathLike | None = None, *, threads: int | None = None) -> ReproResult:
    """Run the reproduction and (with ``out_dir``) write CSVs, figures and ``report.md``.

    Args:
        config: from :func:`.config.default_config` (or hand-made).
        out_dir: output folder (created); ``None`` writes nothing.
        threads: torch intra-op threads for the run (restored afterwards); ``None`` leaves
            torch's setting (1 is much faster on a loaded machine: :mod:`fisherlab.experiments.paper`).

    Returns:
        A :class:`.results.ReproResult`.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        total = sum(n_runs(p, config) for p in config.problems)
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
