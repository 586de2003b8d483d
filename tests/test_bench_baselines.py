"""The plain TRL trainers the throughput benchmarks compare against (bench/trl_baselines.py) run from the repository
alone, on the tiny model, and report their step time as the benchmarks read it."""
import json
import subprocess
import sys

from tests.conftest import REPO


def baseline(*args: str) -> dict:
    result = subprocess.run([sys.executable, "bench/trl_baselines.py", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_trl_sft_reward_and_rloo_baselines_train_and_time_their_steps(tmp_path, tiny_model_path):
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
