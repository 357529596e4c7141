"""Every strategy computes what it computed when tests/data/golden_tiny.pt was written (tests/golden.py)."""
import pytest
import torch

from tests.golden import GOLDEN, compute

REFERENCE = torch.load(GOLDEN)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_strategy_numbers_match_the_golden_ones(name):
    got = compute(name)
    for key, want in REFERENCE[name].items():
        assert got[key].shape == want.shape, key
        assert torch.allclose(got[key], want, atol=1e-5, rtol=1e-5), (key, (got[key] - want).abs().max().item())
