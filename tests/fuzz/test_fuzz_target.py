"""The atheris fuzz target stays runnable: its check passes on the seed inputs, without atheris."""

import pytest

from fuzz.fuzz_policy import SEEDS, check


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzz_target_seeds(seed):
    """The fuzz invariants hold for each seed input (the starting corpus of a fuzzing run)."""
    check(seed)
