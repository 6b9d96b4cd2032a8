"""Spectra of F• and F•KFAC plus the layer-interaction map for one autoencoder checkpoint.

Usage::

    python analysis/bench/spectra_bench.py [--batch 256] [--damping 1e-3] [--threads N]
                                           [--preconditioned] [--csv PATH]

Problem (issue 4): the MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (p ≈ 2.8 M),
B = 256, ``bce_logits``, ``mc`` with K = 1 (N = 256), real digits from ``fisherlab.datasets``.
The capture is made once, saved to a temporary HDF5 file and loaded back (float32 factors, as
an analysis run sees them); the timed part starts from the loaded capture:

* ``jacobian``: float64 conversion of the factors (``Jacobian.from_capture``);
* ``grams``: the ℓ per-layer N × N Grams (shared by everything below);
* ``fisher spectrum``: ``eig(K) + λ`` and the λ-cluster (exact, all p eigenvalues);
* ``kfac spectrum``: factor eigendecompositions and their products (exact, all p eigenvalues);
* ``interactions``: ‖F_ij‖²_F = tr(K_iK_j), ρ, off-diagonal share;
* ``kfac block errors``: ‖F_ii − A_i⊗G_i‖/‖F_ii‖ (MATH §7), for context;
* ``preconditioned (lanczos k=6)``: optional (``--preconditioned``), for context.

Target: spectra of F• and F•KFAC plus the interaction map in under 20 s on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

import fisherlab
import fisherlab.datasets
import fisherlab.models
from fisherlab import spectra as S
from fisherlab import structure as St
from fisherlab.jacobian import Jacobian
from fisherlab.operators import KFAC, ExactFisher

TARGET_S = 20.0


def make_capture(batch: int, seed: int = 0) -> fisherlab.Capture:
    desc = fisherlab.models.describe("mnist-ae")
    model = fisherlab.models.build(desc, seed=seed)
    data = fisherlab.datasets.load("mnist", n=batch, seed=seed)
    return fisherlab.capture(
        model, data.x.reshape(batch, -1), data.y, loss="bce_logits", fisher="mc", n_samples=1,
        generator=torch.Generator().manual_seed(seed), device="cpu", model_description=desc,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--preconditioned", action="store_true", help="also time Lanczos extremes of the preconditioned operator")
    ap.add_argument("--csv", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cap0 = make_capture(args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ae.h5"
        fisherlab.save(cap0, path, checkpoint="bench", step=0)
        cap = fisherlab.load(path, "bench")
    print(f"mnist-ae: p = {cap.layout.p:,}, B = {cap.B}, K = {cap.K}, N = {cap.N}, layers = {len(cap.layers)}, "
          f"torch threads = {torch.get_num_threads()}")

    times: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        print(f"  {name:<32s} {times[name]:8.3f} s")
        return out

    jac = timed("jacobian", lambda: Jacobian.from_capture(cap))
    timed("grams", lambda: jac.grams)
    fs = timed("fisher spectrum", lambda: S.fisher_spectrum(jac, args.damping))
    kfac = timed("kfac spectrum (incl. factors)", lambda: KFAC(jac, args.damping))
    ks = timed("kfac eigenvalues", lambda: S.kfac_spectrum(kfac))
    li = timed("interactions", lambda: St.layer_interactions(jac))
    total = sum(times.values())
    ke = timed("kfac block errors", lambda: St.kfac_block_errors(jac))
    if args.preconditioned:
        ps = timed("preconditioned (lanczos k=6)", lambda: S.preconditioned_spectrum(kfac=kfac, exact=ExactFisher(jac, args.damping), method="lanczos", k=6))
        print(f"  preconditioned: {ps}")
    print(f"  {'TOTAL (target)':<32s} {total:8.3f} s   target < {TARGET_S:.0f} s: {'PASS' if total < TARGET_S else 'FAIL'}")
    print(f"  {fs}\n  {ks}")
    print(f"  off-diagonal share of ‖F‖²_F: {li.off_diagonal_share:.3f}; KFAC block errors: "
          + ", ".join(f"{e:.3f}" for e in ke.relative_error))
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "seconds"])
            for k, v in times.items():
                w.writerow([k, f"{v:.6f}"])
            w.writerow(["total_target", f"{total:.6f}"])
    return 0 if total < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
