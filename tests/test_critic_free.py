"""GRPO, RLOO and REINFORCE++ in `rlhf ppo` on the tiny model: each raises a programmatic reward without a critic.
(Their advantages by hand: tests/test_ppo_core.py; GRPO's resume and two processes: tests/test_ppo_runs.py.)"""
import json
import math
import statistics

import pytest

from pipeline.cli import main as cli


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp"])
def test_a_critic_free_method_raises_a_programmatic_reward(tmp_path, tiny_model_path, algorithm, capsys):
    args = ["ppo", "--config", "configs/tiny.yaml", "--ppo.model", str(tiny_model_path),
            "--ppo.reward_function", "tests.test_ppo_trainer:vowel_share", f"--ppo.algorithm={algorithm}",
            "--ppo.num_generations=4", "--ppo.total_episodes=640", "--ppo.batch_size=16",
            "--ppo.num_mini_batches=2", "--ppo.response_length=12", "--ppo.learning_rate=1e-2", "--ppo.kl_coef=0.01",
            "--ppo.missing_eos_penalty=None", "--run.output_root", str(tmp_path / "runs"), "--run.name", algorithm,
            "--run.tracking", "none"]
    assert cli(args) == 0
    assert f"[ppo] {algorithm}: 40 updates of 16 episodes (4 per prompt)" in capsys.readouterr().out
    run = tmp_path / "runs" / algorithm
    metrics = json.loads((run / "manifest.json").read_text())["stages"]["ppo"]["metrics"]
    assert (run / "ppo" / "model.safetensors").exists() and not (run / "ppo" / "critic").exists()
    history = json.loads((run / "ppo" / "history.json").read_text())
    # the mean vowel share over the first 5 updates (80 episodes) against the last 20 (320): at this learning rate
    # a method may rise and fall back part-way, and the stage's end score (its last two updates) caught such a dip
    # (reinforce_pp at seed 0 on one Xeon: 0.38 -> 0.55 by update 19, 0.46 at the end; on another, 0.14 higher
    # at the end). Its rise on that Xeon by this measure: 0.12
    scores = [entry["objective/raw_scores"] for entry in history]
    start, end = statistics.fmean(scores[:5]), statistics.fmean(scores[-20:])
    assert end > start + 0.08, (start, end, metrics)
    assert "loss/value_avg" not in history[0] and all(math.isfinite(m["loss/policy_avg"]) for m in history)
    # GRPO carries the KL in its loss, the others in the reward
    assert ("loss/kl_avg" in history[0]) == (algorithm == "grpo")
