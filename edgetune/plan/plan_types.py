"""The planner's value types: the run shape it sizes, one row of a plan, and a strategy's estimate."""

from dataclasses import dataclass, field

from edgetune.errors import EdgetuneError
from edgetune.plan.strategies import DEFAULT_LORA_TARGETS


@dataclass(frozen=True)
class RunShape:
    """The shape of a training run that memory depends on."""

    batch_size: int = 4
    seq_len: int = 256
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS)

    def __post_init__(self) -> None:
        for name, most in (("batch_size", 2**20), ("seq_len", 2**24), ("lora_rank", 2**16)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise EdgetuneError(f"{name} must be a positive integer, got {value!r}", f"pass a {name} >= 1")
            if value > most:
                raise EdgetuneError(f"{name}={value:,} is beyond any run edgetune plans", f"pass a {name} <= {most:,}")

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class Component:
    """One row of a plan: bytes, whether the figure is exact, and what it counts."""

    name: str
    bytes: int
    exact: bool
    note: str


@dataclass(frozen=True)
class Estimate:
    """A strategy's planned memory: resident components, the peaking phase, and the total."""

    strategy: str
    components: tuple[Component, ...]
    peak_phase: str
    peak_bytes: int

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)
