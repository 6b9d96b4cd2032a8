"""Workflows on top of the library: captures from training checkpoints, the analysis drivers, the demo.

* :mod:`fisherlab.workflows.checkpoints`: :func:`capture_checkpoints` (``state_dict`` files → HDF5);
* :mod:`fisherlab.workflows.analysis`: :func:`run_error_reduction`, :func:`run_spectra`,
  :func:`run_interactions`, :func:`run_damping_sweep` (capture file → CSV files and figures);
* :mod:`fisherlab.workflows.demo`: :func:`run_demo` (train → capture → compare → report).

The submodules are imported on use (``from fisherlab.workflows import analysis``): the analysis
drivers load matplotlib, which a capture does not need.
"""

__all__ = ["analysis", "checkpoints", "demo"]
