"""`rlhf ppo` on the tiny model with a programmatic reward: the reward rises and the policy is published."""
import json

from pipeline.cli import main as cli

VOWELS = set("aeiouAEIOU")


def vowel_share(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward the tiny model can learn in seconds: the share of letters in the response that are vowels."""
    scores = []
    for response in responses:
        letters = [c for c in response if c.isalpha()]
        scores.append(sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0)
    return scores


def test_ppo_raises_a_programmatic_reward_and_publishes_the_policy(tmp_path, tiny_model_path):
    args = ["ppo", "--config", "configs/tiny.yaml", "--ppo.model", str(tiny_model_path),
            "--ppo.reward_function", "tests.test_ppo_trainer:vowel_share", "--ppo.total_episodes", "320",
            "--ppo.batch_size", "16", "--ppo.num_mini_batches", "2", "--ppo.response_length", "12",
            "--ppo.learning_rate", "1e-2", "--ppo.kl_coef", "0.01", "--ppo.missing_eos_penalty", "None",
            "--run.output_root", str(tmp_path / "runs"), "--run.name", "ppo", "--run.tracking", "none"]
    assert cli(args) == 0
    run = tmp_path / "runs" / "ppo"
    entry = json.loads((run / "manifest.json").read_text())["stages"]["ppo"]
    assert entry["status"] == "done" and (run / "ppo" / "model.safetensors").exists()
    metrics = entry["metrics"]
    assert metrics["last_score"] > metrics["first_score"] + 0.1, metrics
    assert metrics["final_kl"] > 0  # the policy moved away from its reference
