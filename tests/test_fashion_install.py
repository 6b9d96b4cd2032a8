"""data/install_fashion_mnist.sh (issue 13 item 2): every path of `make setup`'s Fashion-MNIST step.

Offline: ``apt-get`` (and ``id``, to choose root or not) are stubs on ``PATH``; the stub's
``download`` hands out a tiny real ``.deb`` built here with ``dpkg-deb --build``, so the unpacking
and the loader that finds the result are the real ones. The real download as a non-root user was
checked by hand (``setpriv --reuid=nobody``), see the README.
"""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fisherlab import datasets

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "data" / "install_fashion_mnist.sh"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
N_TRAIN, N_TEST = 12, 5
# Tools the script (and dpkg-deb: tar) needs besides apt-get, linked into a PATH that lacks apt-get.
TOOLS = ("sh", "mkdir", "mktemp", "rm", "mv", "ls", "head", "dirname", "basename", "cat", "cp", "touch", "tar")


def _write_idx(path: Path, arr: np.ndarray) -> None:
    magic = 2051 if arr.ndim == 3 else 2049
    head = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    path.write_bytes(gzip.compress(head + arr.astype(np.uint8).tobytes()))


def _fill(directory: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))


def _stub(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture()
def world(tmp_path):
    """A PATH with the basic tools, an ``id`` stub (uid from $STUB_UID) and a log of apt calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} not on PATH")
        (bindir / tool).symlink_to(found)
    _stub(bindir, "id", 'echo "${STUB_UID:-1000}"\n')
    env = {
        "PATH": str(bindir),
        "HOME": str(tmp_path),
        "FISHERLAB_FASHION_SYSTEM_DIR": str(tmp_path / "system" / "fashion-mnist"),
        "FISHERLAB_FASHION_DEST": str(tmp_path / "dest"),
        "APT_LOG": str(tmp_path / "apt.log"),
    }
    return tmp_path, bindir, env


def _run(env, *args):
    proc = subprocess.run(["sh", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def _apt_calls(env) -> list[str]:
    log = Path(env["APT_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def _fake_deb(tmp_path: Path) -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not available")
    pkg = tmp_path / "pkg"
    _fill(pkg / "usr" / "share" / "datasets" / "fashion-mnist", seed=1)
    (pkg / "usr" / "share" / "doc" / "dataset-fashion-mnist").mkdir(parents=True)
    (pkg / "usr" / "share" / "doc" / "dataset-fashion-mnist" / "copyright").write_text("MIT (Zalando SE)\n")
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 0.0-1\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: test\n")
    deb = tmp_path / "dataset-fashion-mnist_0.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(deb)],
                   check=True, capture_output=True)
    return deb


def _apt_stub(bindir: Path, deb: Path | None, install_into: Path | None = None) -> None:
    """apt-get logging its arguments: ``download`` copies ``deb`` here (fails without one),
    ``install`` fills ``install_into`` as dpkg would (fails without one); dpkg-deb is the real one."""
    download = f'cp "{deb}" .' if deb is not None else "exit 100"
    install = "exit 100"
    if install_into is not None:
        src = bindir.parent / "system-src"
        _fill(src, seed=2)
        install = f'mkdir -p "{install_into}" && cp "{src}"/*.gz "{install_into}"/'
    _stub(bindir, "apt-get", f"""echo "$*" >> "$APT_LOG"
case "$1" in
  download) {download} ;;
  install) {install} ;;
esac
""")
    if shutil.which("dpkg-deb") and not (bindir / "dpkg-deb").exists():
        (bindir / "dpkg-deb").symlink_to(shutil.which("dpkg-deb"))


def test_present_data_are_found_without_calling_apt(world):
    tmp, bindir, env = world
    _apt_stub(bindir, None)
    for where in ("FISHERLAB_FASHION_MNIST_DIR", "FISHERLAB_FASHION_SYSTEM_DIR"):
        d = tmp / where
        _fill(d)
        lines = _run({**env, where: str(d)})
        assert lines == [f"fashion-mnist: found in {d}"]
    assert _run({**env, "FISHERLAB_FASHION_MNIST_DIR": str(d)}, "--quiet") == []
    assert _apt_calls(env) == []


def test_incomplete_folder_is_not_taken_for_the_data(world):
    tmp, bindir, env = world
    d = tmp / "partial"
    _fill(d)
    (d / FILES[2]).unlink()
    lines = _run({**env, "FISHERLAB_FASHION_MNIST_DIR": str(d)})  # no apt-get on PATH
    assert len(lines) == 1 and "not installed (no apt-get on this system)" in lines[0]


def test_no_apt_is_one_message_and_success(world):
    _, _, env = world
    lines = _run(env)
    assert len(lines) == 1
    assert "no apt-get" in lines[0] and "sudo apt-get install dataset-fashion-mnist" in lines[0]
    assert "FISHERLAB_FASHION_MNIST_DIR" in lines[0]


def test_non_root_downloads_unpacks_and_the_loader_finds_it(world, monkeypatch):
    tmp, bindir, env = world
    _apt_stub(bindir, _fake_deb(tmp))
    lines = _run(env)  # id says 1000: the non-root path without any flag
    local = Path(env["FISHERLAB_FASHION_DEST"]) / "usr" / "share" / "datasets" / "fashion-mnist"
    assert lines[-1] == f"fashion-mnist: installed in {local}"
    assert _apt_calls(env) == ["download -q dataset-fashion-mnist"]
    assert sorted(p.name for p in local.iterdir()) == sorted(FILES)
    assert (local.parent.parent / "doc" / "dataset-fashion-mnist" / "copyright").is_file()
    leftovers = [p.name for p in Path(env["FISHERLAB_FASHION_DEST"]).iterdir() if p.name != "usr"]
    assert leftovers == []  # the download folder is removed
    # Idempotent: the second run only finds it.
    assert _run(env) == [f"fashion-mnist: found in {local}"]
    assert len(_apt_calls(env)) == 1
    # The loader searches the folder (here in place of the checkout's data/debian/).
    monkeypatch.delenv(datasets.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIRS", ["/nonexistent", str(local)])
    datasets._fashion_raw.cache_clear()
    try:
        train = datasets.load("fashion-mnist")
        test = datasets.load("fashion-mnist", split="test")
    finally:
        datasets._fashion_raw.cache_clear()
    assert tuple(train.x.shape) == (N_TRAIN, 784) and tuple(test.x.shape) == (N_TEST, 784)
    assert float(train.x.max()) <= 1.0 and str(local) in train.source


def test_user_flag_takes_the_download_path_as_root(world):
    tmp, bindir, env = world
    _apt_stub(bindir, _fake_deb(tmp))
    lines = _run({**env, "STUB_UID": "0"}, "--user")
    assert lines[-1].startswith("fashion-mnist: installed in ")
    assert _apt_calls(env) == ["download -q dataset-fashion-mnist"]


def test_root_installs_with_apt(world):
    tmp, bindir, env = world
    system = Path(env["FISHERLAB_FASHION_SYSTEM_DIR"])
    _apt_stub(bindir, None, install_into=system)
    lines = _run({**env, "STUB_UID": "0"})
    assert lines[-1] == f"fashion-mnist: installed in {system}"
    assert _apt_calls(env) == ["install -y -q dataset-fashion-mnist"]
    assert not Path(env["FISHERLAB_FASHION_DEST"]).exists()


@pytest.mark.parametrize("uid", ["0", "1000"])
def test_failed_apt_is_one_message_and_success(world, uid):
    tmp, bindir, env = world
    _apt_stub(bindir, None)
    lines = _run({**env, "STUB_UID": uid})
    assert "not installed (apt-get" in lines[-1] and "failed" in lines[-1]
    dest = Path(env["FISHERLAB_FASHION_DEST"])
    assert not (dest / "usr").exists()
    assert not dest.exists() or list(dest.iterdir()) == []  # no half-written data folder


def test_loader_searches_the_folder_the_script_fills():
    local = ROOT / "data" / "debian" / "usr" / "share" / "datasets" / "fashion-mnist"
    assert str(local) in datasets.FASHION_MNIST_DIRS
    assert "data/debian/" in (ROOT / ".gitignore").read_text().splitlines()


def test_make_setup_runs_the_script():
    if shutil.which("make") is None:
        pytest.skip("make not available")
    out = subprocess.run(["make", "-n", "-W", "pyproject.toml", "setup"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30).stdout
    assert "sh data/install_fashion_mnist.sh" in out
