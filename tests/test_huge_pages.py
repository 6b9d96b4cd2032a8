"""fisherlab asks torch's CPU allocator for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``,
read by torch at its first large allocation) when it is imported, and never overrides the user's
own setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import os, {first}, {second}; print(os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'))"


@pytest.mark.parametrize(
    "order,preset,expected",
    [
        (("fisherlab", "torch"), None, "1"),
        (("fisherlab", "torch"), "0", "0"),  # the user's opt-out stays
        (("torch", "fisherlab"), None, "1"),  # torch has not allocated yet: still in time
    ],
    ids=["fisherlab-first", "user-opt-out", "torch-first"],
)
def test_huge_pages_requested_unless_the_user_says_otherwise(order, preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = PROBE.format(first=order[0], second=order[1])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected
