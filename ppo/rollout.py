"""Step 1 of a PPO update: answer a batch of prompts with the policy.

Prompts are left-padded so every row's last prompt token sits at the same position, sampling runs with the KV
cache at `temperature` (top_k 0, top_p 1), and each response is cut after its first stop token (docs/ppo.md,
steps 1-2). The sampling log-probs come straight from the logits generation saw, divided by the temperature:
they are the "old" log-probs of the first PPO epoch without another forward pass.
"""
import copy
from dataclasses import dataclass

import torch

from ppo.core import logprobs_from_logits, response_mask


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
def generate(policy, tokenizer, prompts: list[list[dict]], response_length: int, temperature: float) -> Rollout:
    query_ids, query_mask = encode_prompts(tokenizer, prompts)
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    # No stop token during generation: every row runs the full length, so the logits line up with the tokens
    # and nothing alters the sampling distribution; the stop token is found afterwards, by position.
    sampling = copy.deepcopy(policy.generation_config)
    sampling.update(max_new_tokens=response_length, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                    eos_token_id=None, pad_token_id=tokenizer.pad_token_id, output_logits=True,
                    return_dict_in_generate=True)
    try:
        output = policy.generate(input_ids=query_ids.to(device), attention_mask=query_mask.to(device),
                                 generation_config=sampling)
    finally:
        policy.train(was_training)
    response_ids = output.sequences[:, query_ids.shape[1]:]
    logits = torch.stack(output.logits, dim=1)
    mask, ended = response_mask(response_ids, tokenizer.eos_token_id)
    logprobs = logprobs_from_logits(logits, response_ids, temperature) * mask
    response_ids = response_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Rollout(query_ids.to(device), query_mask.to(device), response_ids, mask, ended, logprobs)
