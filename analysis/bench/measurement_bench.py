"""What the measurement machinery costs (issue "Errors that mean something"), side by side in one run.

On the MNIST autoencoder (784-1000-500-250-30-250-500-1000-784, p ≈ 2.8 M, full width), B = 256,
``bce_logits``, mc with K = 1, real MNIST digits, λ = 1e-3·λ_max(F), the default methods:

* ``compare`` with the anatomy of every error (span / null split, per layer, top modes) against
  ``compare(..., anatomy_of_errors=False)`` — target: ≤ 1.20×;
* ``compare`` over 4 independent batches against one batch — target: ≤ 4.2×.

Each configuration is timed ``--repeats`` times (median reported); the order alternates so that
load on the shared cores affects both alike. Also prints where ζ lives (null share) and the
fraction of ∇h outside the span of the mc-sampled rows, the regime the numbers are measured in.

    python analysis/bench/measurement_bench.py            # full width, B = 256 (~2–4 min)
    python analysis/bench/measurement_bench.py --quick    # width 0.1, B = 64
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import fisherlab
from fisherlab import datasets, models
from fisherlab.errors import MeasurementWarning


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--damping", type=float, default=1e-3, help="λ/λ_max(F)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.width, args.repeats = 64, 0.1, 2
    warnings.simplefilter("ignore", MeasurementWarning)

    desc = models.describe("mnist-ae", width=args.width)
    model = models.build(desc, seed=0)
    data = datasets.load("mnist")
    caps = []
    for b in range(4):
        x, y = data.batch(list(range(b * args.batch, (b + 1) * args.batch)))
        caps.append(fisherlab.capture(model, x, y, loss="bce_logits", fisher="mc",
                                      generator=torch.Generator().manual_seed(b), device="cpu"))
    lam = fisherlab.Damping(args.damping, "max")
    print(f"mnist-ae width {args.width}: p = {caps[0].p:,}, B = {args.batch}, mc K = 1, {lam}")

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    fisherlab.compare(caps[0], lam, ["kfac"])  # warm-up: allocator, lazy imports
    t_plain, t_anat, t_one, t_four = [], [], [], []
    for r in range(args.repeats):
        pair = [("plain", lambda: fisherlab.compare(caps[0], lam, anatomy_of_errors=False)),
                ("anat", lambda: fisherlab.compare(caps[0], lam))]
        for name, fn in (pair if r % 2 == 0 else pair[::-1]):
            (t_plain if name == "plain" else t_anat).append(timed(fn))
        t_one.append(t_anat[-1])
        t_four.append(timed(lambda: fisherlab.compare(caps, lam)))
    table = fisherlab.compare(caps, lam)
    med = statistics.median
    print(f"compare without anatomy        {med(t_plain):7.2f} s")
    print(f"compare with anatomy           {med(t_anat):7.2f} s   ratio {med(t_anat) / med(t_plain):.3f}  (target ≤ 1.20)")
    print(f"compare over 4 batches         {med(t_four):7.2f} s   ratio to one batch {med(t_four) / med(t_one):.3f}  (target ≤ 4.2)")
    s = {r["method"]: r for r in table.summary()}
    print(f"λ = {table.meta['damping']:.4g} on batch 0; ζ's null share {s['kfac']['zeta_null_share']:.3f} ± "
          f"{s['kfac']['zeta_null_share_hw']:.3f}; ∇h outside span(U) {s['kfac']['rhs_outside_span']:.3f}")
    for key in ("kfac", "kfac-tikhonov", "ekfac", "residuals", "taylor", "block-diagonal"):
        r = s[key]
        print(f"  {r['legend']:<14} 𝔈/‖ζ‖² {r['relative_error']:.4f} ± {r['relative_error_hw']:.4f}   "
              f"null share {r['error_null'] / r['energy_error']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
