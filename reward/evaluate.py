"""How good the reward model is, measured against the labellers themselves (also `rlhf reward eval`).

- held-out accuracy: how often the chosen response of a held-out decided pair gets the higher reward;
- gold accuracy: the same on comparisons with a known answer (a or b; tie and both-bad gold items are left out);
- human ceiling: on held-out items with at least 3 votes, each vote in turn is held out and compared with the
  majority of the other votes (units where the others have no single chosen/rejected majority are left out); the
  model is scored on exactly the same units, so the two numbers are side by side;
- calibration: the Bradley-Terry probability that one response of a pair wins (given a decision), against the
  share of labellers who chose it, in equal-width bins; the expected calibration error is the bin-size-weighted
  mean gap, and the reliability plot shows it. The response is the one whose text sorts first, not the chosen one:
  "chosen" is picked by the votes themselves, so its vote share is at least a half by construction;
- reward distributions of chosen and rejected responses (a plot).

Everything is written to `eval.md` beside the model (by `rlhf reward eval`, into its own `reward-eval` folder),
with the PNG plots, and returned as metrics.
"""
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import torch

from rlhf import tracking
from rlhf.config import RunConfig, as_plain_dict
from rlhf.datasets import load_rows
from rlhf.errors import ConfigError, MissingInputError
from rlhf.plots import pyplot, save_figure
from rlhf.runs import atomic_write_text, stage_lock
from reward.data import inputs, round_pairs
from rlhf.reward_model import load_reward_model, reward_tokenizer, score, score_heads

RELIABILITY_PLOT = "reliability.png"
DISTRIBUTION_PLOT = "reward_distribution.png"
EVAL_FOLDER = "reward-eval"  # `rlhf reward eval` writes here, beside the reward folder


def gold_accuracy(scores_a: list[float], scores_b: list[float], expected: list[str]) -> tuple[float | None, int]:
    """(share of a/b gold items where the model prefers the expected response, items counted)."""
    hits = [(a > b) == (answer == "a") for a, b, answer in zip(scores_a, scores_b, expected) if answer in ("a", "b")]
    return (sum(hits) / len(hits) if hits else None), len(hits)


def others_majority(verdicts: list[str]) -> str | None:
    """The single most common verdict if it is chosen or rejected, else None."""
    counts = Counter(verdicts).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0] if counts[0][0] in ("chosen", "rejected") else None


def human_ceiling(pairs: list[dict], gaps: list[float], min_votes: int = 3) -> dict:
    """Leave-one-labeller-out agreement with the others' majority, for the labellers and for the model. A unit is
    a held-out vote for one answer (the model always picks one: a tie or both-bad vote would count against the
    labellers only)."""
    human, model, items = [], [], 0
    for pair, gap in zip(pairs, gaps):
        votes = [vote["verdict"] for vote in pair.get("labeller_votes") or []]
        if len(votes) < min_votes:
            continue
        items += 1
        model_verdict = "chosen" if gap > 0 else "rejected"
        for i, held_out in enumerate(votes):
            majority = others_majority(votes[:i] + votes[i + 1:])
            if majority is not None and held_out in ("chosen", "rejected"):
                human.append(held_out == majority)
                model.append(model_verdict == majority)
    return {"human_ceiling": mean(human), "model_on_ceiling_units": mean(model), "ceiling_units": len(human),
            "ceiling_items": items}


def win_probability(gap: float, theta: float) -> float:
    """P(chosen wins | the pair is decided) under the tie-aware Bradley-Terry model (theta 0: sigmoid(gap))."""
    win, loss = 1 / (1 + math.exp(-(gap - theta))), 1 / (1 + math.exp(gap + theta))
    return win / (win + loss)


def observed_preference(pair: dict) -> float:
    """The share of decisive votes for the chosen response (1 for a pair without individual votes)."""
    verdicts = [v["verdict"] for v in pair.get("labeller_votes") or [] if v["verdict"] in ("chosen", "rejected")]
    return verdicts.count("chosen") / len(verdicts) if verdicts else 1.0


def calibration_point(pair: dict, gap: float, theta: float) -> tuple[float, float]:
    """(predicted, observed) probability that the response whose text sorts first wins the pair."""
    chosen_first = json.dumps(pair["chosen"], sort_keys=True) <= json.dumps(pair["rejected"], sort_keys=True)
    predicted, observed = win_probability(gap, theta), observed_preference(pair)
    return (predicted, observed) if chosen_first else (1 - predicted, 1 - observed)


def calibration(probabilities: list[float], outcomes: list[float], bins: int) -> tuple[float | None, list[dict]]:
    """(expected calibration error, per-bin mean probability, observed rate and count)."""
    table = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, p in enumerate(probabilities) if low <= p < high or (b == bins - 1 and p == 1.0)]
        if members:
            table.append({"low": low, "high": high, "count": len(members),
                          "predicted": sum(probabilities[i] for i in members) / len(members),
                          "observed": sum(outcomes[i] for i in members) / len(members)})
    total = sum(row["count"] for row in table)
    ece = sum(row["count"] / total * abs(row["predicted"] - row["observed"]) for row in table) if total else None
    return ece, table


def evaluate(model, tokenizer, eval_pairs: list[dict], gold: list[dict], config, out_dir,
             scored: tuple | None = None) -> dict:
    """Scores the held-out pairs (unless `scored` holds their [pairs, heads] chosen and rejected rewards) and the
    gold items (`gold_items`), writes eval.md and the plots into `out_dir`, returns the metrics."""
    out_dir = Path(out_dir)
    theta = config.tie_threshold if config.ties == "equal" else 0.0
    if scored is None:
        scored = (score_heads(model, tokenizer, [p["prompt"] + p["chosen"] for p in eval_pairs]),
                  score_heads(model, tokenizer, [p["prompt"] + p["rejected"] for p in eval_pairs]))
    heads_chosen, heads_rejected = scored
    chosen, rejected = heads_chosen.mean(-1).tolist(), heads_rejected.mean(-1).tolist()
    decided = [i for i, p in enumerate(eval_pairs) if not p.get("tie")]
    gaps = [chosen[i] - rejected[i] for i in range(len(eval_pairs))]
    metrics = {"heldout_accuracy": mean([gaps[i] > 0 for i in decided]), "heldout_pairs": len(decided),
               "heldout_margin": mean([gaps[i] for i in decided])}
    ties = [i for i, p in enumerate(eval_pairs) if p.get("tie")]
    if ties:
        metrics["tie_abs_gap"] = mean([abs(gaps[i]) for i in ties])
    if heads_chosen.shape[1] > 1:  # the ensemble's spread of the reward gap: its uncertainty
        metrics["ensemble_gap_std"] = (heads_chosen - heads_rejected).std(-1).mean().item()
    metrics.update(gold_metrics(model, tokenizer, gold))
    metrics.update(human_ceiling([eval_pairs[i] for i in decided], [gaps[i] for i in decided]))
    oriented = [calibration_point(eval_pairs[i], gaps[i], theta) for i in decided]
    metrics["ece"], bins = calibration([p for p, _ in oriented], [o for _, o in oriented], config.calibration_bins)
    reliability_plot(bins, out_dir / RELIABILITY_PLOT)
    distribution_plot([chosen[i] for i in decided], [rejected[i] for i in decided], out_dir / DISTRIBUTION_PLOT)
    atomic_write_text(out_dir / "eval.md", report(metrics, bins))
    return metrics


def log_evaluation(tracker, metrics: dict, folder: Path) -> None:
    """The metrics, and the plots `evaluate` drew into `folder`."""
    tracker.log({f"reward_eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.log_images({f"reward_eval/{Path(plot).stem}": folder / plot for plot in (RELIABILITY_PLOT,
                                                                                   DISTRIBUTION_PLOT)})


def gold_items(config) -> list[dict]:
    """The comparisons with a known answer (`reward.gold`), read and checked before the stage writes anything (they
    were read after training, where a missing file failed the stage at its end)."""
    return load_rows(config.gold, "gold") if config.gold else []


def gold_metrics(model, tokenizer, items: list[dict]) -> dict:
    if not items:
        return {"gold_accuracy": None, "gold_items": 0}
    scores_a = score(model, tokenizer, [g["prompt"] + [{"role": "assistant", "content": g["a"]}] for g in items])
    scores_b = score(model, tokenizer, [g["prompt"] + [{"role": "assistant", "content": g["b"]}] for g in items])
    accuracy, counted = gold_accuracy(scores_a, scores_b, [g["expected"] for g in items])
    return {"gold_accuracy": accuracy, "gold_items": counted}


def mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def reliability_plot(bins: list[dict], path: Path) -> None:
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axis.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o-", label="reward model")
    for b in bins:
        axis.annotate(str(b["count"]), (b["predicted"], b["observed"]), textcoords="offset points", xytext=(4, -10),
                      fontsize=7)
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted P(first response wins)", ylabel="labellers choosing it",
             title="Reliability (points: pairs per bin)")
    axis.legend(loc="upper left")
    save_figure(figure, path)


def distribution_plot(chosen: list[float], rejected: list[float], path: Path) -> None:
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(6, 3.5))
    values = chosen + rejected
    edges = torch.linspace(min(values, default=0.0), max(values, default=1.0) + 1e-6, 21).tolist()
    axis.hist(chosen, bins=edges, alpha=0.6, label=f"chosen (mean {mean(chosen) or 0:.2f})")
    axis.hist(rejected, bins=edges, alpha=0.6, label=f"rejected (mean {mean(rejected) or 0:.2f})")
    axis.set(xlabel="reward", ylabel="responses", title="Rewards of held-out chosen and rejected responses")
    axis.legend()
    save_figure(figure, path)


def report(metrics: dict, bins: list[dict]) -> str:
    def cell(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["# Reward model evaluation", "",
             "| measure | value | counted |", "|---|---|---|",
             f"| held-out accuracy | {cell(metrics['heldout_accuracy'])} | {metrics['heldout_pairs']} pairs |",
             f"| held-out mean reward gap | {cell(metrics['heldout_margin'])} | |",
             f"| gold accuracy | {cell(metrics['gold_accuracy'])} | {metrics['gold_items']} items |",
             f"| human ceiling (held-out labeller vs the others' majority) | {cell(metrics['human_ceiling'])} | "
             f"{metrics['ceiling_units']} votes on {metrics['ceiling_items']} items |",
             f"| reward model on the same votes | {cell(metrics['model_on_ceiling_units'])} | "
             f"{metrics['ceiling_units']} votes |",
             f"| expected calibration error | {cell(metrics['ece'])} | {len(bins)} bins |"]
    if "tie_abs_gap" in metrics:
        lines.append(f"| mean absolute reward gap on tied pairs | {cell(metrics['tie_abs_gap'])} | |")
    if "ensemble_gap_std" in metrics:
        lines.append(f"| ensemble spread of the reward gap (std) | {cell(metrics['ensemble_gap_std'])} | |")
    ceiling = metrics["human_ceiling"]
    if ceiling is not None and metrics["heldout_accuracy"] is not None:
        lines += ["", f"Held-out accuracy is {points(ceiling, metrics['heldout_accuracy'])} the human ceiling; on the "
                      f"same held-out votes the reward model is {points(ceiling, metrics['model_on_ceiling_units'])} "
                      "it."]
    lines += ["", "## Calibration", "", f"![reliability]({RELIABILITY_PLOT})", "",
              "| bin | pairs | mean predicted | observed |", "|---|---|---|---|"]
    lines += [f"| {b['low']:.1f}-{b['high']:.1f} | {b['count']} | {b['predicted']:.3f} | {b['observed']:.3f} |"
              for b in bins]
    lines += ["", "## Reward distributions", "", f"![distributions]({DISTRIBUTION_PLOT})", ""]
    return "\n".join(lines)


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def points(ceiling: float, value: float) -> str:
    gap = 100 * (ceiling - value)
    return f"{abs(gap):.1f} points {'below' if gap >= 0 else 'above'}"


def main(config, run: RunConfig) -> dict:
    """`rlhf reward eval`: evaluates the published reward model on the same held-out split it was trained with,
    into its own folder `runs/<name>/reward-eval/` (the reward folder is an input of later stages: left as it
    is)."""
    from pipeline.run import config_hash, made_with, same_work  # (pipeline.run imports the stages)

    run_dir = run.directory()
    published = run_dir.stage_path("reward")
    if not (published / "config.json").exists():
        raise MissingInputError(f"no reward model at {published}: run `rlhf reward --config ...` first")
    found = inputs(config, run)
    wanted = config_hash(config, run.round)
    entry = run_dir.stage_entry("reward") or {}
    if not (same_work(entry, wanted, {name: str(v) for name, v in found.items()})
            and made_with(published, wanted, entry.get("input_hashes"))):
        raise ConfigError(f"the reward model at {published} was trained with other settings or on other pairs than "
                          "these (a store with new votes, an edited file): its held-out split would not be the one "
                          "it was trained with. Give the settings it was trained with, or rerun `rlhf reward`")
    _, eval_pairs = round_pairs(found, config, run.round)
    gold = gold_items(config)
    with stage_lock(run_dir, EVAL_FOLDER):  # a second `rlhf reward eval` would clear this one's folder
        tokenizer = reward_tokenizer(str(published))
        model = load_reward_model(str(published), tokenizer)
        staged = run_dir.partial_path(EVAL_FOLDER)
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        metrics = evaluate(model, tokenizer, eval_pairs, gold, config, staged)
        folder = run_dir.publish(EVAL_FOLDER, staged)
    tracker = tracking.start(run.trackers, run.project, run.name, EVAL_FOLDER, as_plain_dict(config),
                             run_dir.path / "tracking", label=run_dir.label(EVAL_FOLDER))
    try:
        log_evaluation(tracker, metrics, folder)
    finally:
        tracker.finish()
    print(f"[reward eval] {folder / 'eval.md'}: held-out accuracy {fmt(metrics['heldout_accuracy'])}, human "
          f"ceiling {fmt(metrics['human_ceiling'])} vs the model's {fmt(metrics['model_on_ceiling_units'])} on the "
          "same votes")
    return metrics
