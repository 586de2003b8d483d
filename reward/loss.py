"""The reward model's training: TRL's RewardTrainer with our objective (rlhf/preference_loss.py: a Bradley-Terry
likelihood that also knows ties, margins and vote weights, shared with DPO), shared prompts and ensemble heads.

With k answers to a prompt and all their pairs, each answer is in k - 1 pairs. A batch holds whole prompts (the
pairs of one prompt one after another) and runs each distinct answer once, reading its reward for every pair it is
in: k sequences per prompt instead of k(k - 1). The answers to one prompt also share their opening tokens (the
prompt and the chat template's start of the answer). With `share_prompt` those run once per prompt: a first pass
over the shared tokens keeps their keys and values, copied for each answer, and a second pass runs only the
answers on top. The loss and its gradients are the same as running every pair's two whole sequences (a test
checks it); the tokens computed are far fewer.

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

from rlhf.batching import MultiplePadding, PromptGroupSampler, shared_prefix_inputs, unique_rows
from rlhf.preference_loss import plackett_luce_loss, preference_loss
from rlhf.rankings import ranks_in_order
from rlhf.reward_model import pooled_rewards


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


def common_prefix(sequences: list[list[int]]) -> int:
    """Leading tokens all the sequences share, leaving each at least its last token to be scored at."""
    first, limit = sequences[0], min(len(s) for s in sequences) - 1
    length = 0
    while length < limit and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


def shared_length(group: list[dict]) -> int:
    """Tokens a prompt group's sequences share, stopping where an answer begins when the examples say where
    (`answer_start`: an answer-mean reward reads every answer token, so none may run in the shared part)."""
    shared = common_prefix([s for example in group for s in pair_ids(example)])
    return min([shared] + [example["answer_start"] for example in group if example.get("answer_start")])


@dataclass
class PreferenceCollator(MultiplePadding, DataCollatorForPreference):
    """Each distinct sequence of the batch once (right-padded rows), with the row of each pair's chosen and
    rejected answer, its tie flag and its weights: pairs of one prompt that share answers (k answers, all pairs)
    run each answer once. With `share_prompt` the rows are split instead: the tokens every answer to one prompt
    shares, once per prompt (left-padded; a prompt is an example's `group`, or the pair alone), and each distinct
    answer on top of its prompt (right-padded)."""

    share_prompt: bool = False

    def torch_call(self, examples):
        groups = prompt_groups(examples) if self.share_prompt else []
        shared = [shared_length([examples[i] for i in group]) for group in groups]
        if shared and min(shared) > 0:
            batch = self.shared_prefix_batch(examples, groups, shared)
        else:  # nothing to share in some pair: the whole sequences
            batch = self.whole_sequence_batch(examples)
        batch["tie"] = torch.tensor([bool(example["tie"]) for example in examples])
        batch["weight"] = torch.tensor([example["weight"] for example in examples], dtype=torch.float)
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([example["margin"] for example in examples], dtype=torch.float)
        if "ranking" in examples[0]:
            batch["ranking"] = torch.tensor([example["ranking"] for example in examples])
        return batch

    def whole_sequence_batch(self, examples) -> dict:
        rows, index = unique_rows([tuple(s) for e in examples for s in pair_ids(e)])
        starts = dict(zip(index, (e.get("answer_start", 0) for e in examples for _ in range(2))))
        return {"input_ids": self.padded([torch.tensor(r) for r in rows], self.pad_token_id, "right"),
                "attention_mask": self.padded([torch.ones(len(r), dtype=torch.long) for r in rows], 0, "right"),
                "answer_mask": self.padded([(torch.arange(len(r)) >= starts[i]).long() for i, r in enumerate(rows)],
                                           0, "right"),
                "chosen_row": torch.tensor(index[0::2]), "rejected_row": torch.tensor(index[1::2])}

    def shared_prefix_batch(self, examples, groups: list[list[int]], shared: list[int]) -> dict:
        prefixes, answers, prompt_left = [], [], []
        for group, length in zip(groups, shared):
            prefixes.append(torch.tensor(examples[group[0]]["chosen_ids"][:length]))
            prompt_left.append(max(0, (examples[group[0]].get("answer_start") or 0) - length))
            answers += [(len(prefixes) - 1, tuple(s[length:])) for i in group for s in pair_ids(examples[i])]
        order = [i for group in groups for i in group]  # answers are listed group by group
        rows, index = unique_rows(answers)
        pair_rows = [0] * (2 * len(examples))
        for position, example in enumerate(order):
            pair_rows[2 * example], pair_rows[2 * example + 1] = index[2 * position], index[2 * position + 1]
        return {"prefix_ids": self.padded(prefixes, self.pad_token_id, "left"),
                "prefix_mask": self.padded([torch.ones_like(p) for p in prefixes], 0, "left"),
                "suffix_ids": self.padded([torch.tensor(answer) for _, answer in rows], self.pad_token_id, "right"),
                "suffix_mask": self.padded([torch.ones(len(answer), dtype=torch.long) for _, answer in rows], 0,
                                           "right"),
                "answer_mask": self.padded([(torch.arange(len(answer)) >= prompt_left[prefix]).long()
                                            for prefix, answer in rows], 0, "right"),
                "suffix_prefix": torch.tensor([prefix for prefix, _ in rows]),
                "chosen_row": torch.tensor(pair_rows[0::2]), "rejected_row": torch.tensor(pair_rows[1::2])}


def pair_ids(example: dict) -> tuple[list[int], list[int]]:
    return example["chosen_ids"], example["rejected_ids"]


def prompt_groups(examples: list[dict]) -> list[list[int]]:
    """Positions of the examples in each prompt group, in first-seen order (no `group`: each pair alone)."""
    groups: dict = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.get("group", i), []).append(i)
    return list(groups.values())


def shared_prefix_rewards(model, batch: dict, pooling: str = "last_token") -> torch.Tensor:
    """[answer rows, heads] rewards from a shared-prefix batch (see PreferenceCollator)."""
    _, suffix_inputs = shared_prefix_inputs(model, batch)
    return pooled_rewards(model, pooling, batch["answer_mask"], **suffix_inputs)


def consensus_ranks(answers: list[int], pairs: list[tuple[int, int, bool]]) -> list[int]:
    """Ranks (1 the best, equal wins tied) of a ranking item's answers from its pairs' verdicts, (better, worse,
    tied): each answer ranked by its wins, a tie half a win to each."""
    wins = dict.fromkeys(answers, 0.0)
    for better, worse, tied in pairs:
        wins[better] += 0.5 if tied else 1.0
        wins[worse] += 0.5 if tied else 0.0
    scores = [wins[answer] for answer in answers]
    return ranks_in_order(sorted(range(len(answers)), key=lambda i: -scores[i]), scores, 0.0)


def pairs_and_rankings_loss(rows: torch.Tensor, chosen_row: torch.Tensor, rejected_row: torch.Tensor,
                            ranking: torch.Tensor, margin, tie: torch.Tensor, weight: torch.Tensor, theta: float,
                            center_coefficient) -> torch.Tensor:
    """The batch's loss with ranking items as Plackett-Luce terms: the pairs of no ranking (ranking -1) by the
    weighted pair loss, each ranking item by one Plackett-Luce likelihood of its consensus order, weighted by its
    pairs' weights summed (one vote for a whole ranking, scaled as the plain pairs' weights are), averaged over
    heads; the mean over the batch's items (a plain pair or a ranking). A ranking whose pairs a batch boundary cuts
    counts as its part in each batch."""
    plain = ranking < 0
    weight = weight if weight.dim() == 2 else weight[:, None]
    parts, total = [], 0
    if plain.any():
        plain_pairs = int(plain.sum())
        pair_loss = preference_loss(rows[chosen_row[plain]], rows[rejected_row[plain]],
                                    None if margin is None else margin[plain], tie[plain], weight[plain], theta,
                                    center_coefficient)
        parts.append(pair_loss * plain_pairs)
        total += plain_pairs
    for item in ranking[~plain].unique():
        mine = (ranking == item).nonzero().flatten().tolist()
        answers = sorted({chosen_row[i].item() for i in mine} | {rejected_row[i].item() for i in mine})
        ranks = consensus_ranks(answers, [(chosen_row[i].item(), rejected_row[i].item(), bool(tie[i])) for i in mine])
        rewards = rows[answers]  # [answers, heads]
        parts.append(torch.stack([plackett_luce_loss(rewards[:, head], ranks) * weight[mine, head].float().sum()
                                  for head in range(rewards.shape[1])]).mean())
        total = total + 1
    return torch.stack(parts).sum() / total


class PreferenceRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer with `preference_loss`: ties, margins, weights and ensemble heads reach the loss."""

    def __init__(self, *args, model, tie_threshold: float = 0.0, pooling: str = "last_token", **kwargs):
        # TRL refuses models with several outputs because its loss reads one; ours reads every head, so the
        # check is passed with the label count it expects and the real one restored.
        heads, labels = model.config.num_labels, (model.config.id2label, model.config.label2id)
        model.config.num_labels = 1
        try:
            super().__init__(*args, model=model, **kwargs)
        finally:
            model.config.num_labels = heads
            model.config.id2label, model.config.label2id = labels
        self.tie_threshold, self.pooling = tie_threshold, pooling

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "tie", "weight", "group",
                                       "answer_start", "ranking"]

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if "group" in dataset.column_names:
            return PromptGroupSampler(dataset["group"], self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        margin, tie, weight = inputs.pop("margin", None), inputs.pop("tie"), inputs.pop("weight")
        ranking = inputs.pop("ranking", None)
        if "prefix_ids" in inputs:
            rows = shared_prefix_rewards(model, inputs, self.pooling)
        else:
            rows = pooled_rewards(model, self.pooling, inputs["answer_mask"], input_ids=inputs["input_ids"],
                                  attention_mask=inputs["attention_mask"], use_cache=False)
        chosen, rejected = rows[inputs["chosen_row"]], rows[inputs["rejected_row"]]
        rewards = torch.cat([chosen, rejected])
        if ranking is not None and (ranking >= 0).any():
            loss = pairs_and_rankings_loss(rows, inputs["chosen_row"], inputs["rejected_row"], ranking, margin, tie,
                                           weight, self.tie_threshold, self.args.center_rewards_coefficient)
        else:
            loss = preference_loss(chosen, rejected, margin, tie, weight, self.tie_threshold,
                                   self.args.center_rewards_coefficient)
        with torch.no_grad():
            gap = (chosen - rejected).mean(-1)
            decided = ~tie.to(gap.device)
            accuracy = (gap[decided] > 0).float().mean() if decided.any() else gap.new_tensor(float("nan"))
            for name, value in (("accuracy", accuracy), ("margin", gap.mean()), ("mean_reward", rewards.mean())):
                self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).nanmean().item())
        return (loss, {"rewards": rewards}) if return_outputs else loss
