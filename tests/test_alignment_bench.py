"""bench/alignment.py's summary maths on fixed numbers: the ratio is the smallest lower bound of the PPO and DPO
judge win-rate intervals over every judge, over 0.5, and the held-out judge is reported apart."""
import pytest

from bench.alignment import chain_result, ratio, smallest_lower_bound, summary


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


def test_chain_result_reads_a_finished_runs_manifest_and_eval(tmp_path):
    import json

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
