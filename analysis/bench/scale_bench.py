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

``--pipeline`` runs the file path a user takes, each phase in its own process (wall and CPU
seconds, peak RSS): capture to ``--file``, ``compare_file`` with a cold then a warm setup cache
(:mod:`fisherlab.cache`), spectra; ``--phases plan --plan-batch 512`` prints the planner's
in-memory and streamed plans for another batch size from the file's shapes (nothing computed).

Measured (issue 14 items 3-4; 2 cores at load average ~10 from other agents, 1 thread, B = 128,
λ = 1e-3·λ_max, every default method, float64):

    capture                 158 s wall, peak RSS 2.59 GiB, 849 MiB file, p = 11,164,362, N = 128
    compare, cold cache     setup (Grams, K's eigh, exact solve, KFAC factor eigh) ≈ 6 min wall; the
                            cache then holds 755 MiB (kfac_eigh 752 MiB, grams 2.8 MiB); the
                            methods ran > 40 min wall (> 27 min CPU) and had not finished
    compare, warm cache     (zero, kfac, exact only) 275 s wall, 96 s CPU, setup_s 66 s wall,
                            peak RSS 4.11 GiB; no Gram or factor eigh recomputed
    then at load ~2, 2 threads, methods zero, kfac, exact, block-diagonal, nicolaides, residuals:
      no cache              158 s wall (288 s CPU), setup_s 22.1 s, kfac row 54.6 s (its factor eigh), peak 4.44 GiB
      warm cache            100 s wall (190 s CPU), setup_s 13.4 s, kfac row 15.6 s, peak 4.41 GiB (warm/cold 0.63)
    plan for B = 512        in memory 9.7 GiB (+ 3.0 GiB float32 copy while converting),
                            streamed 3.61 GiB: both fit --memory 16GiB

Measured again after the per-method work of this round (2026-12-01; 2 cores, 2 threads; ``default`` =
compare's 14 default methods, KFOC no longer among them — 175 s on its own, ``kfoc_bench.py``):

    B = 32 before (per method, loaded):   KFAC apply 3.7 s per column; coarse corrections 5–19 s each
                                          (ζ_KFAC and r recomputed 2–3× per method); KFOC > 90 s
    B = 128, compare-cold (load 3–4 from one other job): 254.5 s wall, 280 s CPU, peak RSS 4.76 GiB;
                                          setup 31.0 s, KFAC row 87.3 s (the factor eigendecompositions,
                                          cached afterwards), EKFAC 30.9 s, the 7 corrections 2.3–10.0 s
    B = 128, compare-warm (load ≤ 1):     108.8 s wall, 205 s CPU, peak RSS 4.72 GiB; setup 9.1 s, exact
                                          3.7 s; KFAC 2.1, BLOCK-DIAG 3.9, DIAGONAL 5.3, EKFAC 16.8,
                                          FOOF 13.0 (A rebuilt: since fixed, ~2 s), NICO 2.2, SPECTRAL 4.6,
                                          KRY-NICO 6.0, RESIDU 4.1, KRY-RESIDU 5.6, TAYLOR 9.2, PREVIOUS 2.3
                                          — every number of the table unchanged (𝔈/‖ζ‖²: KFAC 9.647,
                                          TAYLOR 0.8889, ...)
    B = 128 again, idle (load 0.8–1.8), after FOOF and kfac_eigh stopped forming factors they need not:
      compare-cold                        140.9 s wall, 259 s CPU, peak RSS 4.31 GiB; setup 17.7 s, KFAC row 40.6 s
      compare-warm                        97.2 s wall, 181 s CPU, peak RSS 3.89 GiB; setup 8.0 s, exact 3.2 s;
                                          EKFAC 16.7, TAYLOR 9.3, DIAGONAL 6.1, KRY-RESIDU 6.1, KRY-NICO 5.6,
                                          SPECTRAL 4.7, RESIDU 4.5, BLOCK-DIAG 3.3, KFAC-TIKHONOV 2.4, FOOF 2.2,
                                          PREVIOUS 2.1, KFAC 2.0, NICO 2.0 (goal 60 s: 1.62×; memory 0.49×)
    B = 512 under --memory 16GiB (load 4–6): completes in memory (the plan fits): 1637 s wall, 977 s CPU,
                                          peak RSS 9.63 GiB, setup 428 s, KFAC row 506 s (three 4609²
                                          LAPACK eigh: B·T = 8192 rows exceed d_in'), EKFAC 190 s

Measured 2026-12-02 (idle, 2 threads, B = 128; the machine ran the 2026-12-01 code at 106–110 s warm
that day, ~10 % slower than the figures above). DIAGONAL's diag(F) and EKFAC's re-fitted eigenvalues
joined the setup cache (λ-independent), and compare holds layer3's factored convs (T = 64) as dense
rows for its products (2.1 GB within half the free memory; ``fisherlab.jacobian.ROWS_MIN_POSITIONS``):

      compare-warm, side by side          110.0 s before → 85.7 s with the two cache items → 74.9 s with the rows
      compare-cold                        145.9 s wall (151.7 s in a second run), 254 s CPU, peak RSS 6.40 GiB; setup 19.4 s, KFAC row 48.9 s
                                          (its factor eigendecompositions: layer4's three 4608² A from 2048 rows
                                          ~7.2 s each — Gram eigh 2.3 s, complete QR 3.4 s —, layer3's 2304² A
                                          by LAPACK ~4.3 s each), EKFAC 17.9, DIAGONAL 6.5
      compare-warm                        66.4–69.0 s wall (four runs), 117–120 s CPU, peak RSS 6.09–6.12 GiB; setup
                                          8.8 s, exact 2.2 s; TAYLOR 8.8, KRY-RESIDU 5.6, KRY-NICO 5.5, SPECTRAL 5.1,
                                          RESIDU 4.0, EKFAC 2.7, KFAC 2.6, KFAC-TIKHONOV 2.5, BLOCK-DIAG 2.4,
                                          FOOF 2.3, PREVIOUS 1.8, NICO 1.4, DIAGONAL 0.2; the per-method error
                                          anatomies (one Uᵀe each, ~1.1 s) and reading the file make the rest
                                          (goal 60 s: 1.11–1.15×; memory 0.76×; the warm table equals the cold one)

      spectra (--memory 8GiB, the phase's default; fisher and kfac exact, preconditioned by SLQ):
        --probes 1 --steps 8               64.1 s wall, peak RSS 6.07 GiB
        --probes 1 --steps 24              147.5 s wall, peak RSS 7.40 GiB: 5.2 s per Lanczos step (a KFAC
                                          solve and an F• product), ~22 s of setup; run_spectra's default
                                          16 probes × 64 steps would take ~90 min here
        (without a budget, with layer3's rows held, 4.8 s per step)
        --probes 1 --steps 24, after the rotated layer4 left out A's null space: 133.0 s wall, peak RSS
                                          7.29 GiB, ~4.6 s per step (its layer4 products 0.21–0.26 → 0.10–0.12 s
                                          each; layer3's rotated factors are now half of a step): ~80 min for 16 × 64

    Measured 2026-12-02, later (idle, 2 threads, B = 128), huge pages: fisherlab now sets
    THP_MEM_ALLOC_ENABLE=1 at import (unless set). Alternating runs, side by side, with the
    children's rusage:

      compare-warm, THP_MEM_ALLOC_ENABLE=0  65.1, 62.1, 61.8, 63.8 s wall; 2.8–3.2 M minor page faults,
                                          20.3–23.3 s system CPU
      compare-warm, =1 (the default now)  60.5, 57.8, 58.1, 53.6, 66.3 s wall (median 58.1 s); 0.44–0.51 M
                                          faults, 16.3–18.3 s system CPU; peak RSS 6.02–6.05 GiB; the same table
      (a fresh 600 MB block of rows costs ~0.3 s of page faults in 4 KiB pages: half of forming it)
      B = 512 under --memory 16GiB (idle): compare-cold 458.4 s wall (was 1637 s at load 4–6), setup
                                          131.5 s, KFAC row 111.0 s, EKFAC 72.7 s, peak RSS 17.57 GiB;
                                          compare-warm 142.5 s, 16.64 GiB with huge pages, 184.2 s, 14.43 GiB
                                          without. The plan says 9.7 GiB, and the held rows (one layer3 conv,
                                          ~2.5 GB, within half of what the plan leaves) make ~12.2: RSS exceeds
                                          the plan by ~2.2 GiB without huge pages and ~4.4 GiB with them, the
                                          budget itself by 0.6–1.6 GiB (not found yet; a fixed glibc mmap
                                          threshold did not change it: 16.56 GiB)

    Measured 2026-12-02, on another machine (the project's 2 cores were a different CPU that day, about 2×
    faster: capture 1.8×, the warm B = 128 compare 2.3×; compare these figures with each other only):

      B = 128                             capture 8.4 s, 2.51 GiB; compare-cold 49.0 s, 6.33 GiB (setup 8.0 s);
                                          compare-warm 24.8 s, 6.13 GiB (setup 4.9 s): 0.41× the goal
      B = 512 under --memory 16GiB        capture 26.8 s, 8.20 GiB; compare-cold 152.4 s, 17.65 GiB; compare-warm
                                          64.1 s, 16.4 GiB — the RSS over the budget was dense rows: compare_file
                                          did not pass the budget on to compare, which then held all five layer3
                                          layers (8.6 GB) within half of the machine's free memory. Passed on
                                          (rows within half of budget − plan: layer3.0.conv1 and its shortcut):
                                          compare-cold 157.3 s, 10.90 GiB; compare-warm 62.8 s, 9.93 GiB (RSS
                                          through the run 9.3–9.9 GiB against a plan of 9.7 GiB + 1.3 GB of rows)

      spectra, --probes 1 --steps 48 --memory 24GiB (that day; old and new code alternating): 72.5, 71.0 s wall
                                          (140, 135 s CPU), 9.33 GiB → 71.2, 57.7 s (127, 109 s CPU), 11.19 GiB once
                                          the preconditioned operator holds its rotated layer3 as dense rows (2.1 GB;
                                          formed in ~3.6 s) and updates its p-sized vectors in place: one product
                                          Ũ(Ũᵀw) 0.86 → 0.44 s; U's own rows are no longer formed for spectra that
                                          never take a product with U (F• exact from the Gram)

    What bounds it: every product runs at this machine's float64 GEMM speed (42–57 GFLOP/s measured
    for layer4's shapes); a KFAC-type solve is ~96 GFLOP (layer4's eigenbasis transforms through the
    range of A), a product Uᵀx ~34 GFLOP on layer4 plus a pass over 2.6 GB of dense rows, and the 14
    rows make about 12 solves and 25 products.

    python analysis/bench/scale_bench.py --pipeline --batch 128 --methods default --threads 1 --profile
    python analysis/bench/scale_bench.py --pipeline --phases plan --plan-batch 512 --memory 16GiB --file run128.h5
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


# ---- the file pipeline: capture → compare_file (cold, warm cache) → spectra, each phase in its own process ----


def _phase(args) -> dict:
    """One phase in this process; returns its seconds, peak RSS and what it measured."""
    from fisherlab.metrics import compare_file
    from fisherlab.workflows.analysis import run_spectra

    torch.set_num_threads(args.threads or torch.get_num_threads())
    out: dict = {"phase": args.phase}
    t0 = time.perf_counter()
    if args.phase == "capture":
        model = models.build(models.describe("resnet18", width=args.width), seed=0)
        x, y = datasets.load("cifar-standin", n=args.batch).batch(list(range(args.batch)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cap = fisherlab.capture(model, x, y, loss="cross_entropy", fisher="mc",
                                    generator=torch.Generator().manual_seed(0), device="cpu")
        out["capture_s"] = time.perf_counter() - t0
        fisherlab.save(cap, args.file, checkpoint="b0", step=0)
        out.update(p=cap.p, N=cap.N, layers=len(cap.layers), file_mib=__import__("os").path.getsize(args.file) / 2**20)
    elif args.phase in ("compare-cold", "compare-warm", "compare-nocache"):
        keys = methods.default_keys() if args.methods == "default" else args.methods.split(",")
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = compare_file(args.file, fisherlab.Damping(args.damping, "max"), keys, progress=False,
                             cache=args.phase != "compare-nocache", memory=args.memory, device=args.device)
        if args.profile:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        m = t.meta["checkpoints"][0]
        out.update(setup_s=m["setup_s"], exact_s=m["exact_seconds"], cache=m.get("cache"), streamed=m.get("streamed"),
                   methods={r["method"]: round(r["seconds"], 3) for r in t.rows},
                   table=str(t))
    elif args.phase == "spectra":
        import tempfile
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = run_spectra(args.file, fisherlab.Damping(args.damping, "max"), tempfile.mkdtemp(), progress=False, figures=False,
                              memory=args.memory or "8GiB", device=args.device, n_probes=args.probes, n_steps=args.steps)
        out["spectra"] = {k: str(v) for k, v in res["b0"].items()}
        out["slq"] = {"probes": args.probes, "steps": args.steps}
    elif args.phase == "plan":  # the planner's figures, for --plan-batch (default: the file's B) from the file's shapes
        import dataclasses

        from fisherlab import planning
        from fisherlab.store import CaptureFile

        with CaptureFile(args.file) as cf:
            info, layout, loss = cf.info("b0"), cf.layout, cf.run["loss"]
        B = args.plan_batch or info.batch_size
        info = dataclasses.replace(info, batch_size=B)  # every stored shape is linear in B (storage per layer kept)
        files: list = []
        jac = planning._streamed_skeleton(args.file, info, layout, loss, device=None, precision="float64", files=files)
        for stream in (False, True):
            plan = planning.plan_compare(jac, memory=args.memory or "16GiB", streamed=stream)
            out[("streamed" if stream else "in_memory") + f"_B{B}"] = plan.table()
            out[("streamed" if stream else "in_memory") + f"_B{B}_peak_gib"] = plan.peak / 2**30
        for f in files:
            f.close()
    out["seconds"] = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = ru.ru_utime + ru.ru_stime  # of the whole process (imports included): the load-independent figure
    out["peak_rss_gib"] = _peak_gib()
    return out


def pipeline(args) -> int:
    """Each phase in a fresh process (its own peak RSS), then the figures against the goals."""
    import json
    import os
    import subprocess
    import sys

    phases = args.phases.split(",")
    if "capture" in phases and os.path.exists(args.file):
        os.remove(args.file)
    cache = args.file + ".cache"
    if "compare-cold" in phases and os.path.isdir(cache):
        import shutil
        shutil.rmtree(cache)
    results: dict = {}
    tables: dict = {}
    for ph in phases:
        cmd = [sys.executable, __file__, "--phase", ph, "--file", args.file, "--batch", str(args.batch), "--width", str(args.width),
               "--damping", str(args.damping), "--methods", args.methods, "--device", args.device]
        cmd += ["--memory", args.memory] if args.memory else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--profile"] if args.profile and ph.startswith("compare") else []
        cmd += ["--plan-batch", str(args.plan_batch)] if args.plan_batch else []
        cmd += ["--probes", str(args.probes), "--steps", str(args.steps)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{ph}: failed ({proc.returncode}) after {time.perf_counter() - t0:.1f} s\n{proc.stderr[-3000:]}", flush=True)
            return 1
        lines = proc.stdout.strip().splitlines()
        res = json.loads(lines[-1])
        results[ph] = res
        if len(lines) > 1:
            print("\n".join(lines[:-1]))
        table = res.pop("table", None)
        tables[ph] = table
        print(json.dumps(res), flush=True)
        if table and ph == "compare-cold":
            print(table, flush=True)
    print(f"\nResNet-18 width {args.width}, B = {args.batch}, λ = {args.damping:g}·λ_max, methods {args.methods}, "
          f"memory {args.memory}, threads {args.threads or torch.get_num_threads()}")
    for ph, r in results.items():
        print(f"  {ph:<16} {r['seconds']:8.1f} s wall, {r.get('cpu_s', float('nan')):8.1f} s CPU   peak RSS {r['peak_rss_gib']:6.2f} GiB"
              + (f"   setup {r['setup_s']:.1f} s, cache: {r.get('cache')}" if "setup_s" in r else ""))
    for ph in ("compare-cold", "compare-warm"):
        if ph in results:
            r = results[ph]
            print(f"  {ph}: {r['seconds']:.1f} s of the goal 60 s ({r['seconds'] / 60:.2f}×), peak {r['peak_rss_gib']:.2f} GiB "
                  f"of 8 GiB ({r['peak_rss_gib'] / 8:.2f}×)")
    if "compare-cold" in results and "compare-warm" in results:
        print(f"  warm/cold: {results['compare-warm']['seconds'] / results['compare-cold']['seconds']:.2f}")
        rows = lambda t: [ln.rsplit(None, 1)[0] for ln in (t or "").splitlines() if ln.startswith("b0 ")]  # noqa: E731 - times aside
        print(f"  the warm table equals the cold one (every column but the time): {rows(tables['compare-cold']) == rows(tables['compare-warm'])}")
    return 0


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
    ap.add_argument("--pipeline", action="store_true",
                    help="the file pipeline: capture to --file, then compare_file with a cold and a warm setup cache, "
                         "then spectra, each phase in its own process (time and peak RSS per phase)")
    ap.add_argument("--phases", default="capture,compare-cold,compare-warm,spectra",
                    help="with --pipeline: comma-separated phases (capture, compare-cold, compare-warm, compare-nocache, spectra, plan)")
    ap.add_argument("--file", default="/tmp/scale_bench.h5", help="with --pipeline: the capture file")
    ap.add_argument("--profile", action="store_true", help="with --pipeline: cProfile the compare phases (top 15 by own time)")
    ap.add_argument("--plan-batch", type=int, default=None, help="with --phases plan: the batch size to plan for (from --file's shapes)")
    ap.add_argument("--probes", type=int, default=16, help="spectra phase: SLQ probes (run_spectra's n_probes)")
    ap.add_argument("--steps", type=int, default=64, help="spectra phase: Lanczos steps per probe (n_steps)")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        import json
        print(json.dumps(_phase(args), default=str))
        return 0
    if args.pipeline:
        return pipeline(args)
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
