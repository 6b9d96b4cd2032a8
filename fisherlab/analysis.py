"""The batch drivers, under their first public name: :mod:`fisherlab.workflows.analysis`.

``from fisherlab import analysis`` keeps working (the README named it); new code imports
``fisherlab.workflows.analysis``. The drivers' command-line options live in
:mod:`fisherlab.cli.analyze_cmd`.
"""

from .workflows.analysis import (
    MAX_VALUES_PER_CSV,
    run_damping_sweep,
    run_error_reduction,
    run_interactions,
    run_spectra,
)

__all__ = ["MAX_VALUES_PER_CSV", "run_error_reduction", "run_spectra", "run_interactions", "run_damping_sweep"]
