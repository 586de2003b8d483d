"""Does the default run align the model, whatever the preference? The whole default chain (`rlhf run`) once per
judge, each in a fresh output root: the simulated labellers vote with the judge, PPO follows it as gold against
its reward model, and eval scores SFT, PPO and DPO with it on the held-out prompts.

    python bench/alignment.py [--config configs/default.yaml] [--root /tmp/alignment] [--judges a,b,...]
                              [--held-out builtin:sentiment] [--eval-prompts 200] [--frontier] [--set KEY=VALUE ...]

Prints per judge: the reward model's held-out accuracy and the labellers' ceiling (with their counts), the SFT,
PPO and DPO judge means, win rates against SFT with 95% bootstrap intervals, KL to SFT, and each stage's wall
time. The held-out judge (the recipes were tuned on the others, nothing on it) is reported apart. Last line:
`ratio: X`, X = the smallest lower bound of the PPO and DPO judge win-rate intervals over all judges / 0.5 (above
1.0: every policy beats SFT on every judge with confidence).

`--methods` picks the policies compared with SFT: the chain's ppo and dpo, and the critic-free grpo, rloo and
reinforce_pp, each trained after the chain from its SFT model against its reward model with the chain's PPO recipe
(only `ppo.algorithm` changed), then evaluated as the chain's eval was (same prompts, greedy, same SFT answers).

`--frontier` then trains PPO at three `kl_coef` values and DPO at three `beta` values from the first judge's SFT
model, reward model and labels, evaluates them together and plots judge score against KL for both
(`frontier.png` in the root).

`--verifiable` measures a verifiable reward instead of the judges: each method of `--methods` (default ppo, grpo,
rloo, reinforce_pp) trains the bundled model on the arithmetic problems with `configs/arithmetic.yaml`
(builtin:final_number: 1 when the answer's final number is the reference's), then one greedy eval gives each its
accuracy on the 80 held-out problems against the untrained model's. Last line: `ratio: X`, X = the smallest lower
bound of the methods' win-rate intervals against the untrained model (1 for a problem it newly solves, 0.5 for a
tie) over 0.5.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from preference_ui.simulate import voting_judge  # noqa: E402
from rlhf.errors import UserError  # noqa: E402
from rlhf.runs import atomic_write_text  # noqa: E402

JUDGES = ("builtin:length", "builtin:readability", "builtin:keywords", "builtin:sentiment")
HELD_OUT = "builtin:sentiment"
CHAINED = ("ppo", "dpo")  # the policies `rlhf run` trains
CRITIC_FREE = ("grpo", "rloo", "reinforce_pp")
VERIFIABLE_CONFIG = "configs/arithmetic.yaml"
CHAIN = ("sft", "preferences", "reward", "ppo", "dpo", "eval")  # the stages' order in `rlhf run`
RUN_NAME = "default"


# what each chain and comparison is given by the benchmark, and where it comes from
SET_BY_THE_BENCH = {**{key: "--judges" for key in ("preferences.simulate_judge", "ppo.judge", "eval.judge")},
                    "eval.num_prompts": "--eval-prompts",
                    **{key: "the chain's" for key in ("ppo.model", "ppo.reward_model", "dpo.model", "dpo.preferences",
                                                      "dpo.reward_model", "eval.baseline", "eval.reward_model",
                                                      "eval.policies")},
                    "ppo.algorithm": "--methods", **{key: "--root" for key in ("run.name", "run.output_root")}}
SET_WHEN_VERIFIABLE = ("eval.policies", "ppo.algorithm", "run.name", "run.output_root")  # (it trains from the config)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="", help="Run config (empty: configs/default.yaml, or "
                        f"{VERIFIABLE_CONFIG} with --verifiable).")
    parser.add_argument("--root", default="", help="Folder for the runs (empty: a new temporary folder).")
    parser.add_argument("--judges", default=",".join(JUDGES), help="Comma-separated judges (builtin:NAME or "
                        "module:function), one run each.")
    parser.add_argument("--held-out", default=HELD_OUT, help="The judge nothing was tuned on, reported apart.")
    parser.add_argument("--eval-prompts", type=int, default=200, help="Held-out prompts eval scores.")
    parser.add_argument("--frontier", action="store_true", help="Also the reward-KL frontier on the first judge.")
    parser.add_argument("--kl-coefs", default="0.02,0.05,0.2", help="PPO kl_coef values of the frontier.")
    parser.add_argument("--betas", default="0.03,0.1,0.3", help="DPO beta values of the frontier.")
    parser.add_argument("--methods", default="", help="Comma-separated policies compared with SFT, of ppo, dpo, "
                        "grpo, rloo, reinforce_pp (empty: ppo,dpo; with --verifiable: ppo,grpo,rloo,reinforce_pp).")
    parser.add_argument("--verifiable", action="store_true", help="The arithmetic task's held-out accuracy instead "
                        "of the judges.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Extra config override for every run, e.g. ppo.total_episodes=64 (repeatable).")
    args = parser.parse_args(argv)
    args.config = args.config or (VERIFIABLE_CONFIG if args.verifiable else "configs/default.yaml")
    args.methods = checked_methods(parser, args.methods, args.verifiable)
    args.kl_coefs = checked_values(parser, "--kl-coefs", args.kl_coefs)
    args.betas = checked_values(parser, "--betas", args.betas)
    if any(item.replace(" ", "").startswith("run.rounds=") for item in args.set):
        parser.error("--set run.rounds: the summary reads round 1's reward model and eval; compare online rounds "
                     "with bench/online_rounds.py")
    for item in args.set:  # given to some runs only (the chain's or the comparisons'), the policies were measured apart
        key = item.split("=", 1)[0].strip()
        if key in SET_BY_THE_BENCH and (not args.verifiable or key in SET_WHEN_VERIFIABLE):
            parser.error(f"--set {key}: the benchmark sets it itself, alike for every run ({SET_BY_THE_BENCH[key]})")
    if not args.verifiable:
        checked_judges(parser, args.judges)
    return args


def checked_values(parser, option: str, values: str) -> list[str]:
    """A frontier's settings: numbers, each once (each names a run, `ppo-kl0.05`), checked before any chain."""
    chosen = [value.strip() for value in values.split(",")]
    for value in chosen:
        try:
            float(value)
        except ValueError:
            parser.error(f"{option}: '{value}' is not a number")
    if len(set(chosen)) < len(chosen):
        parser.error(f"{option}: a value is given twice ({values})")
    return chosen


def checked_judges(parser, judges: str) -> None:
    """Every judge loads as the simulated labellers will load it, before any chain starts: a mistyped judge is a
    usage error now, not a failed preferences stage after an SFT run."""
    for judge in judges.split(","):
        try:
            voting_judge(judge)
        except UserError as err:
            parser.error(f"--judges: {err}")


def checked_methods(parser, methods: str, verifiable: bool) -> list[str]:
    """The methods asked for; an unknown one, or dpo on the verifiable task, is a usage error."""
    known = ("ppo", *CRITIC_FREE) if verifiable else (*CHAINED, *CRITIC_FREE)
    chosen = methods.split(",") if methods else list(("ppo", *CRITIC_FREE) if verifiable else CHAINED)
    for method in chosen:
        if method not in known:
            why = (": DPO learns from preference pairs, and the verifiable task has reference answers, not votes"
                   if verifiable and method == "dpo" else "")
            parser.error(f"--methods: '{method}' is not one of {', '.join(known)}{why}")
    return chosen


def rlhf(*words: str) -> float:
    """Runs the rlhf command line in a subprocess from the repository; returns its wall seconds."""
    started = time.time()
    subprocess.run([sys.executable, "-m", "pipeline.cli", *words], cwd=REPO, check=True)
    return time.time() - started


def judge_name(judge: str) -> str:
    return judge.split(":")[-1].replace(".", "_")


def run_chain(args, judge: str, root: Path) -> dict:
    """The default chain on one judge in a fresh folder under `root`; the numbers the summary needs."""
    output_root = Path(tempfile.mkdtemp(prefix=f"{judge_name(judge)}-", dir=root))
    overrides = [f"--preferences.simulate_judge={judge}", f"--ppo.judge={judge}", f"--eval.judge={judge}",
                 f"--eval.num_prompts={args.eval_prompts}", *(f"--{item}" for item in args.set)]
    print(f"[alignment] {judge}: rlhf run in {output_root}", flush=True)
    wall = rlhf("run", "--config", args.config, f"--run.output_root={output_root}", f"--run.name={RUN_NAME}",
                *overrides)
    result = {**chain_result(output_root / RUN_NAME), "wall_s": wall, "output_root": str(output_root)}
    critic_free = [method for method in args.methods if method in CRITIC_FREE]
    if critic_free:
        result["policies"], seconds = critic_free_beside_chain(args, judge, output_root, critic_free,
                                                               result["policies"])
        result["stage_seconds"].update(seconds)
        result["wall_s"] += sum(seconds.values())
    result["policies"] = in_order(result["policies"], args.methods)
    return result


def in_order(policies: dict, methods: list[str]) -> dict:
    """SFT (the baseline) and the methods asked for, in that order."""
    return {name: policies[name] for name in ("sft", *methods)}


def critic_free_beside_chain(args, judge: str, output_root: Path, methods: list[str],
                             chain_policies: dict) -> tuple[dict, dict]:
    """Each critic-free method from the chain's SFT model against its reward model, then evaluated as the chain's
    eval did (the same prompts, greedy, the same baseline: its SFT and policy numbers stand); (every policy's
    numbers, each method's wall seconds)."""
    run = output_root / RUN_NAME
    folders, seconds = train_algorithms(args, output_root, methods, f"--ppo.model={run / 'sft'}",
                                        f"--ppo.reward_model={run / 'reward'}", f"--ppo.judge={judge}")
    results = compare(args, output_root, folders, f"--eval.baseline={run / 'sft'}",
                      f"--eval.reward_model={run / 'reward'}", f"--eval.judge={judge}",
                      f"--eval.num_prompts={args.eval_prompts}")
    return {**chain_policies, **results["policies"]}, seconds


def stage(args, name: str, output_root: Path, *words: str) -> float:
    """`rlhf NAME` on the config in `output_root`, with the `--set` overrides of its own section and of `run`
    (a stage command takes no others); its wall seconds."""
    overrides = [f"--{item}" for item in args.set if item.split(".", 1)[0] in (name, "run")]
    return rlhf(name, "--config", args.config, f"--run.output_root={output_root}", *overrides, *words)


def train_algorithms(args, output_root: Path, algorithms: list[str], *words: str) -> tuple[dict, dict]:
    """`rlhf ppo` once per algorithm, each as its own run named after it; (policy folders, wall seconds)."""
    folders, seconds = {}, {}
    for algorithm in algorithms:
        print(f"[alignment] {algorithm} in {output_root / algorithm}", flush=True)
        seconds[algorithm] = stage(args, "ppo", output_root, *words, f"--run.name={algorithm}",
                                   f"--ppo.algorithm={algorithm}")
        folders[algorithm] = output_root / algorithm / "ppo"
    return folders, seconds


def compare(args, output_root: Path, policies: dict, *overrides: str) -> dict:
    """One eval of the policies (name: folder) against the baseline, as the run `compare`; its results."""
    listed = ",".join(f"{name}={folder}" for name, folder in policies.items())
    stage(args, "eval", output_root, "--run.name=compare", f"--eval.policies={listed}", *overrides)
    return json.loads((output_root / "compare" / "eval" / "results.json").read_text())


def chain_result(run: Path) -> dict:
    """From a finished run's manifest and eval results: reward-model accuracy and ceiling, each policy's judge
    numbers, and each stage's seconds."""
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    reward = stages["reward"]["metrics"]
    results = json.loads((run / "eval" / "results.json").read_text())
    return {"reward": {key: reward.get(key) for key in ("heldout_accuracy", "heldout_pairs", "human_ceiling",
                                                        "ceiling_units", "model_on_ceiling_units")},
            "prompts": results["prompts"], "policies": results["policies"],
            "stage_seconds": {name: stages[name].get("timings", {}).get("total_s")
                              for name in sorted(stages, key=chain_position)}}


def chain_position(stage: str) -> int:
    return CHAIN.index(stage) if stage in CHAIN else len(CHAIN)


def smallest_lower_bound(results: dict) -> float:
    """The smallest lower bound of the policies' judge win-rate intervals (against SFT) over every judge's
    results."""
    return min(policy["win_rate_judge_low"] for result in results.values()
               for name, policy in result["policies"].items() if name != "sft")


def ratio(results: dict) -> float:
    """The benchmark's figure: above 1.0 when every policy beats SFT on every judge with confidence."""
    return smallest_lower_bound(results) / 0.5


def judge_lines(judge: str, result: dict) -> list[str]:
    reward, policies = result["reward"], result["policies"]
    lines = [f"judge {judge}: {result['prompts']} eval prompts, run in {result['wall_s']:.0f} s "
             f"({result['output_root']})",
             f"  reward model held-out accuracy {fmt(reward['heldout_accuracy'])} on {reward['heldout_pairs']} pairs; "
             f"labellers' ceiling {fmt(reward['human_ceiling'])} on {reward['ceiling_units']} votes "
             f"(the reward model on those votes: {fmt(reward['model_on_ceiling_units'])})",
             "  judge mean: " + ", ".join(f"{name} {policy['judge']:.3f}" for name, policy in policies.items())]
    if all("distinct_4grams" in policy for policy in policies.values()):  # (results from before the column: none)
        lines.append("  distinct 4-grams (repetition: lower repeats more): "
                     + ", ".join(f"{name} {policy['distinct_4grams']:.3f}" for name, policy in policies.items()))
    for name, policy in trained(policies).items():
        lines.append(f"  {name}: win rate vs SFT {policy['win_rate_judge']:.3f} [{policy['win_rate_judge_low']:.3f}, "
                     f"{policy['win_rate_judge_high']:.3f}], KL to SFT {policy['kl']:.2f}")
    lines.append("  stage seconds: " + ", ".join(f"{name} {fmt(seconds, '.0f')}"
                                                for name, seconds in result["stage_seconds"].items()))
    return lines


def trained(policies: dict) -> dict:
    return {name: policy for name, policy in policies.items() if name != "sft"}


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def summary(results: dict, held_out: str) -> str:
    """Every judge's lines (the held-out judge apart, last) and the ratio line."""
    tuned = {judge: result for judge, result in results.items() if judge != held_out}
    lines = ["== judges the recipes were tuned on =="]
    for judge, result in tuned.items():
        lines += judge_lines(judge, result)
    if held_out in results:
        lines += ["== held-out judge (nothing tuned on it) ==", *judge_lines(held_out, results[held_out])]
    lines.append(f"smallest lower bound of the policies' win-rate intervals: {smallest_lower_bound(results):.3f}")
    lines.append(f"ratio: {ratio(results):.3f}")
    return "\n".join(lines)


def frontier(args, judge: str, chain: dict, root: Path) -> Path:
    """PPO at each kl_coef and DPO at each beta from the chain's SFT model, reward model and labels, evaluated
    together on the judge; plots judge score against KL to SFT."""
    run, output_root = Path(chain["output_root"]) / RUN_NAME, root / "frontier"
    policies = {}
    for value in args.kl_coefs:
        name = f"ppo-kl{value}"
        stage(args, "ppo", output_root, f"--run.name={name}", f"--ppo.model={run / 'sft'}",
              f"--ppo.reward_model={run / 'reward'}", f"--ppo.kl_coef={value}", f"--ppo.judge={judge}")
        policies[name] = output_root / name / "ppo"
    for value in args.betas:
        name = f"dpo-beta{value}"
        stage(args, "dpo", output_root, f"--run.name={name}", f"--dpo.model={run / 'sft'}",
              f"--dpo.preferences={run / 'preferences'}", f"--dpo.reward_model={run / 'reward'}", f"--dpo.beta={value}")
        policies[name] = output_root / name / "dpo"
    results = compare(args, output_root, policies, f"--eval.baseline={run / 'sft'}",
                      f"--eval.reward_model={run / 'reward'}", f"--eval.judge={judge}",
                      f"--eval.num_prompts={args.eval_prompts}")
    return frontier_plot(root / "frontier.png", results["policies"], judge)


def frontier_points(results: dict, family: str) -> list[tuple[float, float, str]]:
    """(KL to SFT, judge mean, setting) of each of a family's policies (named `ppo-kl0.05`, `dpo-beta0.1`), in
    order of KL: the line the frontier plot draws."""
    return sorted((result["kl"], result["judge"], name.split("-", 1)[1]) for name, result in results.items()
                  if name.startswith(family + "-"))


def frontier_plot(path: Path, results: dict, judge: str) -> Path:
    from rlhf.plots import pyplot, save_figure

    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([0.0], [results["sft"]["judge"]], color="black", zorder=3, label="sft")
    for family, marker in (("ppo", "o"), ("dpo", "s")):
        points = frontier_points(results, family)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=family)
        for kl, score, setting in points:
            ax.annotate(setting, (kl, score), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("KL to SFT (nats per answer)")
    ax.set_ylabel(f"judge {judge} (mean over eval prompts)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(figure, path)
    return path


def verifiable(args, root: Path) -> dict:
    """Each method trained on the arithmetic problems, then one greedy eval of them all against the untrained
    model on the held-out problems."""
    folders, seconds = train_algorithms(args, root, args.methods)
    results = compare(args, root, folders)
    return {"prompts": results["prompts"], "policies": in_order(results["policies"], args.methods),
            "train_seconds": seconds}


def verifiable_summary(result: dict, config: str) -> str:
    """Accuracy before and after each method, the win-rate intervals, and the ratio line."""
    policies, before = result["policies"], result["policies"]["sft"]["accuracy"]
    lines = [f"verifiable task ({config}): {result['prompts']} held-out problems, greedy; accuracy before "
             f"training {before:.3f}"]
    for name, policy in trained(policies).items():
        lines.append(f"  {name}: accuracy {before:.3f} -> {policy['accuracy']:.3f}, win rate vs untrained "
                     f"{policy['win_rate_judge']:.3f} [{policy['win_rate_judge_low']:.3f}, "
                     f"{policy['win_rate_judge_high']:.3f}], KL {policy['kl']:.2f}, trained in "
                     f"{result['train_seconds'][name]:.0f} s")
    lines.append(f"ratio: {ratio({config: result}):.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    # absolute: the stages run in the repository, and their folders are read back from here
    root = Path(args.root or tempfile.mkdtemp(prefix="alignment-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.verifiable:
        result = verifiable(args, root)
        atomic_write_text(root / "results.json", json.dumps(result, indent=1))
        print(verifiable_summary(result, args.config))
        return 0
    judges = args.judges.split(",")
    results = {}
    for judge in judges:
        results[judge] = run_chain(args, judge, root)
        atomic_write_text(root / "results.json", json.dumps(results, indent=1))  # the judges' order kept
        print("\n".join(judge_lines(judge, results[judge])), flush=True)
    if args.frontier:
        print(f"[alignment] frontier plot: {frontier(args, judges[0], results[judges[0]], root)}", flush=True)
    print(summary(results, args.held_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
