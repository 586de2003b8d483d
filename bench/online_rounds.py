"""Are labels worth more when they are asked online? At an equal total label budget B, one round of B labels
against three rounds of about B/3 (`run.rounds: 3`: rounds 2 and 3 label the latest PPO policy's answers where
the reward model is least sure), on the same SFT model, judge and seeds, and with the same PPO episodes in total.

    python bench/online_rounds.py [--config configs/default.yaml] [--root /tmp/online] [--judges a,b,...]
                                  [--prompts 32] [--episodes 96] [--eval-prompts 100] [--set KEY=VALUE ...]

The SFT model is trained once and shared by every run. Per judge, both arms run `rlhf run` in their own folder:
the single round labels all pairs of 4 answers to `--prompts` prompts (B) and trains PPO for `--episodes`
episodes; the three rounds label all pairs of 4 answers to a third as many prompts, then twice B/3 pairs chosen by
uncertainty among the answers to fresh prompts, and train PPO for a third of the episodes each round (continuing).
Both evaluate their final policies on the same `--eval-prompts` held-out prompts (the rounds' intermediate
evaluations on 16). Every run goes through `rlhf run`, so the benchmark run again on the same `--root` reruns only
what changed (with `--set reward.round_init=previous`: rounds 2 and 3 of the three-round arm): changed settings or
inputs, not changed code (`rlhf run` then says which stages another version of the code made; a fresh `--root`
measures the code as it is).

Prints per judge the labels each arm used and the final PPO and DPO judge win rates against SFT with 95%
intervals; a policy's gain is its win rate minus 0.5, an arm's the mean of its PPO's and DPO's. Last line
`ratio: X`, X = the median over judges of the three rounds' gain divided by the single round's (a judge on which
the single round gained nothing has no ratio and is left out).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.alignment import rlhf  # noqa: E402  (the rlhf command in a subprocess, timed)
from rlhf.runs import atomic_write_text  # noqa: E402

JUDGES = ("builtin:length", "builtin:keywords")
POLICIES = ("ppo", "dpo")
ROUNDS = 3
ANSWERS = 4  # per prompt: 6 pairs each
INTERMEDIATE_EVAL_PROMPTS = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--root", default="", help="Folder for the runs (empty: a new temporary folder).")
    parser.add_argument("--judges", default=",".join(JUDGES), help="Comma-separated judges, both arms each.")
    parser.add_argument("--prompts", type=int, default=32, help="The single round's prompts: B = 6 pairs each.")
    # 96: 6 updates of the default's 16 answers (2 a round), the updates and forward-backward tokens of the recorded
    # runs (48 episodes in two passes of 8, the default until the fourteenth session); 48 would now give 1 a round
    parser.add_argument("--episodes", type=int, default=96, help="PPO episodes in total, in either arm.")
    parser.add_argument("--eval-prompts", type=int, default=100, help="Held-out prompts of the final evaluation.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Extra config override for every run, e.g. reward.round_init=previous (repeatable).")
    return parser.parse_args(argv)


def arm_configs(base: dict, sft: str, prompts: int, episodes: int, eval_prompts: int) -> dict[str, dict]:
    """{"single": config, "rounds": config} from the base run config: no sft section (both start from the shared
    SFT model), the same recipes; the single round with B = 6 x prompts pairs and every PPO episode, the three
    rounds with a third of each per round. Each arm's final evaluation is on `eval_prompts` prompts."""
    common = {name: dict(base[name]) for name in ("preferences", "reward", "ppo", "dpo", "eval")}
    common["preferences"]["model"] = common["reward"]["model"] = common["ppo"]["model"] = sft
    common["dpo"]["model"] = common["eval"]["baseline"] = sft
    common["ppo"].update(num_eval_prompts=INTERMEDIATE_EVAL_PROMPTS, eval_every=0)
    run = {**base["run"], "tracking": "none"}  # the trackers' start-up is no part of what is compared
    single = {"run": run, **{name: dict(values) for name, values in common.items()}}
    single["preferences"].update(num_prompts=prompts, responses_per_prompt=ANSWERS)
    single["ppo"]["total_episodes"] = episodes
    single["eval"].update(num_prompts=eval_prompts, batch_size=min(eval_prompts, 50))
    pairs = ANSWERS * (ANSWERS - 1) // 2
    rounds = {"run": {**run, "rounds": ROUNDS}, **{name: dict(values) for name, values in common.items()}}
    rounds["preferences"].update(num_prompts=round(prompts / ROUNDS), responses_per_prompt=ANSWERS,
                                 round_prompts=prompts, round_budget=round(prompts * pairs / ROUNDS))
    rounds["ppo"]["total_episodes"] = episodes // ROUNDS
    rounds["eval"]["num_prompts"] = INTERMEDIATE_EVAL_PROMPTS
    rounds[f"round-{ROUNDS}"] = {"eval": {"num_prompts": eval_prompts, "batch_size": min(eval_prompts, 50)}}
    return {"single": single, "rounds": rounds}


def arm_result(run: Path) -> dict:
    """The labels an arm used (pairs exported, every round) and its last evaluation's policies."""
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    labels = [entry["metrics"]["pairs"] for key, entry in sorted(stages.items()) if key.endswith("preferences")]
    last = max((key for key in stages if key.endswith("eval")), key=round_of)
    results = json.loads((run / last / "results.json").read_text())
    return {"labels": labels, "prompts": results["prompts"], "policies": results["policies"],
            "seconds": sum(entry.get("timings", {}).get("total_s", 0.0) for entry in stages.values())}


def round_of(key: str) -> int:
    """The round of a manifest key: `eval` 1, `round-3/eval` 3."""
    return int(key.split("/")[0].split("-")[1]) if key.startswith("round-") else 1


def gain(result: dict) -> float:
    """The arm's judge gain over SFT: its PPO's and DPO's win rates against SFT, less a half, averaged."""
    return statistics.fmean(result["policies"][name]["win_rate_judge"] - 0.5 for name in POLICIES)


def judge_ratio(single: dict, rounds: dict) -> float | None:
    """The three rounds' gain over the single round's; None when the single round gained nothing."""
    return gain(rounds) / gain(single) if gain(single) > 0 else None


def ratio(results: dict) -> float | None:
    ratios = [judge_ratio(arms["single"], arms["rounds"]) for arms in results.values()]
    ratios = [value for value in ratios if value is not None]
    return statistics.median(ratios) if ratios else None


def judge_lines(judge: str, arms: dict) -> list[str]:
    lines = [f"judge {judge}: final eval on {arms['single']['prompts']} prompts (three rounds: "
             f"{arms['rounds']['prompts']})"]
    for arm, title in (("single", "1 round "), ("rounds", f"{ROUNDS} rounds")):
        result = arms[arm]
        rates = ", ".join(f"{name} {policy_rate(result['policies'][name])}" for name in POLICIES)
        lines.append(f"  {title}: {sum(result['labels'])} labels ({' + '.join(map(str, result['labels']))}), "
                     f"win rate vs SFT {rates}; gain {gain(result):+.3f}; {result['seconds']:.0f} s")
    value = judge_ratio(arms["single"], arms["rounds"])
    lines.append(f"  gain ratio: {'n/a (the single round gained nothing)' if value is None else f'{value:.3f}'}")
    return lines


def policy_rate(policy: dict) -> str:
    return f"{policy['win_rate_judge']:.3f} [{policy['win_rate_judge_low']:.3f}, {policy['win_rate_judge_high']:.3f}]"


def summary(results: dict) -> str:
    lines = [line for judge, arms in results.items() for line in judge_lines(judge, arms)]
    value = ratio(results)
    return "\n".join(lines + [f"ratio: {'n/a' if value is None else f'{value:.3f}'}"])


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.root or tempfile.mkdtemp(prefix="online-rounds-")).resolve()  # the runs start in the repository
    root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base = yaml.safe_load((REPO / args.config).read_text())
    extra = [f"--{item}" for item in args.set if not item.startswith("sft.")]
    shared = root / "shared.yaml"  # through `rlhf run`, so a rerun on the same root finds it up to date
    shared.write_text(yaml.safe_dump({"run": {**base["run"], "tracking": "none"}, "sft": base["sft"]}))
    print(f"[online] the shared SFT model: rlhf run --config {shared}", flush=True)
    rlhf("run", "--config", str(shared), f"--run.output_root={root}", "--run.name=shared",
         *(f"--{item}" for item in args.set if item.startswith(("sft.", "run."))))
    configs = arm_configs(base, str(root / "shared" / "sft"), args.prompts, args.episodes, args.eval_prompts)
    results = {}
    for judge in args.judges.split(","):
        folder = root / judge.split(":")[-1]
        folder.mkdir(exist_ok=True)
        on_judge = [f"--preferences.simulate_judge={judge}", f"--ppo.judge={judge}", f"--eval.judge={judge}"]
        results[judge] = {}
        for arm, config in configs.items():
            path = folder / f"{arm}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            print(f"[online] {judge}, {arm}: rlhf run --config {path}", flush=True)
            rlhf("run", "--config", str(path), f"--run.output_root={folder}", f"--run.name={arm}", *on_judge, *extra)
            results[judge][arm] = arm_result(folder / arm)
        atomic_write_text(root / "results.json", json.dumps(results, indent=1))
        print("\n".join(judge_lines(judge, results[judge])), flush=True)
    print(f"[online] benchmark time {(time.time() - started) / 60:.1f} min", flush=True)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
