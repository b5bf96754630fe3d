import csv
import json
import logging
import pathlib
from collections import Counter

import pytest
import torch
from conftest import CHATML, make_tokenizer, write_file, write_jsonl
from transformers import PreTrainedTokenizerFast

from edgetune.errors import EdgetuneError
from edgetune.train.batching import batches, collate, pad_token_id
from edgetune.train.data import DataConfig, default_data_path, load_dataset
from edgetune.train.tokens import IGNORE_INDEX

TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: "
    "once or twice she had peeped into the book her sister was reading, but it had no pictures or conversations "
    "in it, and what is the use of a book, thought Alice, without pictures or conversations?"
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def eos_joined(tok, texts):
    ids = ids_of(tok, texts[0])
    for text in texts[1:]:
        ids += [tok.eos_token_id] + ids_of(tok, text)
    return ids


def all_examples(data):
    return data.train + data.val


def token_lists(examples):
    return [ex["input_ids"].tolist() for ex in examples]


def check_packed(data, ids, seq_len):
    """Blocks are exactly the consecutive seq_len slices of ids; the remainder is dropped and counted."""
    n_blocks = len(ids) // seq_len
    got = Counter(tuple(ex["input_ids"].tolist()) for ex in all_examples(data))
    want = Counter(tuple(ids[k * seq_len : (k + 1) * seq_len]) for k in range(n_blocks))
    assert got == want
    for ex in all_examples(data):
        assert ex["input_ids"].dtype == torch.long and ex["input_ids"].shape == (seq_len,)
        assert torch.equal(ex["labels"], ex["input_ids"]) and ex["length"] == seq_len
    assert data.stats.n_examples == n_blocks
    assert data.stats.n_remainder_tokens == len(ids) - n_blocks * seq_len
    assert data.stats.n_train_tokens == len(data.train) * seq_len
    assert data.stats.n_val_tokens == len(data.val) * seq_len


def test_txt_packs_exact_blocks_and_drops_remainder(tmp_path, tok):
    ids = ids_of(tok, TEXT)
    seq_len = 7
    assert len(ids) % seq_len != 0 and len(ids) // seq_len >= 4  # the test needs a remainder to drop
    data = load_dataset(DataConfig(path=write_file(tmp_path, "a.txt", TEXT), seq_len=seq_len), tok)
    check_packed(data, ids, seq_len)
    assert data.stats.format == "text" and data.stats.n_truncated == 0 and data.stats.n_rows == 1


def test_txt_line_endings_are_normalised(tmp_path, tok):
    text = "one line\ntwo line\nthree line\n" * 6
    unix = load_dataset(DataConfig(path=write_file(tmp_path, "u.txt", text), seq_len=4), tok)
    dos = load_dataset(
        DataConfig(path=write_file(tmp_path, "d.txt", text.replace("\n", "\r\n").encode()), seq_len=4), tok
    )
    assert [ex["input_ids"].tolist() for ex in dos.train] == [ex["input_ids"].tolist() for ex in unix.train]


def test_jsonl_text_rows_are_joined_with_eos(tmp_path, tok):
    texts = [TEXT[:100], TEXT[100:180], TEXT[180:]]
    path = write_jsonl(tmp_path, [{"text": t, "meta": i} for i, t in enumerate(texts)])
    ids = eos_joined(tok, texts)
    data = load_dataset(DataConfig(path=path, seq_len=5), tok)
    check_packed(data, ids, 5)
    assert data.stats.format == "text" and data.stats.n_rows == 3


def test_jsonl_uses_text_column(tmp_path, tok):
    path = write_jsonl(tmp_path, [{"body": TEXT}])
    data = load_dataset(DataConfig(path=path, seq_len=6, text_column="body"), tok)
    check_packed(data, ids_of(tok, TEXT), 6)


PC_ROWS = [
    {"prompt": "Question: how are you?\nAnswer:", "completion": " I am fine, thank you."},
    {"prompt": "Say hello.", "completion": " hello world"},
    {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog"},
    {"prompt": "Name a truth.", "completion": " a single man must be in want of a wife"},
]


@pytest.mark.parametrize("bos", [False, True])
def test_prompt_completion_masks_exactly_the_prompt(tmp_path, bos):
    tok = make_tokenizer(bos=bos)
    data = load_dataset(DataConfig(path=write_jsonl(tmp_path, PC_ROWS), seq_len=64, packing=False), tok)
    assert data.stats.format == "prompt-completion"
    assert data.stats.n_examples == len(PC_ROWS) and data.stats.n_truncated == 0 and data.stats.dropped == {}
    head = [tok.bos_token_id] if bos else []
    expected = {}
    for row in PC_ROWS:
        prompt, target = head + ids_of(tok, row["prompt"]), ids_of(tok, row["completion"]) + [tok.eos_token_id]
        expected[tuple(prompt + target)] = [IGNORE_INDEX] * len(prompt) + target
    for ex in all_examples(data):
        key = tuple(ex["input_ids"].tolist())
        assert ex["labels"].tolist() == expected.pop(key)
        assert ex["length"] == len(key)
    assert expected == {}
    assert tok.decode([t for t in all_examples(data)[0]["labels"].tolist() if t != IGNORE_INDEX]).endswith(
        "<|endoftext|>"
    )


def test_prompt_completion_truncation_and_unlabelled_drop(tmp_path, tok):
    seq_len = 12
    rows = PC_ROWS + [{"prompt": "hi", "completion": " yes"}, {"prompt": TEXT, "completion": " yes"}]
    prompt_lens = [len(ids_of(tok, r["prompt"])) for r in rows]
    lengths = [n + len(ids_of(tok, r["completion"])) + 1 for n, r in zip(prompt_lens, rows, strict=True)]
    unlabelled = [n >= seq_len for n in prompt_lens]  # the prompt fills the whole window: nothing left to learn
    assert 0 < sum(unlabelled) < len(rows) - 1 and min(lengths) < seq_len  # the rows exercise every case
    data = load_dataset(DataConfig(path=write_jsonl(tmp_path, rows), seq_len=seq_len, packing=False), tok)
    assert data.stats.n_truncated == sum(n > seq_len for n in lengths)
    assert data.stats.n_examples == len(rows) - sum(unlabelled)
    assert data.stats.dropped == {f"no answer token within seq_len={seq_len}": sum(unlabelled)}
    assert sorted(ex["length"] for ex in all_examples(data)) == sorted(
        min(n, seq_len) for n, u in zip(lengths, unlabelled, strict=True) if not u
    )
    for ex in all_examples(data):
        assert ex["length"] == ex["input_ids"].numel() == ex["labels"].numel()
        assert (ex["labels"] != IGNORE_INDEX).any()


CHATS = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "hello, how are you?"},
            {"role": "user", "content": "I am fine"},
            {"role": "assistant", "content": "thank you"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "the quick brown fox"},
            {"role": "assistant", "content": "jumps over the lazy dog"},
        ]
    },
]


def labelled_segments(tok, ex):
    """Decoded runs of consecutive tokens that carry a loss."""
    segments, run = [], []
    for token, label in zip(ex["input_ids"].tolist(), ex["labels"].tolist(), strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            segments.append(tok.decode(run))
            run = []
    return segments + ([tok.decode(run)] if run else [])


def test_chat_labels_only_assistant_content_and_end_token(tmp_path, tok):
    cfg = DataConfig(path=write_jsonl(tmp_path, CHATS), seq_len=128, val_fraction=0.5, packing=False)
    data = load_dataset(cfg, tok)
    assert data.stats.format == "messages"
    by_len = sorted(all_examples(data), key=lambda ex: ex["length"])
    assert labelled_segments(tok, by_len[0]) == ["jumps over the lazy dog<|im_end|>"]
    assert labelled_segments(tok, by_len[1]) == ["hello, how are you?<|im_end|>", "thank you<|im_end|>"]
    full = tok.apply_chat_template(CHATS[0]["messages"], tokenize=False)
    assert by_len[1]["input_ids"].tolist() == ids_of(tok, full)


def test_chat_inconsistent_template_falls_back_to_all_tokens_and_warns_once(tmp_path, caplog):
    tok = make_tokenizer()
    # Writing the number of messages first makes every prefix render differently from the whole conversation.
    tok.chat_template = "{{ messages | length }}" + CHATML
    cfg = DataConfig(path=write_jsonl(tmp_path, CHATS), seq_len=128, val_fraction=0.5, packing=False)
    with caplog.at_level(logging.WARNING, logger="edgetune.train.tokens"):
        data = load_dataset(cfg, tok)
    for ex in all_examples(data):
        assert torch.equal(ex["labels"], ex["input_ids"])
    assert len([r for r in caplog.records if "assistant turns" in r.getMessage()]) == 1


def test_chat_without_template_is_an_error(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(EdgetuneError) as err:
        load_dataset(DataConfig(path=write_jsonl(tmp_path, CHATS)), tok)
    assert "has none" in err.value.problem and "data.chat_template" in err.value.fix


def test_chat_template_failure_names_the_conversation(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('no') }}{% endif %}" + CHATML
    rows = CHATS + [{"messages": [{"role": "assistant", "content": "hi"}]}]
    with pytest.raises(EdgetuneError) as err:
        load_dataset(DataConfig(path=write_jsonl(tmp_path, rows)), tok)
    assert "failed on conversation 3" in err.value.problem and "roles" in err.value.fix


def test_csv_column_is_packed(tmp_path, tok):
    path = tmp_path / "d.csv"
    texts = [TEXT[:90], 'with "quotes", commas\nand a newline', TEXT[90:]]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text", "note"])
        for i, t in enumerate(texts):
            writer.writerow([i, t, "x"])
        writer.writerow([9, "", "blank text is skipped"])
    ids = eos_joined(tok, texts)
    data = load_dataset(DataConfig(path=str(path), seq_len=5), tok)
    check_packed(data, ids, 5)
    assert data.stats.format == "text" and data.stats.dropped == {"blank text": 1}


def error_of(cfg, tok):
    with pytest.raises(EdgetuneError) as err:
        load_dataset(cfg, tok)
    exc = err.value
    assert exc.problem and exc.fix and "\n" not in str(exc)
    return exc


def test_missing_file_and_directory(tmp_path, tok):
    exc = error_of(DataConfig(path=str(tmp_path / "nope.txt")), tok)
    assert "nope.txt" in exc.problem and "does not exist" in exc.problem and "path" in exc.fix
    exc = error_of(DataConfig(path=str(tmp_path)), tok)
    assert "is a directory" in exc.problem and ".txt" in exc.fix


def test_unsupported_suffix_lists_supported(tmp_path, tok):
    exc = error_of(DataConfig(path=write_file(tmp_path, "d.xlsx", "x")), tok)
    assert "'.xlsx'" in exc.problem
    assert all(s in exc.fix for s in (".txt", ".jsonl", ".json", ".csv", ".parquet"))


def test_unreadable_file(tmp_path, tok, monkeypatch):
    path = write_file(tmp_path, "secret.txt", TEXT)

    def deny(self):
        raise PermissionError(13, "Permission denied")

    # chmod does not stop root, so the refusal is simulated where the loader reads.
    monkeypatch.setattr(pathlib.Path, "read_bytes", deny)
    exc = error_of(DataConfig(path=path), tok)
    assert "secret.txt" in exc.problem and "permission denied" in exc.problem and "permissions" in exc.fix


@pytest.mark.parametrize("content", [b"", b"  \n\n\t\n"])
@pytest.mark.parametrize("name", ["e.txt", "e.jsonl", "e.csv"])
def test_empty_file(tmp_path, tok, content, name):
    exc = error_of(DataConfig(path=write_file(tmp_path, name, content)), tok)
    assert name in exc.problem and "empty" in exc.problem


def test_non_utf8_file(tmp_path, tok):
    exc = error_of(DataConfig(path=write_file(tmp_path, "latin.txt", "caf\xe9 au lait".encode("latin-1"))), tok)
    assert "not UTF-8" in exc.problem and "byte at 3" in exc.problem and "UTF-8" in exc.fix


def test_jsonl_bad_line_names_line_and_expected_keys(tmp_path, tok):
    path = write_file(tmp_path, "d.jsonl", '{"text": "fine"}\n\n{"text": "oops"\n')
    exc = error_of(DataConfig(path=path), tok)
    assert "d.jsonl line 3" in exc.problem and "not valid JSON" in exc.problem and "JSON object per line" in exc.fix


def test_jsonl_row_without_keys_names_line_and_keys(tmp_path, tok):
    path = write_jsonl(tmp_path, [{"text": "fine"}, {"prompt": "only a prompt"}])
    exc = error_of(DataConfig(path=path), tok)
    assert "d.jsonl line 2" in exc.problem and "match no data format" in exc.problem and "'prompt'" in exc.problem
    assert all(k in exc.problem for k in ('"text"', '"prompt"', '"completion"', '"messages"', '"instruction"'))
    assert "data.format" in exc.fix
    exc = error_of(DataConfig(path=write_jsonl(tmp_path, [["a", "list"]])), tok)
    assert "line 1" in exc.problem and "an array, not a JSON object" in exc.problem


def test_jsonl_mixed_kinds(tmp_path, tok):
    path = write_jsonl(tmp_path, [PC_ROWS[0], PC_ROWS[1], {"text": "plain"}])
    exc = error_of(DataConfig(path=path), tok)
    assert "line 3 is a text row" in exc.problem and "line 1 is a prompt-completion row" in exc.problem
    assert "one format per file" in exc.fix


def test_jsonl_wrong_value_types(tmp_path, tok):
    exc = error_of(DataConfig(path=write_jsonl(tmp_path, [{"prompt": "p", "completion": 3}])), tok)
    assert "line 1" in exc.problem and "'completion' is an int" in exc.problem
    bad_chat = [{"messages": [{"role": "user", "text": "no content key"}]}]
    exc = error_of(DataConfig(path=write_jsonl(tmp_path, bad_chat)), tok)
    assert "line 1" in exc.problem and "content" in str(exc)


def test_too_few_tokens_for_one_block(tmp_path, tok):
    n = len(ids_of(tok, "hello world"))
    exc = error_of(DataConfig(path=write_file(tmp_path, "short.txt", "hello world"), seq_len=64), tok)
    assert f"has {n} tokens, fewer than one block of seq_len=64" in exc.problem
    assert exc.fix == "use a longer text or a smaller seq_len"


def test_one_example_cannot_be_split(tmp_path, tok):
    n = len(ids_of(tok, TEXT))
    exc = error_of(DataConfig(path=write_file(tmp_path, "one.txt", TEXT), seq_len=n), tok)
    assert "1 example(s)" in exc.problem and "smaller seq_len" in exc.fix


def test_csv_missing_column_lists_columns(tmp_path, tok):
    exc = error_of(DataConfig(path=write_file(tmp_path, "d.csv", "id,body\n1,hello\n")), tok)
    assert "d.csv line 2" in exc.problem and "['id', 'body']" in exc.problem and "text_column" in exc.fix


@pytest.mark.parametrize(
    "field,value",
    [("seq_len", 1), ("seq_len", 2.5), ("val_fraction", 0.0), ("val_fraction", 1.0), ("seed", -1), ("path", "")],
)
def test_config_validation(field, value):
    with pytest.raises(EdgetuneError) as err:
        DataConfig(**{field: value})
    assert field in str(err.value) or "path" in str(err.value)


def test_split_is_deterministic_disjoint_and_sized(tmp_path, tok):
    path = write_file(tmp_path, "a.txt", TEXT)
    cfg = DataConfig(path=path, seq_len=10, val_fraction=0.2, seed=7)
    first, again = load_dataset(cfg, tok), load_dataset(cfg, tok)
    n = first.stats.n_examples
    assert len(first.val) == max(1, round(n * 0.2)) and len(first.train) == n - len(first.val)
    assert token_lists(first.train) == token_lists(again.train) and token_lists(first.val) == token_lists(again.val)
    ids = ids_of(tok, TEXT)
    starts = {tuple(ids[k * 10 : k * 10 + 10]): k for k in range(n)}
    assert len(starts) == n  # blocks are distinct, so block identity gives the block index
    train_idx = {starts[tuple(ex["input_ids"].tolist())] for ex in first.train}
    val_idx = {starts[tuple(ex["input_ids"].tolist())] for ex in first.val}
    assert train_idx.isdisjoint(val_idx) and train_idx | val_idx == set(range(n))
    expected_val = set(torch.randperm(n, generator=torch.Generator().manual_seed(7))[: len(first.val)].tolist())
    assert val_idx == expected_val
    other = load_dataset(DataConfig(path=path, seq_len=10, val_fraction=0.2, seed=8), tok)
    assert {starts[tuple(ex["input_ids"].tolist())] for ex in other.val} != val_idx


def make_examples(lengths):
    return [
        {"input_ids": torch.arange(1, n + 1) + 10 * i, "labels": torch.arange(1, n + 1) + 100 * i, "length": n}
        for i, n in enumerate(lengths)
    ]


def test_collate_right_pads_with_masks():
    examples = make_examples([3, 5, 2])
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 5)
    for row, ex in enumerate(examples):
        n = ex["length"]
        assert batch["input_ids"][row, :n].tolist() == ex["input_ids"].tolist()
        assert batch["labels"][row, :n].tolist() == ex["labels"].tolist()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (5 - n)
        assert batch["input_ids"][row, n:].tolist() == [0] * (5 - n)
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (5 - n)


def test_batches_cover_epoch_and_resume():
    examples = make_examples([2, 3, 4, 5, 6, 7, 8])

    def run(**kw):
        return [b["input_ids"][:, 0].tolist() for b in batches(examples, 3, 0, seed=5, **kw)]

    epoch0 = run(epoch=0)
    assert [len(b) for b in epoch0] == [3, 3, 1]
    assert sorted(sum(epoch0, [])) == [1 + 10 * i for i in range(7)]
    assert run(epoch=0) == epoch0 and run(epoch=0, start=1) == epoch0[1:] and run(epoch=0, start=3) == []
    assert run(epoch=1) != epoch0  # a fresh order each epoch, still a pure function of (seed, epoch)
    ordered = [b["input_ids"][:, 0].tolist() for b in batches(examples, 3, 0, shuffle=False)]
    assert ordered == [[1, 11, 21], [31, 41, 51], [61]]
    with pytest.raises(EdgetuneError, match="start=4"):
        batches(examples, 3, 0, start=4)
    with pytest.raises(EdgetuneError, match="batch_size=0"):
        batches(examples, 0, 0)


def test_pad_token_id_falls_back_to_eos():
    tok = make_tokenizer()
    assert pad_token_id(tok) == tok.convert_tokens_to_ids("<pad>")
    tok.pad_token = None
    assert pad_token_id(tok) == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(EdgetuneError, match="no pad token and no eos token"):
        pad_token_id(tok)


def test_bundled_default_text(tok):
    path = default_data_path()
    assert path.is_file() and path.stat().st_size > 100_000
    text = path.read_text(encoding="utf-8")
    assert text.startswith("Chapter 1\n\nIt is a truth universally acknowledged") and "\r" not in text
    assert (path.parent / "README.md").is_file()
    data = load_dataset(DataConfig(), tok)
    n_tokens = len(ids_of(tok, text))
    assert data.stats.format == "text" and data.stats.n_examples == n_tokens // 256
    assert data.stats.n_remainder_tokens == n_tokens % 256
    assert len(data.val) == round(data.stats.n_examples * 0.1)


# ---- every format, every source: the same conversations give the same tokens and loss masks ----

CHATTERBOT = pathlib.Path(__file__).resolve().parents[2] / "examples" / "data" / "chatterbot-chat.jsonl"


def chatterbot_pairs(n=24):
    """The first n single-question conversations of the example chat file (real chatterbot-corpus text)."""
    pairs = []
    for line in CHATTERBOT.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        if len(messages) == 2:
            pairs.append((messages[0]["content"], messages[1]["content"]))
        if len(pairs) == n:
            return pairs
    raise AssertionError("the example chat file has too few question/answer pairs")


def as_format(fmt, pairs):
    """The pairs as rows of one data format, the way people write them."""
    rows = {
        "alpaca": [{"instruction": q, "input": "", "output": a} for q, a in pairs],
        "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in pairs],
        "messages": [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
        ],
        "parts": [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": q}]},
                    {"role": "assistant", "content": [{"type": "text", "text": a}]},
                ]
            }
            for q, a in pairs
        ],
        "prompt-completion": [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in pairs
        ],
    }
    return rows[fmt]


def write_rows(tmp_path, rows, kind):
    """Rows written as a .jsonl, .json, .parquet file or a save_to_disk folder."""
    if kind == "jsonl":
        return write_jsonl(tmp_path, rows)
    if kind == "json":
        return write_file(tmp_path, "d.json", json.dumps(rows))
    import datasets

    table = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        table.to_parquet(str(tmp_path / "d.parquet"))
        return str(tmp_path / "d.parquet")
    table.save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


def token_pairs(data):
    return [(ex["input_ids"].tolist(), ex["labels"].tolist()) for ex in data.train + data.val]


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "parts", "prompt-completion"])
@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "saved"])
def test_the_same_conversations_in_any_format_and_source_give_the_same_tokens(tmp_path, tok, fmt, kind):
    pairs = chatterbot_pairs()
    reference = load_dataset(DataConfig(path=write_jsonl(tmp_path, as_format("messages", pairs), "ref.jsonl")), tok)
    data = load_dataset(DataConfig(path=write_rows(tmp_path, as_format(fmt, pairs), kind)), tok)
    assert token_pairs(data) == token_pairs(reference)
    assert data.stats.n_rows == len(pairs) and data.stats.format == ("messages" if fmt == "parts" else fmt)
    unpacked = load_dataset(DataConfig(path=write_rows(tmp_path, as_format(fmt, pairs), "jsonl"), packing=False), tok)
    for ex in unpacked.train + unpacked.val:  # loss exactly on the answer and its end-of-turn token
        answer = tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != -100])
        assert answer.endswith("<|im_end|>") and answer[: -len("<|im_end|>")] in {a for _, a in pairs}


def test_chat_examples_are_packed_by_default_and_the_report_says_so(tmp_path, tok):
    path = write_jsonl(tmp_path, as_format("messages", chatterbot_pairs()))
    packed = load_dataset(DataConfig(path=path, seq_len=128), tok)
    padded = load_dataset(DataConfig(path=path, seq_len=128, packing=False), tok)
    assert packed.stats.packed and not padded.stats.packed
    assert len(packed.train) < len(padded.train) and all("position_ids" in row for row in packed.train)
    assert packed.stats.n_train_tokens == padded.stats.n_train_tokens
    line = packed.stats.describe()
    assert line.startswith("data: messages from ") and "packed into" in line and "in the loss" in line


def test_train_on_prompt_puts_the_question_in_the_loss(tmp_path, tok):
    path = write_jsonl(tmp_path, as_format("alpaca", chatterbot_pairs()))
    answers_only = load_dataset(DataConfig(path=path, packing=False), tok)
    everything = load_dataset(DataConfig(path=path, packing=False, train_on_prompt=True), tok)
    assert everything.stats.n_loss_tokens == everything.stats.n_train_tokens
    assert answers_only.stats.n_loss_tokens < answers_only.stats.n_train_tokens / 1.2


def test_a_separate_eval_file_replaces_the_held_out_share(tmp_path, tok):
    pairs = chatterbot_pairs()
    train_path = write_jsonl(tmp_path, as_format("messages", pairs[:20]), "train.jsonl")
    eval_path = write_file(tmp_path, "eval.json", json.dumps(as_format("alpaca", pairs[20:])))
    data = load_dataset(DataConfig(path=train_path, eval_path=eval_path, packing=False), tok)
    assert (len(data.train), len(data.val), data.stats.n_rows) == (20, 4, 24)


def test_chat_template_sets_a_template_on_a_base_tokenizer(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = None
    path = write_jsonl(tmp_path, as_format("messages", chatterbot_pairs()))
    with pytest.raises(EdgetuneError, match="data.chat_template"):
        load_dataset(DataConfig(path=path), tok)
    data = load_dataset(DataConfig(path=path, chat_template="zephyr", packing=False), tok)
    assert "<|assistant|>" in tok.chat_template and "<|assistant|>" in tok.decode(data.train[0]["input_ids"])


@pytest.mark.parametrize(
    "key,value", [("format", "csv"), ("packing", "yes"), ("train_on_prompt", 1), ("eval_path", " "), ("split", "")]
)
def test_new_keys_are_validated(key, value):
    with pytest.raises(EdgetuneError, match=f"data.{key}"):
        DataConfig(**{key: value})
