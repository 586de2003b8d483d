"""The reward stage's pairs: from rlhf/preference_pairs.py (source, gold weights, usable rows), with each pair's
bootstrap weights for the ensemble heads and its margin."""
import json

from rlhf.config import RunConfig
from rlhf.datasets import split_train_eval
from rlhf.preference_pairs import pair_margin, preference_source, usable_pairs
from rlhf.runs import RunDir
from rlhf.stage import Inputs, starting_model
from reward.config import RewardStageConfig
from reward.loss import bootstrap_counts

STAGE = "reward"


def inputs(config: RewardStageConfig, run: RunConfig) -> dict:
    """The starting model, the preference source and what the manifest records about it (its export's hash)."""
    run_dir = RunDir(run.output_root, run.name)
    found = Inputs()
    found.add("model", lambda: starting_model(STAGE, config.model, run_dir))
    found.add("preferences", lambda: preference_source(STAGE, config.preferences, config.batch, config.min_votes,
                                                        run_dir))
    return found.found()


def split_pairs(pairs: list[dict], config: RewardStageConfig) -> tuple[list[dict], list[dict]]:
    """Train and held-out pairs, split by prompt: with k answers per prompt, a pair held out while its answers
    are trained on in other pairs would overstate the held-out accuracy."""
    return split_train_eval(pairs, config.eval_fraction, config.seed, group=lambda pair: json.dumps(pair["prompt"]))


def training_pairs(source: str, config: RewardStageConfig) -> list[dict]:
    """The pairs the loss sees (rlhf/preference_pairs.py decides which), with bootstrap weights per head."""
    pairs = []
    for row in usable_pairs(source, config.ties, config.weight_by_gold, config.selection, config.max_length, STAGE):
        pair = {"id": row["id"], "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                "tie": row["tie"], "labeller_votes": row["labeller_votes"],
                "weight": [row["weight"] * count for count in bootstrap_counts(row["id"], config.ensemble,
                                                                               config.seed)]}
        if config.use_margin:
            pair["margin"] = pair_margin(row)
        pairs.append(pair)
    return pairs
