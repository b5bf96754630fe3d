"""Training batches in a seeded order that a checkpoint can resume exactly, whatever the micro-batch size.

The position counts examples, not batches, so a run that halved its micro-batch after running out of memory (or
was resumed with a different one) continues with the next unseen example of the same epoch.
"""

from collections.abc import Iterator

import torch

from edgetune.train.batching import batches

Batch = dict[str, torch.Tensor]


class BatchStream:
    """An endless stream of micro-batches: epoch after epoch, each shuffled by (seed, epoch)."""

    def __init__(self, examples: list, micro_batch: int, pad: int, seed: int, position: dict[str, int]) -> None:
        self.examples, self.micro_batch, self.pad, self.seed = examples, micro_batch, pad, seed
        self.epoch, self.consumed = position["epoch"], position["examples"]
        if self.consumed >= len(examples):  # saved right after the epoch's last (partial) batch
            self.epoch, self.consumed = self.epoch + 1, 0
        self._iterator = self._epoch_iterator()

    def _epoch_iterator(self) -> Iterator[Batch]:
        # The order depends on (seed, epoch) only, so skipping consumed // micro_batch batches lands exactly.
        return batches(
            self.examples,
            self.micro_batch,
            self.pad,
            shuffle=True,
            seed=self.seed,
            epoch=self.epoch,
            start=self.consumed // self.micro_batch,
        )

    def __next__(self) -> Batch:
        try:
            item = next(self._iterator)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._iterator = self._epoch_iterator()
            item = next(self._iterator)
        self.consumed += item["input_ids"].shape[0]
        return item

    def take(self, count: int, device: torch.device) -> list[Batch]:
        """The next ``count`` micro-batches (one optimizer step's worth), on ``device``."""
        return [{key: value.to(device) for key, value in next(self).items()} for _ in range(count)]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "examples": self.consumed}
