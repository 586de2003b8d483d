"""PPO sharded over 2 CPU processes (gloo): under FSDP2 (ppo/sharding.py) and under DeepSpeed ZeRO-3
(ppo/zero3.py), with the settings configs/accelerate/fsdp.yaml and zero3.yaml give. Each answer is sampled with its
own seed (round, update, row), so the rollouts do not depend on the number of processes, and sharded training must
give the parameters one process gives over the same global batches.

Tolerance: after 6 updates in fp32 the killed and resumed sharded run's parameters lie within 1e-5 of the one-process
run's (measured 3e-7 under FSDP2, against steps that moved them by 2e-2): the processes sum gradients in another
order, and a rounding difference that flipped one sampled token would show as far more."""
import pytest
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from preference_ui.loadtest import free_port
from tests.conftest import REPO, kill_when_saved
from tests.test_ppo_runs import ppo_args, stage_entry

# 6 updates of 8 answers (two to each of four prompts). GRPO's advantages stay within a prompt's group, which stays
# on one process, and each process's loss is weighted by its share of the minibatch's tokens: the sharded run must
# equal one process up to rounding.
GRPO = ["--ppo.algorithm=grpo", "--ppo.num_generations=2", "--ppo.total_episodes=48", "--ppo.batch_size=8",
        "--ppo.save_steps=3", "--ppo.precision=fp32", "--ppo.learning_rate=1e-3"]
# what `accelerate launch --config_file configs/accelerate/{fsdp,zero3}.yaml` puts in the environment; on CPUs it
# starts one process (several need mpirun), so torchrun starts the two, as README says
SHARDINGS = {
    "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
              "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
              "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
    "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
              "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"},
}
CHECKPOINT_FILES = {"fsdp2": ("sharded", "*.distcp"), "zero3": ("zero3", "*/zero_pp_rank_*_model_states.pt")}


def environment(sharding: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **SHARDINGS[sharding]}


def sharded(*args: str) -> list[str]:
    """2 processes on the CPU."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", "-m", "pipeline.cli", *args]


def largest_difference(folder_a, folder_b, name: str = "model.safetensors") -> float:
    a, b = load_file(folder_a / name), load_file(folder_b / name)
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_path):
    """The GRPO run on one process that both shardings must repeat (its root). In its own process: in this pytest
    process accelerate's state may already hold another precision."""
    root = tmp_path_factory.mktemp("one-process")
    alone = subprocess.run([sys.executable, "-m", "pipeline.cli", *ppo_args(root, tiny_model_path, "one", *GRPO)],
                           cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=900)
    assert alone.returncode == 0, alone.stdout[-2000:] + alone.stderr[-3000:]
    return root


@pytest.mark.parametrize("sharding", list(SHARDINGS))
def test_two_sharded_processes_train_as_one_process_and_resume_exactly(tmp_path, tiny_model_path, sharding,
                                                                       one_process):
    command = sharded(*ppo_args(tmp_path, tiny_model_path, "sharded", *GRPO))
    env = environment(sharding)
    kill_when_saved(command, tmp_path / "runs" / "sharded" / ".ppo.partial" / "checkpoint-3", env=env)
    checkpoint = tmp_path / "runs" / "sharded" / ".ppo.partial" / "checkpoint-3"
    folder, pattern = CHECKPOINT_FILES[sharding]
    assert len(list((checkpoint / folder).glob(pattern))) == 2  # one file of shards per process
    assert not (checkpoint / "model.safetensors").exists()  # no whole copy of the model
    resumed = subprocess.run(command + ["--ppo.resume=true"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert stage_entry(tmp_path, "sharded")["metrics"]["processes"] == 2
    assert stage_entry(tmp_path, "sharded")["metrics"]["resumed_from_update"] == 3

    one_ppo = one_process / "runs" / "one" / "ppo"
    assert largest_difference(tmp_path / "runs" / "sharded" / "ppo", one_ppo) < 1e-5
    assert largest_difference(one_ppo, tiny_model_path) > 1e-3  # both trained: not the start twice
    sharded_metrics, one = stage_entry(tmp_path, "sharded")["metrics"], stage_entry(one_process, "one")["metrics"]
    for key in ("start_score", "end_score", "final_kl", "eval_score_after"):
        assert abs(sharded_metrics[key] - one[key]) < 1e-5, key


@pytest.mark.parametrize("sharding", list(SHARDINGS))
def test_ppo_with_its_critic_sharded_publishes_both_as_plain_models(tmp_path, tiny_model_path, sharding):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    args = ppo_args(tmp_path, tiny_model_path, "critic", "--ppo.total_episodes=16", "--ppo.batch_size=8",
                    "--ppo.precision=fp32", "--ppo.gradient_accumulation_steps=2")  # accumulated, sharded
    result = subprocess.run(sharded(*args), cwd=REPO, env=environment(sharding), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "is deprecated" not in result.stderr  # DeepSpeed's use of deprecated collectives stays out of the log
    published = tmp_path / "runs" / "critic" / "ppo"
    policy = AutoModelForCausalLM.from_pretrained(published).state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model_path).state_dict()
    assert set(policy) == set(start) and max((policy[k] - start[k]).abs().max().item() for k in start) > 1e-4
    critic = AutoModelForSequenceClassification.from_pretrained(published / "critic").state_dict()
    assert torch.count_nonzero(critic["score.weight"]) > 0  # the new head (zero at the start) was trained


def test_the_shards_follow_the_decoder_layers_and_a_model_without_them_is_refused(tiny_model_path):
    from ppo.sharding import layer_classes
    from ppo.update import Critic
    from rlhf import models
    from rlhf.errors import ConfigError

    policy, _ = models.load_causal_lm(str(tiny_model_path))
    assert layer_classes(policy) == {"LlamaDecoderLayer"}
    assert layer_classes(Critic(policy)) == {"LlamaDecoderLayer"}  # found inside the module that holds the model
    with pytest.raises(ConfigError, match="no decoder layer class"):
        layer_classes(torch.nn.Linear(2, 2))


def test_deepspeed_below_stage_3_stops_ppo_with_exit_2_before_anything_is_written(tmp_path, tiny_model_path):
    env = {**environment("zero3"), "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    result = subprocess.run(sharded(*ppo_args(tmp_path, tiny_model_path, "zero2")), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "ZeRO stage 3 only (not 2)" in result.stdout + result.stderr
    assert "exitcode  : 2" in result.stderr  # each process: a refusal, not a crash
    assert not (tmp_path / "runs").exists()  # checked with the files: no run folder, manifest or lock


ZERO3_INIT_REGISTERED = """
import os, sys, types
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from accelerate.utils import DeepSpeedPlugin
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from ppo.zero3 import loaded_whole

plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1},
                         zero3_init_flag=True)
plugin.set_deepspeed_weakref()  # as accelerate does on GPUs once the Accelerator is made
accelerator = types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin))
with loaded_whole(accelerator):
    inside = AutoModelForCausalLM.from_pretrained(sys.argv[1])
print(tuple(inside.get_input_embeddings().weight.shape), is_deepspeed_zero3_enabled())
"""


def test_models_load_whole_under_zero3_even_where_accelerate_registered_its_init_with_transformers(tiny_model_path):
    """On GPUs accelerate registers ZeRO-3's config with transformers, which then partitions every model it loads
    (the CPU runs above never register it): inside loaded_whole the models load whole (PPO copies its policy into
    the reference, and the reward model scores on every process), and the registration is back afterwards."""
    result = subprocess.run([sys.executable, "-c", ZERO3_INIT_REGISTERED, str(tiny_model_path), str(free_port())],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    shape, registered = result.stdout.strip().splitlines()[-1].rsplit(") ", 1)
    assert int(shape.strip("(").split(",")[0]) > 0 and registered == "True", result.stdout  # a partitioned one: (0,)


FROZEN_ROOT = """
import os, sys, types
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from ppo.sharding import layer_classes, shard
from rlhf import models

dist.init_process_group("gloo")
accelerator = types.SimpleNamespace(mixed_precision="no")
for frozen in (False, True):
    model, _ = models.load_causal_lm(sys.argv[1])
    shard(model, layer_classes(model), accelerator, frozen=frozen)
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    print("FROZEN" if frozen else "TRAINED", isinstance(model.get_input_embeddings().weight, DTensor))
dist.destroy_process_group()
"""


def test_a_frozen_models_root_is_sharded_again_after_its_forward(tiny_model_path):
    """The reference never runs a backward, which is what reshards a root (fully_shard keeps a root's parameters
    whole after its forward for the backward to come): sharded frozen, its embeddings and head go back to shards."""
    result = subprocess.run([sys.executable, "-c", FROZEN_ROOT, str(tiny_model_path), str(free_port())],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ["TRAINED", "False", "FROZEN", "True"], result.stdout


ZERO3_ROLLOUTS = """
import os, sys, types
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
import torch
from deepspeed.runtime.zero import parameter_offload
from ppo.zero3 import Part, engines, gathered_policy
from rlhf import models

policy, _ = models.load_causal_lm(sys.argv[1])
config = types.SimpleNamespace(batch_size=2, num_mini_batches=1, gradient_accumulation_steps=1, max_grad_norm=1.0)
engine, _ = engines(policy, None, None, torch.optim.AdamW, config, types.SimpleNamespace(num_processes=1,
                                                                                          mixed_precision="no"))
offload, part, ids = engine.optimizer.parameter_offload, Part(engine, "policy"), torch.tensor([[1, 2, 3]])
counts = []
for rollout in range(3):
    with gathered_policy(part) as whole, torch.no_grad():
        whole(input_ids=ids)
    part(input_ids=ids).logits.sum().backward()  # a training forward and backward through the hooks again
    counts.append((len(offload.forward_hooks), len(offload.backward_hooks), len(parameter_offload.FWD_MODULE_STACK)))
print("COUNTS", counts)
"""


def test_zero3_rollouts_put_back_the_engines_hooks_without_piling_them_up(tiny_model_path):
    """Each rollout lifts the engine's per-module hooks and puts them back: the same count after every rollout
    (DeepSpeed's own pair kept the removed ones and grew its module stack by one a rollout)."""
    result = subprocess.run([sys.executable, "-c", ZERO3_ROLLOUTS, str(tiny_model_path), str(free_port())],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = eval(result.stdout.split("COUNTS", 1)[1])
    assert counts[0][0] > 0 and counts == [counts[0]] * 3, counts
