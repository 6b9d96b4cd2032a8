"""The store trusts nothing it did not write, and writers cannot lose work (issue 9, items 1, 2,
4, 5, 9, 10): crafted links / virtual / external storage, racing creators, a damaged commit
window, metadata checks, disk full and read-only file systems."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import fisherlab
from fisherlab import store
from fisherlab.errors import StoreError

from cases import MODELS, make_capture

TESTS = Path(__file__).resolve().parent


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def cap():
    return make_capture(MODELS["mlp"], "mse", "mc")[0]


@pytest.fixture
def victim(tmp_path, cap):
    """Another run's file, which a crafted file points into; it must never change."""
    path = tmp_path / "victim.h5"
    fisherlab.save(cap, path, checkpoint="v1", step=1, fsync=False)
    fisherlab.save(cap, path, checkpoint="v2", step=2, fsync=False)
    return path


@pytest.fixture
def crafted(tmp_path, cap):
    path = tmp_path / "crafted.h5"
    fisherlab.save(cap, path, checkpoint="c1", step=1, fsync=False)
    return path


# ---- item 1 and 2: links, virtual datasets, external storage ---------------------------------


def _staging_external(f, victim):
    del f["staging"]
    f["staging"] = h5py.ExternalLink(str(victim), "/checkpoints")


def _checkpoints_external(f, victim):
    del f["checkpoints"]
    f["checkpoints"] = h5py.ExternalLink(str(victim), "/checkpoints")


def _grad_external_link(f, victim):
    del f["checkpoints/c1/grad"]
    f["checkpoints/c1/grad"] = h5py.ExternalLink(str(victim), "/checkpoints/v1/grad")


def _layer_external_link(f, victim):
    del f["checkpoints/c1/layers/0"]
    f["checkpoints/c1/layers/0"] = h5py.ExternalLink(str(victim), "/checkpoints/v1/layers/0")


def _grad_virtual(f, victim):
    g = f["checkpoints/c1/grad"]
    shape, dtype, crc = g.shape, g.dtype, g.attrs["crc32"]
    del f["checkpoints/c1/grad"]
    lay = h5py.VirtualLayout(shape=shape, dtype=dtype)
    lay[:] = h5py.VirtualSource(str(victim), "/checkpoints/v1/grad", shape=shape)
    f.create_virtual_dataset("checkpoints/c1/grad", lay).attrs["crc32"] = crc


def _grad_external_storage(f, victim):
    g = f["checkpoints/c1/grad"]
    shape, dtype, crc = g.shape, g.dtype, g.attrs["crc32"]
    del f["checkpoints/c1/grad"]
    nbytes = int(np.prod(shape)) * dtype.itemsize
    ds = f.create_dataset("checkpoints/c1/grad", shape=shape, dtype=dtype, external=[(str(victim), 0, nbytes)])
    ds.attrs["crc32"] = crc


def _soft_link_checkpoint(f, victim):
    f["checkpoints/c2"] = h5py.SoftLink("/checkpoints/c1")


def _staging_hard_alias(f, victim):
    f["staging/x"] = f["checkpoints/c1"]  # one object reachable twice: cleanup would unlink it


def _staging_is_checkpoints(f, victim):
    del f["staging"]
    f["staging"] = f["checkpoints"]  # the stale-staging cleanup would delete every checkpoint


def _foreign_filter(f, victim):
    g = f["checkpoints/c1/grad"]
    data, crc = g[()], g.attrs["crc32"]
    del f["checkpoints/c1/grad"]
    f.create_dataset("checkpoints/c1/grad", data=data, chunks=data.shape, shuffle=True).attrs["crc32"] = crc


CRAFTS = {
    "staging-external-link": (_staging_external, r"/staging is an external link"),
    "checkpoints-external-link": (_checkpoints_external, r"/checkpoints is an external link"),
    "grad-external-link": (_grad_external_link, r"/checkpoints/c1/grad is an external link"),
    "layer-external-link": (_layer_external_link, r"/checkpoints/c1/layers/0 is an external link"),
    "grad-virtual-dataset": (_grad_virtual, r"/checkpoints/c1/grad is a virtual dataset"),
    "grad-external-storage": (_grad_external_storage, r"/checkpoints/c1/grad keeps its data in external files"),
    "soft-link": (_soft_link_checkpoint, r"/checkpoints/c2 is a soft link"),
    "staging-hard-alias": (_staging_hard_alias, r"linked from 2 places"),
    "staging-is-checkpoints": (_staging_is_checkpoints, r"/checkpoints is linked from several places"),
    "foreign-filter": (_foreign_filter, r"filter\(s\) \[2\] that fisherlab never sets"),
}


@pytest.mark.parametrize("craft,message", CRAFTS.values(), ids=list(CRAFTS))
def test_crafted_file_is_refused_on_read_and_write(crafted, victim, cap, craft, message):
    with h5py.File(crafted, "a") as f:  # default libver: virtual datasets need the newer format
        craft(f, victim)
    before = victim.read_bytes()
    for read in (
        lambda: fisherlab.load(crafted, "c1"),
        lambda: fisherlab.load(crafted, "c1", verify=False),
        lambda: store.list_checkpoints(crafted),
        lambda: store.file_info(crafted),
    ):
        with pytest.raises(StoreError, match=message) as e:
            read()
        one_line(e)
    with pytest.raises(StoreError, match=message) as e:
        fisherlab.save(cap, crafted, checkpoint="c3", fsync=False)
    one_line(e)
    assert victim.read_bytes() == before  # nothing was written into, or deleted from, the other file
    assert [c.name for c in store.list_checkpoints(victim)] == ["v1", "v2"]
    assert fisherlab.load(victim, "v2").equals(fisherlab.load(victim, "v2"))


def test_sparse_dataset_is_refused_before_allocating(crafted):
    """A file that declares a large dataset it does not hold (never written) is refused."""
    with h5py.File(crafted, "a") as f:
        f["checkpoints/c1/targets"].attrs["crc32"]  # exists
        del f["checkpoints/c1/targets"]
        f.create_dataset("checkpoints/c1/targets", shape=(3, 1 << 20), dtype="f8", chunks=(1, 1 << 17))
    with pytest.raises(StoreError, match=r"dataset 'targets' declares 25165824 bytes but the file does not hold them") as e:
        fisherlab.load(crafted, "c1")
    one_line(e)


# ---- item 9: metadata ----------------------------------------------------------------------


def test_changed_attribute_is_an_error_not_a_silent_load(crafted):
    with h5py.File(crafted, "a") as f:
        f["checkpoints/c1"].attrs["loss_value"] = 123.0
    with pytest.raises(StoreError, match=r"checkpoint 'c1': attribute checksum mismatch") as e:
        fisherlab.load(crafted, "c1")
    one_line(e)


def test_changed_layer_attribute_and_root_attribute(crafted, tmp_path):
    other = tmp_path / "other.h5"
    shutil.copy(crafted, other)
    with h5py.File(crafted, "a") as f:
        f["checkpoints/c1/layers/1"].attrs["positions"] = 1 + int(f["checkpoints/c1/layers/1"].attrs["positions"])
    with pytest.raises(StoreError, match=r"layer 1 '2': attribute checksum mismatch"):
        fisherlab.load(crafted, "c1")
    with h5py.File(other, "a") as f:
        f.attrs["loss"] = "bce_logits"
    with pytest.raises(StoreError, match=r"root: attribute checksum mismatch"):
        fisherlab.load(other, "c1")


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("layers", "[" * 100_000 + "]" * 100_000, r"attribute 'layers' is larger or more deeply nested"),
        ("layers", "{not json", r"attribute 'layers' is not valid JSON"),
        ("batch_size", "three", r"attribute 'batch_size' is str"),
        ("step", '"ten"', r"attribute 'step' is str"),
    ],
    ids=["deep-json", "bad-json", "wrong-type", "wrong-json-type"],
)
def test_malformed_metadata_is_one_line(crafted, key, value, message):
    """Even with a matching attribute checksum (resealed), bad metadata is a one-line error."""
    with h5py.File(crafted, "a") as f:
        f["checkpoints/c1"].attrs[key] = value
        store._seal(f["checkpoints/c1"])
    with pytest.raises(StoreError, match=message) as e:
        fisherlab.load(crafted, "c1")
    one_line(e)


def test_committed_checkpoint_with_unreadable_table_is_damaged_not_incomplete(crafted):
    with h5py.File(crafted, "a") as f:
        f["checkpoints/c1"].attrs["layers"] = "{not json"
    (info,) = store.list_checkpoints(crafted)
    assert info.damaged and not info.complete
    assert info.status.startswith("damaged (unreadable: ")


# ---- item 4: racing creators ------------------------------------------------------------------

HOLDER = r"""
import sys, time
sys.path.insert(0, {tests!r})
import fisherlab
from fisherlab import store
from cases import MODELS, make_capture

path, marker = sys.argv[1], sys.argv[2]

def hook(name, stage):
    if stage == "before-commit":
        open(marker, "w").close()
        time.sleep(600)          # the test SIGKILLs us here

store._WRITE_HOOK = hook
cap, *_ = make_capture(MODELS["mlp"], "mse", "mc")
fisherlab.save(cap, path, checkpoint="a", fsync=False)
"""


def test_racing_creator_gets_one_line_error_never_a_success(tmp_path, cap):
    """Writer A is creating ``run.h5`` (paused just before its commit, holding run.h5.partial);
    writer B must not unlink A's partial file and report success: it gets a one-line error."""
    path, marker = tmp_path / "run.h5", tmp_path / "paused"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(tests=str(TESTS)))
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"writer exited early with status {proc.returncode}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(StoreError, match=r"another process is creating this file \(run\.h5\.partial is locked\)") as e:
            fisherlab.save(cap, path, checkpoint="b", fsync=False)
        one_line(e)
        assert path.with_name("run.h5.partial").exists()  # A's work was left alone
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # A died: its stale partial is taken over, and the file is created with B's checkpoint
    fisherlab.save(cap, path, checkpoint="b", fsync=False)
    assert [(c.name, c.complete) for c in store.list_checkpoints(path)] == [("b", True)]
    assert not path.with_name("run.h5.partial").exists()


def test_creator_that_loses_the_publish_appends_instead_of_clobbering(tmp_path, cap, monkeypatch):
    """Another creator published ``run.h5`` while we wrote our partial file: ours is appended to
    it (never ``os.replace`` over it), so both checkpoints are in the file."""
    path = tmp_path / "run.h5"
    theirs = tmp_path / "theirs.h5"
    fisherlab.save(cap, theirs, checkpoint="theirs", fsync=False)

    def hook(name, stage):
        if name == "ours" and stage == "before-commit" and not path.exists():
            shutil.copy(theirs, path)

    monkeypatch.setattr(store, "_WRITE_HOOK", hook)
    fisherlab.save(cap, path, checkpoint="ours", fsync=False)
    assert sorted((c.name, c.complete) for c in store.list_checkpoints(path)) == [("ours", True), ("theirs", True)]
    assert not path.with_name("run.h5.partial").exists()


# ---- item 5: the commit window ------------------------------------------------------------------


class _Stop(Exception):
    pass


def test_staging_that_cannot_be_edited_is_moved_aside(crafted, cap, monkeypatch):
    """What a kill inside the commit's flush leaves (staging links that HDF5 can neither delete nor
    move: 'addr overflow'): the next append moves the whole /staging aside and succeeds."""
    def stop(name, stage):
        if stage == "1/a":
            raise _Stop

    monkeypatch.setattr(store, "_WRITE_HOOK", stop)
    with pytest.raises(_Stop):
        fisherlab.save(cap, crafted, checkpoint="c2", fsync=False)
    monkeypatch.setattr(store, "_WRITE_HOOK", None)

    real_del, real_move = h5py.Group.__delitem__, h5py.Group.move

    def bad_del(self, name):
        if self.name == "/staging":
            raise KeyError("Unable to delete link (addr overflow, address = 1234, size = 96, eoa = 800)")
        return real_del(self, name)

    def bad_move(self, source, dest):
        if self.name == "/staging":
            raise KeyError("Unable to move link (addr overflow, address = 1234, size = 96, eoa = 800)")
        return real_move(self, source, dest)

    monkeypatch.setattr(h5py.Group, "__delitem__", bad_del)
    monkeypatch.setattr(h5py.Group, "move", bad_move)
    fisherlab.save(cap, crafted, checkpoint="c2", fsync=False)
    monkeypatch.undo()
    assert [(c.name, c.complete) for c in store.list_checkpoints(crafted)] == [("c1", True), ("c2", True)]
    with h5py.File(crafted, "r") as f:
        assert ".stale-staging-0" in f and list(f["staging"]) == []
    fisherlab.save(cap, crafted, checkpoint="c3", fsync=False)  # and the file stays appendable
    assert fisherlab.load(crafted, "c3").per_example_gradients().equal(cap.per_example_gradients())


@pytest.mark.parametrize("stage", ["moved", "completed"])
def test_stop_inside_the_commit_then_append_again(crafted, cap, monkeypatch, stage):
    """Stopped after the move (not yet complete) or after the flag (not yet flushed): c1 intact,
    c2 resumable, the file appendable."""
    def stop(name, st):
        if st == stage:
            raise _Stop

    monkeypatch.setattr(store, "_WRITE_HOOK", stop)
    with pytest.raises(_Stop):
        fisherlab.save(cap, crafted, checkpoint="c2", fsync=False)
    monkeypatch.setattr(store, "_WRITE_HOOK", None)
    assert store.list_checkpoints(crafted)[0].complete
    fisherlab.save(cap, crafted, checkpoint="c2", fsync=False, overwrite=True)
    fisherlab.save(cap, crafted, checkpoint="c3", fsync=False)
    assert [(c.name, c.complete) for c in store.list_checkpoints(crafted)] == [("c1", True), ("c2", True), ("c3", True)]


# ---- item 10: disk full, read-only ------------------------------------------------------------------


# small_fs: the 1 MiB tmpfs fixture of tests/conftest.py


def _fill(directory: Path, leave: int) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\1" * 4096) > 0:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


FULL_WRITER = r"""
import sys
sys.path.insert(0, {tests!r})
import fisherlab
from fisherlab import store
from cases import MODELS, make_capture

store._free_bytes = lambda d: None        # no pre-check: the disk fills up inside HDF5's writes
big, *_ = make_capture(MODELS["cnn"], "mse", "mc")
try:
    fisherlab.save(big, sys.argv[1], checkpoint="c2", fsync=False)
except Exception as err:
    print(type(err).__name__ + ": " + str(err), flush=True)
"""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_is_one_line_and_the_file_stays_appendable(small_fs, tmp_path, monkeypatch):
    big, *_ = make_capture(MODELS["cnn"], "mse", "mc")
    path = small_fs / "run.h5"
    fisherlab.save(big, path, checkpoint="c1", fsync=False)
    filler = _fill(small_fs, leave=4096)
    with pytest.raises(StoreError, match=r"cannot write the checkpoint: the disk is full") as e:
        fisherlab.save(big, path, checkpoint="c2", fsync=False)  # refused before writing
    assert "corrupt" not in one_line(e)
    # the disk fills up half-way through an append (in a child: HDF5 keeps such a file open)
    script = tmp_path / "full.py"
    script.write_text(FULL_WRITER.format(tests=str(TESTS)))
    r = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120)
    # (HDF5 keeps the failed file open with dirty metadata; at interpreter exit it may crash in
    # its own atexit close: the return code is not asserted, the user-facing error is)
    (line,) = r.stdout.strip().splitlines()
    assert line.startswith("StoreError: ") and "the disk is full" in line and "corrupt" not in line, line
    # and half-way through creating a new file: one line, nothing left behind
    monkeypatch.setattr(store, "_free_bytes", lambda d: None)
    with pytest.raises(StoreError, match=r"the disk is full") as e:
        fisherlab.save(big, small_fs / "new.h5", checkpoint="c1", fsync=False)
    one_line(e)
    assert not (small_fs / "new.h5").exists() and not (small_fs / "new.h5.partial").exists()
    filler.unlink()
    assert fisherlab.load(path, "c1").grad.shape == big.grad.shape
    fisherlab.save(big, path, checkpoint="c2", fsync=False)
    assert [(c.name, c.complete) for c in store.list_checkpoints(path)] == [("c1", True), ("c2", True)]


def test_read_only_file_system_is_not_called_corrupted(small_fs, cap):
    path = small_fs / "run.h5"
    fisherlab.save(cap, path, checkpoint="c1", fsync=False)
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
    with pytest.raises(StoreError, match=r"run\.h5: cannot open for writing: the file system is read-only") as e:
        fisherlab.save(cap, path, checkpoint="c2", fsync=False)
    assert "corrupt" not in one_line(e)
    with pytest.raises(StoreError, match=r"new\.h5: cannot create new\.h5\.partial: the file system is read-only"):
        fisherlab.save(cap, small_fs / "new.h5", checkpoint="c1", fsync=False)
    assert [c.name for c in store.list_checkpoints(path)] == ["c1"]  # reading still works


# ---- item 9: seeded bit flips in the metadata -------------------------------------------------

FUZZ = r"""
import json, random, shutil, sys, warnings
sys.path.insert(0, {tests!r})
import h5py
import fisherlab
from fisherlab import store
from fisherlab.errors import FisherlabError

src, work, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ref = fisherlab.load(src, "c1")
data = []                                   # byte ranges of dataset storage: not metadata
with h5py.File(src, "r") as f:
    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.size:
            if obj.chunks is None:
                data.append((obj.id.get_offset(), obj.id.get_storage_size()))
            else:
                for i in range(obj.id.get_num_chunks()):
                    ci = obj.id.get_chunk_info(i)
                    data.append((ci.byte_offset, ci.size))
    f.visititems(visit)
raw = bytearray(open(src, "rb").read())
meta = [i for i in range(len(raw)) if not any(o <= i < o + s for o, s in data)]
rng = random.Random(seed)
counts = {{"same": 0, "one-line error": 0}}
bad = []
for t in range(n):
    pos = rng.choice(meta)
    bit = rng.randrange(8)
    flipped = bytearray(raw)
    flipped[pos] ^= 1 << bit
    open(work, "wb").write(flipped)
    outcome = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            store.list_checkpoints(work)
            store.file_info(work)
            got = fisherlab.load(work, "c1")
        outcome = "same" if got.equals(ref) else "CHANGED"
    except FisherlabError as err:
        outcome = "one-line error" if "\n" not in str(err) else "MULTI-LINE"
    except Exception as err:
        outcome = type(err).__name__ + ": " + str(err).splitlines()[0][:120]
    if outcome in counts:
        counts[outcome] += 1
    else:
        bad.append(f"byte {{pos}} bit {{bit}}: {{outcome}}")
print(json.dumps({{"counts": counts, "bad": bad, "metadata_bytes": len(meta)}}))
"""


@pytest.mark.parametrize(
    "flips,seed", [(60, 9), pytest.param(400, 1, marks=pytest.mark.slow)], ids=["60-flips", "400-flips"]
)
def test_metadata_bit_flips_are_one_line_errors_or_unchanged_loads(tmp_path, cap, flips, seed):
    """Seeded single-bit flips in the metadata bytes (everything but dataset storage), in a child
    process (so that a crash inside HDF5 is a failure, not a dead test run)."""
    src = tmp_path / "src.h5"
    fisherlab.save(cap, src, checkpoint="c1", step=1, fsync=False)
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ.format(tests=str(TESTS)))
    r = subprocess.run(
        [sys.executable, str(script), str(src), str(tmp_path / "work.h5"), str(flips), str(seed)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, f"the fuzz child died with status {r.returncode}: {r.stderr[-1500:]}"
    import json

    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["bad"] == [], result
    assert sum(result["counts"].values()) == flips
