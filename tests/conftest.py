import os

# Before torch loads: idle OpenMP threads sleep instead of spinning, so that small tensor
# operations do not slow down by orders of magnitude when the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings

from cases import LOSSES, MODELS, MODES, make_capture

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
