"""Experiments built on fisherlab, one subpackage each (the top floor: nothing in the library
imports them).

* :mod:`fisherlab.experiments.paper` — the small-scale reproduction of the paper's §4 (Figs. 2,
  4(a), 5) with numeric verdicts; its script is ``analysis/reproduce_paper.py``.
"""
