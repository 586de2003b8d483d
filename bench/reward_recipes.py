"""Reward-model recipes side by side: TRL's reward model (the head read at the last token, starting at random: the
yardstick), the head averaged over the answer's tokens (`reward.pooling: answer_mean`), and that head fitted alone
on the frozen model before fine-tuning (`reward.probe_steps`), on the same SFT model, votes and held-out prompts,
one after the other in one call.

    python bench/reward_recipes.py --run RUN_FOLDER [--config configs/default.yaml] [--root /tmp/recipes]
                                   [--recipes last_token,answer_mean,answer_mean+probe]

RUN_FOLDER is a finished run with `sft/` and `preferences/` (e.g. one `bench/alignment.py` made:
<root>/<judge>-XXXX/default). Every training takes the config's reward settings but for what its recipe sets.
Prints each one's held-out accuracy beside the labellers' ceiling and its training seconds, and last `ratio: X` =
the last recipe's held-out accuracy / the first's.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = {
    "last_token": ["--reward.pooling=last_token", "--reward.probe_steps=0"],
    "answer_mean": ["--reward.pooling=answer_mean", "--reward.probe_steps=0"],
    "answer_mean+probe": ["--reward.pooling=answer_mean", "--reward.probe_steps=300"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="A finished run folder holding sft/ and preferences/.")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--root", default="", help="Folder for the reward runs (empty: a temporary one).")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"Comma-separated, of {', '.join(RECIPES)}.")
    return parser.parse_args(argv)


def train(args, recipe: str, root: Path) -> dict:
    """One reward training with this recipe; the reward stage's recorded metrics and seconds."""
    run, name = Path(args.run), recipe.replace("+", "-")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "reward", "--config", args.config,
                    f"--run.output_root={root}", f"--run.name={name}", "--run.tracking=none",
                    f"--reward.model={run / 'sft'}", f"--reward.preferences={run / 'preferences'}",
                    *RECIPES[recipe]], cwd=REPO, check=True)
    stage = json.loads((root / name / "manifest.json").read_text())["stages"]["reward"]
    return {**stage["metrics"], "seconds": stage.get("timings", {}).get("total_s")}


def line(recipe: str, metrics: dict) -> str:
    def fmt(key, spec=".3f"):
        return "-" if metrics.get(key) is None else format(metrics[key], spec)

    return (f"{recipe}: held-out accuracy {fmt('heldout_accuracy')} on {metrics['heldout_pairs']} pairs "
            f"({metrics['train_pairs']} trained); labellers' ceiling {fmt('human_ceiling')}, the model on the same "
            f"votes {fmt('model_on_ceiling_units')}; stage {fmt('seconds', '.0f')} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    recipes = args.recipes.split(",")
    unknown = [recipe for recipe in recipes if recipe not in RECIPES]
    if unknown or len(recipes) < 2:
        sys.exit(f"--recipes: give two or more of {', '.join(RECIPES)} (unknown: {', '.join(unknown) or 'none'})")
    root = Path(args.root or tempfile.mkdtemp(prefix="recipes-"))
    results = {recipe: train(args, recipe, root) for recipe in recipes}
    for recipe, metrics in results.items():
        print(line(recipe, metrics))
    print(f"ratio: {results[recipes[-1]]['heldout_accuracy'] / results[recipes[0]]['heldout_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
