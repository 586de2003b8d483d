"""The reward objective on hand-computed values: ties, margins, weights and ensemble heads reach the loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from reward.loss import PromptGroupSampler, PreferenceCollator, PreferenceRewardTrainer, bootstrap_counts
from rlhf.preference_loss import log_tie_probability, preference_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_without_ties_the_loss_is_trls_margin_loss():
    chosen, rejected = torch.tensor([1.0, 0.2, -0.5]), torch.tensor([0.0, 0.4, -2.0])
    margin = torch.tensor([0.5, 1.0, 0.0])
    expected = -F.logsigmoid(chosen - rejected - margin).mean()
    assert torch.allclose(preference_loss(chosen, rejected, margin), expected)
    by_hand = -(math.log(sigmoid(0.5)) + math.log(sigmoid(-1.2)) + math.log(sigmoid(1.5))) / 3
    assert preference_loss(chosen, rejected, margin).item() == pytest.approx(by_hand, rel=1e-6)


def test_tie_probability_matches_rao_kupper_and_the_three_outcomes_sum_to_one():
    theta = 1.0
    for gap in (-3.0, -0.4, 0.0, 0.7, 2.5):
        tie = sigmoid(theta - gap) - sigmoid(-theta - gap)
        assert math.exp(log_tie_probability(torch.tensor(gap), theta).item()) == pytest.approx(tie, rel=1e-5)
        assert sigmoid(gap - theta) + sigmoid(-gap - theta) + tie == pytest.approx(1.0)
    # at d = 0 with theta = 1: P(tie) = sigmoid(1) - sigmoid(-1) = 0.46212, loss = 0.77193
    loss = preference_loss(torch.tensor([0.3]), torch.tensor([0.3]), tie=torch.tensor([True]), theta=1.0)
    assert loss.item() == pytest.approx(-math.log(sigmoid(1) - sigmoid(-1)), rel=1e-5)
    assert loss.item() == pytest.approx(0.77193, abs=1e-4)
    far = log_tie_probability(torch.tensor([60.0, -60.0]), theta)  # stable far from 0: no inf or nan
    assert torch.isfinite(far).all() and (far < -50).all()


def test_a_tie_pulls_the_gap_towards_zero_and_a_decided_pair_apart():
    gap = torch.tensor([0.8], requires_grad=True)
    preference_loss(gap, torch.zeros(1), tie=torch.tensor([True]), theta=1.0).backward()
    assert gap.grad.item() > 0  # gradient descent lowers a positive gap
    gap.grad = None
    preference_loss(gap, torch.zeros(1), tie=torch.tensor([False]), theta=1.0).backward()
    assert gap.grad.item() < 0  # ... and raises it for a decided pair


def test_mixed_batch_with_ties_margins_and_theta():
    chosen, rejected = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([0.0, 0.5, 0.8])
    tie, margin, theta = torch.tensor([False, True, False]), torch.tensor([0.5, 0.0, 1.0]), 0.7
    by_hand = -(math.log(sigmoid(2.0 - 0.7 - 0.5)) + math.log(sigmoid(0.7) - sigmoid(-0.7))
                + math.log(sigmoid(0.2 - 0.7 - 1.0))) / 3
    assert preference_loss(chosen, rejected, margin, tie, theta=theta).item() == pytest.approx(by_hand, rel=1e-5)
    with pytest.raises(ValueError, match="tie threshold"):
        preference_loss(chosen, rejected, margin, tie, theta=0.0)


def test_weights_and_heads():
    chosen, rejected = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0])
    # the mean over the batch's pairs of weight x loss: weights keep their meaning from batch to batch (a batch of
    # one ranking's pairs, each a sixth of a vote, weighs a sixth of a batch of whole votes)
    first = -math.log(sigmoid(1.0))
    assert preference_loss(chosen, rejected, weight=torch.tensor([1.0, 0.0])).item() == pytest.approx(first / 2)
    second = -math.log(sigmoid(-1.0))
    weighted = (0.9 * first + 0.3 * second) / 2
    assert preference_loss(chosen, rejected, weight=torch.tensor([0.9, 0.3])).item() == pytest.approx(weighted)
    sixth = preference_loss(chosen, rejected, weight=torch.full((2,), 1 / 6)).item()
    assert sixth == pytest.approx(preference_loss(chosen, rejected).item() / 6)
    # two heads: head 0 sees only pair 0, head 1 both pairs twice; the loss is the mean of the two heads' losses
    heads_chosen, heads_rejected = torch.tensor([[1.0, 2.0], [-1.0, 0.5]]), torch.zeros(2, 2)
    counts = torch.tensor([[1.0, 2.0], [0.0, 2.0]])
    head0 = -math.log(sigmoid(1.0)) / 2
    head1 = -(math.log(sigmoid(2.0)) + math.log(sigmoid(0.5)))
    assert preference_loss(heads_chosen, heads_rejected, weight=counts).item() == pytest.approx((head0 + head1) / 2)
    centred = preference_loss(chosen, rejected, center_coefficient=0.1).item()
    assert centred == pytest.approx((first + second) / 2 + 0.1 * (1 + 1) / 2)


def test_bootstrap_counts_are_fixed_by_id_and_average_one():
    assert bootstrap_counts("x", 1, 0) == [1.0]
    assert bootstrap_counts("pair-7", 4, 0) == bootstrap_counts("pair-7", 4, 0)
    draws = [c for i in range(2000) for c in bootstrap_counts(f"pair-{i}", 3, 1)]
    assert abs(sum(draws) / len(draws) - 1.0) < 0.05 and 0.3 < draws.count(0.0) / len(draws) < 0.44  # e^-1


class TwoNumberModel(torch.nn.Module):
    """A 'reward model' that returns the first input id as the reward, so the loss can be checked by hand."""

    training = True

    def forward(self, input_ids, attention_mask, use_cache=False):
        return type("Output", (), {"logits": input_ids[:, :1].float()})()


def test_ties_and_margins_from_the_collated_batch_reach_the_trainers_loss():
    collator = PreferenceCollator(pad_token_id=0)
    batch = collator([{"chosen_ids": [3, 9], "rejected_ids": [1], "margin": 0.5, "tie": False, "weight": [1.0]},
                      {"chosen_ids": [2], "rejected_ids": [2, 7, 7], "margin": 0.0, "tie": True, "weight": [2.0]}])
    assert batch["tie"].tolist() == [False, True] and batch["weight"].shape == (2, 1)
    trainer = PreferenceRewardTrainer.__new__(PreferenceRewardTrainer)  # only compute_loss is exercised
    trainer.tie_threshold, trainer.pooling = 1.0, "last_token"
    trainer.args = type("Args", (), {"center_rewards_coefficient": None})()
    trainer.model = TwoNumberModel()
    trainer.accelerator = type("Acc", (), {"gather_for_metrics": staticmethod(lambda x: x.reshape(-1))})()
    trainer._metrics = {"train": __import__("collections").defaultdict(list)}
    loss = trainer.compute_loss(trainer.model, batch)
    decided = -math.log(sigmoid(3 - 1 - 1.0 - 0.5))  # gap 2, theta 1, margin 0.5
    tied = -math.log(sigmoid(1.0) - sigmoid(-1.0))  # gap 0
    assert loss.item() == pytest.approx((decided + 2 * tied) / 2, rel=1e-5)  # the mean over 2 pairs of weight x loss
    assert trainer._metrics["train"]["accuracy"] == [1.0]


@pytest.mark.parametrize("pooling", ["last_token", "answer_mean"])
def test_sharing_the_prompt_and_answers_gives_the_same_rewards_loss_and_gradients(tiny_model_path, pooling):
    from transformers import AutoModelForSequenceClassification

    from rlhf.reward_model import reward_tokenizer

    tokenizer = reward_tokenizer(str(tiny_model_path))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    vocab = [i for i in range(10, 900) if i != tokenizer.pad_token_id]
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return [vocab[i] for i in torch.randint(len(vocab), (n,), generator=g).tolist()]

    examples = []
    for prompt_len, chosen_len, rejected_len in ((9, 5, 12), (3, 7, 2), (14, 1, 6), (5, 4, 4)):
        prompt = ids(prompt_len)
        examples.append({"chosen_ids": prompt + ids(chosen_len), "rejected_ids": prompt + ids(rejected_len),
                         "margin": 0.5, "tie": prompt_len == 3, "weight": [1.0, 2.0], "answer_start": prompt_len})
    examples.append({"chosen_ids": [11, 12, 13], "rejected_ids": [11, 12, 13, 14], "margin": 0.0, "tie": False,
                     "weight": [1.0, 1.0], "answer_start": 2})  # one answer a prefix of the other
    prompt, answers = ids(6), [ids(3), ids(5), ids(1)]  # three answers to one prompt, all three pairs, in a group
    answers[1][:2] = answers[0][:2]  # two answers that open alike: the group's prefix still stops at the prompt
    for better, worse in ((0, 1), (2, 0), (2, 1)):
        examples.insert(better + 1, {"chosen_ids": prompt + answers[better], "rejected_ids": prompt + answers[worse],
                                     "margin": 1.0, "tie": False, "weight": [1.0, 0.0], "group": "p",
                                     "answer_start": 6})
    unshareable = [{**examples[0], "rejected_ids": [5] + examples[0]["rejected_ids"]}]
    assert "prefix_ids" not in PreferenceCollator(pad_token_id=0, share_prompt=True)(unshareable)

    def loss_and_grads(share, multiple=None):
        model.zero_grad()
        batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, share_prompt=share,
                                   pad_to_multiple_of=multiple)(examples)
        assert all(batch[key].shape[1] % (multiple or 1) == 0 for key in batch if key.endswith(("_ids", "_mask")))
        assert ("prefix_ids" in batch) == share
        # each distinct sequence runs once: the grouped prompt's three answers serve its three pairs
        assert len(batch["suffix_ids" if share else "input_ids"]) == 2 * len(examples) - 3
        assert not share or len(batch["prefix_ids"]) == len(examples) - 2
        trainer = PreferenceRewardTrainer.__new__(PreferenceRewardTrainer)
        trainer.tie_threshold, trainer.model, trainer.pooling = 1.0, model, pooling
        trainer.args = type("Args", (), {"center_rewards_coefficient": 0.01})()
        trainer.accelerator = type("Acc", (), {"gather_for_metrics": staticmethod(lambda x: x.reshape(-1))})()
        trainer._metrics = {"train": __import__("collections").defaultdict(list)}
        loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
        loss.backward()
        return loss.item(), outputs["rewards"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    model.train()
    whole_loss, whole_rewards, whole_grads = loss_and_grads(False)
    shared_loss, shared_rewards, shared_grads = loss_and_grads(True)
    assert shared_loss == pytest.approx(whole_loss, rel=1e-5)
    assert torch.allclose(shared_rewards, whole_rewards, atol=1e-5)
    for share in (False, True):  # rows padded to a multiple of 8 (pad_to_multiple_of) score the same
        padded_loss, padded_rewards, _ = loss_and_grads(share, multiple=8)
        assert padded_loss == pytest.approx(whole_loss, rel=1e-5)
        assert torch.allclose(padded_rewards, whole_rewards, atol=1e-5)
    with torch.no_grad():  # and both are each pair's two sequences run alone, read as the pooling says
        alone = [alone_reward(model, e[side], e["answer_start"], pooling) for side in ("chosen_ids", "rejected_ids")
                 for e in examples]
    assert torch.allclose(torch.stack(alone), whole_rewards, atol=1e-5)
    for name, grad in whole_grads.items():
        assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=1e-4), name


def alone_reward(model, ids: list[int], answer_start: int, pooling: str) -> torch.Tensor:
    """One sequence's reward by hand: the head at its last token, or its mean over the answer's tokens."""
    hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    per_token = model.score(hidden)
    return per_token[-1] if pooling == "last_token" else per_token[answer_start:].mean(0)


def test_prompt_group_sampler_keeps_a_prompts_pairs_together_and_reshuffles_each_epoch():
    groups = ["a", "b", "a", "c", "b", "a", "d"]
    sampler = PromptGroupSampler(groups, seed=3)
    passes = []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        passes.append(list(sampler))
    for order in passes:
        assert sorted(order) == list(range(7)) and len(sampler) == 7
        runs = [groups[i] for i in order]
        assert all(runs.index(g) + runs.count(g) - 1 == len(runs) - 1 - runs[::-1].index(g) for g in set(groups))
    assert len({tuple(order) for order in passes}) > 1
    resumed = PromptGroupSampler(groups, seed=3)  # a new process resuming in epoch 4 sees epoch 4's order
    resumed.set_epoch(4)
    assert list(resumed) == passes[4]


def test_the_reward_trainer_batches_each_prompts_pairs_together_and_runs_each_answer_once(tmp_path, tiny_model_path):
    import datasets

    from reward.config import RewardStageConfig
    from rlhf.reward_model import load_reward_model, reward_tokenizer

    tokenizer = reward_tokenizer(str(tiny_model_path))
    rows = []
    for topic in ("rain", "bread", "owls", "tea"):  # three answers per prompt, all three pairs
        prompt = [{"role": "user", "content": f"Tell me about {topic}."}]
        answers = [[{"role": "assistant", "content": f"{topic} {word}"}] for word in ("is fine", "is good", "ok")]
        rows += [{"prompt": prompt, "chosen": answers[i], "rejected": answers[j], "tie": False, "weight": [1.0],
                  "group": topic} for i, j in ((0, 1), (0, 2), (1, 2))]
    args = RewardStageConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to="none", seed=5)
    trainer = PreferenceRewardTrainer(
        model=load_reward_model(str(tiny_model_path), tokenizer), args=args,
        train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
        data_collator=PreferenceCollator(pad_token_id=tokenizer.pad_token_id, share_prompt=True))
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 4
    for batch in batches:  # one prompt per batch: its prefix once, its three answers once for three pairs
        assert len(batch["prefix_ids"]) == 1 and len(batch["suffix_ids"]) == 3
        assert sorted(zip(batch["chosen_row"].tolist(), batch["rejected_row"].tolist())) == [(0, 1), (0, 2), (1, 2)]


def test_a_ranking_items_consensus_order_comes_from_its_pairs_wins():
    from reward.loss import consensus_ranks

    # rows 7 > 8 > 9 from three decided pairs; with 8 and 9 tied, they share the second place
    assert consensus_ranks([7, 8, 9], [(7, 8, False), (7, 9, False), (8, 9, False)]) == [1, 2, 3]
    assert consensus_ranks([7, 8, 9], [(7, 8, False), (7, 9, False), (8, 9, True)]) == [1, 2, 2]
    assert consensus_ranks([7, 8], [(8, 7, False)]) == [2, 1]


def test_plackett_luce_terms_for_ranking_items_beside_plain_pairs_by_hand():
    import math

    import torch

    from reward.loss import pairs_and_rankings_loss

    rows = torch.tensor([[2.0], [1.0], [0.0], [1.0], [0.0]])  # rewards of five answers, one head
    chosen, rejected = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4])
    ranking = torch.tensor([5, 5, 5, -1])  # the first three pairs are one ranking item, the last a plain pair
    weights = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])  # the ranking's pairs a third of a vote each
    loss = pairs_and_rankings_loss(rows, chosen, rejected, ranking, None, torch.zeros(4, dtype=torch.bool),
                                   weights, 0.0, None)
    plackett_luce = math.log(math.e ** 2 + math.e + 1) - 2 + math.log(math.e + 1) - 1  # order 0 > 1 > 2
    bradley_terry = -math.log(1 / (1 + math.exp(-1.0)))  # answer 3 over 4, gap 1
    assert loss.item() == pytest.approx((plackett_luce + bradley_terry) / 2, abs=1e-5)
    # weights scaled to a mean of 1 over the rows (rlhf.preference_pairs): the ranking still weighs as the vote
    scaled = pairs_and_rankings_loss(rows, chosen, rejected, ranking, None, torch.zeros(4, dtype=torch.bool),
                                     weights / weights.mean(), 0.0, None)
    assert scaled.item() == pytest.approx(loss.item() / weights.mean().item(), rel=1e-5)
