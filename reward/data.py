"""Where the reward stage's pairs come from: a label export, a preference file, or the label store itself
(exported first), with ties, both-bad rows, margins and gold-accuracy weights decided here."""
from pathlib import Path

from rlhf import models
from rlhf.config import RunConfig
from rlhf.datasets import load_rows
from rlhf.errors import DataError, MissingInputError
from rlhf.label_export import STRENGTH_MARGIN, export_snapshot, majority, read_manifest as read_export_manifest
from rlhf.runs import RunDir
from rlhf.store import Store
from reward.config import RewardStageConfig
from reward.loss import bootstrap_counts

STAGE = "reward"


def inputs(config: RewardStageConfig, run: RunConfig) -> tuple[str, str, dict]:
    """(model path, preference source, what the manifest records about the source). A label store URL is
    exported first, into runs/<name>/exports/<content hash>."""
    run_dir = RunDir(run.output_root, run.name)
    preferences, recorded = config.preferences or str(run_dir.stage_path("preferences")), {}
    if "://" in preferences:
        store = Store(preferences)
        folder, manifest = export_snapshot(store, run_dir.path / "exports", config.batch or None, config.min_votes)
        print(f"[{STAGE}] exported {manifest['rows']} pairs from {store.engine.url} to {folder}")
        preferences = str(folder)
    elif not Path(preferences).exists() and not config.preferences:
        raise MissingInputError(f"no preference pairs at {preferences}: run `rlhf label export --out {preferences}` "
                                "first, or set --reward.preferences")
    export_manifest = read_export_manifest(preferences) if Path(preferences).is_dir() else None
    if export_manifest:
        recorded["export_hash"] = export_manifest["content_hash"]
    if config.model:
        return models.resolve(config.model), preferences, recorded
    sft = run_dir.stage_path("sft")
    if not (sft / "config.json").exists():
        raise MissingInputError(f"no SFT model at {sft}: run `rlhf sft --config ... --run.name {run.name}` first, "
                                "or set --reward.model")
    return str(sft), preferences, recorded


def load_pairs(source: str, config: RewardStageConfig) -> list[dict]:
    """Every preference row, re-decided by gold-weighted votes when asked, with its loss weight."""
    rows = load_rows(source, "preference")
    if not config.weight_by_gold:
        return [{**row, "weight": 1.0} for row in rows]
    manifest = read_export_manifest(source) if Path(source).is_dir() else None
    if not manifest or "labeller_gold" not in manifest:
        raise DataError(source, None, "labeller_gold", "weight_by_gold needs a label export (rlhf label export), "
                                                        "whose export.json holds each labeller's gold record")
    weights = labeller_weights(manifest["labeller_gold"])
    return [gold_weighted(row, weights) for row in rows]


def labeller_weights(gold: dict) -> dict:
    """A labeller's vote weight: their gold accuracy with one pseudo-answer right and one wrong (0.5 unseen)."""
    return {name: (record["correct"] + 1) / (record["answered"] + 2) for name, record in gold.items()}


def gold_weighted(row: dict, weights: dict) -> dict:
    """The row decided by a weighted majority of its votes. Its loss weight is the agreeing votes' total weight
    over the number of votes: a pair backed by accurate labellers who agree counts most."""
    votes = row["labeller_votes"]
    if not votes:
        return {**row, "weight": 1.0}
    totals = {}
    for vote in votes:
        totals[vote["verdict"]] = totals.get(vote["verdict"], 0.0) + weights.get(vote["labeller"], 0.5)
    verdict = majority(totals)
    row = {**row, "tie": verdict == "tie", "both_bad": verdict == "both_bad"}
    if verdict == "rejected":  # the weighted majority overturns the head count
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        flip = {"chosen": "rejected", "rejected": "chosen"}
        votes = [{**vote, "verdict": flip.get(vote["verdict"], vote["verdict"])} for vote in votes]
        row["labeller_votes"], verdict = votes, "chosen"
    agreeing = [vote for vote in votes if vote["verdict"] == verdict]
    if agreeing and verdict == "chosen":
        row["margin"] = sum(STRENGTH_MARGIN[vote["strength"]] for vote in agreeing) / len(agreeing)
    row["weight"] = sum(weights.get(vote["labeller"], 0.5) for vote in agreeing) / len(votes)
    return row


def training_pairs(source: str, config: RewardStageConfig) -> list[dict]:
    """The pairs the loss sees: both-bad rows say nothing about order; ties are dropped or kept as "equal"."""
    rows = load_pairs(source, config)
    usable = [row for row in rows if not row["both_bad"] and (config.ties == "equal" or not row["tie"])]
    if not any(not row["tie"] for row in usable):
        kept = "both bad" if config.ties == "equal" else "ties or both bad"
        raise DataError(source, None, "rows", f"no usable pairs: all {len(rows)} rows are {kept}")
    pairs = []
    for row in usable:
        pair = {"id": row["id"], "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                "tie": row["tie"], "labeller_votes": row["labeller_votes"],
                "weight": [row["weight"] * count for count in bootstrap_counts(row["id"], config.ensemble,
                                                                               config.seed)]}
        if config.use_margin:
            pair["margin"] = 0.0 if row["tie"] else row["margin"] or 0.0
        pairs.append(pair)
    return pairs
