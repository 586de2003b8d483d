"""The reward head fitted alone on frozen features before fine-tuning (reward/probe.py): standardised and folded
back, one fit per ensemble head on its own weights, written into the model so its scores rank as the probe did."""
import pytest
import torch

from reward.config import RewardStageConfig
from reward.data import split_pairs, training_pairs
from reward.probe import fit_head, probe
from reward.train import main as train_reward, pair_metrics
from rlhf.config import RunConfig
from rlhf.reward_model import load_reward_model, reward_tokenizer
from tests.test_reward import write_pairs


def synthetic(count: int, seed: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """Answer features whose first dimension is large noise and second a tiny signal: the chosen answer (even
    rows) is higher on the second."""
    generator = torch.Generator().manual_seed(seed)
    noise = 1000 * torch.randn(2 * count, generator=generator)
    signal = 1e-3 * (torch.arange(2 * count) % 2 == 0).float() + 1e-4 * torch.randn(2 * count, generator=generator)
    return torch.stack([noise, signal], 1), list(range(0, 2 * count, 2)), list(range(1, 2 * count, 2))


def pairs_with(weights: list[list[float]]) -> list[dict]:
    return [{"tie": False, "margin": 0.0, "weight": w} for w in weights]


def test_the_probe_finds_a_tiny_signal_beside_large_noise_and_folds_back_to_raw_features():
    features, chosen, rejected = synthetic(40, seed=0)
    head, loss = fit_head(features, chosen, rejected, pairs_with([[1.0]] * 40), heads=1, steps=300, l2=0.0,
                          tie_threshold=0.0)
    assert head.shape == (1, 2) and loss < 0.1
    test, test_chosen, test_rejected = synthetic(40, seed=1)  # fresh answers, read with the folded head
    rewards = (test @ head.T)[:, 0]
    assert (rewards[test_chosen] > rewards[test_rejected]).all()


def test_each_ensemble_head_is_fitted_on_its_own_bootstrap_weights():
    features, chosen, rejected = synthetic(40, seed=0)
    # odd pairs say the signal is good, even pairs (sides swapped) that it is bad; head 0 sees only the odd ones
    winners = [c if i % 2 else r for i, (c, r) in enumerate(zip(chosen, rejected))]
    losers = [r if i % 2 else c for i, (c, r) in enumerate(zip(chosen, rejected))]
    weights = [[1.0, 0.0] if i % 2 else [0.0, 1.0] for i in range(40)]
    head, _ = fit_head(features, winners, losers, pairs_with(weights), heads=2, steps=300, l2=0.0, tie_threshold=0.0)
    assert head[0, 1] > 0 > head[1, 1]


def test_the_probe_writes_the_head_that_ranks_held_out_pairs_and_the_stage_records_it(tmp_path, tiny_model_path):
    config = RewardStageConfig(model=str(tiny_model_path), preferences=write_pairs(tmp_path / "pairs.jsonl", 32),
                               eval_fraction=0.25, max_steps=2, learning_rate=1e-4, per_device_train_batch_size=8,
                               save_steps=100, seed=0, max_length=64, pooling="answer_mean", probe_steps=200,
                               precision="fp32")
    train, held_out = split_pairs(training_pairs(config.preferences, config), config)
    tokenizer = reward_tokenizer(str(tiny_model_path))
    model = load_reward_model(str(tiny_model_path), tokenizer, pooling="answer_mean")
    torch.nn.init.zeros_(model.score.weight)  # a head that ranks nothing: every answer scores 0
    assert pair_metrics(model, tokenizer, held_out)["accuracy"] == 0.0
    probed = probe(model, tokenizer, train, held_out, config)
    assert probed["probe_train_accuracy"] == 1.0 and probed["probe_eval_accuracy"] == 1.0
    assert probed["before"] == {"accuracy": 0.0, "margin": 0.0}  # the zero head, read off the features
    scored = pair_metrics(model, tokenizer, held_out)
    assert scored["accuracy"] == 1.0  # the model now scores with the probe
    again = probe(model, tokenizer, train, held_out, config)  # `before` is now the first probe's head
    assert again["before"]["accuracy"] == 1.0
    assert again["before"]["margin"] == pytest.approx(scored["margin"], rel=1e-3)

    metrics = train_reward(config, RunConfig(name="rm", output_root=str(tmp_path / "runs"), tracking="none"))
    assert metrics["probe_eval_accuracy"] == 1.0 and metrics["heldout_accuracy"] == 1.0
