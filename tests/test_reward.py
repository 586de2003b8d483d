"""The reward stage on the tiny model: it learns separable pairs, handles pad == EOS, refuses unusable data."""
import json

import pytest

from pipeline.cli import main as cli
from reward.config import RewardStageConfig
from reward.train import main as train_reward, reward_tokenizer, training_pairs
from rlhf.config import RunConfig
from rlhf.errors import DataError


def write_pairs(path, count: int, **extra) -> str:
    """Pairs a model can separate by content: the chosen answer is polite, the rejected one rude."""
    with open(path, "w") as out:
        for i in range(count):
            row = {"id": f"pair-{i}", "prompt": f"Question number {i}: can you help?",
                   "chosen": f"Yes, happy to help with question {i}. Thank you for asking!",
                   "rejected": f"No. Go away, {i} is a stupid question.", "margin": 1.0 if i % 2 else 0.5}
            out.write(json.dumps({**row, **extra}) + "\n")
    return str(path)


def test_a_reward_model_learns_separable_pairs_and_is_published(tmp_path, tiny_model_path):
    config = RewardStageConfig(model=str(tiny_model_path), preferences=write_pairs(tmp_path / "pairs.jsonl", 48),
                               eval_fraction=0.25, max_steps=30, learning_rate=2e-3, per_device_train_batch_size=8,
                               logging_steps=10, save_steps=100, seed=0, max_length=64)
    run = RunConfig(name="rm", output_root=str(tmp_path / "runs"), tracking="none")
    metrics = train_reward(config, run)
    assert metrics["eval_accuracy"] >= 0.9 and metrics["train_loss"] < 0.6
    assert metrics["eval_margin"] > metrics["eval_margin_before"] + 1.0  # chosen pulled clearly above rejected
    published = tmp_path / "runs" / "rm" / "reward"
    record = json.loads((published / "stage.json").read_text())
    assert record["metrics"]["eval_accuracy"] == metrics["eval_accuracy"]
    from reward.train import load_reward_model, pair_metrics

    tokenizer = reward_tokenizer(str(published))
    model = load_reward_model(str(published), tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert pair_metrics(model, tokenizer, training_pairs(config.preferences, config))["accuracy"] >= 0.9


def test_padding_with_eos_is_replaced_by_a_spare_special_token(tiny_model_path):
    tokenizer = reward_tokenizer(str(tiny_model_path))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_only_ties_and_both_bad_rows_stop_with_exit_2(tmp_path, tiny_model_path, capsys):
    path = tmp_path / "ties.jsonl"
    write_pairs(path, 3, tie=True)
    with pytest.raises(DataError, match="no usable pairs: all 3 rows are ties or both bad"):
        training_pairs(str(path), RewardStageConfig())
    code = cli(["reward", "--reward.model", str(tiny_model_path), "--reward.preferences", str(path),
                "--run.output_root", str(tmp_path / "runs"), "--run.tracking", "none"])
    assert code == 2 and "no usable pairs" in capsys.readouterr().err
