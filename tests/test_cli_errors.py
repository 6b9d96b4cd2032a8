"""Issue 9 item 11 (and the planned refusals of item 7): the command line prints one line, exit
status 2, for every expected failure — data that do not fit the model, output paths that cannot
be used, out of memory, a device that is not there, a read-only or full file system, a model too
large to build — and a traceback only for bugs."""

from __future__ import annotations

import errno
import importlib
import json
import os
import re
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import torch

from fisherlab import models
from fisherlab.cli import capture_cmd, main

MAIN = importlib.import_module("fisherlab.cli.main")

WIDTH = 0.02  # mnist-ae 784-20-10-5-1-5-10-20-784: a capture of B = 4 takes milliseconds


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc: int, err: str, pattern: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fisherlab: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert "corrupt" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    p = d / "step-0.pt"
    torch.save(models.build(models.describe("mnist-ae", width=WIDTH), seed=0).state_dict(), p)
    return p


def capture_args(ckpt, out, *extra):
    return ["capture", "--model", "mnist-ae", "--width", WIDTH, "--checkpoints", ckpt, "-B", 4,
            "--device", "cpu", "--quiet", "--out", out, *extra]


# small_fs: the 1 MiB tmpfs fixture of tests/conftest.py


# ---- data that do not fit the model --------------------------------------------------------------


def test_data_that_do_not_fit_the_model(capsys, tmp_path, ckpt):
    bad = tmp_path / "ten.npz"
    np.savez(bad, x=np.random.rand(8, 10).astype("float32"), y=np.random.rand(8, 10).astype("float32"))
    rc, _, err = run_cli(capsys, *capture_args(ckpt, tmp_path / "a.h5", "--data", bad))
    one_line(rc, err, r"examples have shape \[10\], model 'mnist-ae' takes \[784\]: the data do not fit")
    # a model of your own, whose input shape is not known: the forward of one example tells
    (tmp_path / "mine.py").write_text(textwrap.dedent("""
        from torch import nn
        def factory():
            return nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    """))
    own = tmp_path / "own.pt"
    torch.save(models.build(f"{tmp_path / 'mine.py'}:factory").state_dict(), own)
    data = tmp_path / "cls.npz"
    np.savez(data, x=np.random.rand(8, 10).astype("float32"), y=np.arange(8) % 3)
    rc, _, err = run_cli(capsys, "capture", "--model", f"{tmp_path / 'mine.py'}:factory", "--checkpoints", own,
                         "--data", data, "--loss", "cross_entropy", "-B", 4, "--device", "cpu", "-q", "--out", tmp_path / "b.h5")
    one_line(rc, err, r"the data \(examples of shape \[10\]\) do not fit model '.*mine\.py:factory': mat1 and mat2")
    # targets the loss cannot take (bce_logits targets outside [0, 1])
    neg = tmp_path / "neg.npz"
    np.savez(neg, x=np.random.rand(8, 784).astype("float32"), y=-np.ones((8, 784), dtype="float32"))
    rc, _, err = run_cli(capsys, *capture_args(ckpt, tmp_path / "c.h5", "--data", neg))
    one_line(rc, err, r"checkpoint 'step-0': bce_logits targets must lie in \[0, 1\]")
    assert not list(tmp_path.glob("*.h5"))  # refused before writing anything


# ---- output paths --------------------------------------------------------------------------------


def test_out_paths_that_cannot_be_used(capsys, tmp_path, ckpt):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for argv in (["train", "--width", WIDTH, "--steps", 1, "-q", "--out", a_file],
                 ["demo", "--tiny", "-q", "--out", a_file],
                 ["analyze", "errors", tmp_path / "x.h5", "-q", "--out", a_file]):
        rc, _, err = run_cli(capsys, *argv)
        one_line(rc, err, r"--out .*a-file: an existing file, not a folder")
    rc, _, err = run_cli(capsys, *capture_args(ckpt, tmp_path))  # a folder where the file is needed
    one_line(rc, err, r"--out .*: a folder; name the HDF5 file, e.g. .*capture\.h5")
    rc, _, err = run_cli(capsys, *capture_args(ckpt, a_file / "run.h5"))
    one_line(rc, err, r"a-file is a file, not a folder")
    rc, _, err = run_cli(capsys, "train", "--width", WIDTH, "--steps", 1, "-q", "--out", a_file / "run")
    one_line(rc, err, r"a-file is a file, not a folder")


def test_read_only_folder_and_file_system(capsys, tmp_path, ckpt, small_fs):
    """A read-only file system: one line that says so (never "corrupted"); reading still works."""
    good = small_fs / "run.h5"
    assert run_cli(capsys, *capture_args(ckpt, good))[0] == 0
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
    for argv in (["analyze", "errors", good, "-q"],  # the default --out is beside the file
                 ["train", "--width", WIDTH, "--steps", 1, "-q", "--out", small_fs / "run"]):
        rc, _, err = run_cli(capsys, *argv)
        one_line(rc, err, r"cannot write into .*mnt \(a read-only file system\)")
    rc, _, err = run_cli(capsys, *capture_args(ckpt, small_fs / "new.h5"))
    one_line(rc, err, r"cannot write into .*mnt \(a read-only file system\)")
    rc, out, _ = run_cli(capsys, "inspect", good)
    assert rc == 0 and "1 complete" in out


def test_full_disk_is_one_line(capsys, tmp_path, ckpt, small_fs, fill_disk):
    fill_disk(small_fs / "filler")
    rc, _, err = run_cli(capsys, *capture_args(ckpt, small_fs / "run.h5"))
    one_line(rc, err, r"run\.h5: cannot write the checkpoint: the disk is full")
    assert not (small_fs / "run.h5").exists() and not (small_fs / "run.h5.partial").exists()


# ---- memory --------------------------------------------------------------------------------------


def test_capture_memory_flag_plans_the_capture(capsys, tmp_path, ckpt):
    rc, _, err = run_cli(capsys, *capture_args(ckpt, tmp_path / "run.h5", "--memory", "1KiB"))
    one_line(rc, err, r"capture would need about .* GiB .*more than the .* GiB allowed; use .*--storage factored.*--memory")
    rc, _, err = run_cli(capsys, *capture_args(ckpt, tmp_path / "run.h5", "--memory", "lots"))
    one_line(rc, err, r"memory must be bytes or a size like '8GiB'")
    assert run_cli(capsys, *capture_args(ckpt, tmp_path / "run.h5", "--memory", "1GiB"))[0] == 0


def test_a_model_too_large_is_refused_before_it_is_built(capsys, tmp_path, ckpt):
    """``"width": 300`` in a --model JSON or in the checkpoints' sidecar: refused naming the size
    (mnist-ae at width 300 has 1.1e11 parameters, 426 GiB), never allocated."""
    spec = tmp_path / "wide.json"
    spec.write_text(json.dumps({"name": "mnist-ae", "width": 300}))
    rc, _, err = run_cli(capsys, "capture", "--model", spec, "--checkpoints", ckpt, "-B", 4, "--device", "cpu",
                         "-q", "--out", tmp_path / "a.h5")
    one_line(rc, err, r"model 'mnist-ae' \(width=300(\.0)?\) has [\d,]+ parameters, about [\d.]+ GiB in float32, "
                      r"more than the .* GiB available; choose a smaller width \(--width\)")
    side = tmp_path / "side"
    side.mkdir()
    shutil.copy(ckpt, side / "step-0.pt")
    (side / "step-0.json").write_text(json.dumps({"model": {"name": "mnist-ae", "width": 300}, "step": 0}))
    rc, _, err = run_cli(capsys, "capture", "--checkpoints", side / "step-0.pt", "-B", 4, "--device", "cpu", "-q",
                         "--out", tmp_path / "b.h5")
    one_line(rc, err, r"has [\d,]+ parameters, about [\d.]+ GiB")


@pytest.mark.parametrize("raised, pattern", [
    (MemoryError(), r"out of memory: pass --memory .*a smaller --batch-size, or --storage factored"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 180000000000 bytes. Error code 12"), r"out of memory \(an allocation of 168 GiB\): pass --memory"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), r"out of memory \(an allocation of 20.00 GiB\): pass --memory"),
])
def test_out_of_memory_is_one_line(capsys, tmp_path, ckpt, monkeypatch, raised, pattern):
    def oom(*a, **k):
        raise raised

    monkeypatch.setattr(capture_cmd, "capture_checkpoints", oom)
    rc, _, err = run_cli(capsys, *capture_args(ckpt, tmp_path / "run.h5"))
    one_line(rc, err, pattern)


# ---- devices, file-system errors, and bugs ---------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu(capsys, tmp_path, ckpt):
    for argv in (capture_args(ckpt, tmp_path / "run.h5", "--device", "cuda"),
                 ["train", "--width", WIDTH, "--steps", 1, "-q", "--device", "cuda", "--out", tmp_path / "t"],
                 ["analyze", "errors", tmp_path / "x.h5", "-q", "--device", "cuda:0"],
                 ["analyze", "spectra", tmp_path / "x.h5", "-q", "--device", "cuda"]):
        rc, _, err = run_cli(capsys, *argv)
        one_line(rc, err, r"--device cuda(:0)?: CUDA is not available on this machine; use --device cpu")
    rc, _, err = run_cli(capsys, *capture_args(ckpt, tmp_path / "run.h5", "--device", "gpu"))
    one_line(rc, err, r"--device gpu: not a torch device")


@pytest.mark.parametrize("raised, pattern", [
    (OSError(errno.EROFS, "Read-only file system", "/data/out"), r"^fisherlab: error: /data/out: read-only file system$"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/x.h5"), r"/data/x\.h5: permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), r"no space left on device \(the disk is full\)"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "a-file/checkpoints"), r"a-file/checkpoints: not a folder"),
])
def test_file_system_errors_are_one_line(capsys, tmp_path, monkeypatch, raised, pattern):
    def fail(args):
        raise raised

    monkeypatch.setattr(MAIN, "build_parser", _parser_with(fail))
    rc, _, err = run_cli(capsys, "inspect", tmp_path / "x.h5")
    one_line(rc, err, pattern)


def test_other_errors_keep_their_traceback(capsys, tmp_path, monkeypatch):
    for bug in (OSError("no errno: a bug"), RuntimeError("shape '[3]' is invalid"), KeyError("x")):
        def fail(args, bug=bug):
            raise bug

        monkeypatch.setattr(MAIN, "build_parser", _parser_with(fail))
        with pytest.raises(type(bug)):
            main(["inspect", str(tmp_path / "x.h5")])


def _parser_with(func):
    real = MAIN.build_parser

    def build():
        parser = real()
        sub = next(a for a in parser._actions if isinstance(getattr(a, "choices", None), dict))
        sub.choices["inspect"].set_defaults(func=func)
        return parser

    return build
