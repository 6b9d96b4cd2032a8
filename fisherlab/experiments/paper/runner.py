"""Training runs, the grid search, the gap on the KFAC trajectory, and the whole reproduction.

:func:`run_training` trains one optimizer on one problem (recording, with ``gap_every``, Fig. 5's
:func:`fisherlab.compare` rows along the way); :func:`run_problem` grid-searches then trains
every optimizer of a problem; :func:`reproduce` runs every problem under one progress bar,
computes the verdicts (:mod:`.verdicts`) and writes the outputs (:mod:`.report`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from ...io.progress import tqdm

from ... import capture, compare
from ...damping import Damping, DampingScale
from ...errors import FisherlabError
from ...train import OPTIMIZERS, TrainConfig, train
from .config import (
    BASELINES, CURVATURE, DAMPED, GAP_METHODS, NGD, PREVIOUS, REFERENCE, RELEASED_CODE_OPTIMIZERS, TWO_LEVEL, Problem,
    ReproConfig, legend, resolved_tune, summed_units,
)
from .report import write_outputs
from .results import ProblemResult, ReproResult, RunResult
from .units import mean_loss_capture
from .verdicts import compute_claims, compute_verdicts, final_loss

__all__ = ["run_training", "run_problem", "reproduce", "n_runs", "damping_of", "optimizer_options"]


def damping_of(problem: Problem, value: float) -> float | Damping:
    """λ as the optimizers and :func:`fisherlab.compare` take it: the number itself in the
    absolute scale or when the captures are in the paper's units (``loss_units="mean"``: the
    ``mean-loss`` λ is then absolute), else ``Damping(value, problem.damping_scale)`` (resolved
    on every batch)."""
    if problem.loss_units == "mean" or DampingScale.parse(problem.damping_scale) is DampingScale.ABSOLUTE:
        return float(value)
    return Damping(float(value), problem.damping_scale)


def optimizer_options(problem: Problem, optimizer: str, damping: float | None, cfg: ReproConfig, *, protocol: str = "paper") -> dict[str, Any]:
    """The fisherlab optimizer options of a damped method under ``protocol`` (no lr/weight decay)."""
    if damping is None:
        raise ValueError(f"optimizer {optimizer!r} needs a damping")
    released = protocol == "released-code" and optimizer in RELEASED_CODE_OPTIMIZERS
    if optimizer == NGD or released:  # the preset sets the running averages and periods
        opts: dict[str, Any] = {k: v for k, v in cfg.curvature_options.items() if k in ("fisher", "n_samples")}
    else:
        opts = dict(cfg.curvature_options)
    if optimizer != NGD:
        opts["record_gap"] = optimizer != REFERENCE
    opts["damping"] = damping_of(problem, damping)
    if released:
        opts.update({"protocol": "released-code", "fisher_subbatch": problem.subbatch, **cfg.released_options})
    return opts


def _training_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The :data:`fisherlab.train.OPTIMIZERS` factory ``factory(params, config, *, model)`` of ``name``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (registered: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name]


def _capture64(model: nn.Module, x: Tensor, y: Tensor, *, loss: str, generator: torch.Generator, fisher: str, n_samples: int, d: float):
    """A float64 capture of (x, y) on the CPU in the problem's loss units (:mod:`.units`), and the
    warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap = capture(model, x.detach().cpu(), y.detach().cpu(), loss=loss, fisher=fisher, n_samples=n_samples,
                      generator=generator, device="cpu", dtype=torch.float64)
    return mean_loss_capture(cap, d), caught


def _compare_rows(cap: Any, damping: float | Damping, step: int, caught: Sequence[Any] = (), methods: Sequence[str] = GAP_METHODS) -> list[dict]:
    """Fig. 5 under the paper's equations: :func:`fisherlab.compare` of KFAC and ``methods``
    (every coarse space and TKO) on one batch (the gap is the true 𝔈(β*) − 𝔈(0), against the
    exact ζ)."""
    with warnings.catch_warnings(record=True) as more:
        warnings.simplefilter("always")
        table = compare(cap, damping, [REFERENCE, *methods])
    notes = "; ".join(sorted({str(w.message).split(";")[0] for w in [*caught, *more] if issubclass(w.category, RuntimeWarning)}))
    out = []
    for r in table.rows:
        if r["method"] == REFERENCE:
            continue
        out.append(
            {
                "step": step,
                "protocol": "paper",
                "method": r["method"],
                "legend": legend(r["method"]),
                "gap": r["gap"],
                "logged_gap": r["gap"],
                "reduction_ratio": r["reduction_ratio"],
                "ratio_vs_fine": r["reduction_ratio"],
                "energy_error": r["energy_error"],
                "energy_error_kfac": table.meta["energy_error_kfac"],
                "relative_error": r["relative_error"],
                "cosine": r["cosine"],
                "coarse_dim": r["coarse_dim"],
                "damping": table.meta["damping"],
                "warning": notes if "'" + r["method"] + "'" in notes else "",
            }
        )
    return out


def released_rows(cap: Any, sub: Any, damping: float, step: int, methods: Sequence[str]) -> list[dict]:
    """Fig. 5 under the released code's protocol on one batch: for each compare key of
    ``methods`` (coarse spaces and ``"tko"``), the operator with ``protocol="released-code"``
    (fine level (A+λI)⊗(G+λI), right-hand side R_0∇h, max-abs basis) solving β with the
    approximate coarse matrix of the sub-batch capture ``sub`` (λ·p_i diagonal,
    :func:`fisherlab.operators.coarse_matrix`). Per method: the true error change ``gap``
    (its :meth:`gap`), the gap as that code logs it (``logged_gap``), and against the exact ζ of
    the batch the ratios of the squared F•-errors to the released KFAC baseline's
    ((A+√λI)⊗(G+√λI), ``reduction_ratio``) and to its own fine level's (``ratio_vs_fine``).

    Args:
        cap: the batch's float64 capture (in the problem's loss units).
        sub: the sub-batch's capture (same units).
        damping: λ (absolute, in those units).
        step: recorded with the rows.
        methods: compare keys (:data:`.config.GAP_METHODS`).
    """
    from ...jacobian import Jacobian
    from ...operators import KFAC, TKO, ExactFisher, TwoLevelKFAC, coarse_matrix

    jac = Jacobian.from_capture(cap, torch.float64)
    jac_sub = Jacobian.from_capture(sub, torch.float64)
    w = cap.grad.to(torch.float64)
    exact = ExactFisher(jac, damping)
    zeta = exact.solve(w)

    def energy(z: Tensor) -> float:
        e = (z - zeta).reshape(-1, 1)
        return float((e * exact.apply(e)).sum())

    e_kfac = energy(KFAC.from_capture(jac, damping, "sqrt").solve(w))
    fine = KFAC.from_capture(jac, damping, "lambda")
    e_fine = energy(fine.solve(w))
    out = []
    for m in methods:
        row: dict[str, Any] = {"step": step, "protocol": "released-code", "method": m, "legend": legend(m), "damping": damping}
        try:
            if m == PREVIOUS:
                def build(**kw: Any) -> Any:
                    return TKO.from_capture(jac, damping, "nicolaides", base=fine, exact=exact, rhs=w,
                                            coarse_operator="exact", protocol="released-code", **kw)
            else:
                def build(**kw: Any) -> Any:
                    return TwoLevelKFAC.from_capture(jac, damping, m, base=fine, exact=exact, rhs=w,
                                                     protocol="released-code", **kw)
            op0 = build()
            F_hat = coarse_matrix(jac_sub, op0.basis, damping=damping, diagonal="layer-size")
            op = build(coarse_matrix=F_hat)
            e = energy(op.solve(w))
            row.update(gap=float(op.gap()), logged_gap=float(op.logged_gap()),
                       reduction_ratio=e / e_kfac if e_kfac > 0 else math.nan,
                       ratio_vs_fine=e / e_fine if e_fine > 0 else math.nan, energy_error=e, energy_error_kfac=e_kfac,
                       coarse_dim=int(op0.basis.m), warning="")
        except (FisherlabError, ValueError, ArithmeticError, RuntimeError) as err:  # e.g. a singular approximate coarse matrix
            row.update(gap=math.nan, logged_gap=math.nan, reduction_ratio=math.nan, ratio_vs_fine=math.nan,
                       energy_error=math.nan, energy_error_kfac=e_kfac, coarse_dim=None, warning=str(err).splitlines()[0][:160])
        out.append(row)
    return out


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def gap_method(optimizer: str) -> str:
    """The compare key of a two-level optimizer or TKO (``"kfac-2l-residuals"`` → ``"residuals"``)."""
    from .config import gap_method_of

    m = gap_method_of(optimizer)
    return m if m is not None else optimizer


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
    seed: int | None = None,
    protocol: str = "paper",
    released_gaps: bool = False,
) -> RunResult:
    """Train ``problem`` with ``optimizer`` for ``steps`` updates (nothing written to disk).

    A non-finite loss, capture or linear-algebra failure ends the run as *diverged* (its rows so
    far are kept). With ``gap_every``, Fig. 5's rows are computed every ``gap_every`` steps (and
    at step 1) on the training trajectory: the paper's equations by :func:`fisherlab.compare`,
    and with ``released_gaps`` also the released code's protocol (:func:`released_rows`), on
    the same capture. With ``problem.loss_units == "mean"`` the damped optimizers step on
    captures in the paper's units (the optimizers' ``loss_scale=1/d_y``: lr, λ and ω as the
    paper states them) and the recorded losses are the output-averaged ones.

    Args:
        problem: the problem (model, data, batch size, units of the hyper-parameters).
        optimizer: a training-registry name (:data:`.config.DAMPED` or :data:`.config.BASELINES`).
        lr: learning rate, in ``problem.loss_units`` (:func:`.config.summed_units`).
        damping: λ of the damped methods in ``problem.damping_scale`` (``None`` for SGD/Adam).
        steps: number of updates.
        cfg: weight decay and curvature options (and the default seed).
        window: losses averaged into the final loss (default ``problem.final_window``).
        gap_every: Fig. 5 on this trajectory every this many steps (``None``: off).
        seed: model initialisation, batch order and MC draws (``None``: ``cfg.seed``); the data
            subset is always ``cfg.seed``'s.
        protocol: ``"paper"`` or ``"released-code"`` (:func:`optimizer_options`).
        released_gaps: with ``gap_every``, add the released-code rows (:func:`released_rows`, on
            a sub-batch of ``problem.subbatch`` examples drawn with replacement).
    """
    seed = cfg.seed if seed is None else int(seed)
    d = problem.output_factor() if problem.loss_units == "mean" else 1.0
    damped = optimizer in DAMPED
    if damped and problem.loss_units == "mean":  # the optimizer steps on captures in the paper's units (.units)
        lr_u, wd_u, extra = float(lr), float(cfg.weight_decay), {}
    else:
        lr_u, wd_u, extra = summed_units(problem, optimizer, lr, cfg.weight_decay)
    opts: dict[str, Any] = dict(extra)
    if damped:
        opts.update(optimizer_options(problem, optimizer, damping, cfg, protocol=protocol))
        if d != 1.0:  # steps on the output-averaged loss: Capture.scaled(1/d) of every capture
            opts["loss_scale"] = 1.0 / d
    tc = TrainConfig(
        model=problem.model, data=problem.data, n=problem.n, data_seed=cfg.seed, batch_size=problem.batch_size,
        steps=steps, optimizer=optimizer, lr=float(lr_u), weight_decay=wd_u, optimizer_options=opts,
        seed=seed, checkpoint_final=False, device="cpu", progress=False, plot=False,
    )
    base = _training_factory(optimizer)
    holder: dict[str, Any] = {}
    spent = [0.0]
    rows: list[dict] = []
    gap_rows: list[dict] = []
    gen = torch.Generator().manual_seed(seed + 12345)
    loss_name = tc.resolved(check_optimizer=False).loss
    fisher = cfg.curvature_options.get("fisher", "mc")
    n_samples = cfg.curvature_options.get("n_samples", 1)
    lam_gap = damping_of(problem, float(damping)) if damping is not None else None
    gap_methods = list(GAP_METHODS) if problem.gap_methods is None else [gap_method(o) for o in problem.gap_methods]

    def factory(params: list[nn.Parameter], config: Any, *, model: nn.Module) -> torch.optim.Optimizer:
        opt = base(params, config, model=model)
        holder["opt"] = opt
        holder["t0"] = time.perf_counter()
        return opt

    def callback(step: int, model: nn.Module, batch: tuple[Tensor, Tensor], loss: float) -> None:
        now = time.perf_counter()
        hist = getattr(holder["opt"], "history", None)
        last = hist[-1] if hist else {}
        rows.append(
            {"step": step, "loss": loss / d, "wall_time": now - holder["t0"] - spent[0], "gap": _num(last.get("gap")),
             "logged_gap": _num(last.get("logged_gap", last.get("gap")))}
        )
        if gap_every and (step == 1 or step % gap_every == 0):
            x, y = batch
            cap, caught = _capture64(model, x, y, loss=loss_name, generator=gen, fisher=fisher, n_samples=n_samples, d=d)
            gap_rows.extend(_compare_rows(cap, lam_gap, step, caught, gap_methods))  # type: ignore[arg-type]
            if released_gaps:
                idx = torch.randint(0, x.shape[0], (problem.subbatch,), generator=gen)
                sub, _ = _capture64(model, x[idx], y[idx], loss=loss_name, generator=gen, fisher=fisher, n_samples=n_samples, d=d)
                gap_rows.extend(released_rows(cap, sub, float(gap_rows[-1]["damping"]), step, gap_methods))
            spent[0] += time.perf_counter() - now

    t0 = time.perf_counter()
    diverged, error = False, ""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not part of the Fisher.*")  # BatchNorm: plain SGD (documented)
        warnings.filterwarnings("ignore", message=".*capture with batch statistics.*")  # training-mode BatchNorm (documented)
        try:
            train(tc, None, optimizer_factory=factory, callbacks=[callback])
        except (FisherlabError, ValueError, ArithmeticError, RuntimeError) as err:  # non-finite loss/capture, eigh failure
            diverged, error = True, str(err).splitlines()[0][:200]
    seconds = time.perf_counter() - t0
    losses = [r["loss"] for r in rows]
    shown = {k: (str(v) if isinstance(v, Damping) else v) for k, v in opts.items()}
    return RunResult(
        optimizer=optimizer, legend=legend(optimizer), lr=float(lr),
        damping=None if damping is None else float(damping), rows=rows, diverged=diverged, error=error,
        seconds=seconds, gap_rows=gap_rows,
        final=final_loss(losses, window if window is not None else problem.final_window, diverged=diverged),
        seed=seed, protocol=protocol, options={"lr": lr_u, "weight_decay": wd_u, **shown},
    )


# ---- one problem: grid search, then the final runs ------------------------------------------


def _grid_key(problem: Problem, optimizer: str) -> str:
    """The key of ``Problem.lrs`` for ``optimizer``: its own name when given, else
    ``"curvature"`` for the damped methods."""
    if optimizer in problem.lrs:
        return optimizer
    return "curvature" if optimizer in DAMPED else optimizer


def _tuned(problem: Problem, optimizer: str, tune: str) -> bool:
    """Whether ``optimizer`` gets its own grid: the baselines, KFAC, the exact natural gradient,
    and every curvature method with ``tune="all"``; the others reuse KFAC's values."""
    return optimizer in BASELINES or optimizer in (REFERENCE, NGD) or (tune == "all" and optimizer in CURVATURE)


def _grid_plan(problem: Problem, tune: str) -> list[tuple[str, float, float | None]]:
    plan = []
    for o in problem.optimizers:
        if not _tuned(problem, o, tune):
            continue
        lams: Sequence[float | None] = problem.dampings if o in DAMPED else (None,)
        for lr in problem.lrs[_grid_key(problem, o)]:
            for lam in lams:
                plan.append((o, lr, lam))
    return plan


def _grid_plan_protocols(problem: Problem, cfg: ReproConfig, tune: str) -> list[tuple[str, float, float | None, str]]:
    """:func:`_grid_plan` under the paper's protocol, plus KFAC's own grid under each other
    protocol of the problem (the released code's KFAC baseline is another optimizer; the
    two-level methods and TKO of that protocol reuse its values)."""
    plan = [(o, lr, lam, "paper") for o, lr, lam in _grid_plan(problem, tune)]
    for protocol in cfg.problem_protocols(problem):
        if protocol != "paper":
            plan += [(o, lr, lam, protocol) for o, lr, lam, _ in plan if o == REFERENCE and _ == "paper"]
    return plan


def _needs_grid(problem: Problem, optimizer: str) -> bool:
    n = len(problem.lrs[_grid_key(problem, optimizer)]) * (len(problem.dampings) if optimizer in DAMPED else 1)
    return n > 1


def _hp(lr: float, lam: float | None) -> str:
    return f"lr={lr:g}" + ("" if lam is None else f" λ={lam:g}")


def _final_plan(problem: Problem, cfg: ReproConfig) -> list[tuple[str, int, str]]:
    """(optimizer, seed, protocol) of every final run: each seed × protocol × optimizer, the
    released-code protocol only for :data:`.config.RELEASED_CODE_OPTIMIZERS`."""
    plan = []
    for seed in cfg.problem_seeds(problem):
        for protocol in cfg.problem_protocols(problem):
            for o in problem.optimizers:
                if protocol != "paper" and o not in RELEASED_CODE_OPTIMIZERS:
                    continue
                plan.append((o, seed, protocol))
    return plan


def _run_job(job: tuple) -> RunResult:
    """One run (a worker process's unit of work): ``(args, kwargs, threads)``."""
    args, kwargs, threads = job
    if threads is not None:
        torch.set_num_threads(threads)
    return run_training(*args, **kwargs)


def _execute(jobs: list[tuple[tuple, dict]], cfg: ReproConfig, bar: Any, labels: list[str], pool: Any) -> list[RunResult]:
    """Run ``jobs`` (``(args, kwargs)`` of :func:`run_training`) in order or on ``pool``,
    advancing ``bar`` once per finished run."""
    if pool is None:
        out = []
        for (args, kw), label in zip(jobs, labels):
            if bar is not None:
                bar.set_postfix_str(label)
            out.append(run_training(*args, **kw))
            if bar is not None:
                bar.update(1)
        return out
    threads = torch.get_num_threads()
    futures = [pool.submit(_run_job, (args, kw, threads)) for args, kw in jobs]
    out = []
    for f, label in zip(futures, labels):
        out.append(f.result())
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update(1)
    return out


def run_problem(problem: Problem, cfg: ReproConfig, bar: Any = None, *, pool: Any = None) -> ProblemResult:
    """Grid search (short runs, the first seed, the paper's protocol) then the final runs of
    every optimizer of ``problem`` for every seed and protocol (:func:`_final_plan`).

    Args:
        problem: the problem.
        cfg: the configuration (seeds, protocols, weight decay, curvature options, ``tune``).
        bar: a tqdm bar advanced once per run (optional).
        pool: a process pool for independent runs (``None``: in-process, in order).
    """
    tune = resolved_tune(problem, cfg)
    seed0 = cfg.problem_seeds(problem)[0]
    grid: list[dict] = []
    best: dict[tuple[str, str], tuple[float, float, float | None]] = {}
    jobs, labels, keys = [], [], []
    for o, lr, lam, protocol in _grid_plan_protocols(problem, cfg, tune):
        if not _needs_grid(problem, o):
            best[(o, protocol)] = (math.nan, lr, lam)
            continue
        jobs.append(((problem, o, lr, lam, problem.grid_steps, cfg),
                     {"window": max(1, problem.grid_steps // 4), "seed": seed0, "protocol": protocol}))
        labels.append(f"{problem.key} grid {legend(o)} {protocol} {_hp(lr, lam)}")
        keys.append((o, lr, lam, protocol))
    for (o, lr, lam, protocol), r in zip(keys, _execute(jobs, cfg, bar, labels, pool)):
        grid.append({"problem": problem.key, "optimizer": o, "legend": r.legend, "protocol": protocol, "lr": lr, "damping": lam,
                     "steps": problem.grid_steps, "final": r.final, "diverged": r.diverged, "seconds": r.seconds})
        if (o, protocol) not in best or r.final < best[(o, protocol)][0]:
            best[(o, protocol)] = (r.final, lr, lam)
    selected: dict[str, tuple[float, float | None]] = {}
    for protocol in ("paper", *[p for p in cfg.problem_protocols(problem) if p != "paper"]):
        for o in problem.optimizers:
            src = next((k for k in ((o, protocol), (REFERENCE, protocol), (o, "paper"), (REFERENCE, "paper")) if k in best), None)
            if src is None:
                raise ValueError(f"no hyper-parameters for {o!r}: KFAC must be among the optimizers when tune='kfac'")
            selected[o if protocol == "paper" else f"{o} ({protocol})"] = (best[src][1], best[src][2])
    released = "released-code" in cfg.problem_protocols(problem)
    jobs, labels = [], []
    for o, seed, protocol in _final_plan(problem, cfg):
        lr, lam = selected[o if protocol == "paper" else f"{o} ({protocol})"]
        on_kfac = o == REFERENCE and protocol == "paper"
        jobs.append(((problem, o, lr, lam, problem.steps, cfg),
                     {"gap_every": problem.gap_every if on_kfac else None, "seed": seed, "protocol": protocol,
                      "released_gaps": on_kfac and released}))
        labels.append(f"{problem.key} {legend(o)} seed {seed} {protocol} {_hp(lr, lam)}")
    replicas = _execute(jobs, cfg, bar, labels, pool)
    runs = {r.optimizer: r for r in replicas if r.seed == seed0 and r.protocol == "paper"}
    return ProblemResult(problem, grid, selected, runs, replicas)


def n_runs(problem: Problem, cfg: ReproConfig) -> int:
    """The training runs :func:`run_problem` makes for ``problem`` (grid runs + final runs)."""
    tune = resolved_tune(problem, cfg)
    return sum(_needs_grid(problem, o) for o, _, _, _ in _grid_plan_protocols(problem, cfg, tune)) + len(_final_plan(problem, cfg))


# ---- the whole reproduction -------------------------------------------------------------------


def _load() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):  # not on every platform
        return None


def reproduce(config: ReproConfig, out_dir: str | os.PathLike | None = None, *, threads: int | None = None) -> ReproResult:
    """Run the reproduction and (with ``out_dir``) write CSVs, figures and ``report.md``.

    Args:
        config: from :func:`.config.default_config` or :func:`.config.paper_config` (or hand-made);
            ``config.jobs`` > 1 runs independent runs in that many worker processes (fork).
        out_dir: output folder (created); ``None`` writes nothing.
        threads: torch intra-op threads for the run, in every worker (restored afterwards);
            ``None`` leaves torch's setting (1 is much faster on a loaded machine:
            :mod:`fisherlab.experiments.paper`).

    Returns:
        A :class:`.results.ReproResult`.
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if config.jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {config.jobs}")
    t0 = time.perf_counter()
    load0 = _load()
    pool = None
    try:
        if config.jobs > 1:
            pool = ProcessPoolExecutor(max_workers=config.jobs, mp_context=multiprocessing.get_context("fork"))
        total = sum(n_runs(p, config) for p in config.problems)
        bar = tqdm(total=total, desc="reproduce", unit="run", disable=not config.progress, dynamic_ncols=True)
        try:
            fig2 = [run_problem(p, config, bar, pool=pool) for p in config.fig2]
            fig4a = run_problem(config.fig4a, config, bar, pool=pool) if config.fig4a is not None else None
            fig5 = [run_problem(p, config, bar, pool=pool) for p in config.fig5]
        finally:
            bar.close()
        used_threads = torch.get_num_threads()
    finally:
        if pool is not None:
            pool.shutdown()
        torch.set_num_threads(old_threads)
    verdicts = compute_verdicts(fig2, fig4a, config.criteria)
    result = ReproResult(config, fig2, fig4a, verdicts, time.perf_counter() - t0, used_threads, fig5=fig5)
    load1 = _load()
    result.load = (load0, load1) if load0 is not None and load1 is not None else None
    result.claims = compute_claims(result)
    if out_dir is not None:
        result.files = write_outputs(result, out_dir)
    return result
