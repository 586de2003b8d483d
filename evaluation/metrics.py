"""The evaluation's numbers as plain functions: win rates with bootstrap intervals, and the KL between a policy and
its reference along the policy's own answers."""
import random
import statistics

import torch


def win_rate(policy: list[float], baseline: list[float]) -> float:
    """Share of prompts where the policy's answer scores above the baseline's answer; a tie counts half."""
    return statistics.fmean(1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy, baseline))


def bootstrap_interval(policy: list[float], baseline: list[float], resamples: int, confidence: float,
                       seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate, resampling prompts (each keeps its pair of scores)."""
    rng = random.Random(seed)
    outcomes = [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy, baseline)]
    rates = sorted(statistics.fmean(rng.choices(outcomes, k=len(outcomes))) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return rates[int(tail * (resamples - 1))], rates[int(round((1 - tail) * (resamples - 1)))]


def kl_per_position(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """KL(policy || reference) over the whole vocabulary at each position: sum_v p (log p - log q)."""
    policy_logps = torch.log_softmax(policy_logits.float(), -1)
    reference_logps = torch.log_softmax(reference_logits.float(), -1)
    return (policy_logps.exp() * (policy_logps - reference_logps)).sum(-1)


@torch.no_grad()
def answer_kl(policy, reference, tokenizer, prompts: list[list[dict]], answers: list[list[int]],
              batch_size: int = 8) -> list[float]:
    """For each answer, the sum over its tokens of the full-vocabulary KL(policy || reference) at that token's
    position, given the prompt and the answer so far. Exact at every visited position (no sampling noise),
    so it compares policies on the same footing even when their answers are greedy."""
    kls = []
    for start in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for prompt, answer in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # as generation tokenized it
            rows.append(list(prompt_ids) + list(answer))
            spans.append((len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer)))  # logits predicting the answer
        width = max(len(row) for row in rows)
        ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows], device=policy.device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=policy.device)
        policy_logits = policy(input_ids=ids, attention_mask=mask).logits
        reference_logits = reference(input_ids=ids, attention_mask=mask).logits
        # the answer's positions only, row by row: the vocabulary-wide softmaxes are most of this function's work
        kls += [kl_per_position(policy_logits[i, begin:end], reference_logits[i, begin:end]).sum().item()
                for i, (begin, end) in enumerate(spans)]
    return kls
