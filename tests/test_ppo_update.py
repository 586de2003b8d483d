"""PPO update steps on the tiny model: with the policy equal to its reference, the first minibatch sees no KL, a
ratio of 1 and nothing clipped; the update then moves the policy towards higher-advantage tokens."""
import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from ppo.config import PPOStageConfig
from ppo.rollout import generate
from ppo.update import make_experience, policy_forward, ppo_epochs
from rlhf import models

PROMPTS = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in ("rain", "the sea", "a cat", "bread")]


@pytest.fixture
def setup(tiny_model_path):
    torch.manual_seed(0)
    policy, tokenizer = models.load_causal_lm(str(tiny_model_path))
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1)
    config = PPOStageConfig(batch_size=8, num_mini_batches=2, gradient_accumulation_steps=2, num_ppo_epochs=2,
                            response_length=10, learning_rate=1e-3)
    rollout = generate(policy, tokenizer, PROMPTS * 2, config.response_length, config.temperature)
    return policy, reference, critic, config, rollout


def test_first_minibatch_against_an_identical_reference(setup):
    policy, reference, critic, config, rollout = setup
    scores = torch.linspace(-1, 1, 8)
    # Sampling log-probs come from generation's cached forward: equal to a full forward up to float error ...
    experience = make_experience(rollout, reference, critic, scores, kl_coef=0.05, config=config)
    assert experience.kl.abs().max() < 1e-4
    # ... and with the same forward on both sides, k1 and k3 are exactly 0
    with torch.no_grad():
        recomputed = policy_forward(policy, rollout, config.temperature)[0] * rollout.response_mask
    for estimator in ("k1", "k3"):
        config.kl_estimator = estimator
        exact = make_experience(dataclasses.replace(rollout, logprobs=recomputed), reference, critic, scores, 0.05,
                                config)
        assert exact.kl.abs().max() == 0
    assert torch.allclose(exact.rewards.sum(-1), scores)  # no KL: the score is the whole reward
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=config.learning_rate)
    history = ppo_epochs(policy, critic, optimizer, experience, config, torch.Generator().manual_seed(0))
    assert len(history) == config.num_ppo_epochs * config.num_mini_batches
    first = history[0]
    assert abs(first["val/ratio"] - 1) < 1e-4 and first["policy/clipfrac_avg"] == 0
    assert first["policy/approxkl_avg"] < 1e-8 and first["val/clipfrac_avg"] == 0
    assert history[-1]["policy/approxkl_avg"] > 0  # later minibatches see a policy that has moved


def test_the_update_raises_the_log_probability_of_rewarded_responses(setup):
    policy, reference, critic, config, rollout = setup
    scores = torch.tensor([5.0, -5.0] * 4)  # reward the even rows, punish the odd ones
    config.num_ppo_epochs = 4
    experience = make_experience(rollout, reference, critic, scores, kl_coef=0.0, config=config)
    with torch.no_grad():
        before = (policy_forward(policy, rollout, config.temperature)[0] * rollout.response_mask).sum(-1)
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(critic.parameters()), lr=config.learning_rate)
    ppo_epochs(policy, critic, optimizer, experience, config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = (policy_forward(policy, rollout, config.temperature)[0] * rollout.response_mask).sum(-1)
    change = after - before
    assert change[0::2].mean() > 0 > change[1::2].mean()
