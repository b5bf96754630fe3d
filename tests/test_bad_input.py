"""Every command, fed input it cannot use, says so in one line and leaves everything on disk as it was.

Each row builds a command line in a work folder that also holds a finished run, a model, data and someone else's
files. The CLI must exit 2 with exactly one stderr line ``edgetune: error: <problem>; <fix>`` (no traceback, no
usage block), print nothing on stdout, and leave every file and folder of the work area as it was.
"""

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_train_overrides, write_tiny_text

from edgetune.cli import main
from edgetune.plan.sources import cache_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Case:
    name: str
    argv: Callable[[SimpleNamespace], list[str]]
    says: str


def train(ctx, *extra):
    return ["train", *tiny_train_overrides(ctx.model, ctx.text, ctx.tmp / "out", 2), *extra]


def config_file(ctx, name: str, data: dict) -> str:
    folder = ctx.tmp / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(data))
    return str(folder / "config.json")


def tiny_config(**changes) -> dict:
    base = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return base | dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=128) | changes


def text_file(ctx, name: str, text: str) -> str:
    (ctx.tmp / name).write_text(text)
    return str(ctx.tmp / name)


ALPACA_ROW = {"instruction": "Say hello.", "input": "", "output": "hello"}
MESSAGES = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello"}]


def jsonl_file(ctx, name: str, *rows: dict) -> str:
    return text_file(ctx, name, "".join(json.dumps(row) + "\n" for row in rows))


def saved_data(ctx) -> str:
    import datasets

    folder = ctx.tmp / "saved-data"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([ALPACA_ROW] * 4)}).save_to_disk(str(folder))
    return str(folder)


def parquet_file(ctx) -> str:
    import datasets

    datasets.Dataset.from_list([{"text": "hello world"}] * 4).to_parquet(str(ctx.tmp / "t.parquet"))
    return str(ctx.tmp / "t.parquet")


def beside_an_int8_file(ctx) -> str:
    """An ONNX path whose int8 companion (m.int8.onnx) already exists."""
    (ctx.tmp / "m.int8.onnx").write_text("an earlier export")
    return str(ctx.tmp / "m.onnx")


def foreign_folder(ctx, name: str, marker: str | None = None) -> str:
    folder = ctx.tmp / name
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("mine")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    if marker is not None:
        (folder / "run.json").write_text(marker)
        (folder / "model").mkdir()
        (folder / "model" / "w.bin").write_bytes(b"weights")
    return str(folder)


def damaged_model(ctx, what: str) -> str:
    folder = ctx.tmp / f"damaged-{what}"
    shutil.copytree(ctx.model, folder)
    target = folder / ("model.safetensors" if what == "weights" else "tokenizer.json")
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 3])
    return str(folder)


def wide_model(ctx) -> str:
    """A model folder (config only) twice as wide as the tiny model the run's adapter was trained on."""
    return str(Path(config_file(ctx, "wide", tiny_config(hidden_size=128, intermediate_size=256))).parent)


def damaged_checkpoint(ctx) -> str:
    checkpoint = sorted((ctx.run / "checkpoints").glob("step-*"))[-1]
    weights = checkpoint / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return str(checkpoint)


def alias_bomb() -> str:
    """About 400 bytes of YAML whose value, written out in full, is 9**9 items: its repr would be gigabytes."""
    levels = ["&a [" + ", ".join(["x"] * 9) + "]"]
    levels += [f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    return "train:\n  lr: [" + ", ".join(levels) + "]\n"


CASES = [
    # devices
    Case("devices-empty-profile", lambda c: ["devices", "--profile", ""], "unknown device profile ''"),
    Case("devices-unknown-profile", lambda c: ["devices", "--profile", "rtx-4060"], "rtx-4060-8gb"),
    Case("devices-unknown-flag", lambda c: ["devices", "--colour"], "unrecognized arguments: --colour"),
    Case("no-command", lambda c: [], "the following arguments are required"),
    Case("unknown-command", lambda c: ["frobnicate"], "invalid choice: 'frobnicate'"),
    # plan
    Case("plan-huge-budget", lambda c: ["plan", str(c.model), "--budget", "1" + "0" * 400 + "GiB"], "larger than any"),
    Case("plan-budget-words", lambda c: ["plan", str(c.model), "--budget", "lots"], "is not a memory size"),
    Case("plan-budget-zero", lambda c: ["plan", str(c.model), "--budget", "0GiB"], "is not a memory size"),
    Case("plan-missing-model", lambda c: ["plan", "--model", str(c.tmp / "missing")], "does not exist"),
    Case(
        "plan-junk-gguf",
        lambda c: ["plan", "--model", text_file(c, "junk.gguf", "not a gguf"), "--budget", "1GiB"],
        "transformers cannot load",
    ),
    Case("train-missing-gguf", lambda c: train(c, f"model.name={c.tmp / 'absent.gguf'}"), "does not exist"),
    Case(
        "plan-zero-heads",
        lambda c: ["plan", config_file(c, "zero", tiny_config(num_attention_heads=0)), "--budget", "1GiB"],
        "num_attention_heads=0",
    ),
    Case(
        "plan-negative-hidden",
        lambda c: ["plan", config_file(c, "negative", tiny_config(hidden_size=-64)), "--budget", "1GiB"],
        "hidden_size=-64",
    ),
    Case(
        "plan-only-model-type",
        lambda c: ["plan", config_file(c, "bare", {"model_type": "llama"}), "--budget", "1GiB"],
        "does not say the model's hidden_size",
    ),
    Case("plan-not-json", lambda c: ["plan", text_file(c, "config.json", "{oops")], "is not valid JSON"),
    Case(
        "plan-huge-batch",
        lambda c: ["plan", str(c.model), "--batch-size", "1000000000000000000", "--budget", "1GiB"],
        "is beyond any run",
    ),
    Case("plan-zero-seq", lambda c: ["plan", str(c.model), "--seq-len", "0", "--budget", "1GiB"], "seq_len must be"),
    Case("plan-negative-rank", lambda c: ["plan", str(c.model), "--lora-rank", "-1"], "lora_rank must be"),
    Case("plan-unknown-profile", lambda c: ["plan", str(c.model), "--profile", "gtx-9999"], "unknown device profile"),
    Case("plan-unknown-stack", lambda c: ["plan", str(c.model), "--stack", "deepspeed"], "invalid choice: 'deepspeed'"),
    Case("plan-unknown-optimizer", lambda c: ["plan", str(c.model), "--optimizer", "lion"], "invalid choice: 'lion'"),
    Case(
        "plan-qlora-in-bf16",
        lambda c: ["plan", str(c.model), "--method", "qlora", "--precision", "bf16", "--budget", "1GiB"],
        "qlora means an nf4 base",
    ),
    Case(
        "plan-inference-optimizer",
        lambda c: ["plan", str(c.model), "--method", "inference", "--optimizer", "adamw", "--budget", "1GiB"],
        "trains nothing",
    ),
    Case(
        "plan-full-adafish",
        lambda c: ["plan", str(c.model), "--method", "full", "--optimizer", "adafish", "--budget", "1GiB"],
        "trains LoRA adapters only",
    ),
    Case(
        "plan-mezo-checkpointing",
        lambda c: ["plan", str(c.model), "--optimizer", "mezo", "--checkpointing", "on", "--budget", "1GiB"],
        "runs no backward pass",
    ),
    Case("plan-profile-and-budget", lambda c: ["plan", "--profile", "rtx-3050-8gb", "--budget", "1GiB"], "not allowed"),
    Case("plan-batch-words", lambda c: ["plan", "--batch-size", "many"], "invalid int value: 'many'"),
    Case("plan-bad-yaml", lambda c: ["plan", text_file(c, "bad.yaml", "train: [1, 2\n")], "is not valid YAML"),
    Case("plan-missing-yaml", lambda c: ["plan", str(c.tmp / "none.yaml")], "does not exist"),
    Case("plan-two-models", lambda c: ["plan", str(c.model), "--model", "smollm2-135m"], "two models given"),
    Case(
        "plan-no-such-target",
        lambda c: ["plan", str(c.model), "lora.targets=[w_proj]", "--budget", "1GiB"],
        "no LoRA target",
    ),
    Case("plan-negative-lr", lambda c: ["plan", str(c.model), "train.lr=-1"], "train.lr=-1.0 is not positive"),
    Case("plan-other-tools-key", lambda c: ["plan", text_file(c, "hf.yaml", "learning_rate: 3\n")], "train.lr"),
    # probe
    Case("probe-nan-lr", lambda c: ["probe", "--model", str(c.model), "--lr", "nan"], "lr must be positive and finite"),
    Case("probe-inf-lr", lambda c: ["probe", "--model", str(c.model), "--lr", "inf"], "lr must be positive and finite"),
    Case("probe-nan-alpha", lambda c: ["probe", "--model", str(c.model), "--lora-alpha", "nan"], "alpha"),
    Case("probe-unknown-strategy", lambda c: ["probe", "--strategy", "sgd"], "invalid choice: 'sgd'"),
    Case(
        "probe-zo-without-update",
        lambda c: ["probe", "--model", str(c.model), "--strategy", "hizoo-qlora", "--no-update"],
        "forward-only",
    ),
    Case("probe-unknown-device", lambda c: ["probe", "--model", str(c.model), "--device", "tpu"], "unknown device"),
    Case(
        "probe-corrupt-weights",
        lambda c: ["probe", "--model", damaged_model(c, "weights"), "--seq-len", "32", "--strategy", "adamw-lora-gc"],
        "cannot load the weights",
    ),
    Case(
        "probe-corrupt-tokenizer",
        lambda c: ["probe", "--model", damaged_model(c, "tokenizer"), "--seq-len", "32"],
        "cannot load a tokenizer",
    ),
    Case("probe-missing-data", lambda c: ["probe", "--model", str(c.model), "--data", "nope.txt"], "does not exist"),
    Case(
        "probe-huge-csv-header",
        lambda c: ["probe", "--model", str(c.model), "--data", text_file(c, "wide.csv", "t" * 140_000 + "\nx\n")],
        "not valid CSV",
    ),
    Case("probe-zero-seq", lambda c: ["probe", "--model", str(c.model), "--seq-len", "0"], "seq_len must be"),
    Case(
        "probe-nf4-full",
        lambda c: ["probe", "--model", str(c.model), "--precision", "nf4", "--strategy", "adamw-full-gc"],
        "NF4 base needs LoRA",
    ),
    # train
    Case(
        "train-negative-seed",
        lambda c: train(c, "train.seed=-1", "train.strategy=hizoo-qlora"),
        "train.seed=-1 is below 0",
    ),
    Case("train-float-seed", lambda c: train(c, "train.seed=1e23"), "train.seed must be an integer"),
    Case("train-huge-seed", lambda c: train(c, "train.seed=" + "1" + "0" * 23), "is above 4294967295"),
    Case(
        "train-damaged-run-json",
        lambda c: train(c, f"output.dir={foreign_folder(c, 'damaged', '{not json')}"),
        "run.json is unreadable",
    ),
    Case(
        "train-empty-run-json-overwrite",
        lambda c: train(c, f"output.dir={foreign_folder(c, 'other', '{}')}", "output.overwrite=true"),
        "run.json is not an edgetune run marker",
    ),
    Case(
        "train-output-is-a-file",
        lambda c: train(c, f"output.dir={text_file(c, 'file.txt', 'x')}"),
        "is a file",
    ),
    Case(
        "train-foreign-folder",
        lambda c: train(c, f"output.dir={foreign_folder(c, 'mine')}", "output.overwrite=true"),
        "is not empty and is not an edgetune run",
    ),
    Case(
        "train-corrupt-weights",
        lambda c: train(c, f"model.name={damaged_model(c, 'weights')}", "train.strategy=adamw-lora-gc"),
        "cannot load the weights",
    ),
    Case("train-missing-config", lambda c: ["train", str(c.tmp / "none.yaml")], "does not exist"),
    Case("train-bad-yaml", lambda c: ["train", text_file(c, "bad.yaml", "train:\n  lr: 1\n lora: 2\n")], "YAML"),
    Case("train-alias-bomb", lambda c: ["train", text_file(c, "bomb.yaml", alias_bomb())], "train.lr must be a number"),
    Case("train-unknown-key", lambda c: train(c, "train.stpes=3"), "did you mean train.steps?"),
    Case("train-mixed-targets", lambda c: train(c, "lora.targets=[all-linear,q_proj]"), "mixes all-linear"),
    Case("train-zero-steps", lambda c: train(c, "train.steps=0"), "train.steps=0 is below 1"),
    Case("train-missing-data", lambda c: train(c, f"data.path={c.tmp / 'none.txt'}"), "does not exist"),
    Case(
        "train-steps-and-epochs-in-a-file",
        lambda c: ["train", text_file(c, "both.yaml", "train:\n  steps: 5\n  epochs: 2\n")],
        "are both set",
    ),
    Case("train-resume-not-a-run", lambda c: ["train", "--resume", foreign_folder(c, "notrun")], "no config.yaml"),
    Case("train-resume-other-rank", lambda c: ["train", "--resume", str(c.run), "lora.rank=8"], "lora.rank=16, not 8"),
    Case(
        "train-resume-bad-yaml",
        lambda c: ["train", text_file(c, "broken.yaml", "train: [1\n"), "--resume", str(c.run)],
        "is not valid YAML",
    ),
    Case("train-seq-too-long", lambda c: train(c, "data.seq_len=100000"), "longer than the model's 256 positions"),
    Case(
        "train-prompts-longer-than-seq",
        lambda c: train(
            c,
            "data.path="
            + text_file(
                c,
                "pc.jsonl",
                "".join(json.dumps({"prompt": "hello world " * 40, "completion": " fine"}) + "\n" for _ in range(4)),
            ),
        ),
        "raise data.seq_len",
    ),
    Case(
        "train-mixed-data-formats",
        lambda c: train(c, "data.path=" + jsonl_file(c, "mixed.jsonl", ALPACA_ROW, {"messages": MESSAGES})),
        "mixed.jsonl line 2 is a messages row but",
    ),
    Case(
        "train-format-does-not-fit",
        lambda c: train(c, "data.path=" + jsonl_file(c, "a.jsonl", ALPACA_ROW), "data.format=sharegpt"),
        "data.format sharegpt needs",
    ),
    Case(
        "train-row-of-no-format",
        lambda c: train(c, "data.path=" + jsonl_file(c, "q.jsonl", {"question": "q", "answer": "a"})),
        "match no data format",
    ),
    Case("train-unknown-data-format", lambda c: train(c, "data.format=orca"), "data.format='orca' is unknown"),
    Case(
        "train-missing-template-file",
        lambda c: train(c, "data.path=" + jsonl_file(c, "m.jsonl", {"messages": MESSAGES}), "data.chat_template=x.j2"),
        "neither a built-in template nor a file",
    ),
    Case(
        "train-template-without-assistant",
        lambda c: train(
            c,
            "data.path=" + jsonl_file(c, "m.jsonl", {"messages": MESSAGES}, {"messages": MESSAGES}),
            "data.chat_template="
            + text_file(
                c,
                "user-only.jinja",
                "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}",
            ),
        ),
        "renders no assistant turn",
    ),
    Case(
        "train-image-content",
        lambda c: train(
            c,
            "data.path="
            + jsonl_file(c, "img.jsonl", {"messages": [{"role": "user", "content": [{"type": "image"}]}, MESSAGES[1]]}),
        ),
        "content part of type 'image'",
    ),
    Case(
        "train-saved-data-missing-split",
        lambda c: train(c, "data.path=" + saved_data(c), "data.split=validation"),
        "validation",
    ),
    Case(
        "train-parquet-without-the-column",
        lambda c: train(c, "data.path=" + parquet_file(c), "data.format=text", "data.text_column=body"),
        "data.format text needs",
    ),
    Case("train-unknown-flag", lambda c: ["train", "--fast"], "unrecognized arguments: --fast"),
    Case(
        "train-init-adapter-other-rank",
        lambda c: train(c, "train.strategy=adamw-lora-gc", f"train.init_adapter={c.run / 'adapter'}", "lora.rank=8"),
        "has rank 16 and alpha 32, but the config has lora.rank=8",
    ),
    Case(
        "train-init-adapter-full-strategy",
        lambda c: train(c, "train.strategy=mezo-full", f"train.init_adapter={c.run / 'adapter'}"),
        "trains every parameter",
    ),
    Case(
        "train-init-adapter-not-an-adapter",
        lambda c: train(c, f"train.init_adapter={foreign_folder(c, 'notadapter')}"),
        "is not a peft adapter folder (no adapter_config.json, adapter_model.safetensors)",
    ),
    # export
    Case(
        "export-unwritable", lambda c: ["export", str(c.run), "--merged", "/proc/edgetune-x"], "cannot write to /proc"
    ),
    Case(
        "export-overwrite-foreign-folder",
        lambda c: ["export", str(c.run), "--merged", foreign_folder(c, "thesis"), "--overwrite"],
        "is not an edgetune export",
    ),
    Case("export-nothing-asked", lambda c: ["export", str(c.run)], "nothing to export"),
    Case("export-not-a-folder", lambda c: ["export", str(c.tmp / "nowhere"), "--merged", "m"], "is not a folder"),
    Case(
        "export-into-the-run",
        lambda c: ["export", str(c.run), "--merged", str(c.run / "merged")],
        "inside or contains the run folder",
    ),
    Case("export-wrong-suffix", lambda c: ["export", str(c.run), "--onnx", str(c.tmp / "m.txt")], ".onnx"),
    Case("export-unknown-dtype", lambda c: ["export", str(c.run), "--dtype", "fp8"], "invalid choice: 'fp8'"),
    Case(
        "export-adapter-of-another-base",
        lambda c: ["export", str(c.run / "adapter"), "--base", wide_model(c), "--merged", str(c.tmp / "m")],
        "does not fit the base",
    ),
    Case(
        "export-neither-run-checkpoint-nor-adapter",
        lambda c: ["export", foreign_folder(c, "stuff"), "--merged", str(c.tmp / "m")],
        "is not an edgetune run folder (no run.json), a checkpoint or a peft adapter folder",
    ),
    Case(
        "export-damaged-checkpoint",
        lambda c: ["export", damaged_checkpoint(c), "--merged", str(c.tmp / "m")],
        "adapter/adapter_model.safetensors has",
    ),
    Case("export-into-the-cache", lambda c: ["export", str(c.run), "--merged", str(cache_dir() / "x")], "model cache"),
    Case(
        "export-gguf-exists",
        lambda c: ["export", str(c.run), "--gguf", text_file(c, "m.gguf", "an earlier file")],
        "already exists",
    ),
    Case(
        "export-gguf-overwrite-foreign-file",
        lambda c: ["export", str(c.run), "--gguf", text_file(c, "theirs.gguf", "GGUF, not ours"), "--overwrite"],
        "is not a GGUF edgetune exported",
    ),
    Case(
        "export-gguf-overwrite-foreign-modelfile",
        lambda c: [
            "export",
            str(c.run),
            "--gguf",
            str(Path(text_file(c, "Modelfile", "FROM x")).parent / "m.gguf"),
            "--overwrite",
        ],
        "was not written by edgetune",
    ),
    Case(
        "export-gguf-unknown-type",
        lambda c: ["export", str(c.run), "--gguf", "m.gguf", "--gguf-type", "q3_k"],
        "invalid choice: 'q3_k'",
    ),
    Case("export-gguf-wrong-suffix", lambda c: ["export", str(c.run), "--gguf", str(c.tmp / "m.bin")], ".gguf"),
    Case(
        "export-gguf-same-path-as-onnx",
        lambda c: ["export", str(c.run), "--gguf", str(c.tmp / "m.gguf"), "--onnx", str(c.tmp / "m.gguf")],
        "name the same path",
    ),
    Case("export-int8-without-onnx", lambda c: ["export", str(c.run), "--onnx-int8"], "--onnx-int8 needs --onnx"),
    Case(
        "export-int8-with-merged-only",
        lambda c: ["export", str(c.run), "--merged", str(c.tmp / "m"), "--onnx-int8"],
        "--onnx-int8 needs --onnx",
    ),
    Case(
        "export-int8-file-exists",
        lambda c: ["export", str(c.run), "--onnx", beside_an_int8_file(c), "--onnx-int8"],
        "m.int8.onnx already exists",
    ),
]


def snapshot(root: Path) -> dict[str, str]:
    """Every path below root with its content hash ('dir' for folders): what must not change."""
    return {
        str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if not path.is_symlink()
    }


@pytest.fixture(scope="module")
def finished_run(tiny_trainable_dir, tmp_path_factory) -> Path:
    from edgetune import api

    text = write_tiny_text(tmp_path_factory.mktemp("bad-input-data") / "text.txt")
    run_dir = tmp_path_factory.mktemp("bad-input-run") / "run"
    overrides = tiny_train_overrides(tiny_trainable_dir, text, run_dir, 2, "train.strategy=adamw-lora-gc")
    api.train(api.train_config(None, overrides))
    return run_dir


def test_the_table_covers_every_command_with_sixty_inputs():
    assert len(CASES) >= 60 and len({case.name for case in CASES}) == len(CASES)
    commands = {case.name.split("-")[0] for case in CASES}
    assert {"devices", "plan", "probe", "train", "export"} <= commands


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, tmp_path, tiny_trainable_dir, finished_run, capsys):
    work = tmp_path / "work"
    model, run = shutil.copytree(tiny_trainable_dir, work / "model"), shutil.copytree(finished_run, work / "run")
    ctx = SimpleNamespace(tmp=work, model=Path(model), run=Path(run), text=write_tiny_text(work / "text.txt"))
    argv = case.argv(ctx)
    capsys.readouterr()
    before = snapshot(work)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("edgetune: error: "), err
    assert "; " in err and "Traceback" not in err and case.says in err, err
    assert snapshot(work) == before
    torch.set_num_threads(1)
