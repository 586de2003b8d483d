"""Training batches of rows of similar length, for the trainers that pad each batch to its longest row (SFT, DPO).

Random batches of our prompts and answers are a quarter to a half padding (prompts run from 40 to 160 tokens, the
SFT demonstrations from 71 to 340), and a padded token costs as much as a real one. `LengthGroupedBatches` sorts
the rows by length, cuts them into batches and shuffles the order of the batches: each epoch still sees every row
once, with far less padding. transformers' own `group_by_length` sampler sorts longest first and never shuffles the
order of a small dataset's batches, so a short run would train on the longest rows only.
"""
import torch
from torch.utils.data import Sampler


class LengthGroupedBatches(Sampler[int]):
    """Row indices, one batch after another: rows sorted by length (equal lengths in random order), cut into
    batches of `batch_size`, the full batches in random order and the one short batch, if any, last (so the
    dataloader's batches are exactly these). Seeded: the same seed and epoch give the same order, which resuming
    from a checkpoint relies on."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        tie_break = torch.rand(len(self.lengths), generator=generator).tolist()
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], tie_break[i]))
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        full = [batch for batch in batches if len(batch) == self.batch_size]
        short = [batch for batch in batches if len(batch) < self.batch_size]
        return [full[i] for i in torch.randperm(len(full), generator=generator).tolist()] + short

    def __iter__(self):
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.lengths)


LENGTH_GROUPED = "length_grouped"


class LengthGroupedTraining:
    """Trainer mixin: `train_sampling_strategy: length_grouped` trains on `LengthGroupedBatches` of
    `row_lengths(dataset)`, which the trainer defines (the tokens each row pads to); any other strategy is
    transformers' own."""

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != LENGTH_GROUPED:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        seed = self.args.seed if self.args.data_seed is None else self.args.data_seed
        return LengthGroupedBatches(self.row_lengths(dataset), self._train_batch_size, seed)
