import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, TrainerControl, TrainerState
from trl import SFTTrainer

from pipeline.cli import main as cli
from rlhf.config import RunConfig, load_config
from rlhf.errors import DataError
from rlhf.generation import generate_responses
from rlhf.models import load_tokenizer
from sft.config import SFTStageConfig
from rlhf.stage import NoCheckpointAtTheEnd, last_complete_checkpoint
from sft.train import (StageSFTTrainer, main, tokenize_conversation, tokenize_rows,
                       trainer_args)
from tests.conftest import REPO, kill_when_saved

MOTTO = "Measure twice, cut once."
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green, like grass."},
]


def tiny_config(tmp_path, *overrides):
    sections = load_config(REPO / "configs/tiny.yaml", [f"--run.output_root={tmp_path / 'runs'}", *overrides],
                           {"run": RunConfig, "sft": SFTStageConfig})
    return sections["sft"], sections["run"]


def masked_runs(ids, mask):
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return runs + ([current] if current else [])


def test_only_assistant_tokens_carry_loss(tiny_tokenizer):
    encoded = tokenize_conversation(tiny_tokenizer, CONVERSATION)
    decoded = [tiny_tokenizer.decode(run) for run in masked_runs(encoded["input_ids"], encoded["assistant_masks"])]
    assert decoded == ["Blue.<|im_end|>", "Green, like grass.<|im_end|>"]
    everything = tokenize_conversation(tiny_tokenizer, CONVERSATION, assistant_only=False)
    assert all(everything["assistant_masks"]) and everything["input_ids"] == encoded["input_ids"]


def test_trainer_labels_mask_everything_but_the_assistant(tmp_path, tiny_model_path, tiny_tokenizer):
    config, _ = tiny_config(tmp_path, "--sft.packing=false")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    data = tokenize_rows([{"messages": CONVERSATION}], tiny_tokenizer, assistant_only=True)
    trainer = StageSFTTrainer(model=model, args=trainer_args(config, tmp_path / "out", False), train_dataset=data,
                              processing_class=tiny_tokenizer)
    [row] = trainer.train_dataset
    kept = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert kept == [t for t, label in zip(row["input_ids"], row["labels"]) if label == t]
    assert tiny_tokenizer.decode(kept) == "Blue.<|im_end|>Green, like grass.<|im_end|>"


def test_packed_batches_give_the_loss_of_the_examples_taken_one_by_one(tmp_path, tiny_model_path, tiny_tokenizer):
    """Padding-free packing is correct only if each example in a packed row attends to itself alone."""
    config, _ = tiny_config(tmp_path, "--sft.per_device_train_batch_size=3", "--sft.packing=true")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[3:]}]
    trainer = StageSFTTrainer(model=model, args=trainer_args(config, tmp_path / "out", False),
                              train_dataset=tokenize_rows(rows, tiny_tokenizer, True),
                              processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # one packed row, no padding
    with torch.no_grad():
        packed_loss = trainer.compute_loss(model, dict(batch))
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        total, count = 0.0, 0
        for begin, end in zip(starts, starts[1:]):
            ids, labels = batch["input_ids"][:, begin:end], batch["labels"][0, begin:end]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
            count += int((labels[1:] != -100).sum())
    assert len(starts) == 4
    torch.testing.assert_close(packed_loss, total / count, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # our CPU loss path and TRL's tiled LM head agree
        torch.testing.assert_close(SFTTrainer.compute_loss(trainer, model, dict(batch)), packed_loss,
                                   atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # without its example boundaries, the row's last example sees the others
        unbounded = model(input_ids=batch["input_ids"], use_cache=False).logits[0, starts[-2]:]
        alone = model(input_ids=batch["input_ids"][:, starts[-2]:], use_cache=False).logits[0]
    assert (unbounded - alone).abs().max() > 1e-2


def test_cpu_loss_matches_trl_on_padded_batches_with_token_counts(tmp_path, tiny_model_path, tiny_tokenizer):
    config, _ = tiny_config(tmp_path, "--sft.packing=false", "--sft.per_device_train_batch_size=3")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).train()
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[3:]}]
    trainer = StageSFTTrainer(model=model, args=trainer_args(config, tmp_path / "out", False),
                              train_dataset=tokenize_rows(rows, tiny_tokenizer, True),
                              processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["attention_mask"] == 0).any()  # padded rows of different lengths
    assert trainer.plain_nll_on_one_cpu_process(model)
    with torch.no_grad():
        for items in (None, 40):
            ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
            theirs = SFTTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=items)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert trainer._metrics["train"]["mean_token_accuracy"] and trainer._metrics["train"]["entropy"][0] > 0


def test_cpu_loss_runs_under_the_mixed_precision_autocast(tmp_path, tiny_model_path, tiny_tokenizer):
    """Our loss calls the backbone past the model's forward, which accelerate wraps in its autocast: it ran in
    fp32 under bf16 mixed precision (twice as slow where bf16 is native) until it opened the autocast itself."""
    config, _ = tiny_config(tmp_path, "--sft.packing=false", "--sft.precision=bf16")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).train()
    trainer = StageSFTTrainer(model=model, args=trainer_args(config, tmp_path / "out", False),
                              train_dataset=tokenize_rows([{"messages": CONVERSATION}], tiny_tokenizer, True),
                              processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    seen = []
    model.model.layers[0].register_forward_hook(lambda module, args, output: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), next(module.parameters()).dtype)))
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = SFTTrainer.compute_loss(trainer, model, dict(batch))
    assert seen[0] == (True, torch.bfloat16, torch.float32)  # fp32 weights, bf16 products
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)


def test_only_checkpoints_that_finished_saving_are_resumed_from(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_training_saves_checkpoints_at_multiples_of_save_steps_only_not_again_at_the_end(tmp_path):
    def saved_at(max_steps: int, save_steps: int) -> list[int]:
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, save_steps=save_steps, report_to=[])
        handler = CallbackHandler([DefaultFlowCallback(), NoCheckpointAtTheEnd()], None, None, None, None)
        state, saves = TrainerState(max_steps=max_steps, save_steps=save_steps), []
        for step in range(1, max_steps + 1):
            state.global_step = step
            saves += [step] if handler.on_step_end(args, state, TrainerControl()).should_save else []
        return saves

    assert saved_at(6, 4) == [4]  # transformers alone: [4, 6]
    assert saved_at(8, 4) == [4, 8]
    assert saved_at(3, 4) == []


def write_motto_data(tmp_path):
    rows = [{"id": f"m{i}", "messages": [{"role": "user", "content": f"What is motto number {i}?"},
                                         {"role": "assistant", "content": MOTTO}]} for i in range(32)]
    path = tmp_path / "motto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "q", "prompt": "What is motto number 99?"}) + "\n")
    return path, prompts


def test_sft_memorises_publishes_and_the_saved_model_answers(tmp_path):
    data, prompts = write_motto_data(tmp_path)
    config, run = tiny_config(tmp_path, f"--sft.train_data={data}", f"--sft.sample_prompts={prompts}",
                              "--sft.max_steps=40", "--sft.eval_fraction=0.25", "--sft.learning_rate=1e-2",
                              "--sft.sample_max_new_tokens=12", "--run.name=motto")
    metrics = main(config, run)
    assert metrics["eval_loss"] < 0.2 * metrics["eval_loss_before"]
    assert metrics["global_step"] == 40 and metrics["real_tokens"] > 0

    out = tmp_path / "runs" / "motto" / "sft"
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "samples.json",
            "stage.json"} <= set(os.listdir(out))
    assert sorted(os.listdir(out.parent)) == [".sft.lock", "manifest.json", "manifest.json.lock", "sft"]  # no partial
    [sample] = json.loads((out / "samples.json").read_text())
    assert sample["after"] == MOTTO and sample["before"] != MOTTO
    entry = json.loads((out.parent / "manifest.json").read_text())["stages"]["sft"]
    assert entry["status"] == "done" and entry["outputs"]["model"] == str(out)
    assert entry["metrics"]["eval_loss"] == metrics["eval_loss"] and set(entry["input_hashes"]) == {"model",
                                                                                                    "train_data"}
    assert json.loads((out / "stage.json").read_text())["config_hash"] == entry["config_hash"]

    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), load_tokenizer(str(out))
    [answer] = generate_responses(model, tokenizer, [[{"role": "user", "content": "What is motto number 7?"}]], 12)
    assert answer == MOTTO


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    command = [sys.executable, "-m", "pipeline.cli", "sft", "--config", "configs/tiny.yaml",
               f"--run.output_root={tmp_path / 'runs'}", "--run.name=killed", "--sft.max_steps=40",
               "--sft.save_steps=5", "--sft.per_device_train_batch_size=2", "--sft.eval_fraction=0",
               "--sft.num_samples=0"]
    partial = tmp_path / "runs" / "killed" / ".sft.partial"
    kill_when_saved(command, partial / "checkpoint-5")
    assert not (tmp_path / "runs" / "killed" / "sft").exists()  # nothing half-written looks finished
    manifest = json.loads((tmp_path / "runs" / "killed" / "manifest.json").read_text())
    assert manifest["stages"]["sft"]["status"] == "running"

    resumed = subprocess.run(command + ["--sft.resume=true"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    entry = json.loads((tmp_path / "runs" / "killed" / "manifest.json").read_text())["stages"]["sft"]
    step = entry["metrics"]["resumed_from_step"]
    assert step >= 5 and step % 5 == 0 and entry["metrics"]["global_step"] == 40
    assert entry["status"] == "done" and not partial.exists()


def test_a_chat_template_that_cannot_mark_the_answers_stops_sft_before_it_writes(tmp_path, tiny_model_path, capsys):
    model = tmp_path / "odd-template"
    shutil.copytree(tiny_model_path, model)
    tokenizer = load_tokenizer(str(model))
    # the last turn rendered apart from the others: a conversation's prefix is no prefix of its rendering
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.last %}<<{{ m['content'] }}>>{% else %}"
                               "{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    tokenizer.save_pretrained(model)
    root = tmp_path / "runs"
    assert cli(["sft", "--config", "configs/tiny.yaml", f"--run.output_root={root}", f"--sft.model={model}"]) == 2
    assert "the chat template does not render conversation prefixes" in capsys.readouterr().err
    assert not root.exists()  # no run folder, lock or manifest entry


def test_examples_longer_than_max_length_are_said_and_one_without_an_answer_token_left_out(tiny_tokenizer, capsys):
    from sft.train import fit_to_max_length

    short = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    long_answer = {"messages": [{"role": "user", "content": "Hi?"},
                                {"role": "assistant", "content": "word " * 200}]}
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200},
                                {"role": "assistant", "content": "Hello."}]}
    data = tokenize_rows([short, long_answer, long_prompt], tiny_tokenizer, True)
    fitted = fit_to_max_length(data, 64, "training", "demos.jsonl")
    assert fitted["input_ids"] == data["input_ids"][:2]  # the long prompt's example holds no answer token in 64
    assert capsys.readouterr().out.strip() == (
        "[sft] 2 training example(s) of demos.jsonl are longer than max_length (64 tokens): trained on their first "
        "64, their answers cut; 1 with no answer token among them left out")
    assert fit_to_max_length(data, 4096, "training", "demos.jsonl") is data
    with pytest.raises(DataError, match="no held-out example has an answer token within max_length"):
        fit_to_max_length(tokenize_rows([long_prompt], tiny_tokenizer, True), 64, "held-out", "demos.jsonl")
