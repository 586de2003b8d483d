"""K-wise ranking feedback through the stages on the tiny model: `preferences.feedback: ranking` samples one
ranking item per prompt, simulated labellers rank them through the queue, the export expands them to weighted
pairs and the reward stage trains on those."""
import json

from pipeline.cli import main as cli
from rlhf.datasets import load_rows


def test_ranking_feedback_from_sampling_to_a_trained_reward_model(tmp_path):
    common = ["--config", "configs/tiny.yaml", f"--run.output_root={tmp_path}"]
    assert cli(["preferences", *common, "--preferences.model=tiny-llama", "--preferences.feedback=ranking",
                "--preferences.responses_per_prompt=3", "--preferences.num_prompts=12"]) == 0
    run = tmp_path / "tiny"
    metrics = json.loads((run / "manifest.json").read_text())["stages"]["preferences"]["metrics"]
    assert metrics["rankings"] == 24 and metrics["votes"] == 0  # 12 items, 2 labellers each
    rows = load_rows(run / "preferences", "preference")
    assert rows and all(row["id"].startswith("rank-") for row in rows)
    # each item's pairs together weigh one observation
    by_item = {}
    for row in rows:
        by_item[row["ranking"]] = by_item.get(row["ranking"], 0.0) + row["pair_weight"]
    assert all(abs(total - 1.0) < 1e-9 for total in by_item.values()) and len(by_item) <= 12
    assert cli(["reward", *common, "--reward.model=tiny-llama"]) == 0
    reward = json.loads((run / "manifest.json").read_text())["stages"]["reward"]["metrics"]
    assert reward["train_pairs"] > 0 and reward["heldout_accuracy"] is not None
    # the same rankings as Plackett-Luce terms, one per item
    assert cli(["reward", *common, "--run.name=plackett-luce", f"--reward.preferences={run / 'preferences'}",
                "--reward.model=tiny-llama", "--reward.ranking_loss=plackett_luce", "--reward.ties=equal"]) == 0
    fitted = json.loads((tmp_path / "plackett-luce" / "manifest.json").read_text())["stages"]["reward"]
    assert fitted["config"]["ranking_loss"] == "plackett_luce" and fitted["metrics"]["train_loss"] > 0


def test_ranking_feedback_over_online_rounds_is_refused_before_anything_is_written(tmp_path, capsys):
    common = ["--config", "configs/tiny.yaml", f"--run.output_root={tmp_path}", "--preferences.model=tiny-llama",
              "--preferences.feedback=ranking"]
    assert cli(["preferences", *common, "--run.rounds=2"]) == 2
    assert "runs one round (run.rounds is 2)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
