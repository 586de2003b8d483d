"""The plain TRL trainers the throughput benchmarks compare against (bench/trl_baselines.py) run from the repository
alone, on the tiny model, and report their step time as the benchmarks read it."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def baseline(*args: str) -> dict:
    result = subprocess.run([sys.executable, "bench/trl_baselines.py", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_trl_sft_reward_rloo_and_grpo_baselines_train_and_time_their_steps(tmp_path, tiny_model_path):
    from transformers import AutoModelForSequenceClassification

    from rlhf.reward_model import reward_tokenizer

    model = str(tiny_model_path)
    sft = baseline("sft", "--model", model, "--steps", "3", "--batch", "2", "--seq", "64")
    assert sft["median_step_s"] > 0 and sft["tokens_per_s"] == 2 * 64 / sft["median_step_s"]
    assert baseline("reward", "--model", model, "--steps", "3", "--batch", "2", "--seq", "1024")["median_step_s"] > 0
    tokenizer = reward_tokenizer(model)
    reward = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(tmp_path / "reward")
    tokenizer.save_pretrained(tmp_path / "reward")
    rloo = baseline("rloo", "--model", model, "--reward_model", str(tmp_path / "reward"), "--steps", "3", "--batch",
                    "4", "--completion_length", "8")
    assert rloo["median_step_s"] > 0
    grpo = baseline("grpo", "--model", model, "--reward_model", str(tmp_path / "reward"), "--steps", "3", "--batch",
                    "4", "--generations", "2", "--completion_length", "8", "--beta", "0.04")
    assert grpo["median_step_s"] > 0


def test_grpo_against_trl_runs_both_sides_and_prints_the_ratio(tiny_model_path):
    result = subprocess.run([sys.executable, "bench/grpo_vs_trl.py", "--model", str(tiny_model_path), "--rounds", "1",
                             "--steps", "3", "--batch", "4", "--generations", "2", "--completion-length", "8"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("round 1: ours ") and "trl grpo" in lines[0]
    values = dict(line.split(": ") for line in lines[1:])
    assert float(values["ratio"]) > 0 and lines[-1].startswith("ratio: ")
    assert float(values["ours_episodes_per_s"]) / float(values["trl_grpo_episodes_per_s"]) == pytest.approx(
        float(values["ratio"]), rel=0.01)
