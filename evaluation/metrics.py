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


def distinct_ngram_share(ids: list[int], n: int = 4) -> float:
    """The share of an answer's token n-grams that are distinct: 1 where nothing repeats, falling as an answer
    repeats itself ("I'm happy to help. I'm happy to help."), as a policy that games its reward tends to. An answer
    shorter than n tokens repeats nothing."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


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
    so it compares policies on the same footing even when their answers are greedy. Rows run shortest first
    in batches of `batch_size`, so a batch pads little, and the vocabulary logits are computed only from the
    batch's first answer position on (the prompt's positions before it are most of a row)."""
    rows, spans = [], []
    for prompt, answer in zip(prompts, answers):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # as generation tokenized it
        rows.append(list(prompt_ids) + list(answer))
        spans.append((len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer)))  # logits predicting the answer
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    kls = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        first = min(spans[i][0] for i in chunk)
        ids = torch.tensor([rows[i] + [tokenizer.pad_token_id] * (width - len(rows[i])) for i in chunk],
                           device=policy.device)
        mask = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in chunk], device=policy.device)
        # logits_to_keep = n keeps the last n positions: here positions first .. width - 1
        policy_logits = policy(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits
        reference_logits = reference(input_ids=ids, attention_mask=mask, logits_to_keep=width - first).logits
        for row, i in enumerate(chunk):
            begin, end = spans[i][0] - first, spans[i][1] - first
            kls[i] = kl_per_position(policy_logits[row, begin:end], reference_logits[row, begin:end]).sum().item()
    return kls
