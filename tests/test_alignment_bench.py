"""bench/alignment.py: its summary maths on fixed numbers (the ratio is the smallest lower bound of the compared
policies' judge win-rate intervals over every judge, over 0.5, and the held-out judge is reported apart), the
methods it accepts, and real tiny runs of the chain with a critic-free method beside it and of the verifiable
task."""
import json
from pathlib import Path

import pytest

from bench.alignment import chain_result, main, parse_args, ratio, smallest_lower_bound, summary, verifiable_summary


def judge_result(ppo_low: float, dpo_low: float) -> dict:
    def policy(judge: float, low: float) -> dict:
        return {"judge": judge, "win_rate_judge": low + 0.1, "win_rate_judge_low": low,
                "win_rate_judge_high": low + 0.2, "kl": 1.5}

    return {"reward": {"heldout_accuracy": 0.8, "heldout_pairs": 120, "human_ceiling": 0.83, "ceiling_units": 300,
                       "model_on_ceiling_units": 0.79},
            "prompts": 200,
            "policies": {"sft": {"judge": 0.4}, "ppo": policy(0.6, ppo_low), "dpo": policy(0.5, dpo_low)},
            "stage_seconds": {"sft": 90.0, "reward": None}, "wall_s": 800.0, "output_root": "/tmp/x"}


def test_ratio_is_the_weakest_lower_bound_over_policies_and_judges_over_a_half():
    results = {"builtin:length": judge_result(0.70, 0.62), "builtin:sentiment": judge_result(0.58, 0.66)}
    assert smallest_lower_bound(results) == 0.58
    assert ratio(results) == pytest.approx(1.16)
    assert ratio({"builtin:length": judge_result(0.70, 0.45)}) == pytest.approx(0.9)  # DPO not confidently better


def test_summary_reports_the_held_out_judge_apart_and_ends_with_the_ratio():
    text = summary({"builtin:sentiment": judge_result(0.58, 0.66), "builtin:length": judge_result(0.70, 0.62)},
                   "builtin:sentiment")
    lines = text.splitlines()
    held_out = lines.index("== held-out judge (nothing tuned on it) ==")
    assert lines[held_out + 1].startswith("judge builtin:sentiment")
    assert lines[1].startswith("judge builtin:length") and lines[-1] == "ratio: 1.160"
    assert "reward model held-out accuracy 0.800 on 120 pairs; labellers' ceiling 0.830 on 300 votes" in text
    assert "ppo: win rate vs SFT 0.680 [0.580, 0.780], KL to SFT 1.50" in text
    assert "judge mean: sft 0.400, ppo 0.600, dpo 0.500" in text and "stage seconds: sft 90, reward -" in text
    assert "distinct 4-grams" not in text  # results from before the column
    repeating = judge_result(0.58, 0.66)
    for name, share in (("sft", 0.88), ("ppo", 0.76), ("dpo", 0.92)):
        repeating["policies"][name]["distinct_4grams"] = share
    assert "  distinct 4-grams (repetition: lower repeats more): sft 0.880, ppo 0.760, dpo 0.920" in \
        summary({"builtin:sentiment": repeating}, "builtin:sentiment")


def test_critic_free_policies_count_in_the_ratio_and_get_their_own_lines():
    result = judge_result(0.70, 0.62)
    result["policies"]["grpo"] = {"judge": 0.55, "win_rate_judge": 0.6, "win_rate_judge_low": 0.52,
                                  "win_rate_judge_high": 0.68, "kl": 0.9}
    assert ratio({"builtin:length": result}) == pytest.approx(1.04)
    text = summary({"builtin:length": result}, "builtin:sentiment")
    assert "grpo: win rate vs SFT 0.600 [0.520, 0.680], KL to SFT 0.90" in text
    assert "judge mean: sft 0.400, ppo 0.600, dpo 0.500, grpo 0.550" in text


def test_methods_default_per_task_and_unknown_ones_are_refused(capsys):
    assert parse_args([]).methods == ["ppo", "dpo"] and parse_args([]).config == "configs/default.yaml"
    verifiable = parse_args(["--verifiable"])
    assert verifiable.methods == ["ppo", "grpo", "rloo", "reinforce_pp"]
    assert verifiable.config == "configs/arithmetic.yaml"
    assert parse_args(["--methods", "dpo,rloo"]).methods == ["dpo", "rloo"]
    with pytest.raises(SystemExit) as refused:
        parse_args(["--verifiable", "--methods", "grpo,dpo"])
    assert refused.value.code == 2 and "'dpo'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--methods", "ppo,reinforce"])
    assert "'reinforce' is not one of ppo, dpo, grpo, rloo, reinforce_pp" in capsys.readouterr().err


def test_a_mistyped_judge_is_refused_before_any_chain_starts(tmp_path, capsys):
    assert parse_args(["--judges", "builtin:length,rlhf.judges:keywords"]).judges
    with pytest.raises(SystemExit) as refused:
        main(["--root", str(tmp_path / "runs"), "--judges", "builtin:length,sentiment"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "--judges: judge 'sentiment'" in err and "builtin:NAME" in err
    assert not (tmp_path / "runs").exists()


def test_frontier_settings_and_online_rounds_are_checked_before_any_chain_starts(capsys):
    """A frontier value that names no run, or one given twice, used to fail after every chain had run."""
    assert parse_args(["--kl-coefs", "0.02, 0.05"]).kl_coefs == ["0.02", "0.05"]
    assert parse_args(["--verifiable", "--set", "ppo.model=tiny"]).set == ["ppo.model=tiny"]  # its own runs' model
    for argv, message in ((["--kl-coefs", "0.02,strong"], "--kl-coefs: 'strong' is not a number"),
                          (["--betas", "0.1,0.1"], "--betas: a value is given twice"),
                          (["--set", "run.rounds=3"], "--set run.rounds: the summary reads round 1's"),
                          # the chain took it, the critic-free methods' comparison did not: measured apart
                          (["--set", "eval.num_prompts=50"], "--set eval.num_prompts: the benchmark sets it itself"),
                          (["--set", "eval.judge=builtin:length"], "(--judges)"),
                          (["--verifiable", "--set", "run.name=x"], "--set run.name: the benchmark sets it itself")):
        with pytest.raises(SystemExit) as refused:
            parse_args(argv)
        assert refused.value.code == 2 and message in capsys.readouterr().err, argv


def test_verifiable_summary_gives_accuracy_before_and_after_each_method():
    def policy(accuracy: float, low: float) -> dict:
        return {"accuracy": accuracy, "win_rate_judge": low + 0.05, "win_rate_judge_low": low,
                "win_rate_judge_high": low + 0.1, "kl": 3.25}

    result = {"prompts": 80, "policies": {"sft": {"accuracy": 0.175}, "grpo": policy(0.35, 0.55),
                                          "rloo": policy(0.3, 0.51)},
              "train_seconds": {"grpo": 250.0, "rloo": 240.4}}
    lines = verifiable_summary(result, "configs/arithmetic.yaml").splitlines()
    assert lines[0].endswith("80 held-out problems, greedy; accuracy before training 0.175")
    assert lines[1] == ("  grpo: accuracy 0.175 -> 0.350, win rate vs untrained 0.600 [0.550, 0.650], KL 3.25, "
                        "trained in 250 s")
    assert lines[-1] == "ratio: 1.020"


TINY_ARITHMETIC = ["--set", "ppo.model=tiny-llama", "--set", "ppo.reward_function=builtin:final_number",
                   "--set", "ppo.judge=builtin:final_number", "--set", "ppo.prompts=data/arithmetic_train.jsonl",
                   "--set", "ppo.eval_prompts=data/arithmetic_eval.jsonl", "--set", "eval.baseline=tiny-llama",
                   "--set", "eval.reward_model=none", "--set", "eval.judge=builtin:final_number",
                   "--set", "eval.prompts=data/arithmetic_eval.jsonl"]


def test_a_tiny_verifiable_run_trains_each_method_and_compares_them_on_the_held_out_problems(tmp_path, capsys):
    assert main(["--verifiable", "--config", "configs/tiny.yaml", "--methods", "grpo,reinforce_pp",
                 "--root", str(tmp_path), *TINY_ARITHMETIC]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert list(result["policies"]) == ["sft", "grpo", "reinforce_pp"]
    assert all("accuracy" in policy for policy in result["policies"].values())
    for method in ("grpo", "reinforce_pp"):
        manifest = json.loads((tmp_path / method / "manifest.json").read_text())
        assert manifest["stages"]["ppo"]["config"]["algorithm"] == method
    assert capsys.readouterr().out.splitlines()[-1].startswith("ratio: ")


def test_chain_result_reads_a_finished_runs_manifest_and_eval(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {
        "reward": {"metrics": {"heldout_accuracy": 0.75, "heldout_pairs": 40, "human_ceiling": 0.8,
                               "ceiling_units": 90, "model_on_ceiling_units": 0.7}, "timings": {"total_s": 84.0}},
        "eval": {"metrics": {}, "timings": {"total_s": 120.0}}, "dpo": {"metrics": {}, "timings": {"total_s": 9.0}}}}))
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"prompts": 200, "policies": {"sft": {"judge": 0.1}}}))
    result = chain_result(tmp_path)
    assert result["reward"]["heldout_pairs"] == 40 and result["prompts"] == 200
    assert list(result["stage_seconds"].items()) == [("reward", 84.0), ("dpo", 9.0), ("eval", 120.0)]  # chain order


def test_frontier_draws_each_family_in_order_of_kl_and_writes_the_plot(tmp_path):
    from bench.alignment import frontier_plot, frontier_points

    results = {"sft": {"judge": 0.30, "kl": 0.0},
               "ppo-kl0.2": {"judge": 0.35, "kl": 0.4}, "ppo-kl0.02": {"judge": 0.50, "kl": 3.1},
               "ppo-kl0.05": {"judge": 0.45, "kl": 1.2}, "dpo-beta0.1": {"judge": 0.41, "kl": 2.0},
               "dpo-beta0.3": {"judge": 0.36, "kl": 0.9}}
    assert frontier_points(results, "ppo") == [(0.4, 0.35, "kl0.2"), (1.2, 0.45, "kl0.05"), (3.1, 0.50, "kl0.02")]
    assert frontier_points(results, "dpo") == [(0.9, 0.36, "beta0.3"), (2.0, 0.41, "beta0.1")]
    path = frontier_plot(tmp_path / "frontier.png", results, "builtin:length")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_tiny_chain_with_grpo_beside_it_compares_all_its_policies_as_the_chain_did(tmp_path, capsys):
    assert main(["--config", "configs/tiny.yaml", "--judges", "builtin:length", "--methods", "ppo,dpo,grpo",
                 "--root", str(tmp_path), "--eval-prompts", "8"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())["builtin:length"]
    assert list(result["policies"]) == ["sft", "ppo", "dpo", "grpo"]
    assert result["prompts"] == 8 and result["stage_seconds"]["grpo"] > 0
    # GRPO's eval repeats the chain's (same prompts, greedy): the SFT answers' numbers come out the same
    compared = json.loads((Path(result["output_root"]) / "compare" / "eval" / "results.json").read_text())
    assert compared["policies"]["sft"] == result["policies"]["sft"]
    output = capsys.readouterr().out
    assert "  grpo: win rate vs SFT" in output and output.splitlines()[-1].startswith("ratio: ")
