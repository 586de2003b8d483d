"""SFT, reward and DPO as 2 CPU processes (gloo) under torchrun, as `accelerate launch` starts them on GPUs: each
process takes its share of every batch, so an epoch takes half the optimiser steps of one process, and the
published model has moved from where it started. (PPO's 2-process run is in test_ppo_runs.py.)"""
import json
import os
import subprocess
import sys

from safetensors.torch import load_file

from preference_ui.loadtest import free_port
from tests.conftest import REPO
from tests.test_reward import write_pairs


def two_processes(tmp_path, *args: str, processes: int = 2) -> None:
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
              "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "pipeline.cli"]
    result = subprocess.run([*launch, *args, "--config", "configs/tiny.yaml", f"--run.output_root={tmp_path}",
                             "--run.name=ddp"], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def moved(folder, start) -> float:
    published = load_file(folder / "model.safetensors")
    return max((published[k] - start[k]).abs().max().item() for k in start)


def test_sft_reward_and_dpo_on_two_processes(tmp_path, tiny_model_path):
    start = load_file(tiny_model_path / "model.safetensors")
    pairs = write_pairs(tmp_path / "pairs.jsonl", 48)
    two_processes(tmp_path, "sft", "--sft.max_steps=-1", "--sft.num_train_epochs=1", "--sft.save_steps=1000")
    two_processes(tmp_path, "reward", f"--reward.preferences={pairs}", "--reward.max_steps=-1",
                  "--reward.num_train_epochs=1", "--reward.per_device_train_batch_size=4")
    two_processes(tmp_path, "dpo", f"--dpo.preferences={pairs}", "--dpo.max_steps=-1", "--dpo.num_train_epochs=1")
    stages = json.loads((tmp_path / "ddp" / "manifest.json").read_text())["stages"]
    assert all(stages[stage]["status"] == "done" for stage in ("sft", "reward", "dpo"))
    sft, reward, dpo = (stages[stage]["metrics"] for stage in ("sft", "reward", "dpo"))
    # configs/tiny.yaml: 8 conversations per process for SFT, 4 pairs per process for reward and DPO; one
    # process would take twice the steps (a last partial batch may be dropped or padded)
    assert abs(sft["global_step"] - sft["train_examples"] / 16) < 1
    assert abs(reward["global_step"] - reward["train_pairs"] / 8) < 1
    assert abs(dpo["global_step"] - dpo["train_pairs"] / 8) < 1
    assert moved(tmp_path / "ddp" / "sft", start) > 1e-4 and moved(tmp_path / "ddp" / "dpo", start) > 1e-4


def test_probed_answer_mean_reward_on_two_processes_equals_one_process(tmp_path, tiny_model_path):
    """The answer-mean head is read through a forward hook while DDP runs the model's own forward, after every
    process fitted the same probe head: 2 processes of 4 pairs must take the same steps as 1 process of 8 pairs
    (DDP averages the two halves' gradients). In fp32 with plain SGD, so the steps follow the gradients (Adam
    would blow rounding in near-zero gradients up to full steps)."""
    pairs = write_pairs(tmp_path / "pairs.jsonl", 32)  # all trained: 4 full steps of 8 pairs
    common = ["reward", f"--reward.model={tiny_model_path}", f"--reward.preferences={pairs}",
              "--reward.pooling=answer_mean", "--reward.probe_steps=50", "--reward.eval_fraction=0",
              "--reward.max_steps=4", "--reward.save_steps=1000", "--reward.precision=fp32", "--reward.optim=sgd",
              "--reward.learning_rate=0.5"]
    two_processes(tmp_path / "two", *common, "--reward.per_device_train_batch_size=4")
    two_processes(tmp_path / "one", *common, "--reward.per_device_train_batch_size=8", processes=1)
    two, one = (load_file(tmp_path / run / "ddp" / "reward" / "model.safetensors") for run in ("two", "one"))
    start = load_file(tiny_model_path / "model.safetensors")
    difference = max((two[k] - one[k]).abs().max().item() for k in two)  # the score head too
    assert difference < 1e-5 and moved(tmp_path / "two" / "ddp" / "reward", start) > 1e-2
    published = json.loads((tmp_path / "two" / "ddp" / "reward" / "config.json").read_text())
    assert published["reward_pooling"] == "answer_mean"
