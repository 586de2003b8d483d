"""The reward stage's pairs: from rlhf/preference_pairs.py (source, gold weights, usable rows), with each pair's
bootstrap weights for the ensemble heads and its margin."""
import dataclasses
import json

from rlhf.config import RunConfig
from rlhf.datasets import split_train_eval
from rlhf.preference_pairs import pair_margin, preference_source, usable_pairs
from rlhf.stage import Inputs, earlier_round_model, refuse_fixed_preferences, starting_model
from reward.config import RewardStageConfig
from reward.loss import bootstrap_counts

STAGE = "reward"


def inputs(config: RewardStageConfig, run: RunConfig) -> dict:
    """The starting model, the preference source and what the manifest records about it (its export's hash). In
    online round r > 1: every round's export so far (`preferences`, `preferences_round_2`, ...), and the previous
    round's reward model (to measure how it does on the new round's votes, and to start from with round_init
    previous)."""
    run_dir = run.directory()
    found = Inputs()
    refuse_fixed_preferences(STAGE, config.preferences, run.round)
    if run.round > 1 and config.round_init == "previous":
        found.add("model", lambda: earlier_round_model(run_dir, STAGE, "reward model"))
    else:
        found.add("model", lambda: starting_model(STAGE, config.model, run_dir, language_model=False))
    for round in range(1, run.round + 1):
        found.add(source_key(round), lambda round=round: round_source(config, run_dir, round))
    if run.round > 1:
        found.add("previous_reward_model", lambda: earlier_round_model(run_dir, STAGE, "reward model"))
    return found.found()


def source_key(round: int) -> str:
    """The input that names round `round`'s export: `preferences` (round 1), `preferences_round_2`, ..."""
    return "preferences" if round == 1 else f"preferences_round_{round}"


def round_source(config: RewardStageConfig, run_dir, round: int) -> dict:
    """Round `round`'s export and its hash, named for the round: `preferences` and `export_hash` in round 1,
    `preferences_round_2` and `export_hash_round_2` in round 2, ..."""
    suffix = source_key(round).removeprefix("preferences")
    found = preference_source(STAGE, config.preferences, config.batch, config.min_votes, run_dir.in_round(round))
    return {f"{key}{suffix}": value for key, value in found.items()}


def round_pairs(found: dict, config: RewardStageConfig, rounds: int) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs) of every round's export, each split by prompt on its own and its pairs
    tagged with their `round`: the held-out pairs of the newest round measure a reward model on answers it has
    not seen the like of."""
    train, held_out = [], []
    for round in range(1, rounds + 1):
        pairs = [{**pair, "round": round} for pair in training_pairs(found[source_key(round)], config)]
        round_train, round_held_out = split_pairs(pairs, config)
        if config.selection == "best_worst":  # each held-out prompt's pair was chosen by its votes: all of them
            round_held_out = every_pair_of(round_held_out, found[source_key(round)], config, round)
        train += round_train
        held_out += round_held_out
    return train, held_out


def every_pair_of(held_out: list[dict], source: str, config: RewardStageConfig, round: int) -> list[dict]:
    """Every decided pair of the held-out prompts: best_worst keeps the pair its labellers set furthest apart, and
    held out alone that one would make the easiest test of each prompt."""
    prompts = {json.dumps(pair["prompt"]) for pair in held_out}
    every = training_pairs(source, dataclasses.replace(config, selection="all"))
    return [{**pair, "round": round} for pair in every if json.dumps(pair["prompt"]) in prompts]


def split_pairs(pairs: list[dict], config: RewardStageConfig) -> tuple[list[dict], list[dict]]:
    """Train and held-out pairs, split by prompt: with k answers per prompt, a pair held out while its answers
    are trained on in other pairs would overstate the held-out accuracy."""
    return split_train_eval(pairs, config.eval_fraction, config.seed, group=lambda pair: json.dumps(pair["prompt"]))


def training_pairs(source: str, config: RewardStageConfig) -> list[dict]:
    """The pairs the loss sees (rlhf/preference_pairs.py decides which), with bootstrap weights per head."""
    pairs = []
    for row in usable_pairs(source, config.ties, config.weight_by_gold, config.selection, config.max_length, STAGE):
        pair = {"id": row["id"], "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                "tie": row["tie"], "labeller_votes": row["labeller_votes"], "ranking": row.get("ranking") or "",
                "weight": [row["weight"] * count for count in bootstrap_counts(row["id"], config.ensemble,
                                                                               config.seed)]}
        if config.use_margin:
            pair["margin"] = pair_margin(row)
        pairs.append(pair)
    return pairs
