"""``compare_file`` over 8 checkpoints: serial against a Dask LocalCluster of 2 worker processes.

Eight checkpoints (the MNIST autoencoder at eight seeds; B = 128, ``bce_logits``, mc with K = 1,
real MNIST digits) are captured into one HDF5 file; then ``fisherlab.compare_file`` runs over
them serially (one torch thread) and on a LocalCluster of 2 worker processes × 1 thread
(``scheduler="local:2"``: one task per checkpoint, each worker reading its checkpoint from the
file). Prints the wall times, the speed-up with and without the cluster's start, and checks that
the rows are the serial ones (every column but the timings, to 1e-12).

Measured (this project's 2-core machine, idle: load average 1.1–1.6; mnist-ae width 0.5,
p = 1.1 M, B = 128, λ = 1e-3, kfac + exact + residuals + krylov-residuals + spectral): serial
14.96 s; Dask 10.20 s on its first run (×1.47; the workers compute everything and write the setup
cache), 7.47 s on the second (×2.00; the workers read that cache, which the serial run neither reads
nor writes); cluster start 6.09 s. CPU seconds of the second run: serial 14.89 s, the two workers
6.70 + 6.79 s. Rows equal to the serial run (to 1e-12 of each column's scale: SPECTRAL's gap, ~1e-30
here, differs in its last bits with BLAS's summation order). Earlier, with another job on the
second core (load 5–7), the first run was ×0.74.

    python analysis/bench/dask_bench.py                         # width 0.5, B = 128, 8 checkpoints
    python analysis/bench/dask_bench.py --quick                 # width 0.05, B = 16, 4 checkpoints
    python analysis/bench/dask_bench.py --scheduler tcp://host:8786   # an existing cluster instead
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

import fisherlab
from fisherlab import datasets, models
from fisherlab import distributed as dd
from fisherlab.errors import MeasurementWarning
from fisherlab.metrics import compare_file

METHODS = ["kfac", "exact", "residuals", "krylov-residuals", "spectral"]
REL_TOL = 1e-12
TIMED = {"seconds", "setup_s"}


def make_file(path: Path, n: int, width: float, B: int) -> None:
    """``n`` checkpoints of mnist-ae (seeds 0…n-1 as steps) on the first B MNIST digits."""
    desc = models.describe("mnist-ae", width=width)
    x, y = datasets.load("mnist").batch(list(range(B)))
    for s in range(n):
        cap = fisherlab.capture(models.build(desc, seed=s), x, y, loss="bce_logits", fisher="mc",
                                generator=torch.Generator().manual_seed(s), device="cpu")
        fisherlab.save(cap, path, checkpoint=f"step{s}", step=s)


def _same(a: list[dict], b: list[dict]) -> bool:
    """Every column but the timings equal to ``REL_TOL`` relative to the column's scale (its largest
    magnitude in ``a``): a quantity at round-off level — SPECTRAL's gap of ~1e-30 when its coarse
    space adds nothing — differs in its last bits with the summation order of BLAS on another
    process's memory alignment, as any float64 result may."""
    if len(a) != len(b):
        return False
    scale: dict[str, float] = {}
    for r in a:
        for k, x in r.items():
            if isinstance(x, float) and not math.isnan(x):
                scale[k] = max(scale.get(k, 0.0), abs(x))
    for ra, rb in zip(a, b):
        for k in ra:
            if k in TIMED:
                continue
            x, y = ra[k], rb.get(k)
            if isinstance(x, float) and isinstance(y, float):
                if not ((math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=REL_TOL, abs_tol=REL_TOL * scale.get(k, 0.0))):
                    return False
            elif x != y:
                return False
    return True


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load() -> str:
    try:
        return "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:  # pragma: no cover - not on every platform
        return "load average n/a"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--damping", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scheduler", default=None, help="an existing scheduler's address (default: a LocalCluster of --workers)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.checkpoints, args.width, args.batch = 4, 0.05, 16
    torch.set_num_threads(1)
    # the serial run neither reads nor writes the setup cache (the workers' first run writes it, the second reads it)
    no_cache = {"cache": False} if "cache" in inspect.signature(compare_file).parameters else {}

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        t0 = time.perf_counter()
        make_file(path, args.checkpoints, args.width, args.batch)
        t_capture = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MeasurementWarning)
            print(f"{args.checkpoints} checkpoints of mnist-ae width {args.width}, B = {args.batch}; {_load()}")
            t0, c0 = time.perf_counter(), _cpu_s()
            serial = compare_file(path, args.damping, METHODS, progress=False, **no_cache)
            t_serial, cpu_serial = time.perf_counter() - t0, _cpu_s() - c0
            t0 = time.perf_counter()
            with dd.connect(args.scheduler or dd.Scheduler(workers=args.workers)) as client:
                client.wait_for_workers(1 if args.scheduler else args.workers)
                workers = dd.n_workers(client)
                t_start = time.perf_counter() - t0
                t0 = time.perf_counter()
                on_dask = compare_file(path, args.damping, METHODS, progress=False, scheduler=client)
                t_dask = time.perf_counter() - t0
                w0, c0, t0 = client.run(_cpu_s), _cpu_s(), time.perf_counter()
                again = compare_file(path, args.damping, METHODS, progress=False, scheduler=client)
                t_warm, cpu_client, w1 = time.perf_counter() - t0, _cpu_s() - c0, client.run(_cpu_s)
                cpu_workers = sorted(w1[k] - w0[k] for k in w1 if k in w0)
    same = _same(serial.rows, on_dask.rows) and _same(serial.rows, again.rows) and _same(serial.layers, on_dask.layers)
    p, N = serial.meta["checkpoints"][0]["p"], serial.meta["checkpoints"][0]["N"]
    print(f"p = {p:,}, N = {N}, methods {', '.join(METHODS)}, λ = {args.damping:g}; capture of the file {t_capture:.1f} s")
    print(f"serial, 1 thread:                      {t_serial:8.2f} s")
    print(f"Dask, {workers} workers × 1 thread, first run: {t_dask:8.2f} s   (×{t_serial / t_dask:.2f} the serial speed; the workers import torch and fisherlab)")
    print(f"Dask, {workers} workers, second run:          {t_warm:8.2f} s   (×{t_serial / t_warm:.2f})")
    print(f"cluster start:                         {t_start:8.2f} s   (with it, the first run is ×{t_serial / (t_start + t_dask):.2f})")
    inside = [sum(r["seconds"] + (r.get("setup_s") or 0) / len(METHODS) for r in t.rows if r["seconds"] == r["seconds"]) for t in (serial, on_dask, again)]
    print(f"time inside compare (the rows' seconds + setup_s): serial {inside[0]:.2f} s, Dask {inside[1]:.2f} s, {inside[2]:.2f} s (summed over workers)")
    print(f"CPU seconds, second run: serial {cpu_serial:.2f}; workers {' + '.join(f'{c:.2f}' for c in cpu_workers)} "
          f"= {sum(cpu_workers):.2f} (×{sum(cpu_workers) / cpu_serial:.2f} the serial CPU), client {cpu_client:.2f}; "
          f"speed-up on idle cores ≈ serial CPU / busiest worker = ×{cpu_serial / max(cpu_workers):.2f}")
    print(f"rows equal to the serial run (to {REL_TOL:g} of each column's scale, timings aside): {same}; {_load()}")
    return {"cpu_serial_s": cpu_serial, "cpu_workers_s": cpu_workers, "serial_s": t_serial, "dask_s": t_dask, "dask_warm_s": t_warm, "start_s": t_start, "workers": workers, "same": same}


if __name__ == "__main__":
    raise SystemExit(0 if main()["same"] else 1)
