"""Bradley-Terry preference likelihood that also knows ties, margins and weights: the reward model's objective on
its rewards, and DPO's on its implicit rewards (beta times the policy's log-ratio to its reference).

For a pair with reward gap d = r(chosen) - r(rejected) and a tie threshold theta >= 0 (Rao and Kupper's
Bradley-Terry model with ties):

    P(chosen wins)  = sigmoid(d - theta)
    P(rejected wins) = sigmoid(-d - theta)
    P(tie)           = 1 - the two above = sigmoid(theta - d) - sigmoid(-theta - d)

A decided pair costs -log sigmoid(d - theta - margin): the margin (from the labellers' strength, as in TRL's
`margin` column) asks for a wider gap when the labellers were sure. A tie costs -log P(tie), smallest at d = 0.
With ties dropped theta is 0 and the decided-pair cost is exactly TRL's (the reward trainer's loss, and DPO's
sigmoid loss). Each pair's cost is multiplied by its weight (1, a ranking's share of one vote, or its labellers'
gold accuracy) and the mean over the batch's pairs is taken. The weights are scaled to a mean of 1 over the data set
(rlhf.preference_pairs.usable_pairs), not over each batch: a batch of one ranking's pairs still weighs as one vote.

A k-wise ranking's own likelihood is Plackett-Luce's (`plackett_luce_loss`; rlhf/rankings.py says how ties count).
"""
import math

import torch
import torch.nn.functional as F

from rlhf.rankings import check_ranks


def log_tie_probability(gap: torch.Tensor, theta: float) -> torch.Tensor:
    """log(sigmoid(theta - d) - sigmoid(-theta - d)), computed without cancellation:
    log(e^a - e^b) - softplus(a) - softplus(b), with a = theta - d, b = -theta - d and
    e^a - e^b = e^a (1 - e^-2theta)."""
    a, b = theta - gap, -theta - gap
    return a + math.log1p(-math.exp(-2 * theta)) - F.softplus(a) - F.softplus(b)


def pair_losses(gap: torch.Tensor, margin: torch.Tensor, tie: torch.Tensor, theta: float) -> torch.Tensor:
    """Negative log-likelihood of each pair's verdict (see the module docstring)."""
    decided = -F.logsigmoid(gap - theta - margin)
    if theta <= 0:
        if tie.any():
            raise ValueError("tied pairs need a tie threshold above 0")
        return decided
    return torch.where(tie, -log_tie_probability(gap, theta), decided)


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                    tie: torch.Tensor | None = None, weight: torch.Tensor | None = None, theta: float = 0.0,
                    center_coefficient: float | None = None) -> torch.Tensor:
    """The mean over pairs of each pair's weighted loss. `chosen` and `rejected` are [pairs] or [pairs, heads];
    `weight` is [pairs] or [pairs, heads] (bootstrap counts per head); the result is averaged over heads."""
    if chosen.dim() == 1:
        chosen, rejected = chosen[:, None], rejected[:, None]
    pairs = chosen.shape[0]
    margin = torch.zeros(pairs) if margin is None else margin
    tie = torch.zeros(pairs, dtype=torch.bool) if tie is None else tie.bool()
    weight = torch.ones(pairs) if weight is None else weight
    weight = (weight if weight.dim() == 2 else weight[:, None]).to(chosen)
    losses = pair_losses(chosen - rejected, margin.to(chosen)[:, None], tie.to(chosen.device)[:, None], theta)
    per_head = (losses * weight).sum(0) / pairs
    loss = per_head.mean()
    if center_coefficient is not None:
        loss = loss + center_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def plackett_luce_loss(rewards: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """-log P(ranking | rewards) under Plackett-Luce, ties by Breslow's approximation (rlhf/rankings.py)."""
    check_ranks(ranks)
    ranked = torch.tensor(ranks, device=rewards.device)
    loss = rewards.new_zeros(())
    for rank in sorted(set(ranks)):
        left = rewards[ranked >= rank]  # the answers not placed before this tier
        loss = loss - (rewards[ranked == rank] - torch.logsumexp(left, dim=0)).sum()
    return loss


def mean_plackett_luce_loss(rewards: list[torch.Tensor], rankings: list[list[int]]) -> torch.Tensor:
    """The mean over rankings of their Plackett-Luce losses; `rewards[i]` scores the answers of `rankings[i]`."""
    return torch.stack([plackett_luce_loss(r, ranks) for r, ranks in zip(rewards, rankings)]).mean()
