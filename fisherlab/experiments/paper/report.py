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
from ...intervals import mean_interval
from .config import (
    BASELINES, FACES_NOTE, GAP_METHODS, NGD, PREVIOUS, REFERENCE, RELEASED_CODE_OPTIMIZERS, ReproConfig, gap_method_of,
    legend, resolved_tune,
)
from .results import ProblemResult, ReproResult
from .verdicts import Verdict, percent, relative_change

__all__ = [
    "curve_rows",
    "final_rows",
    "gap_rows",
    "own_gap_rows",
    "plot_training",
    "plot_gaps",
    "trajectory_gap_rows",
    "divergence_rows",
    "replica_rows",
    "claim_table_rows",
    "plot_gaps_both_ways",
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


def gap_rows(fig2: Sequence[ProblemResult], protocol: str | None = "paper") -> list[dict]:
    """Fig. 5's rows on the KFAC trajectory of the first seed, each with its ``problem``
    (``protocol``: only that protocol's rows; ``None``: all)."""
    return [{"problem": pr.problem.key, **r} for pr in fig2 if REFERENCE in pr.runs for r in pr.runs[REFERENCE].gap_rows
            if protocol is None or r.get("protocol", "paper") == protocol]


def trajectory_gap_rows(problems: Sequence[ProblemResult]) -> list[dict]:
    """Every Fig. 5 row of every seed: on the KFAC trajectory (``trajectory="KFAC"``, both
    protocols on the same batches) and on each two-level optimizer's own (``trajectory="own"``),
    with ``problem``, ``seed``, ``protocol``, ``method``, ``step``, ``gap`` (the true error change
    𝔈(β) − 𝔈(0)), ``logged_gap`` (as the released code logs it; = gap under the paper's equations)."""
    rows = []
    for pr in problems:
        for run in pr.replicas or list(pr.runs.values()):
            if run.optimizer == REFERENCE and run.protocol == "paper":
                rows += [{"problem": pr.problem.key, "seed": run.seed, "trajectory": "KFAC", **r} for r in run.gap_rows]
            m = gap_method_of(run.optimizer)
            if m is not None:
                rows += [{"problem": pr.problem.key, "seed": run.seed, "trajectory": "own", "protocol": run.protocol,
                          "method": m, "legend": legend(m), "step": r["step"], "gap": r["gap"],
                          "logged_gap": r.get("logged_gap", r["gap"])} for r in run.rows]
    return rows


def _share_positive(vals: Sequence[float]) -> float:
    fin = [v for v in vals if math.isfinite(v)]
    return sum(v > 0 for v in fin) / len(fin) if fin else math.nan


def divergence_rows(rows: Sequence[dict]) -> list[dict]:
    """Fig. 5 both ways, summarised: per problem, trajectory and method, the mean true gap under
    the paper's equations and under the released code, and the released code's logged gap, each
    with its 95 % interval over batches × seeds, and the share of each that is > 0.

    Args:
        rows: :func:`trajectory_gap_rows`.
    """
    keys: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        k = (r["problem"], r["trajectory"], r["method"])
        d = keys.setdefault(k, {"paper": [], "released": [], "logged": []})
        g = float(r["gap"]) if r["gap"] is not None else math.nan
        if r.get("protocol", "paper") == "paper":
            d["paper"].append(g)
        else:
            d["released"].append(g)
            d["logged"].append(float(r["logged_gap"]) if r.get("logged_gap") is not None else math.nan)
    out = []
    for (problem, traj, m), d in keys.items():
        row: dict[str, Any] = {"problem": problem, "trajectory": traj, "method": m, "legend": legend(m)}
        for name, vals in (("paper_true", d["paper"]), ("released_true", d["released"]), ("released_logged", d["logged"])):
            iv = mean_interval(vals)
            row[f"{name}_mean"], row[f"{name}_hw"], row[f"{name}_n"] = iv.mean, iv.half_width, iv.n
            row[f"{name}_share_pos"] = _share_positive(vals)
        pairs = [(t, l) for t, l in zip(d["released"], d["logged"]) if math.isfinite(t) and math.isfinite(l)]
        row["released_true_pos_logged_neg"] = sum(t > 0 and l <= 0 for t, l in pairs) / len(pairs) if pairs else math.nan
        out.append(row)
    return out


def replica_rows(problems: Sequence[ProblemResult]) -> list[dict]:
    """One row per final run of every seed and protocol: problem, optimizer, seed, protocol,
    lr, λ (the problem's units), final loss, status, and the options in fisherlab's units."""
    rows = []
    for pr in problems:
        for run in pr.replicas or list(pr.runs.values()):
            rows.append({"problem": pr.problem.key, "optimizer": run.optimizer, "legend": run.legend, "seed": run.seed,
                         "protocol": run.protocol, "lr": run.lr, "damping": run.damping, "final_loss": run.final,
                         "diverged": run.diverged, "error": run.error, "seconds": run.seconds,
                         "options": json.dumps(_jsonable(run.options), sort_keys=True)})
    return rows


def claim_table_rows(result: ReproResult) -> list[dict]:
    """The verdict table as CSV rows: claim, statement, and per protocol its verdict, mean,
    interval half-width, n and text."""
    rows = []
    for c in result.claims:
        row: dict[str, Any] = {"claim": c.key, "statement": c.statement}
        for protocol, cell in c.cells.items():
            p = protocol.replace("-", "_")
            row.update({f"{p}_verdict": cell.label, f"{p}_mean": cell.value.mean, f"{p}_hw": cell.value.half_width,
                        f"{p}_n": cell.value.n, f"{p}_text": cell.text})
        rows.append(row)
    return rows


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


def _panel_title(pr: ProblemResult) -> str:
    """The problem's title, with its batch size unless the title states it already."""
    t = pr.problem.title
    return t if f"B={pr.problem.batch_size}" in t else f"{t}, B={pr.problem.batch_size}"


def training_title(results: Sequence[ProblemResult], what: str) -> str:
    """Fig. 2/4(a)'s title: the optimizers actually drawn (SGD/ADAM only when they ran), and
    that the curves are the first seed's under the paper's equations when there are replicas."""
    ran = {o for pr in results for o in pr.runs}
    names = "KFAC vs two-level KFAC" + (" vs SGD/ADAM" if ran & set(BASELINES) else "") + (
        " vs exact NG" if "ngd" in ran else "")
    replicas = any(len(pr.replicas) > len(pr.runs) for pr in results)
    return f"{what}: {names}" + (" (seed 0, the paper's equations; intervals in report.md)" if replicas else "")


def plot_training(results: Sequence[ProblemResult], path: Path, *, title: str) -> list[Path]:
    """Training loss against step and against wall time, one row per problem, one line per
    optimizer (running mean over ~steps/30 mini-batches; log scale); diverged runs end early.
    Drawn by :func:`fisherlab.plots.plot_training_curves`; returns the PNG and PDF paths."""
    fig = plots.plot_training_curves(
        [r for pr in results for r in curve_rows(pr)], path, title=title,
        panel_titles={pr.problem.key: _panel_title(pr) for pr in results},
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


def plot_gaps_both_ways(rows: Sequence[dict], path: Path | None, *, methods: Sequence[str] = GAP_METHODS) -> Any:
    """Fig. 5 both ways, on the KFAC trajectory: one row per problem, three axes sharing y:
    (a) the true 𝔈(β*) − 𝔈(0) under the paper's equations, (b) the true error change of the
    released code's β, (c) the gap as the released code logs it (its approximate coarse matrix),
    all on the same batches; per method the mean over seeds per step with its 95 % interval
    (error bars; symlog; dashed TKO). Black rings in (b) mark the (seed, step) samples whose true
    error change is > 0 while the logged gap is ≤ 0: where the log hides an increase of the
    error. Returns the figure (written as PNG+PDF with ``path``)."""
    import numpy as np

    kfac = [r for r in rows if r.get("trajectory") == "KFAC"]
    problems = list(dict.fromkeys(r["problem"] for r in kfac))

    def num(v: Any) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    handles: dict[str, Any] = {}
    with plots.style():
        fig, axes = plt.subplots(max(1, len(problems)), 3, figsize=(15, 3.4 * max(1, len(problems)) + 0.8), squeeze=False, sharey="row")
        for row, problem in zip(axes, problems):
            prow = [r for r in kfac if r["problem"] == problem]
            finite = [abs(num(r[k])) for r in prow for k in ("gap", "logged_gap") if math.isfinite(num(r.get(k))) and num(r.get(k)) != 0]
            scale = float(np.median(finite)) if finite else 1.0
            steps_all = sorted({int(r["step"]) for r in prow})
            width = (max(steps_all) - min(steps_all) or 1) * 0.012
            for ax, (protocol, key, title) in zip(row, (("paper", "gap", "(a) paper's equations: true gap"),
                                                        ("released-code", "gap", "(b) released code: true error change"),
                                                        ("released-code", "logged_gap", "(c) released code: gap as it logs it"))):
                for j, m in enumerate(methods):
                    pts = [r for r in prow if r["method"] == m and r.get("protocol", "paper") == protocol]
                    steps = sorted({int(r["step"]) for r in pts})
                    if not steps:
                        continue
                    ivs = [mean_interval([num(r[key]) for r in pts if int(r["step"]) == st]) for st in steps]
                    x = np.array(steps, dtype=float) + (j - len(methods) / 2) * width
                    kw: dict[str, Any] = dict(color=plots.color_for(m), lw=1.2, marker="o", ms=3.5, capsize=2, elinewidth=0.8)
                    if m == PREVIOUS:
                        kw.update(ls="--", marker="s")
                    h = ax.errorbar(x, [iv.mean for iv in ivs], yerr=np.nan_to_num([iv.half_width for iv in ivs]), **kw)
                    handles.setdefault(legend(m), h)
                    if key == "gap" and protocol == "released-code":
                        hid = [(xi, num(r["gap"])) for xi, st in zip(x, steps) for r in pts
                               if int(r["step"]) == st and num(r["gap"]) > 0 and num(r.get("logged_gap")) <= 0]
                        if hid:
                            hh = ax.scatter([h_[0] for h_ in hid], [h_[1] for h_ in hid], s=60, facecolors="none", edgecolors="k", lw=1.0, zorder=5)
                            handles.setdefault("true > 0 while logged ≤ 0", hh)
                ax.set_yscale("symlog", linthresh=max(scale * 1e-2, 1e-12))
                ax.axhline(0.0, color="k", ls=":", lw=0.8)
                ax.set_xlabel("step (KFAC trajectory)")
                ax.set_title(f"{title} — {problem}", fontsize=9)
            row[0].set_ylabel(r"$\mathfrak{E}(\beta) - \mathfrak{E}(0)$")
        fig.suptitle("Fig. 5 both ways: the true error change against the exact ζ of the batch, and the gap the released code logs "
                     "(mean over seeds ± 95 %; < 0: closer to ζ than the fine level; under the released code NICO ≡ PREVIOUS)", fontsize=10)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 9), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
        if path is not None:
            plots.save_figure(fig, path)
    return fig


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
        ["method", "protocol", "lr", "λ", f"final loss after {pr.problem.grid_steps} steps"],
        [[g["legend"], g.get("protocol", "paper"), _fmt(g["lr"], "g"), _fmt(g["damping"], "g"), _fmt(g["final"])] for g in pr.grid],
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


def _iv_text(vals: Sequence[float], spec: str = ".4g") -> str:
    iv = mean_interval(vals)
    if iv.n and not all(math.isfinite(v) for v in vals if v is not None):
        return f"diverged ({sum(not math.isfinite(v) for v in vals)}/{len(vals)})"
    return iv.format(spec) + (f" (n={iv.n})" if iv.n else "")


def _seed_table(pr: ProblemResult, protocols: Sequence[str]) -> str:
    ref = {p: pr.finals_by_seed(p).get(REFERENCE, {}) for p in protocols}
    header = ["method", "lr, λ (paper)"] + [f"lr, λ ({p})" for p in protocols if p != "paper"]
    for p in protocols:
        header += [f"final loss, {p}", f"vs KFAC, {p}"]
    body = []
    for o in pr.problem.optimizers:
        cells = [legend(o)]
        for p in ["paper", *[q for q in protocols if q != "paper"]]:
            lr, lam = pr.selected.get(o if p == "paper" else f"{o} ({p})", (math.nan, None))
            cells.append(f"{_fmt(lr, 'g')}, {_fmt(lam, 'g')}")
        for p in protocols:
            fin = pr.finals_by_seed(p).get(o, {})
            same = p != "paper" and o not in RELEASED_CODE_OPTIMIZERS
            cells.append(_iv_text(list(fin.values())) + (" (= paper)" if same else ""))
            rel = [relative_change(fin[s], ref[p][s]) for s in fin if s in ref[p] and math.isfinite(ref[p][s])]
            if o == REFERENCE or not rel:
                cells.append("—")
            elif any(not math.isfinite(v) for v in rel):
                cells.append("diverged")
            else:
                iv = mean_interval(rel)
                cells.append(f"{100 * iv.mean:+.2f} %" + ("" if iv.n < 2 else f" ± {100 * iv.half_width:.2g} %"))
        body.append(cells)
    return _md_table(header, body)


def _settings_table(result: ReproResult) -> str:
    cfg = result.config
    body = []
    for pr in result.problems:
        p = pr.problem
        lr, lam = pr.selected.get(REFERENCE, (math.nan, None))
        kfac = next((r for r in pr.replicas if r.optimizer == REFERENCE and r.protocol == "paper"), None)
        opts = kfac.options if kfac else {}
        body.append([
            p.key, p.data, p.scale_note, str(p.batch_size), f"{lam:g} ({p.damping_scale})" if lam is not None else "—",
            str(p.subbatch), str(p.steps), ", ".join(str(s) for s in cfg.problem_seeds(p)),
            f"{_fmt(lr, 'g')} → {_fmt(opts.get('lr', math.nan), '.4g')}", _fmt(opts.get("weight_decay", math.nan), ".4g"),
        ])
    return _md_table(["problem", "data", "network", "B", "λ (paper's units)", "Fisher sub-batch", "steps", "seeds",
                      "KFAC lr (paper's units → fisherlab's)", "ω in fisherlab's units"], body)


def _divergence_table(rows: Sequence[dict], trajectory: str) -> str:
    def cell(r: dict, name: str) -> str:
        n = r[f"{name}_n"]
        if not n:
            return "—"
        hw = r[f"{name}_hw"]
        txt = f"{r[f'{name}_mean']:.3g}" + ("" if n < 2 or math.isnan(hw) else f" ± {hw:.2g}")
        return f"{txt}; > 0: {100 * r[f'{name}_share_pos']:.0f} %"

    body = [[r["problem"], r["legend"], cell(r, "paper_true"), cell(r, "released_true"), cell(r, "released_logged"),
             _fmt(100 * r["released_true_pos_logged_neg"], ".0f") + " %" if math.isfinite(r["released_true_pos_logged_neg"]) else "—"]
            for r in rows if r["trajectory"] == trajectory]
    if not body:
        return "_No rows._"
    return _md_table(["problem", "method", "paper's equations: true gap (mean ± 95 %)", "released code: true error change",
                      "released code: logged gap", "true > 0 while logged ≤ 0"], body)


def render_paper_report(result: ReproResult) -> str:
    """The markdown report of the paper's settings: the verdict table (one row per claim, three
    columns), the settings, the training tables over seeds and protocols, Fig. 5 both ways."""
    cfg = result.config
    protocols = list(cfg.protocols)
    load = getattr(result, "load", None)
    lines = [
        "# The paper's claims at the paper's settings — and under what its released code computed",
        "",
        f"Mode: **{'quick (test-suite sizes: numbers are not meaningful)' if cfg.quick else 'paper settings'}** · "
        f"wall time {result.seconds:.0f} s ({result.seconds / 60:.1f} min) · torch threads {result.threads} · "
        f"worker processes {cfg.jobs}" + (f" · machine load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (2 cores, shared)" if load else "")
        + f" · seeds {', '.join(map(str, cfg.seed_list))} · weight decay {cfg.weight_decay:g} (paper's units) · "
        f"curvature options `{json.dumps(cfg.curvature_options)}`.",
        "",
        "## Verdict table",
        "",
        "Each cell: the verdict, then the deciding number with its 95 % Student-t interval (over seeds for the "
        "training claims; over batches × seeds for the gaps and ratios; `n` says how many).",
        "",
        "| claim | the paper's statement | fisherlab under the paper's equations | fisherlab under the released-code protocol |",
        "|---|---|---|---|",
    ]
    for c in result.claims:
        cells = [f"**{c.cells[p].label}** — {c.cells[p].text}" if p in c.cells else "not run" for p in ("paper", "released-code")]
        lines.append(f"| ({c.key}) | {c.statement} | {cells[0]} | {cells[1]} |")
    cr = cfg.criteria
    lines += [
        "",
        f"_Criteria:_ (i) every (problem, two-level method incl. PREVIOUS) mean relative difference of the final loss to "
        f"KFAC's within ±{cr.overlay_rtol:.0%}; (ii) the mean over seeds of the median gain in [{cr.gain_min:.0%}, "
        f"{cr.gain_max:.0%}]; (iii) every true gap ≤ {cr.gap_atol:g} on the KFAC trajectory and on the own "
        f"trajectories (all two-level methods and TKO, as the paper states it); (iv) every method's mean 𝔈(β)/𝔈(0) on the "
        f"KFAC trajectory ≤ {cr.closeness_max:g}; (v) KFAC's final loss below the exact natural gradient's on every problem. "
        "Final loss = mean of the last mini-batch losses of the run.",
        "",
        "## Settings",
        "",
        _settings_table(result),
        "",
        "* **Units.** The paper's losses are averaged over the outputs (its code uses torch's mean reductions); "
        "fisherlab sums them. The damped optimizers here step on captures rescaled to the output-averaged loss "
        "(`experiments.paper.units`: g, ∇h ÷ d_y, G ÷ d_y²; d_y = 784 for the autoencoders, 1 for cross-entropy), so "
        "λ (the `mean-loss` scale), lr and ω are the paper's numbers and every operator — the released code's factor "
        "shifts √λ, λ and its λ·p_i coarse diagonal included — sees what that code saw. Losses in the tables are the "
        "output-averaged ones.",
        "* **Released-code protocol.** The optimizers' preset `protocol='released-code'` (docs/PROTOCOL.md): the KFAC "
        "baseline (A+√λI)⊗(G+√λI) with π off, the two-level fine level (A+λI)⊗(G+λI), the coarse right-hand side R₀∇h, "
        "the +λ·p_i coarse diagonal, a max-abs coarse basis, factors and coarse matrix from a B/4 sub-batch drawn with "
        "replacement (the sub-batch column), running averages ρ_k = min(1 − 1/k, 0.95) and refresh periods of 100 "
        "steps (so within these runs the factors are those of step 1), coefficient 1. KFAC's lr is grid-searched "
        "again under it (its baseline is another optimizer). The exact natural gradient is the same under both "
        "protocols (run once). fisherlab's conv factors are the exact ones (the released code's conv defects are not "
        "reproduced).",
        "* **Fig. 5 on the KFAC trajectory** (step 1 and every `gap_every` steps, at the updated parameters on that "
        "step's batch, right-hand side ∇h, one capture shared by both protocols): the paper's equations by "
        "`fisherlab.compare` (KFAC from the batch factors, exact ζ by Woodbury); the released code by its operators "
        "(`runner.released_rows`: `protocol='released-code'`, β solved with the approximate coarse matrix of a "
        "sub-batch of the same batch) — the true error change of that β (`gap()`, exact coarse matrix) and the gap "
        "as the code logs it (`logged_gap()`); its ratio 𝔈(β)/𝔈(0) is against the released KFAC baseline's error. "
        "On each method's own trajectory its optimizer records both every step.",
        f"* **FACES.** {FACES_NOTE}",
        "* SGD and Adam are not run at the paper's settings (no claim of the table rests on them; `--settings default` "
        "runs them).",
        "",
    ]
    for title, prs in (("Fig. 2 — deep autoencoders", result.fig2), ("Fig. 4(a) — deep linear network", [result.fig4a] if result.fig4a else [])):
        lines += [f"## {title}", ""]
        if not prs:
            lines += ["_Not run._", ""]
        for pr in prs:
            lines += [f"### {pr.problem.title}", "", f"{pr.problem.note} Network: {pr.problem.scale_note}. n = {pr.problem.n}; "
                      f"{pr.problem.steps} steps per run; grid runs of {pr.problem.grid_steps} steps (seed "
                      f"{cfg.problem_seeds(pr.problem)[0]}, paper's protocol); {_tune_note(pr, cfg)} Final losses over seeds "
                      "(mean ± 95 % interval) and the change relative to KFAC of the same seed and protocol:", "",
                      _seed_table(pr, protocols), "", "Grid search (paper's units):", "", _grid_table(pr), ""]
    drows = divergence_rows(trajectory_gap_rows(result.gap_problems))
    lines += [
        "## Fig. 5 both ways — the true error change and the logged gap",
        "",
        f"Problems: {', '.join(pr.problem.key for pr in result.gap_problems)} (cuda-convnet only for its KFAC trajectory). "
        "On the KFAC trajectory (same batches for all three columns; mean ± 95 % interval over batches × seeds, and the "
        "share of batches with a positive value):",
        "",
        _divergence_table(drows, "KFAC"),
        "",
        "On each method's own training trajectory:",
        "",
        _divergence_table(drows, "own"),
        "",
        "![Fig. 5 both ways](fig5_both.png)",
        "",
        "## Files",
        "",
    ]
    lines += [f"* `{p.name}`" for p in sorted(set(result.files)) if p.name != "report.md"] + ["* `report.md`", ""]
    return "\n".join(lines)


def render_report(result: ReproResult) -> str:
    """The markdown verdict (``report.md``): :func:`render_paper_report` for the paper's
    settings, else the single-seed report of the default settings."""
    if result.config.settings == "paper":
        return render_paper_report(result)
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
        files += plot_training(result.fig2, out / "fig2", title=training_title(result.fig2, "Fig. 2, deep autoencoders"))
        files.append(_csv(out / "fig5_gap.csv", gap_rows(result.fig2)))
        files += plot_gaps(result.fig2, out / "fig5")
    if result.config.settings == "paper":
        traj = trajectory_gap_rows(result.gap_problems)
        files.append(_csv(out / "fig5_both.csv", traj))
        files.append(_csv(out / "fig5_divergence.csv", divergence_rows(traj)))
        fig = plot_gaps_both_ways(traj, out / "fig5_both")
        plt.close(fig)
        files += _figure_paths(out / "fig5_both")
        files.append(_csv(out / "runs.csv", replica_rows(result.problems)))
        files.append(_csv(out / "claims.csv", claim_table_rows(result)))
    if result.fig4a is not None:
        files.append(_csv(out / "fig4a_curves.csv", curve_rows(result.fig4a)))
        files.append(_csv(out / "fig4a_final.csv", final_rows(result.fig4a)))
        files.append(_csv(out / "fig4a_grid.csv", result.fig4a.grid))
        files += plot_training([result.fig4a], out / "fig4a", title=training_title([result.fig4a], "Fig. 4(a), 64-layer deep linear network with BatchNorm"))
    summary = {
        "config": result.config.to_dict(),
        "seconds": result.seconds,
        "threads": result.threads,
        "verdicts": {k: {"holds": v.holds, "summary": v.summary} for k, v in result.verdicts.items()},
        "claims": {c.key: {p: {"holds": cell.holds, "mean": cell.value.mean, "half_width": cell.value.half_width,
                               "n": cell.value.n, "text": cell.text} for p, cell in c.cells.items()} for c in result.claims},
        "final_losses": {pr.problem.key: pr.finals for pr in result.problems},
        "selected": {pr.problem.key: pr.selected for pr in result.problems},
    }
    files.append(write_json(_jsonable(summary), out / "summary.json"))
    result.files = files + [out / "report.md"]
    (out / "report.md").write_text(render_report(result))
    return result.files
