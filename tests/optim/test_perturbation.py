"""The zeroth-order directions: exact values, moments, independence and seeding."""

import math

import pytest
import torch

from edgetune.optim.perturbation import FOURTH_MOMENT, PERTURBATIONS, fill_, padded, scratch_bytes


def draw(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    z = torch.empty(padded(n))
    words = torch.empty(max(1, scratch_bytes(kind, n) // 4), dtype=torch.int32)
    fill_(z, kind, torch.Generator().manual_seed(seed), words, torch.empty(padded(n), dtype=torch.int32))
    return z[:n]


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_moments_match_the_fourth_moment_table(kind):
    z = draw(kind, 1 << 20).double()
    assert abs(z.mean().item()) < 5e-3
    assert z.pow(2).mean().item() == pytest.approx(1.0, abs=5e-3)
    assert z.pow(4).mean().item() == pytest.approx(FOURTH_MOMENT[kind], rel=0.02)


def test_bit_built_values_are_exact():
    rademacher, sparse = draw("rademacher", 10_000), draw("sparse", 10_000)
    assert set(rademacher.unique().tolist()) == {-1.0, 1.0}
    root2 = torch.tensor(math.sqrt(2.0)).item()
    assert set(sparse.abs().unique().tolist()) == {0.0, root2}
    assert (sparse == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (sparse > 0).float().mean().item() == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize("kind", ["rademacher", "sparse"])
def test_every_bit_position_is_used_and_neighbours_are_uncorrelated(kind):
    """Value s of each group of 32 comes from bit s of a word: each position must be a fair, independent coin."""
    z = draw(kind, 32 * 20_000).view(-1, 32).double()
    positions = (z > 0).double().mean(dim=0)
    assert ((positions - 0.25 * (kind == "sparse") - 0.5 * (kind == "rademacher")).abs() < 0.02).all(), positions
    correlation = (z[:, :-1] * z[:, 1:]).mean(dim=0)
    assert correlation.abs().max().item() < 0.05  # a shift bug would copy one bit into two positions


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_same_seed_same_z_other_seed_other_z(kind):
    assert torch.equal(draw(kind, 1000, 3), draw(kind, 1000, 3))
    assert not torch.equal(draw(kind, 1000, 3), draw(kind, 1000, 4))
