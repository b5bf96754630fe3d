import json
import time

import pytest
from conftest import write_jsonl

from edgetune.errors import EdgetuneError
from edgetune.train.data_formats import FORMAT_KEYS, FORMATS, Samples, detect_format, normalise
from edgetune.train.data_sources import RawData, read_data

QA = [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Say hi", "hi")]
SYSTEM = "You are terse."
WANT = [
    [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": q},
        {"role": "assistant", "content": a},
    ]
    for q, a in QA
]


def rows_of(fmt):
    if fmt == "alpaca":
        return [{"instruction": q, "input": "", "output": a, "system": SYSTEM} for q, a in QA]
    if fmt == "sharegpt":
        return [
            {"system": SYSTEM, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for q, a in QA
        ]
    if fmt == "sharegpt-in-messages":
        return [
            {
                "messages": [
                    {"from": "system", "value": SYSTEM},
                    {"from": "user", "value": q},
                    {"from": "gpt", "value": a},
                ]
            }
            for q, a in QA
        ]
    if fmt == "messages":
        return [{"messages": messages} for messages in WANT]
    if fmt == "content-parts":
        return [
            {"messages": [{**m, "content": [{"type": "text", "text": c} for c in _halves(m["content"])]} for m in ms]}
            for ms in WANT
        ]
    assert fmt == "conversational-prompt-completion"
    return [{"prompt": ms[:2], "completion": ms[2:]} for ms in WANT]


def _halves(text):
    return [text[: len(text) // 2], text[len(text) // 2 :]]


def raw_of(rows, source="d.jsonl", word="line"):
    return RawData(source=source, text=None, rows=rows, row_word=word, row_numbers=list(range(1, len(rows) + 1)))


def error_of(raw, fmt="auto", text_column="text"):
    with pytest.raises(EdgetuneError) as err:
        normalise(raw, fmt, text_column)
    exc = err.value
    assert exc.problem and exc.fix and "\n" not in str(exc) and "\r" not in str(exc)
    return exc


@pytest.mark.parametrize(
    "fmt,detected",
    [
        ("alpaca", "alpaca"),
        ("sharegpt", "sharegpt"),
        ("sharegpt-in-messages", "sharegpt"),
        ("messages", "messages"),
        ("content-parts", "messages"),
        ("conversational-prompt-completion", "prompt-completion"),
    ],
)
def test_same_pairs_in_every_format_give_the_same_messages(tmp_path, fmt, detected):
    raw = read_data(write_jsonl(tmp_path, rows_of(fmt)))
    assert detect_format(raw) == detected
    samples = normalise(raw)
    # A conversational prompt/completion also says where its completion starts (only that part is learned).
    extra = {"answer_from": len(WANT[0]) - 1} if fmt == "conversational-prompt-completion" else {}
    assert samples == Samples(format=detected, samples=[{"messages": m} | extra for m in WANT], dropped={})
    assert normalise(raw, detected) == samples


def test_alpaca_input_history_and_csv_cells(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("instruction,input,output\nTranslate,bonjour,hello\nGreet,,hi\n", encoding="utf-8")
    samples = normalise(read_data(str(path)))
    assert samples.format == "alpaca" and [s["messages"][0]["content"] for s in samples.samples] == [
        "Translate\nbonjour",
        "Greet",
    ]
    row = {"instruction": "And 3+3?", "output": "6", "history": [["2+2?", "4"]]}
    assert normalise(raw_of([row])).samples[0]["messages"] == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]


def test_text_rows_txt_and_text_column(tmp_path):
    txt = tmp_path / "b.txt"
    txt.write_text("a whole\nbook", encoding="utf-8")
    assert normalise(read_data(str(txt))) == Samples(format="text", samples=[{"text": "a whole\nbook"}], dropped={})
    csv_file = tmp_path / "t.csv"
    csv_file.write_text('id,text\n1,first\n2,""\n3,second\n', encoding="utf-8")
    samples = normalise(read_data(str(csv_file)))
    assert samples.samples == [{"text": "first"}, {"text": "second"}] and samples.dropped == {"blank text": 1}
    raw = raw_of([{"body": "one"}, {"body": "  "}, {"body": None}, {"body": "two"}])
    assert detect_format(raw, "body") == "text"
    samples = normalise(raw, text_column="body")
    assert samples.samples == [{"text": "one"}, {"text": "two"}] and samples.dropped == {"blank text": 2}


def test_prompt_completion_strings_stay_raw():
    rows = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "Q: x\nA:", "completion": "  "}]
    samples = normalise(raw_of(rows))
    assert samples.format == "prompt-completion"
    assert samples.samples == [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}] and samples.dropped == {"empty answer": 1}


def test_tool_calls_tools_and_null_content_pass_through():
    call = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "content": "4", "name": "add", "tool_call_id": "c1"},
        {"role": "assistant", "content": "4"},
    ]
    sample = normalise(raw_of([{"messages": messages, "tools": tools}])).samples[0]
    assert sample["tools"] == tools
    assert sample["messages"][1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert sample["messages"][2] == {"role": "tool", "content": "4", "name": "add", "tool_call_id": "c1"}
    as_string = normalise(raw_of([{"messages": messages, "tools": json.dumps(tools)}])).samples[0]
    assert as_string["tools"] == tools


def test_arrow_style_null_fields_are_absent():
    # parquet and datasets give every struct every field, with None where a message has none.
    messages = [
        {"role": "user", "content": "hi", "tool_calls": None, "name": None, "tool_call_id": None},
        {"role": "assistant", "content": "yo", "tool_calls": None, "name": None, "tool_call_id": None},
    ]
    rows = [{"messages": messages, "tools": None, "text": None}]
    assert normalise(raw_of(rows)).samples == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]


def test_sharegpt_role_mapping():
    turns = [
        {"from": "human", "value": "2+2?"},
        {"from": "function_call", "value": '{"name": "add"}'},
        {"from": "observation", "value": "4"},
        {"from": "gpt", "value": "4"},
    ]
    messages = normalise(raw_of([{"conversations": turns}])).samples[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]


def test_dropped_rows_are_counted():
    rows = [
        {"messages": WANT[0]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        {"messages": WANT[1]},
    ]
    samples = normalise(raw_of(rows))
    assert len(samples.samples) == 2 and samples.dropped == {"no assistant turn": 1, "empty answer": 1}
    exc = error_of(raw_of(rows[1:3]))
    assert "no usable rows" in exc.problem and "no assistant turn: 1" in exc.problem


def test_priority_when_a_row_has_several_formats():
    row = {"messages": WANT[0], "instruction": "i", "output": "o", "prompt": "p", "completion": "c", "text": "t"}
    assert detect_format(raw_of([row])) == "messages"
    row.pop("messages")
    assert detect_format(raw_of([row])) == "alpaca"
    row.pop("instruction")
    assert detect_format(raw_of([row])) == "prompt-completion"
    assert normalise(raw_of([row]), "text").samples == [{"text": "t"}]


def test_unknown_keys_name_the_row_and_every_format():
    exc = error_of(raw_of([{"text": "fine"}, {"question": "q", "answer": "a"}]))
    assert "d.jsonl line 2 has keys ['question', 'answer'] which match no data format" in exc.problem
    assert (
        all(FORMAT_KEYS[f] in exc.problem for f in FORMATS)
        and exc.fix.startswith("rename the keys")
        and "data.format" in exc.fix
    )
    exc = error_of(raw_of([{"text": "x"}]), text_column="body")
    assert "d.jsonl line 1 has keys ['text']" in exc.problem and 'text: "body": a string' in exc.problem


def test_wide_rows_are_shortened_in_messages():
    row = {f"{'k' * 50}{i}": "v" for i in range(30)}
    exc = error_of(raw_of([row], source="w.csv", word="line"))
    assert "w.csv line 1 has keys" in exc.problem and "k" * 37 + "..." in exc.problem and ", ...]" in exc.problem
    assert "k" * 38 not in exc.problem


def test_mixed_formats_are_an_error():
    exc = error_of(raw_of([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": "c"}, {"text": "t"}]))
    assert exc.problem == "d.jsonl line 3 is a text row but d.jsonl line 1 is a prompt-completion row"
    assert exc.fix == "keep one format per file"


@pytest.mark.parametrize(
    "row,words",
    [
        ({"instruction": "i", "output": 3}, ["line 1", "'output' is an int, not a string"]),
        ({"instruction": ["i"], "output": "o"}, ["'instruction' is a list, not a string"]),
        ({"instruction": "i", "output": "o", "history": [["only one"]]}, ["'history'", "[user, assistant]"]),
        ({"conversations": "not a list"}, ["'conversations' is a str", "list"]),
        ({"conversations": [{"from": "bot", "value": "x"}]}, ["'from' 'bot'", "human, user, gpt"]),
        ({"conversations": [{"value": "x"}]}, ["no 'from'"]),
        ({"conversations": [{"from": "human", "value": 5}]}, ["'conversations' item 1 'value' is an int"]),
        ({"messages": {"role": "user"}}, ["'messages' is a dict", "list"]),
        ({"messages": [{"content": "no role"}]}, ["'messages' item 1", "['content']"]),
        ({"messages": [{"role": "bot", "content": "x"}]}, ["role 'bot'", "system, user, assistant, tool"]),
        ({"messages": [{"role": "user", "content": None}]}, ["'messages' item 1 has no content"]),
        ({"messages": [{"role": "user", "content": 7}]}, ["'messages' item 1 'content' is an int"]),
        ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}]}, ["type 'image'"]),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": "call"}]}, ["tool_calls' is a str"]),
        ({"messages": WANT[0], "tools": "{oops"}, ["'tools' is a string but not valid JSON"]),
        ({"messages": WANT[0], "tools": {"a": 1}}, ["'tools' is a dict"]),
        ({"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]}, ["'prompt' is a str", "'completion'"]),
        ({"prompt": 1, "completion": "c"}, ["'prompt' is an int"]),
        ({"text": 12}, ["'text' is an int, not a string"]),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, ["content part 'text' is an int"]),
    ],
)
def test_wrong_values_name_the_row_and_key(row, words):
    exc = error_of(raw_of([row]))
    assert "d.jsonl line 1" in exc.problem
    assert all(word in str(exc) for word in words), str(exc)


def test_override_must_fit_every_row(tmp_path):
    raw = raw_of([{"instruction": "i", "output": "o"}, {"prompt": "p", "completion": "c"}])
    exc = error_of(raw, "alpaca")
    assert exc.problem.startswith("d.jsonl line 2 has keys ['prompt', 'completion'] but data.format alpaca needs")
    assert FORMAT_KEYS["alpaca"] in exc.problem and "data.format" in exc.fix
    exc = error_of(raw_of([{"messages": WANT[0]}]), "sharegpt")
    assert "data.format sharegpt needs" in exc.problem
    assert "data.format='chat' is not a data format" in error_of(raw, "chat").problem
    txt = tmp_path / "b.txt"
    txt.write_text("text", encoding="utf-8")
    exc = error_of(read_data(str(txt)), "alpaca")
    assert "b.txt is a .txt file" in exc.problem and "text" in exc.fix


def test_hundred_thousand_rows_are_quick():
    rows = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
        for i in range(100_000)
    ]
    start = time.perf_counter()
    samples = normalise(raw_of(rows))
    assert len(samples.samples) == 100_000
    assert time.perf_counter() - start < 5


def test_sharegpt_conversations_written_with_role_and_content_are_read_as_messages(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    samples = normalise(read_data(write_jsonl(tmp_path, [{"conversations": turns}])))
    assert samples.format == "sharegpt" and samples.samples == [{"messages": turns}]
