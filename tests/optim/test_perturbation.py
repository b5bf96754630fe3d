"""The zeroth-order directions: exact values, moments, independence and seeding."""

import math

import pytest
import torch

from edgetune.optim import FZOO, HiZOO, MeZO, zo_sweep
from edgetune.optim.perturbation import FOURTH_MOMENT, PERTURBATIONS, default_kind, fill_, padded, scratch_bytes


def draw(kind: str, n: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    z = torch.empty(padded(n), device=device)
    words = torch.empty(max(1, scratch_bytes(kind, n) // 4), dtype=torch.int32, device=device)
    scratch = torch.empty(padded(n), dtype=torch.int32, device=device)
    fill_(z, kind, torch.Generator(device=device).manual_seed(seed), words, scratch)
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


def test_the_default_is_the_cheapest_draw_where_the_parameters_live():
    cpu, gpu = [{"params": [torch.zeros(2)]}], [{"params": [torch.zeros(2), torch.zeros(2, device="meta")]}]
    assert zo_sweep.on_cpu(cpu) and not zo_sweep.on_cpu(gpu)  # one parameter off the CPU is enough
    assert default_kind(on_cpu=True, needs_curvature=False) == "rademacher"
    assert default_kind(on_cpu=True, needs_curvature=True) == "sparse"  # E z^4 = 2 > 1: the diagonal is observable
    assert default_kind(on_cpu=False, needs_curvature=True) == default_kind(on_cpu=False, needs_curvature=False)
    assert default_kind(on_cpu=False, needs_curvature=False) == "gaussian"
    params = [torch.nn.Parameter(torch.zeros(64))]
    assert (MeZO(params).perturbation, HiZOO(params).perturbation, FZOO(params).perturbation) == (
        "rademacher",
        "sparse",
        "rademacher",
    )


@pytest.mark.gpu
@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_cuda_draws_have_the_same_moments_values_and_seeding(kind):
    """CUDA's generator is Philox, not mt19937: other values than the CPU's, the same distribution and determinism."""
    z = draw(kind, 1 << 20, device="cuda").double()
    assert z.pow(2).mean().item() == pytest.approx(1.0, abs=5e-3)
    assert z.pow(4).mean().item() == pytest.approx(FOURTH_MOMENT[kind], rel=0.02)
    if kind != "gaussian":
        assert len(z.abs().unique()) == (1 if kind == "rademacher" else 2)
    assert torch.equal(draw(kind, 1000, 3, "cuda"), draw(kind, 1000, 3, "cuda"))
    assert not torch.equal(draw(kind, 1000, 3, "cuda"), draw(kind, 1000, 4, "cuda"))
    params = [torch.nn.Parameter(torch.zeros(64, device="cuda"))]
    assert MeZO(params).perturbation == HiZOO(params).perturbation == FZOO(params).perturbation == "gaussian"
