"""The reward stage on the tiny model: it learns separable pairs (from a file or straight from the store), trains
ties and ensembles, evaluates itself, resumes after a kill, and refuses bad input with exit 2."""
import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli import main as cli
from reward.config import RewardStageConfig
from reward.data import training_pairs
from rlhf.reward_model import load_reward_model, reward_tokenizer, score_heads
from reward.train import main as train_reward, pair_metrics
from rlhf.config import RunConfig
from rlhf.errors import ConfigError, DataError
from rlhf.runs import hash_path
from rlhf.store import Store
from tests.conftest import REPO, kill_when_saved

POLITE = "Yes, happy to help with question {i}. Thank you for asking!"
RUDE = "No. Go away, {i} is a stupid question."


def write_pairs(path, count: int, **extra) -> str:
    """Pairs a model can separate by content: the chosen answer is polite, the rejected one rude."""
    with open(path, "w") as out:
        for i in range(count):
            row = {"id": f"pair-{i}", "prompt": f"Question number {i}: can you help?",
                   "chosen": POLITE.format(i=i), "rejected": RUDE.format(i=i), "margin": 1.0 if i % 2 else 0.5}
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
    scale = record["reward"]["scale"]
    assert record["reward"]["heads"] == 1 and scale["samples"] == 96 and scale["std"] > 0
    assert metrics["heldout_accuracy"] == metrics["eval_accuracy"] and metrics["gold_items"] > 0
    for name in ("eval.md", "reliability.png", "reward_distribution.png"):
        assert (published / name).stat().st_size > 0
    assert (published / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tokenizer = reward_tokenizer(str(published))
    model = load_reward_model(str(published), tokenizer)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert pair_metrics(model, tokenizer, training_pairs(config.preferences, config))["accuracy"] >= 0.9
    # a rerun where no pair fits max_length stops (exit 2) and leaves the finished model as it was: it published an
    # untrained model as done over it
    finished = hash_path(published)
    with pytest.raises(ConfigError, match="every one of the 36 training pairs is longer than reward.max_length"):
        train_reward(dataclasses.replace(config, max_length=8), run)
    assert hash_path(published) == finished
    # a gold file that is missing stops the stage before it trains (it was read after training, failing the stage
    # at its end), named with its setting
    manifest = (published.parent / "manifest.json").read_text()
    with pytest.raises(DataError, match=r"nosuch.jsonl: file: not found \(reward.gold\)"):
        train_reward(dataclasses.replace(config, gold=str(tmp_path / "nosuch.jsonl"), max_steps=31), run)
    assert hash_path(published) == finished and (published.parent / "manifest.json").read_text() == manifest


def test_answer_mean_pooling_is_trained_saved_and_scored_over_the_answer_tokens(tmp_path, tiny_model_path):
    config = RewardStageConfig(model=str(tiny_model_path), preferences=write_pairs(tmp_path / "pairs.jsonl", 32),
                               eval_fraction=0.25, max_steps=12, learning_rate=2e-3, per_device_train_batch_size=8,
                               logging_steps=10, save_steps=100, seed=0, max_length=64, pooling="answer_mean")
    metrics = train_reward(config, RunConfig(name="rm", output_root=str(tmp_path / "runs"), tracking="none"))
    assert metrics["eval_accuracy"] >= 0.9
    published = tmp_path / "runs" / "rm" / "reward"
    assert json.loads((published / "stage.json").read_text())["reward"]["pooling"] == "answer_mean"
    tokenizer = reward_tokenizer(str(published))
    model = load_reward_model(str(published), tokenizer)  # the pooling comes back with the model
    assert model.config.reward_pooling == "answer_mean"
    prompt = [{"role": "user", "content": "Question number 3: can you help?"}]
    conversations = [prompt + [{"role": "assistant", "content": text}] for text in (POLITE.format(i=3), "Fine.")]
    with torch.no_grad():  # by hand: the head at each answer token, averaged
        expected = []
        for conversation in conversations:
            prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]
            ids = tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"]
            assert ids[:len(prefix)] == prefix
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            expected.append(model.score(hidden)[len(prefix):].mean(0))
    assert torch.allclose(score_heads(model, tokenizer, conversations), torch.stack(expected), atol=1e-5)
    with pytest.raises(ValueError, match="pooling must be one of last_token, answer_mean"):
        RewardStageConfig(pooling="first_token")


def test_a_reward_model_cut_to_its_first_layers_is_trained_saved_and_loaded_that_size(tmp_path, tiny_model_path,
                                                                                      capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl", 32)
    config = RewardStageConfig(model=str(tiny_model_path), preferences=pairs, eval_fraction=0.25, max_steps=12,
                               learning_rate=2e-3, per_device_train_batch_size=8, logging_steps=10, save_steps=100,
                               seed=0, max_length=64, pooling="answer_mean", num_layers=1)
    metrics = train_reward(config, RunConfig(name="rm", output_root=str(tmp_path / "runs"), tracking="none"))
    assert metrics["eval_accuracy"] >= 0.9
    published = tmp_path / "runs" / "rm" / "reward"
    weights = load_file(published / "model.safetensors")
    assert any(".layers.0." in key for key in weights) and not any(".layers.1." in key for key in weights)
    model = load_reward_model(str(published), reward_tokenizer(str(published)))
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert load_reward_model(str(tiny_model_path), reward_tokenizer(str(tiny_model_path))).config.num_hidden_layers == 2
    code = cli(["reward", "--reward.model", str(tiny_model_path), "--reward.preferences", pairs, "--reward.num_layers",
                "3", "--run.output_root", str(tmp_path / "more"), "--run.tracking", "none"])
    assert code == 2 and not (tmp_path / "more").exists()  # refused before anything is written
    assert "reward.num_layers is 3 but the model has only 2 layers" in capsys.readouterr().err


def test_padding_with_eos_is_replaced_by_a_spare_special_token(tiny_model_path):
    tokenizer = reward_tokenizer(str(tiny_model_path))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_only_ties_and_both_bad_rows_stop_with_exit_2(tmp_path, tiny_model_path, capsys):
    path = tmp_path / "ties.jsonl"
    write_pairs(path, 3, tie=True)
    with pytest.raises(DataError, match="no decided pair to learn from: of its 3 rows 3 are ties and 0 both bad"):
        training_pairs(str(path), RewardStageConfig())
    code = cli(["reward", "--reward.model", str(tiny_model_path), "--reward.preferences", str(path),
                "--run.output_root", str(tmp_path / "runs"), "--run.tracking", "none"])
    assert code == 2 and "no decided pair to learn from" in capsys.readouterr().err
    # ties kept as ties, but one pair per prompt (the best against the worst) keeps no tie: refused
    assert cli(["reward", "--reward.ties=equal", "--reward.selection=best_worst"]) == 2
    assert "ties: equal needs selection: all" in capsys.readouterr().err


def store_with_votes(tmp_path, count: int) -> str:
    """A label store with `count` polite-vs-rude comparisons (sides shuffled), each voted on by three labellers
    who mostly prefer the polite answer, and gold items the first labeller gets right and the others wrong."""
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    store = Store(url)
    users = [store.add_user(f"sim{j}", "labeller", "password1") for j in range(3)]
    for i in range(count):
        prompt = store.add_prompt(f"p{i}", "chat", [{"role": "user", "content": f"Question number {i}: can you help?"}])
        polite, rude = (store.add_response(prompt, text.format(i=i), "m", {}) for text in (POLITE, RUDE))
        polite_side = "a" if i % 2 else "b"
        comparison = store.add_comparison(*((polite, rude) if i % 2 else (rude, polite)), batch="b1")
        for j, user in enumerate(users):
            dissent = (i + j) % 7 == 0
            store.cast_vote(comparison.id, user, ("b" if polite_side == "a" else "a") if dissent else polite_side,
                            "clear")
    for i in range(3):
        prompt = store.add_prompt(f"g{i}", "chat", [{"role": "user", "content": f"Gold {i}?"}])
        gold = store.add_comparison(store.add_response(prompt, POLITE.format(i=i), "m", {}),
                                    store.add_response(prompt, RUDE.format(i=i), "m", {}), batch="gold",
                                    kind="gold", expected="a")
        for j, user in enumerate(users):
            store.cast_vote(gold.id, user, "a" if j == 0 else "b", "clear")
    return url


def test_reads_the_store_records_the_export_and_measures_itself_against_the_labellers(tmp_path, tiny_model_path,
                                                                                      capsys):
    url = store_with_votes(tmp_path, 40)
    args = ["--reward.model", str(tiny_model_path), "--reward.preferences", url, "--reward.weight_by_gold", "true",
            "--reward.eval_fraction", "0.3", "--reward.max_steps", "25", "--reward.learning_rate", "2e-3",
            "--reward.max_length", "64", "--reward.save_steps", "100", "--run.name", "fromstore",
            "--run.output_root", str(tmp_path / "runs"), "--run.tracking", "none"]
    assert cli(["reward", *args[2:]]) == 2  # no --reward.model and no SFT model: the run folder is not made
    assert not (tmp_path / "runs").exists()
    assert cli(["reward", *args]) == 0
    run = tmp_path / "runs" / "fromstore"
    [export] = list((run / "exports").iterdir())
    entry = json.loads((run / "manifest.json").read_text())["stages"]["reward"]
    assert entry["inputs"]["export_hash"] == export.name == json.loads((export / "export.json").read_text())[
        "content_hash"]
    assert entry["inputs"]["preferences"] == str(export)
    metrics = entry["metrics"]
    assert metrics["ceiling_items"] == 12 and metrics["ceiling_units"] > 0  # 30% of 40 held out, 3 votes each
    assert metrics["heldout_accuracy"] >= 0.9 and metrics["model_on_ceiling_units"] >= metrics["human_ceiling"] - 0.1
    report = (run / "reward" / "eval.md").read_text()
    assert "human ceiling" in report and f"{metrics['human_ceiling']:.3f}" in report

    published = hash_path(run / "reward")
    assert cli(["reward", "eval", *args]) == 0  # `rlhf reward eval`: the same held-out split, the same numbers
    assert hash_path(run / "reward") == published  # in its own folder: what PPO, DPO and eval hash stays put
    again = (run / "reward-eval" / "eval.md").read_text()
    assert (run / "reward-eval" / "reliability.png").exists() and not (run / ".reward-eval.partial").exists()
    assert f"{metrics['heldout_accuracy']:.3f}" in again
    [gap] = [line.split("|")[2] for line in again.splitlines() if "held-out mean reward gap" in line]
    assert float(gap) == pytest.approx(metrics["heldout_margin"], abs=2e-3)  # scored in other batches
    assert cli(["reward", "evaluate", *args]) == 2
    # another held-out share, or new votes in the store, would evaluate on pairs the model was trained on: refused
    evaluated = hash_path(run / "reward-eval")
    capsys.readouterr()
    from rlhf.runs import RunDir, stage_lock

    with stage_lock(RunDir(tmp_path / "runs", "fromstore"), "reward-eval"):  # another `rlhf reward eval` running
        assert cli(["reward", "eval", *args]) == 2
    assert "stage 'reward-eval' of run 'fromstore' is already running" in capsys.readouterr().err
    assert cli(["reward", "eval", *args, "--reward.eval_fraction", "0.5"]) == 2
    assert "was trained with other settings or on other pairs" in capsys.readouterr().err
    store = Store(url)
    prompt = store.add_prompt("new", "chat", [{"role": "user", "content": "A new question?"}])
    comparison = store.add_comparison(store.add_response(prompt, POLITE.format(i=99), "m", {}),
                                      store.add_response(prompt, RUDE.format(i=99), "m", {}), batch="b1")
    store.cast_vote(comparison.id, store.user("sim0"), "a", "clear")
    assert cli(["reward", "eval", *args]) == 2
    assert "was trained with other settings or on other pairs" in capsys.readouterr().err
    assert hash_path(run / "reward-eval") == evaluated and len(list((run / "exports").iterdir())) == 1


def test_ties_trained_as_equal_and_an_ensemble_of_heads(tmp_path, tiny_model_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, 40)
    with open(path, "a") as out:  # ties: two equally neutral answers
        for i in range(24):
            out.write(json.dumps({"id": f"tie-{i}", "prompt": f"Question number {i}: can you help?",
                                  "chosen": f"Question {i} noted.", "rejected": f"Noted, question {i}.",
                                  "tie": True}) + "\n")
    config = RewardStageConfig(model=str(tiny_model_path), preferences=str(path), ties="equal", tie_threshold=1.0,
                               ensemble=3, eval_fraction=0.25, max_steps=30, learning_rate=2e-3, max_length=64,
                               per_device_train_batch_size=8, save_steps=100, seed=0)
    assert sum(p["tie"] for p in training_pairs(str(path), config)) == 24
    metrics = train_reward(config, RunConfig(name="ties", output_root=str(tmp_path / "runs"), tracking="none"))
    assert metrics["heldout_accuracy"] >= 0.9
    assert metrics["tie_abs_gap"] < 0.5 * metrics["heldout_margin"]  # ties pulled together, decided pairs apart
    assert metrics["ensemble_gap_std"] > 0  # bootstrapped heads disagree somewhat
    published = tmp_path / "runs" / "ties" / "reward"
    assert json.loads((published / "stage.json").read_text())["reward"]["heads"] == 3
    tokenizer = reward_tokenizer(str(published))
    heads = score_heads(load_reward_model(str(published), tokenizer), tokenizer,
                        [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]])
    assert heads.shape == (1, 3)
    # trained on from there with another number of heads: refused (it kept its 3 and was recorded with 1, so every
    # later stage failed to load it)
    with pytest.raises(ConfigError, match=r"reward.ensemble is 1, but .* is a reward model with 3 head\(s\)"):
        train_reward(dataclasses.replace(config, model=str(published), ensemble=1),
                     RunConfig(name="again", output_root=str(tmp_path / "runs"), tracking="none"))
    assert not (tmp_path / "runs" / "again").exists()


def reward_command(tmp_path, tiny_model_path, name):
    return [sys.executable, "-m", "pipeline.cli", "reward", "--config", "configs/tiny.yaml",
            f"--run.output_root={tmp_path / 'runs'}", f"--run.name={name}", f"--reward.model={tiny_model_path}",
            f"--reward.preferences={write_pairs(tmp_path / 'pairs.jsonl', 64)}", "--reward.max_steps=40",
            "--reward.save_steps=5", "--reward.per_device_train_batch_size=4"]


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path, tiny_model_path):
    command = reward_command(tmp_path, tiny_model_path, "killed")
    partial = tmp_path / "runs" / "killed" / ".reward.partial"
    kill_when_saved(command, partial / "checkpoint-10")
    assert not (tmp_path / "runs" / "killed" / "reward").exists()

    resumed = subprocess.run(command + ["--reward.resume=true"], cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    whole = subprocess.run(reward_command(tmp_path, tiny_model_path, "whole"), cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    entry = json.loads((tmp_path / "runs" / "killed" / "manifest.json").read_text())["stages"]["reward"]
    assert entry["metrics"]["resumed_from_step"] >= 10 and entry["metrics"]["global_step"] == 40
    resumed_weights = load_file(tmp_path / "runs" / "killed" / "reward" / "model.safetensors")
    whole_weights = load_file(tmp_path / "runs" / "whole" / "reward" / "model.safetensors")
    for name, tensor in whole_weights.items():
        assert torch.allclose(resumed_weights[name], tensor, atol=1e-5), name
    start = load_file(tiny_model_path / "model.safetensors")  # and training moved them: equal, not both unmoved
    shared = [name for name in start if name in resumed_weights]
    assert shared and max((resumed_weights[name] - start[name]).abs().max().item() for name in shared) > 1e-3


def save_tiny_model(out, tokenizer, vocab_size: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_a_tokenizer_with_nothing_to_pad_with_and_a_mismatched_one_exit_2(tmp_path, tiny_tokenizer, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(["a small vocabulary for a test"], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    only_eos = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")
    only_eos.chat_template = tiny_tokenizer.chat_template
    pairs = write_pairs(tmp_path / "pairs.jsonl", 4)
    common = ["--reward.preferences", pairs, "--run.output_root", str(tmp_path / "runs"), "--run.tracking", "none"]
    no_pad = save_tiny_model(tmp_path / "no-pad", only_eos, len(only_eos))
    assert cli(["reward", "--reward.model", no_pad, *common]) == 2
    assert "no pad token (or pads with its EOS token)" in capsys.readouterr().err
    mismatched = save_tiny_model(tmp_path / "mismatched", tiny_tokenizer, 64)
    assert cli(["reward", "--reward.model", mismatched, *common]) == 2
    assert "a mismatched tokenizer" in capsys.readouterr().err


def test_training_and_reward_eval_log_their_plots_to_the_tracker_as_images(tmp_path, tiny_model_path):
    import os
    import sqlite3

    env = {**os.environ, "HOME": str(tmp_path), "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    args = ["--config", "configs/tiny.yaml", "--reward.model", str(tiny_model_path), "--reward.preferences",
            write_pairs(tmp_path / "pairs.jsonl", 16), "--run.output_root", str(tmp_path / "runs"),
            "--run.tracking", "trackio", "--reward.max_steps", "2"]
    for words in (["reward"], ["reward", "eval"]):
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", *words, *args], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    [database] = list((tmp_path / "trackio").rglob("*.db"))
    with sqlite3.connect(database) as db:
        tables = [name for (name,) in db.execute("select name from sqlite_master where type='table'")]
        dump = " ".join(str(row) for table in tables for row in db.execute(f"select * from {table}"))
    assert "reward_eval/reliability" in dump and "reward_eval/reward_distribution" in dump
    images = list((tmp_path / "trackio").rglob("*.png"))
    assert len(images) == 4 and all(image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for image in images)


def test_a_new_score_head_loads_without_transformers_load_report_and_other_surprises_are_named(
        tiny_model_path, tmp_path, capfd, caplog):
    tokenizer = reward_tokenizer(str(tiny_model_path))
    load_reward_model(str(tiny_model_path), tokenizer)  # a language model: its new score head is expected
    said = capfd.readouterr()
    assert "LOAD REPORT" not in said.out + said.err and not caplog.records
    # the same model with a weight the classifier has no use for, and one layer norm gone
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_path, changed)
    weights = load_file(changed / "model.safetensors")
    weights["extra.weight"] = torch.zeros(2)
    del weights["model.norm.weight"]
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    load_reward_model(str(changed), tokenizer)
    assert [record.getMessage() for record in caplog.records] == [
        f"{changed}: weights missing from the checkpoint (newly initialised): model.norm.weight; in it but unused: "
        "extra.weight"]


def test_pairs_longer_than_max_length_are_left_out_out_loud_and_not_counted(tmp_path, tiny_model_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(pairs, 12)
    with open(pairs, "a") as out:  # one pair far past max_length (64 tokens)
        out.write(json.dumps({"id": "long", "prompt": "Tell me a long story.", "chosen": "Once upon a time " * 40,
                              "rejected": "No."}) + "\n")
    config = RewardStageConfig(model=str(tiny_model_path), preferences=str(pairs), eval_fraction=0.0, max_steps=2,
                               per_device_train_batch_size=4, save_steps=100, seed=0, max_length=64, probe_steps=0)
    metrics = train_reward(config, RunConfig(name="rm", output_root=str(tmp_path / "runs"), tracking="none"))
    assert (metrics["train_pairs"], metrics["long_pairs_left_out"]) == (12, 1)
    assert "[reward] 1 of 13 training pairs are longer than max_length (64 tokens) and were left out" in \
        capsys.readouterr().out


def test_a_reward_model_trained_in_mixed_precision_is_scaled_as_it_is_published(tmp_path, tiny_model_path):
    """Under bf16 mixed precision accelerate wraps the model's forward in an autocast that stays after training:
    the stage's own evaluation and the reward scale PPO normalises by must come from the published fp32 weights,
    as `rlhf reward eval` and the later stages load them, not from bf16 products of them."""
    from reward.probe import answer_index
    from reward.train import reward_scale

    pairs = write_pairs(tmp_path / "pairs.jsonl", 24)
    config = RewardStageConfig(model=str(tiny_model_path), preferences=pairs, precision="bf16", eval_fraction=0.5,
                               max_steps=25, learning_rate=2e-3, max_length=64, save_steps=100, seed=0)
    train_reward(config, RunConfig(name="mixed", output_root=str(tmp_path / "runs"), tracking="none"))
    published = tmp_path / "runs" / "mixed" / "reward"
    scale = json.loads((published / "stage.json").read_text())["reward"]["scale"]
    conversations, _, _ = answer_index(training_pairs(pairs, config))
    tokenizer = reward_tokenizer(str(published))
    rewards = score_heads(load_reward_model(str(published), tokenizer), tokenizer, conversations).mean(-1)
    assert scale["std"] > 1  # trained apart: bf16's 8 bits of mantissa would show
    assert reward_scale(rewards) == pytest.approx(scale, rel=1e-5, abs=1e-5)
