"""bench/online_rounds.py on fixed numbers: the two arms' configs share everything but how the labels and PPO
episodes are spread over rounds (with equal totals), a gain is a win rate less a half averaged over PPO and DPO,
and the ratio is the median over judges of the rounds' gain over the single round's."""
import json

import pytest
import yaml

from bench.online_rounds import arm_configs, arm_result, gain, judge_ratio, ratio, summary
from tests.conftest import REPO


def test_the_arms_spread_an_equal_label_budget_and_equal_ppo_episodes_over_one_and_three_rounds():
    base = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    arms = arm_configs(base, "/shared/sft", prompts=32, episodes=48, eval_prompts=100)
    single, rounds = arms["single"], arms["rounds"]
    assert "sft" not in single and "sft" not in rounds
    for arm in (single, rounds):
        assert {arm[stage].get("model") for stage in ("preferences", "reward", "ppo", "dpo")} == {"/shared/sft"}
        assert arm["eval"]["baseline"] == "/shared/sft" and arm["run"]["tracking"] == "none"
        assert arm["reward"] == {**base["reward"], "model": "/shared/sft"}  # the same reward recipe
    assert single["run"].get("rounds", 1) == 1 and rounds["run"]["rounds"] == 3
    single_labels = single["preferences"]["num_prompts"] * 6
    round_labels = [rounds["preferences"]["num_prompts"] * 6] + [rounds["preferences"]["round_budget"]] * 2
    assert single_labels == 192 and round_labels == [66, 64, 64]  # 194 against 192: equal up to a prompt's pairs
    assert single["ppo"]["total_episodes"] == 3 * rounds["ppo"]["total_episodes"] == 48
    assert single["eval"]["num_prompts"] == rounds["round-3"]["eval"]["num_prompts"] == 100
    assert rounds["eval"]["num_prompts"] == 16  # rounds 1 and 2 are evaluated on fewer prompts


def arms(single_rates: tuple, rounds_rates: tuple) -> dict:
    def arm(rates):
        policies = {name: {"win_rate_judge": rate, "win_rate_judge_low": rate - 0.1, "win_rate_judge_high": rate + 0.1}
                    for name, rate in zip(("ppo", "dpo"), rates)}
        return {"labels": [192], "prompts": 100, "policies": policies, "seconds": 600.0}

    return {"single": arm(single_rates), "rounds": arm(rounds_rates)}


def test_gain_ratio_and_median_over_judges():
    length = arms((0.60, 0.70), (0.70, 0.80))  # gains 0.15 and 0.25
    assert gain(length["single"]) == pytest.approx(0.15) and judge_ratio(**length) == pytest.approx(5 / 3)
    keywords = arms((0.55, 0.55), (0.56, 0.54))  # 0.05 and 0.05: ratio 1
    flat = arms((0.50, 0.45), (0.60, 0.60))  # the single round gained nothing: no ratio
    assert judge_ratio(**flat) is None
    assert ratio({"a": length, "b": keywords, "c": flat}) == pytest.approx((5 / 3 + 1) / 2)
    assert ratio({"c": flat}) is None
    text = summary({"builtin:length": length, "builtin:flat": flat})
    assert "judge builtin:length: final eval on 100 prompts (three rounds: 100)" in text
    assert "1 round : 192 labels (192), win rate vs SFT ppo 0.600 [0.500, 0.700], dpo 0.700" in text
    assert "gain ratio: n/a (the single round gained nothing)" in text
    assert text.splitlines()[-1] == "ratio: 1.667"


def test_arm_result_reads_every_rounds_labels_and_the_last_rounds_eval(tmp_path):
    stages = {"preferences": {"metrics": {"pairs": 66}}, "round-2/preferences": {"metrics": {"pairs": 64}},
              "round-3/preferences": {"metrics": {"pairs": 63}}, "eval": {"timings": {"total_s": 10.0}},
              "round-3/eval": {"timings": {"total_s": 30.0}}, "round-2/eval": {"timings": {"total_s": 12.0}}}
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": stages}))
    for folder, prompts in (("eval", 16), ("round-2/eval", 16), ("round-3/eval", 100)):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "results.json").write_text(json.dumps({"prompts": prompts, "policies": {}}))
    result = arm_result(tmp_path)
    assert result == {"labels": [66, 64, 63], "prompts": 100, "policies": {}, "seconds": 52.0}
