"""``fisherlab inspect`` and ``fisherlab capture``: output, resume, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import fisherlab
from fisherlab import datasets, models, store
from fisherlab.cli import main

from cases import MODELS, make_capture

WIDTH = 0.02  # mnist-ae 784-20-10-5-1-5-10-20-784: p ≈ 33k, a capture of B = 4 in milliseconds


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, pattern: str) -> None:
    import re

    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fisherlab: error: ")
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def run_file(tmp_path):
    """Two complete checkpoints and one a writer left incomplete."""
    cap, *_ = make_capture(MODELS["cnn"], "cross_entropy", "mc")
    cap = dataclasses.replace(cap, model={"name": "tiny-cnn"})
    path = tmp_path / "run.h5"
    fisherlab.save(cap, path, checkpoint="step-0", step=0, batch_indices=[4, 0, 2])
    fisherlab.save(cap, path, checkpoint="step-100", step=100, batch_indices=[4, 0, 2], compression="lzf")

    def stop(name, stage):
        if stage == "1/J":
            raise KeyboardInterrupt

    store._WRITE_HOOK = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            fisherlab.save(cap, path, checkpoint="step-200", step=200)
    finally:
        store._WRITE_HOOK = None
    return path


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def test_inspect_output(capsys, run_file):
    rc, out, err = run_cli(capsys, "inspect", run_file)
    assert rc == 0 and err == ""
    assert "fisherlab file, schema 2" in out
    assert "loss=cross_entropy  fisher=mc  K=2  B=3  N=6  p=119 in 3 layers" in out
    assert "checkpoints: 2 complete, 1 incomplete" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  step-")}
    assert rows["step-0"].split()[1:3] == ["0", "complete"]
    assert "incomplete (writer stopped)" in rows["step-200"]
    assert "[4, 0, 2] (3)" in rows["step-100"]
    assert "layers of checkpoint 'step-100':" in out  # the last complete one
    layer_rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 ", "2 "))]
    assert [r[:3] for r in layer_rows] == [["0", "0", "conv2d"], ["1", "2", "conv2d"], ["2", "4", "linear"]]
    assert "a [3, 1, 9]  g [3, 2, 1, 4]" in out and "J [6, 57]" in out
    assert layer_rows[0][-1] == "lzf"


def test_inspect_named_checkpoint(capsys, run_file):
    rc, out, _ = run_cli(capsys, "inspect", run_file, "--checkpoint", "step-0")
    assert rc == 0 and "layers of checkpoint 'step-0':" in out and out.splitlines()[-2].rstrip().endswith("none")
    rc, _, err = run_cli(capsys, "inspect", run_file, "--checkpoint", "step-200")
    assert_one_line_error(rc, err, r"run\.h5: no complete checkpoint 'step-200' \(complete checkpoints: step-0, step-100\)")


def _not_hdf5(p):
    p.write_text("just text\n")


def _not_fisherlab(p):
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros(3)


@pytest.mark.parametrize(
    "make,pattern",
    [
        (None, r"x\.h5: no such file"),
        (_not_hdf5, r"x\.h5: not an HDF5 file"),
        (_not_fisherlab, r"x\.h5: HDF5 file but not a fisherlab file"),
    ],
    ids=["missing", "not-hdf5", "not-fisherlab"],
)
def test_inspect_errors(capsys, tmp_path, make, pattern):
    p = tmp_path / "x.h5"
    if make is not None:
        make(p)
    rc, _, err = run_cli(capsys, "inspect", p)
    assert_one_line_error(rc, err, pattern)


def test_inspect_newer_schema(capsys, run_file):
    with h5py.File(run_file, "a") as f:
        f.attrs["schema_version"] = 7
    rc, _, err = run_cli(capsys, "inspect", run_file)
    assert_one_line_error(rc, err, r"run\.h5: schema version 7 is newer than this fisherlab")


def test_cli_error_in_a_subprocess_has_no_traceback(tmp_path):
    p = tmp_path / "x.h5"
    p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # the HDF5 signature, then nothing
    code = "import sys; from fisherlab.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, "inspect", str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("fisherlab: error: ") and "x.h5" in line


# ---------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def ckpts(tmp_path):
    desc = models.describe("mnist-ae", width=WIDTH)
    paths = []
    for step in (0, 50):
        p = tmp_path / f"step-{step}.pt"
        torch.save(models.build(desc, seed=step).state_dict(), p)
        paths.append(p)
    return desc, paths


def _capture_args(paths, out, *extra):
    return ["capture", "--model", "mnist-ae", "--width", str(WIDTH), "--checkpoints", *paths,
            "--batch-size", "4", "--device", "cpu", "--quiet", "--out", out, *extra]


def test_capture_two_checkpoints_then_resume(capsys, tmp_path, ckpts, monkeypatch):
    desc, paths = ckpts
    out = tmp_path / "run.h5"

    def stop(name, stage):  # the writer dies in the middle of the second checkpoint
        if name == "step-50" and stage == "before-commit":
            raise KeyboardInterrupt

    monkeypatch.setattr(store, "_WRITE_HOOK", stop)
    assert main([str(a) for a in _capture_args(paths, out)]) == 130
    monkeypatch.setattr(store, "_WRITE_HOOK", None)
    assert [(c.name, c.complete) for c in store.list_checkpoints(out)] == [("step-0", True), ("step-50", False)]
    first = fisherlab.load(out, "step-0")

    rc, stdout, err = run_cli(capsys, *_capture_args(paths, out))
    assert rc == 0, err
    assert "'step-0' is complete in" in err and "skipped" in err
    assert "1 checkpoint(s) written, 1 already complete" in stdout
    infos = store.list_checkpoints(out)
    assert [(c.name, c.step, c.complete) for c in infos] == [("step-0", 0, True), ("step-50", 50, True)]
    assert infos[0].batch_indices == infos[1].batch_indices and len(infos[0].batch_indices) == 4
    assert fisherlab.load(out, "step-0").equals(first)  # untouched by the resume

    # the stored capture is the capture of that checkpoint's weights on that batch
    cap = fisherlab.load(out, "step-50")
    assert cap.model == desc and cap.loss == "bce_logits" and cap.fisher == "mc" and cap.K == 1
    model = models.build(desc)
    model.load_state_dict(torch.load(paths[1], weights_only=True))
    x, y = datasets.load("mnist").batch(cap.meta["batch_indices"])
    ref = fisherlab.capture(model, x, y, loss="bce_logits", fisher="mc", device="cpu",
                            generator=torch.Generator().manual_seed(0), model_description=desc)
    assert torch.equal(ref.grad, cap.grad) and all(a.equals(b) for a, b in zip(ref.layers, cap.layers))
    assert cap.meta["checkpoint_file"] == str(paths[1])

    rc, stdout, _ = run_cli(capsys, "inspect", out)
    assert rc == 0 and "checkpoints: 2 complete, 0 incomplete" in stdout


def test_capture_model_json_indices_and_other_batch(capsys, tmp_path, ckpts):
    desc, paths = ckpts
    mfile = tmp_path / "model.json"
    mfile.write_text(json.dumps(desc))
    out = tmp_path / "run.h5"
    args = ["capture", "--model", mfile, "--checkpoints", paths[0], "--data", "mnist", "--batch-size", "3",
            "--indices", "5", "7", "9", "--fisher", "empirical", "--dtype", "float64", "--compression", "gzip",
            "--device", "cpu", "-q", "--out", out]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    cap = fisherlab.load(out)
    assert cap.meta["batch_indices"] == [5, 7, 9] and cap.fisher == "empirical" and cap.dtype == torch.float64
    args[args.index("7")] = "8"
    args[args.index("--checkpoints") + 1] = paths[1]
    rc, _, err = run_cli(capsys, *args)
    assert_one_line_error(rc, err, r"checkpoint 'step-0' was captured on another batch")


def test_capture_errors(capsys, tmp_path, ckpts):
    desc, paths = ckpts
    out = tmp_path / "run.h5"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    rc, _, err = run_cli(capsys, *_capture_args([bad], out))
    assert_one_line_error(rc, err, r"checkpoint .*bad\.pt: cannot load a state_dict with weights_only=True")
    rc, _, err = run_cli(capsys, *_capture_args([tmp_path / "gone.pt"], out))
    assert_one_line_error(rc, err, r"checkpoint .*gone\.pt: no such file")
    wrong = tmp_path / "wrong.pt"
    torch.save(models.build(models.describe("mnist-ae", width=0.05)).state_dict(), wrong)
    rc, _, err = run_cli(capsys, *_capture_args([wrong], out))
    assert_one_line_error(rc, err, r"checkpoint .*wrong\.pt: does not fit model 'mnist-ae'")
    rc, _, err = run_cli(capsys, *_capture_args(paths, out, "--indices", "1", "2"))
    assert_one_line_error(rc, err, r"--indices gives 2 indices but --batch-size is 4")
    rc, _, err = run_cli(capsys, "capture", "--model", "no-such-model", "--checkpoints", paths[0], "-B", "2", "--out", out)
    assert_one_line_error(rc, err, r"unknown model 'no-such-model'")
    assert not out.exists()


def test_capture_reads_training_sidecars(capsys, tmp_path, ckpts):
    """Without --model, the model (and data, step) come from ``fisherlab train``'s sidecar JSON."""
    desc, paths = ckpts
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    target = ck / "step_000007.pt"
    paths[1].rename(target)
    (ck / "step_000007.json").write_text(json.dumps(
        {"step": 7, "file": target.name, "model": desc, "data": {"name": "mnist", "task": "autoencoder"}}
    ))
    out = tmp_path / "run.h5"
    rc, _, err = run_cli(capsys, "capture", "--checkpoints", target, "-B", "2", "--device", "cpu", "-q", "--out", out)
    assert rc == 0, err
    (info,) = store.list_checkpoints(out)
    assert (info.name, info.step, info.complete) == ("step_000007", 7, True)
    assert fisherlab.load(out).model == desc
    rc, _, err = run_cli(capsys, "capture", "--checkpoints", paths[0], "-B", "2", "--out", out)
    assert_one_line_error(rc, err, r"--model is required: the checkpoints have no sidecar JSON")


# ---------------------------------------------------------------------------------------------
# error handling: one line for FisherlabError, a traceback for anything else
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def failing_inspect(monkeypatch):
    """``fisherlab inspect`` raising a chosen exception."""
    from fisherlab.cli import inspect_cmd

    def use(exc: BaseException):
        def boom(args):
            raise exc

        monkeypatch.setattr(inspect_cmd, "run", boom)

    return use


def test_fisherlab_errors_print_one_line(capsys, failing_inspect, tmp_path):
    from fisherlab.errors import ConfigError

    failing_inspect(ConfigError("--thing must be one of a, b; got 'c'"))
    rc, _, err = run_cli(capsys, "inspect", tmp_path / "x.h5")
    assert_one_line_error(rc, err, r"--thing must be one of a, b; got 'c'$")


def test_other_exceptions_show_their_traceback(capsys, failing_inspect, tmp_path):
    """An internal bug is not disguised as a user error: a plain ValueError propagates."""
    failing_inspect(ValueError("an internal bug"))
    with pytest.raises(ValueError, match="an internal bug"):
        main(["inspect", str(tmp_path / "x.h5")])


def test_traceback_flag_shows_fisherlab_errors_too(capsys, tmp_path):
    p = tmp_path / "x.h5"
    p.write_bytes(b"not hdf5")
    with pytest.raises(fisherlab.errors.StoreError):
        main(["--traceback", "inspect", str(p)])
    code = "import sys; from fisherlab.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", code, "--traceback", "inspect", str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "StoreError" in r.stderr


def test_analyze_without_target_works_after_traceback_flag(capsys, run_file, tmp_path):
    """``fisherlab --traceback analyze FILE …`` still means the ``errors`` target."""
    rc, out, err = run_cli(capsys, "--traceback", "analyze", run_file, "--damping", "0.1", "--methods", "kfac",
                           "--out", tmp_path, "--no-progress", "--no-figures", "--quiet")
    # the run file holds an incomplete checkpoint: analysed are the complete ones, and the exit
    # status says something was skipped
    assert rc == 1 and "skipped 1 checkpoint(s) that are not complete: 'step-200'" in err, err
    assert (tmp_path / "errors.csv").is_file() and "rows" in out


def test_capture_batches_and_draws_give_intervals(capsys, tmp_path, ckpts):
    """--batches 2 --draws 2: four samples per checkpoint, grouped, compared with intervals."""
    import warnings

    from fisherlab.metrics import compare_file

    desc, paths = ckpts
    out = tmp_path / "run.h5"
    rc, stdout, err = run_cli(capsys, *_capture_args(paths[:1], out, "--batches", "2", "--draws", "2"))
    assert rc == 0, err
    infos = store.list_checkpoints(out)
    assert [i.name for i in infos] == ["step-0.b0d0", "step-0.b0d1", "step-0.b1d0", "step-0.b1d1"]
    b0, b1 = infos[0].batch_indices, infos[2].batch_indices
    assert len(b0) == len(b1) == 4 and not set(b0) & set(b1) and infos[1].batch_indices == b0
    caps = [fisherlab.load(out, i.name) for i in infos]
    assert caps[0].meta["sample"] == {"of": "step-0", "batch": 0, "draw": 0, "batches": 2, "draws": 2}
    assert not torch.equal(caps[0].grad, caps[2].grad)  # other batch
    assert torch.equal(caps[0].grad, caps[1].grad) and not caps[0].layers[-1].equals(caps[1].layers[-1])  # other draw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = compare_file(out, fisherlab.Damping(1e-3, "max"), ["zero", "kfac", "residuals"], progress=False)
    assert table.n_samples == 4 and {r["checkpoint"] for r in table.rows} == {"step-0"}
    assert all(s["samples"] == 4 and s["relative_error_hw"] >= 0 for s in table.summary() if s["method"] != "zero")
    rc, _, err = run_cli(capsys, *_capture_args(paths[:1], tmp_path / "e.h5", "--fisher", "exact", "--draws", "2"))
    assert rc == 2 and "only the mc Fisher draws samples" in err


def test_capture_overwrite_and_analyze_reports_what_it_skipped(capsys, tmp_path, ckpts, monkeypatch):
    """--overwrite recaptures complete checkpoints; analyze exits 1 naming checkpoints it skipped."""
    desc, paths = ckpts
    out = tmp_path / "run.h5"

    def stop(name, stage):
        if name == "step-50" and stage == "before-commit":
            raise KeyboardInterrupt

    monkeypatch.setattr(store, "_WRITE_HOOK", stop)
    assert main([str(a) for a in _capture_args(paths, out)]) == 130
    monkeypatch.setattr(store, "_WRITE_HOOK", None)
    rc, stdout, err = run_cli(capsys, "analyze", "interactions", out, "--out", tmp_path / "res", "--no-figures", "--no-progress")
    assert rc == 1 and "skipped 1 checkpoint(s) that are not complete: 'step-50'" in err
    assert (tmp_path / "res" / "structure_summary.csv").stat().st_size > 0  # the complete one was analysed
    created = store.list_checkpoints(out)[0].created
    rc, stdout, err = run_cli(capsys, *_capture_args(paths, out, "--overwrite"))
    assert rc == 0, err
    assert "2 checkpoint(s) written" in stdout and "skipped" not in err
    assert [c.complete for c in store.list_checkpoints(out)] == [True, True]
    assert store.list_checkpoints(out)[0].created >= created
