"""The random directions of the zeroth-order optimizers: Gaussian, Rademacher, or sparse Rademacher, drawn per chunk.

Every distribution here has independent coordinates with E z = 0 and E z^2 = 1, so the two-point estimate
(l+ - l-)/(2 eps) z has the gradient as its mean whichever is used; they differ in their fourth moment
kappa = E z^4 (Gaussian 3, Rademacher 1, sparse 2), which is what HiZOO's diagonal-Hessian estimate needs
(hizoo.py derives it), and in what they cost to draw on a CPU:

- "gaussian": torch's ``normal_``, as MeZO and HiZOO release it. On CPU one fill of 134.5M fp32 values takes about
  0.9 s on one thread (mt19937 plus Box-Muller per value), more than a SmolLM2 forward, and a step draws 3-4 of them.
- "rademacher": z = +-1, one random bit per value. Bits come 32 to a word from ``random_`` on int32 (one mt19937
  draw per word); each bit is shifted into the sign position of the float 1.0 (0x3F800000), so a fill is one draw
  per 32 values and three integer passes: about 16x cheaper than ``normal_`` here (``bench/optimizers.py --sections
  speed``). FZOO's paper uses it; with z^2 = 1 it carries no diagonal curvature information (kappa - 1 = 0).
- "sparse": z in {-sqrt2, 0, 0, +sqrt2}, two bits per value (a sign bit and a keep bit). E z^2 = 1, kappa = 2: half
  the coordinates move each step, and HiZOO's diagonal estimate is defined (its variance factor 1/(kappa - 1) is 1,
  against 1/2 for the Gaussian). Torch has no fused kernel for it, so the keep bit becomes an all-ones or all-zeros
  mask by an arithmetic shift and selects the bits of sqrt2: about twice the Rademacher cost.

No torch op turns packed bits into floats directly, so the fill is written here with integer views; z is bit-exact
for a given generator state, on any machine, so seeded replay and resume stay bit-identical.
"""

import math
from typing import Literal, get_args

import torch

Perturbation = Literal["gaussian", "rademacher", "sparse"]
PERTURBATIONS: tuple[str, ...] = get_args(Perturbation)
# kappa = E z^4 of each distribution (exact): Gaussian 3; Rademacher 1; sparse (1/2) * (sqrt2)^4 = 2.
FOURTH_MOMENT: dict[str, float] = {"gaussian": 3.0, "rademacher": 1.0, "sparse": 2.0}
# Values are built 32 at a time from one int32 word, so fills cover whole multiples of 32 elements.
GROUP = 32

_SIGN = -(1 << 31)  # 0x80000000 as an int32
_ONE_BITS = 0x3F800000  # fp32 1.0
_SQRT2_BITS = int(torch.tensor(math.sqrt(2.0), dtype=torch.float32).view(torch.int32))


def default_kind(on_cpu: bool, needs_curvature: bool) -> Perturbation:
    """The cheapest distribution to draw on the CPU or off it; one with E z^4 > 1 if curvature is estimated.

    On CPU the bit-built kinds win: a Rademacher fill is about 16x cheaper than ``normal_`` (``bench/optimizers.py
    --sections speed``). On a GPU ``normal_`` is one Philox kernel per chunk and a bit-built fill six, and the sweeps
    are bound by launches, not bandwidth: on an H200 edgetune's MeZO step took 148 ms with Gaussian draws and 233 ms
    with Rademacher ones over all 134.5M bf16 parameters of SmolLM2-135M, 215 and 291 ms over LoRA r=8 on an NF4
    base (``bench/results/zo_speed_cuda.md`` and ``zo_speed_cuda_lora.md``, each measured side by side in one run:
    ``python bench/zo_speed_cuda.py [--lora]``). Both have E z z^T = I, so the expected step is the same.
    """
    if not on_cpu:
        return "gaussian"
    return "sparse" if needs_curvature else "rademacher"


def padded(numel: int) -> int:
    """Elements a buffer needs to fill ``numel`` values: rounded up to whole words of 32 values."""
    return -(-numel // GROUP) * GROUP


def scratch_bytes(kind: Perturbation, numel: int) -> int:
    """Bytes of random words a fill of ``numel`` values uses (its ``words`` argument), 0 for the Gaussian."""
    words = {"gaussian": 0, "rademacher": 1, "sparse": 2}[kind]
    return 4 * words * padded(numel) // GROUP


def fill_(
    z: torch.Tensor, kind: Perturbation, generator: torch.Generator, words: torch.Tensor, scratch: torch.Tensor
) -> None:
    """Fill the fp32 tensor ``z`` with independent draws of ``kind``.

    Args:
        z: contiguous fp32 tensor of ``padded(n)`` elements for the bit-built kinds (``n`` for the Gaussian).
        kind: the distribution.
        generator: consumed in a fixed order, so the same seed gives the same z.
        words: int32 scratch of at least ``scratch_bytes(kind, z.numel()) // 4`` elements.
        scratch: int32 scratch of ``z.numel()`` elements (the sparse kind's sign bits).
    """
    if kind == "gaussian":
        z.normal_(generator=generator)
        return
    groups = z.numel() // GROUP
    shifts = torch.arange(GROUP, dtype=torch.int32, device=z.device)
    out = z.view(torch.int32).view(groups, GROUP)
    signs = words[:groups].random_(-(1 << 31), 1 << 31, generator=generator)  # all 32 bits random
    if kind == "rademacher":
        # Bit s of a word lands in the sign position of value s: (w << (31 - s)) & 0x80000000, then | bits(1.0).
        torch.bitwise_left_shift(signs.unsqueeze(1), 31 - shifts, out=out)
        out.bitwise_and_(_SIGN).bitwise_or_(_ONE_BITS)
        return
    keeps = words[groups : 2 * groups].random_(-(1 << 31), 1 << 31, generator=generator)
    sign = scratch[: z.numel()].view(groups, GROUP)
    torch.bitwise_left_shift(signs.unsqueeze(1), 31 - shifts, out=sign).bitwise_and_(_SIGN)
    # (w << (31 - s)) >> 31 is all ones when bit s is set (arithmetic shift), else 0: it selects sqrt2's bits.
    torch.bitwise_left_shift(keeps.unsqueeze(1), 31 - shifts, out=out)
    out.bitwise_right_shift_(31).bitwise_and_(_SQRT2_BITS).bitwise_or_(sign)
