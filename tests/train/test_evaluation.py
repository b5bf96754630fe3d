import torch

from edgetune.plan.sources import resolve_model
from edgetune.train import chunked_loss
from edgetune.train.chunked_loss import streamed_loss_sum
from edgetune.train.evaluation import held_out_loss
from edgetune.train.loading import LoraSettings, load_model


def batch(length=300):
    ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :17] = -100  # a masked prompt
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    labels[1, -5:] = -100  # padding
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_streamed_loss_equals_the_models_own_loss(tiny_model_dir, monkeypatch):
    model = load_model(resolve_model(str(tiny_model_dir)), "fp32", lora=LoraSettings(rank=4)).eval()
    monkeypatch.setattr(chunked_loss, "loss_chunk_positions", lambda vocab: 64)  # several chunks, one partial
    data = batch()
    total, count = streamed_loss_sum(model, data)
    with torch.no_grad():
        expected = model(**data).loss
    assert count == int((data["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(torch.tensor(total / count), expected, rtol=1e-5, atol=1e-6)


def test_held_out_loss_weights_batches_by_tokens(tiny_model_dir):
    model = load_model(resolve_model(str(tiny_model_dir)), "fp32")
    examples = [{"input_ids": torch.arange(n) % 128, "labels": torch.arange(n) % 128, "length": n} for n in (40, 9, 25)]
    by_hand = sum(streamed_loss_sum(model, _single(e))[0] for e in examples) / sum(e["length"] - 1 for e in examples)
    assert abs(held_out_loss(model, examples, 2, 0, "cpu") - by_hand) < 1e-4
    assert model.training  # restored after evaluation


def _single(example):
    ids = example["input_ids"].unsqueeze(0)
    return {"input_ids": ids, "labels": example["labels"].unsqueeze(0), "attention_mask": torch.ones_like(ids)}
