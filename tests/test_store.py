"""HDF5 store (schema v2; v1 files in tests/test_store_v2.py): exact round trips, one-line errors, crash safety under SIGKILL."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import fisherlab
from fisherlab import store
from fisherlab.errors import NonFiniteError, StoreError

from cases import MODELS, make_capture

TESTS = Path(__file__).resolve().parent

# (capture storage, stored dtype, compression): every storage, both dtypes, every filter
STORE_VARIANTS = [
    ("factored", torch.float64, None),
    ("dense", torch.float64, "gzip"),
    ("auto", torch.float32, "lzf"),
]


def expected(cap: fisherlab.Capture, name: str, step: int | None, **extra) -> fisherlab.Capture:
    """What :func:`fisherlab.load` returns for ``cap``: its meta gains checkpoint and step."""
    return dataclasses.replace(cap, meta={**cap.meta, "checkpoint": name, "step": step, **extra})


@pytest.fixture
def small():
    """A float64 capture of the tiny CNN (dense and factored layers), mc with K = 2."""
    cap, *_ = make_capture(MODELS["cnn"], "cross_entropy", "mc")
    return cap


@pytest.fixture
def saved(tmp_path, small):
    path = tmp_path / "run.h5"
    fisherlab.save(small, path, checkpoint="c1", step=10)
    return path, small


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage,dtype,compression", STORE_VARIANTS, ids=lambda v: str(v).replace("torch.", ""))
def test_round_trip_exact(tmp_path, model_case, loss, mode, storage, dtype, compression):
    cap, *_ = make_capture(model_case, loss, mode, storage=storage)
    cap = cap.to(dtype=dtype)
    path = tmp_path / "run.h5"
    fisherlab.save(cap, path, checkpoint="step-5", step=5, compression=compression)
    back = fisherlab.load(path, checkpoint="step-5")
    assert back.equals(expected(cap, "step-5", 5))
    assert back.dtype == dtype
    with h5py.File(path, "r") as f:
        ds = next(iter(f["checkpoints/step-5/layers/0"].values()))
        assert ds.compression == compression
        assert ds.dtype == np.dtype(str(dtype).replace("torch.", ""))


def test_dtype_option_casts_float_arrays(saved, tmp_path):
    _, cap = saved
    path = tmp_path / "f32.h5"
    fisherlab.save(cap, path, checkpoint="c1", dtype=torch.float32)
    back = fisherlab.load(path)
    assert back.equals(expected(cap.to(dtype=torch.float32), "c1", None))


def test_several_checkpoints_batch_indices_and_last_by_default(saved):
    path, cap = saved
    cap2, *_ = make_capture(MODELS["cnn"], "cross_entropy", "mc", seed=5)
    fisherlab.save(cap2, path, checkpoint="c2", step=20, batch_indices=[7, 8, 9])
    assert fisherlab.load(path, "c1").equals(expected(cap, "c1", 10))
    with pytest.warns(UserWarning, match=r"2 checkpoints \(c1, c2\); loading the last, 'c2'"):
        last = fisherlab.load(path)
    assert last.equals(expected(cap2, "c2", 20, batch_indices=[7, 8, 9]))
    infos = store.list_checkpoints(path)
    assert [(c.name, c.step, c.complete) for c in infos] == [("c1", 10, True), ("c2", 20, True)]
    assert infos[1].batch_indices == [7, 8, 9]


def test_meta_batch_indices_round_trip(tmp_path, small):
    cap = dataclasses.replace(small, meta={"checkpoint": "x", "step": 3, "batch_indices": [4, 1, 2], "note": "hi"})
    path = tmp_path / "m.h5"
    fisherlab.save(cap, path)  # name and step from meta
    assert fisherlab.load(path).equals(cap)


def test_lazy_reader_streams_layers(saved):
    path, cap = saved
    with store.CaptureFile(path) as cf:
        assert cf.complete == ["c1"]
        assert cf.layout == cap.layout
        for i, lc in enumerate(cf.iter_layers("c1")):
            assert lc.equals(cap.layers[i])
        assert cf.read_layer("c1", "4").equals(cap.layer("4"))
        assert torch.equal(cf.read_grad("c1"), cap.grad)


def test_load_subset_of_layers(saved):
    path, cap = saved
    sub = fisherlab.load(path, "c1", layers=["4", 0])
    assert [s.name for s in sub.layout.layers] == ["4", "0"]
    assert sub.meta["layers"] == [2, 0]
    ref = torch.cat([cap.per_example_gradients(2), cap.per_example_gradients(0)], dim=1)
    assert torch.equal(sub.per_example_gradients(), ref)
    assert torch.equal(sub.grad, torch.cat([cap.layout.block(cap.grad, 2), cap.layout.block(cap.grad, 0)]))
    # torch-order converters still address the full model
    assert torch.equal(sub.to_torch_order(sub.grad)[cap.layout.torch_index[cap.layout.layers[2].offset :]],
                       cap.layout.block(cap.grad, 2))


def test_overwrite(saved):
    path, cap = saved
    with pytest.raises(StoreError, match=r"checkpoint 'c1' exists already \(pass overwrite=True"):
        fisherlab.save(cap, path, checkpoint="c1")
    cap2, *_ = make_capture(MODELS["cnn"], "cross_entropy", "mc", seed=3)
    fisherlab.save(cap2, path, checkpoint="c1", step=11, overwrite=True)
    assert fisherlab.load(path, "c1").equals(expected(cap2, "c1", 11))
    assert [c.name for c in store.list_checkpoints(path)] == ["c1"]


def test_file_info(saved):
    path, cap = saved
    info = store.file_info(path)
    assert info["schema_version"] == store.SCHEMA_VERSION == 2 and info["format"] == "fisherlab"
    assert info["loss"] == "cross_entropy" and info["fisher"] == "mc" and info["n_vectors"] == 2
    (c,) = info["checkpoints"]
    assert c.complete and c.status == "complete"
    assert [li.storage for li in c.layers] == [lc.storage.value for lc in cap.layers]
    assert c.nbytes == sum(d.nbytes for li in c.layers for d in li.datasets) + sum(d.nbytes for d in c.datasets)


# ---------------------------------------------------------------------------------------------
# one-line errors
# ---------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(StoreError, match=r"nope\.h5: no such file") as e:
        fisherlab.load(tmp_path / "nope.h5")
    _one_line(e)


@pytest.mark.parametrize("content", [b"", b"hello, not hdf5\n" * 20], ids=["empty", "text"])
def test_not_hdf5(tmp_path, content):
    path = tmp_path / "x.h5"
    path.write_bytes(content)
    with pytest.raises(StoreError, match=r"x\.h5: not an HDF5 file"):
        fisherlab.load(path)
    with pytest.raises(StoreError, match=r"x\.h5: not an HDF5 file"):  # save never clobbers it
        fisherlab.save(make_capture(MODELS["mlp"], "mse", "empirical")[0], path, checkpoint="c")


def test_hdf5_but_not_fisherlab(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match=r"other\.h5: HDF5 file but not a fisherlab file"):
        fisherlab.load(path)


@pytest.mark.parametrize(
    "version,message",
    [(3, r"schema version 3 is newer than this fisherlab .*upgrade fisherlab"),
     (0, r"unknown schema version 0"),
     ("one", r"unknown schema version 'one'")],
)
def test_schema_version(saved, version, message):
    path, _ = saved
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = version
    with pytest.raises(StoreError, match=message):
        fisherlab.load(path)


def test_missing_checkpoint(saved):
    path, _ = saved
    with pytest.raises(StoreError, match=r"run\.h5: no checkpoint 'c9' \(complete checkpoints: c1\)"):
        fisherlab.load(path, "c9")


class _Stop(Exception):
    pass


def test_incomplete_checkpoint_after_failed_writer(saved, monkeypatch):
    """A writer that dies mid-checkpoint leaves it staged: reported incomplete, then resumed."""
    path, cap = saved

    def hook(name, stage):
        if stage == "1/J":
            raise _Stop

    monkeypatch.setattr(store, "_WRITE_HOOK", hook)
    with pytest.raises(_Stop):
        fisherlab.save(cap, path, checkpoint="c2", step=20)
    monkeypatch.setattr(store, "_WRITE_HOOK", None)
    assert [(c.name, c.complete) for c in store.list_checkpoints(path)] == [("c1", True), ("c2", False)]
    with pytest.raises(StoreError, match=r"run\.h5: checkpoint 'c2' is incomplete .*rerun the capture to resume"):
        fisherlab.load(path, "c2")
    assert fisherlab.load(path).equals(expected(cap, "c1", 10))  # the last *complete* one
    fisherlab.save(cap, path, checkpoint="c2", step=20)
    assert [(c.name, c.complete) for c in store.list_checkpoints(path)] == [("c1", True), ("c2", True)]
    assert fisherlab.load(path, "c2").equals(expected(cap, "c2", 20))


def test_incomplete_flag(saved):
    path, _ = saved
    with h5py.File(path, "a") as f:
        del f["checkpoints/c1"].attrs["complete"]
    with pytest.raises(StoreError, match=r"checkpoint 'c1' is incomplete"):
        fisherlab.load(path, "c1")
    with pytest.raises(StoreError, match=r"run\.h5: no complete checkpoint \(incomplete: c1\)"):
        fisherlab.load(path)


def test_missing_layer(saved):
    path, _ = saved
    with h5py.File(path, "a") as f:
        del f["checkpoints/c1/layers/1"]
    with pytest.raises(StoreError, match=r"run\.h5: checkpoint 'c1', layer 1 '2': layer is missing"):
        fisherlab.load(path, "c1")
    with pytest.raises(StoreError, match=r"checkpoint 'c1': no layer named 'fc9'"):
        fisherlab.load(path, "c1", layers=["fc9"])


def test_shape_mismatch(saved):
    path, _ = saved
    with h5py.File(path, "a") as f:
        g = f["checkpoints/c1/layers/2"]
        a = g["a"][()]
        del g["a"]
        g["a"] = a[:, :, :-1]
    with pytest.raises(StoreError, match=r"layer 2 '4': dataset 'a' has shape \[3, 1, 8\], the layer table expects \[3, 1, 9\]"):
        fisherlab.load(path, "c1")


def test_layer_table_disagrees_with_layout(saved):
    path, _ = saved
    with h5py.File(path, "a") as f:
        g = f["checkpoints/c1"]
        g.attrs["layers"] = g.attrs["layers"].replace('"positions": 1', '"positions": 2')
    with pytest.raises(StoreError, match=r"layer 2 '4': the layer table's shapes .* disagree with the layout"):
        fisherlab.load(path, "c1")


def test_checksum_mismatch(saved):
    path, _ = saved
    with h5py.File(path, "a") as f:
        f["checkpoints/c1/layers/2/g"][0, 0, 0, 0] += 1.0
    with pytest.raises(StoreError, match=r"layer 2 '4': checksum mismatch in dataset 'g' .*the file is corrupted"):
        fisherlab.load(path, "c1")


def test_non_finite_in_file(saved):
    path, _ = saved
    with h5py.File(path, "a") as f:
        ds = f["checkpoints/c1/layers/0/J"]
        ds[1, 2] = np.nan
        ds.attrs["crc32"] = np.int64(store._crc(ds[()]))
    with pytest.raises(NonFiniteError, match=r"checkpoint 'c1', layer 0 '0': 1 non-finite value\(s\) \(NaN/Inf\) in dataset 'J'"):
        fisherlab.load(path, "c1")


def test_non_finite_capture_is_not_saved(saved, tmp_path):
    path, cap = saved
    bad = cap.to()
    bad.layers[2].a[0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"capture layer 2 '4': 1 non-finite value\(s\) \(NaN/Inf\) in a; not saved"):
        fisherlab.save(bad, tmp_path / "bad.h5", checkpoint="c")
    assert not (tmp_path / "bad.h5").exists() and not (tmp_path / "bad.h5.partial").exists()
    bad.grad[3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"capture layer 2 '4'"):  # appending: nothing left behind
        fisherlab.save(bad, path, checkpoint="c2")
    assert [(c.name, c.complete) for c in store.list_checkpoints(path)] == [("c1", True)]


def test_truncated_file(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"run\.h5: truncated HDF5 file"):
        fisherlab.load(path)


def test_append_other_configuration(saved):
    path, _ = saved
    other, *_ = make_capture(MODELS["cnn"], "cross_entropy", "exact")
    with pytest.raises(StoreError, match=r"cannot append: the capture's fisher mode 'exact' differs from the run's 'mc'"):
        fisherlab.save(other, path, checkpoint="c2")
    other, *_ = make_capture(MODELS["cnn"], "cross_entropy", "mc", n_samples=3)
    with pytest.raises(StoreError, match=r"cannot append: the capture's K \(vectors per example\) 3 differs from the run's 2"):
        fisherlab.save(other, path, checkpoint="c2")
    mlp, *_ = make_capture(MODELS["mlp"], "cross_entropy", "mc")
    with pytest.raises(StoreError, match=r"cannot append: the capture's layout differs"):
        fisherlab.save(mlp, path, checkpoint="c2")


@pytest.mark.parametrize("bad", ["", "a/b", ".hidden"])
def test_bad_checkpoint_name(tmp_path, small, bad):
    with pytest.raises(StoreError, match="invalid checkpoint name"):
        fisherlab.save(small, tmp_path / "r.h5", checkpoint=bad)


def test_bad_compression(tmp_path, small):
    with pytest.raises(StoreError, match=r"unknown compression 'zstd'"):
        fisherlab.save(small, tmp_path / "r.h5", checkpoint="c", compression="zstd")


# ---------------------------------------------------------------------------------------------
# crash safety: a real writer process killed with SIGKILL
# ---------------------------------------------------------------------------------------------

WRITER = r"""
import os, sys, time
sys.path.insert(0, {tests!r})
import fisherlab
from fisherlab import store
from cases import MODELS, make_capture
import torch
torch.set_num_threads(1)  # as the tests run (conftest): a capture is bitwise reproducible per thread count

path, marker, stop_at = sys.argv[1], sys.argv[2], sys.argv[3]   # stop_at = "<checkpoint>:<stage>"

def hook(name, stage):
    if f"{{name}}:{{stage}}" == stop_at:
        open(marker, "w").close()
        time.sleep(600)          # the test SIGKILLs us here

store._WRITE_HOOK = hook
for i, name in enumerate(["c1", "c2"]):
    cap, *_ = make_capture(MODELS["cnn"], "mse", "mc", seed=i)
    fisherlab.save(cap, path, checkpoint=name, step=100 * (i + 1))
"""


def _kill_writer_at(tmp_path: Path, stop_at: str) -> Path:
    path = tmp_path / "run.h5"
    marker = tmp_path / "paused"
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(TESTS)))
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(marker), stop_at])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"writer exited early with status {proc.returncode}"
            assert time.monotonic() < deadline, "writer never reached the pause point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return path


@pytest.mark.parametrize("stage", ["1/J", "before-commit", "moved"])
def test_sigkill_during_second_checkpoint(tmp_path, stage):
    """SIGKILL mid-write of c2 (after a layer's data; after all data, before the commit; inside the
    commit, moved to /checkpoints but not yet complete):
    c1 stays intact and loadable, c2 is reported incomplete, and saving c2 again completes the file."""
    path = _kill_writer_at(tmp_path, f"c2:{stage}")
    c1, *_ = make_capture(MODELS["cnn"], "mse", "mc", seed=0)
    c2, *_ = make_capture(MODELS["cnn"], "mse", "mc", seed=1)
    assert fisherlab.load(path, "c1").equals(expected(c1, "c1", 100))
    infos = store.list_checkpoints(path)
    assert [(c.name, c.complete) for c in infos] == [("c1", True), ("c2", False)]
    assert infos[1].status.startswith("incomplete")
    with pytest.raises(StoreError, match=r"checkpoint 'c2' is incomplete"):
        fisherlab.load(path, "c2")
    # resume
    fisherlab.save(c2, path, checkpoint="c2", step=200)
    assert [(c.name, c.complete) for c in store.list_checkpoints(path)] == [("c1", True), ("c2", True)]
    assert fisherlab.load(path, "c1").equals(expected(c1, "c1", 100))
    assert fisherlab.load(path, "c2").equals(expected(c2, "c2", 200))
    with h5py.File(path, "r") as f:
        assert list(f["staging"]) == []


def test_sigkill_during_first_checkpoint_leaves_no_file(tmp_path):
    """A new file appears only once its first checkpoint is committed (``<file>.partial`` before)."""
    path = _kill_writer_at(tmp_path, "c1:0/J")
    assert not path.exists()
    assert path.with_name("run.h5.partial").exists()
    with pytest.raises(StoreError, match="run.h5: no such file"):
        store.list_checkpoints(path)
    c1, *_ = make_capture(MODELS["cnn"], "mse", "mc", seed=0)
    fisherlab.save(c1, path, checkpoint="c1", step=100)
    assert not path.with_name("run.h5.partial").exists()
    assert fisherlab.load(path).equals(expected(c1, "c1", 100))


def test_select_checkpoints_orders_by_step_and_names_what_is_missing(tmp_path):
    from fisherlab.errors import StoreError
    from fisherlab.store import select_checkpoints

    from cases import MODELS, make_capture

    path = tmp_path / "run.h5"
    for name, step in [("late", 20), ("early", 5)]:
        cap, *_ = make_capture(MODELS["mlp"], "mse", "empirical")
        fisherlab.save(cap, path, checkpoint=name, step=step, fsync=False)
    assert [c.name for c in select_checkpoints(path)] == ["early", "late"]
    assert [c.name for c in select_checkpoints(path, ["late"])] == ["late"]
    with pytest.raises(StoreError, match="no complete checkpoint named nope"):
        select_checkpoints(path, ["nope"])
