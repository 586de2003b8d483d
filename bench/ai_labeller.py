"""How well does an AI labeller (`rlhf label ai`) agree with the gold items and with simulated labellers?

    python bench/ai_labeller.py [--model smollm2-135m-instruct] [--prompts 48] [--answers-model NAME]
                                [--tie-margin 0.05] [--root DIR]

In a fresh label store: the 12 gold comparisons (data/gold_comparisons.jsonl), and two answers from the bundled
model to each of the first `--prompts` RL prompts (`rlhf label sample`). The AI labeller votes on every item by
data/constitution.md, each answer pair asked in both orders. Printed: its gold accuracy, its agreement with the
noise-free simulated labeller of each builtin judge (the judge's own verdict on each pair), its ties, and how far
one order alone would have swayed it (the mean P(first answer better) over all questions asked). Last line:
`ratio: X`, X = its gold accuracy over 0.5 (chance).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.alignment import rlhf  # noqa: E402

JUDGES = ("builtin:length", "builtin:readability", "builtin:keywords", "builtin:sentiment")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the AI labeller's model")
    parser.add_argument("--prompts", type=int, default=48, help="RL prompts answered twice")
    parser.add_argument("--answers-model", default="smollm2-135m-instruct", help="the model that answers them")
    parser.add_argument("--tie-margin", default="0.05", help="the AI labeller's tie margin (rlhf label ai)")
    parser.add_argument("--root", default="", help="folder for the store (empty: a new temporary folder)")
    return parser.parse_args(argv)


def judge_verdicts(comparisons: list[dict]) -> dict[str, dict[int, str]]:
    """Per judge, its verdict (a, b or tie) on each comparison: a simulated labeller at temperature 0, no noise."""
    from rlhf.judges import load_judge

    verdicts = {}
    for spec in JUDGES:
        judge = load_judge(spec)
        prompts = [c["prompt"][-1]["content"] for c in comparisons]
        a_scores = judge(prompts, [c["a"] for c in comparisons])
        b_scores = judge(prompts, [c["b"] for c in comparisons])
        verdicts[spec] = {c["id"]: "a" if a > b else "b" if b > a else "tie"
                          for c, a, b in zip(comparisons, a_scores, b_scores)}
    return verdicts


def agreement(votes: dict[int, str], verdicts: dict[int, str]) -> tuple[float, int]:
    """The share of the AI's votes that match the judge's verdict, over the pairs the judge decides."""
    decided = [i for i, verdict in verdicts.items() if verdict != "tie" and i in votes]
    return sum(votes[i] == verdicts[i] for i in decided) / max(len(decided), 1), len(decided)


def position_lean(model_spec: str, comparisons: list[dict], constitution: str) -> float:
    """The mean P(first answer better) over every question asked (each pair in both orders): 0.5 means one
    order alone would not sway the model."""
    from preference_ui.ai_labeller import comparison_messages, first_better
    from rlhf import models

    model, tokenizer = models.load_causal_lm(model_spec)
    asked = [comparison_messages(constitution, c["prompt"][-1]["content"], first, second)
             for c in comparisons for first, second in ((c["a"], c["b"]), (c["b"], c["a"]))]
    return sum(sum(first_better(model, tokenizer, asked[i:i + 8])) for i in range(0, len(asked), 8)) / len(asked)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="ai-labeller-"))
    root.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{root / 'labels.db'}"
    rlhf("label", "gold", "data/gold_comparisons.jsonl", "--db", db)
    rlhf("label", "sample", "--config", "configs/default.yaml", "--db", db, "--preferences.batch=bench",
         f"--preferences.model={args.answers_model}", f"--preferences.num_prompts={args.prompts}",
         "--preferences.responses_per_prompt=2", f"--run.output_root={root}")
    seconds = rlhf("label", "ai", "--db", db, "--model", args.model, "--overlap", "1", "--gold-rate", "0.2",
                   "--tie-margin", args.tie_margin)

    from rlhf.store import Store

    store = Store(db, create=False)
    comparisons = store.comparisons()
    votes = {vote.comparison_id: vote.choice for vote in store.votes()}
    gold = [c for c in comparisons if c["kind"] == "gold"]
    gold_accuracy = sum(votes[c["id"]] == c["expected"] for c in gold) / len(gold)
    train = [c for c in comparisons if c["kind"] == "train"]
    lean = position_lean(args.model, train, (REPO / "data" / "constitution.md").read_text())
    lines = [f"AI labeller {args.model} (tie margin {args.tie_margin}): {len(votes)} votes in {seconds:.0f} s "
             f"({root})",
             f"  gold accuracy {gold_accuracy:.3f} on {len(gold)} gold items",
             f"  ties {sum(votes[c['id']] == 'tie' for c in train)} of {len(train)} sampled pairs; mean P(first "
             f"answer better) over both orders asked {lean:.3f}"]
    results = {"gold_accuracy": gold_accuracy, "position_lean": lean, "agreement": {}}
    for spec, verdicts in judge_verdicts(train).items():
        share, decided = agreement(votes, verdicts)
        results["agreement"][spec] = share
        lines.append(f"  agreement with the simulated labeller of {spec}: {share:.3f} on {decided} pairs it decides")
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    print(f"ratio: {gold_accuracy / 0.5:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
