import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from edgetune.errors import EdgetuneError
from edgetune.train.batching import batches, collate, collate_packed, pack
from edgetune.train.tokens import IGNORE_INDEX

LENGTHS = [5, 9, 3, 12, 7, 4, 16, 1, 8]


def _examples(lengths=LENGTHS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(0, 128, (n,), generator=generator)
        labels = ids.clone()
        labels[: n // 3] = IGNORE_INDEX  # a prompt without loss
        examples.append({"input_ids": ids, "labels": labels, "length": n})
    return examples


def _segments(row):
    """(start, end) of each example inside a packed row, from its restarting position ids."""
    starts = [i for i, p in enumerate(row["position_ids"].tolist()) if p == 0] + [len(row["position_ids"])]
    return list(zip(starts[:-1], starts[1:], strict=True))


def test_packing_keeps_every_example_whole_and_within_seq_len():
    examples = _examples()
    rows = pack(examples, 16)
    assert all(row["length"] <= 16 for row in rows)
    assert sum(row["n_examples"] for row in rows) == len(examples)
    pieces = sorted(tuple(row["input_ids"][a:b].tolist()) for row in rows for a, b in _segments(row))
    assert pieces == sorted(tuple(ex["input_ids"].tolist()) for ex in examples)
    # Best fit fills rows: 65 tokens need at least 5 rows of 16; the greedy placement needs no more than 6.
    assert len(rows) <= 6


def test_packing_masks_the_first_token_of_every_example():
    rows = pack(_examples([4, 4, 4]), 12)
    (row,) = rows
    assert [int(row["labels"][a]) for a, _ in _segments(row)] == [IGNORE_INDEX] * 3


def test_packing_is_deterministic():
    first, second = pack(_examples(), 16), pack(_examples(), 16)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second, strict=True))


def test_packed_padding_is_a_segment_of_its_own_with_no_loss():
    rows = pack(_examples([14, 10]), 16)
    batch = collate_packed(rows, pad_id=0)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (2, 14)
    assert batch["position_ids"][1, 10:].tolist() == [0, 1, 2, 3]
    assert (batch["labels"][1, 10:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_batches_give_the_same_per_example_losses(attn):
    torch.manual_seed(0)
    # Training runs without a KV cache (load_model sets use_cache=False); transformers only reads packed
    # position ids as separate sequences when no cache is in use.
    model = LlamaForCausalLM(tiny_llama_config(attn_implementation=attn, use_cache=False)).eval()
    examples = _examples()
    padded = collate(examples, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    expected = [_loss(logits[i, : ex["length"]], ex["labels"]) for i, ex in enumerate(examples)]
    rows = pack(examples, 16)
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    got = {}
    for r, row in enumerate(rows):
        for a, b in _segments(row):
            key = tuple(row["input_ids"][a:b].tolist())
            got[key] = _loss(packed_logits[r, a:b], batch["labels"][r, a:b])
    for ex, loss in zip(examples, expected, strict=True):
        assert got[tuple(ex["input_ids"].tolist())] == pytest.approx(loss, abs=1e-4, rel=1e-4)


def test_a_packed_batch_through_the_model_loss_matches_the_token_weighted_mean():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(use_cache=False)).eval()
    examples = _examples()
    rows = pack(examples, 16)
    batch = collate_packed(rows, pad_id=0)
    padded = collate(examples, pad_id=0)
    with torch.no_grad():
        packed_loss = float(model(**batch).loss)
        padded_loss = float(model(**padded).loss)
    assert packed_loss == pytest.approx(padded_loss, abs=1e-4)


def _loss(logits, labels):
    """Summed next-token cross-entropy of one example."""
    return float(torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))


def test_batches_of_packed_rows_carry_position_ids():
    rows = pack(_examples(), 16)
    batch = next(batches(rows, 2, pad_id=0, shuffle=False))
    assert set(batch) == {"input_ids", "labels", "position_ids"}


def test_batches_refuse_a_start_past_the_epoch():
    with pytest.raises(EdgetuneError, match="outside the epoch"):
        next(batches(_examples(), 2, pad_id=0, start=99))
