"""The reward head fitted alone before the whole model is trained: a linear probe, then fine-tuning (LP-FT, Kumar
et al. 2022, "Fine-Tuning can Distort Pretrained Features").

A new head starts at random, so the first steps of fine-tuning push the backbone with gradients from a head that
does not yet know what to read. Here every distinct answer runs once through the frozen starting model, the head's
input is pooled as the model pools (last token or answer mean), and the head alone is fitted to the pairs with the
stage's own loss (ties, margins, weights, one bootstrap resample per ensemble head) for many full-batch steps: a
few seconds once the features are there. Fine-tuning then starts from a head that already ranks the answers.

In a scratch loop on one run's candidates re-voted by three judges, the probe alone beat one epoch of fine-tuning
from a random head and the probe followed by that epoch did best; through the stage on the default runs, the
held-out sentiment judge gained most (0.56 to 0.71 held-out accuracy) and the three tuned judges nothing on average
(docs/benchmarks.md, "The reward head fitted first").
"""
import json

import torch

from rlhf.preference_loss import preference_loss
from rlhf.reward_model import pooled_features, score_head

PROBE_LEARNING_RATE = 1e-2  # Adam on standardised features: the loss settles well within 300 full-batch steps


def answer_index(pairs: list[dict]) -> tuple[list[list[dict]], list[int], list[int]]:
    """(distinct conversations, each pair's chosen row, each pair's rejected row)."""
    rows, conversations = {}, []

    def row(conversation):
        key = json.dumps(conversation)
        if key not in rows:
            rows[key] = len(conversations)
            conversations.append(conversation)
        return rows[key]

    chosen = [row(p["prompt"] + p["chosen"]) for p in pairs]
    rejected = [row(p["prompt"] + p["rejected"]) for p in pairs]
    return conversations, chosen, rejected


def pair_tensors(pairs: list[dict], heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(margins, tie flags, [pairs, heads] weights) as the trainer's collator gives them."""
    margin = torch.tensor([float(p.get("margin") or 0.0) for p in pairs])
    tie = torch.tensor([bool(p["tie"]) for p in pairs])
    weight = torch.tensor([p["weight"] if isinstance(p["weight"], list) else [p["weight"]] * heads for p in pairs],
                          dtype=torch.float32)
    return margin, tie, weight


def fit_head(features: torch.Tensor, chosen: list[int], rejected: list[int], pairs: list[dict], heads: int,
             steps: int, l2: float, tie_threshold: float) -> tuple[torch.Tensor, float]:
    """([heads, hidden] head weights on the raw features, final loss), from the pairs' rows of `features`. The
    probe is fitted on standardised features (so one step size and one L2 strength suit any model) and folded
    back; the mean it subtracts shifts every reward by the same amount, which no pair sees."""
    used = features[sorted(set(chosen + rejected))]
    mean, scale = used.mean(0), used.std(0).clamp_min(1e-6)
    standard = (features - mean) / scale
    margin, tie, weight = pair_tensors(pairs, heads)
    head = torch.zeros(heads, features.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([head], lr=PROBE_LEARNING_RATE)
    for _ in range(steps):
        rewards = standard @ head.T
        loss = preference_loss(rewards[chosen], rewards[rejected], margin, tie, weight, tie_threshold)
        loss = loss + l2 * (head ** 2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (head / scale).detach(), loss.item()


def accuracy(rewards: torch.Tensor, chosen: list[int], rejected: list[int], pairs: list[dict]) -> float | None:
    """Share of decided pairs whose chosen row has the higher reward."""
    decided = [i for i, p in enumerate(pairs) if not p["tie"]]
    if not decided:
        return None
    return (rewards[[chosen[i] for i in decided]] > rewards[[rejected[i] for i in decided]]).float().mean().item()


def margin(rewards: torch.Tensor, chosen: list[int], rejected: list[int], pairs: list[dict]) -> float | None:
    """Mean reward of the chosen row minus the rejected one's, over decided pairs."""
    decided = [i for i, p in enumerate(pairs) if not p["tie"]]
    if not decided:
        return None
    return (rewards[[chosen[i] for i in decided]] - rewards[[rejected[i] for i in decided]]).mean().item()


def probe(model, tokenizer, train_pairs: list[dict], eval_pairs: list[dict], config) -> dict:
    """Fits the model's head on its frozen features (config.probe_steps, config.probe_l2) and writes it into the
    model; returns the probe's final loss, its train and held-out accuracy, and (`before`) the held-out accuracy
    and margin of the head the model started with, read off the same features."""
    conversations, chosen, rejected = answer_index(train_pairs + eval_pairs)
    hardware = config.hardware
    with torch.autocast(hardware.device, dtype=hardware.dtype, enabled=hardware.dtype != torch.float32):
        features = pooled_features(model, tokenizer, conversations, batch_size=config.per_device_train_batch_size)
    trained = len(train_pairs)
    head, loss = fit_head(features, chosen[:trained], rejected[:trained], train_pairs, model.config.num_labels,
                          config.probe_steps, config.probe_l2, config.tie_threshold if config.ties == "equal" else 0.0)
    weight = score_head(model).weight
    initial = (features @ weight.detach().float().T).mean(-1)  # the head the model started with
    with torch.no_grad():
        weight.copy_(head.to(weight.dtype))
    rewards = (features @ head.T).mean(-1)
    return {"probe_loss": loss,
            "probe_train_accuracy": accuracy(rewards, chosen[:trained], rejected[:trained], train_pairs),
            "probe_eval_accuracy": accuracy(rewards, chosen[trained:], rejected[trained:], eval_pairs),
            "before": {"accuracy": accuracy(initial, chosen[trained:], rejected[trained:], eval_pairs),
                       "margin": margin(initial, chosen[trained:], rejected[trained:], eval_pairs)}}
