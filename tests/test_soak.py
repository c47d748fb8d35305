"""A short soak (bench/soak.py): resident memory stays flat once every cache is full.

The full soak is a million requests (``python3 bench/soak.py``, about half an hour); CI runs
30,000 with small cache bounds so that the bounds are reached early in the run.
"""

import os
import subprocess
import sys

import pytest
from lab.knot import require_knot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.soak
@pytest.mark.knot
def test_resident_memory_is_flat_after_caches_fill():
    """30,000 requests, each a new message, sender and client: RSS grows < 10 % after the
    plateau."""
    require_knot()
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "soak.py"), "--requests", "30000",
         "--small-caches", "--seconds", "240", "--max-growth", "0.10"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"answered": 30000' in result.stdout
