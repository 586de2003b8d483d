"""`rlhf ppo` on the tiny model with a programmatic reward: the reward rises and the policy is published."""
import json
import re

import pytest
import torch

from pipeline.cli import main as cli

VOWELS = set("aeiouAEIOU")


def vowel_share(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward the tiny model can learn in seconds: the share of letters in the response that are vowels."""
    scores = []
    for response in responses:
        letters = [c for c in response if c.isalpha()]
        scores.append(sum(c in VOWELS for c in letters) / len(letters) if letters else 0.0)
    return scores


def test_ppo_raises_a_programmatic_reward_and_publishes_the_policy(tmp_path, tiny_model_path, capsys, caplog):
    # no KL penalty (kl_coef 0): the test is about the loop learning at all; the KL maths have their own tests
    args = ["ppo", "--config", "configs/tiny.yaml", "--ppo.model", str(tiny_model_path),
            "--ppo.reward_function", "tests.test_ppo_trainer:vowel_share", "--ppo.total_episodes", "320",
            "--ppo.batch_size", "16", "--ppo.num_mini_batches", "2", "--ppo.response_length", "12",
            "--ppo.learning_rate", "1e-2", "--ppo.kl_coef", "0", "--ppo.missing_eos_penalty", "None",
            "--ppo.eval_every", "8", "--ppo.distinct_floor", "1", "--ppo.distinct_penalty", "0.01",
            "--run.output_root", str(tmp_path / "runs"), "--run.name", "ppo", "--run.tracking", "none"]
    assert cli(args) == 0
    run = tmp_path / "runs" / "ppo"
    entry = json.loads((run / "manifest.json").read_text())["stages"]["ppo"]
    assert entry["status"] == "done" and (run / "ppo" / "model.safetensors").exists()
    metrics = entry["metrics"]
    assert metrics["end_score"] > metrics["start_score"] + 0.15, metrics
    assert metrics["final_kl"] > 0  # the policy moved away from its reference
    assert metrics["eval_prompts"] == 8  # configs/tiny.yaml: num_eval_prompts 8 of data/eval_prompts.jsonl's 320
    assert {"eval_score_before", "eval_score_after", "eval_judge_after", "eval_response_words_after"} <= set(metrics)
    # eval points before training, every 8 updates and after the last (20): judge and reward model against KL
    evals = json.loads((run / "ppo" / "evals.json").read_text())
    assert [point["update"] for point in evals] == [0, 8, 16, 20]
    assert evals[0]["kl"] == 0 and evals[-1]["eval/score"] == metrics["eval_score_after"]
    assert all({"eval/score", "eval/judge", "eval/judge_sem"} <= set(point) for point in evals)
    history = json.loads((run / "ppo" / "history.json").read_text())  # each update's metrics, as dashboards get them
    assert len(history) == 20 and all(0 < update["val/distinct_4grams"] <= 1 for update in history)
    # at a floor of 1 every repeated 4-gram costs: 0.01 x the share of 4-grams repeated, taken off the scores
    for update in history:
        repeated = 1 - update["val/distinct_4grams"]
        assert update["objective/distinct_penalty"] == pytest.approx(0.01 * repeated, abs=1e-7)
        assert update["objective/scores"] == pytest.approx(update["objective/raw_scores"]
                                                           - update["objective/distinct_penalty"], abs=1e-6)
    assert max(update["objective/distinct_penalty"] for update in history) > 0
    # 12 tokens are too few for the tiny model's stop token: the alert prints once, its repeats are counted
    printed = capsys.readouterr().out
    assert printed.count("emit the stop token") == 1, printed[-3000:]
    counts = re.search(r"health alerts: .*stop token in (\d+) of 20 updates", printed)
    assert counts and int(counts[1]) > 1 and metrics["alerts"] >= int(counts[1]), printed[-3000:]
    assert printed.count("[ppo] checkpoint saved: ") == 9  # one line each (configs/tiny.yaml: save_steps 2)
    # the tied LM head is saved once, as accelerate says in a warning at every checkpoint: not said
    assert not [record for record in caplog.records if "Removed shared tensor" in record.getMessage()]


def test_ppo_scores_with_a_reward_model_normalised_by_its_scale(tmp_path, tiny_model_path):
    from transformers import AutoModelForSequenceClassification

    from ppo.config import PPOStageConfig
    from ppo.trainer import Scorer
    from rlhf.reward_model import load_reward_model, reward_tokenizer, score
    from rlhf.runs import atomic_write_json

    reward_dir = tmp_path / "reward"  # an (untrained) 2-head ensemble, as the reward stage publishes one
    tokenizer = reward_tokenizer(str(tiny_model_path))
    AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=2).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    atomic_write_json(reward_dir / "stage.json", {"reward": {"heads": 2, "scale": {"mean": 0.5, "std": 2.0}}})
    prompts, responses = [[{"role": "user", "content": "Hi?"}]] * 2, ["Hello there.", "No."]
    raw = score(load_reward_model(str(reward_dir), tokenizer), tokenizer,
                [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)])
    scores = Scorer(PPOStageConfig(precision="fp32"), str(reward_dir))(prompts, responses)
    assert max(abs(a - (b - 0.5) / 2.0) for a, b in zip(scores.tolist(), raw)) < 1e-6
    # the critic starts as the reward model on that same scale: its value at a conversation's last token is the
    # normalised score (on the raw scale, returns minus values would run against the reward)
    from ppo.trainer import build_models

    critic = build_models(PPOStageConfig(), {"policy": str(tiny_model_path), "reward_model": str(reward_dir)})[3]
    text = tokenizer.apply_chat_template(prompts[0] + [{"role": "assistant", "content": responses[0]}],
                                         tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([ids, ids[:, -1:]], 1)  # one token more: its state is the conversation read to its last token
    with torch.no_grad():
        value = critic(input_ids=ids, attention_mask=torch.ones_like(ids),
                       position_ids=torch.arange(ids.shape[1])[None], response_start=ids.shape[1] - 1)[0, 0]
    assert value.item() == pytest.approx(scores[0].item(), abs=1e-4)
    assert cli(["ppo", "--config", "configs/tiny.yaml", "--ppo.model", str(tiny_model_path), "--ppo.reward_model",
                str(reward_dir), "--ppo.total_episodes", "8", "--ppo.batch_size", "4", "--ppo.response_length", "6",
                "--run.output_root", str(tmp_path / "runs"), "--run.tracking", "none"]) == 0
    assert (tmp_path / "runs" / "tiny" / "ppo" / "config.json").exists()


def test_in_half_precision_the_first_rollout_has_no_kl_to_its_identical_reference(tmp_path, tiny_model_path):
    """Generation's cached bf16 logits round differently from a full forward's; the old log-probs are recomputed
    by a full forward, so before any update the policy and its copy, the reference, agree exactly."""
    from ppo.config import PPOStageConfig
    from ppo.trainer import main as train_ppo
    from rlhf.config import RunConfig

    config = PPOStageConfig(model=str(tiny_model_path), reward_function="builtin:length", total_episodes=16,
                            batch_size=8, response_length=32, precision="bf16", num_eval_prompts=2, sample_every=0,
                            seed=0)
    result = train_ppo(config, RunConfig(name="bf16", output_root=str(tmp_path / "runs"), tracking="none"))
    first, second = result["history"]
    assert first["objective/kl"] == 0
    assert second["objective/kl"] != 0  # the policy has moved since
    assert (first["episode"], second["episode"]) == (8, 16)  # TRL's names: `episode` counts, `eps` is a rate
    assert second["eps"] == pytest.approx(8 / (second["timing/generate"] + second["timing/update"]))
