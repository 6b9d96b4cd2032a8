"""Exact regularized natural gradient ζ = F•⁻¹∇h: Woodbury from a stored capture vs CG.

Usage::

    python analysis/bench/woodbury_bench.py [--quick] [--damping 1e-3] [--device cpu|cuda]
                                            [--batch 256] [--exact-batch 16] [--threads N]
                                            [--reps 3] [--cg-maxiter 5000] [--exact-budget 120]
                                            [--no-exact]

Problem (issue 3): the MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU between
layers, logits out, p ≈ 2.8 M), ``bce_logits``, B = 256, Fisher ``mc`` with K = 1; real MNIST
from ``fisherlab.datasets`` (uniform [0, 1] inputs if that module is missing, and always with
``--quick``). One capture in float32 (as stored), one in float64 (the reference).

Measured side by side in one run:

* (a) ``ExactFisher(cap, λ, solver="woodbury")``: ζ = (w − U(λI + K)⁻¹Uᵀw)/λ, split into the
  float32 → float64 conversion of the factors, the per-layer Grams K_i, the Cholesky of
  λI + K and the products Uᵀw, (λI + K)⁻¹·, U·; median of ``--reps`` fresh operators;
* (b) ``scipy.sparse.linalg.cg`` on ``ExactFisher(cap, λ).to_scipy()`` (the same F• matvecs,
  unpreconditioned), stopped as soon as it is as close to the float32-data solution ζ_W of (a)
  as ζ_W is to the float64 reference (the distance is measured in the callback; its cost is
  timed and subtracted), so that both reach the same relative accuracy;
* the float64 reference (float64 capture + Woodbury), cross-checked by a tight plain CG on the
  float64 capture (F has rank ≤ N: plain CG terminates in about N + 1 steps, while KFAC
  preconditioning destroys that structure and needs thousands);
* the relative errors ‖ζ_m − ζ_ref‖/‖ζ_ref‖ of (a) and (b);
* peak memory of the Woodbury path: computed (N² terms, N·Σ(d_in'+d_out) terms, p-vectors) and
  measured as the growth of the resident set over one solve in a fresh process that loads the
  saved float32 capture (CPU; not with ``--quick``), sampled every millisecond by a psutil thread, and the growth of
  ``resource`` ru_maxrss over it; the same in this process is printed too (there, memory freed
  by earlier steps is reused, so it under-reads);
* the Gram step's GFLOP/s per layer (flops of the Hadamard Grams: 2·B²·d per GEMM, d = d_in'
  for the ā Gram and d_out for the g Gram) against the machine's GEMM peak measured in the same
  run (torch float64 and float32 matmul, 4096 × 4096; and the best of ten 1024 × 1024 float64
  matmuls, since on a shared machine a multi-second GEMM is time-sliced with other jobs while
  millisecond bursts are not — the larger float64 figure is the reference);
* the exact-mode autoencoder (N = 784·B) at B = ``--exact-batch`` through the CG path, with and
  without the KFAC preconditioner; each solve is capped at about ``--exact-budget`` seconds of
  matvecs (the cap and the relative residual reached are printed).

Targets (issue 3): Woodbury ≥ 50× faster than CG; relative error ≤ 1e-5; Gram ≥ 70 % of the GEMM
peak on the large layers.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import tempfile
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

# On a shared, oversubscribed machine OpenMP's spin-waiting makes small torch ops ~1000× slower
# (measured: a 73-parameter F• matvec 0.3 s instead of 0.3 ms with 2 threads at load 8 on 2
# cores); passive waiting avoids it. Must be set before torch loads its OpenMP runtime; an
# explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fisherlab  # noqa: E402
from fisherlab.operators import ExactFisher  # noqa: E402

AE_WIDTHS = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
QUICK_WIDTHS = [784, 32, 8, 32, 784]
LARGE_LAYER = 250_000  # p_i from which a layer counts as "large" for the Gram target


# ---- helpers ----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def autoencoder(widths: list[int], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(len(widths) - 1):
        mods.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def inputs(B: int, quick: bool, seed: int) -> tuple[torch.Tensor, str]:
    if not quick:
        try:
            from fisherlab import datasets

            d = datasets.load("mnist", n=B, seed=seed)
            return d.x.reshape(B, -1).float(), "real MNIST (fisherlab.datasets)"
        except Exception as e:  # module missing or data unavailable
            print(f"  (fisherlab.datasets.load('mnist') unavailable: {e}; using uniform [0, 1])")
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 784, generator=g), "uniform [0, 1]"


def gemm_peak(n: int, dtype: torch.dtype, device: torch.device, reps: int = 3) -> float:
    """Best-of GFLOP/s of an n × n matmul (2n³ flops)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up
    best = math.inf
    for _ in range(reps):
        _, t = timed(lambda: torch.mm(a, b), device)
        best = min(best, t)
    return 2 * n**3 / best / 1e9


class RSSPeak:
    """Peak resident-set growth over a block, sampled by a thread every ``interval`` s (psutil)."""

    def __init__(self, interval: float = 1e-3) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.growth = self.peak - self.base
        self.maxrss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss0) * 1024
        return False


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm())


def scipy_operator(op: ExactFisher, device: torch.device):
    """``op.to_scipy()`` on the CPU; on CUDA a LinearOperator moving vectors to the device."""
    if device.type == "cpu":
        return op.to_scipy()
    from scipy.sparse.linalg import LinearOperator

    def mv(x):
        X = torch.as_tensor(np.asarray(x, dtype=np.float64), device=device).reshape(op.p, -1)
        return (op @ X).cpu().numpy().reshape(x.shape)

    return LinearOperator(op.shape, dtype=np.float64, matvec=mv, rmatvec=mv)


# ---- the pieces ---------------------------------------------------------------------------------
def woodbury_split(cap, lam, w, device):
    """One fresh Woodbury solve, timed by phase with the operator's own code."""
    t = {}
    op, t["convert"] = timed(lambda: ExactFisher(cap, lam, solver="woodbury"), device)
    _, t["gram"] = timed(lambda: op.jac.gram, device)  # per-layer Grams and their sum (cached)
    _, t["cholesky"] = timed(lambda: op.woodbury_cholesky, device)
    z, t["products"] = timed(lambda: op.solve(w), device)  # Uᵀw, cholesky_solve, U·
    t["total"] = sum(t.values())
    return z, t, op


def gram_rates(op: ExactFisher, device, reps: int):
    """Per layer: (name, p_i, flops, seconds) of ``LayerJacobian.gram`` (median of reps)."""
    rows = []
    for lj in op.jac.layers:
        B, K = lj.B, lj.K
        N = B * K
        d_in, d_out = lj.spec.d_in_bar, lj.spec.d_out
        flops = 2 * B * B * d_in + 2 * N * N * d_out  # the two GEMMs of the Hadamard Gram
        ts = [timed(lj.gram, device)[1] for _ in range(reps)]
        rows.append((lj.spec.name, lj.p, d_in, d_out, flops, statistics.median(ts)))
    return rows


def cg_to_accuracy(op: ExactFisher, b: np.ndarray, target: np.ndarray, tol: float, maxiter: int, device):
    """Unpreconditioned scipy CG, stopped when ‖x_k − target‖/‖target‖ ≤ tol (measured in the callback)."""
    from scipy.sparse.linalg import cg

    A = scipy_operator(op, device)
    tn = float(np.linalg.norm(target))
    state = {"it": 0, "cb": 0.0, "err": math.inf, "x": None}

    class Reached(Exception):
        pass

    def cb(xk):
        t0 = time.perf_counter()
        state["it"] += 1
        state["err"] = float(np.linalg.norm(xk - target)) / tn
        state["cb"] += time.perf_counter() - t0
        if state["err"] <= tol:
            state["x"] = xk.copy()
            raise Reached

    t0 = time.perf_counter()
    try:
        x, _ = cg(A, b, rtol=1e-14, atol=0.0, maxiter=maxiter, callback=cb)
    except Reached:
        x = state["x"]
    wall = time.perf_counter() - t0 - state["cb"]
    return x, wall, state["it"], state["err"], state["cb"]


def exact_mode_cg(model, x, lam, B, device, budget, quick):
    """Exact Fisher (K = 784) at batch B through KFAC-preconditioned and plain CG."""
    print(f"\n== exact-mode autoencoder through CG: B = {B}, K = d_y = 784, N = {784 * B:,} ==")
    cap, tc = timed(lambda: fisherlab.capture(model, x[:B], x[:B], loss="bce_logits", fisher="exact",
                                              device=device, dtype=torch.float32), device)
    print(f"  capture: {tc:.2f} s, N = {cap.N:,}, p = {cap.p:,}, {cap.nbytes() / 2**20:.0f} MiB stored")
    if device.type != "cpu":
        cap = cap.to(device)
    w = cap.grad.double()
    rows = []
    for pre in ("kfac", None):
        op = ExactFisher(cap, lam, solver="cg", preconditioner=pre, cg_rtol=1e-6)
        if pre:
            pc, tpc = timed(op.preconditioner_operator, device)
            _, tps = timed(lambda: pc.solve(w), device)
        else:
            tpc = tps = 0.0
        _, tmv = timed(lambda: op @ w, device)
        op.cg_maxiter = max(3, int(budget / max(tmv + tps, 1e-6)))
        print(f"  {'KFAC-preconditioned' if pre else 'plain':<20} one F• matvec {tmv:.3f} s{f' + KFAC solve {tps:.3f} s' if pre else ''}; "
              f"iteration cap {op.cg_maxiter} (≈ {budget:.1f} s budget){'; KFAC setup %.2f s' % tpc if pre else ''}")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            z, ts = timed(lambda: op.solve(w), device)
        res = float((op @ z - w).norm() / w.norm())
        it = op.last_solve.iterations[0]
        rows.append((pre, ts + tpc, it, res, op.last_solve.converged, op.cg_maxiter))
    print(f"  {'method':<22}{'time s':>10}{'iters':>8}{'rel. residual':>15}{'converged (1e-6)':>18}")
    for pre, ts, it, res, ok, cap_it in rows:
        name = "CG + KFAC precond." if pre else "CG (plain)"
        print(f"  {name:<22}{ts:>10.2f}{it:>8d}{res:>15.2e}{str(ok) + ('' if ok else f' (cap {cap_it})'):>18}")
    (p1, t1, i1, r1, ok1, _), (p2, t2, i2, r2, ok2, _) = rows
    print(f"  iterations plain / preconditioned: {i2} / {i1} = {i2 / max(i1, 1):.1f}×; "
          f"time {t2:.1f} s / {t1:.1f} s = {t2 / max(t1, 1e-9):.1f}×")
    return rows


def memory_probe(path: str, lam: float) -> None:
    """In a fresh process: load the capture, warm the kernels on a tiny problem, then measure one
    Woodbury solve (prints one JSON line)."""
    cap = fisherlab.load(path)
    a = torch.randn(64, 64, dtype=torch.float64)
    torch.linalg.cholesky(a @ a.T + torch.eye(64, dtype=torch.float64))  # load the kernels
    with RSSPeak() as mem:
        op = ExactFisher(cap, lam, solver="woodbury")
        z = op.solve(cap.grad)
    del z, op
    print(json.dumps({"rss_growth": mem.growth, "maxrss_growth": mem.maxrss_growth}))


def measure_memory_fresh(cap, lam: float) -> dict | None:
    """Run :func:`memory_probe` in a subprocess on a saved copy of ``cap`` (CPU only)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "cap.h5")
        fisherlab.save(cap, path)
        r = subprocess.run([sys.executable, __file__, "--memory-probe", path, "--damping", repr(lam)],
                           capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        print(f"  (memory probe failed: {r.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (a 784-32-8-32-784 net, B = 32; exact mode B = 1)")
    ap.add_argument("--damping", type=float, default=1e-3, help="λ (default 1e-3)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="B of the mc capture (default 256; quick 32)")
    ap.add_argument("--exact-batch", type=int, default=None, help="B of the exact-mode CG run (default 16; quick 1)")
    ap.add_argument("--exact-budget", type=float, default=None, help="seconds of matvecs per exact-mode CG solve (default 120; quick 0.5)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact-mode CG run")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of the timed Woodbury solve (default 3; quick 1)")
    ap.add_argument("--cg-maxiter", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-probe", metavar="PATH", help=argparse.SUPPRESS)  # internal: fresh-process probe
    args = ap.parse_args(argv)
    if args.memory_probe:
        memory_probe(args.memory_probe, args.damping)
        return 0

    q = args.quick
    B = args.batch or (32 if q else 256)
    Bx = args.exact_batch or (1 if q else 16)
    budget = args.exact_budget or (0.5 if q else 120.0)
    reps = args.reps or (1 if q else 3)
    lam = fisherlab.operators.check_damping(args.damping) if hasattr(fisherlab, "operators") else args.damping
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = QUICK_WIDTHS if q else AE_WIDTHS

    print(f"woodbury_bench: torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    model = autoencoder(widths, args.seed).to(device)
    x, source = inputs(max(B, Bx), q, args.seed)
    x = x.to(device)
    p = sum(p.numel() for p in model.parameters())
    print(f"problem: autoencoder {'-'.join(map(str, widths))}, p = {p:,}, B = {B}, bce_logits, mc K = 1, "
          f"λ = {lam:g}, inputs: {source}")

    # --- GEMM peak ---
    n = 512 if q else 4096
    peak64 = gemm_peak(n, torch.float64, device)
    peak32 = gemm_peak(n, torch.float32, device)
    print(f"GEMM peak ({n}×{n} matmul, best of 3): float64 {peak64:.1f} GFLOP/s, float32 {peak32:.1f} GFLOP/s")
    # On a shared machine a multi-second GEMM is time-sliced with other jobs while millisecond
    # bursts (like the Grams) are not: also measure short GEMMs, and use the larger figure.
    nb = 256 if q else 1024
    burst64 = gemm_peak(nb, torch.float64, device, reps=10)
    print(f"GEMM burst peak ({nb}×{nb} matmul, best of 10): float64 {burst64:.1f} GFLOP/s")
    peak64 = max(peak64, burst64)

    # --- captures ---
    def cap_of(dtype):
        return fisherlab.capture(model, x[:B], x[:B], loss="bce_logits", fisher="mc", n_samples=1,
                                 generator=torch.Generator().manual_seed(args.seed), device=device, dtype=dtype)

    cap32, t32 = timed(lambda: cap_of(torch.float32), device)
    cap64, t64 = timed(lambda: cap_of(torch.float64), device)
    if device.type != "cpu":
        cap32, cap64 = cap32.to(device), cap64.to(device)
    N = cap32.N
    print(f"captures: float32 {t32:.2f} s ({cap32.nbytes() / 2**20:.1f} MiB), float64 {t64:.2f} s; N = {N}, p = {cap32.p:,}")
    w32 = cap32.grad
    w64 = cap64.grad.double()

    # --- float64 reference ---
    ref_op = ExactFisher(cap64, lam, solver="woodbury")
    zref, tref = timed(lambda: ref_op.solve(w64), device)
    # plain CG: F = UUᵀ has rank ≤ N, so CG on F + λI terminates in ≤ N + 1 steps in exact
    # arithmetic; the KFAC preconditioner destroys that structure (thousands of iterations here).
    chk_op = ExactFisher(cap64, lam, solver="cg", preconditioner=None, cg_rtol=1e-12, cg_maxiter=args.cg_maxiter)
    zchk, tchk = timed(lambda: chk_op.solve(w64), device)
    print(f"float64 reference: Woodbury {tref:.2f} s; cross-check plain CG (rtol 1e-12) {tchk:.1f} s, "
          f"{chk_op.last_solve.iterations[0]} iterations, ‖ζ_CG − ζ_W‖/‖ζ_W‖ = {rel(zchk, zref):.2e}")

    # --- (a) Woodbury from the float32 capture ---
    runs = [woodbury_split(cap32, lam, w32, device) for _ in range(reps)]
    zW, _, opW = runs[-1]
    split = {k: statistics.median(r[1][k] for r in runs) for k in runs[0][1]}
    eW = rel(zW, zref)

    # memory of a solve: in a fresh process (CPU), and in this one
    fresh = measure_memory_fresh(cap32, lam) if device.type == "cpu" and not q else None  # ~5 s: not in --quick
    with RSSPeak() as mem:
        zmem, _, opM = woodbury_split(cap32, lam, w32, device)
    L = len(opM.jac.layers)
    sum_d = sum(lj.spec.d_in_bar + lj.spec.d_out for lj in opM.jac.layers)
    f64 = 8
    comp = {
        f"N² terms: {L} per-layer Grams + K + λI+K + its Cholesky = {L + 3}·N²·8": (L + 3) * N * N * f64,
        "N·Σ(d_in'+d_out) terms: factors ā, g in float64": N * sum_d * f64,
        "p-vectors: w (float64 copy), Uz, result, the largest layer's block": (3 * cap32.p + max(lj.p for lj in opM.jac.layers)) * f64,
    }
    del zmem, opM

    # --- Gram GFLOP/s ---
    grams = gram_rates(opW, device, reps=max(3, reps))

    # --- (b) CG on the same F• matvecs, to the same accuracy ---
    cg_op = ExactFisher(cap32, lam, solver="cg", preconditioner=None)
    _, tconv_cg = timed(lambda: cg_op.jac, device)  # conversion already done in the constructor
    b = w32.double().cpu().numpy()
    target = zW.double().cpu().numpy()
    xcg, tcg, itcg, errcg_w, tcb = cg_to_accuracy(cg_op, b, target, eW, args.cg_maxiter, device)
    ecg = rel(torch.from_numpy(np.ascontiguousarray(xcg)), zref)

    # --- report ---
    print("\n== exact natural gradient, mc autoencoder: Woodbury vs CG from the float32 capture ==")
    print(f"  {'method':<38}{'time s':>10}{'rel. err vs float64 ref':>26}")
    print(f"  {'(a) Woodbury (median of %d)' % reps:<38}{split['total']:>10.3f}{eW:>26.2e}")
    for k in ("convert", "gram", "cholesky", "products"):
        print(f"  {'      ' + k:<38}{split[k]:>10.3f}")
    print(f"  {'(b) scipy CG, plain, %d iterations' % itcg:<38}{tcg:>10.3f}{ecg:>26.2e}"
          f"   (‖ζ_CG − ζ_W‖/‖ζ_W‖ = {errcg_w:.1e}; callback {tcb:.2f} s excluded)")
    ratio = tcg / split["total"]
    print(f"  ratio CG / Woodbury: {ratio:.0f}×   (target ≥ 50×)    "
          f"rel. error Woodbury {eW:.1e}, CG {ecg:.1e} (target ≤ 1e-5)")
    print(f"  CG time per iteration {tcg / max(itcg, 1) * 1e3:.1f} ms; Woodbury ≈ {split['total'] / (tcg / max(itcg, 1)):.1f} CG iterations")

    print("\n== peak memory of the Woodbury path (float32 capture → float64 algebra) ==")
    for k, v in comp.items():
        print(f"  computed  {k:<66}{v / 2**20:>10.1f} MiB")
    tot = sum(comp.values())
    print(f"  computed  {'total':<66}{tot / 2**20:>10.1f} MiB   (p² would be {cap32.p**2 * 8 / 2**40:.1f} TiB)")
    if fresh:
        print(f"  measured  {'fresh process: RSS growth over the solve (psutil, 1 ms sampling)':<66}"
              f"{fresh['rss_growth'] / 2**20:>10.1f} MiB")
        print(f"  measured  {'fresh process: ru_maxrss growth (the import peak dominates)':<66}{fresh['maxrss_growth'] / 2**20:>10.1f} MiB")
    print(f"  measured  {'this process: RSS growth (psutil; freed memory is reused)':<66}{mem.growth / 2**20:>10.1f} MiB")
    print(f"  measured  {'this process: ru_maxrss growth (moves only past earlier peaks)':<66}{mem.maxrss_growth / 2**20:>10.1f} MiB")

    print("\n== Gram step: per-layer Hadamard Grams, flops 2·B²·d_in' + 2·N²·d_out ==")
    print(f"  {'layer':<8}{'p_i':>12}{'d_in_bar':>10}{'d_out':>8}{'MFLOP':>10}{'ms':>9}{'GFLOP/s':>10}{'% f64 peak':>12}")
    tf, tt, lf, lt = 0, 0.0, 0, 0.0
    for name, pi, di, do, fl, ts in grams:
        rate = fl / ts / 1e9
        print(f"  {name:<8}{pi:>12,}{di:>10}{do:>8}{fl / 1e6:>10.1f}{ts * 1e3:>9.2f}{rate:>10.1f}{100 * rate / peak64:>11.0f}%")
        tf, tt = tf + fl, tt + ts
        if pi >= LARGE_LAYER:
            lf, lt = lf + fl, lt + ts
    print(f"  all layers: {tf / tt / 1e9:.1f} GFLOP/s = {100 * tf / tt / 1e9 / peak64:.0f}% of the float64 GEMM peak ({peak64:.1f})")
    if lt > 0:
        print(f"  large layers (p_i ≥ {LARGE_LAYER:,}): {lf / lt / 1e9:.1f} GFLOP/s = "
              f"{100 * lf / lt / 1e9 / peak64:.0f}% of peak   (target ≥ 70 %)")

    if not args.no_exact:
        exact_mode_cg(model, x, lam, Bx, device, budget, q)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
