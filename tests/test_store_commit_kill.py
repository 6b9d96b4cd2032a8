"""Issue 9: a writer SIGKILLed *inside* the commit's HDF5 flush (not a simulated failure), and a
disk that is full inside HDF5's writes (a small tmpfs; root only): committed checkpoints stay
intact, the next append succeeds, every error is one line, nothing crashes at exit.

The kill: a forked child appends checkpoint c2 through HDF5's file-object driver, whose ``write``
(unbuffered, so every write the child made is on the file) pauses at the k-th write of the flush
that follows a named commit stage; the parent SIGKILLs it there, for every k up to the number of
writes that flush makes (``before-commit``: the data flush before the move; ``completed``: the
flush that publishes the complete flag).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

import fisherlab
from fisherlab import store
from fisherlab.errors import StoreError

from cases import MODELS, make_capture

TESTS = Path(__file__).parent
FLUSHES = ("before-commit", "completed")
KILL_WAIT_S = 30  # the child reaches its pause in well under a second; bounded anyway


@pytest.fixture(scope="module")
def caps():
    return [make_capture(MODELS["mlp"], "mse", "mc", seed=i)[0] for i in range(3)]


def _paused_append(path: Path, cap, stage: str, k: int, marker: Path) -> int:
    """Fork a child that appends ``cap`` as c2 to ``path`` and stops at the ``k``-th write after
    ``stage``; returns its pid (the child exits 0 when the flush makes fewer than k + 1 writes)."""
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: never returns into pytest
        real = h5py.File
        state = {"armed": False, "writes": 0}

        class Spy:
            def __init__(self, fh):
                self.fh = fh

            def write(self, b):
                if state["armed"]:
                    if state["writes"] == k:
                        marker.write_text("paused")
                        time.sleep(600)  # SIGKILLed here, inside HDF5's flush
                    state["writes"] += 1
                return self.fh.write(b)

            def __getattr__(self, name):
                return getattr(self.fh, name)

        class SpyFile(real):
            def __init__(self, name, mode="r", **kw):
                if mode == "a" and str(name) == str(path):
                    kw.pop("locking", None)
                    name = Spy(open(name, "r+b", buffering=0))
                super().__init__(name, mode, **kw)

        def hook(name, st):
            if st == stage:
                state["armed"] = True
            elif state["armed"]:  # the flush is over: the next stage after it
                state["armed"] = False

        h5py.File = SpyFile
        store._WRITE_HOOK = hook
        fisherlab.save(cap, path, checkpoint="c2", fsync=False)
        marker.write_text(f"done {state['writes']}")
        os._exit(0)
    except BaseException:
        os._exit(3)


def _kill_at(path: Path, cap, stage: str, k: int, tmp: Path) -> bool:
    """True when the child was killed inside the flush, False when it finished (k past the end)."""
    marker = tmp / f"marker-{stage}-{k}"
    pid = _paused_append(path, cap, stage, k, marker)
    deadline = time.monotonic() + KILL_WAIT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        text = marker.read_text() if marker.exists() else ""
        if text == "paused":
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True
        if done:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child failed ({status})"
            assert text.startswith("done")
            return False
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the writer never reached write {k} after '{stage}'")
        time.sleep(0.005)


def _same(a, b) -> bool:
    return a.grad.equal(b.grad) and all(
        x.equal(y) for la, lb in zip(a.layers, b.layers) for x, y in zip(la.arrays().values(), lb.arrays().values())
    )


def _writes_of_flush(tmp: Path, base: Path, cap, stage: str) -> int:
    """How many writes the flush after ``stage`` makes (a child that is not stopped counts them)."""
    path = tmp / f"count-{stage}.h5"
    shutil.copy(base, path)
    marker = tmp / f"marker-count-{stage}"
    pid = _paused_append(path, cap, stage, 10**9, marker)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return int(marker.read_text().split()[1])


def _kills(n: int, every: bool) -> list[int]:
    """Every write, or (to stay within the test-time budget) the first 2, the last 2 and every
    15th; the sweep over all 46 was run once (issue 9's note: every kill recovered)."""
    if every:
        return list(range(n))
    return sorted({*range(min(2, n)), *range(max(0, n - 2), n), *range(0, n, 15)})


# the commit flush (the complete flag; 9 writes here) at every write; the data flush before the
# move (46 writes) at a sample of them
@pytest.mark.parametrize("stage, every", [("completed", True), ("before-commit", False)])
def test_sigkill_inside_the_commit_flush_then_append(tmp_path, caps, stage, every):
    """At each write of the flush: c1 is intact, c2 is complete with its data or not complete,
    and appending c2 again and a new c3 succeeds (the file never becomes un-appendable)."""
    base = tmp_path / "base.h5"
    fisherlab.save(caps[0], base, checkpoint="c1", fsync=False)
    n = _writes_of_flush(tmp_path, base, caps[1], stage)
    assert n >= 1, f"the flush after '{stage}' made no write"
    outcomes: dict[str, int] = {}
    for k in _kills(n, every):
        path = tmp_path / f"run-{k}.h5"
        shutil.copy(base, path)
        assert _kill_at(path, caps[1], stage, k, tmp_path)
        infos = {c.name: c for c in store.list_checkpoints(path)}
        what = infos["c2"].status.split(" ")[0] if "c2" in infos else "absent"
        outcomes[what] = outcomes.get(what, 0) + 1
        assert infos["c1"].complete and _same(fisherlab.load(path, "c1"), caps[0])
        if "c2" in infos and infos["c2"].complete:
            assert _same(fisherlab.load(path, "c2"), caps[1])  # complete means the right data
        fisherlab.save(caps[1], path, checkpoint="c2", fsync=False, overwrite=True)
        fisherlab.save(caps[2], path, checkpoint="c3", fsync=False)
        assert [(c.name, c.complete) for c in store.list_checkpoints(path)] == [("c1", True), ("c2", True), ("c3", True)]
        assert _same(fisherlab.load(path, "c1"), caps[0])
        assert _same(fisherlab.load(path, "c2"), caps[1]) and _same(fisherlab.load(path, "c3"), caps[2])
        path.unlink()
    print(f"\n{stage}: {sum(outcomes.values())} SIGKILLs of {n} writes in the flush; c2 afterwards: {outcomes}")


# ---- disk full inside HDF5's writes ---------------------------------------------------------------


# small_fs: the 1 MiB tmpfs fixture of tests/conftest.py


FULL_WRITER = r"""
import sys
sys.path.insert(0, {tests!r})
import fisherlab
from fisherlab import store
from cases import MODELS, make_capture

store._free_bytes = lambda d: None   # no free-space check: the disk is full when HDF5 would write
big, *_ = make_capture(MODELS["cnn"], "mse", "mc")
for attempt in range(3):             # failing again and again must not damage the file
    for target, name in ((sys.argv[1], "c2"), (sys.argv[2], "c1")):  # an append, a new file
        try:
            fisherlab.save(big, target, checkpoint=name, fsync=False)
            print("saved")
        except Exception as err:
            print(type(err).__name__ + ": " + str(err), flush=True)
"""


def test_disk_full_inside_hdf5_writes_exits_cleanly_and_the_file_stays_appendable(small_fs, tmp_path, fill_disk):
    """The writer's space is reserved (fallocate) before HDF5 writes: a full disk is a one-line
    error before any HDF5 write, the process exits 0 (it used to segfault at exit, and repeated
    failed appends left 'corrupted' files), and the file takes the append once space is free."""
    big, *_ = make_capture(MODELS["cnn"], "mse", "mc")
    path = small_fs / "run.h5"
    fisherlab.save(big, path, checkpoint="c1", fsync=False)
    filler = small_fs / "filler"
    fill_disk(filler)
    script = tmp_path / "full.py"
    script.write_text(FULL_WRITER.format(tests=str(TESTS)))
    r = subprocess.run([sys.executable, str(script), str(path), str(small_fs / "new.h5")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr.strip() == "", (r.returncode, r.stderr[-2000:])
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 6
    for line in lines:
        assert line.startswith("StoreError: ") and "cannot write the checkpoint: the disk is full" in line, line
        assert "corrupt" not in line
    assert not (small_fs / "new.h5").exists() and not (small_fs / "new.h5.partial").exists()
    filler.unlink()
    assert _same(fisherlab.load(path, "c1"), big)
    fisherlab.save(big, path, checkpoint="c2", fsync=False)
    assert [(c.name, c.complete) for c in store.list_checkpoints(path)] == [("c1", True), ("c2", True)]
    st = path.stat()
    assert st.st_blocks * 512 <= st.st_size + 64 * 1024  # the unused reservation was given back
