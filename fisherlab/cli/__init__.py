"""The ``fisherlab`` command line (:mod:`fisherlab.cli.main`): argparse lives in this package only.

Errors that fisherlab raises on purpose (:class:`fisherlab.errors.FisherlabError`) print as one
line, ``fisherlab: error: …``, exit status 2; any other exception shows its traceback
(``fisherlab --traceback …`` shows it always).
"""

from .main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
