import json

import pytest
from conftest import tiny_llama_config

from edgetune import api
from edgetune.errors import EdgetuneError
from edgetune.plan.budget import MIN_MARGIN_BYTES, Budget, levers, parse_bytes, size, total_bytes
from edgetune.plan.components import RunShape
from edgetune.plan.decide import recommend
from edgetune.plan.inventory import inspect_config
from edgetune.plan.strategies import LADDER, STRATEGIES

GIB = 1024**3


@pytest.fixture(scope="module")
def spec():
    return inspect_config(tiny_llama_config(vocab_size=4096, num_hidden_layers=4).to_dict())


def cuda(free):
    return Budget(free, free, "cuda", "test", 600 * 1024**2)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("6GiB", 6 * GIB),
        ("6 GiB", 6 * GIB),
        ("8GB", 8 * 10**9),
        ("7.5G", 7_500_000_000),
        ("6000MiB", 6000 * 2**20),
        ("512mb", 512 * 10**6),
        ("1TiB", 2**40),
        ("123", 123),
    ],
)
def test_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "six GiB", "6 parsecs", "-1GiB", "0GiB", "1.2.3G"])
def test_sizes_that_do_not_parse_are_one_line_errors(text):
    with pytest.raises(EdgetuneError, match="is not a memory size; write it like 6GiB"):
        parse_bytes(text)


def test_the_safety_margin_is_300_mib_or_3_percent():
    assert Budget(GIB, GIB, "cuda", "t").margin_bytes == MIN_MARGIN_BYTES
    assert Budget(24 * GIB, 24 * GIB, "cuda", "t").margin_bytes == round(0.03 * 24 * GIB)


def test_the_ladder_picks_the_first_rung_that_fits(spec):
    run = RunShape(8, 512, 16)
    totals = {name: total_bytes(spec, STRATEGIES[name], run, cuda(100 * GIB)) for name in LADDER}
    assert totals["adafish-lora"] > totals["adafish-lora-gc"] > totals[LADDER[-1]]
    for name in LADDER:
        # Just enough usable memory for this rung (plus margin), not for the rungs above it.
        budget = cuda(totals[name] + MIN_MARGIN_BYTES)
        plans = {n: size(spec, STRATEGIES[n], run, budget) for n in STRATEGIES}
        expected = next(n for n in LADDER if plans[n].fits)
        assert recommend(plans) == expected
        assert all(not plans[higher].fits for higher in LADDER[: LADDER.index(expected)])
    assert recommend({n: size(spec, STRATEGIES[n], run, cuda(MIN_MARGIN_BYTES)) for n in STRATEGIES}) is None


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_inverse_answers_agree_with_the_forward_model(spec, name):
    strategy, run = STRATEGIES[name], RunShape(4, 256, 16)
    budget = cuda(total_bytes(spec, strategy, run, cuda(GIB)) + MIN_MARGIN_BYTES + 50 * 2**20)
    plan = size(spec, strategy, run, budget)
    longest, largest = plan.max_seq_len_at_batch_1, plan.max_batch_at_seq_len
    assert total_bytes(spec, strategy, RunShape(1, longest, 16), budget) <= budget.usable_bytes
    if longest < spec.max_positions:
        assert total_bytes(spec, strategy, RunShape(1, longest + 1, 16), budget) > budget.usable_bytes
    assert largest >= 4
    assert total_bytes(spec, strategy, RunShape(largest, 256, 16), budget) <= budget.usable_bytes
    assert total_bytes(spec, strategy, RunShape(largest + 1, 256, 16), budget) > budget.usable_bytes


def test_when_nothing_fits_the_levers_say_what_each_saves(spec):
    run = RunShape(8, 512, 16)
    budget = cuda(total_bytes(spec, STRATEGIES[LADDER[-1]], run, cuda(GIB)) + MIN_MARGIN_BYTES - 2**20)
    found = levers(spec, run, budget)
    assert [lv.saves_bytes for lv in found] == sorted((lv.saves_bytes for lv in found), reverse=True)
    changes = {lv.change.split(" (")[0].split(" to ")[0] for lv in found}
    assert {"halve the sequence", "batch size 1", "LoRA rank 8"} <= changes
    assert any(lv.fits_after for lv in found)
    halved = total_bytes(spec, STRATEGIES[LADDER[-1]], RunShape(8, 256, 16), budget)
    base = total_bytes(spec, STRATEGIES[LADDER[-1]], run, budget)
    assert next(lv for lv in found if lv.change.startswith("halve")).saves_bytes == base - halved


def write_config(tmp_path, **overrides):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_llama_config(**overrides).to_dict()))
    return str(path)


def test_plan_from_a_config_with_a_profile(tmp_path):
    result = api.plan(write_config(tmp_path), profile="jetson-orin-nano-8gb", batch_size=2, seq_len=64)
    assert result.budget.kind == "unified" and result.budget.free_bytes == 8 * GIB
    assert result.recommended == "adafish-lora" and set(result.plans) == set(STRATEGIES)
    assert json.loads(json.dumps(result.to_dict()))["recommended"] == "adafish-lora"


def test_plan_on_the_live_device_names_its_source(tmp_path):
    result = api.plan(write_config(tmp_path), batch_size=1, seq_len=32)
    assert "psutil" in result.budget.source or "nvml" in result.budget.source


def test_a_sequence_beyond_the_model_positions_warns_and_plans(tmp_path):
    result = api.plan(write_config(tmp_path), budget="8GiB", seq_len=1024)
    assert result.warnings and "exceeds the model's 256 positions" in result.warnings[0]
    assert result.plans


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"lora_rank": -1}, "lora_rank must be a positive integer"),
        ({"profile": "rtx-9090"}, "rtx-9090"),
        ({"budget": "lots"}, "is not a memory size"),
        ({"strategies": ("sgd",)}, "unknown strategy 'sgd'"),
    ],
)
def test_bad_plan_input_is_a_one_line_error(tmp_path, kwargs, message):
    with pytest.raises(EdgetuneError, match=message):
        api.plan(write_config(tmp_path), **kwargs)


def test_a_config_without_the_needed_fields_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 60, "num_attention_heads": 7}))
    with pytest.raises(EdgetuneError, match="does not describe a causal LM"):
        api.plan(str(path), budget="8GiB")
