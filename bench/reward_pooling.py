"""Reward pooling: the reward stage reading its head at the last token (TRL's reward model, the yardstick) against
averaging it over the answer's tokens (`reward.pooling: answer_mean`), on the same SFT model, votes and held-out
prompts, one after the other in one call.

    python bench/reward_pooling.py --run RUN_FOLDER [--config configs/default.yaml] [--root /tmp/pooling]

RUN_FOLDER is a finished run with `sft/` and `preferences/` (e.g. one `bench/alignment.py` made:
<root>/<judge>-XXXX/default). Both trainings take the config's reward settings, differing in pooling only.
Prints each one's held-out accuracy beside the labellers' ceiling, and last `ratio: X` = answer_mean's held-out
accuracy / last_token's.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POOLINGS = ("last_token", "answer_mean")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="A finished run folder holding sft/ and preferences/.")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--root", default="", help="Folder for the two reward runs (empty: a temporary one).")
    return parser.parse_args(argv)


def train(args, pooling: str, root: Path) -> dict:
    """One reward training with this pooling; the reward stage's recorded metrics."""
    run = Path(args.run)
    subprocess.run([sys.executable, "-m", "pipeline.cli", "reward", "--config", args.config,
                    f"--run.output_root={root}", f"--run.name={pooling}", "--run.tracking=none",
                    f"--reward.model={run / 'sft'}", f"--reward.preferences={run / 'preferences'}",
                    f"--reward.pooling={pooling}"], cwd=REPO, check=True)
    return json.loads((root / pooling / "manifest.json").read_text())["stages"]["reward"]["metrics"]


def line(pooling: str, metrics: dict) -> str:
    def fmt(key):
        return "-" if metrics.get(key) is None else f"{metrics[key]:.3f}"

    return (f"{pooling}: held-out accuracy {fmt('heldout_accuracy')} on {metrics['heldout_pairs']} pairs "
            f"({metrics['train_pairs']} trained); labellers' ceiling {fmt('human_ceiling')}, the model on the same "
            f"votes {fmt('model_on_ceiling_units')}")


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="pooling-"))
    results = {pooling: train(args, pooling, root) for pooling in POOLINGS}
    for pooling, metrics in results.items():
        print(line(pooling, metrics))
    ratio = results["answer_mean"]["heldout_accuracy"] / results["last_token"]["heldout_accuracy"]
    print(f"ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
