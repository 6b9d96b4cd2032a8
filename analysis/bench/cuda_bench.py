"""The prepared CUDA benchmark (issue 14): ``fisherlab.compare`` on the CPU and on a GPU, same capture.

Run once on a machine with a GPU; every figure printed goes into the issue's note:

    python analysis/bench/cuda_bench.py                        # autoencoder + ResNet-18, cpu vs cuda
    python analysis/bench/cuda_bench.py --device cpu --quick   # a smoke run without a GPU

For each case (the mc MNIST autoencoder at B = 256, ResNet-18 width 1 at B = 32 on the CIFAR
stand-in; ``--quick``: width 0.05/0.125, B = 16), it captures one batch on the CPU, then runs
``compare`` with the methods of ``--methods`` at λ = 1e-3·λ_max on the CPU (float64) and on
``--device`` in float64 and with ``precision="mixed"``, and prints each time, the CPU/device
ratio, the device's peak memory, and the largest difference of relative error and cosine to the
CPU float64 table (mixed: its measured error).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import fisherlab
from fisherlab import datasets, models

CASES = {
    "autoencoder": ("mnist-ae", "mnist", "bce_logits", 256, 1.0),
    "resnet18": ("resnet18", "cifar-standin", "cross_entropy", 32, 1.0),
}


def _capture(name: str, quick: bool):
    model_name, data_name, loss, B, width = CASES[name]
    if quick:
        B, width = 16, (0.05 if name == "autoencoder" else 0.125)
    model = models.build(models.describe(model_name, width=width), seed=0)
    x, y = datasets.load(data_name, n=B if data_name != "mnist" else None).batch(list(range(B)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fisherlab.capture(model, x, y, loss=loss, fisher="mc", generator=torch.Generator().manual_seed(0), device="cpu")


def _run(cap, keys, **kw):
    dev = kw.get("device")
    if dev and str(dev).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = fisherlab.compare(cap, fisherlab.Damping(1e-3, "max"), keys, **kw)
    if dev and str(dev).startswith("cuda"):
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev and str(dev).startswith("cuda") else float("nan")
    return table, time.perf_counter() - t0, peak


def _diff(a, b) -> float:
    out = 0.0
    for ra, rb in zip(a.rows, b.rows):
        for col in ("relative_error", "cosine"):
            x, y = ra[col], rb[col]
            if x == x and y == y:
                out = max(out, abs(x - y) / max(abs(x), 1e-300))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", default="autoencoder,resnet18")
    ap.add_argument("--methods", default="exact,block-diagonal,kfac,kfac-tikhonov,ekfac,zero")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    keys = args.methods.split(",")
    for name in args.cases.split(","):
        cap = _capture(name, args.quick)
        print(f"== {name}: p = {cap.p:,}, B = {cap.B}, N = {cap.N}", flush=True)
        ref, t_cpu, _ = _run(cap, keys, device="cpu")
        print(f"  cpu float64            {t_cpu:8.2f} s", flush=True)
        for precision in ("float64", "mixed"):
            table, t, peak = _run(cap, keys, device=args.device, precision=precision)
            print(f"  {args.device} {precision:<8}  {t:8.2f} s   cpu/{args.device} ×{t_cpu / t:6.2f}   "
                  f"peak {peak:.2f} GiB   max rel. diff to cpu float64 {_diff(ref, table):.2e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
