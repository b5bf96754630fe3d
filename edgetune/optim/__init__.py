"""edgetune's optimizers: one algorithm per file, each a ``torch.optim.Optimizer``."""

from edgetune.optim.adafish import AdaFish
from edgetune.optim.fzoo import FZOO
from edgetune.optim.hizoo import HiZOO, MeZO
from edgetune.optim.scaled_adamw import ScaledAdamW

__all__: list[str] = ["FZOO", "AdaFish", "HiZOO", "MeZO", "ScaledAdamW"]
