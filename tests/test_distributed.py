"""Analyses on a Dask cluster (fisherlab.distributed): a LocalCluster of 2 worker processes gives
the serial rows, in the serial order; a worker killed mid-task is replaced and its task rerun;
``fisherlab analyze … --scheduler``; the one-line error without dask.

One cluster serves the module, its 2 worker processes forked from the test process; it is closed
however the tests end, and a watchdog ends the process with a traceback instead of letting a lost
worker hang the suite.
"""

from __future__ import annotations

import csv
import faulthandler
import math
import sys
import warnings

import pytest
import torch

import fisherlab
from fisherlab import distributed as dd
from fisherlab.cli import main
from fisherlab.errors import ConfigError, MeasurementWarning
from fisherlab.metrics import compare_file, sample_table
from fisherlab.workflows.analysis import run_damping_sweep, run_interactions, run_spectra

from cases import MODELS, build_model, make_batch

needs_dask = pytest.mark.skipif(not dd.available(), reason=f"dask.distributed is not installed ({dd.EXTRA})")

REL_TOL = 1e-12
"""Distributed against serial numbers (the tasks run the serial code on the same float64 data;
only the BLAS thread count differs, 1 on the workers)."""

TIMED = {"seconds", "setup_s"}
"""Wall-time columns: the only ones that may differ between the runs."""

WATCHDOG_S = 180
"""A test still running after this many seconds dumps its traceback and ends the process."""

LAMBDA = 0.1
METHODS = ["kfac", "exact", "residuals", "krylov-residuals", "block-diagonal"]


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _sample(case: str, seed: int, of: str, batch: int):
    x, y = make_batch(MODELS[case], "cross_entropy", B=4, seed=seed)
    cap = fisherlab.capture(build_model(MODELS[case], seed), x, y, loss="cross_entropy", fisher="mc", n_samples=2,
                            generator=torch.Generator().manual_seed(seed), device="cpu", dtype=torch.float64)
    cap.meta["sample"] = {"of": of, "batch": batch, "draw": 0, "batches": 2, "draws": 1}
    return cap


@pytest.fixture(scope="module")
def capture_file(tmp_path_factory):
    """2 checkpoints × 2 samples (batches) of the tiny CNN (two Conv2d layers and a Linear)."""
    path = tmp_path_factory.mktemp("dask") / "run.h5"
    for step, ckpt in enumerate(["early", "late"]):
        for b in range(2):
            fisherlab.save(_sample("cnn", 10 * step + b, ckpt, b), path, checkpoint=f"{ckpt}.b{b}d0", step=step)
    return path


@pytest.fixture(scope="module")
def client():
    if not dd.available():
        pytest.skip(f"dask.distributed is not installed ({dd.EXTRA})")
    import dask

    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # the cluster's start, before the per-test watchdog
    try:
        # forked workers start with fisherlab imported (3 s instead of ~30 s of spawning and
        # importing torch on 2 shared cores); the command line keeps dask's default, spawn
        with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}), dd.connect(dd.Scheduler(workers=2)) as c:
            faulthandler.cancel_dump_traceback_later()
            c.wait_for_workers(2, timeout=WATCHDOG_S)
            yield c
    finally:
        faulthandler.cancel_dump_traceback_later()


def _same(a: list[dict], b: list[dict]) -> None:
    """Same rows in the same order: same keys, equal values (numbers to REL_TOL), timings aside."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert list(ra) == list(rb)
        for k in ra:
            if k in TIMED:
                continue
            x, y = ra[k], rb[k]
            if isinstance(x, float) and isinstance(y, float):
                assert (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=REL_TOL, abs_tol=1e-300), (ra.get("method"), k, x, y)
            else:
                assert x == y, (k, x, y)


def _quiet_compare(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementWarning)
        return compare_file(path, LAMBDA, METHODS, progress=False, **kw)


@needs_dask
@pytest.mark.parametrize("checkpoints", [None, ["late.b1d0"]], ids=["one-task-per-sample", "one-sample-methods-split"])
def test_local_cluster_equals_the_serial_run(client, capture_file, checkpoints):
    serial = _quiet_compare(capture_file, checkpoints=checkpoints)
    on_dask = _quiet_compare(capture_file, checkpoints=checkpoints, scheduler=client)
    assert len(serial.rows) == (4 if checkpoints is None else 1) * len(METHODS)
    for a, b in ((serial.rows, on_dask.rows), (serial.layers, on_dask.layers), (serial.modes, on_dask.modes)):
        _same(a, b)
    assert [t["checkpoint"] for t in on_dask.meta["checkpoints"]] == [t["checkpoint"] for t in serial.meta["checkpoints"]]


@needs_dask
def test_drivers_on_the_cluster_write_the_serial_results(client, capture_file, tmp_path):
    sweep = [1e-3, 1e-1]  # the sweep's tasks share one Gram reduced from per-layer tasks
    kw = dict(checkpoint="early.b0d0", methods=["kfac", "residuals"], scale="max", progress=False, figures=False)
    _same(run_damping_sweep(capture_file, sweep, tmp_path / "s", **kw), run_damping_sweep(capture_file, sweep, tmp_path / "d", scheduler=client, **kw))
    kw = dict(checkpoints=["early.b0d0", "late.b1d0"], operators=["fisher", "kfac"], method="dense", progress=False, figures=False)
    serial, on_dask = run_spectra(capture_file, LAMBDA, tmp_path / "s", **kw), run_spectra(capture_file, LAMBDA, tmp_path / "d", scheduler=client, **kw)
    assert list(serial) == list(on_dask)
    for ck in serial:
        assert list(serial[ck]) == list(on_dask[ck])
        for op in serial[ck]:
            torch.testing.assert_close(torch.as_tensor(on_dask[ck][op].values), torch.as_tensor(serial[ck][op].values), rtol=REL_TOL, atol=0)
    assert (tmp_path / "s" / "spectra_summary.csv").read_text() == (tmp_path / "d" / "spectra_summary.csv").read_text()
    run_interactions(capture_file, tmp_path / "s", figures=False, progress=False)
    run_interactions(capture_file, tmp_path / "d", figures=False, progress=False, scheduler=client)
    for name in ("interactions.csv", "kfac_block_errors.csv", "structure_summary.csv"):
        _same(_csv_rows(tmp_path / "s" / name), _csv_rows(tmp_path / "d" / name))


def _csv_rows(path) -> list[dict]:
    """The rows of a CSV file, timings left out, numbers parsed (the setup cache, used by the serial
    run, may change a last bit: hence REL_TOL rather than equal text)."""
    def value(v: str):
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in r.items() if k not in TIMED} for r in csv.DictReader(f)]


@needs_dask
def test_cli_scheduler_address(client, capture_file, tmp_path):
    """``fisherlab analyze errors FILE --scheduler tcp://…`` joins a running scheduler (and leaves it up)."""
    assert main(["analyze", "errors", str(capture_file), "--methods", "kfac,residuals", "--no-figures", "-q", "--no-progress",
                 "--out", str(tmp_path), "--scheduler", client.scheduler.address, "--retries", "1"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementWarning)
        serial = compare_file(capture_file, fisherlab.Damping(1e-3, "max"), ["kfac", "residuals"], progress=False)
    serial.to_csv(tmp_path / "serial.csv")
    serial.layers_to_csv(tmp_path / "serial_layers.csv")
    _same(_csv_rows(tmp_path / "serial.csv"), _csv_rows(tmp_path / "errors.csv"))
    _same(_csv_rows(tmp_path / "serial_layers.csv"), _csv_rows(tmp_path / "errors_layers.csv"))
    assert client.status == "running"  # the command closed its own client only


def test_scheduler_values():
    assert dd.Scheduler.parse("local:4") == dd.Scheduler(workers=4)
    assert dd.Scheduler.parse("local").workers >= 1
    assert dd.Scheduler.parse("tcp://10.0.0.5:8786").address == "tcp://10.0.0.5:8786"
    assert dd.Scheduler.parse("node7:8786").address == "tcp://node7:8786"
    for bad in ("local:0", "local:x", "nonsense", "http://h:1", "tcp://h:port"):
        with pytest.raises(ConfigError, match="--scheduler"):
            dd.Scheduler.parse(bad)
    assert dd.chunks(list("abcde"), 2) == [list("abc"), list("de")] and dd.chunks(list("ab"), 5) == [["a"], ["b"]]
    with pytest.raises(ConfigError, match="scheduler"):
        with dd.connect(42):
            pass


def test_without_dask_the_scheduler_is_refused_in_one_line(capture_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` raises ImportError
    rc = main(["analyze", "errors", str(capture_file), "--scheduler", "local:2", "--out", str(tmp_path), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("fisherlab: error: --scheduler local:2") and 'pip install "fisherlab[distributed]"' in err[0]
    with pytest.raises(ConfigError, match=r"fisherlab\[distributed\]"):
        compare_file(capture_file, LAMBDA, ["kfac"], scheduler="local:2", progress=False)


@needs_dask
def test_a_worker_killed_mid_task_is_replaced_and_the_task_rerun(client, capture_file, tmp_path):
    """The first attempt of one task ends its worker process (os._exit, as an OOM kill would):
    the scheduler reschedules the pure task on a worker still alive, and every result is there."""
    marker = tmp_path / "died-once"

    def dies_once(marker, *args):  # local: pickled by value, so the workers need not import this file
        import os

        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return sample_table(*args)
        os._exit(1)

    infos = fisherlab.store.select_checkpoints(capture_file)
    args = [(str(capture_file), i.name, i.step, LAMBDA, METHODS, {}) for i in infos]
    tasks = [dd.Task(sample_table, a, label=a[1]) for a in args]
    tasks[1] = dd.Task(dies_once, (str(marker), *args[1]), label="dies once")
    seen: list[int] = []
    on_dask = dd.run_tasks(client, tasks, desc="kill", progress=False, timeout=WATCHDOG_S / 2, in_order=lambda i, _: seen.append(i))
    assert marker.exists() and seen == [0, 1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeasurementWarning)
        for a, t in zip(args, on_dask):
            _same(sample_table(*a).rows, t.rows)


@needs_dask
def test_workers_stream_the_layers_and_fill_the_setup_cache(client, capture_file, tmp_path, monkeypatch):
    """The workers run the serial path's sample step: layers streamed from the file when asked, and
    the setup cache beside it filled, so a later serial run recomputes no Gram."""
    from fisherlab import jacobian

    cache = tmp_path / "cache"
    on_dask = _quiet_compare(capture_file, scheduler=client, cache_dir=cache, stream=True)
    assert all(t["streamed"] for t in on_dask.meta["checkpoints"])
    assert len([p for p in cache.rglob("*") if p.is_dir()]) >= 4  # one entry per sample (and its pieces)

    def no_gram(self):
        raise AssertionError("a Gram was recomputed although the workers cached it")

    for kind in (jacobian.FactoredLayerJacobian, jacobian.DenseLayerJacobian):
        monkeypatch.setattr(kind, "_compute_gram", no_gram)
    serial = _quiet_compare(capture_file, cache_dir=cache)
    _same(serial.rows, on_dask.rows)
