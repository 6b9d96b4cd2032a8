"""Capture cost vs a plain forward+backward and vs ``torch.func`` per-example gradients.

Usage::

    python analysis/bench/capture_bench.py [--quick] [--device cpu|cuda] [--csv PATH]
                                           [--reps N] [--threads N] [--no-memory]

Problems (issue 2):

* ``mnist-ae``: the MNIST autoencoder 784-1000-500-250-30-250-500-1000-784, ReLU between layers,
  logits out, B = 256, ``bce_logits``, real MNIST digits from ``fisherlab.datasets`` (random
  [0, 1] inputs if that module is missing);
* ``cnn``: Conv(1→32, 5×5, pad 2)-ReLU-MaxPool(2)-Conv(32→64, 5×5, pad 2)-ReLU-MaxPool(2)-
  Linear(3136→10) on 28×28 digits, B = 128, ``cross_entropy``.

Methods, timed side by side in one run (round robin: every repetition runs each method once,
so drift of the machine hits all alike; medians reported, after warm-up):

* ``plain``: ``zero_grad(set_to_none=True)``, forward, mean loss, ``backward()`` — one training
  step without the optimizer update;
* ``capture mc K=1``: :func:`fisherlab.capture` with ``fisher="mc", n_samples=1`` (the target
  of the issue), including ∇h and the copy to the CPU;
* ``capture empirical``: the same with ``fisher="empirical"`` (K = 1, true labels: the ∇h
  backward is shared), for context;
* ``capture mc factored`` (CNN only): ``storage="factored"``; ``auto`` stores the conv layers
  dense, which also computes their KFAC factor A_i = (1/B) Σ ā āᵀ at capture time (from shifted
  products of the input: about c_in²·B·H̃·W̃ multiply-adds per kernel offset, no unfolded ā);
* ``torch.func``: ``vmap(grad(per-example loss))`` over the batch, per-example gradients of
  every parameter (not flattened).

Peak memory (optional, on by default, CPU only): each method runs once in a fresh subprocess
after the model and batch are built; the figure is the growth of the process's peak resident
set over that call (Linux: ``VmHWM`` minus ``VmRSS`` of ``/proc/self/status``, the high-water
mark reset just before the call through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``) — what the call needed on top
of what was already resident, including what it returns. Torch's CPU allocator hands large
blocks back to the OS, so this is close to the call's peak allocation; it is coarse (pages, and
the first call pays for lazily loaded kernels). On CUDA ``torch.cuda.max_memory_allocated`` is
used instead, in-process.

Targets (issue 2): autoencoder capture ≤ 1.0× plain and ≥ 20× faster than torch.func; CNN
capture ≤ 2× plain. Issue 14's: per storage choice never slower than torch.func and ≤ 2× plain on
the CNN; on the autoencoder mc ≤ 1.35×, empirical ≤ 1.05×.

Transparent huge pages. Torch's CPU allocator maps every block ≥ 2 MiB with 4 KiB pages unless
``THP_MEM_ALLOC_ENABLE=1`` is set before its first large allocation; where the kernel's THP mode is
``madvise`` (``/sys/kernel/mm/transparent_hugepage/enabled``) a fresh 80 MB ā then costs ~20,000
page faults. fisherlab sets it at import unless the environment already does
(``THP_MEM_ALLOC_ENABLE=0`` opts out); the header line says which.

Measured 2026-12-01 (before the dense-conv path below, side by side, idle, 2 threads, medians of
21): without huge pages mnist-ae mc 1.71× plain, empirical 1.37×, torch.func 28.9×; CNN ``auto``
5.86×, factored 2.38× (1.75× with huge pages), torch.func 1.10×. ``auto`` stored the second conv
dense by unfolding ā and computed its KFAC factor A = (1/B) Σ ā āᵀ from it (32 GFLOP, ~320 ms).

Measured 2026-12-02, after it (same conditions; four runs of the autoencoder, which swing by ±10 %
between runs on this shared machine): a conv layer stored dense no longer unfolds ā — its rows
are per-example weight backwards (``torch.func.vmap`` of the convolution's own backward), its A
comes from shifted products of the input (``fisherlab.capturing.layers.conv_input_moment``, about 4×
faster than āᵀā for the second conv), its ∇h block from one weight backward; models that are a
plain ``nn.Sequential`` of per-example modules skip the probe forward; K = 1 skips a stack copy:

    mnist-ae mc            1.37, 1.60, 1.57 (huge pages), 1.58 (none) × plain
    mnist-ae empirical     1.04, 1.28, 1.21 (huge pages), 1.18 (none) × plain
    CNN auto, mc           2.86, 3.21; 2.66 (huge pages), 2.60 (none) × plain; torch.func 0.96–1.28×
    CNN auto, empirical    2.12, 2.61; 1.96 (huge pages), 2.02 (none)
    CNN factored, mc       2.05–2.08; 1.81 (huge pages), 1.93 (none)
    ResNet-18, B = 128     capture 17.7 → 15.1 s (``scale_bench.py --phases capture``): layers 1–2
                           are stored dense; A there 4.95 → 2.7–3.0 s, the unfold 3.26 → 0.68 s

What is left on the CNN's ``auto`` mc capture (profiled, ~410 ms against a ~130 ms plain step):
two backward passes to the layer outputs (~85 ms), A of the dense second conv (~90 ms, at this
machine's float32 batched-GEMM speed), its per-example rows (~80 ms), the ∇h weight backward
(~45 ms) and the forward. torch.func computes per-example gradients in one backward; the mc
capture needs a second one for ∇h and the factor A, so "never slower than torch.func" does not
hold for ``auto`` here.

Measured 2026-12-02, a later session on a slower, noisier machine (plain steps swing 70–135 ms on
the autoencoder between runs): the dense rows by one vmap over the batch per vector instead of a
vmap nested over K (the second conv's rows 141 → 61–68 ms), and a first conv with narrow patches
(c_in·k_h·k_w ≤ 32) taking rows, A and ∇h from one unfold: the CNN's ``auto`` mc capture
540.6 → 470.8 ms side by side in one process; then A by shifted products with one buffer for its
pixel products and a two-step transpose of large inputs (the second conv's A 106.8 → 100.1 ms,
ResNet-18 layer1's 457 → 373–415 ms). The session's start and end in alternating processes: CNN
``auto`` mc 602.6–659.4 → 483.1–498.6 ms, 2.57–2.74 → 2.26–2.47× plain; this script at the session's start and end: CNN
``auto`` mc 2.68 → 2.48× plain, factored 1.65 → 1.56×, empirical 1.87 → 1.84×, torch.func 0.83
and 1.38×; mnist-ae mc 1.31–1.37×, empirical 1.01–1.09×. Tried and dropped (side by side, 41–61
repetitions): ∇h of the Linear layers from the true-label backward's own weight gradients
(autoencoder mc 108.2 → 115.5 ms, empirical 84.3 → 91.3 ms: slower) and from hooks on the layer
outputs during that backward (97.5–103.4 against 100.0–102.6 ms: no change beyond the noise).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fisherlab
from fisherlab.capturing import losses as L

AE_SIZES = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]


# ---- problems --------------------------------------------------------------------------------


def build_autoencoder(sizes: list[int] = AE_SIZES) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)  # logits out


def build_cnn(c1: int = 32, c2: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 14
        nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # 14 -> 7
        nn.Flatten(), nn.Linear(c2 * 7 * 7, 10),
    )


def _digits(n: int, task: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` real MNIST digits ``[n, 784]`` in [0, 1] and targets, or random stand-ins."""
    try:
        from fisherlab import datasets

        ds = datasets.load("mnist", n=n, seed=0, task=task)
        return ds.x.float(), ds.y, "real MNIST (fisherlab.datasets)"
    except Exception as e:  # the module is missing or its data is not installed
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 784, generator=g)
        y = x.clone() if task == "autoencoder" else torch.randint(0, 10, (n,), generator=g)
        return x, y, f"random [0, 1] inputs ({type(e).__name__})"


@dataclass
class Problem:
    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: str
    data: str

    @property
    def B(self) -> int:
        return int(self.x.shape[0])


def make_problem(name: str, quick: bool, device: torch.device) -> Problem:
    torch.manual_seed(0)
    if name == "mnist-ae":
        B = 16 if quick else 256
        sizes = [784, 64, 32, 8, 32, 64, 784] if quick else AE_SIZES
        x, y, data = _digits(B, "autoencoder")
        model, loss = build_autoencoder(sizes), "bce_logits"
    elif name == "cnn":
        B = 8 if quick else 128
        x, y, data = _digits(B, "classification")
        x = x.reshape(B, 1, 28, 28)
        model, loss = (build_cnn(4, 8) if quick else build_cnn()), "cross_entropy"
    else:
        raise ValueError(f"unknown problem {name!r}")
    return Problem(name, model.to(device), x.to(device), y.to(device), loss, data)


# ---- methods -----------------------------------------------------------------------------------


def plain_step(pb: Problem) -> Callable[[], object]:
    model, x, y, loss = pb.model, pb.x, pb.y, pb.loss

    def run():
        model.zero_grad(set_to_none=True)
        z = model(x).reshape(x.shape[0], -1)
        L.per_example_loss(loss, z, y).mean().backward()
        return None

    return run


def capture_step(pb: Problem, fisher: str, storage: str = "auto") -> Callable[[], object]:
    device = pb.x.device

    def run():
        return fisherlab.capture(
            pb.model, pb.x, pb.y, loss=pb.loss, fisher=fisher, n_samples=1,
            generator=torch.Generator().manual_seed(0), device=device, dtype=torch.float32,
            storage=storage,
        )

    return run


def torch_func_step(pb: Problem) -> Callable[[], object]:
    model, loss = pb.model, pb.loss
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        z = functional_call(model, p, (xb.unsqueeze(0),)).reshape(1, -1)
        return L.per_example_loss(loss, z, yb.unsqueeze(0)).sum()

    per_example = vmap(grad(one), in_dims=(None, 0, 0))

    def run():
        return per_example(params, pb.x, pb.y)

    return run


METHODS: dict[str, Callable[[Problem], Callable[[], object]]] = {
    "plain": plain_step,
    "capture mc K=1": lambda pb: capture_step(pb, "mc"),
    "capture empirical": lambda pb: capture_step(pb, "empirical"),
    "capture mc factored": lambda pb: capture_step(pb, "mc", "factored"),
    "torch.func": torch_func_step,
}
EXTRA = {"capture mc factored": ("cnn",)}
"""Methods run only on some problems (all-factored storage only differs from auto on the CNN)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(fns: dict[str, Callable[[], object]], reps: dict[str, int], warmup: int, device) -> dict[str, list[float]]:
    """Round robin: each round runs every method still owed a repetition; wall times in s."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(max(reps.values())):
        for k, fn in fns.items():
            if r >= reps[k]:
                continue
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
            del out
    return times


# ---- memory ------------------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(key)


def _maxrss_bytes() -> int:
    """Peak resident set of this process. On Linux ``VmHWM`` of ``/proc/self/status``: unlike
    ``ru_maxrss``, it is not inherited from the parent across fork + exec (which would hide the
    growth when the parent is larger)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def _measure_memory_here(problem: str, method: str, quick: bool) -> dict:
    """Run in a fresh subprocess: growth of peak RSS over one call of ``method``."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    pb = make_problem(problem, quick, torch.device("cpu"))
    fn = METHODS[method](pb)
    try:  # Linux ≥ 4.0: restart the high-water mark at the current RSS (setup peaks drop out)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_bytes("VmRSS:")
    except OSError:
        before = _maxrss_bytes()
    out = fn()
    after = _maxrss_bytes()
    kept = out.nbytes() if isinstance(out, fisherlab.Capture) else None
    return {"peak_delta_bytes": after - before, "result_bytes": kept}


def measure_memory(problem: str, method: str, quick: bool, threads: int) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", problem, method] + (["--quick"] if quick else [])
    env = dict(os.environ, BENCH_THREADS=str(threads))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except Exception as e:  # report, do not fail the benchmark
        print(f"  (memory of {problem}/{method} not measured: {type(e).__name__})", file=sys.stderr)
        return None


def measure_memory_cuda(fn: Callable[[], object], device: torch.device) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - base
    kept = out.nbytes() if isinstance(out, fisherlab.Capture) else None
    return {"peak_delta_bytes": peak, "result_bytes": kept}


# ---- main ----------------------------------------------------------------------------------------


def _fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def run(args: argparse.Namespace) -> list[dict]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("capture_bench: --device cuda requested but CUDA is not available")
    device = torch.device(args.device)
    if args.threads or args.quick:  # a smoke run: one thread, immune to a busy machine
        torch.set_num_threads(args.threads or 1)
    threads = torch.get_num_threads()
    reps = args.reps or (3 if args.quick else 15)
    func_reps = 2 if args.quick else max(3, reps // 5)
    warmup = 1 if args.quick else 2
    print(
        f"capture_bench: torch {torch.__version__}, device {device}, {threads} threads, float32, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}, "
        f"medians of {reps} (torch.func: {func_reps}) after {warmup} warm-up"
    )
    rows: list[dict] = []
    for name in ("mnist-ae", "cnn"):
        pb = make_problem(name, args.quick, device)
        fns = {k: make(pb) for k, make in METHODS.items() if name in EXTRA.get(k, (name,))}
        times = time_side_by_side(fns, {k: func_reps if k == "torch.func" else reps for k in fns}, warmup, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        n_params = sum(p.numel() for p in pb.model.parameters())
        print(f"\n{name}: B={pb.B}, loss={pb.loss}, {n_params:,} parameters, data: {pb.data}")
        print(f"  {'method':<20}{'median ms':>11}{'min ms':>9}{'max ms':>9}{'× plain':>9}{'peak mem':>11}{'kept':>10}")
        for k in fns:
            mem = None
            if not (args.no_memory or args.quick):
                mem = measure_memory_cuda(fns[k], device) if device.type == "cuda" else measure_memory(name, k, args.quick, threads)
            row = {
                "problem": name, "method": k, "B": pb.B, "threads": threads, "device": str(device),
                "median_s": med[k], "min_s": min(times[k]), "max_s": max(times[k]), "reps": len(times[k]),
                "ratio_to_plain": med[k] / med["plain"],
                "peak_mem_bytes": None if mem is None else mem["peak_delta_bytes"],
                "result_bytes": None if mem is None else mem["result_bytes"],
            }
            rows.append(row)
            print(
                f"  {k:<20}{1e3 * row['median_s']:>11.1f}{1e3 * row['min_s']:>9.1f}{1e3 * row['max_s']:>9.1f}"
                f"{row['ratio_to_plain']:>9.2f}{_fmt_bytes(row['peak_mem_bytes']):>11}{_fmt_bytes(row['result_bytes']):>10}"
            )
        cap = med["capture mc K=1"]
        print(f"  ratios: capture/plain = {cap / med['plain']:.2f}×, torch.func/capture = {med['torch.func'] / cap:.1f}×")
        if not args.quick:
            if name == "mnist-ae":
                targets = [("capture ≤ 1.0× plain", cap / med["plain"] <= 1.0), ("torch.func ≥ 20× capture", med["torch.func"] / cap >= 20)]
            else:
                targets = [("capture ≤ 2× plain", cap / med["plain"] <= 2.0)]
            print("  targets: " + ", ".join(f"{t}: {'met' if ok else 'MISSED'}" for t, ok in targets))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"\nwrote {args.csv}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and batches: a smoke run of a few seconds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions per method (default 15, quick 3)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses (always skipped with --quick)")
    p.add_argument("--_memory", nargs=2, metavar=("PROBLEM", "METHOD"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict] | None:
    args = parse_args(argv)
    if args._memory:
        print(json.dumps(_measure_memory_here(*args._memory, args.quick)))
        return None
    return run(args)


if __name__ == "__main__":
    main()
