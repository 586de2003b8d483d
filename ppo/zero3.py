"""PPO under DeepSpeed ZeRO-3 (`accelerate launch --config_file configs/accelerate/zero3.yaml`, or its settings in
the environment): parameters, gradients and optimiser state partitioned over the processes.

A DeepSpeed engine holds one module and its optimiser, while PPO's one optimiser spans the policy and the critic:
both go into one module (`Trained`), whose forward runs the part it is asked for, so the engine's hooks gather
each layer's parameters as that part runs. The frozen reference gets an engine of its own, without optimiser.
Generation runs with the policy's parameters gathered once and the engine's hooks lifted (`gathered_policy`), as
under FSDP2: each process decodes its rows alone. Checkpoints are DeepSpeed's partitioned ones (`zero3/`).
"""
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from ppo.sharding import without_tied_copies
from rlhf.errors import ConfigError

ZERO3 = "zero3"  # the checkpoint's folder of partitioned state


def uses_deepspeed(accelerator) -> bool:
    """DeepSpeed as accelerate sets it up on GPUs or, on CPU processes (where accelerate keeps plain data
    parallelism), as `accelerate launch` writes it into the environment."""
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            or (accelerator.distributed_type == DistributedType.MULTI_CPU
                and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"))


def zero_stage(accelerator) -> int | None:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if stage else None


def is_zero3(accelerator) -> bool:
    return uses_deepspeed(accelerator) and zero_stage(accelerator) == 3


class Trained(torch.nn.Module):
    """The policy and the critic as one module for one engine; `forward(part, **inputs)` runs one of them."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy = policy
        self.critic = critic

    def forward(self, part: str, **inputs):
        return getattr(self, part)(**inputs)


class Part:
    """One part of the engine's module, called through the engine (so its hooks gather the parameters)."""

    def __init__(self, engine, name: str):
        self.engine, self.name = engine, name

    @property
    def module(self):
        return getattr(self.engine.module, self.name)

    def __call__(self, **inputs):
        return self.engine(self.name, **inputs)


def engine_config(config, accelerator, optimiser: bool) -> dict:
    micro = (config.batch_size // accelerator.num_processes // config.num_mini_batches
             // config.gradient_accumulation_steps)
    settings = {"train_micro_batch_size_per_gpu": max(1, micro), "zero_optimization": {"stage": 3},
                "bf16": {"enabled": accelerator.mixed_precision == "bf16"}}
    if optimiser:
        settings.update(gradient_accumulation_steps=config.gradient_accumulation_steps,
                        gradient_clipping=config.max_grad_norm)
    return settings


def engines(policy, critic, reference, optimizer_class, config, accelerator):
    """(engine over policy and critic with its optimiser, engine over the reference or None)."""
    import deepspeed

    # DeepSpeed gathers and scatters every layer through collectives torch now deprecates, and torch warns at each
    # call (about 16 warnings an update): they name DeepSpeed's code, not the user's, and bury the step log
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
                            "deprecated", FutureWarning)
    trained = Trained(policy, critic)
    optimizer = optimizer_class([p for p in trained.parameters() if p.requires_grad])
    engine, *_ = deepspeed.initialize(model=trained, optimizer=optimizer,
                                      config=engine_config(config, accelerator, optimiser=True))
    reference_engine = None
    if reference is not None:
        reference_engine, *_ = deepspeed.initialize(model=reference,
                                                    config=engine_config(config, accelerator, optimiser=False))
    return engine, reference_engine


@contextmanager
def loaded_whole(accelerator):
    """Inside, models load whole on every process: accelerate's `zero3_init_flag` would have transformers partition
    them while loading, and PPO copies the policy into its reference before the engines partition both."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    # the plugin's flag alone is not enough: transformers partitions while the plugin's config is registered with
    # it (accelerate registers it again as the flag is switched), so the registration is lifted too
    registered = is_deepspeed_zero3_enabled()
    with plugin.zero3_init_context_manager(enable=False):
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            if registered:
                plugin.set_deepspeed_weakref()


def is_engine(optimizer) -> bool:
    return type(optimizer).__name__ == "DeepSpeedEngine"


@contextmanager
def gathered_policy(policy: Part):
    """The policy module with all its parameters on every process and the engine's hooks lifted: its forwards
    inside need no other process (every process must enter)."""
    import deepspeed

    offload = policy.engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(policy.module.parameters())):
        lift_module_hooks(offload)
        try:
            yield policy.module
        finally:
            offload._register_deepspeed_module(offload.module)


def lift_module_hooks(offload) -> None:
    """The engine's per-module hooks removed and forgotten, each parameter's record of the modules using it
    cleared. (DeepSpeed's own `_remove_module_hooks` keeps the removed handles and `setup_zero_stage3_hooks` adds
    to them and to its module stack: both grew by every module at each rollout.)"""
    for parameter in offload.module.parameters():
        parameter.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks + offload.backward_hooks:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def full_state_dict(part: Part, kept: bool = True) -> dict:
    """The part's whole state dict, on the CPU, where `kept` (the process that writes it; the others get {}: a
    whole copy on each would hold the model N times in host memory). Every process must call it, for the
    gathering. Trained parameters come from the optimiser's fp32 master copies: in bf16 the engine's module holds
    rounded ones."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    with deepspeed.zero.GatheredParameters(list(part.module.parameters())):
        if kept:
            state = {name: tensor.detach().cpu().clone() for name, tensor in part.module.state_dict().items()}
    for name, parameter in part.module.named_parameters():
        master = safe_get_full_fp32_param(parameter)  # (a collective: called on every process)
        if master is not None and kept:
            state[name] = master.detach().cpu().clone()
    return without_tied_copies(part.module, state)


def save_partitions(folder: Path, engine) -> None:
    engine.save_checkpoint(str(folder / ZERO3))


def load_partitions(folder: Path, engine) -> None:
    """DeepSpeed loads nothing, with a warning only, from a checkpoint without its partitions: refused instead
    (the run would go on from its first weights while its state said otherwise)."""
    if not (folder / ZERO3 / "latest").is_file():
        raise ConfigError(f"checkpoint {folder} was not written under ZeRO-3 (no {ZERO3}/latest): resume it with the "
                          "launcher config it was made with, or start afresh (`rlhf run --from ppo`, or "
                          "`rlhf ppo --ppo.resume false`)")
    engine.load_checkpoint(str(folder / ZERO3))
