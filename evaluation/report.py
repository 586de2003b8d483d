"""The run's report: a headline table of every policy against the baseline, and the plots people look at
(training curves, reward against KL, gold against proxy during PPO, score distributions)."""
import json
from pathlib import Path

from evaluation.config import EvalStageConfig
from rlhf.plots import pyplot, save_figure
from rlhf.runs import RunDir, atomic_write_text, read_stage_record

COLUMNS = [("reward", "reward"), ("win_rate_reward", "win rate vs {against} (reward)"), ("judge", "judge"),
           ("win_rate_judge", "win rate vs {against} (judge)"), ("kl", "KL to {against}"), ("tokens", "tokens"),
           ("distinct_4grams", "distinct 4-grams"), ("eos_rate", "stop-token rate"),
           ("win_rate_human", "win rate vs {against} (people)"),
           ("human_votes", "people's votes")]
TRAINING_CURVES = {"ppo": ("objective/scores", "objective/kl"), "dpo": ("loss", "rewards/margins")}


def write_report(folder: Path, results: dict, run_dir: RunDir, config: EvalStageConfig, per_prompt: dict,
                 baseline: str) -> str:
    """Writes report.md and its plots into `folder`; returns the report's text (links relative to `folder`).
    `baseline`: the baseline's folder as the stage found it."""
    histories = {stage: load_history(run_dir.stage_path(stage)) for stage in TRAINING_CURVES}
    histories = {stage: history for stage, history in histories.items() if history}
    plots = []
    if histories:
        plots.append(("Training curves", training_curves(folder / "training_curves.png", histories)))
    kind = "rewards" if per_prompt["rewards"] else "judged" if per_prompt["judged"] else None
    against = compared_against(config, run_dir, baseline)
    if kind:
        label = "reward (normalised)" if kind == "rewards" else f"judge ({config.judge})"
        plots.append((f"{label.capitalize()} against KL to {against}",
                      reward_vs_kl(folder / "reward_vs_kl.png", results, per_prompt["kls"], per_prompt[kind], label,
                                   against)))
        plots.append(("Score distributions", score_distributions(folder / "score_distribution.png", per_prompt)))
    judged_points = [point for point in load_evals(run_dir.stage_path("ppo"))  # a later round's start: KL unknown
                     if "eval/judge" in point and point["kl"] is not None]
    if len(judged_points) > 1:
        read = read_stage_record(run_dir.stage_path("ppo")).get("input_hashes", {})
        proxy = "reward model" if "reward_model" in read else "reward function"  # what PPO maximised
        plots.append((f"PPO: judge (gold) and {proxy} (proxy) against KL",
                      gold_vs_proxy(folder / "gold_vs_proxy.png", judged_points, proxy)))
    text = report_text(results, len(next(iter(per_prompt["kls"].values()))), run_dir, config, plots, against)
    if run_dir.round > 1:
        text += rounds_section(folder, round_rows(run_dir, results), against)
    atomic_write_text(folder / "report.md", text)
    return text


def round_rows(run_dir: RunDir, results: dict) -> list[dict]:
    """One row per online round so far: its reward model (stage.json metrics) and its policies' eval results (this
    round's from `results`, earlier rounds' from their eval folders)."""
    rows = []
    for round in range(1, run_dir.round + 1):
        earlier = run_dir.in_round(round)
        reward = read_stage_record(earlier.stage_path("reward")).get("metrics", {})
        evaluated = results if round == run_dir.round else load_results(earlier.stage_path("eval"))
        rows.append({"round": round, "reward": reward, "policies": evaluated})
    return rows


def load_results(eval_folder: Path) -> dict:
    path = eval_folder / "results.json"
    return json.loads(path.read_text())["policies"] if path.exists() else {}


def compared_against(config: EvalStageConfig, run_dir: RunDir, baseline_folder: str | None = None) -> str:
    """What the report's columns compare with: SFT when eval.baseline is unset, or names the run's SFT model or the
    model PPO kept as its reference; else "baseline". `baseline_folder`: where eval.baseline was found (a bundled
    model's name is a folder elsewhere)."""
    if not config.baseline:
        return "SFT"
    ppo_inputs = (run_dir.stage_entry("ppo") or {}).get("inputs", {})
    reference = ppo_inputs.get("reference") or ppo_inputs.get("policy")  # round 1: PPO starts from its reference
    sft_models = {run_dir.stage_path("sft"), *([Path(reference)] if reference else [])}
    baseline = Path(baseline_folder or config.baseline).resolve()
    return "SFT" if baseline in {path.resolve() for path in sft_models} else "baseline"


def rounds_section(folder: Path, rows: list[dict], against: str = "SFT") -> str:
    """The per-round table and plot: the reward model on each round's new held-out votes (and the previous round's
    model on them: how stale it had become), each policy's judge score (else reward), win rate vs `against` and
    KL."""
    policies = [name for name in ("ppo", "dpo") if any(name in row["policies"] for row in rows)]
    kind = "judge" if any("judge" in r for row in rows for r in row["policies"].values()) else "reward"
    header = ["round", "reward model on the round's new votes", "previous round's model on them"]
    for name in policies:
        header += [f"{name} {kind}", f"{name} win rate vs {against} ({kind})", f"{name} KL"]
    lines = ["", "## Online rounds", "",
             "Each round after the first labels the previous round's policy's answers to fresh prompts where the "
             "reward model was least sure, retrains the reward model on every vote so far and continues the "
             "policies. The reward columns are held-out accuracy on the round's own new votes (round 1: all its "
             "held-out votes).", "",
             "| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for row in rows:
        reward = row["reward"]
        cells = [str(row["round"]), fmt(reward.get("new_round_accuracy", reward.get("eval_accuracy"))),
                 fmt(reward.get("previous_model_new_round_accuracy"))]
        for name in policies:
            result = row["policies"].get(name, {})
            cells += [fmt(result.get(kind)), cell(result, f"win_rate_{kind}"), fmt(result.get("kl"))]
        lines.append("| " + " | ".join(cells) + " |")
    plot = rounds_plot(folder / "rounds.png", rows, policies, kind, against)
    return "\n".join(lines + ["", f"![Online rounds]({Path(plot).name})"]) + "\n"


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def rounds_plot(path: Path, rows: list[dict], policies: list[str], kind: str, against: str = "SFT") -> str:
    """Left: each policy's win rate vs `against` by round, with its interval; right: the reward model's accuracy on each
    round's new votes, this round's model against the previous round's."""
    plt = pyplot()

    figure, (wins, accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    rounds = [row["round"] for row in rows]
    for name in policies:
        points = [(row["round"], row["policies"][name]) for row in rows if f"win_rate_{kind}" in
                  row["policies"].get(name, {})]
        if points:
            x = [r for r, _ in points]
            y = [p[f"win_rate_{kind}"] for _, p in points]
            spread = [[v - p[f"win_rate_{kind}_low"] for v, (_, p) in zip(y, points)],
                      [p[f"win_rate_{kind}_high"] - v for v, (_, p) in zip(y, points)]]
            wins.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=name)
    wins.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    wins.set(title=f"win rate vs {against} ({kind})", xlabel="round", xticks=rounds)
    wins.legend()
    for key, label in (("new_round_accuracy", "this round's reward model"),
                       ("previous_model_new_round_accuracy", "previous round's reward model")):
        points = [(row["round"], row["reward"].get(key, row["reward"].get("eval_accuracy") if row["round"] == 1
                   and key == "new_round_accuracy" else None)) for row in rows]
        points = [(r, v) for r, v in points if v is not None]
        if points:
            accuracy.plot(*zip(*points), marker="o", label=label)
    accuracy.set(title="reward model on the round's new held-out votes", xlabel="round", ylabel="accuracy",
                 xticks=rounds)
    accuracy.legend()
    for ax in (wins, accuracy):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


def load_history(stage_folder: Path) -> list[dict]:
    path = stage_folder / "history.json"
    return json.loads(path.read_text()) if path.exists() else []


def load_evals(stage_folder: Path) -> list[dict]:
    path = stage_folder / "evals.json"
    return json.loads(path.read_text()) if path.exists() else []


def report_text(results: dict, prompts: int, run_dir: RunDir, config: EvalStageConfig,
                plots: list[tuple[str, str]], against: str | None = None) -> str:
    against = against or compared_against(config, run_dir)
    shown = [(key, title.format(against=against)) for key, title in COLUMNS
             if any(key in r for r in results.values()) or (key == "win_rate_human" and config.human)]
    sampling = f"sampled at temperature {config.temperature:g}" if config.temperature else "greedy"
    heading = "the SFT model" if against == "SFT" else f"the baseline `{config.baseline}`"
    lines = [f"# Run `{run_dir.name}`{f', round {run_dir.round}' if run_dir.round > 1 else ''}: policies against "
             f"{heading}", "",
             f"{prompts} held-out prompts from `{config.prompts}`"
             f"{f' (the first {prompts})' if config.num_prompts == prompts else ''}; answers {sampling}, at most "
             f"{config.max_new_tokens} tokens. "
             + ("Reward: the reward model, normalised by the scale it stored (0 is the SFT samples' mean). "
                if any("reward" in r for r in results.values()) else "")
             + (f"Judge: `{config.judge}`. " if config.judge else "")
             + f"Win rates count a tie as half, with {config.confidence:.0%} bootstrap "
             f"intervals over prompts. KL: summed over each answer's tokens, the full-vocabulary KL(policy || "
             f"{against}) at each position of the policy's own answer. Distinct 4-grams: the share of an answer's "
             "token 4-grams that are distinct, averaged (it falls as answers repeat themselves, as a policy gaming "
             "its reward often makes them)."
             + (f" People: blind comparisons with the {against} answer in batch `{config.human_batch}` of the label "
                "store, asked only where the two answers differ (identical answers count as ties in the other "
                "columns); a tie or both-bad counts half, each comparison the mean of its votes, Wilson 95% "
                "intervals over comparisons. Rerun `rlhf eval --eval.human true"
                f"{f' --run.round {run_dir.round}' if run_dir.round > 1 else ''}` after labelling to bring their "
                "votes in."
                if config.human else ""), "",
             "| policy | " + " | ".join(title for _, title in shown) + " |",
             "|---|" + "---|" * len(shown)]
    for name, result in results.items():
        cells = [cell(result, key) for key, _ in shown]
        shown_name = f"baseline (`{config.baseline}`)" if name == "sft" and against != "SFT" else name
        lines.append(f"| {shown_name} | " + " | ".join(cells) + " |")
    for title, path in plots:
        lines += ["", f"## {title}", "", f"![{title}]({Path(path).name})"]
    return "\n".join(lines) + "\n"


def cell(result: dict, key: str) -> str:
    if key not in result:
        return "-"
    if key.startswith("win_rate"):
        return f"{result[key]:.3f} [{result[key + '_low']:.3f}, {result[key + '_high']:.3f}]"
    return str(result[key]) if isinstance(result[key], int) else f"{result[key]:.3f}"


def training_curves(path: Path, histories: dict) -> str:
    plt = pyplot()

    figure, axes = plt.subplots(len(histories), 2, figsize=(10, 3.2 * len(histories)), squeeze=False)
    for row, (stage, history) in zip(axes, histories.items()):
        for ax, key in zip(row, TRAINING_CURVES[stage]):
            points = [(entry.get("step", i + 1), entry[key]) for i, entry in enumerate(history) if key in entry]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
            ax.set_title(f"{stage}: {key}")
            ax.set_xlabel("update" if stage == "ppo" else "optimiser step")
            ax.grid(alpha=0.3)
    figure.tight_layout()
    return save_figure(figure, path)


def reward_vs_kl(path: Path, results: dict, kls: dict, scores: dict, label: str, against: str = "SFT") -> str:
    """Each policy's mean score against its mean KL, both measured by this stage on the same answers. (PPO's
    training curve is not drawn here: its KL is a one-sample estimate on answers sampled at its temperature,
    another quantity than this exact KL along the greedy answers.)"""
    plt = pyplot()

    figure, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in results:
        mean_kl, mean_score = sum(kls[name]) / len(kls[name]), sum(scores[name]) / len(scores[name])
        ax.scatter([mean_kl], [mean_score], s=60, label=f"{name} (eval)", zorder=3)
    ax.set_xlabel(f"KL to {against} (nats per answer)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(figure, path)


def score_distributions(path: Path, per_prompt: dict) -> str:
    plt = pyplot()

    kinds = [(key, title) for key, title in (("rewards", "reward (normalised)"), ("judged", "judge"))
             if per_prompt[key]]
    figure, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], kinds):
        edges = shared_bins(per_prompt[key].values())
        for name, values in per_prompt[key].items():
            ax.hist(values, bins=edges, alpha=0.45, label=name)
        ax.set_title(f"{title} per prompt")
        ax.legend()
    return save_figure(figure, path)


def shared_bins(series, count: int = 20) -> list[float]:
    """One set of bin edges over every policy's scores: each histogram binned on its own range would draw bars of
    different widths, and a narrow spread would look as tall as a wide one."""
    values = [value for one in series for value in one]
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 0.5, high + 0.5
    return [low + (high - low) * i / count for i in range(count + 1)]


def gold_vs_proxy(path: Path, points: list[dict], proxy: str = "reward model") -> str:
    """PPO's judged eval points: the score it maximised, its `proxy` (left axis), and the judge's (right axis,
    with standard errors) against the KL reached. A proxy still rising while the gold turns down is
    over-optimisation."""
    plt = pyplot()

    kls = [point["kl"] for point in points]
    figure, proxy_axis = plt.subplots(figsize=(6.5, 4.5))
    proxy_axis.plot(kls, [point["eval/score"] for point in points], marker="o", color="tab:blue",
                    label=f"{proxy} (proxy)")
    proxy_axis.set_xlabel("KL to SFT at the eval point (nats per sampled response)")
    proxy_axis.set_ylabel(f"{proxy} score" + (" (normalised)" if proxy == "reward model" else ""),
                          color="tab:blue")
    gold_axis = proxy_axis.twinx()
    gold_axis.errorbar(kls, [point["eval/judge"] for point in points],
                       yerr=[point.get("eval/judge_sem", 0.0) for point in points], marker="s", color="tab:orange",
                       capsize=3, label="judge (gold)")
    gold_axis.set_ylabel("judge score", color="tab:orange")
    for point in points:
        proxy_axis.annotate(f"u{point['update']}", (point["kl"], point["eval/score"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    figure.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    proxy_axis.grid(alpha=0.3)
    return save_figure(figure, path)
