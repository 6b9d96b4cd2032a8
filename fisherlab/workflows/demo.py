"""The main job, ``fisherlab demo``: train → capture → compare → spectra → plots → report.

On the embedded real MNIST digits (no download):

1. train ``mnist-ae`` (reduced width) with KFAC, writing ``state_dict`` checkpoints;
2. capture the same batch at each checkpoint into one HDF5 file (``capture.h5``);
3. compare every method with the exact natural gradient at every checkpoint (``errors.csv``,
   the error-reduction figure — the paper's Fig. 5 — and the per-method errors);
4. spectra of F•, F•KFAC and the KFAC-preconditioned operator, the layer-interaction map and the
   KFAC block errors at the last checkpoint;
5. a damping sweep of the errors at the last checkpoint;
6. print the table and write ``report.md`` with the headline numbers and every figure.

The default run takes a few minutes on 2 CPU cores; ``tiny=True`` (``--tiny``) takes seconds
and runs inside the test suite.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import models
from .._version import __version__
from ..datasets import load as load_data
from ..io.tables import fmt, markdown_table, write_json
from ..metrics import ComparisonTable
from ..operators import COARSE_SPACES
from ..store import file_info
from ..train import TrainConfig, train
from .analysis import run_damping_sweep, run_error_reduction, run_interactions, run_spectra
from .checkpoints import capture_checkpoints

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


@dataclass
class DemoConfig:
    """What the demo runs. ``tiny()`` gives the seconds-long variant used by the tests."""

    width: float = 0.1
    """Hidden-width multiplier of ``mnist-ae`` (784-1000-500-250-30-…; 0.1 → 784-100-50-25-3-…)."""
    n_train: int = 2000
    batch_size: int = 100
    steps: int = 100
    checkpoint_steps: list[int] = field(default_factory=lambda: [0, 10, 25, 50, 100])
    optimizer: str = "kfac"
    lr: float = 0.1
    train_damping: float = 0.1
    capture_batch: int = 128
    fisher: str = "mc"
    damping: float = 1e-3
    """λ of the analysis (the exact F + λI and every approximation)."""
    dampings: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    slq_probes: int = 8
    """Stochastic Lanczos quadrature for the preconditioned operator's density: probes …"""
    slq_steps: int = 48
    """… and Lanczos steps per probe."""
    seed: int = 0

    @classmethod
    def tiny(cls) -> "DemoConfig":
        return cls(width=0.02, n_train=200, batch_size=50, steps=4, checkpoint_steps=[0, 4], capture_batch=16,
                   dampings=[1e-2, 1e-1], slq_probes=2, slq_steps=12)


@dataclass
class DemoResult:
    out: Path
    rows: list[dict]
    report: Path
    capture_file: Path
    seconds: dict


def run_demo(out: str | Path = "out/demo", config: DemoConfig | None = None, *, progress: bool = True, echo=print) -> DemoResult:
    """Run the whole pipeline into ``out`` (see the module docstring). Returns the error rows."""
    cfg = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    def stage(name: str):
        echo(f"\n[demo] {name}")
        return time.perf_counter()

    # 1. train
    t0 = stage(f"training mnist-ae (width {cfg.width}) with {cfg.optimizer.upper()} on {cfg.n_train} real MNIST digits")
    desc = models.describe("mnist-ae", width=cfg.width)
    tcfg = TrainConfig(
        model=desc, data="mnist", n=cfg.n_train, batch_size=cfg.batch_size, steps=cfg.steps,
        optimizer=cfg.optimizer, lr=cfg.lr, optimizer_options={"damping": cfg.train_damping},
        seed=cfg.seed, checkpoint_steps=list(cfg.checkpoint_steps), checkpoint_final=False, progress=progress,
    )
    result = train(tcfg, out / "train")
    seconds["train"] = time.perf_counter() - t0
    echo(f"       loss {result.metrics[0]['loss']:.1f} → {result.metrics[-1]['loss']:.1f} in {result.steps} steps; "
         f"{len(result.checkpoints)} checkpoints")

    # 2. capture
    t0 = stage(f"capturing one batch of {cfg.capture_batch} ({cfg.fisher} Fisher) at every checkpoint")
    data = load_data("mnist", n=cfg.n_train, seed=0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    idx = torch.randperm(len(data), generator=g)[: cfg.capture_batch].tolist()
    x, y = data.batch(idx)
    h5 = out / "capture.h5"
    if h5.exists():
        h5.unlink()
    capture_checkpoints(
        desc, result.checkpoints, x, y, h5, loss=models.default_loss(desc), fisher=cfg.fisher,
        seed=cfg.seed, indices=idx, meta={"data": data.describe()}, progress=progress,
    )
    info = file_info(h5)
    seconds["capture"] = time.perf_counter() - t0
    echo(f"       {h5} ({h5.stat().st_size / 2**20:.1f} MiB): {len(info['checkpoints'])} checkpoints, "
         f"p = {info['layout'].p:,}, N = {cfg.capture_batch}")

    # 3. errors over checkpoints
    t0 = stage(f"comparing every method with the exact natural gradient (λ = {cfg.damping:g})")
    rows = run_error_reduction(h5, cfg.damping, out, progress=progress)
    seconds["compare"] = time.perf_counter() - t0
    last = rows[-1]["checkpoint"]
    last_rows = [r for r in rows if r["checkpoint"] == last]
    echo(ComparisonTable(last_rows).format())

    # 4. structure at the last checkpoint
    t0 = stage("spectra, layer interactions and KFAC block errors at the last checkpoint")
    spectra = run_spectra(h5, cfg.damping, out, checkpoints=[last], method="slq", n_probes=cfg.slq_probes, n_steps=cfg.slq_steps, progress=progress)[last]
    structure = run_interactions(h5, out, checkpoints=[last], progress=progress)[last]
    seconds["structure"] = time.perf_counter() - t0

    # 5. damping sweep
    t0 = stage(f"damping sweep λ ∈ {cfg.dampings}")
    sweep = run_damping_sweep(h5, cfg.dampings, out, checkpoint=last, progress=progress)
    seconds["sweep"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all

    report = _write_report(out, cfg, desc, result, rows, last, spectra, structure, sweep, seconds)
    write_json({"config": asdict(cfg), "seconds": seconds, "fisherlab": __version__}, out / "demo.json")
    echo(f"\n[demo] done in {seconds['total']:.0f} s: report {report}")
    return DemoResult(out, rows, report, h5, seconds)


def _write_report(out, cfg, desc, result, rows, last, spectra, structure, sweep, seconds) -> Path:
    two_level = list(COARSE_SPACES)
    last_rows = {r["method"]: r for r in rows if r["checkpoint"] == last}
    gaps = [r["gap"] for r in rows if r["method"] in two_level]
    best = min((r for r in last_rows.values() if not math.isnan(r["energy_error"])), key=lambda r: r["energy_error"])
    inter, block_err = structure if isinstance(structure, tuple) else (structure, None)
    lines = [
        "# fisherlab demo report",
        "",
        f"`mnist-ae` at width {cfg.width} ({desc.get('n_params', 0):,} parameters), trained {result.steps} steps with "
        f"{cfg.optimizer.upper()} (lr {cfg.lr}, damping {cfg.train_damping}) on {cfg.n_train} real MNIST digits; "
        f"loss {result.metrics[0]['loss']:.1f} → {result.metrics[-1]['loss']:.1f}. One batch of {cfg.capture_batch} "
        f"captured ({cfg.fisher} Fisher) at steps {', '.join(str(s) for s in cfg.checkpoint_steps)}; analysis damping "
        f"λ = {cfg.damping:g}.",
        "",
        "## Headline",
        "",
        f"* At the last checkpoint (`{last}`) KFAC's increment has relative F•-norm error "
        f"{fmt(last_rows['kfac']['relative_error'], '.4g')} against the exact natural gradient "
        f"(cosine {fmt(last_rows['kfac']['cosine'], '.4f')}).",
        f"* The best method is {best['legend']}: 𝔈/𝔈_KFAC = {fmt(best['reduction_ratio'])}.",
        f"* Two-level gaps (4.6) ≤ 0 at every checkpoint and for every coarse space: "
        f"{'yes' if all(g <= 1e-12 for g in gaps) else 'NO'} (largest {fmt(max(gaps) if gaps else float('nan'))}).",
        "",
        "## Errors at the last checkpoint",
        "",
    ]
    lines += markdown_table(
        ["method", "𝔈/‖ζ‖²_F•", "𝔈/𝔈_KFAC", "gap (4.6)", "‖Δ‖/‖ζ‖", "cos", "m"],
        [
            [r["legend"], fmt(r["relative_error"]), fmt(r["reduction_ratio"], ".4f"), fmt(r["gap"], "+.3e"),
             fmt(r["euclidean_relative_error"]), fmt(r["cosine"], ".4f"), r["coarse_dim"] or ""]
            for r in last_rows.values()
        ],
    )
    lines += ["", "All checkpoints: `errors.csv`.", "", "## Figures", ""]
    for png in sorted(out.glob("*.png")):
        lines.append(f"![{png.stem}]({png.name})")
    lines += ["", "## Structure at the last checkpoint", ""]
    if hasattr(inter, "off_diagonal_share"):
        lines.append(f"* Share of ‖F‖²_F off the block diagonal: {fmt(inter.off_diagonal_share)}.")
    for key, s in spectra.items():
        lines.append(f"* {s.label}: λ_min {fmt(s.lambda_min)}, λ_max {fmt(s.lambda_max)}, condition number {fmt(s.condition_number)} ({s.method}).")
    lines += ["", "## Time", ""]
    lines += [f"* {k}: {v:.1f} s" for k, v in seconds.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
