"""Simulated labellers: automatic judges that vote through the same store API as people.

A judge is any callable `(prompts: list[str], responses: list[str]) -> list[float]` (higher is better), named
`builtin:NAME` or `module:function`. A simulated labeller turns the two scores of a comparison into a vote:
both_bad when both fall below a floor, tie when they differ by less than a margin, otherwise a Bradley-Terry draw,
P(a) = sigmoid((score_a - score_b) / temperature) (temperature 0: always the better one); then, with probability
`noise`, the vote is replaced by a uniformly random choice. Each labeller is a user named `sim/<judge>/<i>`.
"""
import math
import random
import secrets
from dataclasses import dataclass

from rlhf.judges import load_judge
from rlhf.schema import PREFERENCE_CHOICES, VOTE_CHOICES
from rlhf.store import DuplicateVote, Store


@dataclass(frozen=True)
class LabellerModel:
    temperature: float = 1.0  # of the Bradley-Terry draw, in score units; 0 picks the better response
    tie_margin: float = 0.0  # score differences below this are ties
    both_bad_floor: float | None = None  # both scores below this: both_bad
    noise: float = 0.0  # probability of replacing the vote by a uniformly random choice


def prefer_a(x: float) -> float:
    """sigmoid(x) without overflow: a gap of many temperatures (Flesch points at temperature 0.05) is certain."""
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def decide(score_a: float, score_b: float, model: LabellerModel, rng: random.Random) -> tuple[str, str | None]:
    """(choice, strength) for one comparison; no strength for a tie or both_bad."""
    gap = score_a - score_b
    if model.both_bad_floor is not None and max(score_a, score_b) < model.both_bad_floor:
        choice = "both_bad"
    elif abs(gap) < model.tie_margin or gap == 0:
        choice = "tie"
    elif model.temperature == 0:
        choice = "a" if gap > 0 else "b"
    else:
        choice = "a" if rng.random() < prefer_a(gap / model.temperature) else "b"
    if rng.random() < model.noise:
        choice = rng.choice(VOTE_CHOICES)
    if choice not in PREFERENCE_CHOICES:
        return choice, None  # a tie or both_bad has no strength
    return choice, "clear" if abs(gap) >= 2 * max(model.tie_margin, model.temperature, 1e-9) else "slight"


def simulate(store: Store, judge_spec: str, labellers: int, model: LabellerModel, batch: str | None = None,
             seed: int = 0) -> dict:
    """Every simulated labeller votes once on every comparison of `batch` it has not voted on yet."""
    judge = load_judge(judge_spec)
    comparisons = store.comparisons(batch)
    prompts = [c["prompt"][-1]["content"] for c in comparisons]
    scores_a, scores_b = judge(prompts, [c["a"] for c in comparisons]), judge(prompts, [c["b"] for c in comparisons])
    name = judge_spec.removeprefix("builtin:")
    counts = {choice: 0 for choice in VOTE_CHOICES} | {"skipped": 0}
    for i in range(labellers):
        user = store.user(f"sim/{name}/{i}") or store.add_user(f"sim/{name}/{i}", "labeller", secrets.token_hex(16))
        rng = random.Random(f"{seed}:{name}:{i}")
        for comparison, a, b in zip(comparisons, scores_a, scores_b):
            choice, strength = decide(a, b, model, rng)
            try:
                store.cast_vote(comparison["id"], user, choice, strength)
                counts[choice] += 1
            except DuplicateVote:
                counts["skipped"] += 1
    return counts
