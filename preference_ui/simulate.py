"""Simulated labellers: automatic judges that take items from the same labelling queue as people and vote.

A judge is any callable `(prompts: list[str], responses: list[str]) -> list[float]` (higher is better), named
`builtin:NAME` or `module:function`. A simulated labeller turns the two scores of a comparison into a vote:
both_bad when both fall below a floor, tie when they differ by less than a margin, otherwise a Bradley-Terry draw,
P(a) = sigmoid((score_a - score_b) / temperature) (temperature 0: always the better one); then, with probability
`noise`, the vote is replaced by a uniformly random choice. Each labeller is a user named `sim/<judge>/<i>`.

A ranking item's k answers are ordered by a Plackett-Luce draw, the same model for k answers (a Gumbel-max draw:
each score over the temperature plus Gumbel noise, sorted; temperature 0 sorts by score). Neighbours in that order
whose scores differ by less than the tie margin share a rank; with probability `noise` the ranking is replaced by a
uniformly random order.
"""
import math
import random
import sys
from dataclasses import dataclass

from rlhf.errors import UserError
from rlhf.judges import load_judge
from rlhf.rankings import ranks_in_order
from rlhf.schema import PREFERENCE_CHOICES, VOTE_CHOICES
from preference_ui.queue import BatchClosed, Item, LabelQueue, unswap
from rlhf.store import LabellerDisabled, Store, User
from rlhf.verifiable import judge_scores, probe_judge, wants_references


@dataclass(frozen=True)
class LabellerModel:
    temperature: float = 1.0  # of the Bradley-Terry draw, in score units; 0 picks the better response
    tie_margin: float = 0.0  # score differences below this are ties
    both_bad_floor: float | None = None  # both scores below this: both_bad
    noise: float = 0.0  # probability of replacing the vote by a uniformly random choice
    skip: float = 0.0  # probability of skipping an item (the queue gives its slot to another labeller)

    def __post_init__(self):
        numbers = (self.temperature, self.tie_margin, self.noise, self.skip, self.both_bad_floor or 0.0)
        if not all(math.isfinite(number) for number in numbers):  # NaN passes every comparison below as false
            raise ValueError("the simulated labellers' temperature, tie margin, both-bad floor, noise and skip rate "
                             f"must be numbers, got {', '.join(map(str, numbers))}")
        if self.temperature < 0 or self.tie_margin < 0:
            raise ValueError(f"the simulated labellers' temperature and tie margin must be 0 or more (a negative "
                             f"temperature reverses every vote), got {self.temperature} and {self.tie_margin}")
        if not (0 <= self.noise <= 1 and 0 <= self.skip < 1):
            raise ValueError(f"the simulated labellers' noise must be between 0 and 1 and their skip rate from 0 to "
                             f"below 1, got {self.noise} and {self.skip}")


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


def decide_ranking(scores: list[float], model: LabellerModel, rng: random.Random) -> list[int]:
    """Ranks of the answers in the order given (1 the best, ties equal) for one ranking item."""
    if rng.random() < model.noise:
        order = list(range(len(scores)))
        rng.shuffle(order)
    else:
        keys = [score / model.temperature - math.log(-math.log(rng.random() or 1e-300)) if model.temperature > 0
                else score for score in scores]
        order = sorted(range(len(scores)), key=lambda i: -keys[i])
    return ranks_in_order(order, scores, model.tie_margin)


def voting_judge(spec: str):
    """The judge simulated labellers vote with, loaded: one of (prompts, answers). A judge that checks answers
    against reference answers cannot say which of two answers is better, so it is refused."""
    judge = load_judge(spec)
    if wants_references(judge):
        raise UserError(f"judge {spec} checks answers against reference answers; simulated labellers compare two "
                        "answers with a judge of (prompts, answers)")
    probe_judge(judge, "Hello?")
    return judge


def simulate(store: Store, judge_spec: str, labellers: int, model: LabellerModel, batch: str | None = None,
             seed: int = 0, overlap: int | None = None, gold_rate: float = 0.0) -> dict:
    """The simulated labellers take turns taking items from the labelling queue, as people in the app do, until
    it has nothing left for any of them: each comparison goes to `overlap` of them (default: all), gold items
    are mixed in at `gold_rate`, and a skipped item's slot goes to another labeller (the item comes back to the
    skipper, who then votes, only when nothing else is left for them and no one took the slot). Each vote is drawn
    with a generator seeded by labeller and comparison, so it does not depend on the order the items come in; a
    rerun votes only on what is left. Returns the count of each choice (as stored) and of skips (and of rankings, where
    ranking items were handed out)."""
    judge = voting_judge(judge_spec)
    name = judge_spec.removeprefix("builtin:")
    users = [store.machine_labeller(f"sim/{name}/{i}") for i in range(labellers)]
    queue = LabelQueue(store, overlap or labellers, gold_rate, batch, seed=seed, expires_others=False)
    counts = {choice: 0 for choice in VOTE_CHOICES} | {"skipped": 0}
    waiting, skipped = list(enumerate(users)), set()
    while waiting:
        for i, user in list(waiting):
            item = queue.next_item(user)
            if item is None:
                waiting.remove((i, user))
                continue
            rng = random.Random(f"{seed}:{name}:{i}:{item.comparison_id}")
            # an item skipped once comes back only when the labeller has nothing else left: then it is voted on
            if rng.random() < model.skip and (i, item.comparison_id) not in skipped:
                skipped.add((i, item.comparison_id))
                queue.skip(user, item.comparison_id)
                counts["skipped"] += 1
                continue
            try:
                choice = answer(queue, user, item, judge, model, rng)
                counts[choice] = counts.get(choice, 0) + 1
            except BatchClosed:  # exported by another process meanwhile: its items are no longer served
                continue
            except LabellerDisabled as err:  # an admin disabled it while it ran: the others go on
                queue.skip(user, item.comparison_id)
                waiting.remove((i, user))
                print(f"{err}; it stopped, the other simulated labellers go on", file=sys.stderr)
    return counts


def answer(queue: LabelQueue, user: User, item: Item, judge, model: LabellerModel, rng: random.Random) -> str:
    """Votes on or ranks the item as the judge and the labeller model decide; returns the choice stored."""
    prompt = item.prompt[-1]["content"]
    if item.answers:
        queue.rank(user, item.comparison_id,
                   decide_ranking(judge_scores(judge, [prompt] * len(item.answers), item.answers), model, rng))
        return "ranked"
    left, right = judge_scores(judge, [prompt] * 2, [item.left, item.right])
    # decided in the comparison's own a/b order: the side the queue happened to show A on changes nothing
    choice, strength = decide(*((right, left) if item.swapped else (left, right)), model, rng)
    queue.vote(user, item.comparison_id, unswap(choice, item.swapped), strength)  # (its own inverse)
    return choice
