"""Rollouts on the tiny model: sampling follows softmax(logits / T), the sampling log-probs equal a recomputation
(so the first PPO ratio is 1), and responses are cut after their first stop token."""
import torch

from ppo.core import logprobs_from_logits
from ppo.rollout import encode_prompts, generate
from rlhf import models
from tests.test_decoding import noisy_tiny_model

PROMPT = [{"role": "user", "content": "Say something."}]


def test_sampling_frequencies_follow_the_tempered_softmax(tiny_model_path):
    policy, tokenizer = models.load_causal_lm(str(tiny_model_path))
    query_ids, query_mask = encode_prompts(tokenizer, [PROMPT])

    def next_token_logits():
        with torch.no_grad():
            return policy(input_ids=query_ids, attention_mask=query_mask).logits[0, -1]

    # The untrained model is nearly uniform. The logits scale with the final norm's weight, so scale it until
    # the most likely token has about 15% of the mass: then a temperature of 0.5 changes the distribution visibly.
    base = next_token_logits()
    factor = next(f for f in range(1, 200) if torch.softmax(base * f, -1).max() > 0.15)
    with torch.no_grad():
        policy.model.norm.weight.mul_(factor)
    torch.manual_seed(0)
    temperature, draws = 0.5, 4000
    rollout = generate(policy, tokenizer, [PROMPT] * draws, response_length=1, temperature=temperature)
    logits = next_token_logits()
    tempered, plain = torch.softmax(logits / temperature, -1), torch.softmax(logits, -1)
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=len(tempered)).float() / draws
    top = torch.topk(tempered, 5).indices
    assert (counts[top] - tempered[top]).abs().max() < 0.03
    assert (counts[top] - plain[top]).abs().max() > 0.05  # the untempered distribution is clearly different


def test_sampling_logprobs_equal_a_recomputation_and_responses_stop_at_eos(tiny_model_path):
    policy, tokenizer = noisy_tiny_model(tiny_model_path, eos_boost=3.0)  # some answers end, some do not
    torch.manual_seed(1)
    prompts = [PROMPT, [{"role": "user", "content": "A much longer question about many different things?"}]] * 4
    rollout = generate(policy, tokenizer, prompts, response_length=12, temperature=0.7)
    assert rollout.response_ids.shape == (8, 12) and rollout.query_mask[:, -1].all()  # left-padded prompts
    ids = torch.cat([rollout.query_ids, rollout.response_ids], 1)
    mask = torch.cat([rollout.query_mask, rollout.response_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    start = rollout.query_ids.shape[1]
    recomputed = logprobs_from_logits(logits[:, start - 1:-1], rollout.response_ids, 0.7) * rollout.response_mask
    assert torch.allclose(recomputed, rollout.logprobs, atol=1e-4)
    eos = tokenizer.eos_token_id
    assert 0 < int(rollout.ended.sum()) < len(prompts)  # the cut after a stop token is exercised, and its absence
    for row, row_mask, ended in zip(rollout.response_ids, rollout.response_mask, rollout.ended):
        length = int(row_mask.sum())
        assert (row[:length] == eos).sum() == int(ended) and (not ended or row[length - 1] == eos)
