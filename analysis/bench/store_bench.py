"""HDF5 write throughput of ``fisherlab.save`` vs a raw numpy write of the same bytes (fsync'd).

Measured side by side in one run, medians of ``--repeat`` runs, on a capture of the MNIST
autoencoder 784-1000-500-250-30-250-500-1000-784 (B = 256, bce_logits, mc with K samples so the
capture is large enough to time). Prints MB/s and the ratio to raw for: uncompressed (default),
lzf, gzip; and ``load`` throughput.

    python analysis/bench/store_bench.py            # K = 16, ≈ 70 MB
    python analysis/bench/store_bench.py --quick    # small smoke run

Target (issue 2): uncompressed ≥ 0.6× raw; compression opt-in with its cost stated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fisherlab


def mnist_autoencoder(width: float = 1.0) -> nn.Module:
    dims = [784, 1000, 500, 250, 30]
    dims = [dims[0]] + [max(1, round(d * width)) for d in dims[1:]]
    full = dims + dims[-2::-1]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(full[:-1], full[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(full) - 2 and b != dims[-1]:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def raw_write(arrays: list[np.ndarray], path: Path) -> None:
    with open(path, "wb") as f:
        for a in arrays:
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def capture_arrays(cap: fisherlab.Capture) -> list[np.ndarray]:
    out = [cap.grad.numpy()]
    for lc in cap.layers:
        out += [t.numpy() for t in (lc.a, lc.g, lc.dense, lc.A, lc.G) if t is not None]
    return out


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", "-K", type=int, default=16, help="MC samples per example (size of g)")
    ap.add_argument("--batch-size", "-B", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = ap.parse_args(argv)
    width, B, K, repeat = (0.1, 32, 2, 2) if args.quick else (1.0, args.batch_size, args.samples, args.repeat)

    torch.manual_seed(0)
    model = mnist_autoencoder(width)
    x = torch.rand(B, 784)
    cap = fisherlab.capture(model, x, x, loss="bce_logits", fisher="mc", n_samples=K,
                            generator=torch.Generator().manual_seed(0), device="cpu")
    arrays = capture_arrays(cap)
    nbytes = sum(a.nbytes for a in arrays)
    mb = nbytes / 1e6

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        d = Path(d)
        t_raw = median_time(lambda: raw_write(arrays, d / "raw.bin"), repeat)
        rows = [("raw numpy write + fsync", t_raw, None)]
        for comp in (None, "lzf", "gzip"):
            path = d / f"cap-{comp}.h5"

            def save(path=path, comp=comp) -> None:
                if path.exists():
                    path.unlink()
                fisherlab.save(cap, path, checkpoint="c", step=0, compression=comp)

            t = median_time(save, repeat)
            rows.append((f"fisherlab.save ({comp or 'uncompressed'})", t, path.stat().st_size))
        t_load = median_time(lambda: fisherlab.load(d / "cap-None.h5", "c"), repeat)

    print(f"capture: mnist-ae width {width}, B={B}, K={K}, {mb:.1f} MB of arrays, "
          f"torch threads {torch.get_num_threads()}, median of {repeat}")
    print(f"{'write':<34}{'seconds':>10}{'MB/s':>10}{'× raw':>8}{'file/raw':>10}")
    for name, t, size in rows:
        ratio = t_raw / t
        fr = "" if size is None else f"{size / nbytes:.2f}"
        print(f"{name:<34}{t:>10.3f}{mb / t:>10.0f}{ratio:>8.2f}{fr:>10}")
    print(f"{'fisherlab.load (uncompressed)':<34}{t_load:>10.3f}{mb / t_load:>10.0f}")
    unc = t_raw / rows[1][1]
    print(f"\nuncompressed save / raw = {unc:.2f}× (target ≥ 0.6×)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
