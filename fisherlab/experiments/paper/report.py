"""The reproduction's outputs: CSVs of every curve, grid and final loss, the figures (drawn by
:mod:`fisherlab.plots`), ``summary.json`` and the markdown verdict ``report.md``."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt

from ... import plots
from ...io.tables import fmt, markdown_table, write_csv, write_json
from .config import BASELINES, GAP_METHODS, PREVIOUS, REFERENCE, ReproConfig, gap_method_of, legend, resolved_tune
from .results import ProblemResult, ReproResult
from .verdicts import Verdict, percent, relative_change

__all__ = [
    "curve_rows",
    "final_rows",
    "gap_rows",
    "own_gap_rows",
    "plot_training",
    "plot_gaps",
    "render_report",
    "write_outputs",
]


# ---- rows ---------------------------------------------------------------------------------------


def curve_rows(pr: ProblemResult) -> list[dict]:
    """Per step of every final run: problem, optimizer, legend, lr, damping, step, loss, wall_time, gap."""
    rows = []
    for o, run in pr.runs.items():
        for r in run.rows:
            rows.append({"problem": pr.problem.key, "optimizer": o, "legend": run.legend, "lr": run.lr,
                         "damping": run.damping, **r})
    return rows


def final_rows(pr: ProblemResult) -> list[dict]:
    """One row per final run: hyper-parameters, final and last loss, change relative to KFAC, status."""
    ref = pr.runs[REFERENCE].final if REFERENCE in pr.runs else math.nan
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
                "rel_to_kfac": relative_change(run.final, ref) if math.isfinite(ref) else math.nan,
                "train_seconds": run.rows[-1]["wall_time"] if run.rows else math.nan,
                "diverged": run.diverged,
                "error": run.error,
            }
        )
    return rows


def gap_rows(fig2: Sequence[ProblemResult]) -> list[dict]:
    """Fig. 5's rows on the KFAC trajectory, each with its ``problem``."""
    return [{"problem": pr.problem.key, **r} for pr in fig2 if REFERENCE in pr.runs for r in pr.runs[REFERENCE].gap_rows]


def own_gap_rows(fig2: Sequence[ProblemResult]) -> list[dict]:
    """The gap each two-level optimizer (and TKO) recorded on its own trajectory, by compare name."""
    rows = []
    for pr in fig2:
        for o, run in pr.runs.items():
            m = gap_method_of(o)
            if m is not None:
                rows += [{"problem": pr.problem.key, "method": m, "legend": legend(m), "step": r["step"], "gap": r["gap"]} for r in run.rows]
    return rows


def _csv(path: Path, rows: Sequence[dict]) -> Path:
    return write_csv(rows, path, columns=None if rows else ["empty"])


# ---- figures ------------------------------------------------------------------------------------


def _figure_paths(path: Path) -> list[Path]:
    return [path.with_name(path.name + "." + ext) for ext in ("png", "pdf")]


def plot_training(results: Sequence[ProblemResult], path: Path, *, title: str) -> list[Path]:
    """Training loss against step and against wall time, one row per problem, one line per
    optimizer (running mean over ~steps/30 mini-batches; log scale); diverged runs end early.
    Drawn by :func:`fisherlab.plots.plot_training_curves`; returns the PNG and PDF paths."""
    fig = plots.plot_training_curves(
        [r for pr in results for r in curve_rows(pr)], path, title=title,
        panel_titles={pr.problem.key: f"{pr.problem.title}, B={pr.problem.batch_size}" for pr in results},
        smooth={pr.problem.key: max(1, pr.problem.steps // 30) for pr in results},
        diverged=[(pr.problem.key, o) for pr in results for o, run in pr.runs.items() if run.diverged],
        reference=REFERENCE, dashed=BASELINES,
    )
    plt.close(fig)
    return _figure_paths(Path(path))


def plot_gaps(fig2: Sequence[ProblemResult], path: Path) -> list[Path]:
    """Fig. 5: (a) gap (4.6) vs step on the KFAC trajectory (symlog), (b) reduction ratio
    𝔈(β)/𝔈(0) on it (log), (c) each two-level optimizer's gap on its own trajectory (symlog).
    Drawn by :func:`fisherlab.plots.plot_gap_trajectories`; returns the PNG and PDF paths."""
    fig = plots.plot_gap_trajectories(gap_rows(fig2), own_gap_rows(fig2), path, methods=GAP_METHODS, additive=(PREVIOUS,))
    plt.close(fig)
    return _figure_paths(Path(path))


# ---- report.md ----------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".4g") -> str:
    """A report cell: ``—`` for a missing number, ``diverged`` for +∞ (a diverged run's loss)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        if math.isinf(v):
            return "diverged" if v > 0 else "−∞"
        return fmt(v, spec)
    return str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    return "\n".join(markdown_table(header, rows))


def _final_table(pr: ProblemResult) -> str:
    ref = pr.runs[REFERENCE].final if REFERENCE in pr.runs else math.nan
    body = []
    for o, run in pr.runs.items():
        rel = relative_change(run.final, ref) if math.isfinite(ref) and o != REFERENCE else math.nan
        body.append(
            [
                run.legend,
                _fmt(run.lr, "g"),
                _fmt(run.damping, "g"),
                _fmt(run.final),
                _fmt(run.rows[-1]["loss"] if run.rows else math.nan),
                percent(rel) if not math.isnan(rel) else "—",
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
    for r in gap_rows(fig2):
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
    if resolved_tune(pr.problem, cfg) == "kfac":
        return "lr and λ grid-searched for KFAC; the two-level methods and PREVIOUS reuse KFAC's (they are KFAC plus a correction)."
    return "lr and λ grid-searched for every curvature method separately (the paper's protocol)."


def _verdict_block(key: str, title: str, criterion: str, v: Verdict) -> str:
    return f"### Verdict ({key}): {title}\n\n**{v.label.upper()}.** {v.summary.rstrip('.')}.\n\n_Criterion:_ {criterion}\n"


def _problem_section(pr: ProblemResult, cfg: ReproConfig, extra: str = "") -> list[str]:
    p = pr.problem
    return [f"### {p.title}", "", f"{p.note} n = {p.n}, batch {p.batch_size}, {p.steps} steps; grid runs of "
            f"{p.grid_steps} steps; {_tune_note(pr, cfg)}{extra}", "", _final_table(pr), "", "Grid search:", "",
            _grid_table(pr), ""]


def render_report(result: ReproResult) -> str:
    """The markdown verdict (``report.md``)."""
    cfg, c, V = result.config, result.config.criteria, result.verdicts
    multiplicative = ", ".join(legend(m) for m in GAP_METHODS if m != PREVIOUS)
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
        lines += _problem_section(pr, cfg)
    if "baselines" in V:
        lines += [f"Side observation (paper: natural-gradient methods beat ADAM and SGD): **{V['baselines'].label}** — {V['baselines'].summary}.", ""]
    lines += [
        _verdict_block("i", "two-level ≈ KFAC on autoencoders", f"every two-level method (PREVIOUS included) has |L_m − L_KFAC| ≤ {c.overlay_rtol:.0%} · L_KFAC.", V["i"]),
        "## Fig. 4(a) — deep linear network",
        "",
    ]
    if result.fig4a is not None:
        lines += _problem_section(result.fig4a, cfg, " BatchNorm parameters are outside the Fisher and get SGD steps (fisherlab.optim).")
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
            f"every recorded gap of every multiplicative method ({multiplicative}) is "
            f"≤ {c.gap_atol:g} (the theorem; a gap of ~0 means no reduction, see the ratio column), on the KFAC trajectory and on its own trajectory; PREVIOUS (TKO, additive) is reported, not judged.",
            V["iii"],
        ),
    ]
    tko = [r for r in V["iii"].rows if r["method"] == PREVIOUS]
    if tko:
        parts = [f"{r['trajectory']} trajectory: {r['n_negative']}/{r['n'] + r['n_missing']} negative, max {_fmt(r['max_gap'], '.3g')}" for r in tko]
        lines += [f"TKO's sign (the paper reports it negative throughout): {'; '.join(parts)}.", ""]
    lines += ["## Files", ""] + [f"* `{p.name}`" for p in sorted(set(result.files)) if p.name != "report.md"] + ["* `report.md`", ""]
    return "\n".join(lines)


# ---- everything ---------------------------------------------------------------------------------


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


def write_outputs(result: ReproResult, out_dir: str | os.PathLike) -> list[Path]:
    """Write the CSVs, figures (PNG+PDF), ``summary.json`` and ``report.md``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    if result.fig2:
        files.append(_csv(out / "fig2_curves.csv", [r for pr in result.fig2 for r in curve_rows(pr)]))
        files.append(_csv(out / "fig2_final.csv", [r for pr in result.fig2 for r in final_rows(pr)]))
        files.append(_csv(out / "fig2_grid.csv", [r for pr in result.fig2 for r in pr.grid]))
        files += plot_training(result.fig2, out / "fig2", title="Fig. 2 (small scale): KFAC vs two-level KFAC vs SGD/ADAM on deep autoencoders")
        files.append(_csv(out / "fig5_gap.csv", gap_rows(result.fig2)))
        files += plot_gaps(result.fig2, out / "fig5")
    if result.fig4a is not None:
        files.append(_csv(out / "fig4a_curves.csv", curve_rows(result.fig4a)))
        files.append(_csv(out / "fig4a_final.csv", final_rows(result.fig4a)))
        files.append(_csv(out / "fig4a_grid.csv", result.fig4a.grid))
        files += plot_training([result.fig4a], out / "fig4a", title="Fig. 4(a) (small scale): 64-layer deep linear network with BatchNorm")
    summary = {
        "config": result.config.to_dict(),
        "seconds": result.seconds,
        "threads": result.threads,
        "verdicts": {k: {"holds": v.holds, "summary": v.summary} for k, v in result.verdicts.items()},
        "final_losses": {pr.problem.key: pr.finals for pr in result.problems},
        "selected": {pr.problem.key: pr.selected for pr in result.problems},
    }
    files.append(write_json(_jsonable(summary), out / "summary.json"))
    result.files = files + [out / "report.md"]
    (out / "report.md").write_text(render_report(result))
    return result.files
