import os

# Before torch loads: idle OpenMP threads sleep instead of spinning, so that small tensor
# operations do not slow down by orders of magnitude when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from cases import LOSSES, MODELS, MODES, make_capture

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' tensors are tiny: intra-op threads only add overhead, and on shared cores they
    contend. One torch thread (and one BLAS thread where threadpoolctl is installed)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        yield
    else:
        with threadpool_limits(1):
            yield
    torch.set_num_threads(n)


@pytest.fixture(params=list(MODELS.values()), ids=list(MODELS))
def model_case(request):
    return request.param


@pytest.fixture(params=LOSSES)
def loss(request):
    return request.param


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


@pytest.fixture
def tiny_capture(model_case, loss, mode):
    """(capture, model, x, y) of a float64 tiny problem for every model × loss × mode."""
    return make_capture(model_case, loss, mode)


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs for disk-full tests (root only); skipped with the reason elsewhere."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def fill_disk():
    """``fill_disk(path)``: write zeros to ``path`` until its file system is full (ENOSPC)."""

    def fill(path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096) > 0:
                pass
        except OSError:  # ENOSPC: the disk is full
            pass
        finally:
            os.close(fd)

    return fill
