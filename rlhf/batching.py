"""Training batches: rows of similar length, for the trainers that pad each batch to its longest row (SFT, DPO).

Random batches of our prompts and answers are a quarter to a half padding (prompts run from 40 to 160 tokens, the
SFT demonstrations from 71 to 340), and a padded token costs as much as a real one. `LengthGroupedBatches` sorts
the rows by length, cuts them into batches and shuffles the order of the batches: each epoch still sees every row
once, with far less padding. transformers' own `group_by_length` sampler sorts longest first and never shuffles the
order of a small dataset's batches, so a short run would train on the longest rows only.

`PromptGroupSampler` batches by prompt instead, for the trainers that run each distinct answer of a batch once
(reward, DPO): with k answers to a prompt and all their pairs, a batch of whole prompts runs k sequences per prompt
instead of k(k - 1).
"""
import json
import math
import random

import torch
from torch.utils.data import Sampler

from rlhf.decoding import cache_argument


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


class PromptGroupSampler(torch.utils.data.Sampler):
    """Pairs in a random order of prompts, the pairs of each prompt one after another (so a batch holds whole
    prompts and runs each of their answers once). The order is fixed by the seed and the epoch (the trainer sets
    it), so a run resumed in any epoch sees the batches an uninterrupted one would."""

    def __init__(self, groups: list[str], seed: int):
        members: dict[str, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        self.members, self.seed, self.epoch = list(members.values()), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return sum(len(m) for m in self.members)

    def __iter__(self):
        order = self.members[:]
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return iter([index for group in order for index in group])


def longest_sequence(tokenizer, pairs: list[dict], max_length: int | None) -> int:
    """Tokens in the longest prompt + answer (at most max_length): a batch is padded to its longest row."""
    longest = max(len(tokenizer.apply_chat_template(p["prompt"] + p[side], tokenize=True)["input_ids"])
                  for p in pairs for side in ("chosen", "rejected"))
    return min(longest, max_length or longest)


def sequences_per_step(pairs_per_step: int, pairs: list[dict], by_prompt: bool) -> int:
    """Sequences a training step runs: both answers of each pair, or with batches of whole prompts each distinct
    answer once (the mean number of distinct answers a pair brings, plus one prompt's answers for a prompt a batch's
    edge cuts)."""
    if not by_prompt:
        return 2 * pairs_per_step
    answers: dict[str, set] = {}
    for pair in pairs:
        answers.setdefault(json.dumps(pair["prompt"]), set()).update(
            {json.dumps(pair["chosen"]), json.dumps(pair["rejected"])})
    per_pair = sum(len(group) for group in answers.values()) / len(pairs)
    return min(2 * pairs_per_step, math.ceil(per_pair * pairs_per_step) + max(len(group) for group in answers.values()))


def unique_rows(sequences: list[tuple]) -> tuple[list[tuple], list[int]]:
    """(the distinct sequences in first-seen order, each input's row among them)."""
    rows: dict[tuple, int] = {}
    index = [rows.setdefault(s, len(rows)) for s in sequences]
    return list(rows), index


def shared_prefix_inputs(model, batch: dict, **prefix_kwargs) -> tuple:
    """Runs each prompt of a shared-prefix batch once (`prefix_ids`, left-padded) and returns its output with the
    inputs that run each answer row (`suffix_ids`, right-padded, `suffix_prefix` its prompt) on a copy of its
    prompt's keys and values."""
    prefix_mask, owner = batch["prefix_mask"], batch["suffix_prefix"]
    prefix = model(input_ids=batch["prefix_ids"], attention_mask=prefix_mask,
                   position_ids=(prefix_mask.cumsum(-1) - 1).clamp_min(0), use_cache=True, **prefix_kwargs)
    cache = prefix.past_key_values
    cache.batch_select_indices(owner)
    suffix_mask, start = batch["suffix_mask"], prefix_mask.sum(-1)[owner][:, None]
    return prefix, {"input_ids": batch["suffix_ids"], "use_cache": True, cache_argument(model): cache,
                    "attention_mask": torch.cat([prefix_mask[owner], suffix_mask], dim=-1),
                    "position_ids": start + torch.arange(suffix_mask.shape[1], device=start.device)}


class MultiplePadding:
    """Collator mixin: rows padded to one length, rounded up to the collator's `pad_to_multiple_of` (its field)."""

    def padded(self, rows: list[torch.Tensor], value: int, side: str) -> torch.Tensor:
        from trl.trainer.utils import pad

        return pad(rows, padding_value=value, padding_side=side, pad_to_multiple_of=self.pad_to_multiple_of)


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
