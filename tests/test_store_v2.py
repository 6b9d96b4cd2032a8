"""Schema v2: samples (batches × draws) of a checkpoint recorded in the index; v1 files still read
and stay v1 when appended to."""

from __future__ import annotations

import h5py
import torch

import fisherlab
from fisherlab import store

from cases import MODELS, build_model, make_batch


def _cap(seed: int, sample: dict | None = None):
    case = MODELS["mlp"]
    x, y = make_batch(case, "cross_entropy", B=3, seed=seed)
    cap = fisherlab.capture(build_model(case), x, y, loss="cross_entropy", fisher="mc",
                            generator=torch.Generator().manual_seed(seed), device="cpu", dtype=torch.float64)
    if sample is not None:
        cap.meta["sample"] = sample
    return cap


def test_new_files_are_v2_and_index_their_samples(tmp_path):
    path = tmp_path / "run.h5"
    s0 = {"of": "c", "batch": 0, "draw": 0, "batches": 2, "draws": 1}
    fisherlab.save(_cap(1, s0), path, checkpoint="c.b0d0", step=0)
    fisherlab.save(_cap(2, {**s0, "batch": 1}), path, checkpoint="c.b1d0", step=0)
    fisherlab.save(_cap(3), path, checkpoint="single", step=1)
    with h5py.File(path, "r") as f:
        assert int(f.attrs["schema_version"]) == 2 == store.SCHEMA_VERSION
    infos = {i.name: i for i in store.list_checkpoints(path)}
    assert infos["c.b0d0"].sample == s0 and infos["c.b1d0"].sample["batch"] == 1
    assert infos["single"].sample is None
    assert fisherlab.load(path, "c.b1d0").meta["sample"]["batch"] == 1


def test_v1_files_still_load_and_stay_v1(tmp_path, monkeypatch):
    path = tmp_path / "old.h5"
    monkeypatch.setattr(store, "SCHEMA_VERSION", 1)  # the v1 writer: same layout, no sample attribute
    fisherlab.save(_cap(1), path, checkpoint="a", step=0)
    monkeypatch.undo()
    assert store.SCHEMA_VERSION == 2
    first = fisherlab.load(path, "a")
    fisherlab.save(_cap(2, {"of": "b", "batch": 0, "draw": 0, "batches": 1, "draws": 2}), path, checkpoint="b.b0d0", step=1)
    with h5py.File(path, "r") as f:
        assert int(f.attrs["schema_version"]) == 1  # appending keeps the file's version
        assert "sample" not in f["checkpoints/b.b0d0"].attrs
    assert fisherlab.load(path, "a").equals(first)
    assert fisherlab.load(path, "b.b0d0").meta["sample"]["of"] == "b"  # still grouped, through meta
    assert [i.sample for i in store.list_checkpoints(path)] == [None, None]
