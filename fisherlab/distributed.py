"""Analysis tasks on a Dask cluster: ``--scheduler local:4`` or ``--scheduler tcp://host:8786``.

The offline analyses split into *pure tasks*: a module-level function of plain arguments (the
file's path, a checkpoint name, a damping, method names, options) that opens the HDF5 file
read-only on its worker, reads its own slices and returns small results (table rows, spectra,
one N × N Gram). Nothing big travels from the client and nothing depends on which worker runs a
task, so a task is safe to run again: a worker that dies mid-task has its task rescheduled on
another (dask's ``distributed.scheduler.allowed-failures``, 3 by default) and a task that raises
is retried ``retries`` times before its error is raised here.

This module knows no fisherlab maths: the callers (:func:`fisherlab.compare_file`, the drivers of
:mod:`fisherlab.workflows.analysis`) define their task functions next to their serial code and
give them to :func:`run_tasks`, which returns the results **in the order of the tasks**, so that a
run on a cluster writes the same rows in the same order as the serial run.

dask.distributed is an optional dependency (``pip install "fisherlab[distributed]"``), imported
only when a scheduler is used; without it :func:`connect` raises a one-line
:class:`~fisherlab.errors.ConfigError` naming the extra.

Schedulers (:meth:`Scheduler.parse`):

| value | meaning |
|---|---|
| ``"local"`` / ``"local:4"`` | a ``LocalCluster`` of 4 worker processes (default: one per core), one thread each, started and closed here |
| ``"tcp://host:8786"`` (any dask address) | an existing scheduler (``dask scheduler`` + ``dask worker``); its workers must see the file at the same path |
| a ``distributed.Client`` | used as it is, not closed |
"""

from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from .errors import ConfigError, FisherlabError
from .io.progress import tqdm

__all__ = [
    "DEFAULT_RETRIES",
    "EXTRA",
    "Scheduler",
    "Task",
    "available",
    "check",
    "connect",
    "n_workers",
    "run_tasks",
    "chunks",
]

EXTRA = 'pip install "fisherlab[distributed]"'
"""How to install dask.distributed (the ``distributed`` extra of pyproject.toml)."""

DEFAULT_RETRIES = 2
"""Retries of a task that raised (dask's ``retries=``); a worker that dies is handled by the
scheduler's own ``allowed-failures`` count."""


def available() -> bool:
    """Whether dask.distributed can be imported."""
    import importlib.util

    return importlib.util.find_spec("distributed") is not None


def _require(spec: object) -> Any:
    try:
        import distributed
    except ImportError:
        raise ConfigError(f"--scheduler {spec}: needs dask.distributed, which is not installed ({EXTRA})") from None
    return distributed


@dataclass(frozen=True)
class Scheduler:
    """A parsed ``--scheduler``: a local cluster of ``workers`` processes, or an ``address``."""

    workers: int | None = None
    address: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "Scheduler":
        """``"local"``, ``"local:N"`` (N ≥ 1 worker processes) or a scheduler address
        (``tcp://host:8786``, ``tls://…``, ``host:8786``); one-line ConfigError otherwise."""
        text = str(spec).strip()
        if text == "local" or text.startswith("local:"):
            n = text.partition(":")[2]
            if not n:
                return cls(workers=max(1, os.cpu_count() or 1))
            if not n.isdigit() or int(n) < 1:
                raise ConfigError(f"--scheduler {spec}: 'local:N' needs N ≥ 1 worker processes, got {n!r}")
            return cls(workers=int(n))
        scheme, sep, rest = text.partition("://")
        host, colon, port = (rest if sep else text).rpartition(":")
        if not colon or not host or not port.isdigit() or (sep and scheme not in ("tcp", "tls", "inproc", "ws", "wss", "ucx")):
            raise ConfigError(f"--scheduler {spec}: expected local, local:N or a scheduler address such as tcp://host:8786")
        return cls(address=text if sep else f"tcp://{text}")

    def __str__(self) -> str:
        return f"local:{self.workers}" if self.address is None else self.address


def check(scheduler: "str | Scheduler | Any") -> None:
    """Fail early, in one line, on a scheduler that :func:`connect` would refuse (a bad string,
    or dask.distributed not installed); nothing is started."""
    if isinstance(scheduler, str):
        Scheduler.parse(scheduler)
    if isinstance(scheduler, (str, Scheduler)):
        _require(scheduler)


@contextmanager
def connect(scheduler: "str | Scheduler | Any", *, timeout: float = 60.0) -> Iterator[Any]:
    """A ``distributed.Client`` for ``scheduler`` (see the module table), closed on exit — with
    the LocalCluster it started — unless it was given ready.

    Raises:
        ConfigError: dask.distributed is not installed, or ``scheduler`` is not a scheduler.
        FisherlabError: no scheduler answers at the address within ``timeout`` seconds.
    """
    if not isinstance(scheduler, (str, Scheduler)):
        dd = _require(type(scheduler).__name__)
        if not isinstance(scheduler, dd.Client):
            raise ConfigError(f"scheduler: expected local:N, a scheduler address or a distributed.Client, got {type(scheduler).__name__}")
        yield scheduler
        return
    parsed = scheduler if isinstance(scheduler, Scheduler) else Scheduler.parse(scheduler)
    dd = _require(scheduler)
    cluster = None
    try:
        if parsed.address is None:
            import dask

            with dask.config.set({"distributed.nanny.pre-spawn-environ": _spawn_environ(dask)}):
                cluster = dd.LocalCluster(n_workers=parsed.workers, threads_per_worker=1, processes=True,
                                          dashboard_address=":0", silence_logs=logging.ERROR)  # any free port: several clusters may run
            client = dd.Client(cluster, timeout=timeout)
        else:
            try:
                client = dd.Client(parsed.address, timeout=timeout)
            except OSError as err:  # TimeoutError, ConnectionRefusedError, …
                raise FisherlabError(f"--scheduler {parsed}: no scheduler answers ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def _spawn_environ(dask: Any) -> dict:
    """The environment a local worker process starts with: dask's (one BLAS/OpenMP thread), less
    ``MALLOC_TRIM_THRESHOLD_``, which fixes glibc's mmap threshold at 128 KiB, so that every
    medium-sized temporary of the algebra is a fresh mmap: measured on mnist-ae (p = 1.1 M,
    B = 128), 10× the page faults and +40 % CPU per compare task."""
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return env


def n_workers(client: Any) -> int:
    """The workers the scheduler knows now (at least 1, so that callers can divide by it)."""
    return max(1, len(client.scheduler_info().get("workers", {})))


@dataclass(frozen=True)
class Task:
    """One pure task: ``fn(*args, **kwargs)``; ``fn`` is a module-level function (workers import
    it by name) and the arguments are small and picklable (paths, names, numbers, small tensors)."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    label: str = ""


def chunks(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` cut into ``min(parts, len(items))`` contiguous, nearly equal pieces, in order."""
    items = list(items)
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        out.append(items[start:stop])
        start = stop
    return out


def run_tasks(
    client: Any,
    tasks: Sequence[Task],
    *,
    desc: str = "tasks",
    progress: bool = True,
    retries: int = DEFAULT_RETRIES,
    timeout: float | None = None,
    in_order: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run ``tasks`` on the workers of ``client``; their results in the order of ``tasks``.

    A bar (:func:`fisherlab.io.progress.tqdm`) counts the tasks as they complete. The first task
    that fails (after its ``retries``) stops the run: the others are cancelled and its exception
    is raised here as it was raised on the worker (a :class:`~fisherlab.errors.FisherlabError`
    stays one; a task whose workers kept dying raises a FisherlabError naming it).

    Args:
        client: a ``distributed.Client`` (:func:`connect`).
        tasks: the pure tasks.
        desc: the bar's label and the prefix of the task keys (as the dashboard shows them).
        progress: show the bar.
        retries: retries of a task that raised.
        timeout: seconds to wait for all the results (``None``: no limit); then a FisherlabError.
        in_order: called as ``in_order(i, result)`` for every task, in the order of ``tasks``, as
            soon as it and all the tasks before it are done (to write results while the rest run).
    """
    dd = _require(client)
    if not tasks:
        return []
    run = uuid.uuid4().hex[:8]
    futures = [
        client.submit(t.fn, *t.args, key=f"fisherlab-{desc}-{i}-{run}", retries=retries, pure=False, **t.kwargs)
        for i, t in enumerate(tasks)
    ]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(tasks)
    ready = [False] * len(tasks)
    next_up = 0
    bar = tqdm(total=len(tasks), desc=desc, unit="task", disable=not progress, leave=False)
    try:
        for fut in dd.as_completed(futures, timeout=timeout):
            i = index[fut.key]
            try:
                results[i] = fut.result()
            except dd.KilledWorker as err:
                raise FisherlabError(f"{desc}: task {i} ({tasks[i].label or tasks[i].fn.__name__}) killed its worker too often ({err})") from None
            ready[i] = True
            bar.set_postfix_str(tasks[i].label, refresh=False)
            bar.update(1)
            fut.release()
            while next_up < len(tasks) and ready[next_up]:
                if in_order is not None:
                    in_order(next_up, results[next_up])
                next_up += 1
    except dd.TimeoutError:
        raise FisherlabError(f"{desc}: not every task finished within {timeout:g} s") from None
    finally:
        bar.close()
        client.cancel([f for f in futures if not f.done()])
    return results
