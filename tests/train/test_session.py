import dataclasses
import json

import pytest
import torch

from edgetune import api
from edgetune.errors import EdgetuneError
from edgetune.plan.strategies import LADDER
from edgetune.train.checkpoint import load_latest_checkpoint
from edgetune.train.session import MemoryBudgetExceeded, is_out_of_memory


def config(model_dir, run_dir, *extra):
    return api.train_config(
        None,
        [
            f"model.name={model_dir}",
            "data.seq_len=32",
            "train.batch_size=4",
            "train.steps=4",
            "train.eval_batches=1",
            "train.device=cpu",
            f"output.dir={run_dir}",
            "output.checkpoint_every=2",
            *extra,
        ],
    )


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryBudgetExceeded("over"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_over_budget_halves_the_batch_then_moves_down_the_ladder_without_losing_steps(tiny_trainable_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = api.train(
        config(tiny_trainable_dir, run_dir, "train.strategy=adafish-lora", "train.budget=900KiB", "train.force=true")
    )
    assert result.status == "finished" and result.steps_done == 4
    shapes = [a for a in result.adaptations if "micro_batch" in a]
    # The effective batch (micro-batch x accumulation) stays 4 while the micro-batch halves.
    assert [(a["micro_batch"], a["accumulation"]) for a in shapes] == [(2, 2), (1, 4)]
    moves = [a["strategy"] for a in result.adaptations if "strategy" in a]
    assert moves and moves[0] == "adafish-lora-gc" and result.strategy == moves[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["adaptations"] == result.adaptations
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert len(events) == len(result.adaptations) and all(e["event"] == "out_of_memory" for e in events)
    identity = json.loads((run_dir / "run.json").read_text())["identity"]
    saved = load_latest_checkpoint(run_dir, identity)
    assert saved.state["session"]["adaptations"] == result.adaptations
    assert saved.state["session"]["strategy"] == result.strategy


def test_a_resumed_run_keeps_its_shrunken_shape(tiny_trainable_dir, tmp_path):
    run_dir = tmp_path / "run"
    api.train(
        config(tiny_trainable_dir, run_dir, "train.strategy=adafish-lora", "train.budget=900KiB", "train.force=true")
    )
    resumed = api.train(api.train_config(resume=str(run_dir), overrides=["train.steps=6"]), resume=True)
    assert resumed.steps_done == 6 and resumed.strategy != "adafish-lora"


def test_when_nothing_can_shrink_the_run_stops_with_the_fix(tiny_trainable_dir, tmp_path):
    run_dir = tmp_path / "run"
    # The fallback ends on the ladder's leanest rung, whichever forward-only optimizer the benchmark put there.
    with pytest.raises(EdgetuneError, match=f"out of memory at step 1 with micro-batch 1 on {LADDER[-1]}"):
        api.train(
            config(
                tiny_trainable_dir,
                run_dir,
                "train.strategy=hizoo-qlora",
                "train.batch_size=1",
                "train.budget=1KiB",
                "train.force=true",
            )
        )


def test_a_move_down_the_ladder_keeps_the_schedule_where_it_was(tiny_trainable_dir, tmp_path):
    """After an out-of-memory move the next step runs at the decayed rate of its step, not the initial one."""
    from edgetune.plan.sources import resolve_model
    from edgetune.plan.strategies import STRATEGIES
    from edgetune.train.session import build_session, shrink

    cfg = config(tiny_trainable_dir, tmp_path / "run", "train.steps=10", "lora.rank=4")
    source = resolve_model(str(tiny_trainable_dir))
    # A rate unlike the next rung's default, so the test tells "the new rung's own rate" from "the old rate".
    default = STRATEGIES["scaled-adamw-qlora-gc"].default_lr
    adafish = dataclasses.replace(STRATEGIES["adafish-lora-gc"], default_lr=3 * default)
    session = build_session(cfg, source, adafish, torch.device("cpu"), micro_batch=1, accumulation=4, total_steps=10)
    for _ in range(4):
        session.optimizer.step()
        session.scheduler.step()
    assert session.optimizer.param_groups[0]["lr"] == pytest.approx(3 * default * 6 / 10)
    moved = shrink(session, cfg, source, torch.device("cpu"), 5, "test", 10)
    assert moved.strategy.name == "scaled-adamw-qlora-gc"
    # scaled-adamw's own default rate, decayed to step 4 of 10 as the run was.
    rates = [g["lr"] for g in moved.optimizer.param_groups]
    assert rates == pytest.approx([default * 6 / 10] * len(rates))
    assert moved.scheduler.last_epoch == 4


@pytest.mark.parametrize(
    ("strategy", "scheduler", "rate_at_step_4"),
    [
        ("fzoo-qlora", None, 1.0),  # forward-only: a constant rate unless the config names a schedule
        ("hizoo-qlora", None, 1.0),
        ("adafish-lora", None, 0.6),  # backprop: linear decay to 0 over the 10 steps
        ("hizoo-qlora", "linear", 0.6),
        ("adafish-lora", "constant", 1.0),
    ],
)
def test_the_default_schedule_depends_on_whether_the_strategy_backpropagates(
    tiny_trainable_dir, tmp_path, strategy, scheduler, rate_at_step_4
):
    from edgetune.plan.sources import resolve_model
    from edgetune.plan.strategies import STRATEGIES
    from edgetune.train.schedule import move_to
    from edgetune.train.session import build_session

    chosen = [] if scheduler is None else [f"train.scheduler={scheduler}"]
    cfg = config(tiny_trainable_dir, tmp_path / "run", "train.steps=10", "lora.rank=4", *chosen)
    assert cfg.train.scheduler == scheduler
    chosen_strategy = STRATEGIES[strategy]
    source = resolve_model(str(tiny_trainable_dir))
    session = build_session(
        cfg, source, chosen_strategy, torch.device("cpu"), micro_batch=1, accumulation=1, total_steps=10
    )
    move_to(session.scheduler, 4)
    rates = [g["lr"] for g in session.optimizer.param_groups]
    assert rates == pytest.approx([chosen_strategy.default_lr * rate_at_step_4] * len(rates))
