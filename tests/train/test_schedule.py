import pytest
import torch
from transformers import get_scheduler

from edgetune.train.schedule import make_scheduler, move_to, restore_scheduler


def optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def rates(scheduler, opt, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize(
    ("kind", "name", "warmup"),
    [
        ("linear", "linear", 0),
        ("linear", "linear", 3),
        ("cosine", "cosine", 2),
        ("constant", "constant", 0),
        ("constant", "constant_with_warmup", 4),
    ],
)
def test_the_schedule_is_transformers_own(kind, name, warmup):
    mine, theirs = optimizer(), optimizer()
    ours = rates(make_scheduler(mine, kind, warmup_steps=warmup, total_steps=10), mine, 10)
    reference = rates(get_scheduler(name, theirs, num_warmup_steps=warmup, num_training_steps=10), theirs, 10)
    assert ours == pytest.approx(reference, rel=1e-12)


def test_a_schedule_made_part_way_runs_at_the_rate_of_that_step():
    opt = optimizer(2.0)
    scheduler = make_scheduler(opt, "linear", warmup_steps=0, total_steps=10, at_step=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 6 / 10) == scheduler.get_last_lr()[0]
    assert rates(scheduler, opt, 2) == pytest.approx([1.2, 1.0])


def test_a_restored_schedule_continues_over_a_longer_run():
    opt = optimizer()
    scheduler = make_scheduler(opt, "linear", warmup_steps=0, total_steps=10)
    rates(scheduler, opt, 5)
    state = scheduler.state_dict()
    longer = optimizer()
    resumed = make_scheduler(longer, "linear", warmup_steps=0, total_steps=20)
    restore_scheduler(resumed, state)
    assert longer.param_groups[0]["lr"] == pytest.approx(1 - 5 / 20)
    assert rates(resumed, longer, 2) == pytest.approx([1 - 5 / 20, 1 - 6 / 20])


def test_move_to_sets_every_group():
    opt = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5},
        ]
    )
    scheduler = make_scheduler(opt, "cosine", warmup_steps=0, total_steps=4)
    move_to(scheduler, 2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.25])
