import dataclasses
from pathlib import Path

import pytest
import yaml

from edgetune.errors import EdgetuneError
from edgetune.plan.strategies import STRATEGIES
from edgetune.train.config import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEQ_LEN,
    DEFAULT_STEPS,
    LoraSection,
    ModelSection,
    OutputSection,
    TrainConfig,
    TrainSection,
    describe_fields,
)
from edgetune.train.config_file import load_config
from edgetune.train.data import DataConfig
from edgetune.train.loading import DEFAULT_LORA_TARGETS, LoraSettings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
    return path


def flat_keys(config):
    return [f"{section}.{key}" for section, values in config.to_dict().items() for key in values]


# ---- defaults and round trip ----


def test_defaults_are_valid_and_small():
    cfg = load_config(None, [])
    assert cfg == TrainConfig()
    assert (cfg.model.name, cfg.data.seq_len, cfg.data.path) == ("smollm2-135m", DEFAULT_SEQ_LEN, None)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.grad_accumulation) == (
        DEFAULT_STEPS,
        DEFAULT_BATCH_SIZE,
        1,
    )
    assert cfg.train.strategy is None and cfg.train.lr is None and cfg.train.device == "auto"
    assert cfg.lora.targets == DEFAULT_LORA_TARGETS
    assert cfg.lora.to_settings() == LoraSettings()
    assert (cfg.output.dir, cfg.output.checkpoint_every, cfg.output.keep_checkpoints) == ("runs/edgetune", 20, 2)


def custom_config():
    return TrainConfig(
        model=ModelSection(name="1e5"),  # a string that YAML would otherwise read as a float
        data=DataConfig(path="data/my file: #1.jsonl", seq_len=512, val_fraction=0.25, seed=3, text_column="yes"),
        lora=LoraSection(rank=8, alpha=16, dropout=0.05, targets=["q_proj", "v_proj"]),
        train=TrainSection(
            strategy="scaled-adamw-qlora-gc",
            lr=1e-6,
            steps=7,
            batch_size=2,
            grad_accumulation=3,
            eval_every=5,
            eval_batches=4,
            seed=11,
            device="cuda",
            max_nonfinite=1,
            budget="7.5 GB",
            force=True,
        ),
        output=OutputSection(dir="out\tdir\nnext", checkpoint_every=3, keep_checkpoints=1, overwrite=True),
    )


@pytest.mark.parametrize("cfg", [TrainConfig(), custom_config()], ids=["defaults", "custom"])
def test_yaml_round_trips_exactly(tmp_path, cfg):
    text = cfg.to_yaml()
    assert text.splitlines()[0] == "# edgetune train this.yaml"
    assert load_config(write(tmp_path, text), []) == cfg
    # The file is the dataclass: a plain YAML reader sees exactly to_dict(), one line per key plus section headers.
    assert yaml.safe_load(text) == cfg.to_dict()
    assert len(text.splitlines()) == 2 + len(cfg.to_dict()) + len(flat_keys(cfg))


def test_python_construction_normalises_types():
    lora = LoraSection(alpha=16, targets=["q_proj"])
    assert lora.alpha == 16.0 and isinstance(lora.alpha, float) and lora.targets == ("q_proj",)
    assert custom_config().to_dict()["lora"]["targets"] == ["q_proj", "v_proj"]
    assert TrainSection(budget="6GiB").budget_bytes == 6 * 2**30 and TrainSection().budget_bytes is None


# ---- reading files and overrides ----


def test_partial_file_keeps_the_other_defaults(tmp_path):
    path = write(tmp_path, "data:\n  path: x.txt\nlora:\ntrain:\n  lr: 3e-4\n  steps: 10\n")
    cfg = load_config(path, [])
    assert cfg.data == DataConfig(path="x.txt", seq_len=DEFAULT_SEQ_LEN)  # not DataConfig's own 256
    assert cfg.train == TrainSection(lr=3e-4, steps=10) and cfg.lora == LoraSection()
    assert load_config(write(tmp_path, "", "empty.yaml"), []) == TrainConfig()


@pytest.mark.parametrize(
    ("override", "section", "key", "value"),
    [
        ("train.lr=3e-4", "train", "lr", 3e-4),
        ("train.lr=1", "train", "lr", 1.0),
        ("train.steps=10", "train", "steps", 10),
        ("lora.alpha=16", "lora", "alpha", 16.0),
        ("lora.targets=[q_proj,v_proj]", "lora", "targets", ("q_proj", "v_proj")),
        ("lora.targets=q_proj, v_proj", "lora", "targets", ("q_proj", "v_proj")),
        ("lora.targets=o_proj", "lora", "targets", ("o_proj",)),
        ("train.strategy=hizoo-qlora", "train", "strategy", "hizoo-qlora"),
        ("train.budget=6GiB", "train", "budget", "6GiB"),
        ("train.force=true", "train", "force", True),
        ("output.overwrite=false", "output", "overwrite", False),
        ("train.eval_batches=null", "train", "eval_batches", None),
        ("model.name=1e3", "model", "name", "1e3"),
        ("data.path=2024", "data", "path", "2024"),
        ("data.path=null", "data", "path", None),
        ("data.text_column='null'", "data", "text_column", "null"),
        ("train.device=cpu", "train", "device", "cpu"),
    ],
)
def test_override_values(tmp_path, override, section, key, value):
    path = write(tmp_path, "train:\n  eval_batches: 3\n  lr: 0.5\ndata:\n  path: a.txt\n")
    got = getattr(getattr(load_config(path, [override]), section), key)
    assert got == value and type(got) is type(value)


def test_later_overrides_win_and_null_clears_the_file(tmp_path):
    path = write(tmp_path, "train:\n  strategy: hizoo-qlora\n  lr: 0.01\n  steps: 5\n")
    cfg = load_config(path, ["train.steps=6", "train.strategy=null", "train.steps=8", "train.lr=null"])
    assert (cfg.train.steps, cfg.train.strategy, cfg.train.lr) == (8, None, None)


def test_strategy_change_through_replace_is_validated():
    cfg = TrainConfig(train=TrainSection(grad_accumulation=2))
    with pytest.raises(EdgetuneError, match="forward-only"):
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, strategy="mezo-qlora"))
    assert dataclasses.replace(cfg.train, strategy="adafish-lora").strategy == "adafish-lora"


# ---- bad input: one line, names the problem (and value), carries the fix ----

BAD = [
    # (file text or None, overrides, words in the problem, words in the fix)
    ("train: [1, 2\n", [], ["not valid YAML", "line"], ["syntax"]),
    ("train:\n  lr: 1\n lora: 2\n", [], ["not valid YAML"], ["indented"]),
    ("- train\n- lora\n", [], ["['train', 'lora'] (list)", "not a mapping"], ["train:"]),
    ("just words\n", [], ["'just words' (str)", "not a mapping"], ["valid sections"]),
    ("trian:\n  steps: 3\n", [], ["unknown key trian"], ["did you mean train?", "model, data, lora"]),
    ("train:\n  step: 3\n", [], ["unknown key train.step"], ["did you mean train.steps?", "batch_size"]),
    ("train:\n  learning_rate: 3\n", [], ["unknown key train.learning_rate"], ["valid keys in train:", "lr"]),
    ("lora:\n  target: [q_proj]\n", [], ["unknown key lora.target"], ["did you mean lora.targets?"]),
    ("train: 5\n", [], ["section train", "5 (int)", "not a mapping"], ["indent its keys below `train:`"]),
    ("train:\n  steps: '60'\n", [], ["train.steps must be an integer", "'60' (str)"], ["without quotes"]),
    ("train:\n  steps: 6.5\n", [], ["train.steps must be an integer", "6.5 (float)"], ["set train.steps to"]),
    ("train:\n  batch_size: true\n", [], ["train.batch_size must be an integer", "True (bool)"], ["an integer"]),
    ("train:\n  lr: true\n", [], ["train.lr must be a number", "True (bool)"], ["set train.lr to a number"]),
    (None, ["train.lr=fast"], ["train.lr must be a number", "'fast' (str)"], ["without quotes"]),
    (None, ["train.lr=.nan"], ["train.lr=nan is not a finite number"], ["1e-4"]),
    (None, ["train.lr=0"], ["train.lr=0.0 is not positive"], ["1e-4", "null"]),
    (None, ["train.lr=-3e-4"], ["train.lr=-0.0003 is not positive"], ["learning rate"]),
    (None, ["train.steps=0"], ["train.steps=0 is below 1"], ["set train.steps to an integer >= 1"]),
    (None, ["train.batch_size=-2"], ["train.batch_size=-2"], ["train.batch_size to an integer >= 1"]),
    (None, ["train.grad_accumulation=0"], ["train.grad_accumulation=0"], [">= 1"]),
    (None, ["train.eval_every=0"], ["train.eval_every=0"], [">= 1"]),
    (None, ["train.eval_batches=0"], ["train.eval_batches=0"], [">= 1"]),
    (None, ["train.max_nonfinite=0"], ["train.max_nonfinite=0"], [">= 1"]),
    (None, ["output.checkpoint_every=0"], ["output.checkpoint_every=0"], [">= 1"]),
    (None, ["output.keep_checkpoints=0"], ["output.keep_checkpoints=0"], [">= 1"]),
    (None, ["output.dir="], ["output.dir is empty"], ["runs/edgetune"]),
    (None, ["train.strategy=hizo-qlora"], ["unknown strategy", "'hizo-qlora'"], ["did you mean hizoo-qlora?", "null"]),
    (None, ["train.strategy=zzz"], ["unknown strategy", "'zzz'"], [", ".join(STRATEGIES)]),
    (None, ["lora.rank=0"], ["rank", "0"], ["8, 16 or 32"]),
    (None, ["lora.dropout=1.0"], ["dropout", "1.0"], ["0.0 to 0.1"]),
    (None, ["lora.targets=[q_proj, '']"], ["lora.targets", "empty name"], ["q_proj, v_proj"]),
    (None, ["lora.targets=[1, 2]"], ["lora.targets must be a list of names", "[1, 2] (list)"], ["set lora.targets"]),
    (None, ["train.budget=lots"], ["'lots' is not a memory size"], ["6GiB"]),
    (None, ["train.device=gpu"], ["train.device='gpu' (str) is not allowed"], ["cpu, cuda, auto"]),
    (None, ["train.device=cude"], ["train.device='cude'"], ["did you mean cuda?"]),
    (None, ["train.force=maybe"], ["train.force must be true or false", "'maybe'"], ["true or false"]),
    (None, ["model.name=null"], ["model.name must be a string", "null"], ["set model.name to a string"]),
    (None, ["data.seq_len=1"], ["seq_len=1"], ["integer >= 2"]),
    (None, ["data.val_fraction=1.5"], ["val_fraction=1.5"], ["between 0 and 1"]),
    (
        None,
        ["train.strategy=hizoo-qlora", "train.grad_accumulation=4"],
        ["grad_accumulation=4", "hizoo-qlora"],
        ["train.grad_accumulation=1", "batch_size"],
    ),
    (None, ["train.steps"], ["override 'train.steps' has no '='"], ["section.key=value", "train.lr=3e-4"]),
    (None, ["trian.steps=3"], ["unknown key trian", "override 'trian.steps=3'"], ["did you mean train?"]),
    (None, ["train.stpes=3"], ["unknown key train.stpes"], ["did you mean train.steps?"]),
    (None, ["train=3"], ["override key 'train' is not section.key"], ["train.<key>=value"]),
    (None, ["train.lr.max=3"], ["'train.lr.max' is not section.key"], ["one key at a time"]),
]


@pytest.mark.parametrize(("text", "overrides", "problem_words", "fix_words"), BAD)
def test_bad_input_is_one_line_with_problem_and_fix(tmp_path, text, overrides, problem_words, fix_words):
    path = write(tmp_path, text) if text is not None else None
    with pytest.raises(EdgetuneError) as caught:
        load_config(path, overrides)
    err = caught.value
    assert "\n" not in str(err)
    for word in problem_words:
        assert word in err.problem, (word, err.problem)
    for word in fix_words:
        assert word in err.fix, (word, err.fix)


def test_file_problems(tmp_path):
    cases = [
        (tmp_path / "missing.yaml", "does not exist", "--print-config"),
        (tmp_path, "cannot read config file", "readable UTF-8"),
        (write(tmp_path, b"train:\n  steps: \xff\n"), "cannot read config file", "readable UTF-8"),
    ]
    for path, problem, fix in cases:
        with pytest.raises(EdgetuneError) as caught:
            load_config(path, [])
        assert problem in caught.value.problem and str(path) in caught.value.problem
        assert fix in caught.value.fix and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "build",
    [
        lambda: TrainSection(steps="5"),
        lambda: TrainSection(lr=float("inf")),
        lambda: LoraSection(targets=("q_proj", 3)),
        lambda: OutputSection(overwrite=1),
        lambda: TrainConfig(train={"steps": 5}),
    ],
)
def test_python_construction_is_checked_too(build):
    with pytest.raises(EdgetuneError) as caught:
        build()
    assert caught.value.fix and "\n" not in str(caught.value)


# ---- help text and the shipped examples ----


def test_describe_fields_covers_every_field():
    rows = describe_fields()
    assert [key for key, _, _ in rows] == flat_keys(TrainConfig())
    for key, type_name, help_text in rows:
        assert type_name and help_text and "\n" not in help_text, key
    types = {key: type_name for key, type_name, _ in rows}
    assert types["train.lr"] == "float | null" and types["lora.targets"] == "list[str]"
    assert types["train.device"] == "cpu | cuda | auto" and types["train.force"] == "bool"
    assert types["data.seq_len"] == "int" and types["data.path"] == "str | null"
    assert len({help_text for _, _, help_text in rows}) == len(rows)


@pytest.mark.parametrize(
    ("name", "strategy"),
    [
        ("smollm2-qlora", "scaled-adamw-qlora-gc"),
        ("smollm2-hizoo", "hizoo-qlora"),
        ("smollm2-alpaca", None),
        ("smollm2-chat", None),
    ],
)
def test_example_configs_load_and_are_generated(name, strategy):
    relative = f"examples/configs/{name}.yaml"
    text = (EXAMPLES / f"{name}.yaml").read_text(encoding="utf-8")
    cfg = load_config(EXAMPLES / f"{name}.yaml", [])
    assert cfg.train.strategy == strategy and cfg.model.name == "smollm2-135m"
    assert text.splitlines()[0] == f"# edgetune train {relative}"
    assert text == cfg.to_yaml(relative), "regenerate the example with TrainConfig.to_yaml"


@pytest.mark.default_model
@pytest.mark.parametrize("name", ["smollm2-alpaca", "smollm2-chat"])
def test_the_instruction_and_chat_examples_load_their_data_as_written(name, monkeypatch):
    from edgetune.plan.sources import resolve_model
    from edgetune.train.data import load_dataset
    from edgetune.train.loading import load_tokenizer

    monkeypatch.chdir(EXAMPLES.parents[1])  # the README runs them from the repository root
    cfg = load_config(EXAMPLES / f"{name}.yaml", [])
    data = load_dataset(cfg.data, load_tokenizer(resolve_model(cfg.model.name)))
    stats = data.stats
    assert stats.format == cfg.data.format and stats.packed and stats.n_rows > 2000
    # SmolLM2's own ChatML template: answers (and their end-of-turn token) are about a third of the tokens.
    assert 0.2 < stats.n_loss_tokens / stats.n_train_tokens < 0.6
    assert sum(stats.dropped.values()) < 0.01 * stats.n_rows and stats.n_truncated < 0.03 * stats.n_rows


# ---- knobs other tools have, and their names ----


def test_epochs_replace_steps_and_set_the_length_from_the_data(tmp_path):
    cfg = load_config(None, ["train.epochs=2", "train.batch_size=4", "train.grad_accumulation=2"])
    assert cfg.train.steps is None and cfg.train.epochs == 2.0
    assert cfg.train.total_steps(17) == 5  # 5 micro-batches an epoch, 10 in all, 2 per step
    assert load_config(None, ["train.epochs=2", "train.steps=7"]).train.total_steps(17) == 7  # later wins
    assert load_config(write(tmp_path, "train:\n  epochs: 0.5\n"), []).train.total_steps(16) == 2
    with pytest.raises(EdgetuneError, match="both set"):
        TrainSection(epochs=1.0)  # in Python the default steps must be cleared explicitly
    assert TrainSection(epochs=1.0, steps=None).total_steps(3) == 1


def test_warmup_steps_or_ratio_and_the_schedule_kind():
    cfg = load_config(None, ["train.warmup_ratio=0.1", "train.scheduler=cosine"])
    assert cfg.train.warmup(60) == 6 and cfg.train.scheduler == "cosine"
    assert load_config(None, ["train.warmup_steps=3"]).train.warmup(60) == 3
    with pytest.raises(EdgetuneError, match="both set"):
        load_config(None, ["train.warmup_steps=3", "train.warmup_ratio=0.1"])
    with pytest.raises(EdgetuneError, match="did you mean cosine"):
        load_config(None, ["train.scheduler=cosin"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_grad_norm=0", "train.max_grad_norm=0.0 is not positive"),
        ("train.weight_decay=-1", "train.weight_decay=-1.0 is out of range"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio=1.5 is out of range"),
        ("train.epochs=0", "train.epochs=0.0 is not positive"),
        ("train.zo_eps=-1e-3", "train.zo_eps=-0.001 is not positive"),
    ],
)
def test_optimizer_knobs_are_checked(override, message):
    with pytest.raises(EdgetuneError, match=message):
        load_config(None, [override])


def test_zo_eps_is_refused_with_a_backprop_strategy():
    assert load_config(None, ["train.strategy=hizoo-qlora", "train.zo_eps=1e-2"]).train.zo_eps == 1e-2
    with pytest.raises(EdgetuneError, match="no effect with the backprop strategy"):
        load_config(None, ["train.strategy=adafish-lora", "train.zo_eps=1e-2"])


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("learning_rate: 3e-4\n", "did you mean train.lr?"),
        ("train:\n  learning_rate: 3e-4\n", "did you mean train.lr?"),
        ("lora:\n  lora_r: 8\n", "did you mean lora.rank?"),
        ("train:\n  max_steps: 8\n", "did you mean train.steps?"),
        ("train:\n  gradient_accumulation_steps: 8\n", "did you mean train.grad_accumulation?"),
        ("lora:\n  target_modules: [q_proj]\n", "did you mean lora.targets?"),
        ("num_train_epochs: 3\n", "did you mean train.epochs?"),
    ],
)
def test_other_tools_key_names_point_to_edgetunes(tmp_path, text, hint):
    with pytest.raises(EdgetuneError) as caught:
        load_config(write(tmp_path, text), [])
    assert hint in caught.value.fix and "its name in other tools" in caught.value.fix


def test_all_linear_targets_are_accepted_alone():
    assert load_config(None, ["lora.targets=all-linear"]).lora.targets == ("all-linear",)
    with pytest.raises(EdgetuneError, match="mixes all-linear"):
        load_config(None, ["lora.targets=[all-linear, q_proj]"])
