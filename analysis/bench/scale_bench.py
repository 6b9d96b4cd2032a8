"""ResNet-18 (CIFAR, width 1, 11.2 M parameters) on the CIFAR stand-in: where ``compare``'s time goes.

Captures one mc batch (K = 1), then times each setup stage that ``fisherlab.compare`` pays before its
first method — the Jacobian in float64, the per-layer Grams K_i and K's eigendecomposition (anatomy,
damping scale), the KFAC factors and their eigendecompositions — and then ``compare`` itself on the
warm Jacobian (its methods). Prints each stage with its share, the total, and the process's peak
RSS. ``--eigh lapack`` forces ``torch.linalg.eigh`` on every factor (the path before issue 14) for
the before/after figure. Not a test: it takes minutes.

Measured (2 shared cores, B = 32, methods = kfac, λ = 1e-3·λ_max):

    before (--eigh lapack): factor eigh 155 s of a 186 s compare (the three 4609 × 4609 A factors
                            of layer4, 29–52 s each), peak RSS 3.2 GiB
    after:                  factor eigh 52 s (layer4's A from their 512 rows: 4.4 s instead of 52 s
                            each; layer3's 2305² A, with 2048 rows, stay on LAPACK), Grams 1.8 s,
                            KFAC factors 5.3 s, compare itself 31 s: total 90 s, peak RSS 3.2 GiB;
                            the table is unchanged (𝔈/‖ζ‖² = 4.107, cos = 0.60453)

    python analysis/bench/scale_bench.py                      # B = 32, kfac only
    python analysis/bench/scale_bench.py --batch 128 --methods default
    python analysis/bench/scale_bench.py --eigh lapack        # the "before" path
    python analysis/bench/scale_bench.py --width 0.125 --batch 8   # a quick smoke run
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import torch

import fisherlab
from fisherlab import datasets, jacobian, methods, models
from fisherlab.jacobian import Jacobian


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--damping", type=float, default=1e-3, help="λ/λ_max(F)")
    ap.add_argument("--methods", default="kfac", help="comma-separated keys, or 'default' (the registry's default set)")
    ap.add_argument("--eigh", choices=["auto", "lapack"], default="auto",
                    help="'lapack': torch.linalg.eigh on every factor (the path before issue 14)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--memory", default=None, help="memory budget for compare (e.g. 16GiB)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eigh == "lapack":
        jacobian.LOWRANK_EIGH_MIN_DIM = 1 << 62
    keys = methods.default_keys() if args.methods == "default" else args.methods.split(",")

    model = models.build(models.describe("resnet18", width=args.width), seed=0)
    x, y = datasets.load("cifar-standin", n=args.batch).batch(list(range(args.batch)))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm is listed as outside the Fisher
        cap = fisherlab.capture(model, x, y, loss="cross_entropy", fisher="mc",
                                generator=torch.Generator().manual_seed(0), device="cpu")
    t_cap = time.perf_counter() - t0
    print(f"ResNet-18 width {args.width}: p = {cap.p:,}, B = {cap.B}, N = {cap.N}, {len(cap.layers)} layers; "
          f"capture {t_cap:.2f} s, peak RSS {_peak_gib():.2f} GiB", flush=True)

    stages: list[tuple[str, float]] = []

    def stage(name, fn):
        t = time.perf_counter()
        out = fn()
        stages.append((name, time.perf_counter() - t))
        print(f"  {name:<34} {stages[-1][1]:8.2f} s", flush=True)
        return out

    t_all = time.perf_counter()
    jac = stage("Jacobian (float64, to device)", lambda: Jacobian.coerce(cap, device=args.device))
    stage("per-layer Grams K_i, K", lambda: jac.gram)
    stage("eigh of K (anatomy, λ scale)", lambda: jac.gram_eigh)
    stage("KFAC factors A_i, G_i", lambda: [lj.kfac_factors for lj in jac.layers])
    big = [lj for lj in jac.layers if lj.spec.d_in_bar >= 1024]
    stage(f"factor eigh ({len(big)} with d_in' ≥ 1024)", lambda: [lj.kfac_eigh for lj in jac.layers])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = stage(f"compare ({', '.join(keys)})", lambda: fisherlab.compare(
            jac, fisherlab.Damping(args.damping, "max"), keys, rhs=cap.grad, memory=args.memory))
    total = time.perf_counter() - t_all
    print(table)
    print(f"\ncompare total {total:.2f} s (goal for B = 128, every default method: ≤ 60 s), "
          f"peak RSS {_peak_gib():.2f} GiB (goal ≤ 8 GiB), eigh path {args.eigh}, threads {torch.get_num_threads()}")
    for name, s in stages:
        print(f"  {name:<34} {s:8.2f} s  {s / total:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
