"""The DPO stage on the tiny model: our pair loss is TRL's sigmoid loss when there is nothing more to say, margins
and ties reach it, it learns separable pairs, samples and orders on-policy pairs, resumes after a kill, and names
the command that makes a missing input."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from trl import DPOTrainer

from pipeline.cli import main as cli
from ppo.dpo import PairCollator, PairDPOTrainer
from ppo.dpo_config import DPOStageConfig
from reward.config import RewardStageConfig
from reward.train import tokens_per_step as reward_tokens_per_step
from rlhf.batching import longest_sequence, sequences_per_step
from rlhf.models import load_causal_lm
from rlhf.reward_model import reward_tokenizer
from tests.conftest import REPO, kill_when_saved
from tests.test_reward import write_pairs


def tiny_trainer(tmp_path, tiny_model_path, pairs: list[dict], **overrides) -> PairDPOTrainer:
    import datasets

    config = DPOStageConfig(**{"output_dir": str(tmp_path / "out"), "report_to": "none",
                               "per_device_train_batch_size": 4, "max_length": 64, "seed": 0, **overrides})
    model, tokenizer = load_causal_lm(str(tiny_model_path))
    collator = PairCollator(pad_token_id=tokenizer.pad_token_id, max_length=64)
    trainer = PairDPOTrainer(model=model, args=config, data_collator=collator, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(pairs))
    trainer.model.train()
    return trainer


def conversational_pairs(count: int, margin: float = 0.0, tie: bool = False) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Yes, gladly: answer {i}."}],
             "rejected": [{"role": "assistant", "content": f"No {i}."}],
             "margin": margin, "tie": tie, "weight": 1.0} for i in range(count)]


def first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def moved(trainer) -> PairDPOTrainer:
    """The policy moved away from its frozen reference, the same way every time, so log-ratios are not all 0."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return trainer


def test_without_ties_margins_or_weights_the_pair_loss_is_trls_sigmoid_loss(tmp_path, tiny_model_path):
    trainer = moved(tiny_trainer(tmp_path, tiny_model_path, conversational_pairs(4), beta=0.5))
    batch = first_batch(trainer)
    ours = trainer.compute_loss(trainer.model, dict(batch))
    trls = DPOTrainer._compute_loss(trainer, trainer.model, {k: v for k, v in batch.items()
                                                             if k not in ("margin", "tie", "weight")}, False)
    assert abs(ours.item() - 0.6931) > 0.01  # not the untrained log 2
    assert ours.item() == pytest.approx(trls.item(), rel=1e-5)
    margins = trainer._metrics["train"]["rewards/margins"]
    assert margins[0] == pytest.approx(margins[-1], rel=1e-5)  # both paths logged the same implicit-reward gap
    # reference log-probs precomputed over the dataset (before the policy moved) give the same loss
    precomputed = moved(tiny_trainer(tmp_path, tiny_model_path, conversational_pairs(4), beta=0.5,
                                     precompute_ref_log_probs=True))
    assert precomputed.compute_loss(precomputed.model, dict(first_batch(precomputed))).item() == pytest.approx(
        ours.item(), rel=1e-4)


def test_length_desensitised_reference_log_probs_keep_each_chosen_row_beside_its_rejected_one(tmp_path,
                                                                                                tiny_model_path):
    """ld_alpha: TRL's reference helper pairs row i with row i + n, so rows two pairs share are not merged."""
    pairs = conversational_pairs(4)
    for pair in pairs[1:3]:
        pair["chosen"] = pairs[0]["chosen"]  # three pairs share one chosen answer
    trainer = tiny_trainer(tmp_path, tiny_model_path, pairs, loss_type=["ipo"], ld_alpha=0.5)
    batch = first_batch(trainer)
    ours = trainer.compute_ref_log_probs(trainer.model, dict(batch))
    trls = DPOTrainer.compute_ref_log_probs(trainer, trainer.model, dict(batch))
    assert all(torch.allclose(a, b) for a, b in zip(ours, trls)) and ours[0].shape == (4,)


def test_margins_ask_for_a_wider_gap_and_ties_for_none(tmp_path, tiny_model_path):
    trainer = tiny_trainer(tmp_path, tiny_model_path, conversational_pairs(4, margin=1.0))
    batch = first_batch(trainer)
    plain = trainer.compute_loss(trainer.model, {**batch, "margin": torch.zeros(4)})
    with_margin = trainer.compute_loss(trainer.model, dict(batch))
    # policy == reference: every implicit reward is 0, so the losses are -log sigmoid(0) and -log sigmoid(-1).
    # The reference goes through TRL's unfused LM head: float32 sums of ~100 nats differ from the fused path's by
    # up to ~2e-3 on some CPUs, i.e. ~1e-4 in the loss at beta 0.1.
    assert plain.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(0.0)).item(), abs=3e-4)
    assert with_margin.item() == pytest.approx(torch.nn.functional.softplus(torch.tensor(1.0)).item(), abs=3e-4)
    trainer.tie_threshold = 1.0
    tied = trainer.compute_loss(trainer.model, {**batch, "tie": torch.ones(4, dtype=torch.bool)})
    sigmoid = torch.sigmoid(torch.tensor(1.0)).item()
    assert tied.item() == pytest.approx(-torch.log(torch.tensor(2 * sigmoid - 1)).item(), abs=3e-4)
    # ties are not counted as right or wrong: the logged accuracy is over the decided pairs of every batch (a batch
    # of ties only once counted as 0, and batches equally whatever their decided pairs)
    trainer._metrics["train"].clear()
    zeros, ones = torch.zeros(2), torch.ones(2)
    trainer.record_metrics(ones, zeros, zeros, zeros, torch.tensor([False, False]))  # both right
    trainer.record_metrics(zeros, ones, zeros, zeros, torch.tensor([True, True]))  # ties
    trainer.record_metrics(ones, zeros, zeros, zeros, torch.tensor([False, True]))  # one right, one tie
    accuracies = trainer._metrics["train"]["rewards/accuracies"]
    assert accuracies == [1.0, 1.0, 1.0]


def dpo_command(tmp_path, tiny_model_path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "dpo", "--config", "configs/tiny.yaml",
            f"--run.output_root={tmp_path / 'runs'}", f"--run.name={name}", f"--dpo.model={tiny_model_path}",
            f"--dpo.preferences={write_pairs(tmp_path / 'pairs.jsonl', 48)}", *extra]


def test_dpo_learns_separable_pairs_and_publishes_the_policy(tmp_path, tiny_model_path, capsys):
    command = dpo_command(tmp_path, tiny_model_path, "dpo", "--dpo.max_steps=24", "--dpo.save_steps=100")
    assert cli(command[3:]) == 0
    run = tmp_path / "runs" / "dpo"
    entry = json.loads((run / "manifest.json").read_text())["stages"]["dpo"]
    metrics = entry["metrics"]
    assert entry["status"] == "done" and metrics["train_pairs"] + metrics["eval_pairs"] == 48
    assert metrics["eval_rewards_accuracies"] >= 0.9 and metrics["eval_rewards_margins"] > 1.0, metrics
    assert (run / "dpo" / "model.safetensors").exists() and (run / "dpo" / "tokenizer.json").exists()
    assert "export_hash" not in entry["inputs"] and entry["inputs"]["preferences"].endswith("pairs.jsonl")
    # a rerun where every prompt fills max_length stops (exit 2) and leaves the finished policy as it was
    from rlhf.runs import hash_path

    finished = hash_path(run / "dpo")
    assert cli([*command[3:], "--dpo.max_length=4"]) == 2
    assert "training pairs has a prompt of dpo.max_length (4 tokens) or more" in capsys.readouterr().err
    assert hash_path(run / "dpo") == finished


def test_on_policy_pairs_are_sampled_from_the_policy_and_ordered_by_the_reward_model(tmp_path, tiny_model_path,
                                                                                     capsys):
    reward_dir = tmp_path / "reward"  # an untrained reward head still gives every answer its own score
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_model_path, num_labels=1).save_pretrained(reward_dir)
    reward_tokenizer(str(tiny_model_path)).save_pretrained(reward_dir)
    assert cli(["dpo", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path / 'runs'}",
                f"--dpo.model={tiny_model_path}", "--dpo.pairs=on_policy", f"--dpo.reward_model={reward_dir}",
                "--dpo.max_steps=2", "--dpo.eval_fraction=0", "--dpo.responses_per_prompt=3"]) == 0
    published = tmp_path / "runs" / "tiny" / "dpo"
    pairs = [json.loads(line) for line in (published / "pairs.jsonl").read_text().splitlines()]
    assert 10 <= len(pairs) <= 16  # configs/tiny.yaml: 16 prompts, identical or equal-scored pairs left out
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert all(p["chosen"][0]["content"] != p["rejected"][0]["content"] for p in pairs)
    metrics = json.loads((published / "stage.json").read_text())["metrics"]
    assert metrics["pairs_source"] == "on_policy"
    assert metrics["train_pairs"] + metrics["long_prompts_left_out"] == len(pairs)  # (prompts that fill max_length)
    # near-greedy sampling: each prompt's answers are one text, no pair: said so, exit 2, no pairs file written
    assert cli(["dpo", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path / 'runs'}", "--run.name=same",
                f"--dpo.model={tiny_model_path}", "--dpo.pairs=on_policy", f"--dpo.reward_model={reward_dir}",
                "--dpo.temperature=1e-6", "--dpo.num_prompts=4", "--dpo.responses_per_prompt=2"]) == 2
    assert "no on-policy pair" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "same" / ".dpo.partial" / "pairs.jsonl").exists()


def test_a_killed_dpo_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path, tiny_model_path):
    extra = ("--dpo.max_steps=12", "--dpo.save_steps=4")
    kill_when_saved(dpo_command(tmp_path, tiny_model_path, "killed", *extra),
                    tmp_path / "runs" / "killed" / ".dpo.partial" / "checkpoint-4")
    assert not (tmp_path / "runs" / "killed" / "dpo").exists()
    resumed = subprocess.run(dpo_command(tmp_path, tiny_model_path, "killed", *extra, "--dpo.resume=true"),
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    whole = subprocess.run(dpo_command(tmp_path, tiny_model_path, "whole", *extra), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    metrics = json.loads((tmp_path / "runs" / "killed" / "manifest.json").read_text())["stages"]["dpo"]["metrics"]
    assert metrics["resumed_from_step"] >= 4 and metrics["global_step"] == 12
    resumed_weights = load_file(tmp_path / "runs" / "killed" / "dpo" / "model.safetensors")
    for name, tensor in load_file(tmp_path / "runs" / "whole" / "dpo" / "model.safetensors").items():
        assert torch.allclose(resumed_weights[name], tensor, atol=1e-5), name
    start = load_file(tiny_model_path / "model.safetensors")  # and training moved them: equal, not both unmoved
    assert max((resumed_weights[name] - start[name]).abs().max().item() for name in start) > 1e-4


def test_missing_inputs_name_the_command_that_makes_them(tmp_path, capsys):
    assert cli(["dpo", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path / 'runs'}"]) == 2
    assert "rlhf sft" in capsys.readouterr().err
    assert cli(["dpo", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path / 'runs'}",
                "--dpo.model=tiny-llama"]) == 2
    assert "rlhf preferences --config" in capsys.readouterr().err
    assert cli(["dpo", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path / 'runs'}",
                "--dpo.model=tiny-llama", "--dpo.pairs=on_policy"]) == 2
    assert "rlhf reward" in capsys.readouterr().err
    assert cli(["dpo", "--config", "configs/tiny.yaml", "--dpo.loss_type=ipo", "--dpo.use_margin=true"]) == 2
    assert "loss_type sigmoid" in capsys.readouterr().err
    assert cli(["dpo", "--config", "configs/tiny.yaml", "--dpo.ld_alpha=0.5"]) == 2
    assert "ld_alpha" in capsys.readouterr().err
    assert cli(["dpo", "--config", "configs/tiny.yaml", "--dpo.ties=equal", "--dpo.selection=best_worst"]) == 2
    assert "ties: equal needs selection: all" in capsys.readouterr().err
    for setting in ("--dpo.f_divergence_type=js_divergence", "--dpo.use_weighting=true", "--dpo.loss_weights=[0.5]"):
        assert cli(["dpo", "--config", "configs/tiny.yaml", setting]) == 2  # TRL's loss only: ours would ignore it
        assert "are TRL's own loss's" in capsys.readouterr().err


def test_trls_other_losses_train_on_labelled_prompt_groups_and_refuse_ranking_weights(tmp_path, capsys):
    """loss_type ipo on labelled pairs batched by prompt (tiny.yaml) trains on whole rows (the shared-prompt batch
    feeds our sigmoid loss only); the pairs of a ranking, which weigh less than a plain pair's vote, are refused for
    it. Pairs longer than max_length are cut, those whose prompt alone fills it left out (TRL's), and the stage says
    how many."""
    ranked = tmp_path / "ranked.jsonl"  # a ranking of three answers: three pairs of weight 1/3
    pairs = (("Hello!", "Hi."), ("Hello!", "Go."), ("Hi.", "Go."))
    ranked.write_text("".join(json.dumps({"prompt": "Hi?", "chosen": chosen, "rejected": rejected, "ranking": "r1",
                                          "pair_weight": 1 / 3}) + "\n" for chosen, rejected in pairs)
                      + json.dumps({"prompt": "Bye?", "chosen": "Bye!", "rejected": "No."}) + "\n")  # one whole vote
    args = ["dpo", "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path / 'runs'}", "--dpo.model=tiny-llama",
            "--dpo.loss_type=ipo"]
    assert cli([*args, f"--dpo.preferences={ranked}"]) == 2
    assert f"{ranked}: pair_weight: the pairs weigh unequally (a ranking's pairs share one vote" in \
        capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n"
                             for prompt in ("Hi?", "Bye?", "Why? " * 20) for chosen, rejected in pairs))
    assert cli([*args, f"--dpo.preferences={plain}", "--dpo.max_length=16"]) == 0
    entry = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["stages"]["dpo"]
    assert entry["status"] == "done" and entry["metrics"]["train_pairs"] == entry["metrics"]["long_pairs_cut"] == 3
    assert entry["metrics"]["long_prompts_left_out"] == 3  # TRL drops the pairs of the prompt that fills max_length
    out = capsys.readouterr().out
    assert "[dpo] 3 train pairs have a prompt of max_length (16 tokens) or more and are left out" in out
    assert "[dpo] 3 of 3 training pairs are longer than max_length (16 tokens) and are cut (keep_start)" in out


def test_pairs_of_similar_length_share_a_batch(tmp_path, tiny_model_path):
    """length_grouped (the default): the 4 short pairs make one batch and the 4 long ones the other, each padded
    to its own longest row; random batches mix them and pad both to the longest."""
    pairs = conversational_pairs(8)
    for i, pair in enumerate(pairs):
        pair["chosen"][0]["content"] += " and more" * (12 if i % 2 else 0)
    grouped = tiny_trainer(tmp_path, tiny_model_path, pairs)
    lengths = grouped.row_lengths(grouped.train_dataset)
    short, long = max(lengths[0::2]), max(lengths[1::2])
    assert short < long <= 64
    widths = sorted(batch["input_ids"].shape[1] for batch in grouped.get_train_dataloader())
    assert widths == [short, long]
    mixed = tiny_trainer(tmp_path, tiny_model_path, pairs, train_sampling_strategy="random")
    assert sorted(batch["input_ids"].shape[1] for batch in mixed.get_train_dataloader()) == [long, long]


def all_pairs_of(prompts: int, answers: int) -> list[dict]:
    """Every pair of `answers` answers to each of `prompts` prompts, the longer answer chosen, grouped by prompt."""
    pairs = []
    for p in range(prompts):
        texts = [f"Answer {p}" + " indeed" * a for a in range(answers)]
        prompt = [{"role": "user", "content": f"Question {p}?"}]
        pairs += [{"prompt": prompt, "chosen": [{"role": "assistant", "content": texts[j]}],
                   "rejected": [{"role": "assistant", "content": texts[i]}], "margin": 0.0, "tie": False,
                   "weight": 1.0, "group": json.dumps(prompt)} for i in range(answers) for j in range(i + 1, answers)]
    return pairs


def test_prompt_batches_run_each_answer_once_for_all_its_pairs(tmp_path, tiny_model_path):
    """4 answers to each of 3 prompts, all 6 pairs: a batch of 12 pairs holds two whole prompts and runs 8
    sequences (not 24) through the policy and 8 through the reference, with the loss of running every pair."""
    trainer = moved(tiny_trainer(tmp_path, tiny_model_path, all_pairs_of(3, 4), per_device_train_batch_size=12,
                                 beta=0.5))
    batches = list(trainer.get_train_dataloader())
    assert [len(batch["tie"]) for batch in batches] == [12, 6]
    for batch in batches:  # whole prompts: 4 distinct answers for each prompt's 6 pairs
        assert len(batch["input_ids"].unique(dim=0)) == 4 * len(batch["tie"]) // 6
    rows_run = []
    for model in (trainer.model, trainer.ref_model):
        model.register_forward_pre_hook(lambda _, args, kwargs: rows_run.append(len(kwargs["input_ids"])),
                                        with_kwargs=True)
    ours = trainer.compute_loss(trainer.model, dict(batches[0]))
    assert rows_run == [8, 8]  # the policy, then the reference
    rows_run.clear()
    trls = DPOTrainer._compute_loss(trainer, trainer.model, {k: v for k, v in batches[0].items()
                                                             if k not in ("margin", "tie", "weight")}, False)
    assert rows_run == [24, 24]  # TRL's loss runs both rows of every pair
    assert abs(ours.item() - 0.6931) > 0.01
    assert ours.item() == pytest.approx(trls.item(), rel=1e-4)


def test_shared_prompt_batches_run_each_prompt_once_with_the_same_loss_and_gradients(tmp_path, tiny_model_path):
    """The same 12 pairs (two prompts, 4 answers each): split into 2 prompt rows and 8 answer rows on their cached
    keys and values, they give the loss and the gradients of running every pair's whole sequences."""
    whole = moved(tiny_trainer(tmp_path, tiny_model_path, all_pairs_of(3, 4), per_device_train_batch_size=12,
                               beta=0.5))
    shared = moved(tiny_trainer(tmp_path, tiny_model_path, all_pairs_of(3, 4), per_device_train_batch_size=12,
                                beta=0.5))
    shared.data_collator.share_prompt = True
    split = first_batch(shared)
    assert split["prefix_ids"].shape[0] == 2 and split["suffix_ids"].shape[0] == 8
    ours = shared.compute_loss(shared.model, dict(split))
    trls = DPOTrainer._compute_loss(whole, whole.model, {k: v for k, v in first_batch(whole).items()
                                                         if k not in ("margin", "tie", "weight")}, False)
    assert abs(ours.item() - 0.6931) > 0.01
    assert ours.item() == pytest.approx(trls.item(), rel=1e-4)
    ours.backward()
    trls.backward()
    for (name, mine), theirs in zip(shared.model.named_parameters(), whole.model.parameters()):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-3, atol=1e-6), name
    # reference log-probs precomputed over the dataset reach the shared batches too
    precomputed = moved(tiny_trainer(tmp_path, tiny_model_path, all_pairs_of(3, 4), per_device_train_batch_size=12,
                                     beta=0.5, precompute_ref_log_probs=True))
    precomputed.data_collator.share_prompt = True
    batch = first_batch(precomputed)
    assert "prefix_ids" in batch and "ref_chosen_logps" in batch
    assert precomputed.compute_loss(precomputed.model, dict(batch)).item() == pytest.approx(ours.item(), rel=1e-4)
    shared.data_collator.pad_to_multiple_of = 8  # rows padded to a multiple of 8: the same loss
    padded = first_batch(shared)
    assert padded["prefix_ids"].shape[1] % 8 == 0 and padded["suffix_ids"].shape[1] % 8 == 0
    assert shared.compute_loss(shared.model, dict(padded)).item() == pytest.approx(ours.item(), rel=1e-4)
    shared.data_collator.pad_to_multiple_of = None
    shared.data_collator.max_length = 12  # rows max_length cuts go whole, cut as TRL cuts them
    assert "prefix_ids" not in first_batch(shared) and first_batch(shared)["input_ids"].shape[1] == 12


def test_the_memory_estimate_counts_the_sequences_a_step_runs(tmp_path, tiny_tokenizer):
    """Batches of 12 pairs: 24 sequences one pair at a time; by prompt (4 answers, 6 pairs each), 8 answers for
    the two whole prompts a batch holds plus 4 for a prompt a batch's edge cuts."""
    pairs = all_pairs_of(3, 4)
    by_pair = DPOStageConfig(output_dir=str(tmp_path), per_device_train_batch_size=12, selection="best_worst")
    by_prompt = DPOStageConfig(output_dir=str(tmp_path), per_device_train_batch_size=12)
    assert sequences_per_step(12, pairs, by_pair.prompt_batches) == 24
    assert sequences_per_step(12, pairs, by_prompt.prompt_batches) == 12
    # the reward stage's batches of whole prompts too (it counted both answers of every pair: on the default run it
    # checkpointed its activations for memory it did not need, and so ran without sharing the prompt)
    longest = longest_sequence(tiny_tokenizer, pairs, 512)
    reward = RewardStageConfig(output_dir=str(tmp_path), per_device_train_batch_size=12)
    assert reward_tokens_per_step(tiny_tokenizer, pairs, reward) == 12 * longest
    ungrouped = RewardStageConfig(output_dir=str(tmp_path), per_device_train_batch_size=12, group_by_prompt=False)
    assert reward_tokens_per_step(tiny_tokenizer, pairs, ungrouped) == 24 * longest


def test_pairs_are_held_out_by_prompt_whatever_the_batching(tmp_path):
    from ppo.dpo import held_out_by_prompt

    pairs = [{"id": f"{p}-{i}", "prompt": [{"role": "user", "content": f"Question {p}?"}]}
             for p in range(10) for i in range(3)]
    config = DPOStageConfig(output_dir=str(tmp_path), group_by_prompt=False, eval_fraction=0.3, seed=1)
    train, held_out = held_out_by_prompt(pairs, config)
    prompts = [{json.dumps(pair["prompt"]) for pair in side} for side in (train, held_out)]
    assert len(held_out) == 9 and not prompts[0] & prompts[1]
