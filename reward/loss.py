"""The reward model's training: TRL's RewardTrainer with our objective (rlhf/preference_loss.py: a Bradley-Terry
likelihood that also knows ties, margins and vote weights, shared with DPO), shared prompts and ensemble heads.

Chosen and rejected share their opening tokens (the prompt, and the chat template's start of the answer). With
`share_prompt` those run once per pair: a first pass over the shared tokens keeps their keys and values, which are
repeated for both answers, and a second pass runs only the two answers on top. The loss and its gradients are the
same as running both whole sequences (a test checks it); the tokens computed are fewer.

An ensemble is several one-output heads on one backbone. Each head sees its own bootstrap resample of the pairs
(a Poisson(1) count per pair and head, fixed by the pair id), so the heads disagree where the data is thin; their
spread is the model's uncertainty and their mean is the reward.
"""
import hashlib
import math
import random
from dataclasses import dataclass

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from rlhf.preference_loss import preference_loss


def bootstrap_counts(pair_id: str, heads: int, seed: int) -> list[float]:
    """Poisson(1) resampling counts of one pair for each head, the same for the same id and seed."""
    if heads == 1:
        return [1.0]
    rng = random.Random(hashlib.sha256(f"{seed}:{pair_id}".encode()).hexdigest())
    counts = []
    for _ in range(heads):  # Knuth's Poisson sampler, lambda = 1
        k, p = 0, rng.random()
        while p > math.exp(-1):
            k, p = k + 1, p * rng.random()
        counts.append(float(k))
    return counts


def shared_length(chosen: list[int], rejected: list[int]) -> int:
    """Leading tokens the two sequences share, leaving each at least its last token to be scored at."""
    length, limit = 0, min(len(chosen), len(rejected)) - 1
    while length < limit and chosen[length] == rejected[length]:
        length += 1
    return length


@dataclass
class PreferenceCollator(DataCollatorForPreference):
    """TRL's collator (chosen rows, then rejected rows, right-padded) plus each pair's tie flag and weights. With
    `share_prompt` the rows are split instead: the tokens both answers share, left-padded (one row per pair), and
    what follows them, right-padded (chosen and rejected of each pair side by side)."""

    share_prompt: bool = False

    def torch_call(self, examples):
        shared = [shared_length(e["chosen_ids"], e["rejected_ids"]) for e in examples] if self.share_prompt else []
        if shared and min(shared) > 0:
            batch = self.shared_prefix_batch(examples, shared)
        else:  # nothing to share in some pair: the whole sequences
            batch = super().torch_call(examples)
        batch["tie"] = torch.tensor([bool(example["tie"]) for example in examples])
        batch["weight"] = torch.tensor([example["weight"] for example in examples], dtype=torch.float)
        return batch

    def shared_prefix_batch(self, examples, shared: list[int]) -> dict:
        prefixes, suffixes = [], []
        for example, length in zip(examples, shared):
            chosen, rejected = example["chosen_ids"], example["rejected_ids"]
            prefixes.append(torch.tensor(chosen[:length]))
            suffixes += [torch.tensor(chosen[length:]), torch.tensor(rejected[length:])]
        batch = {"prefix_ids": pad(prefixes, padding_value=self.pad_token_id, padding_side="left"),
                 "prefix_mask": pad([torch.ones_like(p) for p in prefixes], padding_value=0, padding_side="left"),
                 "suffix_ids": pad(suffixes, padding_value=self.pad_token_id, padding_side="right"),
                 "suffix_mask": pad([torch.ones_like(s) for s in suffixes], padding_value=0, padding_side="right")}
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([example["margin"] for example in examples], dtype=torch.float)
        return batch


def shared_prefix_rewards(model, batch: dict) -> torch.Tensor:
    """[2 * pairs, heads] rewards, chosen rows first, from a shared-prefix batch (see PreferenceCollator)."""
    prefix_mask = batch["prefix_mask"]
    positions = (prefix_mask.cumsum(-1) - 1).clamp_min(0)
    cache = model(input_ids=batch["prefix_ids"], attention_mask=prefix_mask, position_ids=positions,
                  use_cache=True).past_key_values
    cache.batch_repeat_interleave(2)  # one copy of each pair's prefix for its chosen and its rejected answer
    suffix_mask = batch["suffix_mask"]
    start = prefix_mask.sum(-1).repeat_interleave(2)[:, None]
    logits = model(input_ids=batch["suffix_ids"], past_key_values=cache, use_cache=True,
                   attention_mask=torch.cat([prefix_mask.repeat_interleave(2, dim=0), suffix_mask], dim=-1),
                   position_ids=start + torch.arange(suffix_mask.shape[1], device=start.device)).logits
    return torch.cat([logits[0::2], logits[1::2]])


class PreferenceRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer with `preference_loss`: ties, margins, weights and ensemble heads reach the loss."""

    def __init__(self, *args, model, tie_threshold: float = 0.0, **kwargs):
        # TRL refuses models with several outputs because its loss reads one; ours reads every head, so the
        # check is passed with the label count it expects and the real one restored.
        heads, labels = model.config.num_labels, (model.config.id2label, model.config.label2id)
        model.config.num_labels = 1
        try:
            super().__init__(*args, model=model, **kwargs)
        finally:
            model.config.num_labels = heads
            model.config.id2label, model.config.label2id = labels
        self.tie_threshold = tie_threshold

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "tie", "weight"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        margin, tie, weight = inputs.pop("margin", None), inputs.pop("tie"), inputs.pop("weight")
        if "prefix_ids" in inputs:
            rewards = shared_prefix_rewards(model, inputs)
        else:
            rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            use_cache=False).logits
        chosen, rejected = torch.chunk(rewards, chunks=2)
        loss = preference_loss(chosen, rejected, margin, tie, weight, self.tie_threshold,
                               self.args.center_rewards_coefficient)
        with torch.no_grad():
            gap = (chosen - rejected).mean(-1)
            decided = ~tie.to(gap.device)
            accuracy = (gap[decided] > 0).float().mean() if decided.any() else gap.new_tensor(float("nan"))
            for name, value in (("accuracy", accuracy), ("margin", gap.mean()), ("mean_reward", rewards.mean())):
                self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).nanmean().item())
        return (loss, {"rewards": rewards}) if return_outputs else loss
