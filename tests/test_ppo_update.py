"""PPO update steps on the tiny model: with the policy equal to its reference, the first minibatch sees no KL, a
ratio of 1 and nothing clipped; the update then moves the policy towards higher-advantage tokens."""
import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from ppo.config import PPOStageConfig
from ppo.rollout import generate
from accelerate import Accelerator

from ppo.update import (Critic, critic_forward, full_sequences, length_groups, make_experience, policy_forward,
                         ppo_epochs, reference_logprobs)
from rlhf import models
from rlhf.reward_model import pooled_rewards

PROMPTS = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in ("rain", "the sea", "a cat", "bread")]


@pytest.fixture
def setup(tiny_model_path):
    torch.manual_seed(0)
    policy, tokenizer = models.load_causal_lm(str(tiny_model_path))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = Critic(AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1))
    config = PPOStageConfig(batch_size=8, num_mini_batches=2, gradient_accumulation_steps=2, num_ppo_epochs=2,
                            response_length=10, learning_rate=1e-3)
    rollout = generate(policy, tokenizer, PROMPTS * 2, config.response_length, config.temperature)
    return policy, reference, critic, config, rollout


def test_first_minibatch_against_an_identical_reference(setup):
    policy, reference, critic, config, rollout = setup
    scores = torch.linspace(-1, 1, 8)
    # Sampling log-probs come from generation's cached forward: equal to a full forward up to float error ...
    ref_logprobs = reference_logprobs(policy, reference, rollout, config.temperature)
    experience = make_experience(rollout, ref_logprobs, critic, scores, kl_coef=0.05, config=config)
    assert experience.kl.abs().max() < 1e-4
    # ... and with the same forward on both sides, k1 and k3 are exactly 0
    with torch.no_grad():
        recomputed = policy_forward(policy, rollout, config.temperature)[0] * rollout.response_mask
    for estimator in ("k1", "k3"):
        config.kl_estimator = estimator
        exact = make_experience(dataclasses.replace(rollout, logprobs=recomputed),
                                ref_logprobs, critic, scores, 0.05, config)
        assert exact.kl.abs().max() == 0
    assert torch.allclose(exact.rewards.sum(-1), scores)  # no KL: the score is the whole reward
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=config.learning_rate)
    history = ppo_epochs(policy, critic, optimizer, experience, config, torch.Generator().manual_seed(0),
                         Accelerator(cpu=True))
    assert len(history) == config.num_ppo_epochs * config.num_mini_batches
    first = history[0]
    assert abs(first["val/ratio"] - 1) < 1e-4 and first["policy/clipfrac_avg"] == 0
    assert first["policy/approxkl_avg"] < 1e-8 and first["val/clipfrac_avg"] == 0
    assert history[-1]["policy/approxkl_avg"] > 0  # later minibatches see a policy that has moved


def test_the_update_raises_the_log_probability_of_rewarded_responses(setup):
    policy, reference, critic, config, rollout = setup
    scores = torch.tensor([5.0, -5.0] * 4)  # reward the even rows, punish the odd ones
    config.num_ppo_epochs = 4
    ref_logprobs = reference_logprobs(policy, reference, rollout, config.temperature)
    experience = make_experience(rollout, ref_logprobs, critic, scores, kl_coef=0.0, config=config)
    with torch.no_grad():
        before = (policy_forward(policy, rollout, config.temperature)[0] * rollout.response_mask).sum(-1)
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=config.learning_rate)
    ppo_epochs(policy, critic, optimizer, experience, config, torch.Generator().manual_seed(0),
                         Accelerator(cpu=True))
    with torch.no_grad():
        after = (policy_forward(policy, rollout, config.temperature)[0] * rollout.response_mask).sum(-1)
    change = after - before
    assert change[0::2].mean() > 0 > change[1::2].mean()


def test_with_lora_the_reference_is_the_policy_without_its_adapter(setup):
    from peft import LoraConfig, get_peft_model

    policy, reference, critic, config, rollout = setup
    lora = get_peft_model(copy.deepcopy(policy), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ref_logprobs = reference_logprobs(lora, None, rollout, config.temperature)
    experience = make_experience(rollout, ref_logprobs, critic, torch.tensor([5.0, -5.0] * 4), 0.0, config)
    ppo_epochs(lora, critic, optimizer, experience, config, torch.Generator().manual_seed(0), Accelerator(cpu=True))
    mask = rollout.response_mask
    with torch.no_grad():
        trained = policy_forward(lora, rollout, config.temperature)[0] * mask
    original = reference_logprobs(policy, reference, rollout, config.temperature) * mask
    assert (trained - original).abs().max() > 1e-3  # the adapter learned something ...
    # ... and switching it off gives back the frozen starting policy: the reference
    assert torch.allclose(reference_logprobs(lora, None, rollout, config.temperature) * mask, original, atol=1e-5)


def test_reusing_the_experience_critic_pass_changes_nothing(setup):
    """With one minibatch, the first minibatch reuses the critic forward that made the old values: the update
    must end exactly where recomputing them ends."""
    policy, reference, critic, config, rollout = setup
    config.num_mini_batches, config.gradient_accumulation_steps, config.num_ppo_epochs = 1, 1, 2
    ref_logprobs = reference_logprobs(policy, reference, rollout, config.temperature)
    ends = []
    for reuse in (True, False):
        models = copy.deepcopy((policy, critic))
        optimizer = torch.optim.AdamW([p for m in models for p in m.parameters()], lr=config.learning_rate)
        experience = make_experience(rollout, ref_logprobs, models[1], torch.linspace(-1, 1, 8), 0.05, config)
        assert experience.live_values is not None
        if not reuse:
            experience.live_values = None
        ppo_epochs(*models, optimizer, experience, config, torch.Generator().manual_seed(0), Accelerator(cpu=True))
        ends.append(torch.cat([p.detach().flatten() for m in models for p in m.parameters()]))
    assert torch.allclose(ends[0], ends[1], atol=1e-6)
    assert not torch.allclose(ends[0], torch.cat([p.flatten() for m in (policy, critic) for p in m.parameters()]))


@pytest.mark.parametrize("pooling", ["last_token", "answer_mean"])
def test_each_value_is_the_reward_models_score_of_the_answer_so_far(setup, pooling):
    """The critic starts as the reward model: the value of the state before response token t is what the reward
    model, pooling as it was trained to, gives the sequence cut there (with answer_mean, the mean of the head from
    the token that opens the reply), on the normalised scale."""
    policy, reference, critic, config, rollout = setup
    classifier = critic.classifier
    classifier.config.reward_pooling = pooling
    critic = Critic(classifier, mean=0.3, std=2.0)
    ids, mask, positions = (t[:1] for t in full_sequences(rollout))
    start = rollout.query_ids.shape[1]
    with torch.no_grad():
        values = critic_forward(critic, rollout)[0]
        real = int(rollout.response_mask[0].sum())  # the tokens up to the stop token
        for t in sorted({0, real // 2, real - 1}):
            cut = start + t  # the prompt and the first t response tokens
            inputs = dict(input_ids=ids[:, :cut], attention_mask=mask[:, :cut], position_ids=positions[:, :cut])
            opening = torch.zeros_like(inputs["attention_mask"])
            opening[:, start - 1:] = 1
            score = pooled_rewards(classifier, pooling, opening, **inputs)[0, 0]
            assert torch.allclose(values[t], (score - 0.3) / 2.0, atol=1e-5), (pooling, t)


def test_passes_over_rows_of_similar_length_give_the_numbers_of_one_padded_pass(setup, tiny_tokenizer):
    """forward_groups > 1: rows sorted by prompt length, each pass without its rows' shared left padding; the
    log-probs, entropies and values (and their gradients) are those of one padded pass, in the order asked."""
    policy, reference, critic, config, _ = setup
    prompts = [[{"role": "user", "content": "Hi. " + "Tell me more about the weather today. " * n}]
               for n in (0, 6, 1, 5, 2, 4, 3, 0)]
    rollout = generate(policy, tiny_tokenizer, prompts, config.response_length, config.temperature)
    rows = torch.tensor([5, 0, 7, 2, 6])
    passes = length_groups(rollout, rows, 2)
    assert [len(members) for members, _ in passes] == [3, 2]
    lengths = rollout.query_mask[rows].sum(-1)
    assert [sorted(lengths[members].tolist()) for members, _ in passes] == [sorted(lengths.tolist())[:3],
                                                                             sorted(lengths.tolist())[3:]]
    assert passes[0][1] > passes[1][1] == rollout.query_ids.shape[1] - lengths.max()  # short rows drop the most
    outputs = []
    for groups in (1, 2, 5):
        policy.zero_grad()
        logprobs, entropy = policy_forward(policy, rollout, config.temperature, rows, groups)
        values = critic_forward(critic, rollout, rows, groups)
        (logprobs.sum() + values.sum()).backward()
        outputs.append((logprobs, entropy, values, policy.model.embed_tokens.weight.grad.clone()))
    for grouped_outputs in outputs[1:]:
        for one_pass, grouped in zip(outputs[0], grouped_outputs):
            assert torch.allclose(one_pass, grouped, atol=1e-5)


def test_micro_batches_of_unequal_lengths_give_the_gradient_of_one_micro_batch(setup):
    """Each micro-batch's loss is a mean over its own tokens: weighted by its share of the minibatch's tokens, two
    micro-batches (one of long answers, one of short) step exactly as one does (plain SGD shows the gradient)."""
    policy, reference, critic, config, rollout = setup
    mask = rollout.response_mask.clone()
    mask[4:, 2:] = 0  # half the answers 2 tokens long: the micro-batches hold different numbers of tokens
    rollout = dataclasses.replace(rollout, response_mask=mask)
    config.num_mini_batches, config.num_ppo_epochs, config.max_grad_norm = 1, 1, 1e9
    ref_logprobs = reference_logprobs(policy, reference, rollout, config.temperature)
    ends = []
    for steps in (1, 2):
        config.gradient_accumulation_steps = steps
        models = copy.deepcopy((policy, critic))
        optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=1.0)
        experience = make_experience(rollout, ref_logprobs, models[1], torch.linspace(-1, 1, 8), 0.05, config)
        ppo_epochs(*models, optimizer, experience, config, torch.Generator().manual_seed(1), Accelerator(cpu=True))
        ends.append(torch.cat([p.detach().flatten() for m in models for p in m.parameters()]))
    start = torch.cat([p.flatten() for m in (policy, critic) for p in m.parameters()])
    assert (ends[0] - start).abs().max() > 1e-4  # a step was taken
    assert torch.allclose(ends[0], ends[1], atol=1e-6), (ends[0] - ends[1]).abs().max()
