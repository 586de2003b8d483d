"""Step 1 of a PPO update: answer a batch of prompts with the policy.

Prompts are left-padded so every row's last prompt token sits at the same position, sampling runs with the KV
cache at `temperature` (top_k 0, top_p 1) through our decoding loop (rlhf/decoding.py), and each response ends
with its first stop token (docs/ppo.md, steps 1-2). The sampling log-probs come straight from the logits the
sampler saw, divided by the temperature: they are the "old" log-probs of the first PPO epoch without another
forward pass.
"""
from dataclasses import dataclass

import torch

from ppo.core import response_mask
from rlhf.decoding import decode


@dataclass
class Rollout:
    query_ids: torch.Tensor       # [batch, prompt length], left-padded
    query_mask: torch.Tensor      # 1 on real prompt tokens
    response_ids: torch.Tensor    # [batch, response_length], padded after the stop token
    response_mask: torch.Tensor   # 1 up to and including the first stop token
    ended: torch.Tensor           # [batch] bool: the response emitted the stop token
    logprobs: torch.Tensor        # [batch, response_length] fp32, at the sampling temperature, 0 on padding


def encode_prompts(tokenizer, prompts: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated prompts, left-padded, with their attention mask."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return batch["input_ids"], batch["attention_mask"]


@torch.no_grad()
def generate(policy, tokenizer, prompts: list[list[dict]], response_length: int, temperature: float,
             row_seeds: list[int] | None = None) -> Rollout:
    query_ids, query_mask = encode_prompts(tokenizer, prompts)
    device = next(policy.parameters()).device
    query_ids, query_mask = query_ids.to(device), query_mask.to(device)
    was_training = policy.training
    policy.eval()
    try:
        decoded = decode(policy, query_ids, query_mask, response_length, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, temperature=temperature, row_seeds=row_seeds)
    finally:
        policy.train(was_training)
    mask, ended = response_mask(decoded.tokens, tokenizer.eos_token_id)
    return Rollout(query_ids, query_mask, decoded.tokens, mask, ended, decoded.logprobs * mask)
