"""Issue 12 item 3: HTML displays of captures and spectra (tables have theirs, tests/test_display.py),
short plain reprs, and the notebook progress bar when ipywidgets is there."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

import fisherlab
from fisherlab.io import progress
from fisherlab.spectra import Spectrum


@pytest.fixture(scope="module")
def cap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 3), torch.randint(0, 3, (6,))
    return fisherlab.capture(model, x, y, loss="cross_entropy", fisher="empirical", device="cpu")


def test_capture_html_lists_the_layers_not_the_tensors(cap):
    h = cap._repr_html_()
    assert h.startswith("<table><caption>&lt;Capture") and h.count("<tr>") == 1 + len(cap.layers)
    assert "<td>0</td>" in h and "a [6, 1, 4]" in h and "tensor(" not in h


def test_spectrum_html_and_repr():
    spec = Spectrum("fisher", "dense", np.array([0.1, 1.0, 3.0]), np.ones(3), 0.1, 31, 30.0)
    h = spec._repr_html_()
    assert h.count("<tr>") == 2 and "<th>condition number</th>" in h and "<td>fisher</td>" in h
    assert "\n" not in repr(spec) and len(repr(spec)) < 200


def test_notebook_progress_bars_when_ipywidgets_is_installed():
    if importlib.util.find_spec("ipywidgets") is None:
        pytest.skip("ipywidgets (the dev extra) is not installed")
    from tqdm.auto import tqdm as auto

    progress._tqdm_class.cache_clear()
    try:
        assert progress._tqdm_class() is auto  # the widget bar inside a kernel, text elsewhere
    finally:
        progress._tqdm_class.cache_clear()
