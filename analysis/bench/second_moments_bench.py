"""The diagonal of F and EKFAC's eigenbasis second moments on a realistic capture, old vs new
(issue 14): per layer and in total, plus the ``DiagonalFisher`` / ``EKFAC`` operators end to end.

Usage::

    python analysis/bench/second_moments_bench.py [--path /tmp/sb/run128.h5] [--batch b0]
                                                  [--threads 2] [--damping 1e-3] [--no-old]

Per layer of the capture (float64, ``Jacobian.coerce``):

* ``eigh``: the KFAC factors' eigenpairs ``lj.kfac_eigh`` — setup shared with KFAC, spectra and
  the coarse spaces (timed apart, not part of the second moments);
* ``diag``: ``lj.diagonal()`` (new) against the loop it replaced (``_second_moments_reference``
  of a factored layer; ``J.pow(2).sum(0)/B`` of a dense one);
* ``esm``: EKFAC's ``s = diag(QᵀF_iiQ)`` as ``EKFAC.from_capture`` computes it
  (``ekfac.range_second_moments``: Q_A's exact-zero columns skipped) against the old loop
  (``_second_moments_reference``, all columns); ``esm-all``: the new path on every column (only
  where Q_A has exact zeros, to show what the skip saves);
* ``rel``: ``‖new − old‖/‖old‖`` of the diagonal and of s.

Then ``DiagonalFisher.from_capture`` and ``EKFAC.from_capture`` on the same Jacobian, end to end
(its eigenpairs already computed, as in ``compare``). Wall seconds, and the process's CPU seconds
(``time.process_time``: less sensitive to other jobs on shared cores); ``uptime``'s load before
and after.

Measured 2026-12-01 (``/tmp/sb/run128.h5``: ResNet-18 width 1 on CIFAR shapes, B = 128, mc K = 1,
p = 11.2 M, 21 layers: 10 stored dense, 11 factored; float64, 2 threads, this 2-core machine
under load average 6.1–6.5 from other jobs, so the walls are about twice the CPU/2 of a quiet
machine; CPU seconds are the comparable figure). Seconds wall (CPU):

===========================  ===========  ===========  ===========  ===========  ============
layers                       diag old     diag new     esm old      esm new      eigh (setup)
===========================  ===========  ===========  ===========  ===========  ============
10 dense (layer1, layer2)    1.6 (0.9)    1.7 (1.1)    13.6 (8.6)   12.6 (8.1)   4.5 (2.7)
layer3, 5 (T = 64)           12.3 (7.4)   4.6 (2.8)    29.8 (18.1)  18.8 (11.9)  48.7 (28.9)
layer4.0.conv1 (T = 16)      4.9 (3.0)    1.2 (0.8)    5.8 (3.6)    2.3 (1.5)    10.4 (6.8)
layer4, 3 4608-wide (T = 16) 28.2 (17.3)  6.6 (4.1)    38.8 (24.7)  9.2 (6.0)    77.5 (49.6)
all 21                       47.6 (29.0)  14.5 (9.0)   88.7 (55.3)  43.3 (27.8)  141.5 (88.2)
===========================  ===========  ===========  ===========  ===========  ============

* The three 4608-wide layer4 convs: A has rank B·T = 2048, 2560 of Q_A's 4608 columns are the
  exact-zero null space; skipping them takes ``esm`` from 19.8 (12.5) to 9.2 (6.0).
* ``‖new − old‖/‖old‖`` ≤ 1.5e-16 (diagonal) and 1.7e-16 (s) on every layer.
* End to end, eigenpairs computed: ``DiagonalFisher.from_capture`` 13.9 s (8.9 CPU s),
  ``EKFAC.from_capture`` 30.9 s (28.4 CPU s); peak RSS 4.79 GiB. The figures of the issue on a
  quieter machine (wall): ``diagonal`` 14.2 s, ``ekfac`` 27.0 s, i.e. about CPU/2: the new paths
  should take ~4.5 s and ~14 s there.
* What bounds them now: the dense layers' rotations (N·d_out·d_in'² flops, ~180 GFLOP) and
  layer3's ā Q_A (B·T·d_in'² = 87 GFLOP per 2304-wide layer) run at GEMM speed; the
  per-example products with T = 16 (inner dimension 16) reach ~7 GFLOP per CPU second, a
  quarter of the GEMM peak, however chunked (cache-sized column tiles measured no faster).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from fisherlab.jacobian import Jacobian
from fisherlab.operators import EKFAC, DiagonalFisher
from fisherlab.operators.ekfac import range_second_moments
from fisherlab.store import load


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(f):
    """``(value, wall s, CPU s)`` of ``f()``."""
    t, c = time.perf_counter(), time.process_time()
    v = f()
    return v, time.perf_counter() - t, time.process_time() - c


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm()) / max(float(y.norm()), 1e-300)


def old_diagonal(lj) -> torch.Tensor:
    """The diagonal as computed before issue 14."""
    if lj.factored:
        return lj._second_moments_reference(None, None).mT.reshape(-1)
    return lj.dense.pow(2).sum(0) / lj.B


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default="/tmp/sb/run128.h5")
    ap.add_argument("--batch", default="b0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--damping", type=float, default=1e-3, help="λ of the operators (absolute; it does not change the cost)")
    ap.add_argument("--no-old", action="store_true", help="skip the old loops (and the accuracy columns)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(f"load average before: {load_average()}", flush=True)
    cap, t_load, _ = timed(lambda: load(args.path, args.batch))
    jac, t_coerce, _ = timed(lambda: Jacobian.coerce(cap))
    print(f"{args.path} [{args.batch}]: B = {jac.B}, K = {jac.K}, p = {jac.p}, {len(jac.layers)} layers; "
          f"load {t_load:.1f} s, coerce {t_coerce:.1f} s; threads {args.threads}", flush=True)

    cols = ["eigh", "diag old", "diag new", "esm old", "esm new", "esm-all"]
    head = f"{'layer':<20} {'kind':<10} {'T':>3} {'d_in':>5} {'d_out':>5} {'null':>5} " + " ".join(f"{c:>15}" for c in cols) + f" {'rel diag':>9} {'rel esm':>9}"
    print("wall s (CPU s)")
    print(head, flush=True)
    tot = {c: [0.0, 0.0] for c in cols}
    worst = [0.0, 0.0]
    for lj in jac.layers:
        (sA, QA, sG, QG), *te = timed(lambda: lj.kfac_eigh)
        row = {"eigh": te}
        d_new, *row["diag new"] = timed(lj.diagonal)
        s_new, *row["esm new"] = timed(lambda: range_second_moments(lj, sA, QA, QG))
        null = int((sA == 0).sum())
        if null:
            s_all, *row["esm-all"] = timed(lambda: lj.eigenbasis_second_moments(QA, QG))
            assert rel(s_new, s_all) < 1e-12, (lj.spec.name, rel(s_new, s_all))
            del s_all
        r_d = r_s = float("nan")
        if not args.no_old:
            d_old, *row["diag old"] = timed(lambda: old_diagonal(lj))
            s_old, *row["esm old"] = timed(lambda: lj._second_moments_reference(QA, QG))
            r_d, r_s = rel(d_new, d_old), rel(s_new, s_old)
            worst = [max(worst[0], r_d), max(worst[1], r_s)]
            del d_old, s_old
        for c, (w, cpu) in row.items():
            tot[c][0] += w
            tot[c][1] += cpu
        cells = " ".join(f"{row[c][0]:6.2f} ({row[c][1]:6.2f})" if c in row else f"{'':>15}" for c in cols)
        kind = "factored" if lj.factored else "dense"
        print(f"{lj.spec.name:<20} {kind:<10} {lj.T:>3} {lj.spec.d_in_bar:>5} {lj.spec.d_out:>5} {null:>5} {cells} {r_d:9.1e} {r_s:9.1e}", flush=True)
    cells = " ".join(f"{tot[c][0]:6.2f} ({tot[c][1]:6.2f})" for c in cols)
    print(f"{'total':<20} {'':<10} {'':>3} {'':>5} {'':>5} {'':>5} {cells} {worst[0]:9.1e} {worst[1]:9.1e}", flush=True)

    _, *t_diag = timed(lambda: DiagonalFisher.from_capture(jac, args.damping))
    _, *t_ekfac = timed(lambda: EKFAC.from_capture(jac, args.damping))
    print(f"end to end (eigenpairs computed): DiagonalFisher.from_capture {t_diag[0]:.2f} s ({t_diag[1]:.2f} CPU s), "
          f"EKFAC.from_capture {t_ekfac[0]:.2f} s ({t_ekfac[1]:.2f} CPU s)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; load average after: {load_average()}")


if __name__ == "__main__":
    main()
