"""Every data format and source trains end to end from the command line, on real chatterbot-corpus text."""

import csv
import json
from pathlib import Path

import pytest
from conftest import tiny_train_overrides

from edgetune.cli import main

CHAT = Path(__file__).resolve().parents[1] / "examples" / "data" / "chatterbot-chat.jsonl"


def conversations(n=40):
    rows = [json.loads(line)["messages"] for line in CHAT.read_text(encoding="utf-8").splitlines()]
    return rows[:n]  # single questions and multi-turn conversations alike


def _alpaca(messages):
    *history, (question, answer) = list(zip(messages[::2], messages[1::2], strict=True))
    return {
        "instruction": question["content"],
        "input": "",
        "output": answer["content"],
        "history": [[q["content"], a["content"]] for q, a in history],
    }


def _sharegpt(messages):
    return {
        "conversations": [{"from": {"user": "human"}.get(m["role"], "gpt"), "value": m["content"]} for m in messages]
    }


def write_format(folder: Path, fmt: str) -> tuple[str, str]:
    """The conversations written in one format and source; returns (path, format shown in the report)."""
    convs = conversations()
    if fmt == "text-csv":
        path = folder / "d.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text"])
            writer.writerows([[" ".join(m["content"] for m in c)] for c in convs])
        return str(path), "text"
    if fmt == "prompt-completion-csv":
        path = folder / "d.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["prompt", "completion"])
            writer.writerows([[f"Q: {c[0]['content']}\nA:", " " + c[1]["content"]] for c in convs])
        return str(path), "prompt-completion"
    if fmt == "alpaca-jsonl":
        path = folder / "d.jsonl"
        path.write_text("".join(json.dumps(_alpaca(c)) + "\n" for c in convs), encoding="utf-8")
        return str(path), "alpaca"
    if fmt == "sharegpt-json":
        path = folder / "d.json"
        path.write_text(json.dumps([_sharegpt(c) for c in convs]), encoding="utf-8")
        return str(path), "sharegpt"
    import datasets

    if fmt == "messages-parquet":
        path = folder / "d.parquet"
        datasets.Dataset.from_list([{"messages": c} for c in convs]).to_parquet(str(path))
        return str(path), "messages"
    assert fmt == "prompt-completion-saved"
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in convs]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder / "saved"))
    return str(folder / "saved"), "prompt-completion"


FORMATS = [
    "text-csv",
    "prompt-completion-csv",
    "alpaca-jsonl",
    "sharegpt-json",
    "messages-parquet",
    "prompt-completion-saved",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_from_the_cli(tmp_path, capsys, tiny_trainable_dir, one_thread, fmt):
    path, shown = write_format(tmp_path, fmt)
    run_dir = tmp_path / "run"
    overrides = tiny_train_overrides(tiny_trainable_dir, path, run_dir, 2, "train.strategy=adamw-lora-gc")
    code = main(["train", *overrides, "data.seq_len=64"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = next(line for line in (out + err).splitlines() if line.startswith("data: "))
    assert report.startswith(f"data: {shown} from {path}") and ": 40 rows, " in report
    assert ("packed into" in report) == (shown != "text")
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s and s.get("step")]
    assert len(losses) >= 2 and all(0 < loss < 20 for loss in losses)


def test_a_separate_eval_file_and_a_template_from_the_cli(tmp_path, capsys, tiny_trainable_dir, one_thread):
    train_path, _ = write_format(tmp_path, "alpaca-jsonl")
    (tmp_path / "eval").mkdir()
    eval_path, _ = write_format(tmp_path / "eval", "sharegpt-json")
    run_dir = tmp_path / "run"
    extra = ("train.strategy=adamw-lora-gc", f"data.eval_path={eval_path}", "data.chat_template=zephyr")
    code = main(["train", *tiny_train_overrides(tiny_trainable_dir, train_path, run_dir, 1, *extra)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "80 rows" in out + err
    # The run keeps the template it trained with, so chat and export render prompts the same way.
    saved = json.loads((run_dir / "adapter" / "tokenizer_config.json").read_text())
    template = saved.get("chat_template") or (run_dir / "adapter" / "chat_template.jinja").read_text()
    assert "<|assistant|>" in template


def test_mixed_formats_in_one_file_are_one_line_and_write_nothing(tmp_path, capsys, tiny_trainable_dir):
    path = tmp_path / "mixed.jsonl"
    rows = [{"instruction": "q", "output": "a"}, {"messages": [{"role": "user", "content": "q"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    code = main(["train", *tiny_train_overrides(tiny_trainable_dir, str(path), run_dir, 1)])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "mixed.jsonl line 2" in err and "Traceback" not in err
    assert not run_dir.exists()
