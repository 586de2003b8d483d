"""PPO under FSDP2 (`accelerate launch --config_file configs/accelerate/fsdp.yaml`): policy, critic and reference
sharded over the processes with `torch.distributed.fsdp.fully_shard`, each decoder layer a unit of its own and
the model's root holding the rest (embeddings, final norm, heads).

accelerate prepares one model per optimiser under FSDP2, while PPO's one optimiser spans the policy and the
critic, so the models are sharded here, before the optimiser is made over their sharded parameters.

Generation runs with the policy's full parameters gathered once (`full_parameters`), not layer by layer at every
decoding step: each process decodes its own rows for as many steps as its longest answer needs, and sharded
forwards would need every process at every step. Checkpoints are sharded (torch.distributed.checkpoint): each
process writes its own shards of the models and the optimiser, and resume reads them back.
"""
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from rlhf.errors import ConfigError

SHARDED = "sharded"  # the checkpoint's folder of model and optimiser shards


def is_sharded(accelerator) -> bool:
    """FSDP as accelerate sets it up on GPUs. On CPU processes accelerate keeps plain data parallelism whatever its
    FSDP settings say, while FSDP2 runs there all the same (gloo): its settings are read from the environment that
    `accelerate launch` writes (ACCELERATE_USE_FSDP)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return (accelerator.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def fsdp_version(accelerator) -> int:
    if accelerator.distributed_type == DistributedType.FSDP:
        return accelerator.state.fsdp_plugin.fsdp_version
    return int(os.environ.get("FSDP_VERSION", "1"))


@contextmanager
def every_process_loads():
    """Inside, transformers loads a model's weights on every process. With accelerate's RAM-efficient FSDP loading
    (`fsdp_cpu_ram_efficient_loading`, FSDP_CPU_RAM_EFFICIENT_LOADING) it loads them on the first process only and
    leaves the others empty, for the sharding to broadcast: `fully_shard` here does not broadcast."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved


def shard(model: torch.nn.Module, layer_classes: set[str], accelerator, frozen: bool = False) -> torch.nn.Module:
    """`model` sharded in place: every submodule whose class is in `layer_classes`, then the model itself (the
    unit whose forward PPO calls). Layers reshard after their forward and the root does not (fully_shard's
    defaults: the root's parameters are needed again at once by the backward), unless the model is `frozen` (the
    reference): no backward would ever reshard its root, and its embeddings and head would stay whole on every
    process for the whole run."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if accelerator.mixed_precision == "bf16" else MixedPrecisionPolicy())
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=frozen)
    return model


def layer_classes(model: torch.nn.Module) -> set[str]:
    """The decoder layer classes transformers names as the units not to split (`_no_split_modules`), of the
    model and any model inside it (the critic holds a sequence classifier)."""
    classes = {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or [])}
    if not classes:
        raise ConfigError(f"{type(model).__name__} names no decoder layer class (_no_split_modules): it cannot be "
                          "sharded by layer; run PPO on it with configs/accelerate/ddp.yaml")
    return classes


@contextmanager
def full_parameters(model: torch.nn.Module):
    """Every process holds all of `model`'s parameters inside the block (one all-gather per unit on entry, shards
    again on exit), so forwards inside need no other process. Without FSDP it does nothing."""
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # back to shard()'s settings


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's state dict on the CPU of the main process, {} on the others (every process must call
    it). A parameter tied to another (the LM head to the embeddings) is kept under its first name only, as
    save_pretrained expects."""
    return without_tied_copies(model, get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))


def without_tied_copies(model: torch.nn.Module, state: dict) -> dict:
    """`state` with each parameter tied to another (the LM head to the embeddings) under its first name only."""
    first_name = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if first_name.setdefault(id(parameter), name) != name:
            state.pop(name, None)
    return state


def trained_modules(policy, critic) -> torch.nn.ModuleDict:
    """One module over what the optimiser trains, for its sharded state dict."""
    return torch.nn.ModuleDict({"policy": policy, **({"critic": critic} if critic is not None else {})})


def save_shards(folder: Path, policy, critic, optimizer) -> None:
    models, optimiser = get_state_dict(trained_modules(policy, critic), optimizer)
    dcp.save({"models": models, "optimizer": optimiser}, checkpoint_id=str(folder / SHARDED))


def load_shards(folder: Path, policy, critic, optimizer) -> None:
    modules = trained_modules(policy, critic)
    models, optimiser = get_state_dict(modules, optimizer)
    state = {"models": models, "optimizer": optimiser}
    dcp.load(state, checkpoint_id=str(folder / SHARDED))
    set_state_dict(modules, optimizer, model_state_dict=state["models"], optim_state_dict=state["optimizer"])
